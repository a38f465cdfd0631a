//! Using a cache: asking it for signed entries (one or many at once) and downloading an
//! output, every byte checked against its entry before it reaches the store.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::meta::sidecar;

use super::{
    io, BinaryCache, BlobRef, CacheEntry, CacheError, CacheNode, EntryError, PublicKey, SMALL_BLOB,
};

/// Fetch and check the entry of `drv_hash`: `Ok(None)` if the cache has none.
pub fn query(
    cache: &dyn BinaryCache,
    drv_hash: &str,
    trusted: &[PublicKey],
) -> Result<Option<CacheEntry>, CacheError> {
    match cache.get_entry(drv_hash)? {
        Some(bytes) => parse_entry(drv_hash, &bytes, trusted).map(Some),
        None => Ok(None),
    }
}

/// What a cache says about one derivation: a trusted entry, none, or why its entry is refused.
pub type Answer = Result<Option<CacheEntry>, CacheError>;

/// [`query`] for many derivations in one batch. The outer error is the cache's (unreachable);
/// the inner ones are per entry (untrusted, malformed).
pub fn query_many(
    cache: &dyn BinaryCache,
    drv_hashes: &[String],
    trusted: &[PublicKey],
) -> Result<Vec<Answer>, CacheError> {
    let raw = cache.get_entries(drv_hashes)?;
    Ok(drv_hashes
        .iter()
        .zip(raw)
        .map(|(h, r)| r.and_then(|bytes| bytes.map(|b| parse_entry(h, &b, trusted)).transpose()))
        .collect())
}

/// Parse an entry and check that it is the one asked for and that a trusted key signed it.
pub(crate) fn parse_entry(
    drv_hash: &str,
    bytes: &[u8],
    trusted: &[PublicKey],
) -> Result<CacheEntry, CacheError> {
    let bad = |source: EntryError| CacheError::BadEntry {
        drv: drv_hash.into(),
        source: Box::new(source),
    };
    let entry: CacheEntry = serde_json::from_slice(bytes).map_err(|e| bad(EntryError::Json(e)))?;
    if entry.body.drv_hash != drv_hash {
        return Err(bad(EntryError::OtherDerivation(entry.body.drv_hash)));
    }
    entry.verify(trusted).map_err(|e| bad(e.into()))?;
    Ok(entry)
}

