//! debootstrap's `dpkg --unpack` of the required set, with dpkg's work done ahead where it
//! would only repeat the extraction.
//!
//! The extraction has laid out every required package's files already; dpkg's unpack writes
//! them all again, byte for byte, and records them in its database. For a package that is new
//! to the database, has no `preinst` to run first, and whose files nothing has touched since
//! the extraction, configure records it itself, as `dpkg --unpack` would: the files' times
//! set to their tar entries', each conffile beside itself as `.dpkg-new`, the control members
//! in `info/`, the file list in the tar's order, and the status stanza (`install ok unpacked`,
//! conffiles `newconffile`). Every other package — any preinst, trigger interest, diversion,
//! file another package lists, conflict, changed file… — is unpacked by dpkg itself, in the
//! same order, in runs of consecutive packages. `dpkg --configure` then finds the same
//! database it would have made, and rewrites every stanza in its own words.
//!
//! The tests that compare the tree with debootstrap's (tests/suites.rs) hold this to dpkg's
//! own result, database included.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rbuild_engine::archive::deb::Listed;
use rbuild_engine::sandbox;
use rbuild_store::meta::TreeMeta;

use crate::debian::packages::{self, Dep};
use crate::debian::resolve;

/// What configure's extraction kept of one package for this: its unpacked control members
/// (`dir/control/…`), the metadata of every entry (`control/…`, `data/…`), and the data
/// entries in the tar's order.
pub(super) struct Extracted {
    pub dir: PathBuf,
    pub meta: TreeMeta,
    pub listed: Vec<(String, Listed)>,
}

/// `dpkg --force-depends --unpack` of `names` (in that order): recorded here where it is only
/// a repetition of the extraction (see the module), by dpkg otherwise. `extracted_at` is a
/// change time (seconds, nanoseconds) taken after the extraction: a file changed since has a
/// change time at or past it. `dpkg_unpack` runs `dpkg --force-depends --unpack` of packages in
/// the chroot; `recorded` is told of each package recorded here (its `.deb` is not needed).
pub(super) fn unpack_required(
    root: &Path,
    names: &[&str],
    extracted: &HashMap<String, Extracted>,
    extracted_at: (i64, i64),
    dpkg_unpack: &dyn Fn(&[&str]) -> anyhow::Result<()>,
    recorded_one: &dyn Fn(&str),
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut db = Db::read(root)?;
    let mut batch: Vec<&str> = Vec::new();
    let (mut recorded, mut by_dpkg) = (0, 0);
    let mut runs = 0;
    for &name in names {
        let why_not = match extracted.get(name) {
            None => Some("it was not extracted here".to_owned()),
            Some(ex) => db.why_not(name, ex, extracted_at)?,
        };
        match why_not {
            Some(why) => {
                eprintln!("configure: dpkg unpacks {name}: {why}");
                batch.push(name);
                by_dpkg += 1;
            }
            None => {
                if !batch.is_empty() {
                    db.write_status()?;
                    dpkg_unpack(&batch)?;
                    runs += 1;
                    batch.clear();
                    db = Db::read(root)?;
                }
                db.record(name, &extracted[name])
                    .with_context(|| format!("recording {name} as unpacked"))?;
                recorded_one(name);
                recorded += 1;
            }
        }
    }
    db.write_status()?;
    if !batch.is_empty() {
        dpkg_unpack(&batch)?;
        runs += 1;
    }
    eprintln!(
        "configure: the required set unpacked in {:.2?}: {recorded} packages recorded as dpkg \
         would, {by_dpkg} unpacked by dpkg in {runs} runs",
        started.elapsed()
    );
    Ok(())
}

/// One stanza of dpkg's status file.
struct Stanza {
    name: String,
    /// The third word of `Status:` (`installed`, `unpacked`…).
    state: String,
    text: String,
}

impl Stanza {
    fn field(&self, name: &str) -> Option<String> {
        field(&self.text, name)
    }
}

/// The value of field `name` in a deb822 stanza, continuation lines included.
fn field(text: &str, name: &str) -> Option<String> {
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if line.starts_with([' ', '\t']) || !k.eq_ignore_ascii_case(name) {
            continue;
        }
        let mut value = v.trim().to_owned();
        for more in lines.by_ref() {
            if !more.starts_with([' ', '\t']) {
                break;
            }
            value.push('\n');
            value.push_str(more);
        }
        return Some(value);
    }
    None
}

/// The relations of field `name` of a stanza (alternatives flattened; none if it has no such
/// field); None if it does not parse.
fn relations(text: &str, name: &str) -> Option<Vec<Dep>> {
    match field(text, name) {
        None => Some(Vec::new()),
        Some(v) => Some(
            packages::parse_relations(&v)
                .ok()?
                .into_iter()
                .flatten()
                .collect(),
        ),
    }
}

