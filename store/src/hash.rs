//! Canonical content hashing of an output (a file or a tree), NAR-style.
//!
//! The hash is a pure function of what a user of the output could observe: for every path, in
//! byte-wise sorted order, its type, its metadata (numeric owner, full mode, clamped mtime, file
//! capabilities — from the tree's [`TreeMeta`] when there is one), symlink targets, hardlink
//! structure and file contents. It never depends on the store's location, the host user or the
//! subordinate ids a sandbox used, so it is the same on every machine.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::meta::TreeMeta;
use crate::StoreError;

/// Hash an output. `meta` is the tree's recorded metadata, if the builder wrote any.
pub fn content_hash(path: &Path, meta: Option<&TreeMeta>) -> Result<String, StoreError> {
    Ok(walk(path, meta, &Options::default(), &mut |_| Ok(()))?.content_hash)
}

/// Hash an output and list it, path by path, in one walk (what registration records).
pub fn hash_and_list(path: &Path, meta: Option<&TreeMeta>) -> Result<Hashed, StoreError> {
    let opts = Options {
        list: true,
        ..Options::default()
    };
    walk(path, meta, &opts, &mut |_| Ok(()))
}

/// Hash one file's contents with blake3 (streaming).
pub fn file_blake3(path: &Path) -> Result<blake3::Hash, StoreError> {
    Ok(read_file(path, false)?.0)
}

/// A file's blake3, and its sha256 when asked, and its size, in one read.
fn read_file(path: &Path, sha: bool) -> Result<(blake3::Hash, Option<[u8; 32]>, u64), StoreError> {
    let mut f = fs::File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut h = blake3::Hasher::new();
    let mut s = sha.then(Sha256::new);
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| StoreError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some(s) = s.as_mut() {
            s.update(&buf[..n]);
        }
        size += n as u64;
    }
    Ok((h.finalize(), s.map(|s| s.finalize().into()), size))
}

/// What a walk computes besides calling its visitor.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Build the per-path [`Listing`].
    pub list: bool,
    /// Also compute each file's SHA-256 (for binary caches), in the same read.
    pub sha256: bool,
}

/// The result of a walk: the content hash, and the listing when asked for.
#[derive(Debug, Clone, Default)]
pub struct Hashed {
    pub content_hash: String,
    pub listing: Listing,
}

/// One path as the walk met it (handed to the visitor of [`walk`]).
pub struct Visit<'a> {
    pub rel: &'a str,
    pub path: &'a Path,
    /// Mode bits as on disk (permission and special bits).
    pub mode: u32,
    pub node: VisitNode<'a>,
}

pub enum VisitNode<'a> {
    Dir,
    File {
        blake3: blake3::Hash,
        /// Present when [`Options::sha256`] is set.
        sha256: Option<[u8; 32]>,
        size: u64,
    },
    Symlink {
        target: &'a Path,
    },
    /// A further name of a file met earlier in the walk, at `first`.
    Hardlink {
        first: &'a str,
    },
}

/// Walk an output in the content hash's order, hashing it and calling `visit` for every path.
pub fn walk(
    path: &Path,
    meta: Option<&TreeMeta>,
    opts: &Options,
    visit: &mut dyn FnMut(&Visit) -> Result<(), StoreError>,
) -> Result<Hashed, StoreError> {
    let mut w = Walker {
        h: blake3::Hasher::new(),
        links: HashMap::new(),
        meta,
        opts,
        listing: Vec::new(),
        visit,
    };
    w.h.update(b"rbuild-content-v1\0");
    w.entry(path, "")?;
    Ok(Hashed {
        content_hash: w.h.finalize().to_hex().to_string(),
        listing: Listing(w.listing),
    })
}

fn field(h: &mut blake3::Hasher, tag: &str, value: &[u8]) {
    h.update(tag.as_bytes());
    h.update(&(value.len() as u64).to_le_bytes());
    h.update(value);
}

