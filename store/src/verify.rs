//! Checking that registered outputs are still what was registered: every output is hashed again
//! (with its sidecar) and compared with the content hash recorded at registration; where they
//! differ, the per-path listing recorded in the same walk names the paths.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::hash::{self, Listing, PathChange, VisitNode};
use crate::meta::{self, TreeMeta};
use crate::{Registered, Store, StoreError};

/// How an output differs from its registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The output's path is gone.
    Missing,
    /// It cannot be hashed any more: an unreadable file, a fifo or device put into it, an
    /// unreadable sidecar.
    Unreadable(String),
    /// It hashes to something else. `changes` are the paths that differ from the listing
    /// recorded at registration, or `None` when the output was registered before rbuild kept
    /// listings (then only the hash says it differs).
    Differs {
        actual: String,
        changes: Option<Vec<PathChange>>,
    },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Missing => f.write_str("missing"),
            Damage::Unreadable(e) => write!(f, "cannot be hashed: {e}"),
            Damage::Differs { actual, .. } => write!(f, "hashes to {actual}"),
        }
    }
}

impl Damage {
    /// One line: what is wrong, and the first paths that differ.
    pub fn summary(&self) -> String {
        match self {
            Damage::Missing => "it is missing".into(),
            Damage::Unreadable(e) => format!("it cannot be hashed: {e}"),
            Damage::Differs {
                changes: Some(changes),
                ..
            } if !changes.is_empty() => {
                let first: Vec<String> = changes
                    .iter()
                    .take(5)
                    .map(|c| format!("{}: {}", c.path, c.change))
                    .collect();
                let more = changes.len() - first.len();
                format!(
                    "it {self}, not its registered content hash; {}{}",
                    first.join("; "),
                    if more > 0 {
                        format!(" (and {more} more paths)")
                    } else {
                        String::new()
                    }
                )
            }
            Damage::Differs { .. } => format!(
                "it {self}, not its registered content hash (registered before rbuild kept per-path listings: the paths cannot be named)"
            ),
        }
    }
}

/// The check of one output.
#[derive(Debug, Clone)]
pub struct Checked {
    pub output: Registered,
    /// Bytes of file contents read.
    pub bytes: u64,
    /// Whether registration recorded a per-path listing (outputs registered before rbuild kept
    /// listings have none: their damage is found, its paths cannot be named).
    pub listed: bool,
    /// `None`: intact.
    pub damage: Option<Damage>,
}

/// Hash `out` again (with its sidecar, if it has one) and list it: the content hash, the listing
/// and the bytes read. `visit` sees every path of the walk.
pub fn rehash(
    out: &Path,
    opts: &hash::Options,
    visit: &mut dyn FnMut(&hash::Visit) -> Result<(), StoreError>,
) -> Result<(hash::Hashed, Option<TreeMeta>, u64), StoreError> {
    let side = meta::sidecar(out);
    let tree_meta = match std::fs::symlink_metadata(&side) {
        Ok(_) => Some(TreeMeta::read(&side)?),
        Err(_) => None,
    };
    let mut bytes = 0u64;
    let hashed = hash::walk(out, tree_meta.as_ref(), opts, &mut |v| {
        if let VisitNode::File { size, .. } = v.node {
            bytes += size;
        }
        visit(v)
    })?;
    Ok((hashed, tree_meta, bytes))
}

/// Compare a fresh walk with a registration: `None` if it matches, else the damage (the paths
/// named from `recorded`, the listing registration kept, if any).
pub fn compare(
    registered_hash: &str,
    recorded: Option<&Listing>,
    actual: &hash::Hashed,
) -> Option<Damage> {
    if actual.content_hash == registered_hash {
        return None;
    }
    Some(Damage::Differs {
        actual: actual.content_hash.clone(),
        changes: recorded.map(|l| l.diff(&actual.listing)),
    })
}