/// The names a stanza's Provides gives; None if it does not parse.
fn provides_of(text: &str) -> Option<Vec<String>> {
    Some(
        relations(text, "Provides")?
            .into_iter()
            .map(|d| d.name)
            .collect(),
    )
}

/// Whether the Conflicts or Breaks relation `dep` may hold against package `name` at `version`,
/// which provides `provides`: by name, when its version satisfies the relation's; by a name
/// it provides, whatever the versions. Architecture qualifiers are not looked at.
fn may_hold(dep: &Dep, name: &str, version: &str, provides: &[String]) -> bool {
    if dep.name == name {
        return match &dep.version {
            None => true,
            Some((op, want)) => resolve::satisfies(version, op, want),
        };
    }
    provides.contains(&dep.name)
}

/// dpkg's database as far as recording an unpack needs it.
struct Db {
    root: PathBuf,
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
}

const ADMIN: &str = "var/lib/dpkg";

impl Db {
    fn read(root: &Path) -> anyhow::Result<Db> {
        let admin = root.join(ADMIN);
        let text = fs::read_to_string(admin.join("status")).context("reading dpkg's status")?;
        let mut status = Vec::new();
        for chunk in text.split("\n\n") {
            let chunk = chunk.trim_matches('\n');
            if chunk.is_empty() {
                continue;
            }
            let name = field(chunk, "Package").context("a status stanza without Package")?;
            let state = field(chunk, "Status")
                .and_then(|s| s.split_whitespace().nth(2).map(str::to_owned))
                .unwrap_or_default();
            status.push(Stanza {
                name,
                state,
                text: chunk.to_owned(),
            });
        }
        let mut lists = HashMap::new();
        let mut owners: HashMap<String, Vec<String>> = HashMap::new();
        for entry in fs::read_dir(admin.join("info")).context("reading dpkg's info")? {
            let entry = entry?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = file.strip_suffix(".list") else {
                continue;
            };
            let name = stem.split(':').next().unwrap_or(stem).to_owned();
            let paths: Vec<String> = fs::read_to_string(entry.path())?
                .lines()
                .map(str::to_owned)
                .collect();
            for p in &paths {
                owners.entry(p.clone()).or_default().push(name.clone());
            }
            lists.insert(name, paths);
        }
        let file_interests = match fs::read_to_string(admin.join("triggers/File")) {
            Ok(t) => t
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(p, pkg)| (p.to_owned(), package_of(pkg)))
                .collect(),
            Err(_) => Vec::new(),
        };
        // diversions: three lines each (from, to, package).
        let diverted = match fs::read_to_string(admin.join("diversions")) {
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
        Ok(Db {
            diverted,
            root: root.to_owned(),
            status,
            dirty: false,
            lists,
            owners,
            file_interests,
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
        extracted_at: (i64, i64),
    ) -> anyhow::Result<Option<String>> {
        let admin = self.root.join(ADMIN);
        // What changes how dpkg lays out any package.
        for (file, what) in [
            ("statoverride", "stat overrides"),
            ("triggers/Unincorp", "triggers not yet incorporated"),
        ] {
            if fs::metadata(admin.join(file)).is_ok_and(|m| m.len() > 0) {
                return Ok(Some(format!("the database has {what}")));
            }
        }
        if fs::read_dir(admin.join("updates")).is_ok_and(|mut d| d.next().is_some()) {
            return Ok(Some("dpkg's journal is not empty".into()));
        }
        if filters_paths(&self.root) {
            return Ok(Some("dpkg's configuration filters paths".into()));
        }
        if self.status.iter().any(|s| s.name == name) {
            return Ok(Some("it is in the database already".into()));
        }

        // Its control members.
        let control = ex.dir.join("control");
        let mut members = Vec::new();
        for (key, _) in ex.meta.entries.range("control/".to_owned()..) {
            let Some(m) = key.strip_prefix("control/") else {
                break;
            };
            if m.contains('/') || !fs::symlink_metadata(control.join(m))?.is_file() {
                return Ok(Some(format!("its control member {m} is not a plain file")));
            }
            members.push(m.to_owned());
        }
        if members.iter().any(|m| m == "preinst") {
            return Ok(Some("it has a preinst".into()));
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
        if let Ok(triggers) = fs::read_to_string(control.join("triggers")) {
            for line in triggers.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut words = line.split_whitespace();
                let (Some(kind), Some(trigger), None) = (words.next(), words.next(), words.next())
                else {
                    return Ok(Some(format!("its triggers line {line:?}")));
                };
                if !matches!(kind, "activate" | "activate-await" | "activate-noawait")
                    || trigger.starts_with('/')
                {
                    return Ok(Some(format!("its triggers line {line:?}")));
                }
                let interested =
                    fs::read_to_string(admin.join("triggers").join(trigger)).unwrap_or_default();
                if let Some(p) = interested
                    .lines()
                    .map(package_of)
                    .find(|p| self.takes_triggers(p))
                {
                    return Ok(Some(format!("it activates {trigger}, which {p} awaits")));
                }
            }
        }

        // Conflicts and breaks, either way, that may hold against anything in the database
        // (by name and version; through a virtual package, whatever the version).
        let Some(version) = field(&text, "Version") else {
            return Ok(Some("its control has no Version".into()));
        };
        let Some(provides) = provides_of(&text) else {
            return Ok(Some("its Provides does not parse".into()));
        };
        for f in ["Conflicts", "Breaks"] {
            let Some(ours) = relations(&text, f) else {
                return Ok(Some(format!("its {f} does not parse")));
            };
            for s in &self.status {
                let (Some(theirs), Some(their_provides)) =
                    (relations(&s.text, f), provides_of(&s.text))
                else {
                    return Ok(Some(format!("{}'s relations do not parse", s.name)));
                };
                let their_version = s.field("Version").unwrap_or_default();
                if let Some(d) = ours
                    .iter()
                    .find(|d| may_hold(d, &s.name, &their_version, &their_provides))
                {
                    return Ok(Some(format!("its {f} ({d}) may hold against {}", s.name)));
                }
                if let Some(d) = theirs
                    .iter()
                    .find(|d| may_hold(d, name, &version, &provides))
                {
                    return Ok(Some(format!("{}'s {f} ({d}) may hold against it", s.name)));
                }
            }
        }

        // Its files: its own, as the extraction left them.
        let paths: HashSet<&str> = ex.listed.iter().map(|(p, _)| p.as_str()).collect();
        for (path, kind) in &ex.listed {
            if path == "/." {
                continue;
            }
            let em = ex
                .meta
                .entries
                .get(&format!("data{path}"))
                .with_context(|| format!("{name}: no metadata for {path}"))?;
            if em.uid != 0 || em.gid != 0 || em.caps.is_some() {
                return Ok(Some(format!("{path} is not root's, or has capabilities")));
            }
            let on_disk = self.root.join(&path[1..]);
            if *kind == Listed::Dir {
                if !fs::metadata(&on_disk).is_ok_and(|m| m.is_dir()) {
                    return Ok(Some(format!("{path} is no longer a directory")));
                }
                continue;
            }
            if let Some(other) = self.owners.get(path.as_str()).and_then(|o| o.first()) {
                return Ok(Some(format!("{other} lists {path} too")));
            }
            let Ok(md) = fs::symlink_metadata(&on_disk) else {
                return Ok(Some(format!("{path} is gone")));
            };
            let same_kind = match kind {
                Listed::File => md.is_file() && md.nlink() == 1,
                Listed::Symlink => md.file_type().is_symlink(),
                Listed::Hardlink | Listed::Dir => false,
            };
            if !same_kind {
                return Ok(Some(format!(
                    "{path} is a hardlink or not what its tar says"
                )));
            }
            if (md.ctime(), md.ctime_nsec()) >= extracted_at {
                return Ok(Some(format!("{path} changed after the extraction")));
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

    /// Record `name` as `dpkg --unpack` would (see the module); [`Db::why_not`] said nothing
    /// stands in the way.
    fn record(&mut self, name: &str, ex: &Extracted) -> anyhow::Result<()> {
        let admin = self.root.join(ADMIN);
        let control = ex.dir.join("control");
        let text = fs::read_to_string(control.join("control"))?;
        let meta = |key: &str| {
            ex.meta
                .entries
                .get(key)
                .with_context(|| format!("no metadata for {key}"))
        };
        // The files, as dpkg writes them: with their tar entries' times; a symlink to a
        // directory that is there already is left alone.
        for (path, kind) in &ex.listed {
            let on_disk = self.root.join(path.trim_start_matches('/'));
            let left_alone = match kind {
                Listed::Dir => true,
                Listed::Symlink => fs::metadata(&on_disk).is_ok_and(|m| m.is_dir()),
                _ => false,
            };
            if path != "/." && !left_alone {
                sandbox::set_entry_mtime(&on_disk, meta(&format!("data{path}"))?.mtime)?;
            }
        }
        // Conffiles wait beside the installed ones for `dpkg --configure`.
        let conffiles = conffiles(ex)?;
        for c in &conffiles {
            let on_disk = self.root.join(c.trim_start_matches('/'));
            let new = PathBuf::from(format!("{}.dpkg-new", on_disk.display()));
            let _ = fs::remove_file(&new);
            fs::copy(&on_disk, &new).with_context(|| format!("copying {}", on_disk.display()))?;
            let em = meta(&format!("data{c}"))?;
            sandbox::apply_meta(&new, em)?;
            sandbox::set_entry_mtime(&new, em.mtime)?;
        }
        // The control members, as `info/PACKAGE[:ARCH].MEMBER`.
        let arch = field(&text, "Architecture").unwrap_or_default();
        let info_name = if field(&text, "Multi-Arch").as_deref() == Some("same") {
            format!("{name}:{arch}")
        } else {
            name.to_owned()
        };
        let info = admin.join("info");
        for (key, em) in ex.meta.entries.range("control/".to_owned()..) {
            let Some(m) = key.strip_prefix("control/") else {
                break;
            };
            if m == "control" || m == "list" || m.contains('.') {
                continue;
            }
            let to = info.join(format!("{info_name}.{m}"));
            fs::copy(control.join(m), &to).with_context(|| format!("writing {}", to.display()))?;
            sandbox::apply_meta(&to, em)?;
            sandbox::set_entry_mtime(&to, em.mtime)?;
        }
        let list: String = ex.listed.iter().map(|(p, _)| format!("{p}\n")).collect();
        let list_file = info.join(format!("{info_name}.list"));
        fs::write(&list_file, list)?;
        fs::set_permissions(&list_file, fs::Permissions::from_mode(0o644))?;

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
        self.status.push(Stanza {
            name: name.to_owned(),
            state: "unpacked".into(),
            text: stanza.trim_end_matches('\n').to_owned(),
        });
        self.dirty = true;
        Ok(())
    }

    /// Write the status file if a package was recorded since it was read.
    fn write_status(&mut self) -> anyhow::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let admin = self.root.join(ADMIN);
        let text: String = self
            .status
            .iter()
            .map(|s| format!("{}\n\n", s.text))
            .collect();
        let tmp = admin.join("status.rbuild-new");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, admin.join("status"))?;
        self.dirty = false;
        Ok(())
    }
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

/// Whether dpkg's configuration in the tree (`/etc/dpkg/dpkg.cfg`, `dpkg.cfg.d/`, root's
/// `~/.dpkg.cfg`) filters paths (`path-exclude`, `path-include`), or cannot be read.
fn filters_paths(root: &Path) -> bool {
    let mut files = vec![root.join("etc/dpkg/dpkg.cfg"), root.join("root/.dpkg.cfg")];
    match fs::read_dir(root.join("etc/dpkg/dpkg.cfg.d")) {
        Ok(d) => files.extend(d.filter_map(|e| e.ok()).map(|e| e.path())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return true,
    }
    files.iter().any(|f| match fs::read_to_string(f) {
        Ok(t) => t.contains("path-exclude") || t.contains("path-include"),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rbuild_store::meta::EntryMeta;

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
        let mut db = Db::read(&root).unwrap();
        assert_eq!(db.why_not("hello", &ex, at).unwrap(), None);
        db.record("hello", &ex).unwrap();
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
        // Files get their tar entries' times.
        let md = fs::symlink_metadata(root.join("usr/bin/hello")).unwrap();
        assert_eq!(md.mtime(), 1_600_000_000);
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
            db.why_not("hello", &ex, at).unwrap().as_deref(),
            Some("it is in the database already")
        );
    }

    #[test]
    fn whatever_dpkg_would_do_more_for_leaves_the_package_to_dpkg() {
        let reason = |change: &dyn Fn(&Path, &mut Extracted)| {
            let t = tempfile::tempdir().unwrap();
            let (root, mut ex, at) = setup(t.path());
            change(&root, &mut ex);
            Db::read(&root).unwrap().why_not("hello", &ex, at).unwrap()
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
        // A preinst, to be run before the files are written.
        has(
            reason(&|_, ex| {
                fs::write(ex.dir.join("control/preinst"), "#!/bin/sh\n").unwrap();
                ex.meta
                    .entries
                    .insert("control/preinst".into(), EntryMeta::root(0o755, 0));
            }),
            "preinst",
        );
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
        // An installed package awaits the trigger it activates.
        has(
            reason(&|root, ex| {
                fs::write(
                    ex.dir.join("control/triggers"),
                    "activate-noawait ldconfig\n",
                )
                .unwrap();
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
}
