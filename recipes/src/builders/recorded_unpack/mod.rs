//! debootstrap's `dpkg --unpack`s (the core packages' installs, the required set, the base
//! set), with dpkg's work done by configure where all dpkg would do is lay a package out and
//! write down that it did.
//!
//! The extraction has laid out every required package's files already; dpkg's unpack writes
//! them all again, byte for byte, about ten milliseconds of process starts per package before
//! the first file. The base set's packages are unpacked beside the tree while dpkg configures
//! the required set. For a package that is new to the database (or only selected), whose
//! `preinst`, if it has one, writes nothing of dpkg's database (configure runs it first, as
//! dpkg would: see [`Db::run_preinst`]), and whose paths are as dpkg would find them — the
//! files the extraction laid out untouched since (and linked as its tar links them), or, for a
//! package not laid out yet, nothing there but directories — configure records it itself, as
//! `dpkg --unpack` would: files moved in (or, laid out already, their times set) with their
//! tar entries' owner, mode and time, each conffile as `PATH.dpkg-new`, the control members in
//! `info/`, the file list in the tar's order, its trigger interests in `triggers/`, the status
//! stanza (`install ok unpacked`, conffiles `newconffile`), and the triggers it activates
//! pending for the configured packages interested (`noawait` only). A package installed
//! already, unpacked again as debootstrap does to its core packages, is recorded as dpkg's
//! reinstall, its scripts run as dpkg runs them ([`reinstall`]). Every other package — a
//! script calling dpkg-statoverride or dpkg-trigger, an awaited trigger, a diversion (a
//! preinst's too) or stat override of its paths, a file another package lists or a path
//! already taken, a package it would make disappear, a Conflicts or Breaks that may hold, a
//! file changed since the extraction, an owner other than root… — is unpacked by dpkg
//! itself, in the same order, in runs of consecutive packages. `dpkg --configure` then finds
//! the database it would have made, and rewrites every stanza in its own words.
//!
//! `db.rs` reads dpkg's database (and writes its status back), `why_not.rs` says why a package
//! cannot be recorded, `record.rs` records one (its preinst run first), `reinstall.rs` a
//! reinstall. The tests that compare the tree with debootstrap's
//! (tests/suites.rs) hold this to dpkg's own result, database included.

mod db;
mod record;
mod reinstall;
mod why_not;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rbuild_engine::archive::deb::Listed;
use rbuild_store::meta::{EntryMeta, TreeMeta};

use db::Db;

/// What configure's extraction kept of one package for this: its unpacked control members
/// (`dir/control/…`), the metadata of every entry (`control/…`, `data/…`), and the data
/// entries in the tar's order.
pub(super) struct Extracted {
    pub dir: PathBuf,
    pub meta: TreeMeta,
    pub listed: Vec<(String, Listed)>,
}

impl Extracted {
    /// Its control members (`control/NAME` in its metadata), by name, each with its metadata.
    fn control_members(&self) -> impl Iterator<Item = (&str, &EntryMeta)> {
        self.meta
            .entries
            .range("control/".to_owned()..)
            .map_while(|(k, em)| Some((k.strip_prefix("control/")?, em)))
    }

    /// The control members dpkg keeps in `info/` (all but `control`; none named `list` or with
    /// a dot, which dpkg would refuse), each with its metadata.
    fn info_members(&self) -> impl Iterator<Item = (&str, &EntryMeta)> {
        self.control_members()
            .filter(|(m, _)| *m != "control" && *m != "list" && !m.contains('.'))
    }

    /// Its data entries but the tar's root, in the tar's order, each with its metadata.
    fn entries(&self) -> impl Iterator<Item = anyhow::Result<(&str, Listed, &EntryMeta)>> {
        self.listed
            .iter()
            .filter(|(p, _)| p != "/.")
            .map(|(p, kind)| {
                let em = self
                    .meta
                    .entries
                    .get(&format!("data{p}"))
                    .with_context(|| format!("no metadata for {p}"))?;
                Ok((p.as_str(), *kind, em))
            })
    }
}