/// The first 16 bytes of a field's blake3: enough to tell which path changed (the content hash
/// is what decides whether anything did).
fn short(tag: &str, value: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    field(&mut h, tag, value);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

struct Walker<'a, 'v> {
    h: blake3::Hasher,
    links: HashMap<(u64, u64), String>,
    meta: Option<&'a TreeMeta>,
    opts: &'a Options,
    listing: Vec<ListEntry>,
    visit: &'v mut dyn FnMut(&Visit) -> Result<(), StoreError>,
}

impl Walker<'_, '_> {
    /// Feed a field to the content hash (and, for the listing, return its short digest).
    fn field(&mut self, tag: &str, value: &[u8]) -> [u8; 16] {
        field(&mut self.h, tag, value);
        if self.opts.list {
            short(tag, value)
        } else {
            [0; 16]
        }
    }

    fn list(&mut self, rel: &str, kind: Kind, meta: [u8; 16], data: [u8; 16]) {
        if self.opts.list {
            self.listing.push(ListEntry {
                path: rel.to_owned(),
                kind,
                meta,
                data,
            });
        }
    }

    fn entry(&mut self, path: &Path, rel: &str) -> Result<(), StoreError> {
        let md = fs::symlink_metadata(path).map_err(|e| StoreError::io(path, e))?;
        let ft = md.file_type();
        let mode = md.permissions().mode() & 0o7777;
        self.field("path", rel.as_bytes());
        let meta_digest = match self.meta.and_then(|m| m.get(rel)) {
            Some(e) => {
                let caps = e.caps.as_deref().unwrap_or("");
                let mut text = format!("{}:{}:{:o}:{}:{}", e.uid, e.gid, e.mode, e.mtime, caps);
                // Absent ACLs add nothing, so trees without them keep their hashes.
                for (name, value) in &e.acls {
                    text.push_str(&format!(":{name}={value}"));
                }
                self.field("meta", text.as_bytes())
            }
            None if !ft.is_symlink() => self.field("mode", format!("{mode:o}").as_bytes()),
            None => [0; 16],
        };
        if ft.is_symlink() {
            let target = fs::read_link(path).map_err(|e| StoreError::io(path, e))?;
            let data = self.field("symlink", target.as_os_str().as_encoded_bytes());
            self.list(rel, Kind::Symlink, meta_digest, data);
            let node = VisitNode::Symlink { target: &target };
            (self.visit)(&Visit {
                rel,
                path,
                mode,
                node,
            })?;
        } else if ft.is_file() {
            if md.nlink() > 1 {
                let key = (md.dev(), md.ino());
                if let Some(first) = self.links.get(&key).cloned() {
                    let data = self.field("hardlink", first.as_bytes());
                    self.list(rel, Kind::Hardlink, meta_digest, data);
                    let node = VisitNode::Hardlink { first: &first };
                    return (self.visit)(&Visit {
                        rel,
                        path,
                        mode,
                        node,
                    });
                }
                self.links.insert(key, rel.to_owned());
            }
            let (blake3, sha256, size) = read_file(path, self.opts.sha256)?;
            let data = self.field("file", blake3.as_bytes());
            self.list(rel, Kind::File, meta_digest, data);
            let node = VisitNode::File {
                blake3,
                sha256,
                size,
            };
            (self.visit)(&Visit {
                rel,
                path,
                mode,
                node,
            })?;
        } else if ft.is_dir() {
            let data = self.field("dir", b"");
            self.list(rel, Kind::Dir, meta_digest, data);
            (self.visit)(&Visit {
                rel,
                path,
                mode,
                node: VisitNode::Dir,
            })?;
            let mut names: Vec<_> = fs::read_dir(path)
                .map_err(|e| StoreError::io(path, e))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(|e| StoreError::io(path, e))?;
            names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
            for name in names {
                let child_rel = if rel.is_empty() {
                    name.to_string_lossy().into_owned()
                } else {
                    format!("{rel}/{}", name.to_string_lossy())
                };
                self.entry(&path.join(&name), &child_rel)?;
            }
            self.field("end", b"");
        } else {
            return Err(StoreError::Corrupt {
                path: path.to_owned(),
                what: "outputs may hold only files, directories and symlinks (device nodes, fifos and sockets live in metadata only)".into(),
            });
        }
        Ok(())
    }
}

/// The type of a listed path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Hardlink,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Dir => b'd',
            Kind::File => b'f',
            Kind::Symlink => b'l',
            Kind::Hardlink => b'h',
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            b'd' => Kind::Dir,
            b'f' => Kind::File,
            b'l' => Kind::Symlink,
            b'h' => Kind::Hardlink,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dir => "directory",
            Kind::File => "file",
            Kind::Symlink => "symlink",
            Kind::Hardlink => "hardlink",
        }
    }
}

