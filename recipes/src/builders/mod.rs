//! The Debian builders, run inside the sandbox: `debian-verify`, `debian-available` and
//! `debian-unpack` ([`index`]), `debian-configure` ([`configure`]) and `debian-layer`
//! ([`layer`]), `debian-provenance` ([`provenance`]), `debian-sbom` ([`sbom`]), with what they share: laying out unpacked trees, the chroot's environment, and
//! finishing a tree.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context};
use rbuild_engine::builtins::{BuildContext, Builtins};
use rbuild_engine::sandbox::{self, ChrootMounts};
use rbuild_store::meta::{sidecar, TreeMeta};

mod configure;
mod index;
mod layer;
mod plain_debs;
mod provenance;
mod recorded_unpack;
mod sbom;
mod stack;

pub use layer::{CopyFile, LayerPackage, LayerPlan};
pub use provenance::{Dependency, ProvenancePlan};
pub use sbom::{SbomFile, SbomPackage, SbomPlan};

pub fn register(b: &mut Builtins) {
    b.register("debian-verify", index::verify);
    b.register("debian-available", index::available);
    b.register("debian-unpack", index::unpack);
    b.register_chrooting("debian-configure", configure::configure);
    b.register_chrooting("debian-layer", layer::layer);
    b.register("debian-layered-tree", layer::layered_tree);
    b.register("debian-provenance", provenance::provenance);
    b.register("debian-sbom", sbom::sbom);
}

/// Copy the entries of the tree at `src` whose metadata key starts with `prefix` into `root`
/// (without the prefix), giving every entry the ownership, mode and capabilities its metadata
/// records. Paths resolve through `root`'s own merged-/usr symlinks (`bin` → `usr/bin`), as
/// dpkg's would.
fn materialize(src: &Path, prefix: &str, root: &Path) -> anyhow::Result<()> {
    materialize_entries(src, &TreeMeta::read(&sidecar(src))?, prefix, root, true)
}

/// [`materialize`] of the entries `meta` lists. An entry replaces what `root` holds at its path,
/// a directory included. With `through_symlinks` (a package's tree), a directory entry where
/// `root` has a symlink to a directory goes through it, as dpkg's would; without (a layer's
/// change set), the directory replaces the symlink. Paths in `root` are resolved as a chroot
/// into it resolves them ([`sandbox::InRoot`]): its symlinks, absolute ones included, never
/// lead out of it.
fn materialize_entries(
    src: &Path,
    meta: &TreeMeta,
    prefix: &str,
    root: &Path,
    through_symlinks: bool,
) -> anyhow::Result<()> {
    let tree =
        sandbox::InRoot::open(root).with_context(|| format!("opening {}", root.display()))?;
    let mut links: std::collections::HashMap<(u64, u64), String> = Default::default();
    for (rel, e) in &meta.entries {
        let Some(sub) = rel.strip_prefix(prefix) else {
            continue;
        };
        let from = src.join(rel);
        let md = fs::symlink_metadata(&from).with_context(|| format!("stat {}", from.display()))?;
        if sub.is_empty() {
            // The root itself.
            if md.is_dir() {
                sandbox::apply_meta(root, e)?;
            }
            continue;
        }
        let leaf = tree.leaf(sub).with_context(|| format!("resolving {sub}"))?;
        let dst = &leaf.path;
        let ft = md.file_type();
        if ft.is_dir() {
            let existing = if through_symlinks {
                tree.metadata(sub)
            } else {
                fs::symlink_metadata(dst)
            };
            match existing {
                Ok(m) if m.is_dir() => {
                    if fs::symlink_metadata(dst)?.is_dir() {
                        sandbox::apply_meta(dst, e)?;
                    }
                    continue;
                }
                Ok(_) => {
                    fs::remove_file(dst).with_context(|| format!("replacing {sub}"))?;
                    fs::create_dir(dst).with_context(|| format!("mkdir {sub}"))?
                }
                Err(_) => fs::create_dir(dst).with_context(|| format!("mkdir {sub}"))?,
            }
        } else {
            match fs::symlink_metadata(dst) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(dst),
                Ok(_) => fs::remove_file(dst),
                Err(_) => Ok(()),
            }
            .with_context(|| format!("replacing {sub}"))?;
            if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&from)?, dst)
                    .with_context(|| format!("symlink {sub}"))?;
            } else if let Some(first) = links.get(&(md.dev(), md.ino())) {
                fs::hard_link(tree.leaf(first)?.path, dst)
                    .with_context(|| format!("linking {sub} to {first}"))?;
                continue;
            } else {
                fs::copy(&from, dst).with_context(|| format!("copying {sub}"))?;
                if md.nlink() > 1 {
                    links.insert((md.dev(), md.ino()), sub.to_owned());
                }
            }
        }
        sandbox::apply_meta(dst, e)?;
    }
    Ok(())
}

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

