//! The pack builders: a tree becomes a deterministic tar, a tar becomes a compressed OCI layer,
//! layers and a config become an OCI image layout.

use std::fs;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::BuildContext;
use crate::archive::{self, oci};
use rbuild_store::meta::{EntryMeta, TreeMeta};

/// `pack-tar`: input 0 is a tree (with its ownership sidecar); `$out` is its deterministic tar.
pub fn pack_tar(ctx: &BuildContext) -> anyhow::Result<()> {
    let tree = ctx.inputs.first().context("pack-tar needs a tree input")?;
    let meta_path = rbuild_store::meta::sidecar(tree);
    let meta = rbuild_store::meta::TreeMeta::read(&meta_path)?;
    let f =
        fs::File::create(&ctx.out).with_context(|| format!("creating {}", ctx.out.display()))?;
    let w = archive::tar_out::write_tar(
        tree,
        &meta,
        ctx.source_date_epoch(),
        BufWriter::with_capacity(1 << 20, f),
    )?;
    w.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}

/// What a layer output records beside its blob (`$out/layer.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerInfo {
    pub diff_id: String,
    pub digest: String,
    pub size: u64,
    pub created_by: String,
    /// The blob's compression; absent for gzip (as every layer was before zstd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<LayerCompression>,
}

/// How a layer blob is compressed: `$out/layer.tar.gz` or `$out/layer.tar.zst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerCompression {
    Gzip,
    Zstd,
}

impl LayerCompression {
    /// From a layer builder's optional compression argument (none: gzip).
    fn from_arg(arg: Option<&String>) -> anyhow::Result<LayerCompression> {
        let linked = archive::tar_out::zstd_layer_arg();
        match arg.map(String::as_str) {
            None | Some("gzip") => Ok(LayerCompression::Gzip),
            Some(a) if a == linked => Ok(LayerCompression::Zstd),
            Some(a) if a.starts_with("zstd@") => anyhow::bail!(
                "the derivation asks for {a}, but this rbuild links {linked}: its bytes could differ; build it with an rbuild linking the same zstd"
            ),
            Some(other) => anyhow::bail!("unknown layer compression {other:?} (gzip or {linked})"),
        }
    }

    fn blob_name(self) -> &'static str {
        match self {
            LayerCompression::Gzip => "layer.tar.gz",
            LayerCompression::Zstd => "layer.tar.zst",
        }
    }

    fn media_type(self) -> &'static str {
        match self {
            LayerCompression::Gzip => oci::MEDIA_TYPE_LAYER_GZIP,
            LayerCompression::Zstd => oci::MEDIA_TYPE_LAYER_ZSTD,
        }
    }
}

/// `pack-layer`: input 0 is a layer tar; `$out/layer.tar.gz` (or `.zst`) is its reproducible
/// compression and `$out/layer.json` the digests. Argument 0 is the history line, argument 1
/// (optional) the compression, `gzip` or `zstd`.
pub fn pack_layer(ctx: &BuildContext) -> anyhow::Result<()> {
    let tar = ctx.inputs.first().context("pack-layer needs a tar input")?;
    let compression = LayerCompression::from_arg(ctx.args.get(1))?;
    write_layer_blob(tar, &ctx.out, ctx.arg(0)?, compression)
}

