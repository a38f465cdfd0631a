//! The Debian builders, run inside the sandbox: `debian-verify`, `debian-unpack` and
//! `debian-configure`.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rbuild_engine::builtins::{BuildContext, Builtins};
use rbuild_engine::sandbox::{self, ChrootMounts};
use rbuild_store::meta::{sidecar, TreeMeta};
use sha2::{Digest, Sha256};

use crate::debian::{self, packages};
use crate::expand::{ConfigurePackage, ConfigurePlan};
use crate::recipe::Variant;

pub fn register(b: &mut Builtins) {
    b.register("debian-verify", verify);
    b.register("debian-unpack", unpack);
    b.register_chrooting("debian-configure", configure);
    b.register_chrooting("debian-layer", layer);
}

/// `debian-verify`: inputs `[InRelease, index…]`; args `[suite, keyring, fingerprints, sde,
/// index-path…]`. Checks the InRelease signature against the pinned keys, the suite and date,
/// and each index against the signed Release. `$out/index` is the compact verified index (one
/// line per package), `$out/release.json` the signed Release fields.
fn verify(ctx: &BuildContext) -> anyhow::Result<()> {
    let suite = ctx.arg(0)?;
    let keyring = ctx.arg(1)?.as_bytes();
    let pinned: Vec<String> = ctx
        .arg(2)?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let sde: i64 = ctx.arg(3)?.parse().context("source date epoch argument")?;
    let inrelease_file = format!("dists/{suite}/InRelease");
    let inrelease =
        fs::read(&ctx.inputs[0]).with_context(|| format!("reading {inrelease_file}"))?;
    let release = debian::release::verify_inrelease(&inrelease_file, &inrelease, keyring, &pinned)?;
    if release.codename != suite && release.suite != suite {
        bail!("{inrelease_file}: suite check failed: expected {suite}, the signed Release says Suite {} / Codename {}", release.suite, release.codename);
    }
    if release.source_date_epoch != sde {
        bail!("{inrelease_file}: date check failed: the lock says SOURCE_DATE_EPOCH {sde}, the signed Release Date {:?} is {}", release.date, release.source_date_epoch);
    }
    let mut lines = Vec::new();
    for (i, path) in ctx.args[4..].iter().enumerate() {
        let input = ctx
            .inputs
            .get(i + 1)
            .with_context(|| format!("no input for {path}"))?;
        let bytes = fs::read(input).with_context(|| format!("reading {path}"))?;
        let rel = path
            .strip_prefix(&format!("dists/{suite}/"))
            .unwrap_or(path);
        debian::release::check_file(rel, &bytes, &release)
            .with_context(|| format!("verifying dists/{suite}/{rel}"))?;
        let text = packages::decompress(path, &bytes)?;
        let text = String::from_utf8(text).with_context(|| format!("{path}: not UTF-8"))?;
        for p in packages::parse_packages(path, &text)? {
            lines.push(packages::index_line(&p));
        }
    }
    lines.sort();
    fs::create_dir_all(&ctx.out)?;
    fs::write(ctx.out.join("index"), lines.join("\n") + "\n")?;
    // The same lines, sharded by the first character of the package name, so that each
    // unpack reads a small file instead of the whole index.
    let shards = ctx.out.join("index.d");
    fs::create_dir_all(&shards)?;
    let mut by_shard: std::collections::BTreeMap<String, String> = Default::default();
    for l in &lines {
        let s = by_shard.entry(shard_name(l)).or_default();
        s.push_str(l);
        s.push('\n');
    }
    for (name, text) in by_shard {
        fs::write(shards.join(name), text)?;
    }
    let summary = serde_json::json!({
        "suite": release.suite, "codename": release.codename, "version": release.version,
        "date": release.date, "source_date_epoch": release.source_date_epoch, "signed_by": release.signed_by,
    });
    fs::write(
        ctx.out.join("release.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(())
}

fn sha256_of(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), n_total))
}

/// The index shard a package name belongs to (its first character).
fn shard_name(name: &str) -> String {
    name.chars()
        .next()
        .map(|c| c.to_string())
        .unwrap_or_else(|| "_".into())
}

