//! dpkg's database as recording an unpack reads it (the status file and its stanzas'
//! relations, the file lists, trigger interests, diversions, what blocks any recording) and
//! writes it back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rbuild_engine::sandbox::{self, InRoot};
use rbuild_store::meta::EntryMeta;

use super::package_of;
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

/// `var/lib/dpkg/info/INFO.MEMBER`: member `member` of the package named `info` there
/// ([`info_name`]).
pub(super) fn info_file(info: &str, member: &str) -> String {
    admin(&format!("info/{info}.{member}"))
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

    /// The packages `triggers/TRIGGER` names as interested.
    pub(super) fn interested(&self, trigger: &str) -> Vec<String> {
        self.tree
            .read_to_string(&admin(&format!("triggers/{trigger}")))
            .unwrap_or_default()
            .lines()
            .map(package_of)
            .collect()
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