/// Compress the layer tar `tar` into `out`'s blob and record its digests in `out/layer.json`.
fn write_layer_blob(
    tar: &Path,
    out: &Path,
    created_by: &str,
    compression: LayerCompression,
) -> anyhow::Result<()> {
    fs::create_dir_all(out)?;
    let (diff_hex, _) = oci::sha256_file(tar)?;
    let blob = out.join(compression.blob_name());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let r = BufReader::with_capacity(
        1 << 20,
        fs::File::open(tar).with_context(|| format!("opening {}", tar.display()))?,
    );
    let w = BufWriter::with_capacity(1 << 20, fs::File::create(&blob)?);
    match compression {
        LayerCompression::Gzip => {
            let mut w = archive::tar_out::gzip_parallel(r, w, 6, threads)?;
            w.flush()?;
        }
        LayerCompression::Zstd => archive::tar_out::zstd_reproducible(r, w)?,
    }
    let (digest_hex, size) = oci::sha256_file(&blob)?;
    let info = LayerInfo {
        diff_id: format!("sha256:{diff_hex}"),
        digest: format!("sha256:{digest_hex}"),
        size,
        created_by: created_by.to_owned(),
        compression: (compression != LayerCompression::Gzip).then_some(compression),
    };
    fs::write(out.join("layer.json"), serde_json::to_vec_pretty(&info)?)?;
    Ok(())
}

/// Whether a path differs between the lower and the upper tree, ignoring mtimes: a file that was
/// only touched, or rewritten with the same bytes, is unchanged.
fn differs(lower: &Path, upper: &Path, lm: &EntryMeta, um: &EntryMeta) -> anyhow::Result<bool> {
    if (lm.uid, lm.gid, lm.mode, &lm.caps) != (um.uid, um.gid, um.mode, &um.caps) {
        return Ok(true);
    }
    let (l, u) = (fs::symlink_metadata(lower)?, fs::symlink_metadata(upper)?);
    let (lt, ut) = (l.file_type(), u.file_type());
    if lt.is_dir() != ut.is_dir()
        || lt.is_symlink() != ut.is_symlink()
        || lt.is_file() != ut.is_file()
    {
        return Ok(true);
    }
    if lt.is_symlink() {
        return Ok(fs::read_link(lower)? != fs::read_link(upper)?);
    }
    if lt.is_file() {
        return Ok(l.len() != u.len()
            || rbuild_store::hash::file_blake3(lower)? != rbuild_store::hash::file_blake3(upper)?);
    }
    Ok(false)
}

/// `layer-diff`: inputs `[lower tree, upper tree]` (each with its ownership sidecar); argument 0
/// is the history line. `$out` is an OCI layer (as `pack-layer` makes) holding the change set:
/// added and changed entries with their parent directories, and a `.wh.NAME` whiteout for each
/// deleted path (only the topmost one of a deleted subtree; explicit whiteouts, as the OCI
/// layer specification recommends, never opaque ones). A path whose type changed is written
/// whole: applying it removes the old path first.
pub fn layer_diff(ctx: &BuildContext) -> anyhow::Result<()> {
    let (lower, upper) = match ctx.inputs.as_slice() {
        [l, u] => (l, u),
        _ => anyhow::bail!("layer-diff needs exactly two inputs (lower and upper tree)"),
    };
    let lmeta = TreeMeta::read(&rbuild_store::meta::sidecar(lower))?;
    let umeta = TreeMeta::read(&rbuild_store::meta::sidecar(upper))?;
    let sde = ctx.source_date_epoch();
    let work = ctx.out.with_extension("work");
    let tree = work.join("tree");
    fs::create_dir_all(&tree)?;
    let mut meta = TreeMeta::default();
    let root_meta = umeta
        .get("")
        .cloned()
        .unwrap_or(EntryMeta::root(0o755, sde));
    meta.entries.insert(String::new(), root_meta);

    // Make `rel`'s parent directories exist in the change set, with the upper tree's metadata.
    let ensure_parents = |rel: &str, meta: &mut TreeMeta| -> anyhow::Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !meta.entries.contains_key(&prefix) {
                fs::create_dir_all(tree.join(&prefix))?;
                let m = umeta
                    .get(&prefix)
                    .cloned()
                    .context("upper tree metadata lacks a parent")?;
                meta.entries.insert(prefix.clone(), m);
            }
        }
        Ok(())
    };

    for (rel, um) in umeta.entries.iter().filter(|(r, _)| !r.is_empty()) {
        let changed = match lmeta.get(rel) {
            None => true,
            Some(lm) => differs(&lower.join(rel), &upper.join(rel), lm, um)?,
        };
        if !changed {
            continue;
        }
        ensure_parents(rel, &mut meta)?;
        let src = upper.join(rel);
        let dst = tree.join(rel);
        let ft = fs::symlink_metadata(&src)?.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&dst)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else {
            fs::copy(&src, &dst).with_context(|| format!("copying {rel}"))?;
        }
        meta.entries.insert(rel.clone(), um.clone());
    }
    for rel in lmeta
        .entries
        .keys()
        .filter(|r| !r.is_empty() && !umeta.entries.contains_key(*r))
    {
        // Below a directory that is gone or is now a file or symlink: the parent's own entry
        // (its whiteout, or its replacement, which removes the old path) covers it.
        let parent_gone = rel.rsplit_once('/').is_some_and(|(p, _)| {
            !umeta.entries.contains_key(p)
                || !fs::symlink_metadata(upper.join(p)).is_ok_and(|m| m.is_dir())
        });
        if parent_gone {
            continue;
        }
        ensure_parents(rel, &mut meta)?;
        let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel.as_str()));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        fs::write(tree.join(&wh), b"")?;
        meta.entries.insert(wh, EntryMeta::root(0o644, sde));
    }
    let tar_path = work.join("layer.tar");
    let f = fs::File::create(&tar_path)?;
    let w = archive::tar_out::write_tar(&tree, &meta, sde, BufWriter::with_capacity(1 << 20, f))?;
    w.into_inner().map_err(|e| e.into_error())?;
    let compression = LayerCompression::from_arg(ctx.args.get(1))?;
    write_layer_blob(&tar_path, &ctx.out, ctx.arg(0)?, compression)?;
    fs::remove_dir_all(&work)?;
    Ok(())
}

