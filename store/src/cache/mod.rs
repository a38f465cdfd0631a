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
//!   ByteStream and ActionCache), as served by BuildGrid, Buildbarn, bazel-remote or NativeLink.
//!
//! Every file blob is known by its SHA-256 and its BLAKE3 digest (both are in the signed entry):
//! REAPI servers that list BLAKE3 in their capabilities get BLAKE3 addresses, everything else
//! SHA-256.

pub mod file;
pub mod http;
pub mod reapi;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hash::{Listing, Options as HashOptions, VisitNode};
use crate::meta::{sidecar, TreeMeta};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The cache itself failed (unreachable, refusing, answering nonsense).
    #[error("binary cache {url}: {source}")]
    Backend {
        url: String,
        #[source]
        source: Box<BackendError>,
    },
    /// One entry cannot be used (the others of the cache may be).
    #[error("binary cache entry for {drv}: {source}")]
    BadEntry {
        drv: String,
        #[source]
        source: Box<EntryError>,
    },
    #[error("{path}: {msg}")]
    Key { path: String, msg: String },
    #[error("{path}: bad base64: {source}")]
    KeyBase64 {
        path: String,
        #[source]
        source: base64::DecodeError,
    },
    #[error("{path}: {source}")]
    KeyInvalid {
        path: String,
        #[source]
        source: ed25519_dalek::SignatureError,
    },
    #[error("refusing to push {name} ({drv}): {path} does not match its registration: {detail}")]
    Damaged {
        drv: String,
        name: String,
        path: String,
        #[source]
        detail: Box<DamageDetail>,
    },
    #[error("unsupported binary cache URL {0:?} (supported: file:///DIR, http(s)://HOST/PATH, grpc(s)://HOST:PORT[/INSTANCE])")]
    UnsupportedUrl(String),
}

/// Why a cache failed: the message after "binary cache URL: ".
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("an upload thread panicked")]
    UploadPanicked,
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Grpc(#[from] reapi::GrpcError),
}

/// A blob digest that is not one: nothing else becomes a file name or URL.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("not a sha256 digest: {0:?}")]
    Sha256(String),
    #[error("not a blake3 digest: {0:?}")]
    Blake3(String),
}

/// Why one entry of a cache is refused: the message after "binary cache entry for DRV: ".
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("the entry is for {0}")]
    OtherDerivation(String),
    #[error(transparent)]
    Untrusted(#[from] UntrustedEntry),
    #[error("path {0:?} escapes the output")]
    Escapes(String),
    #[error("{0:?} is not inside a directory of the output")]
    OutsideDirectory(String),
    #[error("the output itself must be a file or a directory")]
    RootNotFileOrDirectory,
    #[error("{0:?} is listed twice")]
    ListedTwice(String),
    #[error("{path}: {source}")]
    Digest {
        path: String,
        #[source]
        source: DigestError,
    },
    #[error("{path}: blob sha256 {actual} ({actual_size} bytes), the signed entry says {sha256} ({size} bytes)")]
    BlobMismatch {
        path: String,
        actual: String,
        actual_size: u64,
        sha256: String,
        size: u64,
    },
    #[error("the cache answered a blob not asked for (#{0})")]
    UnaskedBlob(usize),
    #[error("the cache did not send blob {0}")]
    MissingBlob(String),
    #[error("hardlink target {0:?} is not a file of the output")]
    HardlinkTarget(String),
    #[error(transparent)]
    Sidecar(crate::StoreError),
    #[error(
        "its ActionResult names no {} (not written by rbuild?)",
        reapi::ENTRY_FILE
    )]
    NoEntryFile,
    #[error("the entry claims {0} bytes")]
    Size(i64),
    #[error(transparent)]
    Read(reapi::GrpcError),
    #[error("the entry blob does not match its digest {0}")]
    EntryDigest(String),
}

/// No signature of an entry verifies with a trusted key.
#[derive(Debug, thiserror::Error)]
#[error(
    "no valid signature by a trusted key (signed by: {}; trusted: {})",
    names_or_nobody(.signed_by),
    .trusted.join(", ")
)]
pub struct UntrustedEntry {
    /// The key names the entry's signatures give.
    pub signed_by: Vec<String>,
    /// The names of the trusted keys.
    pub trusted: Vec<String>,
}

