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
    /// The installed packages: name, version, architecture.
    pub packages: Vec<(String, String, String)>,
    pub tool_version: String,
}

/// inputs `[image layout, configured tree, available stanzas, verified index]`; argument 0 is
/// an [`SbomPlan`]. `$out` is the document.
pub(super) fn sbom(ctx: &BuildContext) -> anyhow::Result<()> {
    let plan: SbomPlan = serde_json::from_str(ctx.arg(0)?).context("sbom plan")?;
    let digest = super::provenance::image_manifest_digest(&ctx.inputs[0])?;
    let tree = &ctx.inputs[1];
    let available = fs::read_to_string(ctx.inputs[2].join("available"))
        .context("reading the packages' stanzas")?;
    let release: serde_json::Value = serde_json::from_slice(
        &fs::read(ctx.inputs[3].join("release.json")).context("reading the verified Release")?,
    )?;
    let major = release["version"]
        .as_str()
        .and_then(|v| v.split('.').next())
        .filter(|v| !v.is_empty())
        .or_else(|| release["codename"].as_str())
        .context("the verified Release has neither Version nor Codename")?;
    let distro = format!("debian-{major}");
    let stanzas = split_stanzas(&available);
    let mut installed = Vec::new();
    for (name, version, arch) in &plan.packages {
        let stanza = stanzas
            .iter()
            .find(|s| {
                field(s, "Package") == Some(name)
                    && field(s, "Version") == Some(version)
                    && field(s, "Architecture") == Some(arch)
            })
            .with_context(|| format!("sbom: no index stanza for {name} {version} ({arch})"))?;
        installed.push(Installed {
            stanza,
            copyright: copyright(tree, name),
        });
    }
    let doc = Sbom::new(
        &plan.name,
        &plan.architecture,
        &digest,
        &distro,
        ctx.source_date_epoch(),
        &plan.tool_version,
        &installed,
    )?;
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

/// The stanzas of an `available` file, each with its text.
fn split_stanzas(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .map(|s| s.trim_matches('\n'))
        .filter(|s| !s.is_empty())
        .collect()
}

/// A stanza's single-line field, by exact name at the start of a line.
fn field<'a>(stanza: &'a str, name: &str) -> Option<&'a str> {
    stanza.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

/// `usr/share/doc/NAME/copyright` of the tree, following the tree's own symlinks (a package's
/// doc directory may link to another's) without leaving it.
fn copyright(tree: &Path, name: &str) -> Option<String> {
    let mut rel = PathBuf::from(format!("usr/share/doc/{name}/copyright"));
    for _ in 0..16 {
        let mut resolved = PathBuf::new();
        let mut changed = false;
        let parts: Vec<_> = rel.components().collect();
        for (i, c) in parts.iter().enumerate() {
            let next = resolved.join(c);
            match fs::read_link(tree.join(&next)) {
                Ok(target) => {
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
                Err(_) => resolved = next,
            }
        }
        if !changed {
            return fs::read_to_string(tree.join(&rel)).ok();
        }
    }
    None
}
