//! dpkg's database as recording an unpack reads and writes it: the status file, the file
//! lists, trigger interests and diversions, and why `dpkg --unpack` of a package would do more
//! than record it.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rbuild_engine::archive::deb::Listed;
use rbuild_engine::sandbox::{self, InRoot};
use rbuild_store::meta::EntryMeta;

use super::{
    activations, conffiles, package_of, triggers, Extracted, RunScript, Source, DATABASE_WRITERS,
};
use crate::debian::packages::{self, field, Dep};
use crate::debian::resolve;

/// One stanza of dpkg's status file.
pub(super) struct Stanza {
    pub(super) name: String,
    /// The third word of `Status:` (`installed`, `unpacked`…).
    pub(super) state: String,
    /// Read once (None if they do not parse): every package looked at is judged against them.
    pub(super) relations: Option<Relations>,
    pub(super) text: String,
}

impl Stanza {
    pub(super) fn new(name: String, text: String) -> Stanza {
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

    pub(super) fn field(&self, name: &str) -> Option<String> {
        field(&self.text, name)
    }
}

/// What Conflicts and Breaks are judged by, of one stanza.
pub(super) struct Relations {
    pub(super) version: Option<String>,
    pub(super) conflicts: Vec<Dep>,
    pub(super) breaks: Vec<Dep>,
    pub(super) provides: Vec<(String, Option<String>)>,
}

impl Relations {
    /// None if a relation field does not parse.
    pub(super) fn of(text: &str) -> Option<Relations> {
        Some(Relations {
            version: field(text, "Version"),
            conflicts: relations(text, "Conflicts")?,
            breaks: relations(text, "Breaks")?,
            provides: provides_of(text)?,
        })
    }