/// Recreate a (verified) entry's output at `dest` (and its sidecar), checking every blob
/// against its digest. The caller registers it, which re-hashes it against `content_hash`.
///
/// Directories and symlinks are laid out first, then small files are fetched in batches, large
/// ones streamed, and hardlinks made last. Only permission bits are applied: the store never
/// holds setuid, setgid or sticky bits (real modes live in the sidecar).
pub fn fetch(cache: &dyn BinaryCache, entry: &CacheEntry, dest: &Path) -> Result<(), CacheError> {
    let drv = &entry.body.drv_hash;
    let bad = |source: EntryError| CacheError::BadEntry {
        drv: drv.clone(),
        source: Box::new(source),
    };
    let at = |rel: &str| {
        if rel.is_empty() {
            dest.to_owned()
        } else {
            dest.join(rel)
        }
    };
    // Every path must sit in a directory this fetch created: never below a symlink.
    let mut dirs: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut paths: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut files: Vec<(&str, u32, BlobRef)> = Vec::new();
    let mut hardlinks: Vec<(&str, &str)> = Vec::new();
    for node in &entry.body.nodes {
        let rel = match node {
            CacheNode::Dir { path, .. }
            | CacheNode::File { path, .. }
            | CacheNode::Symlink { path, .. }
            | CacheNode::Hardlink { path, .. } => path.as_str(),
        };
        if rel
            .split('/')
            .any(|c| c == ".." || c == "." || c.is_empty())
            && !rel.is_empty()
            || rel.starts_with('/')
        {
            return Err(bad(EntryError::Escapes(rel.to_owned())));
        }
        if !rel.is_empty() {
            let parent = rel.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            if !dirs.contains(parent) {
                return Err(bad(EntryError::OutsideDirectory(rel.to_owned())));
            }
        } else if !matches!(node, CacheNode::Dir { .. } | CacheNode::File { .. }) {
            return Err(bad(EntryError::RootNotFileOrDirectory));
        }
        if !paths.insert(rel) {
            return Err(bad(EntryError::ListedTwice(rel.to_owned())));
        }
        let p = at(rel);
        match node {
            CacheNode::Dir { mode, .. } => {
                dirs.insert(rel);
                fs::create_dir(&p).map_err(io(p.display()))?;
                fs::set_permissions(&p, fs::Permissions::from_mode((mode & 0o777) | 0o700))
                    .map_err(io(p.display()))?;
            }
            CacheNode::File {
                mode,
                sha256,
                size,
                blake3,
                ..
            } => {
                let blob = BlobRef {
                    sha256: sha256.clone(),
                    blake3: blake3.clone(),
                    size: *size,
                };
                blob.check().map_err(|source| {
                    bad(EntryError::Digest {
                        path: rel.to_owned(),
                        source,
                    })
                })?;
                files.push((rel, *mode, blob));
            }
            CacheNode::Symlink { target, .. } => {
                std::os::unix::fs::symlink(target, &p).map_err(io(p.display()))?
            }
            CacheNode::Hardlink { target, .. } => hardlinks.push((rel, target)),
        }
    }
    let check = |rel: &str, blob: &BlobRef, actual: String, n: u64| {
        if actual != blob.sha256 || n != blob.size {
            Err(bad(EntryError::BlobMismatch {
                path: rel.to_owned(),
                actual,
                actual_size: n,
                sha256: blob.sha256.clone(),
                size: blob.size,
            }))
        } else {
            Ok(())
        }
    };
    let finish = |rel: &str, mode: u32| {
        let p = at(rel);
        fs::set_permissions(&p, fs::Permissions::from_mode((mode & 0o777) | 0o600))
            .map_err(io(p.display()))
    };
    let (small, large): (Vec<_>, Vec<_>) = files.iter().partition(|f| f.2.size <= SMALL_BLOB);
    // Equal small files are asked for once.
    let mut wanted: Vec<BlobRef> = small.iter().map(|f| f.2.clone()).collect();
    wanted.sort();
    wanted.dedup();
    let mut by_blob: std::collections::HashMap<&BlobRef, Vec<(&str, u32)>> = Default::default();
    for (rel, mode, blob) in &small {
        by_blob.entry(blob).or_default().push((rel, *mode));
    }
    let mut got = vec![false; wanted.len()];
    cache.get_small_blobs(&wanted, &mut |i, bytes| {
        let blob = wanted
            .get(i)
            .ok_or_else(|| bad(EntryError::UnaskedBlob(i)))?;
        for (rel, mode) in &by_blob[blob] {
            check(
                rel,
                blob,
                hex::encode(Sha256::digest(&bytes)),
                bytes.len() as u64,
            )?;
            let p = at(rel);
            create_new(&p)?.write_all(&bytes).map_err(io(p.display()))?;
            finish(rel, *mode)?;
        }
        got[i] = true;
        Ok(())
    })?;
    if let Some(i) = got.iter().position(|g| !g) {
        return Err(bad(EntryError::MissingBlob(wanted[i].sha256.clone())));
    }
    for (rel, mode, blob) in large {
        let p = at(rel);
        let mut f = crate::hash::HashingWriter::new(create_new(&p)?);
        cache.get_blob(blob, &mut f)?;
        let (sha256, n) = f.finish();
        check(rel, blob, sha256, n)?;
        finish(rel, *mode)?;
    }
    for (rel, target) in hardlinks {
        let target_is_file = files.iter().any(|f| f.0 == target);
        if !target_is_file {
            return Err(bad(EntryError::HardlinkTarget(target.to_owned())));
        }
        let p = at(rel);
        fs::hard_link(dest.join(target), &p).map_err(io(p.display()))?
    }
    if let Some(meta) = &entry.body.meta {
        meta.write(&sidecar(dest))
            .map_err(|e| bad(EntryError::Sidecar(e)))?;
    }
    Ok(())
}

/// Create a file that must not exist yet (so never through a symlink).
pub(crate) fn create_new(p: &Path) -> Result<fs::File, CacheError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .map_err(io(p.display()))
}
