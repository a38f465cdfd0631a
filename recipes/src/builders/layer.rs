//! `debian-layer`: a layer's packages, files and commands on top of the lower layers, as a change set.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context};
use rbuild_engine::builtins::BuildContext;
use rbuild_engine::sandbox::{self, ChrootMounts};

use super::index::verify_deb;
use super::stack::{self, Stack};
use super::{chroot_env, record_tree, scrub, Chroot, NoServices, DEB_STAGING};

/// Copy a `.deb` into the tree for dpkg; returns its path inside the chroot.
fn stage_deb(root: &Path, i: usize, name: &str, deb: &Path) -> anyhow::Result<String> {
    fs::create_dir_all(root.join(DEB_STAGING))?;
    let file = format!("{i:04}_{name}.deb");
    fs::copy(deb, root.join(DEB_STAGING).join(&file))
        .with_context(|| format!("copying the .deb of {name}"))?;
    Ok(format!("/{DEB_STAGING}/{file}"))
}

/// Have the image's own dpkg install the staged `.deb`s, chrooted: no service starts, no
/// fsync, and the database must come out complete (`dpkg --audit`).
fn dpkg_install(ctx: &BuildContext, root: &Path, debs: &[String]) -> anyhow::Result<()> {
    let no_services = NoServices::install(ctx, root)?;
    let chroot = Chroot::enter(ctx, root)?;
    chroot.dpkg(
        "dpkg --install of the layer's packages",
        &[
            "--install",
            "--force-depends",
            "--force-confdef",
            "--force-confold",
        ],
        debs,
    )?;
    chroot.dpkg(
        "dpkg --configure --pending",
        &["--configure", "--pending", "--force-depends"],
        &[],
    )?;
    chroot.audit()?;
    chroot.leave()?;
    no_services.remove()
}

/// Arguments of the layer builder (one JSON argument).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerPlan {
    /// New packages in install order; their `.deb`s are inputs 2… in the same order.
    pub packages: Vec<LayerPackage>,
    pub copy: Vec<CopyFile>,
    pub run: Vec<String>,
    /// How many lower layers' change sets are inputs, after the base tree and the index.
    pub lower_layers: usize,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CopyFile {
    /// Absolute path in the image.
    pub to: String,
    pub mode: u32,
    /// The file's bytes, hex-encoded (so that they are part of the derivation hash).
    pub content: String,
}

/// `debian-layer`: inputs `[base tree, verified index, lower change set…, .deb…]`; argument 0 is
/// a [`LayerPlan`] (`lower_layers` says how many change sets there are). The new packages are
/// installed by the image's own dpkg, the files copied in and the commands run, all chrooted in
/// the sandbox (no network), on an overlay of the base tree with the lower layers' change sets
/// laid onto it. `$out` is this layer's change set ([`stack::change_set`]): what it costs grows
/// with what the layer changes, never with the base.
pub(super) fn layer(ctx: &BuildContext) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let plan: LayerPlan = serde_json::from_str(ctx.arg(0)?).context("layer plan")?;
    let sde = ctx.source_date_epoch();
    let lower_sets = ctx
        .inputs
        .get(2..2 + plan.lower_layers)
        .context("a lower layer's change set input is missing")?;
    let lower = Stack::compose(&ctx.inputs[0], lower_sets)?;
    let scratch = ctx.out.with_extension("overlay");
    let (upper, work, merged) = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("merged"),
    );
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d)?;
    }
    let overlay = sandbox::Overlay::mount(&[&ctx.inputs[0]], &upper, &work, &merged)?;
    let root = overlay.merged().to_owned();
    let restored = stack::restore_metadata(&lower, &root)?;
    for cs in lower_sets {
        stack::apply_change_set(cs, &root)
            .with_context(|| format!("laying out the lower layer {}", cs.display()))?;
    }
    eprintln!(
        "layer: base overlaid ({restored} entries' metadata restored, {} lower layers laid out) in {:.1?}",
        lower_sets.len(),
        started.elapsed()
    );
    if !plan.packages.is_empty() {
        let mut staged = Vec::new();
        for (i, p) in plan.packages.iter().enumerate() {
            let deb = ctx
                .inputs
                .get(2 + plan.lower_layers + i)
                .context("a package's .deb input is missing")?;
            verify_deb(&ctx.inputs[1], &p.name, &p.version, &p.architecture, deb)?;
            staged.push(stage_deb(&root, i, &p.name, deb)?);
        }
        dpkg_install(ctx, &root, &staged)?;
    }
    for c in &plan.copy {
        let rel = c.to.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|p| p == ".." || p == ".") {
            bail!(
                "copy: destination {:?} must be an absolute path without . or ..",
                c.to
            );
        }
        let dst = root.join(rel);
        let dir_meta = rbuild_store::meta::EntryMeta::root(0o755, sde);
        let mut missing = Vec::new();
        let mut parent = dst.parent();
        while let Some(p) = parent.filter(|p| !p.exists()) {
            missing.push(p.to_owned());
            parent = p.parent();
        }
        for p in missing.iter().rev() {
            fs::create_dir(p)?;
            sandbox::apply_meta(p, &dir_meta)?;
        }
        if fs::symlink_metadata(&dst).is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(&dst)?;
        }
        fs::write(&dst, hex::decode(&c.content).context("copy: file content")?)
            .with_context(|| format!("copy: writing {}", c.to))?;
        sandbox::apply_meta(&dst, &rbuild_store::meta::EntryMeta::root(c.mode, sde))?;
    }
    if !plan.run.is_empty() {
        let env = chroot_env(ctx);
        let mounts = ChrootMounts::setup(&root)?;
        let log = ctx.out.with_extension("run.log");
        for cmd in &plan.run {
            let status = sandbox::run_chrooted(&mounts, &["/bin/sh", "-c", cmd], &env, Some(&log))?;
            let output = fs::read_to_string(&log).unwrap_or_default();
            eprint!("{output}");
            if !status.success() {
                let lines: Vec<&str> = output.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                bail!("run step {cmd:?} failed ({status}); its output ends with:\n{tail}");
            }
        }
        drop(mounts);
        let _ = fs::remove_file(&log);
    }
    scrub(&root)?;
    drop(overlay);
    eprintln!("layer: steps done at {:.1?}", started.elapsed());
    stack::change_set(&upper, &lower, &ctx.out, sde)?;
    fs::remove_dir_all(&scratch).context("removing the overlay's directories")?;
    record_tree(ctx, &ctx.out)?;
    eprintln!("layer: change set recorded at {:.1?}", started.elapsed());
    Ok(())
}

/// `debian-layered-tree`: inputs `[base tree, change set…]` (bottom first); `$out` is the root
/// filesystem they make together (a layered recipe's `^tree`).
pub(super) fn layered_tree(ctx: &BuildContext) -> anyhow::Result<()> {
    let (base, sets) = ctx
        .inputs
        .split_first()
        .context("debian-layered-tree needs a base tree")?;
    fs::create_dir_all(&ctx.out)?;
    super::materialize(base, "", &ctx.out).context("copying the base tree")?;
    for cs in sets {
        stack::apply_change_set(cs, &ctx.out)
            .with_context(|| format!("laying out the layer {}", cs.display()))?;
    }
    record_tree(ctx, &ctx.out)
}