    /// The relation in its Conflicts or Breaks that may hold against package `name` with
    /// relations `other`, if one may.
    pub(super) fn against<'a>(&'a self, f: &str, name: &str, other: &Relations) -> Option<&'a Dep> {
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
pub(super) fn relations(text: &str, name: &str) -> Option<Vec<Dep>> {
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
pub(super) fn provides_of(text: &str) -> Option<Vec<(String, Option<String>)>> {
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
pub(super) fn may_hold(
    dep: &Dep,
    name: &str,
    version: &str,
    provides: &[(String, Option<String>)],
) -> bool {
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

/// The names an inode of a package laid out has, as [`Db::why_not`] counts them.
struct Linked<'a> {
    /// The first of the package's names for it.
    first: &'a str,
    nlink: u64,
    /// The package's names for it, and how many of them its tar has as a file (not a link).
    names: usize,
    files: usize,
    /// Whether one of them is a conffile.
    conffile: bool,
}

/// dpkg's database as far as recording an unpack needs it.
pub(super) struct Db {
    pub(super) root: PathBuf,
    /// The tree, its paths resolved as its chroot resolves them: maintainer scripts have run
    /// in it, and may have left symlinks that lead elsewhere from outside.
    pub(super) tree: InRoot,
    pub(super) status: Vec<Stanza>,
    pub(super) dirty: bool,
    /// Every package's file list, by package name (without an architecture).
    pub(super) lists: HashMap<String, Vec<String>>,
    /// Which packages list each path.
    pub(super) owners: HashMap<String, Vec<String>>,
    /// File trigger interests: (path, package).
    pub(super) file_interests: Vec<(String, String)>,
    /// The paths diversions divert, and those they divert to.
    pub(super) diverted: Vec<String>,
    /// What changes how dpkg lays out any package, if the database or dpkg's configuration
    /// has it (nothing else writes them between two readings).
    pub(super) blocked: Option<String>,
    /// Whether a package's maintainer scripts can be run here (else dpkg unpacks every package
    /// with a preinst, and every package installed already).
    pub(super) runs_scripts: bool,
}

pub(super) const ADMIN: &str = "var/lib/dpkg";

/// The name of package `name` (whose control is `control`) in `info/`: with its architecture
/// if it is `Multi-Arch: same`.
pub(super) fn info_name(name: &str, control: &str) -> String {
    match (
        field(control, "Multi-Arch").as_deref(),
        field(control, "Architecture"),
    ) {
        (Some("same"), Some(arch)) => format!("{name}:{arch}"),
        _ => name.to_owned(),
    }
}

/// `var/lib/dpkg/NAME`.
pub(super) fn admin(name: &str) -> String {
    format!("{ADMIN}/{name}")
}

impl Db {
    pub(super) fn read(root: &Path) -> anyhow::Result<Db> {
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
            runs_scripts: false,
        })
    }

    /// Whether `name` is installed (as its stanza's state says).
    pub(super) fn installed(&self, name: &str) -> bool {
        self.state(name) == "installed"
    }

    pub(super) fn state(&self, name: &str) -> &str {
        self.status
            .iter()
            .find(|s| s.name == name)
            .map_or("not-installed", |s| s.state.as_str())
    }

    /// Whether a package in this state records trigger activations (dpkg's
    /// `trig_record_activation`: triggers-awaited or later).
    pub(super) fn takes_triggers(&self, name: &str) -> bool {
        matches!(
            self.state(name),
            "triggers-awaited" | "triggers-pending" | "installed"
        )
    }

    /// Why `dpkg --unpack` of `name` would do more than record it (None: it would not).
    pub(super) fn why_not(
        &self,
        name: &str,
        ex: &Extracted,
        source: &Source,
    ) -> anyhow::Result<Option<String>> {
        if let Some(why) = &self.blocked {
            return Ok(Some(why.clone()));
        }
        // New to the database, or only selected (`dpkg --set-selections`); or installed, and
        // unpacked again as it is (see [`Db::reinstall`]).
        let mut files_since = None;
        if let Some(s) = self.status.iter().find(|s| s.name == name) {
            let selected = s.field("Status").is_some_and(|v| {
                v.split_whitespace().collect::<Vec<_>>() == ["install", "ok", "not-installed"]
            });
            if !selected {
                match self.why_not_reinstall(s, ex, source)? {
                    Ok(at) => files_since = Some(at),
                    Err(why) => return Ok(Some(why)),
                }
            }
        }
        let reinstall = files_since.is_some();

        // Its control members.
        let control = ex.dir.join("control");
        let mut members = Vec::new();
        for (m, _) in ex.control_members() {
            if m.contains('/') || !fs::symlink_metadata(control.join(m))?.is_file() {
                return Ok(Some(format!("its control member {m} is not a plain file")));
            }
            members.push(m.to_owned());
        }
        // The scripts run here: its preinst; a reinstall's prerm and postrm too (the old
        // package's, which are the same: see [`Db::why_not_reinstall`]).
        let run_here: &[&str] = if reinstall {
            &["preinst", "prerm", "postrm"]
        } else {
            &["preinst"]
        };
        for script in run_here.iter().filter(|m| members.iter().any(|n| n == *m)) {
            if !self.runs_scripts {
                return Ok(Some(format!("it has a {script}")));
            }
            let bytes = fs::read(control.join(script))?;
            let calls = |tool: &str| bytes.windows(tool.len()).any(|w| w == tool.as_bytes());
            if let Some(tool) = DATABASE_WRITERS.iter().find(|t| calls(t)) {
                return Ok(Some(format!("its {script} calls {tool}")));
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
        // Only selected: nothing to conflict with; nor is the package itself (dpkg does not
        // count a package's relations against itself).
        for s in self
            .status
            .iter()
            .filter(|s| s.state != "not-installed" && s.name != name)
        {
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
        let conffile_paths = conffiles(ex)?;
        // Of the files laid out, by inode: how the tree links them.
        let mut inodes: HashMap<(u64, u64), Linked> = HashMap::new();
        for entry in ex.entries() {
            let (path, kind, em) = entry.with_context(|| format!("{name}'s entries"))?;
            if em.uid != 0 || em.gid != 0 || em.caps.is_some() {
                return Ok(Some(format!("{path} is not root's, or has capabilities")));
            }
            if kind == Listed::Hardlink && !source.laid_out() {
                return Ok(Some(format!("{path} is a hardlink")));
            }
            if kind != Listed::Dir {
                let others = self.owners.get(path).into_iter().flatten();
                if let Some(other) = others.into_iter().find(|o| *o != name) {
                    return Ok(Some(format!("{other} lists {path} too")));
                }
            }
            let found = match source {
                Source::Extracted { at, .. } => {
                    self.extracted_state(path, kind, files_since.unwrap_or(*at))
                }
                Source::Unpacked(_) => self.new_state(path, kind, &mut new_dirs),
            };
            if let Some(why) = found {
                return Ok(Some(why));
            }
            if source.laid_out() && matches!(kind, Listed::File | Listed::Hardlink) {
                let md = self.tree.symlink_metadata(path)?;
                let linked = inodes.entry((md.dev(), md.ino())).or_insert(Linked {
                    first: path,
                    nlink: md.nlink(),
                    names: 0,
                    files: 0,
                    conffile: false,
                });
                linked.names += 1;
                linked.files += usize::from(kind == Listed::File);
                linked.conffile |= conffile_paths.iter().any(|c| c == path);
            }
        }
        // Every file the tar links is linked as the extraction linked it, to its names in the
        // tar only (a link made or undone since would have moved the inode's change time);
        // no conffile is (dpkg links to its `.dpkg-new`).
        for l in inodes.values() {
            if l.nlink != l.names as u64 || l.files != 1 || (l.names > 1 && l.conffile) {
                return Ok(Some(format!(
                    "{} is linked otherwise than its tar links it, or is a linked conffile",
                    l.first
                )));
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
        for (other, list) in self.lists.iter().filter(|(o, _)| *o != name) {
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
    pub(super) fn extracted_state(
        &self,
        path: &str,
        kind: Listed,
        at: (i64, i64),
    ) -> Option<String> {
        if kind == Listed::Dir {
            return (!self.tree.metadata(path).is_ok_and(|m| m.is_dir()))
                .then(|| format!("{path} is no longer a directory"));
        }
        let Ok(md) = self.tree.symlink_metadata(path) else {
            return Some(format!("{path} is gone"));
        };
        let same_kind = match kind {
            // How it is linked is asked of all the package's files together.
            Listed::File | Listed::Hardlink => md.is_file(),
            Listed::Symlink => md.file_type().is_symlink(),
            Listed::Dir => false,
        };
        if !same_kind {
            return Some(format!("{path} is not what its tar says"));
        }
        ((md.ctime(), md.ctime_nsec()) >= at)
            .then(|| format!("{path} changed since it was laid out"))
    }

    /// Why an entry not laid out yet cannot simply be made at its path, if it cannot: only a
    /// directory may be there already (or a symlink to one, for a directory), and its parent
    /// must be a directory, or one of the package's own made before it (`new_dirs`).
    pub(super) fn new_state<'p>(
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
    pub(super) fn run_preinst(
        mut self,
        name: &str,
        ex: &Extracted,
        source: &Source,
        run: RunScript,
    ) -> anyhow::Result<Db> {
        let text = fs::read_to_string(ex.dir.join("control/control"))?;
        let cidir = self.make_cidir(ex)?;
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
        let env = self.script_env(name, &text, "preinst")?;
        run(name, &[&format!("/{cidir}/preinst"), "install"], &env)
            .with_context(|| format!("the preinst of {name}"))?;

        let mut after = Db::read(&self.root)?;
        after.runs_scripts = self.runs_scripts;
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
        after.remove_cidir(ex)?;
        Ok(after)
    }

    /// `var/lib/dpkg/tmp.ci/`, where dpkg extracts a package's control members before it
    /// runs its preinst, made and filled with those of `ex`; its path.
    pub(super) fn make_cidir(&self, ex: &Extracted) -> anyhow::Result<String> {
        let cidir = admin("tmp.ci");
        anyhow::ensure!(
            self.tree.symlink_metadata(&cidir).is_err(),
            "{cidir} is there already"
        );
        self.tree.create_dir_all(&cidir)?;
        for (m, em) in ex.control_members() {
            let bytes = fs::read(ex.dir.join("control").join(m))?;
            self.write_entry(&format!("{cidir}/{m}"), &bytes, em)?;
        }
        Ok(cidir)
    }

    /// `var/lib/dpkg/tmp.ci/` as [`Db::make_cidir`] made it, removed.
    pub(super) fn remove_cidir(&self, ex: &Extracted) -> anyhow::Result<()> {
        let cidir = admin("tmp.ci");
        for (m, _) in ex.control_members() {
            self.tree.remove_file(&format!("{cidir}/{m}"))?;
        }
        self.tree.remove_dir(&cidir)?;
        Ok(())
    }

    /// The variables dpkg gives `script` of package `name` (whose control is `control`).
    pub(super) fn script_env(
        &self,
        name: &str,
        control: &str,
        script: &str,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let running = self
            .status
            .iter()
            .find(|s| s.name == "dpkg")
            .and_then(|s| s.field("Version"))
            .context("dpkg is not in the database, to run a maintainer script as it would")?;
        let arch = field(control, "Architecture").unwrap_or_default();
        Ok([
            ("DPKG_ADMINDIR", "/var/lib/dpkg"),
            ("DPKG_ROOT", ""),
            ("DPKG_MAINTSCRIPT_PACKAGE", name),
            ("DPKG_MAINTSCRIPT_PACKAGE_REFCOUNT", "1"),
            ("DPKG_MAINTSCRIPT_ARCH", &arch),
            ("DPKG_MAINTSCRIPT_NAME", script),
            ("DPKG_MAINTSCRIPT_DEBUG", "0"),
            ("DPKG_RUNNING_VERSION", &running),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into())
    }

    /// Record `name` as `dpkg --unpack` would (see the module); [`Db::why_not`] said nothing
    /// stands in the way.
    pub(super) fn record(
        &mut self,
        name: &str,
        ex: &Extracted,
        source: &Source,
    ) -> anyhow::Result<()> {
        self.lay_down(ex, source)?;
        self.register(name, ex, None)
    }

    /// The files of `ex` as `dpkg --unpack` leaves them: laid out already (see [`Source`]),
    /// with their tar entries' times and their directories' times now, or else moved in; each
    /// conffile as `PATH.dpkg-new`.
    pub(super) fn lay_down(&self, ex: &Extracted, source: &Source) -> anyhow::Result<()> {
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
        Ok(())
    }

    /// `name`, its files laid down ([`Db::lay_down`]), written into the database as
    /// `dpkg --unpack` writes it: its control members in `info/`, its file list, the triggers
    /// it activates pending, and its stanza, `install ok unpacked`. A package new to the
    /// database has its conffiles `newconffile`; one `installed` already (`Some((version,
    /// hashes))`: reinstalled, see [`Db::reinstall`]) keeps the hashes it had, and that
    /// version as its `Config-Version`.
    pub(super) fn register(
        &mut self,
        name: &str,
        ex: &Extracted,
        installed: Option<(&str, &HashMap<String, String>)>,
    ) -> anyhow::Result<()> {
        let control = ex.dir.join("control");
        let text = fs::read_to_string(control.join("control"))?;
        let conffiles = conffiles(ex)?;
        // The control members, as `info/PACKAGE[:ARCH].MEMBER`.
        let info_name = info_name(name, &text);
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

        // Its trigger interests (a reinstall's taken back first, as dpkg does).
        let triggers = triggers(ex).map_err(|l| anyhow::anyhow!("triggers line {l:?}"))?;
        if !triggers.interests.is_empty() {
            self.note_interests(name, &info_name, &triggers.interests, installed.is_some())
                .context("writing its trigger interests")?;
        }
        // The triggers it activates, pending for the configured packages interested.
        for (_, trigger) in triggers.activates {
            for p in self.interested(&trigger) {
                if self.takes_triggers(&p) {
                    self.note_pending(&p, &trigger);
                }
            }
        }
        // The stanza: the control's fields, unpacked, its conffiles new (or as they were).
        let mut stanza = String::new();
        for line in text.trim_end_matches('\n').lines() {
            stanza.push_str(line);
            stanza.push('\n');
            if line.starts_with("Package:") {
                stanza.push_str("Status: install ok unpacked\n");
            }
            if let (true, Some((version, _))) = (line.starts_with("Version:"), installed) {
                stanza.push_str(&format!("Config-Version: {version}\n"));
            }
        }
        if !conffiles.is_empty() {
            stanza.push_str("Conffiles:\n");
            for c in &conffiles {
                let hash = installed.and_then(|(_, h)| h.get(c));
                let hash = hash.map_or("newconffile", String::as_str);
                stanza.push_str(&format!(" {c} {hash}\n"));
            }
        }
        if let Some(old) = self.lists.remove(name) {
            for p in old {
                if let Some(o) = self.owners.get_mut(&p) {
                    o.retain(|o| o != name);
                }
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
    pub(super) fn write_entry(
        &self,
        rel: &str,
        bytes: &[u8],
        em: &EntryMeta,
    ) -> anyhow::Result<()> {
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
    pub(super) fn lay_out(&self, ex: &Extracted, conffiles: &[String]) -> anyhow::Result<()> {
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

    /// The trigger interests of `name` (`who` in the database: [`info_name`]) written as dpkg
    /// writes them on unpacking it (its `trig_parse_ci`): a file trigger's appended to
    /// `triggers/File` (where the package has it already, its option changed in place), an
    /// explicit trigger's to `triggers/TRIGGER`, with `/noawait` if so. On a reinstall
    /// (`again`), dpkg takes back the interests it had first (the same: see
    /// [`Db::why_not_reinstall`]), so they move to the end.
    pub(super) fn note_interests(
        &mut self,
        name: &str,
        who: &str,
        interests: &[(String, bool)],
        again: bool,
    ) -> anyhow::Result<()> {
        let options = |noawait: bool| if noawait { "/noawait" } else { "" };
        let read = |rel: &str| match self.tree.read_to_string(rel) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e).with_context(|| format!("reading {rel}")),
        };
        let file = admin("triggers/File");
        // (path, package as written, noawait)
        let mut lines: Vec<(String, String, bool)> = Vec::new();
        for line in read(&file)?.lines() {
            let (path, pkg) = line
                .split_once(' ')
                .with_context(|| format!("{file}: a line without a space: {line:?}"))?;
            let (pkg, noawait) = match pkg.strip_suffix("/noawait") {
                Some(p) => (p, true),
                None => (pkg, false),
            };
            lines.push((path.to_owned(), pkg.to_owned(), noawait));
        }
        let files: Vec<&(String, bool)> = interests
            .iter()
            .filter(|(t, _)| t.starts_with('/'))
            .collect();
        if !files.is_empty() {
            if again {
                lines.retain(|(p, pkg, _)| !(pkg == who && files.iter().any(|(t, _)| t == p)));
            }
            for (t, noawait) in files {
                match lines.iter_mut().find(|(p, pkg, _)| p == t && pkg == who) {
                    Some(l) => l.2 = *noawait,
                    None => lines.push((t.clone(), who.to_owned(), *noawait)),
                }
            }
            let text: String = lines
                .iter()
                .map(|(p, pkg, n)| format!("{p} {pkg}{}\n", options(*n)))
                .collect();
            self.tree.replace_file(&file, text.as_bytes(), 0o644)?;
            self.file_interests = lines
                .iter()
                .map(|(p, pkg, _)| (p.clone(), package_of(pkg)))
                .collect();
        }
        for (t, noawait) in interests.iter().filter(|(t, _)| !t.starts_with('/')) {
            let rel = admin(&format!("triggers/{t}"));
            let mut text: String = read(&rel)?
                .lines()
                .filter(|l| package_of(l) != name)
                .map(|l| format!("{l}\n"))
                .collect();
            text.push_str(&format!("{who}{}\n", options(*noawait)));
            self.tree.replace_file(&rel, text.as_bytes(), 0o644)?;
        }
        Ok(())
    }

    /// The packages `triggers/TRIGGER` names as interested.
    pub(super) fn interested(&self, trigger: &str) -> Vec<String> {
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
    pub(super) fn note_pending(&mut self, name: &str, trigger: &str) {
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
    pub(super) fn write_status(&mut self) -> anyhow::Result<()> {
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
/// What in the database or dpkg's configuration changes how dpkg lays out any package, if
/// anything does.
pub(super) fn blocked(tree: &InRoot) -> Option<String> {
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
pub(super) fn filters_paths(tree: &InRoot) -> bool {
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
