//! Why `dpkg --unpack` of a package would do more than record it (see the module).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;

use anyhow::Context;
use rbuild_engine::archive::deb::Listed;

use super::db::{Db, Relations};
use super::{activations, conffiles, Extracted, Source, DATABASE_WRITERS};
use crate::debian::packages::field;

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

impl Db {
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
}
