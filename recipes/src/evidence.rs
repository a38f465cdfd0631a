//! The derivations of an image's evidence: its SBOMs (`spdx`, `cyclonedx`) and its provenance,
//! made from what the image was built from — the lock's files, the packages each layer
//! installs, the files each layer copies in — for a Debian recipe and, layer on layer, for a
//! layered one.

use std::collections::BTreeMap;

use rbuild_engine::{Derivation, DrvHash, Graph, Stage};
use sha2::{Digest, Sha256};

use crate::builders::{Dependency, ProvenancePlan, SbomFile, SbomPackage, SbomPlan};
use crate::expand::{available_drv, ExpandError};
use crate::recipe::{Lock, PinnedFile, PinnedPackage, Recipe};

/// The build type of rbuild's provenance.
pub const BUILD_TYPE: &str = "urn:rbuild:build-type:debian-recipe:v1";

/// What one architecture's image is made of, for its evidence.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// The recipe's name (the top one, for a layered recipe).
    pub name: String,
    pub architecture: String,
    pub suite: String,
    pub source_date_epoch: i64,
    /// The base's verified index: the stanzas' derivation ([`Evidence::stanzas`]) takes its
    /// inputs and arguments.
    pub verify: DrvHash,
    pub inrelease: PinnedFile,
    pub indices: Vec<PinnedFile>,
    /// Every installed package with the image layer (0 = the base's) that installed it.
    pub packages: Vec<(PinnedPackage, usize)>,
    /// Every file a layer copied in.
    pub files: Vec<SbomFile>,
    /// Each image layer's description (its history line).
    pub layers: Vec<String>,
    /// The provenance's `externalParameters`.
    pub external: serde_json::Value,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

impl Evidence {
    /// A Debian recipe's: its lock, one layer.
    pub fn of_debian(recipe: &Recipe, lock: &Lock, verify: DrvHash, history: &str) -> Evidence {
        let recipe_json = serde_json::to_vec(recipe).expect("recipes serialize");
        Evidence {
            name: recipe.name.clone(),
            architecture: recipe.architecture.clone(),
            suite: lock.suite.clone(),
            source_date_epoch: lock.source_date_epoch,
            verify,
            inrelease: lock.inrelease.clone(),
            indices: lock.indices.clone(),
            packages: lock.packages.iter().map(|p| (p.clone(), 0)).collect(),
            files: vec![],
            layers: vec![history.to_owned()],
            external: serde_json::json!({
                "recipe": {"name": recipe.name, "digest": {"sha256": sha256_hex(&recipe_json)}},
                "lock": {"digest": {"sha256": sha256_hex(crate::recipe::render_lock(lock).as_bytes())}},
                "suite": lock.suite,
                "architecture": recipe.architecture,
                "variant": recipe.variant,
                "sourceDateEpoch": lock.source_date_epoch,
            }),
        }
    }

    /// One more layer on top: the packages it installs and the files it copies (path, bytes).
    pub fn add_layer(
        &mut self,
        history: &str,
        packages: &[PinnedPackage],
        files: &[(String, &[u8])],
    ) {
        let layer = self.layers.len();
        self.layers.push(history.to_owned());
        self.packages
            .extend(packages.iter().map(|p| (p.clone(), layer)));
        self.files
            .extend(files.iter().map(|(path, bytes)| SbomFile {
                path: path.clone(),
                sha256: sha256_hex(bytes),
                sha1: hex::encode(sha1::Sha1::digest(bytes)),
                layer,
            }));
    }

    /// The derivation of every installed package's index stanza (dpkg's `available`).
    pub fn stanzas(&self, g: &mut Graph) -> Result<DrvHash, ExpandError> {
        let names: Vec<String> = self.packages.iter().map(|(p, _)| p.name.clone()).collect();
        available_drv(
            g,
            format!("{}-{}-available", self.suite, self.architecture),
            &self.verify,
            &names,
        )
    }

    /// A layered recipe's parameters: its own (name, digest of the recipe and of its lock) with
    /// its base's below.
    pub fn layered(&mut self, name: &str, recipe_json: &[u8], lock_text: &str) {
        let base = std::mem::take(&mut self.external);
        self.name = name.to_owned();
        self.external = serde_json::json!({
            "recipe": {"name": name, "digest": {"sha256": sha256_hex(recipe_json)}},
            "lock": {"digest": {"sha256": sha256_hex(lock_text.as_bytes())}},
            "base": base,
        });
    }
}

