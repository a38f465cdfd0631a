//! A reinstall recorded: `dpkg --unpack` of a package installed already, at the same version,
//! as debootstrap's second stage does to its core packages (installed one by one, then
//! unpacked again with the rest of the required set).
//!
//! dpkg (1.22's `process_archive`) then marks the package half-configured (reinstall
//! required) and runs the old `prerm upgrade NEW`; marks it half-installed, extracts the
//! control members to `tmp.ci/` and runs the new `preinst upgrade OLD NEW`; writes every file
//! again (each conffile as `PATH.dpkg-new`); runs the old `postrm upgrade NEW`; removes the
//! files only the old version had, writes the file list, the trigger interests (taken back
//! and noted again: they move to the end of `triggers/File`) and the info files, and marks it
//! `install ok unpacked`, its conffiles with the hashes they had and its `Config-Version` the
//! version it had. Each stanza on the way is the installed one with its status and that
//! `Config-Version`.
//!
//! It is recorded only where the files dpkg would write again are the package's, byte for
//! byte, as they are: a package whose install configure recorded itself, none of its files
//! changed since (their change times are before the one taken then: [`Source::Extracted`]) —
//! or debootstrap's feigned dpkg (a stanza saying installed, an empty file list, no info
//! files: no old script runs, no old file is removed), its files as the extraction left them —,
//! at the same version, with the same files, info files and conffiles (unflagged, hashed), no
//! trigger pending or awaited, and its scripts free of dpkg's database writers — as well as
//! everything [`Db::why_not`] asks of any package. A script run here that leaves the database
//! otherwise, or the package's files changed, is an error: dpkg cannot take the package over
//! without running the script again.

use std::collections::{HashMap, HashSet};
use std::fs;

use anyhow::Context;

use super::db::{admin, info_file, info_name, Db, Stanza};
use super::record::Check;
use super::{conffiles, has_preinst, Extracted, RunScript, Source};
use crate::debian::packages::field;

impl Db {
    /// Whether `dpkg --unpack` of the package of stanza `s` (in the database already) can be
    /// recorded as a reinstall of `ex`: Ok(the change time its files must be before), or
    /// Err(why not). [`Db::why_not`] asks the rest.
    pub(super) fn why_not_reinstall(
        &self,
        s: &Stanza,
        ex: &Extracted,
        source: &Source,
    ) -> anyhow::Result<Result<(i64, i64), String>> {
        let name = s.name.as_str();
        let control = ex.dir.join("control");
        let text = fs::read_to_string(control.join("control"))?;
        let info = info_name(name, &text);
        let feigned = self.feigned(s, &info, ex);
        let at = match (source.installed_at(name), source) {
            (Some(at), _) if !feigned => at,
            // Installed as debootstrap feigns it: the files are the extraction's.
            (None, Source::Extracted { at, .. }) if feigned => *at,
            _ => return Ok(Err("it is in the database already".into())),
        };
        if !self.runs_scripts {
            return Ok(Err(
                "it is installed, and its scripts are not run here".into()
            ));
        }
        let status = s.field("Status").unwrap_or_default();
        if status.split_whitespace().collect::<Vec<_>>() != ["install", "ok", "installed"] {
            return Ok(Err(format!("its status is {status:?}")));
        }
        if field(&text, "Version").is_none() || s.field("Version") != field(&text, "Version") {
            return Ok(Err("another version of it is installed".into()));
        }
        for f in ["Config-Version", "Triggers-Pending", "Triggers-Awaited"] {
            if s.field(f).is_some() {
                return Ok(Err(format!("its stanza has {f}")));
            }
        }
        if feigned {
            return Ok(Ok(at));
        }
        let listed = ex.listed.iter().map(|(p, _)| p.as_str());
        if !self
            .lists
            .get(name)
            .is_some_and(|l| l.iter().map(String::as_str).eq(listed))
        {
            return Ok(Err("its file list is not the installed one".into()));
        }
        let new: HashSet<String> = conffiles(ex)?.into_iter().collect();
        match conffile_hashes(s) {
            Some(h) if h.keys().cloned().collect::<HashSet<_>>() == new => {}
            _ => {
                return Ok(Err(
                    "its conffiles are not the installed ones, each with a hash".into(),
                ))
            }
        }
        // The installed info files are the package's (the old scripts run here are the new).
        for (m, _) in ex.info_members() {
            let installed = self.tree.read(&info_file(&info, m));
            if !installed.is_ok_and(|b| b == fs::read(control.join(m)).unwrap_or_default()) {
                return Ok(Err(format!("its installed {m} is not the package's")));
            }
        }
        Ok(Ok(at))
    }