/// The verified index lines that can hold `name`.
fn read_index_for(verified: &Path, name: &str) -> anyhow::Result<String> {
    let p = verified.join("index.d").join(shard_name(name));
    match fs::read_to_string(&p) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Check a `.deb` against the sha256 and size the signed index lists for `name` `version` `arch`.
fn verify_deb(
    verified: &Path,
    name: &str,
    version: &str,
    arch: &str,
    deb: &Path,
) -> anyhow::Result<()> {
    let entries = packages::lookup_index_line(&read_index_for(verified, name)?, name);
    let Some(entry) = entries
        .iter()
        .find(|e| e.version == version && e.architecture == arch)
    else {
        bail!(
            "verify: package {name} {version} ({arch}) is not in the signed Packages index (it lists: {})",
            if entries.is_empty() {
                "no such package".to_owned()
            } else {
                entries.iter().map(|e| format!("{} {}", e.version, e.architecture)).collect::<Vec<_>>().join(", ")
            }
        );
    };
    let (sha, size) = sha256_of(deb)?;
    if sha != entry.sha256 || size != entry.size {
        bail!(
            "verify: {}: sha256 check against the signed Packages index failed for {name} {version}: expected {} ({} bytes), got {sha} ({size} bytes)",
            entry.filename, entry.sha256, entry.size
        );
    }
    Ok(())
}

/// `debian-unpack`: inputs `[verified index, .deb]`; args `[name, version, arch]`. Checks the
/// `.deb` against the sha256 the signed index lists for that package, then unpacks it.
fn unpack(ctx: &BuildContext) -> anyhow::Result<()> {
    let (name, version, arch) = (ctx.arg(0)?, ctx.arg(1)?, ctx.arg(2)?);
    let deb = &ctx.inputs[1];
    verify_deb(&ctx.inputs[0], name, version, arch, deb)?;
    fs::create_dir_all(&ctx.out)?;
    let meta = rbuild_engine::archive::deb::unpack_deb(deb, &ctx.out)?;
    meta.write(&ctx.meta_out())?;
    Ok(())
}

/// Copy the entries of the tree at `src` whose metadata key starts with `prefix` into `root`
/// (without the prefix), giving every entry the ownership, mode and capabilities its metadata
/// records. Paths resolve through `root`'s own merged-/usr symlinks (`bin` → `usr/bin`), as
/// dpkg's would.
fn materialize(src: &Path, prefix: &str, root: &Path) -> anyhow::Result<()> {
    let meta = TreeMeta::read(&sidecar(src))?;
    let mut links: std::collections::HashMap<(u64, u64), PathBuf> = Default::default();
    for (rel, e) in &meta.entries {
        let Some(sub) = rel.strip_prefix(prefix) else {
            continue;
        };
        let from = src.join(rel);
        let dst = root.join(sub);
        let md = fs::symlink_metadata(&from).with_context(|| format!("stat {}", from.display()))?;
        let ft = md.file_type();
        if ft.is_dir() {
            match fs::metadata(&dst) {
                Ok(m) if m.is_dir() => {
                    if fs::symlink_metadata(&dst)?.is_dir() {
                        sandbox::apply_meta(&dst, e)?;
                    }
                    continue;
                }
                _ => fs::create_dir(&dst).with_context(|| format!("mkdir {}", dst.display()))?,
            }
        } else {
            if fs::symlink_metadata(&dst).is_ok() {
                fs::remove_file(&dst).with_context(|| format!("replacing {}", dst.display()))?;
            }
            if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&from)?, &dst)
                    .with_context(|| format!("symlink {}", dst.display()))?;
            } else if let Some(first) = links.get(&(md.dev(), md.ino())) {
                fs::hard_link(first, &dst)?;
                continue;
            } else {
                fs::copy(&from, &dst).with_context(|| format!("copying {}", dst.display()))?;
                if md.nlink() > 1 {
                    links.insert((md.dev(), md.ino()), dst.clone());
                }
            }
        }
        sandbox::apply_meta(&dst, e)?;
    }
    Ok(())
}

const MERGED_USR_DIRS_AMD64: &[&str] = &["bin", "sbin", "lib", "lib64"];
const MERGED_USR_DIRS: &[&str] = &["bin", "sbin", "lib"];

fn chroot_env(ctx: &BuildContext) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("LC_ALL", "C.UTF-8"),
        ("TZ", "UTC"),
        ("HOME", "/root"),
        ("DEBIAN_FRONTEND", "noninteractive"),
        ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    env.push((
        "SOURCE_DATE_EPOCH".into(),
        ctx.source_date_epoch().to_string(),
    ));
    env
}