/// One path of a [`Listing`]: its type and short digests of what the content hash covers of it
/// (its metadata — owner, mode, mtime, capabilities — and its data: contents, symlink target or
/// the path it is a hardlink of).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub path: String,
    pub kind: Kind,
    pub meta: [u8; 16],
    pub data: [u8; 16],
}

/// An output, path by path, in the content hash's order: recorded at registration so that a
/// damaged output can be told *where* it differs, not only that it does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing(pub Vec<ListEntry>);

/// How one path differs from the recorded listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added,
    Deleted,
    Contents,
    Metadata,
    SymlinkTarget,
    HardlinkTarget,
    Type { was: Kind, now: Kind },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Added => f.write_str("added"),
            Change::Deleted => f.write_str("deleted"),
            Change::Contents => f.write_str("contents changed"),
            Change::Metadata => f.write_str("mode or owner changed"),
            Change::SymlinkTarget => f.write_str("symlink target changed"),
            Change::HardlinkTarget => f.write_str("hardlink changed"),
            Change::Type { was, now } => {
                write!(f, "type changed ({} -> {})", was.as_str(), now.as_str())
            }
        }
    }
}

/// A path that differs, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathChange {
    pub path: String,
    pub change: Change,
}

impl Listing {
    /// The compact form kept in the store's database: per path, its type code, the two
    /// digests and the path, NUL-terminated.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.0.len() * 64);
        for e in &self.0 {
            v.push(e.kind.code());
            v.extend_from_slice(&e.meta);
            v.extend_from_slice(&e.data);
            v.extend_from_slice(e.path.as_bytes());
            v.push(0);
        }
        v
    }

    pub fn decode(mut b: &[u8]) -> Option<Listing> {
        let mut entries = Vec::new();
        while !b.is_empty() {
            let kind = Kind::from_code(*b.first()?)?;
            let meta = b.get(1..17)?.try_into().ok()?;
            let data = b.get(17..33)?.try_into().ok()?;
            let rest = b.get(33..)?;
            let end = rest.iter().position(|c| *c == 0)?;
            let path = String::from_utf8(rest[..end].to_vec()).ok()?;
            entries.push(ListEntry {
                path,
                kind,
                meta,
                data,
            });
            b = &rest[end + 1..];
        }
        Some(Listing(entries))
    }

    /// The paths where `actual` differs from this (recorded) listing: in the recorded order,
    /// then the added ones. Below a path added or deleted as a whole, nothing more is named.
    pub fn diff(&self, actual: &Listing) -> Vec<PathChange> {
        let now: HashMap<&str, &ListEntry> =
            actual.0.iter().map(|e| (e.path.as_str(), e)).collect();
        let was: HashMap<&str, &ListEntry> = self.0.iter().map(|e| (e.path.as_str(), e)).collect();
        let mut out = Vec::new();
        let mut gone: Option<&str> = None;
        let below = |p: &str, dir: Option<&str>| {
            dir.is_some_and(|d| {
                d.is_empty() || p.strip_prefix(d).is_some_and(|r| r.starts_with('/'))
            })
        };
        for e in &self.0 {
            if below(&e.path, gone) {
                continue;
            }
            let change = match now.get(e.path.as_str()) {
                None => {
                    gone = Some(&e.path);
                    Some(Change::Deleted)
                }
                Some(n) if n.kind != e.kind => {
                    gone = Some(&e.path);
                    Some(Change::Type {
                        was: e.kind,
                        now: n.kind,
                    })
                }
                Some(n) if n.data != e.data => Some(match e.kind {
                    Kind::Symlink => Change::SymlinkTarget,
                    Kind::Hardlink => Change::HardlinkTarget,
                    _ => Change::Contents,
                }),
                Some(n) if n.meta != e.meta => Some(Change::Metadata),
                Some(_) => None,
            };
            if let Some(change) = change {
                out.push(PathChange {
                    path: e.path.clone(),
                    change,
                });
            }
        }
        // Below a path whose type changed (a file replaced by a directory), everything is new.
        let retyped: Vec<String> = out
            .iter()
            .filter(|c| matches!(c.change, Change::Type { .. }))
            .map(|c| c.path.clone())
            .collect();
        let mut added: Option<&str> = None;
        for e in &actual.0 {
            if was.contains_key(e.path.as_str())
                || below(&e.path, added)
                || retyped.iter().any(|t| below(&e.path, Some(t)))
            {
                continue;
            }
            added = Some(&e.path);
            out.push(PathChange {
                path: e.path.clone(),
                change: Change::Added,
            });
        }
        out
    }
}

