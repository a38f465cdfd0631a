//! debootstrap's `dpkg --unpack`s (the required set, the base set), with dpkg's work done by
//! configure where all dpkg would do is lay a package out and write down that it did.
//!
//! The extraction has laid out every required package's files already; dpkg's unpack writes
//! them all again, byte for byte, about ten milliseconds of process starts per package before
//! the first file. The base set's packages are unpacked beside the tree while dpkg configures
//! the required set. For a package that is new to the database (or only selected), whose
//! `preinst`, if it has one, writes nothing of dpkg's database (configure runs it first, as
//! dpkg would: see [`Db::run_preinst`]), and whose paths are as dpkg would find them — the
//! files the extraction laid out untouched since, or, for a package not laid out yet,
//! nothing there but directories — configure records it itself, as `dpkg --unpack` would:
//! files moved in (or, laid out already, their times set) with their tar entries' owner, mode
//! and time, each conffile as `PATH.dpkg-new`, the control members in `info/`, the file list
//! in the tar's order, the status stanza (`install ok unpacked`, conffiles `newconffile`),
//! and the triggers it activates pending for the configured packages interested (`noawait`
//! only). Every other package — a preinst calling dpkg-statoverride or dpkg-trigger, a
//! trigger interest or an awaited trigger, a diversion (a preinst's too) or stat override of
//! its paths, a file another package lists or a path already taken, a package it would make
//! disappear, a Conflicts or Breaks that may hold, a file changed since the extraction… — is
//! unpacked by dpkg itself, in the same order, in runs of consecutive packages.
//! `dpkg --configure` then finds the database it would have made, and rewrites every stanza
//! in its own words.
//!
//! The tests that compare the tree with debootstrap's (tests/suites.rs) hold this to dpkg's
//! own result, database included.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rbuild_engine::archive::deb::Listed;
use rbuild_engine::sandbox::{self, InRoot};
use rbuild_store::meta::{EntryMeta, TreeMeta};

use crate::debian::packages::{self, field, Dep};
use crate::debian::resolve;

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
    /// past it).
    Extracted {
        kept: &'a HashMap<String, Extracted>,
        at: (i64, i64),
    },
    /// Not in the tree yet: unpacked beside it, each given (once) by the function, or not.
    Unpacked(&'a dyn Fn(&str) -> Option<Extracted>),
}

impl Source<'_> {
    fn laid_out(&self) -> bool {
        matches!(self, Source::Extracted { .. })
    }
}

/// Runs the `preinst` of the package named first as dpkg runs it before it lays the package
/// out: `/var/lib/dpkg/tmp.ci/preinst install`, from `/` in the chroot, with the build's
/// environment, the variables given second (dpkg's for a maintainer script), and `DPKG_FORCE`
/// as the set's `dpkg --unpack` has it (the runner's to add: it knows dpkg's options).
pub(super) type RunPreinst<'a> = &'a PreinstFn<'a>;

/// What a [`RunPreinst`] refers to.
pub(super) type PreinstFn<'a> = dyn Fn(&str, &[(String, String)]) -> anyhow::Result<()> + 'a;

/// What a preinst may not call for configure to run it in dpkg's stead: dpkg's database
/// writers but `dpkg-divert` (a stat override changes how the package is laid out, and dpkg
/// incorporates the triggers a script activated before going on). A diversion the preinst
/// adds is read before the package is looked at again: trixie's /usr-move mitigations divert
/// paths the package does not hold (`/lib/…` where it ships `/usr/lib/…`).
const DATABASE_WRITERS: [&str; 2] = ["dpkg-statoverride", "dpkg-trigger"];

/// `dpkg --unpack` of `names` (in that order): recorded here where that is all dpkg would do
/// (see the module), by `dpkg_unpack` (which runs dpkg, with the caller's options, on
/// packages in the chroot) otherwise. A package's preinst is run by `preinst` (none: every
/// package with a preinst is left to dpkg). `recorded_one` is told of each package recorded
/// here (its `.deb` is not needed). `what` names the set in the log.
pub(super) fn unpack(
    root: &Path,
    what: &str,
    names: &[&str],
    source: &Source,
    dpkg_unpack: &dyn Fn(&[&str]) -> anyhow::Result<()>,
    preinst: Option<RunPreinst>,
    recorded_one: &dyn Fn(&str),
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let read = || -> anyhow::Result<Db> {
        let mut db = Db::read(root)?;
        db.runs_preinsts = preinst.is_some();
        Ok(db)
    };
    let mut db = read()?;
    let mut batch: Vec<&str> = Vec::new();
    let (mut recorded, mut by_dpkg, mut preinsts) = (0, 0, 0);
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
            (None, Some(ex)) => {
                if let (Some(run), true) = (preinst, has_preinst(ex)) {
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
         ({preinsts} of them after their preinst), {by_dpkg} unpacked by dpkg in {runs} runs",
        started.elapsed()
    );
    Ok(())
}

/// One stanza of dpkg's status file.
struct Stanza {
    name: String,
    /// The third word of `Status:` (`installed`, `unpacked`…).
    state: String,
    /// Read once (None if they do not parse): every package looked at is judged against them.
    relations: Option<Relations>,
    text: String,
}

impl Stanza {
    fn new(name: String, text: String) -> Stanza {
        let state = field(&text, "Status")
            .and_then(|s| s.split_whitespace().nth(2).map(str::to_owned))
            .unwrap_or_default();
        Stanza {
            name,
            state,
            relations: Relations::of(&text),
            text,
        }
    }

    fn field(&self, name: &str) -> Option<String> {
        field(&self.text, name)
    }
}

/// What Conflicts and Breaks are judged by, of one stanza.
struct Relations {
    version: Option<String>,
    conflicts: Vec<Dep>,
    breaks: Vec<Dep>,
    provides: Vec<(String, Option<String>)>,
}

impl Relations {
    /// None if a relation field does not parse.
    fn of(text: &str) -> Option<Relations> {
        Some(Relations {
            version: field(text, "Version"),
            conflicts: relations(text, "Conflicts")?,
            breaks: relations(text, "Breaks")?,
            provides: provides_of(text)?,
        })
    }

    /// The relation in its Conflicts or Breaks that may hold against package `name` with
    /// relations `other`, if one may.
    fn against<'a>(&'a self, f: &str, name: &str, other: &Relations) -> Option<&'a Dep> {
        let deps = if f == "Conflicts" {
            &self.conflicts
        } else {
            &self.breaks
        };
        let version = other.version.as_deref().unwrap_or_default();
        deps.iter()
            .find(|d| may_hold(d, name, version, &other.provides))
    }
}

/// The relations of field `name` of a stanza (alternatives flattened; none if it has no such
/// field); None if it does not parse.
fn relations(text: &str, name: &str) -> Option<Vec<Dep>> {
    match field(text, name) {
        None => Some(Vec::new()),
        // A relation's continuation lines continue its list.
        Some(v) => Some(
            packages::parse_relations(&v.replace('\n', " "))
                .ok()?
                .into_iter()
                .flatten()
                .collect(),
        ),
    }
}

