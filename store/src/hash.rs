//! Canonical content hashing of an output (a file or a tree), NAR-style.
//!
//! The hash is a pure function of what a user of the output could observe: for every path, in
//! byte-wise sorted order, its type, its metadata (numeric owner, full mode, clamped mtime, file
//! capabilities — from the tree's [`TreeMeta`] when there is one), symlink targets, hardlink
//! structure and file contents. It never depends on the store's location, the host user or the
//! subordinate ids a sandbox used, so it is the same on every machine.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::meta::TreeMeta;
use crate::StoreError;

/// Hash an output. `meta` is the tree's recorded metadata, if the builder wrote any.
pub fn content_hash(path: &Path, meta: Option<&TreeMeta>) -> Result<String, StoreError> {
    let mut h = blake3::Hasher::new();
    h.update(b"rbuild-content-v1\0");
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    hash_entry(path, "", meta, &mut links, &mut h)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Hash one file's contents with blake3 (streaming).
pub fn file_blake3(path: &Path) -> Result<blake3::Hash, StoreError> {
    let mut f = fs::File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| StoreError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

fn field(h: &mut blake3::Hasher, tag: &str, value: &[u8]) {
    h.update(tag.as_bytes());
    h.update(&(value.len() as u64).to_le_bytes());
    h.update(value);
}

fn hash_entry(
    path: &Path,
    rel: &str,
    meta: Option<&TreeMeta>,
    links: &mut HashMap<(u64, u64), String>,
    h: &mut blake3::Hasher,
) -> Result<(), StoreError> {
    let md = fs::symlink_metadata(path).map_err(|e| StoreError::io(path, e))?;
    let ft = md.file_type();
    field(h, "path", rel.as_bytes());
    match meta.and_then(|m| m.get(rel)) {
        Some(e) => {
            let caps = e.caps.as_deref().unwrap_or("");
            let text = format!("{}:{}:{:o}:{}:{}", e.uid, e.gid, e.mode, e.mtime, caps);
            field(h, "meta", text.as_bytes());
        }
        None if !ft.is_symlink() => {
            field(
                h,
                "mode",
                format!("{:o}", md.permissions().mode() & 0o7777).as_bytes(),
            );
        }
        None => {}
    }
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(|e| StoreError::io(path, e))?;
        field(h, "symlink", target.as_os_str().as_encoded_bytes());
    } else if ft.is_file() {
        if md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            if let Some(first) = links.get(&key) {
                field(h, "hardlink", first.as_bytes());
                return Ok(());
            }
            links.insert(key, rel.to_owned());
        }
        field(h, "file", file_blake3(path)?.as_bytes());
    } else if ft.is_dir() {
        field(h, "dir", b"");
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
            hash_entry(&path.join(&name), &child_rel, meta, links, h)?;
        }
        field(h, "end", b"");
    } else {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            what: "outputs may hold only files, directories and symlinks (device nodes, fifos and sockets live in metadata only)".into(),
        });
    }
    Ok(())
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