/// Files that record when or where the system was built rather than what it is.
/// Files debootstrap writes that no package installs (its `setup_etc` and
/// `setup_dselect_method`).
const DEBOOTSTRAP_FILES: &[(&str, &str)] = &[
    ("etc/fstab", "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n"),
    ("var/lib/dpkg/cmethopt", "apt apt\n"),
];

const VOLATILE: &[&str] = &[
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/bootstrap.log",
    "var/cache/ldconfig/aux-cache",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/available-old",
    "var/lib/dpkg/diversions-old",
    "var/lib/dpkg/statoverride-old",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/cache/debconf/passwords.dat-old",
    "etc/passwd-",
    "etc/group-",
    "etc/shadow-",
    "etc/gshadow-",
    "etc/subuid-",
    "etc/subgid-",
];

/// `debian-configure`: inputs `[verified index, (unpacked, deb)…]`; argument 0 is a
/// [`ConfigurePlan`]. Assembles the essential packages, then has the target's own dpkg install
/// every package in one chrooted run; `$out` is the configured root filesystem.
fn configure(ctx: &BuildContext) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let plan: ConfigurePlan = serde_json::from_str(ctx.arg(0)?).context("configure plan")?;
    let root = ctx.out.clone();
    fs::create_dir_all(&root)?;
    if plan.merged_usr {
        let dirs = if plan.architecture == "amd64" {
            MERGED_USR_DIRS_AMD64
        } else {
            MERGED_USR_DIRS
        };
        fs::create_dir_all(root.join("usr"))?;
        for d in dirs {
            fs::create_dir_all(root.join("usr").join(d))?;
            std::os::unix::fs::symlink(format!("usr/{d}"), root.join(d))?;
        }
    }
    let seed: Vec<&ConfigurePackage> = match plan.variant {
        Variant::Extract => plan.packages.iter().collect(),
        Variant::Debootstrap => plan.packages.iter().filter(|p| p.bootstrap).collect(),
    };
    for p in &seed {
        let unpacked = p
            .unpacked
            .with_context(|| format!("configure: {} was not unpacked", p.name))?;
        materialize(&ctx.inputs[unpacked], "data/", &root)
            .with_context(|| format!("extracting {}", p.name))?;
    }
    eprintln!(
        "configure: {} packages extracted in {:.1?}",
        seed.len(),
        started.elapsed()
    );
    if plan.variant == Variant::Debootstrap {
        install_with_dpkg(ctx, &plan, &root)?;
        eprintln!("configure: dpkg done at {:.1?}", started.elapsed());
        // What debootstrap itself writes besides what the packages install.
        for (path, text) in DEBOOTSTRAP_FILES {
            fs::write(root.join(path), text).with_context(|| format!("writing /{path}"))?;
        }
    }
    if let Some(text) = &plan.apt_sources {
        let path = root.join(crate::recipe::AptSources::PATH);
        fs::create_dir_all(path.parent().expect("a file below etc/apt"))?;
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    finish_tree(ctx, &root)
}

/// Drop what records when or where the tree was built, then record its ownership in `$out.meta`.
fn finish_tree(ctx: &BuildContext, root: &Path) -> anyhow::Result<()> {
    for v in VOLATILE {
        let _ = fs::remove_file(root.join(v));
    }
    if let Ok(md) = fs::symlink_metadata(root.join("etc/machine-id")) {
        if md.is_file() && md.len() > 0 {
            // A container gets its machine id at run time; a baked-in one is random and shared.
            fs::write(root.join("etc/machine-id"), b"")?;
        }
    }
    let meta = sandbox::normalize_tree(root, ctx.source_date_epoch())?;
    meta.write(&ctx.meta_out())?;
    Ok(())
}

fn install_with_dpkg(ctx: &BuildContext, plan: &ConfigurePlan, root: &Path) -> anyhow::Result<()> {
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        fs::write(root.join(f), b"")?;
    }
    fs::write(
        root.join("var/lib/dpkg/arch"),
        format!("{}\n", plan.architecture),
    )?;
    // dpkg reads each `.deb` straight from the sandbox's read-only inputs, bind-mounted into
    // the chroot; those no unpack derivation checked are checked against the signed index here.
    let mut bootstrap = Vec::new();
    let mut rest = Vec::new();
    for p in &plan.packages {
        let input = &ctx.inputs[p.deb];
        if p.unpacked.is_none() {
            verify_deb(&ctx.inputs[0], &p.name, &p.version, &p.architecture, input)?;
        }
        let name = input.file_name().context("input path")?.to_string_lossy();
        let inside = format!("/{INPUTS_IN_CHROOT}/{name}");
        if p.bootstrap {
            bootstrap.push(inside)
        } else {
            rest.push(inside)
        }
    }
    dpkg_install(
        ctx,
        root,
        &[
            ("essential packages", bootstrap),
            ("remaining packages", rest),
        ],
        true,
    )?;
    // dpkg knows its native architecture; debootstrap leaves no arch file either.
    fs::remove_file(root.join("var/lib/dpkg/arch"))?;
    Ok(())
}