/// Drop what records when or where the tree was built, then record its ownership in `$out.meta`.
fn finish_tree(ctx: &BuildContext, root: &Path) -> anyhow::Result<()> {
    scrub(root)?;
    record_tree(ctx, root)
}

/// Drop what records when or where the tree at `root` was built.
fn scrub(root: &Path) -> anyhow::Result<()> {
    for v in VOLATILE {
        let _ = fs::remove_file(root.join(v));
    }
    if let Ok(md) = fs::symlink_metadata(root.join("etc/machine-id")) {
        if md.is_file() && md.len() > 0 {
            // A container gets its machine id at run time; a baked-in one is random and shared.
            fs::write(root.join("etc/machine-id"), b"")?;
        }
    }
    Ok(())
}

/// Record the ownership of the tree at `root` (`$out`, or what becomes it) in `$out.meta`,
/// leaving it plain.
fn record_tree(ctx: &BuildContext, root: &Path) -> anyhow::Result<()> {
    let meta = sandbox::normalize_tree(root, ctx.source_date_epoch())?;
    meta.write(&ctx.meta_out())?;
    Ok(())
}

const DEB_STAGING: &str = "var/cache/rbuild-debs";
/// Where a builder's `/inputs` appear inside the chroot while dpkg runs.
const INPUTS_IN_CHROOT: &str = "var/cache/rbuild-inputs";

/// A tree being built, chrooted into: the target's own programs run there behind the sandbox's
/// walls, with the build's environment.
struct Chroot {
    mounts: ChrootMounts,
    env: Vec<(String, String)>,
}

impl Chroot {
    fn enter(ctx: &BuildContext, root: &Path) -> anyhow::Result<Chroot> {
        fs::create_dir_all(root.join(DEB_STAGING))?;
        Ok(Chroot {
            mounts: ChrootMounts::setup(root)?,
            env: chroot_env(ctx),
        })
    }

    fn root(&self) -> &Path {
        self.mounts.root()
    }

    /// Run `argv`; its output goes to the build's log. `what` names it in an error.
    fn run(&self, what: &str, argv: &[&str]) -> anyhow::Result<()> {
        self.run_with(what, argv, &[])
    }

    /// [`Chroot::run`] with `more` added to the environment.
    fn run_with(&self, what: &str, argv: &[&str], more: &[(String, String)]) -> anyhow::Result<()> {
        eprintln!("configure: {}", argv.join(" "));
        let started = std::time::Instant::now();
        let env: Vec<(String, String)> = self.env.iter().chain(more).cloned().collect();
        let status = sandbox::run_chrooted(&self.mounts, argv, &env, None)?;
        eprintln!("configure: ({what}: {:.2?})", started.elapsed());
        if !status.success() {
            bail!("configure: {what} failed ({status}); see the output above");
        }
        Ok(())
    }

    /// Run the tree's dpkg with `options`, then the `.deb`s (paths inside the chroot).
    fn dpkg(&self, what: &str, options: &[&str], debs: &[String]) -> anyhow::Result<()> {
        let mut argv = vec!["/usr/bin/dpkg"];
        argv.extend_from_slice(options);
        argv.extend(debs.iter().map(String::as_str));
        self.run(what, &argv)
    }

    /// `DPKG_FORCE` as dpkg has it with `options` (the forces in effect, in dpkg's order, as it
    /// passes them to maintainer scripts), read off dpkg itself: a `--pre-invoke` hook sees
    /// dpkg's environment (the `--unpack` of nothing then fails, as it should).
    fn dpkg_force(&self, options: &[&str]) -> anyhow::Result<String> {
        // Its complaint about the missing archive is not the build's.
        let script = format!(
            "/usr/bin/dpkg {} --pre-invoke=echo\\ \\\"\\$DPKG_FORCE\\\" --unpack 2>/dev/null",
            options.join(" ")
        );
        // dpkg had opened its database by then: the journal's next entry, made ready, is
        // left behind (a run that ends well removes it).
        let ready = "var/lib/dpkg/updates/tmp.i";
        let tree = sandbox::InRoot::open(self.root())?;
        let was_there = tree.symlink_metadata(ready).is_ok();
        let (_, out) = self.output(&["/bin/sh", "-c", &script])?;
        if !was_there {
            match tree.remove_file(ready) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).context(format!("removing {ready}"))
                }
                _ => {}
            }
        }
        let out = out.trim_end_matches('\n').to_owned();
        anyhow::ensure!(
            !out.is_empty()
                && out
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-' || b == b','),
            "configure: dpkg {} did not tell its DPKG_FORCE (it said {out:?})",
            options.join(" ")
        );
        Ok(out)
    }

    /// Run a shell command line.
    fn sh(&self, what: &str, script: &str) -> anyhow::Result<()> {
        self.run(what, &["/bin/sh", "-c", script])
    }

    /// Run `argv` and return its exit status and standard output.
    fn output(&self, argv: &[&str]) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let file = format!("{DEB_STAGING}/stdout");
        let quoted: Vec<String> = argv.iter().map(|a| format!("'{a}'")).collect();
        let cmd = format!("{} > /{file}", quoted.join(" "));
        let status =
            sandbox::run_chrooted(&self.mounts, &["/bin/sh", "-c", &cmd], &self.env, None)?;
        // Read as the chroot sees it: the command may have left a symlink there.
        let tree = sandbox::InRoot::open(self.root())?;
        let out = tree.read_to_string(&file).unwrap_or_default();
        let _ = tree.remove_file(&file);
        Ok((status, out))
    }

    /// The database must be complete: `dpkg --audit` prints nothing on a healthy system.
    fn audit(&self) -> anyhow::Result<()> {
        let cmd = format!("/usr/bin/dpkg --audit > /{DEB_STAGING}/audit 2>&1");
        let status =
            sandbox::run_chrooted(&self.mounts, &["/bin/sh", "-c", &cmd], &self.env, None)?;
        let report = sandbox::InRoot::open(self.root())?
            .read_to_string(&format!("{DEB_STAGING}/audit"))
            .unwrap_or_default();
        if !status.success() || !report.trim().is_empty() {
            bail!("configure: `dpkg --audit` is not clean ({status}):\n{report}");
        }
        Ok(())
    }

    /// Leave the chroot, removing the staging directory.
    fn leave(self) -> anyhow::Result<()> {
        let staging = self.root().join(DEB_STAGING);
        drop(self.mounts);
        fs::remove_dir_all(staging)?;
        Ok(())
    }
}