/// A reader that takes the SHA-256 of what is read through it (an OCI layer's diff id, in the
/// pass that compresses its tar).
pub struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
        }
    }

    /// The SHA-256 (lowercase hex) of everything read so far.
    pub fn finish(self) -> String {
        hex::encode(self.hash.finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A writer that takes the SHA-256 and length of what is written through it (a blob's digest
/// and size, in the pass that writes it).
pub struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }

    /// The SHA-256 (lowercase hex) and length of everything written so far.
    pub fn finish(self) -> (String, u64) {
        (hex::encode(self.hash.finalize()), self.size)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::EntryMeta;
    use std::os::unix::fs::symlink;

    fn tree(dir: &Path) {
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/f"), b"hello").unwrap();
        symlink("/bin/systemctl", dir.join("a/telinit")).unwrap();
    }

    #[test]
    fn same_tree_in_two_places_hashes_the_same() {
        let t1 = tempfile::tempdir().unwrap();
        let t2 = tempfile::tempdir().unwrap();
        tree(t1.path());
        tree(t2.path());
        assert_eq!(
            content_hash(t1.path(), None).unwrap(),
            content_hash(t2.path(), None).unwrap()
        );
    }

    #[test]
    fn content_owner_mode_symlink_and_caps_all_change_the_hash() {
        let t = tempfile::tempdir().unwrap();
        tree(t.path());
        let mut meta = TreeMeta::default();
        let e = EntryMeta::root(0o644, 0);
        meta.entries.insert("a/b/f".into(), e.clone());
        let base = content_hash(t.path(), Some(&meta)).unwrap();

        let mut m2 = meta.clone();
        m2.entries.get_mut("a/b/f").unwrap().uid = 100;
        assert_ne!(base, content_hash(t.path(), Some(&m2)).unwrap(), "owner");
        let mut m3 = meta.clone();
        m3.entries.get_mut("a/b/f").unwrap().mode = 0o4755;
        assert_ne!(
            base,
            content_hash(t.path(), Some(&m3)).unwrap(),
            "setuid mode"
        );
        let mut m4 = meta.clone();
        m4.entries.get_mut("a/b/f").unwrap().caps = Some("01".into());
        assert_ne!(base, content_hash(t.path(), Some(&m4)).unwrap(), "caps");
        let mut m5 = meta.clone();
        m5.entries
            .get_mut("a/b/f")
            .unwrap()
            .acls
            .insert(crate::meta::ACL_XATTRS[0].into(), "02".into());
        assert_ne!(base, content_hash(t.path(), Some(&m5)).unwrap(), "acls");

        fs::write(t.path().join("a/b/f"), b"hellO").unwrap();
        assert_ne!(
            base,
            content_hash(t.path(), Some(&meta)).unwrap(),
            "content"
        );
        fs::write(t.path().join("a/b/f"), b"hello").unwrap();
        assert_eq!(base, content_hash(t.path(), Some(&meta)).unwrap());
        fs::remove_file(t.path().join("a/telinit")).unwrap();
        symlink("/home/u/rootfs/bin/systemctl", t.path().join("a/telinit")).unwrap();
        assert_ne!(
            base,
            content_hash(t.path(), Some(&meta)).unwrap(),
            "symlink"
        );
    }

    /// The listing of `dir` (and that listing does not change the content hash).
    fn listed(dir: &Path) -> Listing {
        let h = hash_and_list(dir, None).unwrap();
        assert_eq!(h.content_hash, content_hash(dir, None).unwrap());
        let back = Listing::decode(&h.listing.encode()).expect("round trip");
        assert_eq!(back, h.listing);
        h.listing
    }

    fn changes(d: &[PathChange]) -> Vec<(String, String)> {
        d.iter()
            .map(|c| (c.path.clone(), c.change.to_string()))
            .collect()
    }

    #[test]
    fn listing_diff_names_each_changed_path_and_how() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("out");
        fs::create_dir(&root).unwrap();
        tree(&root);
        fs::create_dir_all(root.join("gone/deep")).unwrap();
        fs::write(root.join("gone/deep/x"), b"x").unwrap();
        fs::write(root.join("m"), b"mode").unwrap();
        fs::set_permissions(root.join("m"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(root.join("t"), b"file, then a directory").unwrap();
        let recorded = listed(&root);
        assert_eq!(recorded.diff(&listed(&root)), vec![], "unchanged");

        fs::write(root.join("a/b/f"), b"hellO").unwrap();
        fs::remove_dir_all(root.join("gone")).unwrap();
        fs::set_permissions(root.join("m"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::remove_file(root.join("a/telinit")).unwrap();
        symlink("/elsewhere", root.join("a/telinit")).unwrap();
        fs::remove_file(root.join("t")).unwrap();
        fs::create_dir_all(root.join("t/inside")).unwrap();
        fs::create_dir_all(root.join("new/sub")).unwrap();
        fs::write(root.join("new/sub/y"), b"y").unwrap();
        assert_eq!(
            changes(&recorded.diff(&listed(&root))),
            [
                ("a/b/f", "contents changed"),
                ("a/telinit", "symlink target changed"),
                ("gone", "deleted"),
                ("m", "mode or owner changed"),
                ("t", "type changed (file -> directory)"),
                ("new", "added"),
            ]
            .map(|(p, c)| (p.to_owned(), c.to_owned()))
        );
    }

    #[test]
    fn listing_diff_sees_metadata_and_hardlinks() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("x"), b"same").unwrap();
        fs::hard_link(t.path().join("x"), t.path().join("y")).unwrap();
        let mut meta = TreeMeta::default();
        meta.entries.insert("x".into(), EntryMeta::root(0o644, 0));
        let recorded = hash_and_list(t.path(), Some(&meta)).unwrap().listing;
        meta.entries.get_mut("x").unwrap().uid = 7;
        let actual = hash_and_list(t.path(), Some(&meta)).unwrap().listing;
        assert_eq!(
            changes(&recorded.diff(&actual)),
            [("x".to_owned(), "mode or owner changed".to_owned())]
        );
        // The link broken into two files: `y` is now a file of its own.
        fs::remove_file(t.path().join("y")).unwrap();
        fs::write(t.path().join("y"), b"same").unwrap();
        let actual = hash_and_list(t.path(), Some(&meta)).unwrap().listing;
        assert_eq!(
            changes(&recorded.diff(&actual)),
            [
                ("x".to_owned(), "mode or owner changed".to_owned()),
                ("y".to_owned(), "type changed (hardlink -> file)".to_owned())
            ]
        );
    }

    #[test]
    fn listing_decode_refuses_garbage() {
        assert_eq!(Listing::decode(b""), Some(Listing::default()));
        assert_eq!(Listing::decode(b"z"), None);
        let mut b = Listing(vec![ListEntry {
            path: "p".into(),
            kind: Kind::File,
            meta: [1; 16],
            data: [2; 16],
        }])
        .encode();
        b.pop(); // no terminating NUL
        assert_eq!(Listing::decode(&b), None);
    }

    #[test]
    fn hardlinks_are_part_of_the_structure() {
        let t1 = tempfile::tempdir().unwrap();
        let t2 = tempfile::tempdir().unwrap();
        for t in [&t1, &t2] {
            fs::write(t.path().join("x"), b"same").unwrap();
        }
        fs::hard_link(t1.path().join("x"), t1.path().join("y")).unwrap();
        fs::write(t2.path().join("y"), b"same").unwrap();
        assert_ne!(
            content_hash(t1.path(), None).unwrap(),
            content_hash(t2.path(), None).unwrap()
        );
    }
}