/// What a stanza's Provides gives: names, with the version of a versioned provide (`= V`);
/// None if it does not parse.
fn provides_of(text: &str) -> Option<Vec<(String, Option<String>)>> {
    Some(
        relations(text, "Provides")?
            .into_iter()
            .map(|d| {
                let v = d.version.filter(|(op, _)| op == "=").map(|(_, v)| v);
                (d.name, v)
            })
            .collect(),
    )
}

/// Whether the Conflicts or Breaks relation `dep` may hold against package `name` at `version`,
/// which provides `provides`: by name, or by a versioned provide, when that version satisfies
/// the relation's; by an unversioned provide, whatever the relation's version (dpkg would not
/// count it against a versioned relation; this errs towards leaving the package to dpkg).
/// Architecture qualifiers are not looked at.
fn may_hold(dep: &Dep, name: &str, version: &str, provides: &[(String, Option<String>)]) -> bool {
    let satisfied = |v: &str| match &dep.version {
        None => true,
        Some((op, want)) => resolve::satisfies(v, op, want),
    };
    if dep.name == name && satisfied(version) {
        return true;
    }
    provides.iter().any(|(p, v)| {
        *p == dep.name
            && match v {
                Some(v) => satisfied(v),
                None => true,
            }
    })
}

/// dpkg's database as far as recording an unpack needs it.
struct Db {
    root: PathBuf,
    /// The tree, its paths resolved as its chroot resolves them: maintainer scripts have run
    /// in it, and may have left symlinks that lead elsewhere from outside.
    tree: InRoot,
    status: Vec<Stanza>,
    dirty: bool,
    /// Every package's file list, by package name (without an architecture).
    lists: HashMap<String, Vec<String>>,
    /// Which packages list each path.
    owners: HashMap<String, Vec<String>>,
    /// File trigger interests: (path, package).
    file_interests: Vec<(String, String)>,
    /// The paths diversions divert, and those they divert to.
    diverted: Vec<String>,
    /// What changes how dpkg lays out any package, if the database or dpkg's configuration
    /// has it (nothing else writes them between two readings).
    blocked: Option<String>,
    /// Whether a package's preinst can be run here (else dpkg unpacks every package with one).
    runs_preinsts: bool,
}

const ADMIN: &str = "var/lib/dpkg";

/// `var/lib/dpkg/NAME`.
fn admin(name: &str) -> String {
    format!("{ADMIN}/{name}")
}