/// `pack-oci`: inputs are layer outputs (bottom first), then the files to attach as referrers;
/// argument 0 is the image config as JSON ([`oci::ImageConfig`]), 1 the reference name, 2 (if
/// present) a JSON list of artifact types, one per trailing referrer input; `$out` becomes
/// an OCI image layout, its referrers listed in `referrers/` ([`oci::attach_referrers`]).
pub fn pack_oci(ctx: &BuildContext) -> anyhow::Result<()> {
    let kinds: Vec<String> = match ctx.args.get(2) {
        Some(a) => serde_json::from_str(a).context("pack-oci: referrer list argument")?,
        None => vec![],
    };
    if kinds.len() > ctx.inputs.len() {
        anyhow::bail!(
            "pack-oci: {} referrers named but only {} inputs",
            kinds.len(),
            ctx.inputs.len()
        );
    }
    let (layer_inputs, referrer_inputs) = ctx.inputs.split_at(ctx.inputs.len() - kinds.len());
    let config = image_config(ctx)?;
    let digest = write_image(ctx, &config, layer_inputs, oci::LayerBlobs::Copy)?;
    if !kinds.is_empty() {
        let referrers: Vec<oci::Referrer> = kinds
            .into_iter()
            .zip(referrer_inputs)
            .map(|(artifact_type, path)| oci::Referrer {
                artifact_type,
                path: path.clone(),
            })
            .collect();
        oci::attach_referrers(&ctx.out, &referrers, &config.created)
            .with_context(|| format!("pack-oci: attaching referrers to {digest}"))?;
    }
    Ok(())
}

/// `pack-oci-manifest`: `pack-oci`'s image without its layer blobs or referrers — the config, the
/// manifest and `index.json`, all the image's digest depends on — for derivations that describe the
/// image (its SBOMs) and are themselves attached to it.
pub fn pack_oci_manifest(ctx: &BuildContext) -> anyhow::Result<()> {
    write_image(ctx, &image_config(ctx)?, &ctx.inputs, oci::LayerBlobs::Omit)?;
    Ok(())
}

/// The image config of a `pack-oci` or `pack-oci-manifest` derivation (argument 0).
fn image_config(ctx: &BuildContext) -> anyhow::Result<oci::ImageConfig> {
    serde_json::from_str(ctx.arg(0)?).context("pack-oci: image config argument")
}

