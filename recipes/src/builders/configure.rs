//! `debian-configure`: the root filesystem `debootstrap` makes, step by step as it makes it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context};
use rbuild_engine::archive;
use rbuild_engine::archive::deb::Listed;
use rbuild_engine::builtins::BuildContext;
use rbuild_engine::sandbox;
use rbuild_store::meta::TreeMeta;

use super::plain_debs::PlainDebs;
use super::recorded_unpack::{self, Extracted, Source};
use super::{finish_tree, materialize, materialize_entries, Chroot, NoServices, INPUTS_IN_CHROOT};
use crate::debian::{packages, resolve};
use crate::expand::{ConfigurePackage, ConfigurePlan};
use crate::recipe::Variant;

const MERGED_USR_DIRS_AMD64: &[&str] = &["bin", "sbin", "lib", "lib64"];
const MERGED_USR_DIRS: &[&str] = &["bin", "sbin", "lib"];

/// Files that record when or where the system was built rather than what it is.
/// The packages debootstrap installs one by one, in this order, before anything else is
/// configured (its `scripts/debian-common`, default variant; `libc6` is `$LIBC` on every
/// architecture rbuild knows).
const CORE: &[&str] = &[
    "base-passwd",
    "base-files",
    "dpkg",
    "libc6",
    "perl-base",
    "mawk",
    "debconf",
];