    /// Record `dpkg --unpack` of `name`, installed already, as a reinstall (see the module),
    /// running its scripts by `run`; [`Db::why_not`] said nothing stands in the way.
    pub(super) fn reinstall(
        mut self,
        name: &str,
        ex: &Extracted,
        source: &Source,
        run: RunScript,
    ) -> anyhow::Result<Db> {
        let text = fs::read_to_string(ex.dir.join("control/control"))?;
        let version = field(&text, "Version").context("no Version")?;
        let old = self
            .status
            .iter()
            .find(|s| s.name == name)
            .context("not in the database")?;
        let (old, hashes) = (
            old.text.clone(),
            conffile_hashes(old).context("its conffiles")?,
        );
        let info = info_name(name, &text);
        // The old package's scripts (the new ones, or none if it was feigned).
        let has = |m: &str| self.tree.symlink_metadata(&info_file(&info, m)).is_ok();
        let (old_prerm, old_postrm) = (has("prerm"), has("postrm"));
        self.make_cidir(ex)?;
        if old_prerm {
            self.set_status(name, &old, "install reinstreq half-configured", &version)?;
            let prerm = format!("/{}", info_file(&info, "prerm"));
            self = self.run_script(
                (name, Some(&old), &text),
                ex,
                source,
                run,
                ("prerm", &[&prerm, "upgrade", &version]),
                Check::All,
            )?;
        }
        self.set_status(name, &old, "install reinstreq half-installed", &version)?;
        if has_preinst(ex) {
            let preinst = format!("/{}", admin("tmp.ci/preinst"));
            self = self.run_script(
                (name, Some(&old), &text),
                ex,
                source,
                run,
                ("preinst", &[&preinst, "upgrade", &version, &version]),
                Check::All,
            )?;
        }
        self.lay_down(ex, source)?;
        if old_postrm {
            let postrm = format!("/{}", info_file(&info, "postrm"));
            self = self.run_script(
                (name, Some(&old), &text),
                ex,
                source,
                run,
                ("postrm", &[&postrm, "upgrade", &version]),
                Check::Database,
            )?;
        }
        self.remove_cidir(ex)?;
        self.register(name, ex, Some((&version, &hashes)))?;
        Ok(self)
    }

    /// Whether stanza `s` (whose package is `info` in `info/`) is debootstrap's feigned install
    /// (`x_feign_install`, of dpkg): installed, with an empty file list and no conffiles,
    /// scripts or other info files of the package `ex` (whose control members are the files
    /// dpkg would have in `info/`, and no other script is looked for).
    fn feigned(&self, s: &Stanza, info: &str, ex: &Extracted) -> bool {
        const SCRIPTS: [&str; 4] = ["preinst", "postinst", "prerm", "postrm"];
        let members = ex.info_members().map(|(m, _)| m);
        self.lists.get(&s.name).is_some_and(Vec::is_empty)
            && s.field("Conffiles").is_none()
            && members
                .chain(SCRIPTS)
                .all(|m| self.tree.symlink_metadata(&info_file(info, m)).is_err())
    }

    /// `name`'s stanza, `old` as installed, with `Status: status` and the `Config-Version`
    /// dpkg writes of a package installed at `version` and not configured now, written.
    fn set_status(
        &mut self,
        name: &str,
        old: &str,
        status: &str,
        version: &str,
    ) -> anyhow::Result<()> {
        let mut text = String::new();
        for line in old.lines() {
            if line.starts_with("Status:") {
                text.push_str(&format!("Status: {status}\n"));
                continue;
            }
            text.push_str(line);
            text.push('\n');
            if line.starts_with("Version:") {
                text.push_str(&format!("Config-Version: {version}\n"));
            }
        }
        let stanza = Stanza::new(name.to_owned(), text.trim_end_matches('\n').to_owned());
        match self.status.iter_mut().find(|s| s.name == name) {
            Some(s) => *s = stanza,
            None => self.status.push(stanza),
        }
        self.dirty = true;
        self.write_status()
    }
}

/// The conffiles of an installed stanza, each with its hash; None if one has no hash, or a
/// flag (`obsolete`, `remove-on-upgrade`).
fn conffile_hashes(s: &Stanza) -> Option<HashMap<String, String>> {
    let Some(v) = s.field("Conffiles") else {
        return Some(HashMap::new());
    };
    let mut out = HashMap::new();
    for line in v.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            [path, hash] if hash != "newconffile" => {
                out.insert(path.to_owned(), hash.to_owned());
            }
            _ => return None,
        }
    }
    Some(out)
}
