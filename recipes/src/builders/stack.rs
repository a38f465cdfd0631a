//! A layered image's root filesystem as store outputs: its base tree and, above it, the change set
//! of each layer (OCI semantics: changed and added entries, `.wh.NAME` for a deleted path). A
//! layer is built on an overlay of its base tree, and its output is what the overlay's upper
//! directory shows it changed ([`change_set`]); nothing copies the base.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rbuild_engine::sandbox;
use rbuild_store::meta::{sidecar, EntryMeta, TreeMeta};

/// The prefix of an OCI whiteout's name.
pub(super) const WHITEOUT: &str = ".wh.";

/// `rel`'s parent (`""` for a top-level name) and name.
fn split(rel: &str) -> (&str, &str) {
    rel.rsplit_once('/').unwrap_or(("", rel))
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// The path a whiteout entry `rel` (`DIR/.wh.NAME`) deletes, if it is one.
pub(super) fn whiteout_target(rel: &str) -> anyhow::Result<Option<String>> {
    let (dir, name) = split(rel);
    match name.strip_prefix(WHITEOUT) {
        None => Ok(None),
        Some(n) if n.is_empty() || n.starts_with(WHITEOUT) => {
            bail!("{rel}: opaque and empty whiteouts are never written by rbuild")
        }
        Some(n) => Ok(Some(join(dir, n))),
    }
}

/// The whiteout entry that deletes `rel`.
fn whiteout_of(rel: &str) -> String {
    let (dir, name) = split(rel);
    join(dir, &format!("{WHITEOUT}{name}"))
}

/// Every path of a base tree with its change sets applied: its recorded metadata, and the store
/// file that holds it.
pub(super) struct Stack {
    base: PathBuf,
    entries: BTreeMap<String, (EntryMeta, PathBuf)>,
}

impl Stack {
    /// `base` (a tree output) with `change_sets` (bottom first) applied.
    pub(super) fn compose(base: &Path, change_sets: &[PathBuf]) -> anyhow::Result<Stack> {
        let mut entries = BTreeMap::new();
        for (rel, m) in TreeMeta::read(&sidecar(base))?.entries {
            let src = base.join(&rel);
            entries.insert(rel, (m, src));
        }
        let mut stack = Stack {
            base: base.to_owned(),
            entries,
        };
        for cs in change_sets {
            for (rel, m) in TreeMeta::read(&sidecar(cs))?.entries {
                if let Some(target) = whiteout_target(&rel)? {
                    stack.remove_subtree(&target);
                    continue;
                }
                let src = cs.join(&rel);
                let is_dir = fs::symlink_metadata(&src)
                    .with_context(|| format!("stat {}", src.display()))?
                    .is_dir();
                if !is_dir {
                    // A path whose type changed is written whole: nothing stays below it.
                    stack.remove_subtree(&rel);
                }
                stack.entries.insert(rel, (m, src));
            }
        }
        Ok(stack)
    }

    /// Drop `rel` and everything below it.
    fn remove_subtree(&mut self, rel: &str) {
        self.entries.remove(rel);
        let below = format!("{rel}/");
        let doomed: Vec<String> = self
            .entries
            .range(below.clone()..)
            .take_while(|(k, _)| k.starts_with(&below))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.entries.remove(&k);
        }
    }

    /// `rel`'s recorded metadata and the store file holding it.
    pub(super) fn get(&self, rel: &str) -> Option<&(EntryMeta, PathBuf)> {
        self.entries.get(rel)
    }

    /// Every path with its metadata and store file, parents before children.
    pub(super) fn entries(&self) -> impl Iterator<Item = (&String, &(EntryMeta, PathBuf))> {
        self.entries.iter()
    }

    /// The names directly below the directory `rel`.
    fn children<'a>(&'a self, rel: &str) -> impl Iterator<Item = &'a str> + 'a {
        let below = if rel.is_empty() {
            String::new()
        } else {
            format!("{rel}/")
        };
        let skip = below.len();
        self.entries
            .range(below.clone()..)
            .take_while(move |(k, _)| k.starts_with(&below))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, _)| k.as_str())
            .filter(move |k| !k[skip..].contains('/'))
    }
}