/// What stops services from starting while packages are configured (`policy-rc.d`, as
/// debootstrap writes it) and spares dpkg its fsyncs; [`NoServices::remove`] takes both away.
/// (Maintainer scripts may have run in the tree already: its paths are resolved within it.)
struct NoServices {
    root: std::path::PathBuf,
}

impl NoServices {
    const POLICY: &str = "usr/sbin/policy-rc.d";
    const UNSAFE_IO: &str = "etc/dpkg/dpkg.cfg.d/rbuild-unsafe-io";

    fn install(ctx: &BuildContext, root: &Path) -> anyhow::Result<NoServices> {
        let tree = sandbox::InRoot::open(root)?;
        tree.create_dir_all("etc/dpkg/dpkg.cfg.d")?;
        tree.create_dir_all("usr/sbin")?;
        tree.replace_file(Self::POLICY, b"#!/bin/sh\nexit 101\n", 0o755)?;
        let exec = rbuild_store::meta::EntryMeta::root(0o755, ctx.source_date_epoch());
        sandbox::apply_meta(&tree.leaf(Self::POLICY)?.path, &exec)?;
        tree.replace_file(Self::UNSAFE_IO, b"force-unsafe-io\n", 0o644)?;
        Ok(NoServices {
            root: root.to_owned(),
        })
    }

    fn remove(self) -> anyhow::Result<()> {
        // The chroot's commands have run since: resolved afresh.
        let tree = sandbox::InRoot::open(&self.root)?;
        tree.remove_file(Self::POLICY)?;
        tree.remove_file(Self::UNSAFE_IO)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rbuild_store::meta::EntryMeta;

    #[test]
    fn a_package_is_laid_out_through_the_trees_own_symlinks_never_out_of_it() {
        let t = tempfile::tempdir().unwrap();
        let (root, src, outside) = (
            t.path().join("root"),
            t.path().join("src"),
            t.path().join("outside"),
        );
        // The tree: `var/run` climbing out (a chroot stops `..` at its root: the tree's own
        // `outside`), `bin` into `usr/bin` as merged /usr has it.
        fs::create_dir_all(root.join("var")).unwrap();
        fs::create_dir_all(root.join("outside")).unwrap();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink("../../outside", root.join("var/run")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        // The package: a file below each.
        fs::create_dir_all(src.join("data/var/run")).unwrap();
        fs::create_dir_all(src.join("data/bin")).unwrap();
        fs::write(src.join("data/var/run/pid"), "1").unwrap();
        fs::write(src.join("data/bin/sh"), "#!").unwrap();
        let mut meta = TreeMeta::default();
        for (k, mode) in [
            ("data/var", 0o755),
            ("data/var/run", 0o755),
            ("data/var/run/pid", 0o644),
            ("data/bin", 0o755),
            ("data/bin/sh", 0o755),
        ] {
            meta.entries.insert(k.into(), EntryMeta::root(mode, 0));
        }
        materialize_entries(&src, &meta, "data/", &root, true).unwrap();
        assert_eq!(fs::read_to_string(root.join("outside/pid")).unwrap(), "1");
        assert_eq!(fs::read_to_string(root.join("usr/bin/sh")).unwrap(), "#!");
        assert!(fs::symlink_metadata(root.join("var/run"))
            .unwrap()
            .is_symlink());
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "written out of the tree"
        );
    }
}