impl Db {
    fn read(root: &Path) -> anyhow::Result<Db> {
        let tree = InRoot::open(root).with_context(|| format!("opening {}", root.display()))?;
        let text = tree
            .read_to_string(&admin("status"))
            .context("reading dpkg's status")?;
        let mut status = Vec::new();
        for chunk in text.split("\n\n") {
            let chunk = chunk.trim_matches('\n');
            if chunk.is_empty() {
                continue;
            }
            let name = field(chunk, "Package").context("a status stanza without Package")?;
            status.push(Stanza::new(name, chunk.to_owned()));
        }
        let mut lists = HashMap::new();
        let mut owners: HashMap<String, Vec<String>> = HashMap::new();
        for file in tree
            .read_dir(&admin("info"))
            .context("reading dpkg's info")?
        {
            let file = file.to_string_lossy().into_owned();
            let Some(stem) = file.strip_suffix(".list") else {
                continue;
            };
            let name = stem.split(':').next().unwrap_or(stem).to_owned();
            let paths: Vec<String> = tree
                .read_to_string(&admin(&format!("info/{file}")))?
                .lines()
                .map(str::to_owned)
                .collect();
            for p in &paths {
                owners.entry(p.clone()).or_default().push(name.clone());
            }
            lists.insert(name, paths);
        }
        let file_interests = match tree.read_to_string(&admin("triggers/File")) {
            Ok(t) => t
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(p, pkg)| (p.to_owned(), package_of(pkg)))
                .collect(),
            Err(_) => Vec::new(),
        };
        // diversions: three lines each (from, to, package).
        let diverted = match tree.read_to_string(&admin("diversions")) {
            Ok(t) => {
                let lines: Vec<&str> = t.lines().collect();
                anyhow::ensure!(
                    lines.len().is_multiple_of(3),
                    "dpkg's diversions file is not in threes of lines"
                );
                lines
                    .chunks(3)
                    .flat_map(|d| [d[0].to_owned(), d[1].to_owned()])
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).context("reading dpkg's diversions"),
        };
        let blocked = blocked(&tree);
        Ok(Db {
            root: root.to_owned(),
            diverted,
            blocked,
            tree,
            status,
            dirty: false,
            lists,
            owners,
            file_interests,
            runs_preinsts: false,
        })
    }

    fn state(&self, name: &str) -> &str {
        self.status
            .iter()
            .find(|s| s.name == name)
            .map_or("not-installed", |s| s.state.as_str())
    }

    /// Whether a package in this state records trigger activations (dpkg's
    /// `trig_record_activation`: triggers-awaited or later).
    fn takes_triggers(&self, name: &str) -> bool {
        matches!(
            self.state(name),
            "triggers-awaited" | "triggers-pending" | "installed"
        )
    }

    /// Why `dpkg --unpack` of `name` would do more than record it (None: it would not).
    fn why_not(
        &self,
        name: &str,
        ex: &Extracted,
        source: &Source,
    ) -> anyhow::Result<Option<String>> {
        if let Some(why) = &self.blocked {
            return Ok(Some(why.clone()));
        }
        // New to the database, or only selected (`dpkg --set-selections`).
        if let Some(s) = self.status.iter().find(|s| s.name == name) {
            let selected = s.field("Status").is_some_and(|v| {
                v.split_whitespace().collect::<Vec<_>>() == ["install", "ok", "not-installed"]
            });
            if !selected {
                return Ok(Some("it is in the database already".into()));
            }
        }

        // Its control members.
        let control = ex.dir.join("control");
        let mut members = Vec::new();
        for (m, _) in ex.control_members() {
            if m.contains('/') || !fs::symlink_metadata(control.join(m))?.is_file() {
                return Ok(Some(format!("its control member {m} is not a plain file")));
            }
            members.push(m.to_owned());
        }
        if members.iter().any(|m| m == "preinst") {
            if !self.runs_preinsts {
                return Ok(Some("it has a preinst".into()));
            }
            let script = fs::read(control.join("preinst"))?;
            let calls = |tool: &str| script.windows(tool.len()).any(|w| w == tool.as_bytes());
            if let Some(tool) = DATABASE_WRITERS.iter().find(|t| calls(t)) {
                return Ok(Some(format!("its preinst calls {tool}")));
            }
        }
        if !members.iter().any(|m| m == "md5sums") {
            return Ok(Some("it has no md5sums".into()));
        }
        let text = fs::read_to_string(control.join("control"))?;
        if field(&text, "Package").as_deref() != Some(name) {
            return Ok(Some("its control names another package".into()));
        }
        for conffile in conffiles(ex)? {
            if !conffile.starts_with('/') {
                return Ok(Some(format!("its conffile line {conffile:?} has flags")));
            }
            // dpkg puts a conffile's `.dpkg-new` beside what a symlink there points to.
            if !ex.listed.contains(&(conffile.clone(), Listed::File)) {
                return Ok(Some(format!(
                    "its conffile {conffile} is not a file it holds"
                )));
            }
        }
        for (kind, trigger) in match activations(ex) {
            Ok(a) => a,
            Err(line) => return Ok(Some(format!("its triggers line {line:?}"))),
        } {
            // A configured package interested in it records it as pending; dpkg would also
            // have the activating package await it, unless `noawait`.
            for p in self.interested(&trigger) {
                let Some(s) = self.status.iter().find(|s| s.name == p) else {
                    continue;
                };
                if !self.takes_triggers(&p) {
                    continue;
                }
                if kind != "activate-noawait" {
                    return Ok(Some(format!("it activates {trigger}, which {p} awaits")));
                }
                match s.field("Triggers-Pending") {
                    None => {}
                    Some(v) if v.split_whitespace().any(|t| t == trigger) => {}
                    Some(_) => {
                        return Ok(Some(format!("{p} has other triggers pending")));
                    }
                }
            }
        }

        // Conflicts and breaks, either way, that may hold against anything in the database
        // (by name and version; through a virtual package, whatever the version).
        let ours = match Relations::of(&text) {
            Some(r) if r.version.is_some() => r,
            _ => {
                return Ok(Some(
                    "its Version is missing, or its relations do not parse".into(),
                ))
            }
        };
        // Only selected: nothing to conflict with.
        for s in self.status.iter().filter(|s| s.state != "not-installed") {
            let Some(theirs) = &s.relations else {
                return Ok(Some(format!("{}'s relations do not parse", s.name)));
            };
            for f in ["Conflicts", "Breaks"] {
                if let Some(d) = ours.against(f, &s.name, theirs) {
                    return Ok(Some(format!("its {f} ({d}) may hold against {}", s.name)));
                }
                if let Some(d) = theirs.against(f, name, &ours) {
                    return Ok(Some(format!("{}'s {f} ({d}) may hold against it", s.name)));
                }
            }
        }

        // Its files: its own, as the extraction left them; or, not laid out yet, new to the
        // tree but for directories.
        let paths: HashSet<&str> = ex.listed.iter().map(|(p, _)| p.as_str()).collect();
        let mut new_dirs: HashSet<&str> = HashSet::new();
        for entry in ex.entries() {
            let (path, kind, em) = entry.with_context(|| format!("{name}'s entries"))?;
            if em.uid != 0 || em.gid != 0 || em.caps.is_some() {
                return Ok(Some(format!("{path} is not root's, or has capabilities")));
            }
            if kind == Listed::Hardlink {
                return Ok(Some(format!("{path} is a hardlink")));
            }
            if kind != Listed::Dir {
                if let Some(other) = self.owners.get(path).and_then(|o| o.first()) {
                    return Ok(Some(format!("{other} lists {path} too")));
                }
            }
            let found = match source {
                Source::Extracted { at, .. } => self.extracted_state(path, kind, *at),
                Source::Unpacked(_) => self.new_state(path, kind, &mut new_dirs),
            };
            if let Some(why) = found {
                return Ok(Some(why));
            }
        }
        if !source.laid_out() {
            for c in conffiles(ex)? {
                if self.tree.symlink_metadata(&format!("{c}.dpkg-new")).is_ok() {
                    return Ok(Some(format!("{c}.dpkg-new is there already")));
                }
            }
        }
        // A diversion changes where dpkg puts the path it diverts, and refuses the path it
        // diverts to (it names both exactly, never a directory above them).
        if let Some(p) = self.diverted.iter().find(|p| paths.contains(p.as_str())) {
            return Ok(Some(format!("{p} is diverted, or a diversion's target")));
        }
        // dpkg removes a package all of whose files another unpacks ("disappears" it).
        for (other, list) in &self.lists {
            let mut files = list.iter().filter(|p| *p != "/.").peekable();
            if files.peek().is_some() && files.all(|p| paths.contains(p.as_str())) {
                return Ok(Some(format!("it holds every file of {other}")));
            }
        }
        for (interest, p) in &self.file_interests {
            if !self.takes_triggers(p) {
                continue;
            }
            let prefix = format!("{interest}/");
            if paths
                .iter()
                .any(|path| *path == interest || path.starts_with(&prefix))
            {
                return Ok(Some(format!("{p} awaits triggers on {interest}")));
            }
        }
        Ok(None)
    }

    /// Why the path of an entry laid out by the extraction is not as it left it, if it is not.
    fn extracted_state(&self, path: &str, kind: Listed, at: (i64, i64)) -> Option<String> {
        if kind == Listed::Dir {
            return (!self.tree.metadata(path).is_ok_and(|m| m.is_dir()))
                .then(|| format!("{path} is no longer a directory"));
        }
        let Ok(md) = self.tree.symlink_metadata(path) else {
            return Some(format!("{path} is gone"));
        };
        let same_kind = match kind {
            Listed::File => md.is_file() && md.nlink() == 1,
            Listed::Symlink => md.file_type().is_symlink(),
            Listed::Hardlink | Listed::Dir => false,
        };
        if !same_kind {
            return Some(format!("{path} is a hardlink or not what its tar says"));
        }
        ((md.ctime(), md.ctime_nsec()) >= at)
            .then(|| format!("{path} changed after the extraction"))
    }

    /// Why an entry not laid out yet cannot simply be made at its path, if it cannot: only a
    /// directory may be there already (or a symlink to one, for a directory), and its parent
    /// must be a directory, or one of the package's own made before it (`new_dirs`).
    fn new_state<'p>(
        &self,
        path: &'p str,
        kind: Listed,
        new_dirs: &mut HashSet<&'p str>,
    ) -> Option<String> {
        let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
        let parent_ok = parent.is_empty()
            || new_dirs.contains(parent)
            || self.tree.metadata(parent).is_ok_and(|m| m.is_dir());
        if !parent_ok {
            return Some(format!("the directory above {path} is not there"));
        }
        match self.tree.symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if kind == Listed::Dir {
                    new_dirs.insert(path);
                }
                None
            }
            Err(e) => Some(format!("{path}: {e}")),
            Ok(_) if kind == Listed::Dir && self.tree.metadata(path).is_ok_and(|m| m.is_dir()) => {
                None
            }
            Ok(_) => Some(format!("{path} is there already")),
        }
    }

    /// Run the preinst of `name` as `dpkg --unpack` runs it before laying the package out
    /// ([`Db::why_not`] said nothing stands in the way): the control members in
    /// `var/lib/dpkg/tmp.ci/`, the package half-installed in the status file (the stanza
    /// dpkg's journal has then: the control's Priority, Section, Architecture, Multi-Arch and
    /// Version), then `tmp.ci/preinst install` by `run` with dpkg's variables. Then the
    /// database is read again; the preinst must have left it as it was but for diversions (no stat
    /// override, trigger or journal entry: dpkg would go on differently) and nothing in the
    /// way of recording the package, as before. It cannot be handed to dpkg now (its preinst
    /// would run twice): anything else is an error that names what the preinst changed.
    fn run_preinst(
        mut self,
        name: &str,
        ex: &Extracted,
        source: &Source,
        run: RunPreinst,
    ) -> anyhow::Result<Db> {
        let text = fs::read_to_string(ex.dir.join("control/control"))?;
        let running = self
            .status
            .iter()
            .find(|s| s.name == "dpkg")
            .and_then(|s| s.field("Version"))
            .context("dpkg is not in the database, to run a preinst as it would")?;
        let cidir = admin("tmp.ci");
        anyhow::ensure!(
            self.tree.symlink_metadata(&cidir).is_err(),
            "{cidir} is there already"
        );
        self.tree.create_dir_all(&cidir)?;
        let members: Vec<(&str, &EntryMeta)> = ex.control_members().collect();
        for (m, em) in &members {
            let bytes = fs::read(ex.dir.join("control").join(m))?;
            self.write_entry(&format!("{cidir}/{m}"), &bytes, em)?;
        }
        let mut stanza = format!("Package: {name}\nStatus: install reinstreq half-installed");
        for f in [
            "Priority",
            "Section",
            "Architecture",
            "Multi-Arch",
            "Version",
        ] {
            match field(&text, f) {
                Some(v) if !(f == "Multi-Arch" && v == "no") => {
                    stanza.push_str(&format!("\n{f}: {v}"))
                }
                _ => {}
            }
        }
        self.status.retain(|s| s.name != name);
        self.status.push(Stanza::new(name.to_owned(), stanza));
        self.dirty = true;
        self.write_status()?;
        let read_status = |tree: &InRoot| tree.read_to_string(&admin("status"));
        let before = read_status(&self.tree)?;
        let arch = field(&text, "Architecture").unwrap_or_default();
        let env: Vec<(String, String)> = [
            ("DPKG_ADMINDIR", "/var/lib/dpkg"),
            ("DPKG_ROOT", ""),
            ("DPKG_MAINTSCRIPT_PACKAGE", name),
            ("DPKG_MAINTSCRIPT_PACKAGE_REFCOUNT", "1"),
            ("DPKG_MAINTSCRIPT_ARCH", &arch),
            ("DPKG_MAINTSCRIPT_NAME", "preinst"),
            ("DPKG_MAINTSCRIPT_DEBUG", "0"),
            ("DPKG_RUNNING_VERSION", &running),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
        run(name, &env).with_context(|| format!("the preinst of {name}"))?;

        let mut after = Db::read(&self.root)?;
        after.runs_preinsts = self.runs_preinsts;
        // Its half-installed stanza is the recorded one's to replace.
        after.status.retain(|s| s.name != name);
        // Diversions it added are the database's now, and asked about again below.
        let changed = if read_status(&after.tree)? != before {
            Some("dpkg's status".to_owned())
        } else if let Some(why) = &after.blocked {
            Some(why.clone())
        } else {
            after.why_not(name, ex, source)?
        };
        if let Some(what) = changed {
            anyhow::bail!(
                "the preinst of {name}, run as dpkg runs it before laying the package out, \
                 left what stops configure recording the unpack ({what}), and dpkg cannot \
                 unpack it now without running its preinst again"
            );
        }
        for (m, _) in &members {
            after.tree.remove_file(&format!("{cidir}/{m}"))?;
        }
        after.tree.remove_dir(&cidir)?;
        Ok(after)
    }

    /// Record `name` as `dpkg --unpack` would (see the module); [`Db::why_not`] said nothing
    /// stands in the way.
    fn record(&mut self, name: &str, ex: &Extracted, source: &Source) -> anyhow::Result<()> {
        let control = ex.dir.join("control");
        let text = fs::read_to_string(control.join("control"))?;
        let meta = |key: &str| {
            ex.meta
                .entries
                .get(key)
                .with_context(|| format!("no metadata for {key}"))
        };
        let conffiles = conffiles(ex)?;
        if source.laid_out() {
            // The files, as dpkg writes them again: with their tar entries' times, and each
            // renamed over from NAME.dpkg-new, which moves its directory's time to now; a
            // symlink to a directory that is there already is left alone.
            let mut touched = HashSet::new();
            for (path, kind) in &ex.listed {
                let left_alone = match kind {
                    Listed::Dir => true,
                    Listed::Symlink => self.tree.metadata(path).is_ok_and(|m| m.is_dir()),
                    _ => false,
                };
                if path != "/." && !left_alone {
                    let leaf = self.tree.leaf(path)?;
                    sandbox::set_entry_mtime(&leaf.path, meta(&format!("data{path}"))?.mtime)?;
                    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
                    if touched.insert(dir) {
                        self.tree
                            .touch_dir(dir)
                            .with_context(|| format!("touching {dir}/"))?;
                    }
                }
            }
        } else {
            self.lay_out(ex, &conffiles)?;
        }
        // Conffiles (laid out already) wait beside the installed ones for `dpkg --configure`.
        for c in conffiles.iter().filter(|_| source.laid_out()) {
            let bytes = self.tree.read(c).with_context(|| format!("reading {c}"))?;
            let new = format!("{c}.dpkg-new");
            self.write_entry(&new, &bytes, meta(&format!("data{c}"))?)?;
        }
        // The control members, as `info/PACKAGE[:ARCH].MEMBER`.
        let arch = field(&text, "Architecture").unwrap_or_default();
        let info_name = if field(&text, "Multi-Arch").as_deref() == Some("same") {
            format!("{name}:{arch}")
        } else {
            name.to_owned()
        };
        for (m, em) in ex.control_members() {
            if m == "control" || m == "list" || m.contains('.') {
                continue;
            }
            let to = admin(&format!("info/{info_name}.{m}"));
            self.write_entry(&to, &fs::read(control.join(m))?, em)?;
        }
        let list: String = ex.listed.iter().map(|(p, _)| format!("{p}\n")).collect();
        self.tree
            .replace_file(
                &admin(&format!("info/{info_name}.list")),
                list.as_bytes(),
                0o644,
            )
            .context("writing its file list")?;

        // The triggers it activates, pending for the configured packages interested.
        for (_, trigger) in activations(ex).map_err(|l| anyhow::anyhow!("triggers line {l:?}"))? {
            for p in self.interested(&trigger) {
                if self.takes_triggers(&p) {
                    self.note_pending(&p, &trigger);
                }
            }
        }
        // The stanza: the control's fields, unpacked, its conffiles new.
        let mut stanza = String::new();
        for line in text.trim_end_matches('\n').lines() {
            stanza.push_str(line);
            stanza.push('\n');
            if line.starts_with("Package:") {
                stanza.push_str("Status: install ok unpacked\n");
            }
        }
        if !conffiles.is_empty() {
            stanza.push_str("Conffiles:\n");
            for c in &conffiles {
                stanza.push_str(&format!(" {c} newconffile\n"));
            }
        }
        let paths: Vec<String> = ex.listed.iter().map(|(p, _)| p.clone()).collect();
        for p in &paths {
            self.owners
                .entry(p.clone())
                .or_default()
                .push(name.to_owned());
        }
        self.lists.insert(name.to_owned(), paths);
        // Its selection, if it had one, becomes the stanza.
        self.status.retain(|s| s.name != name);
        self.status.push(Stanza::new(
            name.to_owned(),
            stanza.trim_end_matches('\n').to_owned(),
        ));
        self.dirty = true;
        Ok(())
    }

    /// Make `rel` a file holding `bytes`, with the owner, mode and time of `em`, in place of
    /// whatever is there.
    fn write_entry(&self, rel: &str, bytes: &[u8], em: &EntryMeta) -> anyhow::Result<()> {
        self.tree
            .replace_file(rel, bytes, em.mode)
            .with_context(|| format!("writing {rel}"))?;
        let leaf = self.tree.leaf(rel)?;
        sandbox::apply_meta(&leaf.path, em)?;
        sandbox::set_entry_mtime(&leaf.path, em.mtime)?;
        Ok(())
    }

    /// Lay out the entries of `ex`, unpacked beside the tree, as dpkg unpacks a package new
    /// to it ([`Db::why_not`] found only directories there): directories made (those there
    /// already left alone), files and symlinks moved in — a conffile as `PATH.dpkg-new` —
    /// each with its tar entry's owner, mode and time, in the tar's order.
    fn lay_out(&self, ex: &Extracted, conffiles: &[String]) -> anyhow::Result<()> {
        for entry in ex.entries() {
            let (path, kind, em) = entry?;
            // The entry's name, in its parent resolved within the tree.
            let to = match kind {
                Listed::File | Listed::Symlink if conffiles.iter().any(|c| c == path) => {
                    self.tree.leaf(&format!("{path}.dpkg-new"))?
                }
                _ => self.tree.leaf(path)?,
            };
            let to = &to.path;
            match kind {
                Listed::Dir => {
                    if fs::symlink_metadata(to).is_ok() {
                        continue;
                    }
                    fs::create_dir(to).with_context(|| format!("mkdir {path}"))?;
                }
                Listed::File | Listed::Symlink => {
                    let from = ex.dir.join("data").join(&path[1..]);
                    fs::rename(&from, to)
                        .with_context(|| format!("moving {} to {path}", from.display()))?;
                }
                Listed::Hardlink => anyhow::bail!("{path}: a hardlink is left to dpkg"),
            }
            sandbox::apply_meta(to, em)?;
            sandbox::set_entry_mtime(to, em.mtime)?;
        }
        Ok(())
    }

    /// The packages `triggers/TRIGGER` names as interested.
    fn interested(&self, trigger: &str) -> Vec<String> {
        self.tree
            .read_to_string(&admin(&format!("triggers/{trigger}")))
            .unwrap_or_default()
            .lines()
            .map(package_of)
            .collect()
    }

    /// `trigger` pending for `name`, as dpkg's `trig_note_pend` records it: added to its
    /// Triggers-Pending (which [`Db::why_not`] found empty, or holding it already), its state
    /// triggers-awaited if it awaits triggers itself, else triggers-pending.
    fn note_pending(&mut self, name: &str, trigger: &str) {
        let Some(s) = self.status.iter_mut().find(|s| s.name == name) else {
            return;
        };
        if s.field("Triggers-Pending").is_some() {
            return;
        }
        let state = if s.field("Triggers-Awaited").is_some() {
            "triggers-awaited"
        } else {
            "triggers-pending"
        };
        let mut text = String::new();
        for line in s.text.lines() {
            match line.strip_prefix("Status:") {
                Some(v) if !line.starts_with([' ', '\t']) => {
                    let words: Vec<&str> = v.split_whitespace().collect();
                    let (want, eflag) = (words.first().copied(), words.get(1).copied());
                    text.push_str(&format!(
                        "Status: {} {} {state}\n",
                        want.unwrap_or("install"),
                        eflag.unwrap_or("ok")
                    ));
                }
                _ => {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text.push_str(&format!("Triggers-Pending: {trigger}"));
        s.text = text;
        s.state = state.to_owned();
        self.dirty = true;
    }

    /// Write the status file if a package was recorded since it was read.
    fn write_status(&mut self) -> anyhow::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let text: String = self
            .status
            .iter()
            .map(|s| format!("{}\n\n", s.text))
            .collect();
        self.tree
            .replace_file(&admin("status"), text.as_bytes(), 0o644)
            .context("writing dpkg's status")?;
        self.dirty = false;
        Ok(())
    }
}

/// Whether the package has a preinst.
fn has_preinst(ex: &Extracted) -> bool {
    ex.meta.entries.contains_key("control/preinst")
}

/// The triggers a package's `triggers` member activates (`activate`, `activate-await`,
/// `activate-noawait`, and the trigger's name), or the first line that does anything else
/// (an interest, a file trigger).
fn activations(ex: &Extracted) -> Result<Vec<(String, String)>, String> {
    let Ok(text) = fs::read_to_string(ex.dir.join("control/triggers")) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(kind @ ("activate" | "activate-await" | "activate-noawait")), Some(t), None)
                if !t.starts_with('/') =>
            {
                out.push((kind.to_owned(), t.to_owned()))
            }
            _ => return Err(line.to_owned()),
        }
    }
    Ok(out)
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

