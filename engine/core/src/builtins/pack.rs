//! The pack builders: a tree becomes a deterministic tar, a tar becomes a compressed OCI layer,
//! layers and a config become an OCI image layout.

use std::fs;
use std::io::{BufReader, BufWriter, Write};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::BuildContext;
use crate::archive::{self, oci};

/// `pack-tar`: input 0 is a tree (with its ownership sidecar); `$out` is its deterministic tar.
pub fn pack_tar(ctx: &BuildContext) -> anyhow::Result<()> {
    let tree = ctx.inputs.first().context("pack-tar needs a tree input")?;
    let meta_path = rbuild_store::meta::sidecar(tree);
    let meta = rbuild_store::meta::TreeMeta::read(&meta_path)?;
    let f = fs::File::create(&ctx.out).with_context(|| format!("creating {}", ctx.out.display()))?;
    let w = archive::tar_out::write_tar(tree, &meta, ctx.source_date_epoch(), BufWriter::with_capacity(1 << 20, f))?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// What a layer output records beside its blob (`$out/layer.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerInfo {
    pub diff_id: String,
    pub digest: String,
    pub size: u64,
    pub created_by: String,
}

/// `pack-layer`: input 0 is a layer tar; `$out/layer.tar.gz` is its reproducible gzip and
/// `$out/layer.json` the digests. Argument 0 is the history line.
pub fn pack_layer(ctx: &BuildContext) -> anyhow::Result<()> {
    let tar = ctx.inputs.first().context("pack-layer needs a tar input")?;
    let created_by = ctx.arg(0)?.to_owned();
    fs::create_dir_all(&ctx.out)?;
    let (diff_hex, _) = oci::sha256_file(tar)?;
    let blob = ctx.out.join("layer.tar.gz");
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let r = BufReader::with_capacity(1 << 20, fs::File::open(tar).with_context(|| format!("opening {}", tar.display()))?);
    let w = BufWriter::with_capacity(1 << 20, fs::File::create(&blob)?);
    let mut w = archive::tar_out::gzip_parallel(r, w, 6, threads)?;
    w.flush()?;
    let (digest_hex, size) = oci::sha256_file(&blob)?;
    let info = LayerInfo { diff_id: format!("sha256:{diff_hex}"), digest: format!("sha256:{digest_hex}"), size, created_by };
    fs::write(ctx.out.join("layer.json"), serde_json::to_vec_pretty(&info)?)?;
    Ok(())
}

/// `pack-oci`: inputs are layer outputs (bottom first); argument 0 is the image config as JSON
/// ([`oci::ImageConfig`]); `$out` becomes an OCI image layout.
pub fn pack_oci(ctx: &BuildContext) -> anyhow::Result<()> {
    let config: oci::ImageConfig = serde_json::from_str(ctx.arg(0)?).context("pack-oci: image config argument")?;
    let mut layers = Vec::new();
    for input in &ctx.inputs {
        let info_path = input.join("layer.json");
        let info: LayerInfo = serde_json::from_slice(&fs::read(&info_path).with_context(|| format!("reading {}", info_path.display()))?)?;
        layers.push(oci::Layer {
            blob_path: input.join("layer.tar.gz"),
            diff_id: info.diff_id,
            digest: info.digest,
            size: info.size,
            created_by: info.created_by,
        });
    }
    let ref_name = ctx.args.get(1).map(String::as_str);
    oci::write_layout(&ctx.out, &layers, &config, ref_name)?;
    Ok(())
}
