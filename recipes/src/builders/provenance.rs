//! `debian-provenance`: an in-toto Statement v1 with a SLSA Provenance v1 predicate for one
//! architecture's image and root filesystem, made from the lock (every fetched file, the
//! InRelease that vouched for them) and the outputs themselves (the subjects' digests). Nothing
//! in it varies between runs: it is a reproducible output like any other.

use std::fs;

use anyhow::Context;
use rbuild_engine::builtins::BuildContext;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The statement's parts known when the graph is made (one JSON argument).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvenancePlan {
    /// Subject names: the image manifest's, then the root filesystem tar's.
    pub subjects: [String; 2],
    pub build_type: String,
    pub external_parameters: serde_json::Value,
    /// `dists/SUITE/InRelease` and its sha256: the signed file that vouches for the rest.
    pub inrelease: Dependency,
    /// The indices and packages, by archive path.
    pub dependencies: Vec<Dependency>,
    pub builder_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dependency {
    pub name: String,
    pub sha256: String,
}

/// inputs `[image layout, rootfs tar, available stanzas (with the signed Release's
/// `release.json`)]`; argument 0 is a [`ProvenancePlan`].
/// `$out` is the statement (JSON).
pub(super) fn provenance(ctx: &BuildContext) -> anyhow::Result<()> {
    let plan: ProvenancePlan = serde_json::from_str(ctx.arg(0)?).context("provenance plan")?;
    let manifest = rbuild_engine::archive::oci::image_digest(&ctx.inputs[0])?;
    let (rootfs, _) = super::index::sha256_of(&ctx.inputs[1])?;
    let release: serde_json::Value = serde_json::from_slice(
        &fs::read(ctx.inputs[2].join("release.json")).context("reading the verified Release")?,
    )
    .context("the verified Release")?;
    let signed_by = release["signed_by"].clone();
    let mut deps = vec![json!({
        "name": plan.inrelease.name,
        "digest": {"sha256": plan.inrelease.sha256},
        "annotations": {"signedBy": signed_by},
    })];
    deps.extend(
        plan.dependencies
            .iter()
            .map(|d| json!({"name": d.name, "digest": {"sha256": d.sha256}})),
    );
    let statement = json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [
            {"name": plan.subjects[0], "digest": {"sha256": manifest}},
            {"name": plan.subjects[1], "digest": {"sha256": rootfs}},
        ],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": plan.build_type,
                "externalParameters": plan.external_parameters,
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": plan.builder_id},
            },
        },
    });
    let mut text = serde_json::to_vec_pretty(&statement)?;
    text.push(b'\n');
    fs::write(&ctx.out, text)?;
    Ok(())
}