/// What in the database or dpkg's configuration changes how dpkg lays out any package, if
/// anything does.
fn blocked(tree: &InRoot) -> Option<String> {
    for (file, what) in [
        ("statoverride", "stat overrides"),
        ("triggers/Unincorp", "triggers not yet incorporated"),
    ] {
        if tree.metadata(&admin(file)).is_ok_and(|m| m.len() > 0) {
            return Some(format!("the database has {what}"));
        }
    }
    if tree
        .read_dir(&admin("updates"))
        .is_ok_and(|d| !d.is_empty())
    {
        return Some("dpkg's journal is not empty".into());
    }
    filters_paths(tree).then(|| "dpkg's configuration filters paths".into())
}

/// Whether dpkg's configuration in the tree (`/etc/dpkg/dpkg.cfg`, `dpkg.cfg.d/`, root's
/// `~/.dpkg.cfg`) filters paths (`path-exclude`, `path-include`), or cannot be read.
fn filters_paths(tree: &InRoot) -> bool {
    let mut files = vec!["etc/dpkg/dpkg.cfg".to_owned(), "root/.dpkg.cfg".to_owned()];
    match tree.read_dir("etc/dpkg/dpkg.cfg.d") {
        Ok(names) => files.extend(
            names
                .iter()
                .map(|n| format!("etc/dpkg/dpkg.cfg.d/{}", n.to_string_lossy())),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return true,
    }
    files.iter().any(|f| match tree.read_to_string(f) {
        Ok(t) => t.contains("path-exclude") || t.contains("path-include"),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with an empty dpkg database, and a package `hello` extracted into it: a
    /// directory, a file, a conffile and a symlink, with a control, md5sums and conffiles.
    fn setup(t: &Path) -> (PathBuf, Extracted, (i64, i64)) {
        let root = t.join("root");
        for d in [
            "var/lib/dpkg/info",
            "var/lib/dpkg/triggers",
            "var/lib/dpkg/updates",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(
            root.join("var/lib/dpkg/status"),
            "Package: dpkg\nStatus: install ok installed\nVersion: 1.22\n\n",
        )
        .unwrap();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("usr/bin/hello"), "#!/bin/sh\n").unwrap();
        fs::write(root.join("etc/hello.conf"), "greeting=hi\n").unwrap();
        std::os::unix::fs::symlink("hello", root.join("usr/bin/hi")).unwrap();

        let dir = t.join("hello");
        fs::create_dir_all(dir.join("control")).unwrap();
        fs::write(
            dir.join("control/control"),
            "Package: hello\nVersion: 1.0-1\nArchitecture: amd64\nDescription: greets\n more\n",
        )
        .unwrap();
        fs::write(dir.join("control/md5sums"), "0123  usr/bin/hello\n").unwrap();
        fs::write(dir.join("control/conffiles"), "/etc/hello.conf\n").unwrap();
        let mut meta = TreeMeta::default();
        let file = |mode| EntryMeta::root(mode, 1_600_000_000);
        for (k, m) in [
            ("control/control", 0o644),
            ("control/md5sums", 0o644),
            ("control/conffiles", 0o644),
            ("data/usr", 0o755),
            ("data/usr/bin", 0o755),
            ("data/usr/bin/hello", 0o755),
            ("data/usr/bin/hi", 0o777),
            ("data/etc", 0o755),
            ("data/etc/hello.conf", 0o644),
        ] {
            meta.entries.insert(k.into(), file(m));
        }
        let listed = [
            ("/.", Listed::Dir),
            ("/usr", Listed::Dir),
            ("/usr/bin", Listed::Dir),
            ("/usr/bin/hello", Listed::File),
            ("/usr/bin/hi", Listed::Symlink),
            ("/etc", Listed::Dir),
            ("/etc/hello.conf", Listed::File),
        ]
        .map(|(p, k)| (p.to_owned(), k))
        .to_vec();
        let marker = t.join("marker");
        // The extraction is over once the marker's change time has moved on.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&marker, "").unwrap();
        let md = fs::metadata(&marker).unwrap();
        (
            root,
            Extracted { dir, meta, listed },
            (md.ctime(), md.ctime_nsec()),
        )
    }

    #[test]
    fn a_package_is_recorded_as_dpkg_unpack_records_it() {
        let t = tempfile::tempdir().unwrap();
        let (root, ex, at) = setup(t.path());
        // As the extraction may leave a directory: with a time of its own, from a tar.
        for dir in ["usr/bin", "etc"] {
            sandbox::set_entry_mtime(&root.join(dir), 1_500_000_000).unwrap();
        }
        let mut db = Db::read(&root).unwrap();
        let kept = HashMap::new();
        let source = Source::Extracted { kept: &kept, at };
        assert_eq!(db.why_not("hello", &ex, &source).unwrap(), None);
        db.record("hello", &ex, &source).unwrap();
        db.write_status().unwrap();

        let info = root.join("var/lib/dpkg/info");
        // The list in the tar's order, the control members but `control` beside it.
        assert_eq!(
            fs::read_to_string(info.join("hello.list")).unwrap(),
            "/.\n/usr\n/usr/bin\n/usr/bin/hello\n/usr/bin/hi\n/etc\n/etc/hello.conf\n"
        );
        assert_eq!(
            fs::read_to_string(info.join("hello.md5sums")).unwrap(),
            "0123  usr/bin/hello\n"
        );
        assert!(info.join("hello.conffiles").exists());
        assert!(!info.join("hello.control").exists());
        // The conffile waits as .dpkg-new, the installed one untouched.
        assert_eq!(
            fs::read_to_string(root.join("etc/hello.conf.dpkg-new")).unwrap(),
            "greeting=hi\n"
        );
        // Files get their tar entries' times; their directories the time of the rename.
        let md = fs::symlink_metadata(root.join("usr/bin/hello")).unwrap();
        assert_eq!(md.mtime(), 1_600_000_000);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        for dir in ["usr/bin", "etc"] {
            let m = fs::metadata(root.join(dir)).unwrap().mtime();
            assert!((now - 60..=now + 1).contains(&m), "{dir}: {m}");
        }
        // The stanza: unpacked, its conffile new, after what was there.
        let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
        assert_eq!(
            status,
            "Package: dpkg\nStatus: install ok installed\nVersion: 1.22\n\n\
             Package: hello\nStatus: install ok unpacked\nVersion: 1.0-1\nArchitecture: amd64\n\
             Description: greets\n more\nConffiles:\n /etc/hello.conf newconffile\n\n"
        );
        // Once recorded, it is in the database: not recorded again.
        let db = Db::read(&root).unwrap();
        assert_eq!(
            db.why_not("hello", &ex, &source).unwrap().as_deref(),
            Some("it is in the database already")
        );
    }

    /// `hello` with a preinst holding `script`.
    fn with_preinst(ex: &mut Extracted, script: &str) {
        fs::write(ex.dir.join("control/preinst"), script).unwrap();
        ex.meta.entries.insert(
            "control/preinst".into(),
            EntryMeta::root(0o755, 1_600_000_000),
        );
    }

    /// `unpack` of `hello` alone (extracted), its preinst run by `run`; dpkg never.
    fn unpack_hello(
        root: &Path,
        ex: Extracted,
        at: (i64, i64),
        run: RunPreinst,
    ) -> anyhow::Result<()> {
        let kept = HashMap::from([("hello".to_owned(), ex)]);
        unpack(
            root,
            "the test set",
            &["hello"],
            &Source::Extracted { kept: &kept, at },
            &|names| panic!("dpkg was asked to unpack {names:?}"),
            Some(run),
            &|_| {},
        )
    }

    /// A package with a preinst is recorded once its preinst ran as dpkg runs it: from the
    /// control members in `tmp.ci`, the package half-installed in the status file, with
    /// dpkg's variables; `tmp.ci` is gone after.
    #[test]
    fn a_preinst_runs_as_dpkg_runs_it_then_the_package_is_recorded() {
        let t = tempfile::tempdir().unwrap();
        let (root, mut ex, at) = setup(t.path());
        with_preinst(&mut ex, "#!/bin/sh\necho hi\n");
        let ran = std::cell::RefCell::new(Vec::new());
        let run = |name: &str, env: &[(String, String)]| -> anyhow::Result<()> {
            let ci = root.join("var/lib/dpkg/tmp.ci");
            assert_eq!(
                fs::read_to_string(ci.join("preinst")).unwrap(),
                "#!/bin/sh\necho hi\n"
            );
            assert!(ci.join("control").is_file() && ci.join("conffiles").is_file());
            let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
            assert!(
                status.ends_with(
                    "Package: hello\nStatus: install reinstreq half-installed\n\
                     Architecture: amd64\nVersion: 1.0-1\n\n"
                ),
                "{status}"
            );
            // What the script does to the tree stays.
            fs::write(root.join("etc/made-by-preinst"), "x").unwrap();
            ran.borrow_mut().push((name.to_owned(), env.to_vec()));
            Ok(())
        };
        unpack_hello(&root, ex, at, &run).unwrap();
        let ran = ran.into_inner();
        assert_eq!(ran.len(), 1);
        let env: HashMap<_, _> = ran[0].1.iter().cloned().collect();
        for (k, v) in [
            ("DPKG_MAINTSCRIPT_PACKAGE", "hello"),
            ("DPKG_MAINTSCRIPT_NAME", "preinst"),
            ("DPKG_MAINTSCRIPT_ARCH", "amd64"),
            ("DPKG_MAINTSCRIPT_PACKAGE_REFCOUNT", "1"),
            ("DPKG_MAINTSCRIPT_DEBUG", "0"),
            ("DPKG_RUNNING_VERSION", "1.22"),
            ("DPKG_ADMINDIR", "/var/lib/dpkg"),
            ("DPKG_ROOT", ""),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert!(!root.join("var/lib/dpkg/tmp.ci").exists());
        assert!(root.join("etc/made-by-preinst").exists());
        let info = root.join("var/lib/dpkg/info");
        assert_eq!(
            fs::read_to_string(info.join("hello.preinst")).unwrap(),
            "#!/bin/sh\necho hi\n"
        );
        let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
        assert!(
            status.contains("Package: hello\nStatus: install ok unpacked\n"),
            "{status}"
        );
        assert!(!status.contains("half-installed"), "{status}");
    }

    /// A preinst that leaves what stops the recording (a diversion of one of the package's
    /// paths, a change to its own files, a stat override, a change to the status) is an
    /// error: dpkg would run it twice now. A diversion of another path is not.
    #[test]
    fn a_preinst_that_changes_what_the_recording_needs_is_an_error() {
        let diversion = |path: &str| format!("{path}\n{path}.usr-is-merged\n:\n");
        for (what, file, bytes) in [
            (
                "/usr/bin/hello is diverted",
                "var/lib/dpkg/diversions",
                diversion("/usr/bin/hello"),
            ),
            (
                "/usr/bin/hello changed after the extraction",
                "usr/bin/hello",
                "x".to_owned(),
            ),
            (
                "stat overrides",
                "var/lib/dpkg/statoverride",
                "root root 0755 /x\n".to_owned(),
            ),
            (
                "dpkg's status",
                "var/lib/dpkg/status",
                "Package: dpkg\nStatus: install ok installed\nVersion: 1.22\n\n".to_owned(),
            ),
        ] {
            let t = tempfile::tempdir().unwrap();
            let (root, mut ex, at) = setup(t.path());
            with_preinst(&mut ex, "#!/bin/sh\n");
            let run = |_: &str, _: &[(String, String)]| -> anyhow::Result<()> {
                fs::write(root.join(file), &bytes).unwrap();
                Ok(())
            };
            let e = format!("{:#}", unpack_hello(&root, ex, at, &run).unwrap_err());
            assert!(e.contains(what) && e.contains("preinst of hello"), "{e}");
        }
        // A diversion of a path it does not hold, as trixie's /usr-move mitigations add.
        let t = tempfile::tempdir().unwrap();
        let (root, mut ex, at) = setup(t.path());
        with_preinst(
            &mut ex,
            "#!/bin/sh\ndpkg-divert --no-rename --add /bin/hello\n",
        );
        let run = |_: &str, _: &[(String, String)]| -> anyhow::Result<()> {
            let d = root.join("var/lib/dpkg/diversions");
            fs::write(d, diversion("/bin/hello")).unwrap();
            Ok(())
        };
        unpack_hello(&root, ex, at, &run).unwrap();
        let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
        assert!(
            status.contains("Package: hello\nStatus: install ok unpacked\n"),
            "{status}"
        );
    }

    #[test]
    fn whatever_dpkg_would_do_more_for_leaves_the_package_to_dpkg() {
        let reason = |change: &dyn Fn(&Path, &mut Extracted)| {
            let t = tempfile::tempdir().unwrap();
            let (root, mut ex, at) = setup(t.path());
            change(&root, &mut ex);
            let kept = HashMap::new();
            let source = Source::Extracted { kept: &kept, at };
            Db::read(&root)
                .unwrap()
                .why_not("hello", &ex, &source)
                .unwrap()
        };
        let has = |r: Option<String>, what: &str| {
            let r = r.expect("left to dpkg");
            assert!(r.contains(what), "{r:?} should say {what:?}");
        };
        // A file changed after the extraction.
        has(
            reason(&|root, _| fs::write(root.join("usr/bin/hello"), "x").unwrap()),
            "/usr/bin/hello changed after the extraction",
        );
        // A preinst, where none can be run here.
        has(
            reason(&|_, ex| with_preinst(ex, "#!/bin/sh\n")),
            "it has a preinst",
        );
        // One that writes dpkg's database, where preinsts can be run.
        for tool in DATABASE_WRITERS {
            let t = tempfile::tempdir().unwrap();
            let (root, mut ex, at) = setup(t.path());
            with_preinst(&mut ex, &format!("#!/bin/sh\n{tool} --add /x\n"));
            let kept = HashMap::new();
            let mut db = Db::read(&root).unwrap();
            db.runs_preinsts = true;
            let source = Source::Extracted { kept: &kept, at };
            has(
                db.why_not("hello", &ex, &source).unwrap(),
                &format!("its preinst calls {tool}"),
            );
        }
        // A diversion of one of its files.
        has(
            reason(&|root, _| {
                fs::write(
                    root.join("var/lib/dpkg/diversions"),
                    "/usr/bin/hello\n/usr/bin/hello.real\nother\n",
                )
                .unwrap()
            }),
            "/usr/bin/hello is diverted",
        );
        // Another package lists one of its files.
        has(
            reason(&|root, _| {
                fs::write(
                    root.join("var/lib/dpkg/info/other.list"),
                    "/.\n/usr/bin/hi\n",
                )
                .unwrap()
            }),
            "other lists /usr/bin/hi too",
        );
        // An installed package breaks this version; one that breaks only older ones does not.
        let breaks = |v: &'static str| {
            move |root: &Path, _: &mut Extracted| {
                fs::write(
                    root.join("var/lib/dpkg/status"),
                    format!(
                        "Package: dpkg\nStatus: install ok installed\nVersion: 1.22\nBreaks: hello (<< {v})\n\n"
                    ),
                )
                .unwrap()
            }
        };
        has(reason(&breaks("2.0")), "dpkg's Breaks (hello (<< 2.0))");
        assert_eq!(reason(&breaks("1.0")), None);
        // Through what it provides: a versioned provide by its version, an unversioned one
        // whatever the relation's.
        let provides = |p: &'static str| {
            move |root: &Path, ex: &mut Extracted| {
                breaks("0")(root, ex);
                fs::write(
                    root.join("var/lib/dpkg/status"),
                    "Package: dpkg\nStatus: install ok installed\nVersion: 1.22\nConflicts: greeter (<< 2)\n\n",
                )
                .unwrap();
                let control = ex.dir.join("control/control");
                let text = fs::read_to_string(&control).unwrap();
                fs::write(&control, format!("{text}Provides: {p}\n")).unwrap();
            }
        };
        has(
            reason(&provides("greeter (= 1.5)")),
            "dpkg's Conflicts (greeter (<< 2))",
        );
        assert_eq!(reason(&provides("greeter (= 3)")), None);
        has(
            reason(&provides("greeter")),
            "dpkg's Conflicts (greeter (<< 2))",
        );
        // An installed package is interested in a trigger it activates, awaiting it.
        has(
            reason(&|root, ex| {
                fs::write(ex.dir.join("control/triggers"), "activate ldconfig\n").unwrap();
                fs::write(root.join("var/lib/dpkg/triggers/ldconfig"), "dpkg\n").unwrap();
            }),
            "it activates ldconfig, which dpkg awaits",
        );
        // A trigger interest of its own.
        has(
            reason(&|_, ex| {
                fs::write(ex.dir.join("control/triggers"), "interest /usr/share/x\n").unwrap()
            }),
            "its triggers line",
        );
    }

    /// `hello` not laid out yet: its tree beside the root, the root without its files, and
    /// libc-bin configured, interested in the ldconfig trigger hello activates.
    fn setup_unpacked(t: &Path) -> (PathBuf, Extracted) {
        let (root, ex, _) = setup(t);
        for f in ["usr/bin/hello", "usr/bin/hi", "etc/hello.conf"] {
            let from = root.join(f);
            let to = ex.dir.join("data").join(f);
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::rename(from, to).unwrap();
        }
        fs::write(
            root.join("var/lib/dpkg/status"),
            "Package: libc-bin\nStatus: install ok installed\nVersion: 2.41\n\n\
             Package: hello\nStatus: install ok not-installed\n\n",
        )
        .unwrap();
        fs::write(root.join("var/lib/dpkg/triggers/ldconfig"), "libc-bin\n").unwrap();
        fs::write(
            ex.dir.join("control/triggers"),
            "activate-noawait ldconfig\n",
        )
        .unwrap();
        (root, ex)
    }

    #[test]
    fn a_package_not_laid_out_is_moved_in_and_its_trigger_left_pending() {
        let t = tempfile::tempdir().unwrap();
        let (root, ex) = setup_unpacked(t.path());
        let take = |_: &str| None;
        let source = Source::Unpacked(&take);
        let mut db = Db::read(&root).unwrap();
        assert_eq!(db.why_not("hello", &ex, &source).unwrap(), None);
        db.record("hello", &ex, &source).unwrap();
        db.write_status().unwrap();

        // Files and symlinks moved in; the conffile only as .dpkg-new.
        assert_eq!(
            fs::read_to_string(root.join("usr/bin/hello")).unwrap(),
            "#!/bin/sh\n"
        );
        assert_eq!(
            fs::read_link(root.join("usr/bin/hi")).unwrap(),
            Path::new("hello")
        );
        assert!(!root.join("etc/hello.conf").exists());
        assert_eq!(
            fs::read_to_string(root.join("etc/hello.conf.dpkg-new")).unwrap(),
            "greeting=hi\n"
        );
        assert!(!ex.dir.join("data/usr/bin/hello").exists());
        let md = fs::symlink_metadata(root.join("usr/bin/hi")).unwrap();
        assert_eq!(md.mtime(), 1_600_000_000);
        // The selection became the stanza; libc-bin has the trigger pending.
        let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
        assert_eq!(
            status,
            "Package: libc-bin\nStatus: install ok triggers-pending\nVersion: 2.41\n\
             Triggers-Pending: ldconfig\n\n\
             Package: hello\nStatus: install ok unpacked\nVersion: 1.0-1\nArchitecture: amd64\n\
             Description: greets\n more\nConffiles:\n /etc/hello.conf newconffile\n\n"
        );
    }

    #[test]
    fn a_package_not_laid_out_is_left_to_dpkg_where_the_tree_has_its_files() {
        let reason = |change: &dyn Fn(&Path)| {
            let t = tempfile::tempdir().unwrap();
            let (root, ex) = setup_unpacked(t.path());
            change(&root);
            let take = |_: &str| None;
            Db::read(&root)
                .unwrap()
                .why_not("hello", &ex, &Source::Unpacked(&take))
                .unwrap()
        };
        let r = reason(&|root| fs::write(root.join("usr/bin/hello"), "x").unwrap());
        assert_eq!(r.as_deref(), Some("/usr/bin/hello is there already"));
        // A directory it ships, made missing: it makes it; there as a file: dpkg's to sort out.
        let r = reason(&|root| fs::remove_dir(root.join("usr/bin")).unwrap());
        assert_eq!(r, None);
        let r = reason(&|root| {
            fs::remove_dir(root.join("usr/bin")).unwrap();
            fs::write(root.join("usr/bin"), "").unwrap();
        });
        assert_eq!(r.as_deref(), Some("/usr/bin is there already"));
        let r = reason(&|root| fs::write(root.join("etc/hello.conf.dpkg-new"), "").unwrap());
        assert_eq!(
            r.as_deref(),
            Some("/etc/hello.conf.dpkg-new is there already")
        );
        // libc-bin has another trigger pending: dpkg's order of them is dpkg's to keep.
        let r = reason(&|root| {
            let status = root.join("var/lib/dpkg/status");
            let text = fs::read_to_string(&status).unwrap();
            let text = text.replacen(
                "Version: 2.41\n",
                "Version: 2.41\nTriggers-Pending: other\n",
                1,
            );
            fs::write(status, text).unwrap();
        });
        assert_eq!(r.as_deref(), Some("libc-bin has other triggers pending"));
        // Installed already (not only selected).
        let r = reason(&|root| {
            let status = root.join("var/lib/dpkg/status");
            let text = fs::read_to_string(&status).unwrap();
            fs::write(status, text.replace("ok not-installed", "ok unpacked")).unwrap();
        });
        assert_eq!(r.as_deref(), Some("it is in the database already"));
    }

    #[test]
    fn symlinks_scripts_left_resolve_within_the_tree() {
        let t = tempfile::tempdir().unwrap();
        let (root, ex) = setup_unpacked(t.path());
        // `etc` made a symlink climbing out of the tree: in the chroot, `..` stops at its
        // root, so dpkg would write into the tree's own `outside`, and so must this.
        fs::remove_dir(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("etc")).unwrap();
        fs::create_dir(root.join("outside")).unwrap();
        fs::create_dir(t.path().join("outside")).unwrap();
        let take = |_: &str| None;
        let source = Source::Unpacked(&take);
        let mut db = Db::read(&root).unwrap();
        assert_eq!(db.why_not("hello", &ex, &source).unwrap(), None);
        db.record("hello", &ex, &source).unwrap();
        assert!(root.join("outside/hello.conf.dpkg-new").exists());
        assert_eq!(fs::read_dir(t.path().join("outside")).unwrap().count(), 0);
    }
}
