//! `debian-layer`: a layer's packages, files and commands on top of the lower layers' tree.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context};
use rbuild_engine::builtins::BuildContext;
use rbuild_engine::sandbox::{self, ChrootMounts};

use super::index::verify_deb;
use super::{chroot_env, finish_tree, materialize, Chroot, NoServices, DEB_STAGING};

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

/// `debian-layer`: inputs `[lower tree, verified index, .deb…]`; argument 0 is a [`LayerPlan`].
/// `$out` is the lower tree with the new packages installed by the image's own dpkg, the files
/// copied in and the commands run, all chrooted in the sandbox (no network).
pub(super) fn layer(ctx: &BuildContext) -> anyhow::Result<()> {
    let plan: LayerPlan = serde_json::from_str(ctx.arg(0)?).context("layer plan")?;
    let root = ctx.out.clone();
    fs::create_dir_all(&root)?;
    materialize(&ctx.inputs[0], "", &root).context("copying the lower layers' tree")?;
    if !plan.packages.is_empty() {
        let mut staged = Vec::new();
        for (i, p) in plan.packages.iter().enumerate() {
            let deb = ctx
                .inputs
                .get(2 + i)
                .context("a package's .deb input is missing")?;
            verify_deb(&ctx.inputs[1], &p.name, &p.version, &p.architecture, deb)?;
            staged.push(stage_deb(&root, i, &p.name, deb)?);
        }
        dpkg_install(ctx, &root, &staged)?;
    }
    let sde = ctx.source_date_epoch();
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
    finish_tree(ctx, &root)
}
