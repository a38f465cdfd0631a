//! `debian-sbom`: the SPDX or CycloneDX document of one architecture's image.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rbuild_engine::builtins::BuildContext;
use serde::{Deserialize, Serialize};

use crate::sbom::{self, Installed, Sbom};

/// One JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SbomPlan {
    /// `spdx` or `cyclonedx`.
    pub format: String,
    pub name: String,
    pub architecture: String,
    /// The installed packages.
    pub packages: Vec<SbomPackage>,
    /// The files layers copied in.
    pub files: Vec<SbomFile>,
    /// Each image layer's description, bottom first.
    pub layers: Vec<String>,
    pub tool_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SbomPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The image layer that installed it (0: the bottom one).
    pub layer: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SbomFile {
    /// Absolute path in the image.
    pub path: String,
    pub sha256: String,
    /// SPDX 2.3 requires a file's SHA-1.
    pub sha1: String,
    pub layer: usize,
}

/// inputs `[image layout, configured tree, available stanzas (with the signed Release's
/// `release.json`), change set…]`
/// (the change sets of a layered image's layers, bottom first); argument 0 is an [`SbomPlan`].
/// `$out` is the document.
pub(super) fn sbom(ctx: &BuildContext) -> anyhow::Result<()> {
    let plan: SbomPlan = serde_json::from_str(ctx.arg(0)?).context("sbom plan")?;
    let digest = rbuild_engine::archive::oci::image_digest(&ctx.inputs[0])?;
    let layer_digests = layer_digests(&ctx.inputs[0], &digest)?;
    if layer_digests.len() != plan.layers.len() {
        bail!(
            "sbom: the image has {} layers, the plan describes {}",
            layer_digests.len(),
            plan.layers.len()
        );
    }
    let tree = super::stack::Stack::compose(&ctx.inputs[1], ctx.inputs.get(3..).unwrap_or(&[]))?;
    let available = fs::read_to_string(ctx.inputs[2].join("available"))
        .context("reading the packages' stanzas")?;
    let release: serde_json::Value = serde_json::from_slice(
        &fs::read(ctx.inputs[2].join("release.json")).context("reading the verified Release")?,
    )?;
    let major = release["version"]
        .as_str()
        .and_then(|v| v.split('.').next())
        .filter(|v| !v.is_empty())
        .or_else(|| release["codename"].as_str())
        .context("the verified Release has neither Version nor Codename")?;
    let distro = format!("debian-{major}");
    // Each stanza by package, version and architecture, read once.
    let stanzas: std::collections::HashMap<[Option<String>; 3], &str> = split_stanzas(&available)
        .into_iter()
        .map(|s| {
            let key = ["Package", "Version", "Architecture"].map(|f| sbom::field(s, f));
            (key, s)
        })
        .collect();
    let mut installed = Vec::new();
    for p in &plan.packages {
        let key = [&p.name, &p.version, &p.architecture].map(|v| Some(v.clone()));
        let stanza = *stanzas.get(&key).with_context(|| {
            format!(
                "sbom: no index stanza for {} {} ({})",
                p.name, p.version, p.architecture
            )
        })?;
        installed.push(Installed {
            stanza,
            copyright: copyright(&tree, &p.name),
            layer: p.layer,
        });
    }
    let mut doc = Sbom::new(
        &plan.name,
        &plan.architecture,
        &digest,
        &distro,
        ctx.source_date_epoch(),
        &plan.tool_version,
        &installed,
    )?;
    doc.layers = plan
        .layers
        .iter()
        .zip(layer_digests)
        .map(|(description, digest)| sbom::Layer {
            description: description.clone(),
            digest,
        })
        .collect();
    doc.files = plan
        .files
        .iter()
        .map(|f| sbom::CopiedFile {
            path: f.path.clone(),
            sha256: f.sha256.clone(),
            sha1: f.sha1.clone(),
            layer: f.layer,
        })
        .collect();
    let value = match plan.format.as_str() {
        "spdx" => sbom::spdx::document(&doc),
        "cyclonedx" => sbom::cyclonedx::document(&doc),
        other => bail!("sbom: unknown format {other:?}"),
    };
    let mut text = serde_json::to_vec_pretty(&value)?;
    text.push(b'\n');
    fs::write(&ctx.out, text)?;
    Ok(())
}

/// The digests (hex) of the layers of the image manifest `manifest` in `layout`, bottom first.
fn layer_digests(layout: &Path, manifest: &str) -> anyhow::Result<Vec<String>> {
    let path = layout.join("blobs/sha256").join(manifest);
    let m: serde_json::Value = serde_json::from_slice(
        &fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", path.display()))?;
    m["layers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .and_then(|d| d.strip_prefix("sha256:"))
                .map(str::to_owned)
                .with_context(|| format!("{}: a layer without a sha256 digest", path.display()))
        })
        .collect()
}

/// The stanzas of an `available` file, each with its text.
fn split_stanzas(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .map(|s| s.trim_matches('\n'))
        .filter(|s| !s.is_empty())
        .collect()
}

/// `usr/share/doc/NAME/copyright` of the tree, following the tree's own symlinks (a package's
/// doc directory may link to another's) without leaving it.
fn copyright(tree: &super::stack::Stack, name: &str) -> Option<String> {
    let file = |rel: &Path| tree.get(&rel.to_string_lossy()).map(|(_, src)| src.clone());
    let mut rel = PathBuf::from(format!("usr/share/doc/{name}/copyright"));
    for _ in 0..16 {
        let mut resolved = PathBuf::new();
        let mut changed = false;
        let parts: Vec<_> = rel.components().collect();
        for (i, c) in parts.iter().enumerate() {
            let next = resolved.join(c);
            match file(&next).map(fs::read_link) {
                Some(Ok(target)) => {
                    let mut base = if target.is_absolute() {
                        PathBuf::new()
                    } else {
                        resolved.clone()
                    };
                    for t in target.components() {
                        match t {
                            std::path::Component::ParentDir => {
                                base.pop();
                            }
                            std::path::Component::Normal(n) => base.push(n),
                            _ => {}
                        }
                    }
                    for rest in &parts[i + 1..] {
                        base.push(rest);
                    }
                    rel = base;
                    changed = true;
                    break;
                }
                _ => resolved = next,
            }
        }
        if !changed {
            return file(&rel).and_then(|f| fs::read_to_string(f).ok());
        }
    }
    None
}
