//! The pack builders: a tree becomes a deterministic tar, a tree (or its tar) a compressed OCI layer,
//! layers and a config become an OCI image layout.

use std::fs;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::BuildContext;
use crate::archive::{self, oci};
use rbuild_store::meta::TreeMeta;

/// `pack-tar`: input 0 is a tree (with its ownership sidecar); `$out` is its deterministic tar.
pub fn pack_tar(ctx: &BuildContext) -> anyhow::Result<()> {
    let tree = ctx.inputs.first().context("pack-tar needs a tree input")?;
    tar_tree(tree, &ctx.out, ctx.source_date_epoch())
}

/// The deterministic tar of `tree` (with its ownership sidecar) into the file `out`.
fn tar_tree(tree: &Path, out: &Path, source_date_epoch: i64) -> anyhow::Result<()> {
    let meta = TreeMeta::read(&rbuild_store::meta::sidecar(tree))?;
    let f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    write_tree_tar(tree, &meta, source_date_epoch, f)
}

/// The deterministic tar of `tree` (ownership from `meta`) into `w`, buffered and flushed.
fn write_tree_tar(
    tree: &Path,
    meta: &TreeMeta,
    source_date_epoch: i64,
    w: impl std::io::Write,
) -> anyhow::Result<()> {
    let w = archive::tar_out::write_tar(
        tree,
        meta,
        source_date_epoch,
        BufWriter::with_capacity(1 << 20, w),
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

/// `pack-layer`: input 0 is a tree (with its ownership sidecar) or, as before, its
/// deterministic tar; `$out/layer.tar.gz` (or `.zst`) is the tar's reproducible compression
/// and `$out/layer.json` the digests. Argument 0 is the history line, argument 1 (optional)
/// the compression, `gzip` or `zstd`.
pub fn pack_layer(ctx: &BuildContext) -> anyhow::Result<()> {
    let input = ctx
        .inputs
        .first()
        .context("pack-layer needs a tree input")?;
    let compression = LayerCompression::from_arg(ctx.args.get(1))?;
    if input.is_dir() {
        layer_of_tree(
            input,
            ctx.source_date_epoch(),
            &ctx.out,
            ctx.arg(0)?,
            compression,
        )
    } else {
        let r = fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
        write_layer_blob(r, &ctx.out, ctx.arg(0)?, compression)
    }
}

/// The layer of `tree`: its deterministic tar, streamed from a thread into the compressor, so
/// that no 200 MB tar is written and read back on the way.
fn layer_of_tree(
    tree: &Path,
    source_date_epoch: i64,
    out: &Path,
    created_by: &str,
    compression: LayerCompression,
) -> anyhow::Result<()> {
    let meta = TreeMeta::read(&rbuild_store::meta::sidecar(tree))?;
    let (r, w) = std::os::unix::net::UnixStream::pair().context("making the tar's pipe")?;
    std::thread::scope(|s| {
        let writer = std::thread::Builder::new()
            .name("tar".into())
            .spawn_scoped(s, || write_tree_tar(tree, &meta, source_date_epoch, w))
            .context("starting the tar thread")?;
        // Returns once the tar ends, or at its first error, closing the pipe so that the
        // writer stops too.
        let compressed = write_layer_blob(r, out, created_by, compression);
        let written = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the tar thread panicked"))?;
        match (written, compressed) {
            // The compressor stopped first (a full disk, say), and the writer then found the
            // pipe closed: the compressor's error is the one to report.
            (Err(w), Err(c)) if is_broken_pipe(&w) => Err(c),
            // A tar that failed half way reads as a short one: its own error comes first.
            (Err(w), _) => Err(w.context(format!("writing the tar of {}", tree.display()))),
            (Ok(()), c) => c,
        }
    })
}

/// Whether `e` is, or was caused by, writing to a pipe whose reader is gone.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<archive::ArchiveError>()
                .is_some_and(|a| a.to_string().contains("Broken pipe"))
    })
}

/// Compress the layer tar read from `tar` into `out`'s blob and record its digests in
/// `out/layer.json`.
fn write_layer_blob(
    tar: impl std::io::Read,
    out: &Path,
    created_by: &str,
    compression: LayerCompression,
) -> anyhow::Result<()> {
    fs::create_dir_all(out)?;
    let blob = out.join(compression.blob_name());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // Both digests are taken on the way through, not in passes of their own over the tar and
    // the blob.
    let mut r = rbuild_store::hash::HashingReader::new(BufReader::with_capacity(1 << 20, tar));
    let mut w = rbuild_store::hash::HashingWriter::new(BufWriter::with_capacity(
        1 << 20,
        fs::File::create(&blob)?,
    ));
    match compression {
        LayerCompression::Gzip => {
            archive::tar_out::gzip_parallel(
                &mut r,
                &mut w,
                archive::tar_out::GZIP_LAYER_LEVEL,
                threads,
            )?;
        }
        LayerCompression::Zstd => archive::tar_out::zstd_reproducible(&mut r, &mut w)?,
    }
    w.flush()?;
    let diff_hex = r.finish();
    let (digest_hex, size) = w.finish();
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

/// `pack-change-set`: input 0 is a layer's change set (a tree with its ownership sidecar, whose
/// `.wh.NAME` entries delete a lower path); argument 0 is the history line, argument 1
/// (optional) the compression. `$out` is the OCI layer, as `pack-layer` makes it.
pub fn pack_change_set(ctx: &BuildContext) -> anyhow::Result<()> {
    let tree = ctx
        .inputs
        .first()
        .context("pack-change-set needs a change set input")?;
    let compression = LayerCompression::from_arg(ctx.args.get(1))?;
    layer_of_tree(
        tree,
        ctx.source_date_epoch(),
        &ctx.out,
        ctx.arg(0)?,
        compression,
    )
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