/// The image layout of the layer outputs `inputs` with `config` and `ctx`'s reference
/// name (argument 1) into `$out`; returns the manifest digest.
fn write_image(
    ctx: &BuildContext,
    config: &oci::ImageConfig,
    inputs: &[PathBuf],
    blobs: oci::LayerBlobs,
) -> anyhow::Result<String> {
    let mut layers = Vec::new();
    for input in inputs {
        let info_path = input.join("layer.json");
        let info: LayerInfo = serde_json::from_slice(
            &fs::read(&info_path).with_context(|| format!("reading {}", info_path.display()))?,
        )?;
        let compression = info.compression.unwrap_or(LayerCompression::Gzip);
        layers.push(oci::Layer {
            blob_path: input.join(compression.blob_name()),
            media_type: compression.media_type().to_owned(),
            diff_id: info.diff_id,
            digest: info.digest,
            size: info.size,
            created_by: info.created_by,
        });
    }
    let ref_name = ctx.args.get(1).map(String::as_str);
    Ok(oci::write_layout(
        &ctx.out, &layers, config, ref_name, blobs,
    )?)
}

/// `pack-oci-index`: inputs are single-image OCI layouts (one per architecture); `$out`
/// becomes one layout whose image is a multi-platform index of them; argument 0 is its
/// reference name.
pub fn pack_oci_index(ctx: &BuildContext) -> anyhow::Result<()> {
    let images: Vec<&Path> = ctx.inputs.iter().map(PathBuf::as_path).collect();
    let ref_name = ctx.args.first().map(String::as_str);
    oci::write_multi_platform_layout(&ctx.out, &images, ref_name)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rbuild_store::meta::sidecar;
    use std::collections::BTreeMap;

    fn tree(root: &Path, entries: &[(&str, Option<&str>)]) {
        let mut meta = TreeMeta::default();
        fs::create_dir_all(root).unwrap();
        for (rel, content) in entries {
            let p = root.join(rel);
            match content {
                Some(c) => fs::write(&p, c).unwrap(),
                None if !rel.is_empty() => fs::create_dir(&p).unwrap(),
                None => {}
            }
            let mode = if content.is_some() { 0o644 } else { 0o755 };
            meta.entries
                .insert(rel.to_string(), EntryMeta::root(mode, 0));
        }
        meta.write(&sidecar(root)).unwrap();
    }

    fn layer_entries(out: &Path) -> Vec<String> {
        let gz = fs::File::open(out.join("layer.tar.gz")).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(gz));
        ar.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let kind = if e.header().entry_type().is_dir() {
                    "/"
                } else {
                    ""
                };
                let path = e.path().unwrap().display().to_string();
                format!("{}{kind}", path.trim_end_matches('/'))
            })
            .collect()
    }

    #[test]
    fn a_directory_replaced_by_a_file_is_written_whole_without_whiteouts_below_it() {
        let t = tempfile::tempdir().unwrap();
        let (lower, upper) = (t.path().join("lower"), t.path().join("upper"));
        tree(
            &lower,
            &[
                ("", None),
                ("opt", None),
                ("opt/x", None),
                ("opt/x/a", Some("old")),
                ("opt/gone", Some("bye")),
                ("keep", Some("same")),
            ],
        );
        tree(
            &upper,
            &[
                ("", None),
                ("opt", None),
                ("opt/x", Some("now a file")),
                ("keep", Some("same")),
            ],
        );
        let out = t.path().join("out");
        layer_diff(&BuildContext {
            args: vec!["test".into()],
            env: BTreeMap::new(),
            inputs: vec![lower, upper],
            out: out.clone(),
        })
        .unwrap();
        let mut got = layer_entries(&out);
        got.sort();
        assert_eq!(got, vec!["opt/", "opt/.wh.gone", "opt/x"], "{got:?}");
    }
}