/// Whether `upper` (described by `um`) differs from the lower entry `lower` (recorded as `lm`),
/// ignoring mtimes: a file that was only touched, or rewritten with the same bytes, or given
/// the metadata it had, is unchanged.
fn differs(lower: &Path, upper: &Path, lm: &EntryMeta, um: &EntryMeta) -> anyhow::Result<bool> {
    if (lm.uid, lm.gid, lm.mode, &lm.caps, &lm.acls)
        != (um.uid, um.gid, um.mode, &um.caps, &um.acls)
    {
        return Ok(true);
    }
    let (l, u) = (fs::symlink_metadata(lower)?, fs::symlink_metadata(upper)?);
    let (lt, ut) = (l.file_type(), u.file_type());
    if lt.is_dir() != ut.is_dir()
        || lt.is_symlink() != ut.is_symlink()
        || lt.is_file() != ut.is_file()
    {
        return Ok(true);
    }
    if lt.is_symlink() {
        return Ok(fs::read_link(lower)? != fs::read_link(upper)?);
    }
    if lt.is_file() {
        return Ok(l.len() != u.len()
            || rbuild_store::hash::file_blake3(lower)? != rbuild_store::hash::file_blake3(upper)?);
    }
    Ok(false)
}

/// Before a layer's steps run on the overlay `merged` of `lower`'s base: give each base entry whose
/// store file lacks its recorded metadata (ownership, setuid and similar bits, capabilities,
/// ACLs — a store file belongs to the invoking user) that metadata, through the overlay, so
/// that the steps see the image as it is. The overlay copies those few entries up;
/// [`change_set`] drops them again, as they equal the lower ones.
pub(super) fn restore_metadata(lower: &Stack, merged: &Path) -> anyhow::Result<usize> {
    let mut restored = 0;
    // The change sets' entries are laid out with their metadata afterwards.
    for (rel, (m, src)) in lower
        .entries()
        .filter(|(_, (_, src))| src.starts_with(&lower.base))
    {
        let st = fs::symlink_metadata(src).with_context(|| format!("stat {}", src.display()))?;
        let mode_differs = !st.file_type().is_symlink() && st.mode() & 0o7777 != m.mode;
        // An mtime is left alone: a store file's differs from its record only when it is past
        // the clamp, and the record is then the clamp, which is what the file would record.
        if rel.is_empty()
            || (st.uid(), st.gid()) != (m.uid, m.gid)
            || mode_differs
            || m.caps.is_some()
            || !m.acls.is_empty()
        {
            sandbox::apply_meta(&merged.join(rel), m)
                .with_context(|| format!("restoring the metadata of /{rel}"))?;
            restored += 1;
        }
    }
    Ok(restored)
}

/// Lay the change set `cs` (a layer's output) onto the tree `root`: its entries with their
/// recorded metadata, and each whiteout's path removed.
pub(super) fn apply_change_set(cs: &Path, root: &Path) -> anyhow::Result<()> {
    let meta = TreeMeta::read(&sidecar(cs))?;
    let mut entries = TreeMeta::default();
    for (rel, m) in meta.entries {
        match whiteout_target(&rel)? {
            Some(target) => {
                let p = root.join(&target);
                match fs::symlink_metadata(&p) {
                    Ok(md) if md.is_dir() => fs::remove_dir_all(&p),
                    Ok(_) => fs::remove_file(&p),
                    Err(_) => Ok(()),
                }
                .with_context(|| format!("removing {}", p.display()))?;
            }
            None => {
                entries.entries.insert(rel, m);
            }
        }
    }
    super::materialize_entries(cs, &entries, "", root, false)
}

