//! Recording an unpack as dpkg would: running the scripts dpkg runs first, laying the files
//! down, and writing the package into the database (see the module).

use std::collections::{HashMap, HashSet};
use std::fs;

use anyhow::Context;
use rbuild_engine::archive::deb::Listed;
use rbuild_engine::sandbox;

use super::db::{admin, info_file, info_name, Db, Stanza};
use super::{conffiles, package_of, triggers, Extracted, RunScript, Source};
use crate::debian::packages::field;

/// What [`Db::run_script`] asks again after the script.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Check {
    /// The database, and everything recording the package needs (its files untouched).
    All,
    /// The database only (the files are laid down already).
    Database,
}

impl Db {
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
        let preinst = format!("/{cidir}/preinst");
        let after = self.run_script(
            (name, None, &text),
            ex,
            source,
            run,
            ("preinst", &[&preinst, "install"]),
            Check::All,
        )?;
        after.remove_cidir(ex)?;
        Ok(after)
    }

    /// Run `script` (its name, and its command line) of the package (`name`, the stanza it
    /// had before dpkg began on it — none, for a package new to the database —, its control
    /// `text`) by `run`, with dpkg's variables, then read the database again: it must be as
    /// the script found it (diversions apart: those are the database's now, and asked about
    /// again) — no stat override, trigger or journal entry, the status unchanged: dpkg would
    /// go on differently — and, with [`Check::All`], nothing in the way of recording the
    /// package, as before. It cannot be handed to dpkg now (the script would run again):
    /// anything else is an error that names what the script changed.
    pub(super) fn run_script(
        self,
        (name, had, text): (&str, Option<&str>, &str),
        ex: &Extracted,
        source: &Source,
        run: RunScript,
        (script, argv): (&str, &[&str]),
        check: Check,
    ) -> anyhow::Result<Db> {
        let status = admin("status");
        let before = self.tree.read_to_string(&status)?;
        let env = self.script_env(name, text, script)?;
        run(name, argv, &env).with_context(|| format!("the {script} of {name}"))?;
        let mut after = Db::read(&self.root)?;
        after.runs_scripts = self.runs_scripts;
        let changed = if after.tree.read_to_string(&status)? != before {
            Some("dpkg's status".to_owned())
        } else if let Some(why) = &after.blocked {
            Some(why.clone())
        } else if check == Check::All {
            // Asked as before dpkg began on the package, of the stanza it had then.
            let now = after.status.iter().position(|s| s.name == name);
            let now = now.map(|i| after.status.remove(i));
            if let Some(had) = had {
                after
                    .status
                    .push(Stanza::new(name.to_owned(), had.to_owned()));
            }
            let why = after.why_not(name, ex, source)?;
            after.status.retain(|s| s.name != name);
            after.status.extend(now);
            why
        } else {
            None
        };
        if let Some(what) = changed {
            anyhow::bail!(
                "the {script} of {name}, run as dpkg runs it to unpack the package, left what \
                 stops configure recording the unpack ({what}), and dpkg cannot unpack it now \
                 without running the {script} again"
            );
        }
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
        for (m, em) in ex.info_members() {
            let to = info_file(&info_name, m);
            self.write_entry(&to, &fs::read(control.join(m))?, em)?;
        }
        let list: String = ex.listed.iter().map(|(p, _)| format!("{p}\n")).collect();
        self.tree
            .replace_file(&info_file(&info_name, "list"), list.as_bytes(), 0o644)
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
}