/// What differs at `rel` between two copies of an output on disk, `was` (with its sidecar
/// `was_meta`) and `now`: for each side, its type, mode, owner, capabilities and ACLs, and for
/// files their sizes and, when both are short text, the lines that differ. One line each.
pub fn explain(
    was: &Path,
    was_meta: Option<&TreeMeta>,
    now: &Path,
    now_meta: Option<&TreeMeta>,
    rel: &str,
) -> Vec<String> {
    let at = |root: &Path| {
        if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(rel)
        }
    };
    let (a, b) = (at(was), at(now));
    let describe = |p: &Path, m: Option<&TreeMeta>| -> String {
        let Ok(md) = std::fs::symlink_metadata(p) else {
            return "absent".into();
        };
        let kind = if md.is_dir() {
            "directory".to_owned()
        } else if md.file_type().is_symlink() {
            format!(
                "symlink to {}",
                std::fs::read_link(p)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default()
            )
        } else {
            format!("file of {} bytes", md.len())
        };
        match m.and_then(|m| m.get(rel)) {
            Some(e) => {
                let mut s = format!("{kind}, mode {:o}, owner {}:{}", e.mode, e.uid, e.gid);
                if let Some(c) = &e.caps {
                    s.push_str(&format!(", capabilities {c}"));
                }
                for (n, v) in &e.acls {
                    s.push_str(&format!(", {n} {v}"));
                }
                s
            }
            None => kind,
        }
    };
    let (da, db) = (describe(&a, was_meta), describe(&b, now_meta));
    let mut out = Vec::new();
    if da != db {
        out.push(format!("registered: {da}"));
        out.push(format!("rebuilt:    {db}"));
    }
    const TEXT_LIMIT: u64 = 256 * 1024;
    let text = |p: &Path| -> Option<String> {
        let md = std::fs::symlink_metadata(p).ok()?;
        if !md.is_file() || md.len() > TEXT_LIMIT {
            return None;
        }
        String::from_utf8(std::fs::read(p).ok()?)
            .ok()
            .filter(|t| !t.contains('\0'))
    };
    match (text(&a), text(&b)) {
        (Some(ta), Some(tb)) if ta != tb => {
            let diff = similar::TextDiff::from_lines(&ta, &tb);
            let mut lines = 0;
            for change in diff.iter_all_changes() {
                let sign = match change.tag() {
                    similar::ChangeTag::Delete => "-",
                    similar::ChangeTag::Insert => "+",
                    similar::ChangeTag::Equal => continue,
                };
                if lines == 12 {
                    out.push("  …".into());
                    break;
                }
                out.push(format!(
                    "  {sign} {}",
                    change.value().trim_end_matches('\n')
                ));
                lines += 1;
            }
        }
        _ => {
            let same_size = std::fs::metadata(&a).ok().map(|m| m.len())
                == std::fs::metadata(&b).ok().map(|m| m.len());
            if out.is_empty() && same_size {
                out.push("same type, metadata and size; the bytes differ".into());
            }
        }
    }
    out
}

/// Check one registered output.
pub fn check(store: &Store, output: &Registered) -> Result<Checked, StoreError> {
    let recorded = store.listing(&output.drv_hash, &output.output.content_hash)?;
    let path = &output.output.path;
    let done = |bytes, damage| Checked {
        output: output.clone(),
        bytes,
        listed: recorded.is_some(),
        damage,
    };
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(done(0, Some(Damage::Missing)));
    }
    let opts = hash::Options {
        list: recorded.is_some(),
        sha256: false,
    };
    match rehash(path, &opts, &mut |_| Ok(())) {
        Ok((hashed, _, bytes)) => Ok(done(
            bytes,
            compare(&output.output.content_hash, recorded.as_ref(), &hashed),
        )),
        Err(e) => Ok(done(0, Some(Damage::Unreadable(e.to_string())))),
    }
}