fn names_or_nobody(names: &[String]) -> String {
    if names.is_empty() {
        "nobody".to_owned()
    } else {
        names.join(", ")
    }
}

/// Why an output is not pushed: it cannot be hashed, or hashes to something else.
#[derive(Debug, thiserror::Error)]
pub enum DamageDetail {
    #[error(transparent)]
    Unreadable(crate::StoreError),
    #[error("{}", .0.summary())]
    Changed(crate::verify::Damage),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CacheError {
    let what = what.to_string();
    move |e| CacheError::Io(what, e)
}

/// One path of a published output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CacheNode {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        sha256: String,
        size: u64,
        /// Absent in entries written before rbuild kept both digests.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blake3: Option<String>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
}

/// What is signed: everything needed to rebuild the output and check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryBody {
    pub drv_hash: String,
    pub name: String,
    pub content_hash: String,
    pub nodes: Vec<CacheNode>,
    pub meta: Option<TreeMeta>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub key: String,
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub body: EntryBody,
    pub signatures: Vec<Signature>,
}

impl EntryBody {
    /// The bytes a signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut v = b"rbuild-cache-entry-v1\n".to_vec();
        v.extend(serde_json::to_vec(self).expect("entries serialize"));
        v
    }

    /// The distinct file blobs of the entry, sorted by SHA-256.
    pub fn blobs(&self) -> Vec<BlobRef> {
        let mut v: Vec<BlobRef> = self
            .nodes
            .iter()
            .filter_map(|n| match n {
                CacheNode::File {
                    sha256,
                    size,
                    blake3,
                    ..
                } => Some(BlobRef {
                    sha256: sha256.clone(),
                    blake3: blake3.clone(),
                    size: *size,
                }),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// A file blob: its size and digests. Backends address it by SHA-256, or by BLAKE3 where the
/// server prefers it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobRef {
    pub sha256: String,
    pub blake3: Option<String>,
    pub size: u64,
}

impl BlobRef {
    /// The digest and size of `bytes`.
    pub fn of(bytes: &[u8]) -> BlobRef {
        BlobRef {
            sha256: hex::encode(Sha256::digest(bytes)),
            blake3: Some(blake3::hash(bytes).to_hex().to_string()),
            size: bytes.len() as u64,
        }
    }

    /// Hash a file in one pass: both digests and its size.
    pub fn of_file(p: &Path) -> Result<BlobRef, CacheError> {
        let mut f = fs::File::open(p).map_err(io(p.display()))?;
        let mut sha = Sha256::new();
        let mut b3 = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io(p.display()))?;
            if n == 0 {
                break;
            }
            sha.update(&buf[..n]);
            b3.update(&buf[..n]);
            size += n as u64;
        }
        Ok(BlobRef {
            sha256: hex::encode(sha.finalize()),
            blake3: Some(b3.finalize().to_hex().to_string()),
            size,
        })
    }

    /// A SHA-256 hex digest is 64 lowercase hex digits: nothing else becomes a file name or URL.
    pub fn check(&self) -> Result<(), DigestError> {
        let ok =
            |d: &str| d.len() == 64 && d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !ok(&self.sha256) {
            return Err(DigestError::Sha256(self.sha256.clone()));
        }
        match &self.blake3 {
            Some(b) if !ok(b) => Err(DigestError::Blake3(b.clone())),
            _ => Ok(()),
        }
    }
}

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

/// A key pair's secret half, `NAME:BASE64(seed)` on disk (like nix-store's key files).
pub struct SecretKey {
    pub name: String,
    key: ed25519_dalek::SigningKey,
}

/// A trusted public key, `NAME:BASE64(key)`.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub name: String,
    key: ed25519_dalek::VerifyingKey,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn split_key<'a>(path: &str, text: &'a str) -> Result<(&'a str, Vec<u8>), CacheError> {
    let (name, data) = text.trim().split_once(':').ok_or_else(|| CacheError::Key {
        path: path.to_owned(),
        msg: "expected NAME:BASE64".into(),
    })?;
    let bytes = b64().decode(data).map_err(|source| CacheError::KeyBase64 {
        path: path.to_owned(),
        source,
    })?;
    Ok((name, bytes))
}