/// The SBOM formats rbuild writes: output name and the artifact type of its OCI referrer.
pub const SBOM_FORMATS: [(&str, &str); 2] = [
    ("spdx", "application/spdx+json"),
    ("cyclonedx", "application/vnd.cyclonedx+json"),
];

/// The `spdx` and `cyclonedx` derivations of `ev`'s image, from `manifest` (the image's
/// [`crate::expand::image_manifest`]), in [`SBOM_FORMATS`]' order. `trees` is the image's root
/// filesystem: its base tree, then each layer's change set.
pub fn sboms(
    g: &mut Graph,
    ev: &Evidence,
    manifest: &DrvHash,
    trees: &[DrvHash],
) -> Result<Vec<(String, DrvHash)>, ExpandError> {
    let (tree, change_sets) = trees.split_first().expect("an image has a base tree");
    let stanzas = ev.stanzas(g)?;
    let sde: BTreeMap<String, String> = [(
        "SOURCE_DATE_EPOCH".to_owned(),
        ev.source_date_epoch.to_string(),
    )]
    .into_iter()
    .collect();
    let tool_version = tool_version();
    let mut out = Vec::new();
    for (format, _) in SBOM_FORMATS {
        let plan = SbomPlan {
            format: format.into(),
            name: ev.name.clone(),
            architecture: ev.architecture.clone(),
            packages: ev
                .packages
                .iter()
                .map(|(p, layer)| SbomPackage {
                    name: p.name.clone(),
                    version: p.version.clone(),
                    architecture: p.architecture.clone(),
                    layer: *layer,
                })
                .collect(),
            files: ev.files.clone(),
            layers: ev.layers.clone(),
            tool_version: tool_version.clone(),
        };
        out.push((
            format.to_owned(),
            g.add(Derivation {
                name: format!("{}-{format}", ev.name),
                stage: Stage::Pack,
                builder: "builtin:debian-sbom".into(),
                args: vec![serde_json::to_string(&plan).expect("plan serializes")],
                env: sde.clone(),
                inputs: [manifest, tree, &stanzas]
                    .into_iter()
                    .chain(change_sets)
                    .cloned()
                    .collect(),
                system: None,
                fixed_output: None,
            })?,
        ));
    }
    Ok(out)
}

fn tool_version() -> String {
    rbuild_engine::derivation::BUILDERS_EPOCH
        .trim_end_matches('\0')
        .to_owned()
}

/// The `provenance` derivation of `ev`'s image (the layout `image`) and its `rootfs`.
pub fn provenance(
    g: &mut Graph,
    ev: &Evidence,
    image: &DrvHash,
    rootfs: &DrvHash,
) -> Result<DrvHash, ExpandError> {
    let mut dependencies: Vec<Dependency> = ev
        .indices
        .iter()
        .map(|i| Dependency {
            name: i.path.clone(),
            sha256: i.sha256.clone(),
        })
        .collect();
    for (p, _) in &ev.packages {
        if !dependencies.iter().any(|d| d.name == p.filename) {
            dependencies.push(Dependency {
                name: p.filename.clone(),
                sha256: p.sha256.clone(),
            });
        }
    }
    // The stanzas' derivation also holds the signed Release's fields (`release.json`).
    let stanzas = ev.stanzas(g)?;
    let plan = ProvenancePlan {
        subjects: [
            format!("{} image manifest ({})", ev.name, ev.architecture),
            format!("{} rootfs.tar ({})", ev.name, ev.architecture),
        ],
        build_type: BUILD_TYPE.into(),
        external_parameters: ev.external.clone(),
        inrelease: Dependency {
            name: ev.inrelease.path.clone(),
            sha256: ev.inrelease.sha256.clone(),
        },
        dependencies,
        builder_id: format!("urn:rbuild:builder:{}", tool_version()),
    };
    Ok(g.add(Derivation {
        name: format!("{}-provenance", ev.name),
        stage: Stage::Pack,
        builder: "builtin:debian-provenance".into(),
        args: vec![serde_json::to_string(&plan).expect("plan serializes")],
        env: BTreeMap::new(),
        inputs: vec![image.clone(), rootfs.clone(), stanzas],
        system: None,
        fixed_output: None,
    })?)
}