/// Check `outputs` on `threads` threads, each taking the next unchecked output: trees first
/// (their size is unknown until walked), then files, largest first, so no thread is left with a
/// big output at the end. Results come back in the order of `outputs`.
pub fn check_all(
    store: &Store,
    outputs: &[Registered],
    threads: usize,
) -> Result<Vec<Checked>, StoreError> {
    let mut order: Vec<(u64, usize)> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let size = match std::fs::symlink_metadata(&o.output.path) {
                Ok(md) if md.is_file() => md.len(),
                _ => u64::MAX,
            };
            (size, i)
        })
        .collect();
    order.sort_by(|a, b| b.cmp(a));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Checked, StoreError>>>> =
        Mutex::new(outputs.iter().map(|_| None).collect());
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1).min(outputs.len().max(1)) {
            sc.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(_, i)) = order.get(n) else { break };
                let o = &outputs[i];
                let r = check(store, o);
                results.lock().expect("results lock")[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .expect("results lock")
        .into_iter()
        .map(|r| r.expect("every output checked"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DrvRecord;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn register(store: &Store, hash: &str, files: &[(&str, &[u8])]) -> Registered {
        let b = store.new_build_dir("t").unwrap();
        let out = b.path().join("out");
        fs::create_dir(&out).unwrap();
        for (name, bytes) in files {
            fs::write(out.join(name), bytes).unwrap();
        }
        let rec = DrvRecord {
            hash: hash.into(),
            name: format!("n-{hash}"),
            stage: "pack".into(),
            json: "{}".into(),
            inputs: vec![],
        };
        store.register(&rec, &out).unwrap();
        store
            .outputs()
            .unwrap()
            .into_iter()
            .find(|r| r.drv_hash == hash)
            .unwrap()
    }

    #[test]
    fn intact_outputs_pass_and_damaged_ones_name_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = register(&store, "a", &[("f", b"one"), ("g", b"two")]);
        let b = register(&store, "b", &[("f", b"three")]);
        let c = register(&store, "c", &[("f", b"four")]);
        assert_eq!(a.name, "n-a");
        let all = store.outputs().unwrap();
        let checked = check_all(&store, &all, 2).unwrap();
        assert!(checked.iter().all(|c| c.damage.is_none()), "{checked:?}");
        assert_eq!(checked.iter().map(|c| c.bytes).sum::<u64>(), 3 + 3 + 5 + 4);

        fs::write(a.output.path.join("g"), b"twO").unwrap();
        fs::remove_dir_all(&c.output.path).unwrap();
        let checked = check_all(&store, &all, 2).unwrap();
        let damage: Vec<_> = checked.iter().map(|c| c.damage.clone()).collect();
        let Some(Damage::Differs {
            changes: Some(changes),
            ..
        }) = &damage[0]
        else {
            panic!("{damage:?}")
        };
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].path, "g");
        assert_eq!(changes[0].change, hash::Change::Contents);
        assert_eq!(damage[1], None, "b is intact");
        assert_eq!(damage[2], Some(Damage::Missing));

        // An output registered before listings existed: damage is found, paths cannot be named.
        store
            .db
            .lock()
            .unwrap()
            .execute("DELETE FROM listings WHERE drv_hash = 'b'", [])
            .unwrap();
        fs::set_permissions(b.output.path.join("f"), fs::Permissions::from_mode(0o640)).unwrap();
        let unlisted = check(&store, &b).unwrap();
        assert!(!unlisted.listed);
        assert!(matches!(
            unlisted.damage,
            Some(Damage::Differs { changes: None, .. })
        ));
    }

    #[test]
    fn invalidate_removes_row_listing_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = register(&store, "a", &[("f", b"one")]);
        assert!(store
            .listing("a", &a.output.content_hash)
            .unwrap()
            .is_some());
        let rec = store.derivation("a").unwrap().unwrap();
        assert_eq!((rec.name.as_str(), rec.json.as_str()), ("n-a", "{}"));
        assert_eq!(store.invalidate("a").unwrap(), Some(a.output.clone()));
        assert_eq!(store.valid_output("a").unwrap(), None);
        assert!(store
            .listing("a", &a.output.content_hash)
            .unwrap()
            .is_none());
        assert!(!a.output.path.exists());
        assert_eq!(store.invalidate("a").unwrap(), None);
    }
}