/// `debian-configure`: inputs `[available, deb…]` (the debootstrap variant) or `[verified
/// index, (unpacked, deb)…]` (the extract variant); argument 0 is a [`ConfigurePlan`]; `$out` is
/// the root filesystem.
///
/// The debootstrap variant makes it as `debootstrap` does (its `first_stage_install` and
/// `second_stage_install`), step for step, so that maintainer scripts run in the same order
/// and give the same system (the same ids to the same groups): the required set is extracted;
/// the core packages are installed one at a time; the required set is unpacked and configured;
/// dpkg is told the index's stanzas (`available`) and selections; pre-dependencies are
/// installed; then the base set is unpacked and configured. The extract variant only lays the
/// packages out.
pub(super) fn configure(ctx: &BuildContext) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let plan: ConfigurePlan = serde_json::from_str(ctx.arg(0)?).context("configure plan")?;
    // The tree is made in memory, where dpkg's many small writes, renames and deletions cost
    // far less than on the store's file system, and written to `$out` once, at the end — if
    // files there keep ACLs, as the tree's must.
    let memory = Path::new(sandbox::MEMORY_DIR);
    let estimate = estimated_tree_bytes(ctx, &plan)?;
    let tmpfs_free = rbuild_engine::nospace::free_bytes(memory);
    let mem_available = sandbox::meminfo_bytes("MemAvailable");
    let root = if !sandbox::keeps_acls(memory) {
        eprintln!(
            "configure: {} keeps no ACLs; building in $out",
            memory.display()
        );
        ctx.out.clone()
    } else if !fits_in_memory(estimate, tmpfs_free, mem_available) {
        eprintln!(
            "configure: the tree will take about {} MiB, more than memory holds with room to spare ({} MiB free in {}, {} MiB of memory available); building in $out",
            estimate >> 20,
            tmpfs_free.map_or("?".into(), |b| (b >> 20).to_string()),
            memory.display(),
            mem_available.map_or("?".into(), |b| (b >> 20).to_string()),
        );
        ctx.out.clone()
    } else {
        memory.join("rootfs")
    };
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
    let mut seed: Vec<&ConfigurePackage> = match plan.variant {
        Variant::Extract => plan.packages.iter().collect(),
        Variant::Debootstrap => plan.packages.iter().filter(|p| p.required).collect(),
    };
    if plan.variant == Variant::Debootstrap {
        // debootstrap extracts `$required`, which is in byte order.
        seed.sort_by(|a, b| a.name.cmp(&b.name));
    }
    // Where the rewritten `.deb`s and the unpacked packages wait: in memory with the tree, or
    // beside `$out` when the tree is built there.
    let scratch = if root == ctx.out {
        ctx.out.with_extension("staging")
    } else {
        memory.to_path_buf()
    };
    let signed = Signed::of(ctx, &plan)?;
    let extraction = extract(ctx, &signed, &seed, &root, &scratch)?;
    eprintln!(
        "configure: {} packages extracted in {:.1?}",
        seed.len(),
        started.elapsed()
    );
    // While dpkg works (on one core), the tree as it is so far is copied to `$out` (on
    // another): its names, and the files that have not changed lately. On a file system that
    // makes new names slowly (ext4 after many deletions), the copy at the end would otherwise
    // spend seconds making them; and it writes again only the files changed since.
    // Only a saving: where it cannot be had, the copy at the end does it all.
    // Once more when the base set is unpacked (its files were not there yet), while dpkg
    // configures it.
    let ahead = root != ctx.out && plan.variant == Variant::Debootstrap;
    // The names only at first: dpkg's unpacks, and the workers rewriting the base set's
    // `.deb`s, keep both cores busy then.
    let probe = scratch.join("rbuild-copied-ahead");
    let mut copying = ahead
        .then(|| copy_ahead(&root, &ctx.out, &probe, &[], false, None))
        .flatten();
    let mut copy_ahead = |mounted: &[PathBuf]| {
        if ahead {
            copying = copy_ahead(&root, &ctx.out, &probe, mounted, true, copying.take());
        }
    };
    if plan.variant == Variant::Debootstrap {
        second_stage(
            ctx,
            &signed,
            &plan,
            &root,
            &scratch,
            extraction,
            &mut copy_ahead,
        )?;
        eprintln!("configure: dpkg done at {:.1?}", started.elapsed());
    }
    if let Some(text) = &plan.apt_sources {
        // After the maintainer scripts: resolved within the tree.
        let tree = sandbox::InRoot::open(&root)?;
        let path = crate::recipe::AptSources::PATH;
        let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
        tree.create_dir_all(dir)?;
        tree.replace_file(path, text.as_bytes(), 0o644)
            .with_context(|| format!("writing {path}"))?;
    }
    finish_tree(ctx, &root)?;
    eprintln!("configure: recorded at {:.1?}", started.elapsed());
    if root != ctx.out {
        let ahead = match copying.map(std::thread::JoinHandle::join) {
            Some(Err(_)) => bail!("configure: the thread copying the tree ahead panicked"),
            Some(Ok(copied)) => copied,
            None => sandbox::CopiedAhead::default(),
        };
        sandbox::copy_tree_onto(&root, &ctx.out, &ahead).context("writing the tree to $out")?;
        // The tree in memory goes with the sandbox.
        eprintln!(
            "configure: written to $out at {:.1?} ({} files copied ahead and unchanged since)",
            started.elapsed(),
            ahead.len()
        );
    }
    if scratch != memory && scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    Ok(())
}

/// What runs a package's maintainer scripts for [`recorded_unpack::unpack`] in the chroot, as
/// `dpkg OPTIONS --unpack` would run them: with dpkg's `DPKG_FORCE` for those options, asked
/// of dpkg now (before any package of the set is half-installed).
fn script_runner<'a>(
    chroot: &'a Chroot,
    options: &[&str],
) -> anyhow::Result<Box<recorded_unpack::ScriptFn<'a>>> {
    let force = chroot.dpkg_force(options)?;
    Ok(Box::new(
        move |name: &str, argv: &[&str], env: &[(String, String)]| {
            let mut env = env.to_vec();
            env.push(("DPKG_FORCE".into(), force.clone()));
            // `…/tmp.ci/preinst`, `…/info/NAME.postrm`: the script's name.
            let file = argv
                .first()
                .and_then(|a| a.rsplit('/').next())
                .unwrap_or_default();
            let script = file.rsplit('.').next().unwrap_or(file);
            chroot.run_with(&format!("the {script} of {name}"), argv, &env)
        },
    ))
}

