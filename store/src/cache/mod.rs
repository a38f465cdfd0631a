//! Binary caches: where a store's outputs are shared, signed, between machines.
//!
//! An output is published as content-addressed file blobs (by sha256, so file contents dedupe
//! across outputs and across pushes) plus one *entry* per derivation: the tree listing, the
//! ownership sidecar and the output's content hash, signed with ed25519 by the pusher. A client
//! uses an entry only if a key it trusts signed it, and checks every byte it downloads against the
//! listing before anything is registered — the store then re-hashes the whole output and compares
//! it with the signed content hash.
//!
//! Backends implement [`BinaryCache`]:
//! - [`file`]: `file:///DIR`, a directory, possibly on a shared filesystem;
//! - [`http`]: `http(s)://URL`, plain GET/PUT/HEAD of content-addressed objects;
//! - [`reapi`]: `grpc(s)://HOST:PORT[/INSTANCE]`, the Bazel Remote Execution API v2 (CAS,
//!   ByteStream and ActionCache), as served by BuildGrid, Buildbarn, bazel-remote or NativeLink;
//! - [`registry`]: `docker://HOST[:PORT]/REPOSITORY`, an OCI registry (entries are OCI artifacts).
//!
//! Every file blob is known by its SHA-256 and its BLAKE3 digest (both are in the signed entry):
//! REAPI servers that list BLAKE3 in their capabilities get BLAKE3 addresses, everything else
//! SHA-256.

pub mod file;
pub mod http;
pub mod reapi;
pub mod registry;

mod entry;
mod error;
mod fetch;
mod keys;
mod push;
mod retry;
mod runtime;

pub use entry::*;
pub use error::*;
pub use fetch::*;
pub use keys::*;
pub use push::*;

use std::io::Write;
use std::path::{Path, PathBuf};