/// After a layer's steps: move what the overlay's `upper` directory holds and differs from
/// `lower` into `out`, as an OCI change set. Each changed or added entry comes with its parent
/// directories; each deleted path gets a `.wh.NAME` entry (the topmost one of a deleted subtree
/// only, never an opaque whiteout). A path whose type changed is written whole. The entries keep
/// their metadata; whiteouts are the sandbox root's, 0644.
pub(super) fn change_set(
    upper: &Path,
    lower: &Stack,
    out: &Path,
    clamp: i64,
) -> anyhow::Result<()> {
    let mut cs = ChangeSet {
        upper,
        lower,
        out,
        clamp,
        dirs: BTreeMap::new(),
    };
    fs::create_dir_all(out)?;
    cs.dirs
        .insert(String::new(), sandbox::entry_meta(upper, clamp)?);
    cs.walk("", false)?;
    // Directories last, deepest first: making entries below them moved their mtimes.
    for (rel, m) in cs.dirs.iter().rev() {
        sandbox::apply_meta(&out.join(rel), m)?;
    }
    Ok(())
}

struct ChangeSet<'a> {
    upper: &'a Path,
    lower: &'a Stack,
    out: &'a Path,
    clamp: i64,
    /// The directories made in `out`, with the metadata they get once everything is in.
    dirs: BTreeMap<String, EntryMeta>,
}