/// A thread copying the tree at `root`, as it is now, to `out` ahead of the copy at the end
/// ([`sandbox::Skeleton`]: its names, and the files that have not changed lately), leaving out
/// what is `mounted` there for the chroot and the staging that does not stay (without
/// `contents`, the names only); after `earlier`
/// (such a thread, joined first: the two never write at once), whose copies it keeps where
/// their files have not changed since. `probe` is a path for reading the file clock, beside
/// the tree. None if the tree cannot be read now (it is being worked on) or no thread can be
/// started: copying ahead is only a saving.
fn copy_ahead(
    root: &Path,
    out: &Path,
    probe: &Path,
    mounted: &[PathBuf],
    contents: bool,
    earlier: Option<std::thread::JoinHandle<sandbox::CopiedAhead>>,
) -> Option<std::thread::JoinHandle<sandbox::CopiedAhead>> {
    // Joined here, not in the new thread: a thread that could not be started would leave it
    // writing beside the copy at the end. It has long finished by now, as a rule.
    let earlier = earlier.and_then(|t| t.join().ok()).unwrap_or_default();
    let mut except = mounted.to_vec();
    except.push(PathBuf::from(super::DEB_STAGING));
    let skeleton = match sandbox::Skeleton::scan(root, &except) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("configure: the tree is not copied ahead now: {e}");
            return None;
        }
    };
    let (out, probe) = (out.to_owned(), probe.to_owned());
    std::thread::Builder::new()
        .name("copy-ahead".into())
        .spawn(move || {
            let copied = contents
                .then(|| sandbox::change_time_after(&probe))
                .transpose()
                .and_then(|before| skeleton.create_in(&out, before, &earlier));
            copied.unwrap_or_else(|e| {
                eprintln!("configure: copying the tree ahead failed: {e}");
                sandbox::CopiedAhead::default()
            })
        })
        .ok()
}

/// What the `.deb`s are checked against: the verified index lines `available` writes of its
/// stanzas (the debootstrap variant: `available` makes `verify`'s checks of the signed index
/// itself, beside it, so configure does not wait for `verify`), or else the verified index
/// (input 0).
enum Signed<'a> {
    Lines(String),
    Verified(&'a Path),
}

impl Signed<'_> {
    fn of<'a>(ctx: &'a BuildContext, plan: &ConfigurePlan) -> anyhow::Result<Signed<'a>> {
        let Some(i) = plan.available else {
            return Ok(Signed::Verified(&ctx.inputs[0]));
        };
        let path = ctx.inputs[i].join("index");
        let lines =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Signed::Lines(lines))
    }

    /// Check the `.deb` at `deb` against the sha256 and size the signed index lists for `p`.
    fn check(&self, p: &ConfigurePackage, deb: &Path) -> anyhow::Result<()> {
        let (name, version, arch) = (&p.name, &p.version, &p.architecture);
        match self {
            Signed::Lines(lines) => super::index::verify_deb_in(lines, name, version, arch, deb),
            Signed::Verified(dir) => super::index::verify_deb(dir, name, version, arch, deb),
        }
    }
}

/// About how many bytes the tree will take: the sum of the packages' `Installed-Size` in the
/// index stanzas (the debootstrap variant has them), or four times the `.deb`s' bytes.
fn estimated_tree_bytes(ctx: &BuildContext, plan: &ConfigurePlan) -> anyhow::Result<u64> {
    if let Some(i) = plan.available {
        let path = ctx.inputs[i].join("available");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        return Ok(installed_size_kib(&text) * 1024);
    }
    Ok(plan
        .packages
        .iter()
        .filter_map(|p| fs::metadata(&ctx.inputs[p.deb]).ok())
        .map(|m| m.len() * 4)
        .sum())
}