/// How long a cache may take to connect, or to answer one request (or send the next piece of a
/// download): `RBUILD_CACHE_TIMEOUT` seconds, 30 by default. A cache slower than that is reported
/// and not used in this run.
pub fn timeout() -> std::time::Duration {
    let secs = std::env::var("RBUILD_CACHE_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(30);
    std::time::Duration::from_secs(secs)
}

/// Blobs up to this size travel whole (in batches where the backend has them); larger ones
/// stream.
pub const SMALL_BLOB: u64 = 1 << 20;

/// What a cache holds for one derivation: its entry's bytes, nothing, or why that entry alone
/// cannot be read.
pub type RawEntry = Result<Option<Vec<u8>>, CacheError>;

/// Receives small blobs whole: the index of the blob in the request, and its bytes.
pub type BlobSink<'a> = dyn FnMut(usize, Vec<u8>) -> Result<(), CacheError> + 'a;

/// A place outputs are shared through. All methods are blocking.
pub trait BinaryCache: Send + Sync {
    fn url(&self) -> &str;
    /// The signed entry of a derivation, if the cache has one.
    fn get_entry(&self, drv_hash: &str) -> Result<Option<Vec<u8>>, CacheError>;
    /// The entries of many derivations at once (backends override this to ask in parallel or
    /// in one request).
    /// The outer error is the cache's (unreachable, broken); an inner one is about that one
    /// entry (unreadable, damaged), which is then refused while the others are used.
    fn get_entries(&self, drv_hashes: &[String]) -> Result<Vec<RawEntry>, CacheError> {
        drv_hashes
            .iter()
            .map(|h| self.get_entry(h).map(Ok))
            .collect()
    }
    /// Publish an entry. Called only once every blob it names is in the cache.
    fn put_entry(&self, drv_hash: &str, bytes: &[u8]) -> Result<(), CacheError>;
    /// Which of `blobs` the cache lacks, asked in as few requests as the protocol allows.
    fn missing_blobs(&self, blobs: &[BlobRef]) -> Result<Vec<BlobRef>, CacheError>;
    /// Stream one blob into `dest`.
    fn get_blob(&self, blob: &BlobRef, dest: &mut dyn Write) -> Result<(), CacheError>;
    /// Many small blobs (each at most [`SMALL_BLOB`]), handed to `sink` whole, in any order.
    fn get_small_blobs(&self, blobs: &[BlobRef], sink: &mut BlobSink) -> Result<(), CacheError> {
        for (i, b) in blobs.iter().enumerate() {
            let mut v = Vec::with_capacity(b.size.min(SMALL_BLOB) as usize);
            self.get_blob(b, &mut v)?;
            sink(i, v)?;
        }
        Ok(())
    }
    fn put_blob(&self, blob: &BlobRef, src: &Path) -> Result<(), CacheError>;
    /// Contact the cache and say what it is (for `rbuild cache check`).
    fn check(&self) -> Result<String, CacheError> {
        self.get_entry(&"0".repeat(64))?;
        Ok("answers entry lookups".into())
    }
    /// Upload many blobs (backends batch and parallelize).
    fn put_blobs(&self, blobs: &[(BlobRef, PathBuf)]) -> Result<(), CacheError> {
        for (b, p) in blobs {
            self.put_blob(b, p)?;
        }
        Ok(())
    }
}

/// Open a cache by URL. Nothing is contacted yet.
pub fn open(url: &str) -> Result<Box<dyn BinaryCache>, CacheError> {
    if let Some(dir) = url.strip_prefix("file://") {
        return Ok(Box::new(file::FileCache::new(url, dir)));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(Box::new(http::HttpCache::new(url)?));
    }
    if url.starts_with("grpc://") || url.starts_with("grpcs://") {
        return Ok(Box::new(reapi::GrpcCache::new(url)?));
    }
    if url.starts_with("docker://") {
        return Ok(Box::new(registry::RegistryCache::new(url)?));
    }
    Err(CacheError::UnsupportedUrl(url.to_owned()))
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// The content hash `out` is registered with (as the store computes it).
    fn registered(out: &Path) -> String {
        crate::hash::content_hash(out, None).unwrap()
    }

    /// A damaged output is refused, named, and never signed; the other outputs of the same
    /// push are published.
    #[test]
    fn damaged_outputs_are_refused_and_the_others_pushed() {
        let t = tempfile::tempdir().unwrap();
        let (good, bad) = (t.path().join("good"), t.path().join("bad"));
        for (dir, bytes) in [(&good, b"good"), (&bad, b"fine")] {
            fs::create_dir_all(dir.join("d")).unwrap();
            fs::write(dir.join("d/f"), bytes).unwrap();
        }
        let (good_hash, bad_hash) = (registered(&good), registered(&bad));
        let listing = crate::hash::hash_and_list(&bad, None).unwrap().listing;
        fs::write(bad.join("d/f"), b"fin3").unwrap();
        let cache = open(&format!("file://{}", t.path().join("cache").display())).unwrap();
        let key = SecretKey::generate("k").unwrap();
        let pushed = push_many(
            cache.as_ref(),
            &key,
            &[
                Publish {
                    drv_hash: "bad",
                    name: "broken-out",
                    content_hash: &bad_hash,
                    path: &bad,
                    listing: Some(&listing),
                },
                Publish {
                    drv_hash: "good",
                    name: "good-out",
                    content_hash: &good_hash,
                    path: &good,
                    listing: None,
                },
            ],
        )
        .unwrap();
        assert_eq!((pushed.entries, pushed.uploaded), (1, 1));
        let [refused] = &pushed.refused[..] else {
            panic!("{:?}", pushed.refused)
        };
        let msg = refused.to_string();
        assert!(
            msg.contains("refusing to push broken-out (bad)")
                && msg.contains("d/f: contents changed"),
            "{msg}"
        );
        assert!(cache.get_entry("bad").unwrap().is_none(), "never signed");
        assert!(query(cache.as_ref(), "good", &[key.public()])
            .unwrap()
            .is_some());
        // One output alone: an error naming it.
        let err = push(cache.as_ref(), &key, "bad", "broken-out", &bad_hash, &bad).unwrap_err();
        assert!(matches!(err, CacheError::Damaged { .. }), "{err}");
        // A registration that does not match from the start (a wrong hash) is refused too.
        let err = push(cache.as_ref(), &key, "good", "good-out", "c1", &good).unwrap_err();
        assert!(
            err.to_string().contains("not its registered content hash"),
            "{err}"
        );
    }

    #[test]
    fn push_then_fetch_round_trips_and_dedupes_blobs() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        fs::create_dir_all(out.join("d")).unwrap();
        fs::write(out.join("d/a"), b"same").unwrap();
        fs::write(out.join("b"), b"same").unwrap();
        std::os::unix::fs::symlink("/bin/systemctl", out.join("l")).unwrap();
        let cache = open(&format!("file://{}", t.path().join("cache").display())).unwrap();
        let key = SecretKey::generate("alice-2026").unwrap();
        assert_eq!(
            push(cache.as_ref(), &key, "h1", "x", &registered(&out), &out).unwrap(),
            1,
            "one blob for two equal files"
        );
        assert_eq!(
            push(cache.as_ref(), &key, "h1", "x", &registered(&out), &out).unwrap(),
            0,
            "pushing again uploads nothing"
        );
        let entry = query(cache.as_ref(), "h1", &[key.public()])
            .unwrap()
            .unwrap();
        let dest = t.path().join("dest");
        fetch(cache.as_ref(), &entry, &dest).unwrap();
        assert_eq!(fs::read(dest.join("d/a")).unwrap(), b"same");
        assert_eq!(
            fs::read_link(dest.join("l")).unwrap(),
            Path::new("/bin/systemctl")
        );
        // Keys round-trip through their text form.
        let again = PublicKey::parse("k", &key.public().to_text()).unwrap();
        assert!(query(cache.as_ref(), "h1", &[again]).unwrap().is_some());
        assert_eq!(
            SecretKey::parse("s", &key.to_text())
                .unwrap()
                .public()
                .to_text(),
            key.public().to_text()
        );
    }

    #[test]
    fn untrusted_and_tampered_entries_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join("f"), b"good").unwrap();
        let dir = t.path().join("cache");
        let cache = open(&format!("file://{}", dir.display())).unwrap();
        let alice = SecretKey::generate("alice").unwrap();
        let mallory = SecretKey::generate("alice").unwrap(); // same name, other key
        push(cache.as_ref(), &alice, "h", "x", &registered(&out), &out).unwrap();
        let err = query(cache.as_ref(), "h", &[mallory.public()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no valid signature by a trusted key"), "{err}");
        // A changed entry no longer matches its signature.
        let p = dir.join("entries/h.json");
        let text = fs::read_to_string(&p)
            .unwrap()
            .replace(&registered(&out), "evil");
        fs::write(&p, text).unwrap();
        assert!(query(cache.as_ref(), "h", &[alice.public()]).is_err());
        // A changed blob is caught while downloading.
        push(cache.as_ref(), &alice, "h", "x", &registered(&out), &out).unwrap();
        let entry = query(cache.as_ref(), "h", &[alice.public()])
            .unwrap()
            .unwrap();
        let digest = entry.body.blobs()[0].sha256.clone();
        fs::write(dir.join("blobs/sha256").join(&digest), b"evil").unwrap();
        let err = fetch(cache.as_ref(), &entry, &t.path().join("dest"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("blob sha256"), "{err}");
    }

    #[test]
    fn entries_cannot_write_through_their_own_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let cache = open(&format!("file://{}", t.path().join("cache").display())).unwrap();
        let victim = t.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let body = EntryBody {
            drv_hash: "h".into(),
            name: "x".into(),
            content_hash: "c".into(),
            nodes: vec![
                CacheNode::Dir {
                    path: "".into(),
                    mode: 0o755,
                },
                CacheNode::Symlink {
                    path: "etc".into(),
                    target: victim.display().to_string(),
                },
                CacheNode::Dir {
                    path: "etc/sub".into(),
                    mode: 0o755,
                },
            ],
            meta: None,
        };
        let key = SecretKey::generate("k").unwrap();
        let entry = CacheEntry {
            signatures: vec![key.sign(&body)],
            body,
        };
        let err = fetch(cache.as_ref(), &entry, &t.path().join("dest"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not inside a directory of the output"),
            "{err}"
        );
        assert!(!victim.join("sub").exists());
    }

    /// A directory cache below `t` holding one pushed output, a directory with one file `name`:
    /// the cache and the output's entry (for the test to rewrite).
    fn pushed_one_file(t: &Path, name: &str, content: &[u8]) -> (Box<dyn BinaryCache>, CacheEntry) {
        let out = t.join("out");
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join(name), content).unwrap();
        let cache = open(&format!("file://{}", t.join("cache").display())).unwrap();
        let key = SecretKey::generate("k").unwrap();
        push(cache.as_ref(), &key, "h", "x", &registered(&out), &out).unwrap();
        let entry = query(cache.as_ref(), "h", &[key.public()])
            .unwrap()
            .unwrap();
        (cache, entry)
    }

    #[test]
    fn entries_cannot_write_a_file_through_their_own_symlink() {
        let t = tempfile::tempdir().unwrap();
        let (cache, mut entry) = pushed_one_file(t.path(), "f", b"evil");
        // A symlink `a` to a victim file, then a file `a` with the blob's contents.
        let victim = t.path().join("victim");
        fs::write(&victim, b"safe").unwrap();
        let file = entry.body.nodes[1].clone();
        let CacheNode::File {
            sha256,
            size,
            blake3,
            mode,
            ..
        } = file
        else {
            panic!("{file:?}")
        };
        entry.body.nodes = vec![
            entry.body.nodes[0].clone(),
            CacheNode::Symlink {
                path: "a".into(),
                target: victim.display().to_string(),
            },
            CacheNode::File {
                path: "a".into(),
                mode,
                sha256,
                size,
                blake3,
            },
        ];
        let err = fetch(cache.as_ref(), &entry, &t.path().join("dest"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listed twice"), "{err}");
        assert_eq!(fs::read(&victim).unwrap(), b"safe");
    }

    #[test]
    fn concurrent_pushes_to_one_directory_are_safe() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        fs::create_dir_all(&out).unwrap();
        for i in 0..50 {
            fs::write(out.join(i.to_string()), vec![i as u8; 1000 * i]).unwrap();
        }
        let url = format!("file://{}", t.path().join("cache").display());
        let key = SecretKey::generate("k").unwrap();
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    let cache = open(&url).unwrap();
                    push(cache.as_ref(), &key, "h", "x", &registered(&out), &out).unwrap();
                });
            }
        });
        let cache = open(&url).unwrap();
        let entry = query(cache.as_ref(), "h", &[key.public()])
            .unwrap()
            .unwrap();
        fetch(cache.as_ref(), &entry, &t.path().join("dest")).unwrap();
        for i in 0..50 {
            let name = i.to_string();
            assert_eq!(
                fs::read(t.path().join("dest").join(&name)).unwrap(),
                fs::read(out.join(&name)).unwrap()
            );
        }
        let leftovers: Vec<_> = super::props::listing(&t.path().join("cache"))
            .into_iter()
            .filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with(".tmp-")))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn fetched_files_never_get_setuid_bits() {
        let t = tempfile::tempdir().unwrap();
        let (cache, mut entry) = pushed_one_file(t.path(), "su", b"binary");
        for n in &mut entry.body.nodes {
            match n {
                CacheNode::File { mode, .. } => *mode = 0o4755,
                CacheNode::Dir { mode, .. } => *mode = 0o3777,
                _ => {}
            }
        }
        let dest = t.path().join("dest");
        fetch(cache.as_ref(), &entry, &dest).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dest.join("su")), 0o755);
        assert_eq!(mode(&dest), 0o777);
    }
}