const DEB_STAGING: &str = "var/cache/rbuild-debs";
/// Where a builder's `/inputs` appear inside the chroot while dpkg runs.
const INPUTS_IN_CHROOT: &str = "var/cache/rbuild-inputs";

/// Copy a `.deb` into the tree for dpkg; returns its path inside the chroot.
fn stage_deb(root: &Path, i: usize, name: &str, deb: &Path) -> anyhow::Result<String> {
    fs::create_dir_all(root.join(DEB_STAGING))?;
    let file = format!("{i:04}_{name}.deb");
    fs::copy(deb, root.join(DEB_STAGING).join(&file))
        .with_context(|| format!("copying the .deb of {name}"))?;
    Ok(format!("/{DEB_STAGING}/{file}"))
}

/// Have the tree's own dpkg install the staged `.deb`s, batch by batch, chrooted: no service
/// starts (`policy-rc.d`), no fsync, and the database must come out complete (`dpkg --audit`).
/// With `show_inputs`, the sandbox's `/inputs` are visible (read-only) in the chroot.
fn dpkg_install(
    ctx: &BuildContext,
    root: &Path,
    batches: &[(&str, Vec<String>)],
    show_inputs: bool,
) -> anyhow::Result<()> {
    fs::create_dir_all(root.join(DEB_STAGING))?;
    fs::create_dir_all(root.join("etc/dpkg/dpkg.cfg.d"))?;
    fs::create_dir_all(root.join("usr/sbin"))?;
    let policy = root.join("usr/sbin/policy-rc.d");
    fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    let exec = rbuild_store::meta::EntryMeta::root(0o755, ctx.source_date_epoch());
    sandbox::apply_meta(&policy, &exec)?;
    let unsafe_io = root.join("etc/dpkg/dpkg.cfg.d/rbuild-unsafe-io");
    fs::write(&unsafe_io, "force-unsafe-io\n")?;

    let env = chroot_env(ctx);
    let mut mounts = ChrootMounts::setup(root)?;
    if show_inputs {
        mounts.bind_readonly(
            Path::new(rbuild_engine::sandbox::INPUTS_DIR),
            INPUTS_IN_CHROOT,
        )?;
    }
    for (what, batch) in batches {
        if batch.is_empty() {
            continue;
        }
        let mut argv = vec![
            "/usr/bin/dpkg",
            "--install",
            "--force-depends",
            "--force-confdef",
            "--force-confold",
        ];
        argv.extend(batch.iter().map(String::as_str));
        eprintln!("configure: dpkg --install of {} {what}", batch.len());
        let status = sandbox::run_chrooted(&mounts, &argv, &env, None)?;
        if !status.success() {
            bail!("configure: dpkg --install of the {what} failed ({status}); see the dpkg output above");
        }
    }
    let status = sandbox::run_chrooted(
        &mounts,
        &[
            "/usr/bin/dpkg",
            "--configure",
            "--pending",
            "--force-depends",
        ],
        &env,
        None,
    )?;
    if !status.success() {
        bail!("configure: dpkg --configure --pending failed ({status})");
    }
    // The database must be complete: `dpkg --audit` prints nothing on a healthy system.
    let audit = root.join(DEB_STAGING).join("audit");
    let cmd = format!("/usr/bin/dpkg --audit > /{DEB_STAGING}/audit 2>&1");
    let status = sandbox::run_chrooted(&mounts, &["/bin/sh", "-c", &cmd], &env, None)?;
    let report = fs::read_to_string(&audit).unwrap_or_default();
    if !status.success() || !report.trim().is_empty() {
        bail!("configure: `dpkg --audit` is not clean ({status}):\n{report}");
    }
    drop(mounts);
    fs::remove_dir_all(root.join(DEB_STAGING))?;
    fs::remove_file(&policy)?;
    fs::remove_file(&unsafe_io)?;
    Ok(())
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
fn layer(ctx: &BuildContext) -> anyhow::Result<()> {
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
        dpkg_install(ctx, &root, &[("packages", staged)], false)?;
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