/// The sum of the `Installed-Size` fields (KiB) of the stanzas in `text`.
fn installed_size_kib(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("Installed-Size:"))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// Whether a tree of about `estimate` bytes is built in memory: only when the sandbox's tmpfs
/// and the machine's available memory both hold it, a quarter more (dpkg's `.dpkg-new` copies,
/// estimates that fall short) and 256 MiB (dpkg, the maintainer scripts, the rest of the
/// machine) besides. A build that runs out of memory half way fails; one on disk is slower.
fn fits_in_memory(estimate: u64, tmpfs_free: Option<u64>, mem_available: Option<u64>) -> bool {
    let need = estimate + estimate / 4 + (256 << 20);
    tmpfs_free.is_none_or(|f| f >= need) && mem_available.is_none_or(|m| m >= need)
}

/// Where configure keeps the `.deb`s it rewrote with their data uncompressed: in `scratch` (the
/// sandbox's memory, or beside `$out`), outside the tree (so none is left in it), and bind-mounted read-only at
/// [`PLAIN_IN_CHROOT`] while dpkg runs (so a maintainer script cannot simply write to them
/// through the chroot).
fn plain_dir(scratch: &Path) -> PathBuf {
    scratch.join("rbuild-plain")
}
const PLAIN_IN_CHROOT: &str = "var/cache/rbuild-debs/plain";

/// Lay out `seed` in `root`, in that order (a later package's file replaces an earlier one's, as
/// in debootstrap's extraction): a package with an unpack derivation from its output; any other
/// is checked against the signed index, rewritten with its data uncompressed into
/// [`plain_dir`] (dpkg reads that later; if it cannot be, from the `.deb` as it is) and
/// unpacked in memory, on every core, each laid out as soon as those before it are. Returns the
/// rewritten `.deb`s, by package, on the host, and what recording their unpack needs of the
/// packages unpacked here.
fn extract(
    ctx: &BuildContext,
    signed: &Signed,
    seed: &[&ConfigurePackage],
    root: &Path,
    scratch: &Path,
) -> anyhow::Result<Extraction> {
    if seed.iter().all(|p| p.unpacked.is_some()) {
        // The extract variant: every package has its unpack derivation.
        for p in seed {
            let unpacked = p.unpacked.expect("checked above");
            materialize(&ctx.inputs[unpacked], "data/", root)
                .with_context(|| format!("extracting {}", p.name))?;
        }
        return Ok(Extraction {
            plain: Vec::new(),
            kept: HashMap::new(),
            at: (0, 0),
        });
    }
    let plain_dir = plain_dir(scratch);
    let trees = scratch.join("rbuild-unpacked");
    fs::create_dir_all(&plain_dir)?;
    fs::create_dir_all(&trees)?;
    /// What a worker made of one package: its tree's metadata, and its rewritten `.deb`.
    type Prepared = Option<(TreeMeta, Vec<(String, Listed)>, Option<PathBuf>)>;
    let prepare = |p: &ConfigurePackage| -> anyhow::Result<Prepared> {
        if p.unpacked.is_some() {
            return Ok(None);
        }
        let deb = &ctx.inputs[p.deb];
        signed.check(p, deb)?;
        let plain = plain_dir.join(deb.file_name().context("input path")?);
        let (from, plain) = match archive::deb::decompress_data(deb, &plain) {
            Ok(()) => (plain.clone(), Some(plain)),
            Err(e) => {
                eprintln!(
                    "configure: {} is unpacked from the .deb as it is: {e}",
                    p.name
                );
                let _ = fs::remove_file(&plain);
                (deb.clone(), None)
            }
        };
        let (meta, listed) = archive::deb::unpack_deb_listed(&from, &trees.join(&p.name))?;
        Ok(Some((meta, listed, plain)))
    };
    let next = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, anyhow::Result<Prepared>)>();
    let work = |tx: std::sync::mpsc::Sender<(usize, anyhow::Result<Prepared>)>| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(p) = seed.get(i) else {
            return;
        };
        let prepared = prepare(p);
        let failed = prepared.is_err();
        if tx.send((i, prepared)).is_err() || failed {
            // Nobody waits for more, or the extraction stops here.
            next.store(seed.len(), Ordering::Relaxed);
            return;
        }
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(seed.len().max(1));
    let mut plain = Vec::new();
    let mut kept = HashMap::new();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let started = (0..threads)
            .filter(|_| {
                let tx = tx.clone();
                std::thread::Builder::new()
                    .name("extract".into())
                    .spawn_scoped(scope, || work(tx))
                    .is_ok()
            })
            .count();
        if started == 0 {
            // No thread could be started (a process limit): the work is done here.
            work(tx.clone());
        }
        drop(tx);
        let laid_out = (|| -> anyhow::Result<()> {
            let mut done: std::collections::BTreeMap<usize, Prepared> = Default::default();
            for (i, p) in seed.iter().enumerate() {
                while !done.contains_key(&i) {
                    let (j, prepared) = rx
                        .recv()
                        .with_context(|| format!("configure: {} was never extracted", p.name))?;
                    let prepared =
                        prepared.with_context(|| format!("extracting {}", seed[j].name))?;
                    done.insert(j, prepared);
                }
                match done.remove(&i).flatten() {
                    Some((meta, listed, rewritten)) => {
                        let tree = trees.join(&p.name);
                        materialize_entries(&tree, &meta, "data/", root, true)
                            .with_context(|| format!("extracting {}", p.name))?;
                        // The control members stay, for recording the unpack.
                        fs::remove_dir_all(tree.join("data"))?;
                        plain.extend(rewritten.map(|r| (p.name.clone(), r)));
                        kept.insert(
                            p.name.clone(),
                            Extracted {
                                dir: tree,
                                meta,
                                listed,
                            },
                        );
                    }
                    None => {
                        let unpacked = p
                            .unpacked
                            .with_context(|| format!("configure: {} was not unpacked", p.name))?;
                        materialize(&ctx.inputs[unpacked], "data/", root)
                            .with_context(|| format!("extracting {}", p.name))?;
                    }
                }
            }
            Ok(())
        })();
        if laid_out.is_err() {
            // The workers stop at their next package.
            next.store(seed.len(), Ordering::Relaxed);
        }
        laid_out
    })?;
    Ok(Extraction {
        plain,
        kept,
        at: sandbox::change_time_after(&scratch.join("rbuild-extracted"))?,
    })
}