impl ChangeSet<'_> {
    /// The change set below the upper directory `dir`. `hidden`: an opaque directory above it
    /// hides everything the lower layers had below it (a directory made inside an opaque one is
    /// not marked opaque itself).
    fn walk(&mut self, dir: &str, hidden: bool) -> anyhow::Result<()> {
        let at = self.upper.join(dir);
        let hidden = hidden || (!dir.is_empty() && sandbox::is_opaque(&at)?);
        let mut names: Vec<_> = fs::read_dir(&at)
            .with_context(|| format!("reading {}", at.display()))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        // What the lower layers had here and the directory no longer holds: everything, below
        // an opaque directory; else what lower layers' change sets had laid out in the upper
        // directory (deleting those leaves no whiteout, as the base never had them). Asked
        // before anything here is moved out.
        let base = &self.lower.base;
        let gone: Vec<String> = self
            .lower
            .children(dir)
            .filter(|c| {
                names
                    .binary_search_by(|n| n.as_str().cmp(split(c).1))
                    .is_err()
            })
            .filter(|c| {
                hidden
                    || self
                        .lower
                        .get(c)
                        .is_some_and(|(_, src)| !src.starts_with(base))
            })
            .map(str::to_owned)
            .collect();
        for rel in gone {
            self.whiteout(&rel)?;
        }
        for name in names {
            let rel = join(dir, &name);
            let path = self.upper.join(&rel);
            let md = fs::symlink_metadata(&path)?;
            if sandbox::is_whiteout(&md) {
                if self.lower.get(&rel).is_some() {
                    self.whiteout(&rel)?;
                }
                continue;
            }
            if name.starts_with(WHITEOUT) {
                bail!("/{rel}: a name beginning with {WHITEOUT} cannot be shipped in an OCI layer");
            }
            let mut um = sandbox::entry_meta(&path, self.clamp)?;
            let changed = match self.lower.get(&rel) {
                None => true,
                Some((lm, src)) => {
                    // Overlay keeps a copied-up entry's mtime (and its parent's): the store
                    // file's, which depends on how the store got it (built or substituted).
                    // Such an mtime stands for the recorded one.
                    if fs::symlink_metadata(src).is_ok_and(|s| s.mtime() == md.mtime()) {
                        um.mtime = lm.mtime;
                    }
                    differs(src, &path, lm, &um)?
                }
            };
            if md.is_dir() {
                if changed {
                    self.parents(&rel)?;
                    fs::create_dir(self.out.join(&rel))?;
                    self.dirs.insert(rel.clone(), um);
                }
                self.walk(&rel, hidden)?;
            } else if changed {
                self.parents(&rel)?;
                let to = self.out.join(&rel);
                fs::rename(&path, &to)
                    .with_context(|| format!("moving /{rel} into the change set"))?;
                sandbox::apply_meta(&to, &um)?;
            }
        }
        Ok(())
    }

    /// Make `rel`'s parent directories in `out`, each with the upper directory's metadata.
    fn parents(&mut self, rel: &str) -> anyhow::Result<()> {
        let (dir, _) = split(rel);
        if self.dirs.contains_key(dir) {
            return Ok(());
        }
        self.parents(dir)?;
        fs::create_dir(self.out.join(dir))?;
        let at = self.upper.join(dir);
        let mut m = sandbox::entry_meta(&at, self.clamp)?;
        if let Some((lm, src)) = self.lower.get(dir) {
            let mtime = |p: &Path| fs::symlink_metadata(p).map(|m| m.mtime()).ok();
            if mtime(src).is_some() && mtime(src) == mtime(&at) {
                m.mtime = lm.mtime;
            }
        }
        self.dirs.insert(dir.to_owned(), m);
        Ok(())
    }

    fn whiteout(&mut self, rel: &str) -> anyhow::Result<()> {
        self.parents(rel)?;
        let p = self.out.join(whiteout_of(rel));
        fs::write(&p, b"")?;
        // The sandbox's root makes it; its mtime is clamped when the change set is recorded.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree output at `root`: `(path, Some(content))` files, `(path, None)` directories.
    fn output(root: &Path, entries: &[(&str, Option<&str>)]) -> PathBuf {
        let mut meta = TreeMeta::default();
        fs::create_dir_all(root).unwrap();
        meta.entries
            .insert(String::new(), EntryMeta::root(0o755, 0));
        for (rel, content) in entries {
            let p = root.join(rel);
            match content {
                Some(c) => fs::write(&p, c).unwrap(),
                None => fs::create_dir(&p).unwrap(),
            }
            let mode = if content.is_some() { 0o644 } else { 0o755 };
            meta.entries
                .insert(rel.to_string(), EntryMeta::root(mode, 0));
        }
        meta.write(&sidecar(root)).unwrap();
        root.to_owned()
    }

    #[test]
    fn change_sets_delete_replace_and_add_over_the_base() {
        let t = tempfile::tempdir().unwrap();
        let base = output(
            &t.path().join("base"),
            &[
                ("etc", None),
                ("etc/gone", Some("bye")),
                ("opt", None),
                ("opt/x", None),
                ("opt/x/a", Some("old")),
                ("keep", Some("same")),
            ],
        );
        let one = output(
            &t.path().join("one"),
            &[
                ("etc", None),
                ("etc/.wh.gone", Some("")),
                ("opt", None),
                ("opt/x", Some("now a file")),
                ("new", Some("n")),
            ],
        );
        let two = output(
            &t.path().join("two"),
            &[("opt", None), ("opt/.wh.x", Some(""))],
        );
        let stack = Stack::compose(&base, &[one.clone(), two]).unwrap();
        let paths: Vec<&str> = stack.entries().map(|(k, _)| k.as_str()).collect();
        assert_eq!(paths, ["", "etc", "keep", "new", "opt"]);
        assert_eq!(stack.get("keep").unwrap().1, base.join("keep"));
        assert_eq!(stack.get("new").unwrap().1, one.join("new"));
        assert_eq!(
            stack.children("").collect::<Vec<_>>(),
            ["etc", "keep", "new", "opt"]
        );

        // Laid onto a copy of the base, the change sets give the same tree.
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        for d in ["etc", "opt", "opt/x"] {
            fs::create_dir(root.join(d)).unwrap();
        }
        fs::write(root.join("etc/gone"), "bye").unwrap();
        fs::write(root.join("opt/x/a"), "old").unwrap();
        apply_change_set(&one, &root).unwrap();
        assert!(!root.join("etc/gone").exists());
        assert_eq!(
            fs::read_to_string(root.join("opt/x")).unwrap(),
            "now a file"
        );
        assert_eq!(fs::read_to_string(root.join("new")).unwrap(), "n");
    }

    #[test]
    fn only_rbuilds_own_whiteouts_are_read() {
        assert_eq!(whiteout_target("a/.wh.b").unwrap().as_deref(), Some("a/b"));
        assert_eq!(whiteout_target(".wh.b").unwrap().as_deref(), Some("b"));
        assert_eq!(whiteout_target("a/b.wh.c").unwrap(), None);
        assert!(whiteout_target("a/.wh..wh..opq").is_err());
        assert!(whiteout_target("a/.wh.").is_err());
        assert_eq!(whiteout_of("a/b"), "a/.wh.b");
    }
}