/// Where the packages to unpack come from.
pub(super) enum Source<'a> {
    /// Laid out in the tree by the extraction already, each kept here by name; `at` is a
    /// change time taken after the extraction (a file changed since has a change time at or
    /// past it). `installed` has, of the packages installed since whose unpack was recorded
    /// here, a change time taken then: such a package's files have not changed since if
    /// their change times are before it, and `dpkg --unpack` of it again (a reinstall) can be
    /// recorded too (see [`reinstall`]).
    Extracted {
        kept: &'a HashMap<String, Extracted>,
        at: (i64, i64),
        installed: &'a HashMap<String, (i64, i64)>,
    },
    /// Not in the tree yet: unpacked beside it, each given (once) by the function, or not.
    Unpacked(&'a dyn Fn(&str) -> Option<Extracted>),
}

impl Source<'_> {
    fn laid_out(&self) -> bool {
        matches!(self, Source::Extracted { .. })
    }

    /// When `name`'s recorded install was over, if it was recorded here (see
    /// [`Source::Extracted`]).
    fn installed_at(&self, name: &str) -> Option<(i64, i64)> {
        match self {
            Source::Extracted { installed, .. } => installed.get(name).copied(),
            Source::Unpacked(_) => None,
        }
    }
}

/// Runs a maintainer script of the package named first as `dpkg --unpack` runs it: the
/// command line second (the script's path in the chroot, e.g.
/// `/var/lib/dpkg/tmp.ci/preinst`, and its arguments), from `/` in the chroot, with the
/// build's environment, the variables given third (dpkg's for a maintainer script), and
/// `DPKG_FORCE` as the set's `dpkg --unpack` has it (the runner's to add: it knows dpkg's
/// options).
pub(super) type RunScript<'a> = &'a ScriptFn<'a>;

/// What a [`RunScript`] refers to.
pub(super) type ScriptFn<'a> =
    dyn Fn(&str, &[&str], &[(String, String)]) -> anyhow::Result<()> + 'a;

/// What a maintainer script run here may not call for configure to run it in dpkg's stead:
/// dpkg's database writers but `dpkg-divert` (a stat override changes how the package is laid
/// out, and dpkg incorporates the triggers a script activated before going on). A diversion
/// the preinst adds is read before the package is looked at again: trixie's /usr-move
/// mitigations divert paths the package does not hold (`/lib/…` where it ships `/usr/lib/…`).
const DATABASE_WRITERS: [&str; 2] = ["dpkg-statoverride", "dpkg-trigger"];

/// `dpkg --unpack` of `names` (in that order): recorded here where that is all dpkg would do
/// (see the module), by `dpkg_unpack` (which runs dpkg, with the caller's options, on
/// packages in the chroot) otherwise. A package's maintainer scripts are run by `scripts`
/// (none: every package with a script to run is left to dpkg). `recorded_one` is told of each
/// package recorded here (its `.deb` is not needed). `what` names the set in the log.
pub(super) fn unpack(
    root: &Path,
    what: &str,
    names: &[&str],
    source: &Source,
    dpkg_unpack: &dyn Fn(&[&str]) -> anyhow::Result<()>,
    scripts: Option<RunScript>,
    recorded_one: &dyn Fn(&str),
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let read = || -> anyhow::Result<Db> {
        let mut db = Db::read(root)?;
        db.runs_scripts = scripts.is_some();
        Ok(db)
    };
    let mut db = read()?;
    let mut batch: Vec<&str> = Vec::new();
    let (mut recorded, mut reinstalled, mut by_dpkg, mut preinsts) = (0, 0, 0, 0);
    let mut runs = 0;
    for &name in names {
        let taken: Option<Extracted>;
        let ex = match source {
            Source::Extracted { kept, .. } => kept.get(name),
            Source::Unpacked(take) => {
                taken = take(name);
                taken.as_ref()
            }
        };
        let mut why_not = match ex {
            None => Some("it was not unpacked here".to_owned()),
            Some(ex) => db.why_not(name, ex, source)?,
        };
        if let (None, Some(ex), false) = (&why_not, ex, batch.is_empty()) {
            // dpkg unpacks the packages before it first, and what they change (their files,
            // diversions, interests…) is asked about again.
            db.write_status()?;
            dpkg_unpack(&batch)?;
            runs += 1;
            batch.clear();
            db = read()?;
            why_not = db.why_not(name, ex, source)?;
        }
        match (why_not, ex) {
            (None, Some(ex)) if db.installed(name) => {
                let run = scripts.context("a reinstall is recorded only with its scripts run")?;
                db = db
                    .reinstall(name, ex, source, run)
                    .with_context(|| format!("recording {name} as unpacked again"))?;
                recorded_one(name);
                reinstalled += 1;
            }
            (None, Some(ex)) => {
                if let (Some(run), true) = (scripts, has_preinst(ex)) {
                    db = db.run_preinst(name, ex, source, run)?;
                    preinsts += 1;
                }
                db.record(name, ex, source)
                    .with_context(|| format!("recording {name} as unpacked"))?;
                recorded_one(name);
                recorded += 1;
            }
            (why, _) => {
                let why = why.unwrap_or_default();
                eprintln!("configure: dpkg unpacks {name}: {why}");
                batch.push(name);
                by_dpkg += 1;
            }
        }
        if let (Source::Unpacked(_), Some(ex)) = (source, ex) {
            // What is left of its unpacked tree (all of it, if dpkg unpacks it).
            let _ = fs::remove_dir_all(&ex.dir);
        }
    }
    db.write_status()?;
    if !batch.is_empty() {
        dpkg_unpack(&batch)?;
        runs += 1;
    }
    eprintln!(
        "configure: {what} unpacked in {:.2?}: {recorded} packages recorded as dpkg would \
         ({preinsts} of them after their preinst), {reinstalled} reinstalls recorded, \
         {by_dpkg} unpacked by dpkg in {runs} runs",
        started.elapsed()
    );
    Ok(())
}

