//! Publishing outputs: describing each as an entry and its blobs, uploading only what the
//! cache lacks, signing the entry.

use std::path::{Path, PathBuf};

use crate::hash::{Listing, Options as HashOptions, VisitNode};

use super::{
    BackendError, BinaryCache, BlobRef, CacheEntry, CacheError, CacheNode, DamageDetail, EntryBody,
    SecretKey,
};

/// Describe a registered output (a file or a tree) for publishing, and check it against its
/// registration in the same walk: an output that no longer hashes to `content_hash` is refused
/// ([`CacheError::Damaged`], naming the paths that differ from `listing` when there is one), so
/// nothing damaged is ever signed.
pub fn describe(
    drv_hash: &str,
    name: &str,
    content_hash: &str,
    out: &Path,
    listing: Option<&Listing>,
) -> Result<(EntryBody, Vec<(BlobRef, PathBuf)>), CacheError> {
    let damaged = |detail: DamageDetail| CacheError::Damaged {
        drv: drv_hash.into(),
        name: name.into(),
        path: out.display().to_string(),
        detail: Box::new(detail),
    };
    let mut nodes = Vec::new();
    let mut files = Vec::new();
    let opts = HashOptions {
        list: listing.is_some(),
        sha256: true,
    };
    let walked = crate::verify::rehash(out, &opts, &mut |v| {
        let path = v.rel.to_owned();
        nodes.push(match &v.node {
            VisitNode::Dir => CacheNode::Dir {
                path,
                mode: v.mode & 0o777,
            },
            VisitNode::File {
                blake3,
                sha256,
                size,
            } => {
                let blob = BlobRef {
                    sha256: hex::encode(sha256.expect("asked for sha256")),
                    blake3: Some(blake3.to_hex().to_string()),
                    size: *size,
                };
                files.push((blob.clone(), v.path.to_owned()));
                CacheNode::File {
                    path,
                    mode: v.mode & 0o777,
                    sha256: blob.sha256,
                    size: blob.size,
                    blake3: blob.blake3,
                }
            }
            VisitNode::Symlink { target } => CacheNode::Symlink {
                path,
                target: target.to_string_lossy().into_owned(),
            },
            VisitNode::Hardlink { first } => CacheNode::Hardlink {
                path,
                target: (*first).to_owned(),
            },
        });
        Ok(())
    });
    let (hashed, meta, _) = walked.map_err(|e| damaged(DamageDetail::Unreadable(e)))?;
    if let Some(damage) = crate::verify::compare(content_hash, listing, &hashed) {
        return Err(damaged(DamageDetail::Changed(damage)));
    }
    Ok((
        EntryBody {
            drv_hash: drv_hash.into(),
            name: name.into(),
            content_hash: content_hash.into(),
            nodes,
            meta,
        },
        files,
    ))
}

/// A registered output to publish: derivation hash, name, content hash (as registered), path,
/// and the per-path listing registration recorded (to name what differs if it is damaged).
pub struct Publish<'a> {
    pub drv_hash: &'a str,
    pub name: &'a str,
    pub content_hash: &'a str,
    pub path: &'a Path,
    pub listing: Option<&'a Listing>,
}

/// What [`push_many`] did.
#[derive(Debug, Default)]
pub struct Pushed {
    /// Blobs uploaded (the cache lacked them).
    pub uploaded: usize,
    /// Entries signed and published.
    pub entries: usize,
    /// Outputs refused because they no longer match their registration
    /// ([`CacheError::Damaged`]); the others were pushed.
    pub refused: Vec<CacheError>,
}

/// Publish a registered output: missing blobs first (asked in one batch), the signed entry only
/// once they are all there. Returns how many blobs were uploaded. An output that does not hash
/// to `content_hash` any more is refused ([`CacheError::Damaged`]).
pub fn push(
    cache: &dyn BinaryCache,
    key: &SecretKey,
    drv_hash: &str,
    name: &str,
    content_hash: &str,
    out: &Path,
) -> Result<usize, CacheError> {
    let mut pushed = push_many(
        cache,
        key,
        &[Publish {
            drv_hash,
            name,
            content_hash,
            path: out,
            listing: None,
        }],
    )?;
    match pushed.refused.pop() {
        Some(e) => Err(e),
        None => Ok(pushed.uploaded),
    }
}

/// Publish many outputs (a closure) at once: one existence query for the blobs of all of them,
/// one upload of what is missing (deduplicated across outputs), then the signed entries, several
/// at a time. Every output is hashed again in the walk that lists it, and one that no longer
/// matches its registration is refused (reported in [`Pushed::refused`]) while the others go.
pub fn push_many(
    cache: &dyn BinaryCache,
    key: &SecretKey,
    outputs: &[Publish],
) -> Result<Pushed, CacheError> {
    let mut bodies = Vec::with_capacity(outputs.len());
    let mut files: Vec<(BlobRef, PathBuf)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut refused = Vec::new();
    for d in describe_all(outputs) {
        match d {
            Ok((body, f)) => {
                files.extend(f.into_iter().filter(|(b, _)| seen.insert(b.clone())));
                bodies.push(body);
            }
            Err(e @ CacheError::Damaged { .. }) => refused.push(e),
            Err(e) => return Err(e),
        }
    }
    let entries_count = bodies.len();
    let all: Vec<BlobRef> = files.iter().map(|(b, _)| b.clone()).collect();
    let missing: std::collections::HashSet<BlobRef> =
        cache.missing_blobs(&all)?.into_iter().collect();
    let upload: Vec<(BlobRef, PathBuf)> = files
        .into_iter()
        .filter(|(b, _)| missing.contains(b))
        .collect();
    cache.put_blobs(&upload)?;
    let entries: Vec<(String, Vec<u8>)> = bodies
        .into_iter()
        .map(|body| {
            let drv = body.drv_hash.clone();
            let entry = CacheEntry {
                signatures: vec![key.sign(&body)],
                body,
            };
            (drv, serde_json::to_vec(&entry).expect("entries serialize"))
        })
        .collect();
    for chunk in entries.chunks(8) {
        std::thread::scope(|sc| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(drv, bytes)| sc.spawn(move || cache.put_entry(drv, bytes)))
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(CacheError::Backend {
                        url: cache.url().to_owned(),
                        source: Box::new(BackendError::UploadPanicked),
                    })
                })
            })
        })?;
    }
    Ok(Pushed {
        uploaded: upload.len(),
        entries: entries_count,
        refused,
    })
}

pub(crate) type Described = Result<(EntryBody, Vec<(BlobRef, PathBuf)>), CacheError>;

/// [`describe`] each output, on as many threads as there are cores (hashing is most of a push's
/// local work); results in the order of `outputs`.
pub(crate) fn describe_all(outputs: &[Publish]) -> Vec<Described> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(outputs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<Described>>> =
        std::sync::Mutex::new(outputs.iter().map(|_| None).collect());
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(o) = outputs.get(i) else { break };
                let r = describe(o.drv_hash, o.name, o.content_hash, o.path, o.listing);
                results.lock().expect("results lock")[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .expect("results lock")
        .into_iter()
        .map(|r| r.expect("every output described"))
        .collect()
}