impl SecretKey {
    /// A new random key named `name`.
    pub fn generate(name: &str) -> Result<SecretKey, CacheError> {
        let mut seed = [0u8; 32];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(io("/dev/urandom"))?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    pub fn parse(path: &str, text: &str) -> Result<SecretKey, CacheError> {
        let (name, bytes) = split_key(path, text)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| CacheError::Key {
            path: path.to_owned(),
            msg: "a secret key is 32 bytes".into(),
        })?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    pub fn read(path: &Path) -> Result<SecretKey, CacheError> {
        let text = fs::read_to_string(path).map_err(io(path.display()))?;
        SecretKey::parse(&path.display().to_string(), &text)
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, b64().encode(self.key.to_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// An ed25519 signature of `message`.
    pub fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).to_bytes().to_vec()
    }

    pub fn sign(&self, body: &EntryBody) -> Signature {
        Signature {
            key: self.name.clone(),
            sig: b64().encode(self.key.sign(&body.signed_bytes()).to_bytes()),
        }
    }
}

impl PublicKey {
    pub fn parse(path: &str, text: &str) -> Result<PublicKey, CacheError> {
        let (name, bytes) = split_key(path, text)?;
        let raw: [u8; 32] = bytes.try_into().map_err(|_| CacheError::Key {
            path: path.to_owned(),
            msg: "a public key is 32 bytes".into(),
        })?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|source| {
            CacheError::KeyInvalid {
                path: path.to_owned(),
                source,
            }
        })?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    /// A key given as a file holding `NAME:BASE64`, or as that text itself.
    pub fn load(arg: &str) -> Result<PublicKey, CacheError> {
        match fs::read_to_string(arg) {
            Ok(text) => PublicKey::parse(arg, &text),
            Err(_) => PublicKey::parse("trusted key", arg),
        }
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, b64().encode(self.key.to_bytes()))
    }

    /// Whether `sig` is this key's ed25519 signature of `message`.
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        ed25519_dalek::Signature::from_slice(sig)
            .is_ok_and(|s| self.key.verify(message, &s).is_ok())
    }

    /// The raw 32-byte public key.
    pub fn raw(&self) -> [u8; 32] {
        self.key.to_bytes()
    }
}

impl CacheEntry {
    /// The entry if a trusted key signed it; otherwise why not.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<(), UntrustedEntry> {
        let bytes = self.body.signed_bytes();
        for s in &self.signatures {
            for k in trusted.iter().filter(|k| k.name == s.key) {
                let Ok(raw) = b64().decode(&s.sig) else {
                    continue;
                };
                let Ok(sig) = ed25519_dalek::Signature::from_slice(&raw) else {
                    continue;
                };
                if k.key.verify(&bytes, &sig).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(UntrustedEntry {
            signed_by: self.signatures.iter().map(|s| s.key.clone()).collect(),
            trusted: trusted.iter().map(|k| k.name.clone()).collect(),
        })
    }
}

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
        return Ok(Box::new(http::HttpCache::new(url)));
    }
    if url.starts_with("grpc://") || url.starts_with("grpcs://") {
        return Ok(Box::new(reapi::GrpcCache::new(url)?));
    }
    Err(CacheError::UnsupportedUrl(url.to_owned()))
}

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

type Described = Result<(EntryBody, Vec<(BlobRef, PathBuf)>), CacheError>;

/// [`describe`] each output, on as many threads as there are cores (hashing is most of a push's
/// local work); results in the order of `outputs`.
fn describe_all(outputs: &[Publish]) -> Vec<Described> {
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
fn parse_entry(
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
        let mut f = HashingWriter {
            file: create_new(&p)?,
            hash: Sha256::new(),
            n: 0,
        };
        cache.get_blob(blob, &mut f)?;
        check(rel, blob, hex::encode(f.hash.finalize()), f.n)?;
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
fn create_new(p: &Path) -> Result<fs::File, CacheError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .map_err(io(p.display()))
}

/// A file being written, and the SHA-256 and length of what was written so far.
struct HashingWriter {
    file: fs::File,
    hash: Sha256,
    n: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
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