/// Whether the package has a preinst.
fn has_preinst(ex: &Extracted) -> bool {
    ex.meta.entries.contains_key("control/preinst")
}

/// What a package's `triggers` member says: the triggers it activates (`activate`,
/// `activate-await`, `activate-noawait`, and the trigger's name), and those it is interested
/// in (a file trigger's path or an explicit trigger's name, and whether `noawait`), in its
/// order; or the first line that says anything else (a file trigger activated, a name dpkg
/// would refuse…).
struct Triggers {
    activates: Vec<(String, String)>,
    interests: Vec<(String, bool)>,
}

fn triggers(ex: &Extracted) -> Result<Triggers, String> {
    let mut out = Triggers {
        activates: Vec::new(),
        interests: Vec::new(),
    };
    let Ok(text) = fs::read_to_string(ex.dir.join("control/triggers")) else {
        return Ok(out);
    };
    // An explicit trigger's name: what dpkg takes, and a file name in `triggers/`.
    let explicit = |t: &str| {
        !t.is_empty()
            && !t.starts_with('.')
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-._:".contains(&b))
    };
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(kind @ ("activate" | "activate-await" | "activate-noawait")), Some(t), None)
                if explicit(t) =>
            {
                out.activates.push((kind.to_owned(), t.to_owned()))
            }
            (Some(kind @ ("interest" | "interest-await" | "interest-noawait")), Some(t), None)
                if explicit(t) || (t.starts_with('/') && t.len() > 1 && !t.contains("//")) =>
            {
                out.interests
                    .push((t.to_owned(), kind == "interest-noawait"))
            }
            _ => return Err(line.to_owned()),
        }
    }
    Ok(out)
}

/// The triggers a package activates (see [`Triggers`]), or the line that stops it.
fn activations(ex: &Extracted) -> Result<Vec<(String, String)>, String> {
    triggers(ex).map(|t| t.activates)
}

/// The package a trigger interest line names (`pkg`, `pkg:arch`, either with `/noawait`).
fn package_of(line: &str) -> String {
    let p = line.trim();
    let p = p.split('/').next().unwrap_or(p);
    p.split(':').next().unwrap_or(p).to_owned()
}

/// The lines of the package's `conffiles` member (none if it has none).
fn conffiles(ex: &Extracted) -> anyhow::Result<Vec<String>> {
    match fs::read_to_string(ex.dir.join("control/conffiles")) {
        Ok(t) => Ok(t
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).context("reading conffiles"),
    }
}

#[cfg(test)]
mod tests;