/// What [`extract`] leaves for the second stage.
struct Extraction {
    /// The rewritten `.deb`s, by package, on the host.
    plain: Vec<(String, PathBuf)>,
    /// What recording their unpack needs, of the packages unpacked here.
    kept: HashMap<String, Extracted>,
    /// A change time taken once every package was laid out.
    at: (i64, i64),
}

/// debootstrap's second stage (and the end of its first) on the extracted required set, whose
/// `.deb`s `plain` holds rewritten.
fn second_stage(
    ctx: &BuildContext,
    signed: &Signed,
    plan: &ConfigurePlan,
    root: &Path,
    scratch: &Path,
    extraction: Extraction,
    base_unpacked: &mut dyn FnMut(&[PathBuf]),
) -> anyhow::Result<()> {
    let Extraction {
        plain,
        kept: extracted,
        at: extracted_at,
    } = extraction;
    let started = std::time::Instant::now();
    // The first stage's empty database, and the files it writes that no package installs.
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
    if fs::symlink_metadata(root.join("etc/fstab")).is_err() {
        fs::write(
            root.join("etc/fstab"),
            "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n",
        )?;
    }
    // Under emulation dpkg must still know which architecture is native.
    fs::write(
        root.join("var/lib/dpkg/arch"),
        format!("{}\n", plan.architecture),
    )?;

    // dpkg reads each `.deb` straight from the sandbox's read-only inputs, bind-mounted into
    // the chroot; those neither an unpack derivation nor the extraction checked are checked
    // against the signed index here.
    let ready: std::collections::HashSet<String> = plain.iter().map(|(n, _)| n.clone()).collect();
    let mut deb_of = std::collections::HashMap::new();
    for p in &plan.packages {
        let input = &ctx.inputs[p.deb];
        if p.unpacked.is_none() && !ready.contains(&p.name) {
            signed.check(p, input)?;
        }
        let name = input.file_name().context("input path")?.to_string_lossy();
        deb_of.insert(p.name.as_str(), format!("/{INPUTS_IN_CHROOT}/{name}"));
    }
    let mut required: Vec<&str> = plan
        .packages
        .iter()
        .filter(|p| p.required)
        .map(|p| p.name.as_str())
        .collect();
    let mut base: Vec<&str> = plan
        .packages
        .iter()
        .filter(|p| !p.required)
        .map(|p| p.name.as_str())
        .collect();
    required.sort();
    base.sort();
    // Meanwhile, the packages are rewritten with their data uncompressed, in the order dpkg
    // will unpack them, on the cores it leaves idle.
    let input_of: std::collections::HashMap<&str, &Path> = plan
        .packages
        .iter()
        .map(|p| (p.name.as_str(), ctx.inputs[p.deb].as_path()))
        .collect();
    fs::create_dir_all(plain_dir(scratch))?;
    let plain = PlainDebs::start(
        plain,
        required
            .iter()
            .chain(&base)
            .filter(|n| !ready.contains(**n))
            .map(|n| (n.to_string(), input_of[n].to_owned()))
            .collect(),
        plain_dir(scratch),
        format!("/{PLAIN_IN_CHROOT}"),
        // Unpacked too, for recording the base set's unpack.
        Some(scratch.join("rbuild-unpacked-later")),
    );
    let debs = |names: &[&str]| plain.batch(names, |n| deb_of.get(n).cloned());

    // x_feign_install dpkg: the status claims dpkg, so that dpkg can install the first packages.
    let dpkg = plan
        .packages
        .iter()
        .find(|p| p.name == "dpkg")
        .context("configure: the lock has no dpkg")?;
    fs::write(
        root.join("var/lib/dpkg/status"),
        format!(
            "Package: dpkg\nVersion: {}\nMaintainer: unknown\nStatus: install ok installed\n",
            dpkg.version
        ),
    )?;
    fs::write(root.join("var/lib/dpkg/info/dpkg.list"), b"")?;

    eprintln!("configure: packages checked at {:.1?}", started.elapsed());
    let mut chroot = Chroot::enter(ctx, root)?;
    chroot
        .mounts
        .bind_readonly(Path::new(sandbox::INPUTS_DIR), INPUTS_IN_CHROOT)?;
    chroot
        .mounts
        .bind_readonly(&plain_dir(scratch), PLAIN_IN_CHROOT)?;
    chroot.run("ldconfig", &["/sbin/ldconfig"])?;

    // The core packages, one `dpkg --install` each: its unpack recorded, where that is all
    // dpkg would do, then `dpkg --configure` of it; else `dpkg --install`. The `.deb` stays
    // for the required set's unpack, which installs it again: recorded too, for a package
    // whose install was (see `installed`).
    let core_options = ["--force-depends"];
    let core_scripts = script_runner(&chroot, &core_options)?;
    let no_installs = HashMap::new();
    let installed = std::cell::RefCell::new(HashMap::new());
    let install_core = |chroot: &Chroot, name: &str| -> anyhow::Result<()> {
        let deb = plain.peek(name).or_else(|| deb_of.get(name).cloned());
        let deb = deb.with_context(|| {
            format!("configure: debootstrap's core package {name} is not in the lock")
        })?;
        let recorded = std::cell::Cell::new(false);
        recorded_unpack::unpack(
            root,
            &format!("the core package {name}"),
            &[name],
            &Source::Extracted {
                kept: &extracted,
                at: extracted_at,
                installed: &no_installs,
            },
            &|_| {
                chroot.dpkg(
                    &format!("dpkg --install of {name}"),
                    &[&core_options[..], &["--install"]].concat(),
                    std::slice::from_ref(&deb),
                )
            },
            Some(&*core_scripts),
            &|_| recorded.set(true),
        )?;
        if recorded.get() {
            // Its files as recorded: any changed later has a change time at or past this.
            let probe = scratch.join(format!("rbuild-installed-{name}"));
            let at = sandbox::change_time_after(&probe)?;
            installed.borrow_mut().insert(name.to_owned(), at);
            chroot.dpkg(
                &format!("dpkg --configure of {name}"),
                &[&core_options[..], &["--configure", name]].concat(),
                &[],
            )?;
        }
        Ok(())
    };
    chroot.sh("linking awk", "ln -sf mawk /usr/bin/awk")?;
    for name in CORE {
        match *name {
            "libc6" => chroot.sh(
                "linking /etc/localtime",
                "[ -e /etc/localtime ] || ln -sf /usr/share/zoneinfo/UTC /etc/localtime",
            )?,
            "mawk" => chroot.sh("removing the awk link", "rm /usr/bin/awk")?,
            _ => {}
        }
        install_core(&chroot, name)?;
    }

    // The required set: unpacked (recorded, where dpkg would only repeat the extraction),
    // then configured with services held off. dpkg's options are the core installs', and so
    // is the runner of scripts.
    let options = core_options;
    let installed = installed.into_inner();
    recorded_unpack::unpack(
        root,
        "the required set",
        &required,
        &Source::Extracted {
            kept: &extracted,
            at: extracted_at,
            installed: &installed,
        },
        &|names| {
            chroot.dpkg(
                &format!("dpkg --unpack of {}", names.join(" ")),
                &[&options[..], &["--unpack"]].concat(),
                &debs(names).args,
            )
        },
        Some(&*core_scripts),
        // Its rewritten `.deb` goes.
        &|name| plain.discard(name),
    )?;
    // What borrows the chroot goes before it is left.
    drop(core_scripts);
    let no_services = NoServices::install(ctx, root)?;
    chroot.sh(
        "moving start-stop-daemon aside",
        "mv /sbin/start-stop-daemon /sbin/start-stop-daemon.REAL",
    )?;
    // Maintainer scripts have run: the tree's paths are resolved as the chroot resolves them.
    let tree = sandbox::InRoot::open(root)?;
    let fake = "sbin/start-stop-daemon";
    tree.replace_file(
        fake,
        b"#!/bin/sh\necho\necho \"Warning: Fake start-stop-daemon called, doing nothing\"\n",
        0o755,
    )?;
    sandbox::apply_meta(
        &tree.leaf(fake)?.path,
        &rbuild_store::meta::EntryMeta::root(0o755, ctx.source_date_epoch()),
    )?;
    tree.replace_file("var/lib/dpkg/cmethopt", b"apt apt\n", 0o644)?;
    chroot.dpkg(
        "dpkg --configure of the required packages",
        &[
            "--configure",
            "--pending",
            "--force-configure-any",
            "--force-depends",
        ],
        &[],
    )?;

    // setup_available: the index's stanzas of every package, and every package selected.
    let available_input = plan
        .available
        .context("configure: the plan names no available input")?;
    let available = fs::read_to_string(ctx.inputs[available_input].join("available"))
        .context("reading the packages' stanzas")?;
    // dpkg and the scripts have run since: resolved afresh.
    let tree = sandbox::InRoot::open(root)?;
    tree.replace_file("var/lib/dpkg/available", available.as_bytes(), 0o644)?;
    let selections: String = required
        .iter()
        .chain(&base)
        .map(|n| format!("{n} install\n"))
        .collect();
    tree.replace_file(
        &format!("{}/selections", super::DEB_STAGING),
        selections.as_bytes(),
        0o644,
    )?;
    chroot.sh(
        "dpkg --set-selections",
        &format!(
            "/usr/bin/dpkg --set-selections < /{}/selections",
            super::DEB_STAGING
        ),
    )?;

    // Pre-dependencies of the base set, each with what it depends on, installed first.
    let stanzas = packages::parse_packages("available", &available)?;
    let mut done: Vec<String> = Vec::new();
    loop {
        if done.len() > plan.packages.len() {
            bail!("configure: dpkg --predep-package keeps naming packages: {done:?}");
        }
        let (_, out) = chroot.output(&["/usr/bin/dpkg", "--predep-package"])?;
        let Some(predep) = out
            .lines()
            .find_map(|l| l.strip_prefix("Package:"))
            .map(str::trim)
        else {
            break;
        };
        let closure =
            resolve::first_alternative_closure(&stanzas, [predep], &plan.exclude_dependencies);
        let batch: Vec<&str> = closure
            .iter()
            .map(String::as_str)
            .filter(|n| required.binary_search(n).is_err() && !done.iter().any(|d| d == n))
            .collect();
        if batch.is_empty() {
            bail!("configure: dpkg names {predep} as a pre-dependency to install, but it is installed already");
        }
        chroot.dpkg(
            &format!("dpkg --install of the pre-dependency {predep}"),
            &[
                "--force-overwrite",
                "--force-confold",
                "--skip-same-version",
                "--install",
            ],
            &debs(&batch).args,
        )?;
        base.retain(|n| !batch.contains(n));
        done.extend(batch.iter().map(|n| n.to_string()));
    }

    // The base set.
    if !base.is_empty() {
        // Recorded where dpkg would only lay the package out, as for the required set.
        let options = [
            "--force-overwrite",
            "--force-confold",
            "--skip-same-version",
        ];
        recorded_unpack::unpack(
            root,
            "the base set",
            &base,
            &Source::Unpacked(&|name| plain.take_unpacked(name)),
            &|names| {
                chroot.dpkg(
                    &format!("dpkg --unpack of {}", names.join(" ")),
                    &[&options[..], &["--unpack"]].concat(),
                    &debs(names).args,
                )
            },
            Some(&*script_runner(&chroot, &options)?),
            &|name| plain.discard(name),
        )?;
        base_unpacked(&chroot.mounts.mount_points());
        chroot.dpkg(
            "dpkg --configure of the base packages",
            &[
                "--force-confold",
                "--skip-same-version",
                "--configure",
                "-a",
            ],
            &[],
        )?;
    }
    chroot.sh(
        "restoring start-stop-daemon",
        "mv /sbin/start-stop-daemon.REAL /sbin/start-stop-daemon",
    )?;
    chroot.audit()?;
    drop(plain);
    chroot.leave()?;
    no_services.remove()?;
    // dpkg knows its native architecture; debootstrap leaves no arch file either.
    sandbox::InRoot::open(root)?.remove_file("var/lib/dpkg/arch")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_sizes_are_summed_from_the_stanzas() {
        let text = "Package: a\nInstalled-Size: 100\nDescription: x\n Installed-Size: 7\n\nPackage: b\nInstalled-Size:  23\n\nPackage: c\n\n";
        // A description's continuation line starts with a space: not a field.
        assert_eq!(installed_size_kib(text), 123);
    }

    #[test]
    fn the_tree_is_built_in_memory_only_with_room_to_spare() {
        const MIB: u64 = 1 << 20;
        // bullseye: about 200 MiB.
        assert!(fits_in_memory(
            200 * MIB,
            Some(8000 * MIB),
            Some(16000 * MIB)
        ));
        assert!(fits_in_memory(200 * MIB, None, None));
        // 200 + 50 + 256 MiB are needed.
        assert!(fits_in_memory(200 * MIB, Some(506 * MIB), Some(506 * MIB)));
        assert!(!fits_in_memory(
            200 * MIB,
            Some(505 * MIB),
            Some(8000 * MIB)
        ));
        assert!(!fits_in_memory(
            200 * MIB,
            Some(8000 * MIB),
            Some(505 * MIB)
        ));
        // A 3 GiB tree on a machine with 4 GiB: its tmpfs is 2 GiB.
        assert!(!fits_in_memory(
            3072 * MIB,
            Some(2048 * MIB),
            Some(3500 * MIB)
        ));
    }
}
