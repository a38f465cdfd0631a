//! Binary caches: where a store's outputs are shared, signed, between machines.
//!
//! An output is published as content-addressed file blobs (by sha256, so file contents dedupe
//! across outputs and across pushes) plus one *entry* per derivation: the tree listing, the
//! ownership sidecar and the output's content hash, signed with ed25519 by the pusher. A client
//! uses an entry only if a key it trusts signed it, and checks every byte it downloads against the
//! listing before anything is registered — the store then re-hashes the whole output and compares
//! it with the signed content hash.
//!
//! Backends implement [`BinaryCache`]; `file://DIR` (a directory, possibly on a shared
//! filesystem: every write goes to a temporary name and is renamed into place) is built in.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::meta::{sidecar, TreeMeta};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("binary cache {url}: {msg}")]
    Backend { url: String, msg: String },
    #[error("binary cache entry for {drv}: {msg}")]
    BadEntry { drv: String, msg: String },
    #[error("{path}: {msg}")]
    Key { path: String, msg: String },
    #[error("unsupported binary cache URL {0:?} (supported: file:///DIR)")]
    UnsupportedUrl(String),
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

    pub fn blobs(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .nodes
            .iter()
            .filter_map(|n| match n {
                CacheNode::File { sha256, size, .. } => Some((sha256.clone(), *size)),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

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
    let bytes = b64().decode(data).map_err(|e| CacheError::Key {
        path: path.to_owned(),
        msg: format!("bad base64: {e}"),
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
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|e| CacheError::Key {
            path: path.to_owned(),
            msg: e.to_string(),
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
}

impl CacheEntry {
    /// The entry if a trusted key signed it; otherwise why not.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<(), String> {
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
        let by: Vec<&str> = self.signatures.iter().map(|s| s.key.as_str()).collect();
        Err(format!(
            "no valid signature by a trusted key (signed by: {}; trusted: {})",
            if by.is_empty() {
                "nobody".to_owned()
            } else {
                by.join(", ")
            },
            trusted
                .iter()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// A place outputs are shared through. All methods are blocking.
pub trait BinaryCache: Send + Sync {
    fn url(&self) -> &str;
    /// The signed entry of a derivation, if the cache has one.
    fn get_entry(&self, drv_hash: &str) -> Result<Option<Vec<u8>>, CacheError>;
    /// The entries of many derivations at once (backends override this to ask in parallel or
    /// in one request).
    fn get_entries(&self, drv_hashes: &[String]) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        drv_hashes.iter().map(|h| self.get_entry(h)).collect()
    }
    fn put_entry(&self, drv_hash: &str, bytes: &[u8]) -> Result<(), CacheError>;
    /// Which of `digests` the cache lacks, asked in one batch.
    fn missing_blobs(&self, digests: &[String]) -> Result<Vec<String>, CacheError>;
    fn get_blob(&self, digest: &str, dest: &mut dyn Write) -> Result<(), CacheError>;
    fn put_blob(&self, digest: &str, src: &Path) -> Result<(), CacheError>;
}

/// Open a cache by URL.
pub fn open(url: &str) -> Result<Box<dyn BinaryCache>, CacheError> {
    if let Some(dir) = url.strip_prefix("file://") {
        return Ok(Box::new(FileCache {
            url: url.to_owned(),
            dir: PathBuf::from(dir),
        }));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(std::time::Duration::from_secs(10)))
            .timeout_recv_response(Some(std::time::Duration::from_secs(60)))
            .build()
            .into();
        return Ok(Box::new(HttpCache {
            url: url.trim_end_matches('/').to_owned(),
            agent,
        }));
    }
    Err(CacheError::UnsupportedUrl(url.to_owned()))
}

/// `http://` / `https://`: plain GET, PUT and HEAD of `entries/<drv-hash>.json` and
/// `blobs/sha256/<digest>` below the URL, so any WebDAV-enabled server or object-store gateway
/// serves it.
pub struct HttpCache {
    url: String,
    agent: ureq::Agent,
}

impl HttpCache {
    fn err(&self, msg: impl std::fmt::Display) -> CacheError {
        CacheError::Backend {
            url: self.url.clone(),
            msg: msg.to_string(),
        }
    }

    fn blob_url(&self, digest: &str) -> Result<String, CacheError> {
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(self.err(format!("not a sha256 digest: {digest:?}")));
        }
        Ok(format!("{}/blobs/sha256/{digest}", self.url))
    }

    fn check_put(&self, what: &str, status: u16) -> Result<(), CacheError> {
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(self.err(format!("PUT {what}: HTTP {status}")))
        }
    }
}

impl BinaryCache for HttpCache {
    fn url(&self) -> &str {
        &self.url
    }

    fn get_entry(&self, drv_hash: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let url = format!("{}/entries/{drv_hash}.json", self.url);
        let resp = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| self.err(format!("GET {url}: {e}")))?;
        match resp.status().as_u16() {
            404 => Ok(None),
            200 => {
                let mut body = Vec::new();
                resp.into_body()
                    .into_reader()
                    .take(64 << 20)
                    .read_to_end(&mut body)
                    .map_err(|e| self.err(format!("GET {url}: {e}")))?;
                Ok(Some(body))
            }
            s => Err(self.err(format!("GET {url}: HTTP {s}"))),
        }
    }

    fn get_entries(&self, drv_hashes: &[String]) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        // Sixteen GETs in flight at a time.
        let mut out = Vec::with_capacity(drv_hashes.len());
        for chunk in drv_hashes.chunks(16) {
            let results: Vec<Result<Option<Vec<u8>>, CacheError>> = std::thread::scope(|sc| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|h| sc.spawn(move || self.get_entry(h)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(self.err("GET thread panicked")))
                    })
                    .collect()
            });
            for r in results {
                out.push(r?);
            }
        }
        Ok(out)
    }

    fn put_entry(&self, drv_hash: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let url = format!("{}/entries/{drv_hash}.json", self.url);
        let resp = self
            .agent
            .put(&url)
            .send(bytes)
            .map_err(|e| self.err(format!("PUT {url}: {e}")))?;
        self.check_put(&url, resp.status().as_u16())
    }

    fn missing_blobs(&self, digests: &[String]) -> Result<Vec<String>, CacheError> {
        // Plain HTTP has no batch query: HEAD requests, eight at a time.
        let mut missing = Vec::new();
        for chunk in digests.chunks(8) {
            let results: Vec<Result<Option<String>, CacheError>> = std::thread::scope(|sc| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|d| {
                        sc.spawn(move || {
                            let url = self.blob_url(d)?;
                            let resp = self
                                .agent
                                .head(&url)
                                .call()
                                .map_err(|e| self.err(format!("HEAD {url}: {e}")))?;
                            match resp.status().as_u16() {
                                200 => Ok(None),
                                404 => Ok(Some(d.clone())),
                                s => Err(self.err(format!("HEAD {url}: HTTP {s}"))),
                            }
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(self.err("HEAD thread panicked")))
                    })
                    .collect()
            });
            for r in results {
                missing.extend(r?);
            }
        }
        Ok(missing)
    }

    fn get_blob(&self, digest: &str, dest: &mut dyn Write) -> Result<(), CacheError> {
        let url = self.blob_url(digest)?;
        let resp = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| self.err(format!("GET {url}: {e}")))?;
        if resp.status().as_u16() != 200 {
            return Err(self.err(format!("GET {url}: HTTP {}", resp.status().as_u16())));
        }
        std::io::copy(&mut resp.into_body().into_reader(), dest)
            .map_err(|e| self.err(format!("GET {url}: {e}")))?;
        Ok(())
    }

    fn put_blob(&self, digest: &str, src: &Path) -> Result<(), CacheError> {
        let url = self.blob_url(digest)?;
        let f = fs::File::open(src).map_err(io(src.display()))?;
        let resp = self
            .agent
            .put(&url)
            .send(f)
            .map_err(|e| self.err(format!("PUT {url}: {e}")))?;
        self.check_put(&url, resp.status().as_u16())
    }
}

/// `file:///DIR`: `DIR/entries/<drv-hash>.json` and `DIR/blobs/sha256/<digest>`.
pub struct FileCache {
    url: String,
    dir: PathBuf,
}

impl FileCache {
    fn blob_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CacheError::Backend {
                url: self.url.clone(),
                msg: format!("not a sha256 digest: {digest:?}"),
            });
        }
        Ok(self.dir.join("blobs/sha256").join(digest))
    }

    /// Write `path` atomically: temporary name in the same directory, then rename.
    fn write_atomic(
        &self,
        path: &Path,
        write: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
    ) -> Result<(), CacheError> {
        let parent = path.parent().expect("cache paths have parents");
        fs::create_dir_all(parent).map_err(io(parent.display()))?;
        let tmp = parent.join(
            format!(
                ".tmp-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            )
            .replace(['(', ')'], ""),
        );
        let mut f = fs::File::create(&tmp).map_err(io(tmp.display()))?;
        write(&mut f).map_err(io(tmp.display()))?;
        let _ = f.set_permissions(fs::Permissions::from_mode(0o644));
        fs::rename(&tmp, path).map_err(io(path.display()))
    }
}

impl BinaryCache for FileCache {
    fn url(&self) -> &str {
        &self.url
    }

    fn get_entry(&self, drv_hash: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let p = self.dir.join("entries").join(format!("{drv_hash}.json"));
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::Io(p.display().to_string(), e)),
        }
    }

    fn put_entry(&self, drv_hash: &str, bytes: &[u8]) -> Result<(), CacheError> {
        self.write_atomic(
            &self.dir.join("entries").join(format!("{drv_hash}.json")),
            |f| f.write_all(bytes),
        )
    }

    fn missing_blobs(&self, digests: &[String]) -> Result<Vec<String>, CacheError> {
        let mut missing = Vec::new();
        for d in digests {
            if !self.blob_path(d)?.exists() {
                missing.push(d.clone());
            }
        }
        Ok(missing)
    }

    fn get_blob(&self, digest: &str, dest: &mut dyn Write) -> Result<(), CacheError> {
        let p = self.blob_path(digest)?;
        let mut f = fs::File::open(&p).map_err(io(p.display()))?;
        std::io::copy(&mut f, dest).map_err(io(p.display()))?;
        Ok(())
    }

    fn put_blob(&self, digest: &str, src: &Path) -> Result<(), CacheError> {
        let dest = self.blob_path(digest)?;
        self.write_atomic(&dest, |f| {
            std::io::copy(&mut fs::File::open(src)?, f).map(|_| ())
        })
    }
}

fn sha256_file(p: &Path) -> Result<(String, u64), CacheError> {
    let mut f = fs::File::open(p).map_err(io(p.display()))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).map_err(io(p.display()))?;
    Ok((hex::encode(h.finalize()), n))
}

/// Describe a registered output (a file or a tree) for publishing.
pub fn describe(
    drv_hash: &str,
    name: &str,
    content_hash: &str,
    out: &Path,
) -> Result<(EntryBody, Vec<(String, PathBuf)>), CacheError> {
    let meta_path = sidecar(out);
    let meta = if meta_path.exists() {
        Some(
            TreeMeta::read(&meta_path).map_err(|e| CacheError::BadEntry {
                drv: drv_hash.into(),
                msg: e.to_string(),
            })?,
        )
    } else {
        None
    };
    let mut nodes = Vec::new();
    let mut files = Vec::new();
    let mut links = std::collections::HashMap::new();
    walk(out, "", &mut nodes, &mut files, &mut links)?;
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

type Links = std::collections::HashMap<(u64, u64), String>;

fn walk(
    p: &Path,
    rel: &str,
    nodes: &mut Vec<CacheNode>,
    files: &mut Vec<(String, PathBuf)>,
    links: &mut Links,
) -> Result<(), CacheError> {
    let md = fs::symlink_metadata(p).map_err(io(p.display()))?;
    let ft = md.file_type();
    if ft.is_symlink() {
        let t = fs::read_link(p).map_err(io(p.display()))?;
        nodes.push(CacheNode::Symlink {
            path: rel.into(),
            target: t.to_string_lossy().into_owned(),
        });
    } else if ft.is_file() {
        if md.nlink() > 1 {
            if let Some(first) = links.get(&(md.dev(), md.ino())) {
                nodes.push(CacheNode::Hardlink {
                    path: rel.into(),
                    target: first.clone(),
                });
                return Ok(());
            }
            links.insert((md.dev(), md.ino()), rel.to_owned());
        }
        let (sha256, size) = sha256_file(p)?;
        files.push((sha256.clone(), p.to_owned()));
        nodes.push(CacheNode::File {
            path: rel.into(),
            mode: md.mode() & 0o777,
            sha256,
            size,
        });
    } else if ft.is_dir() {
        nodes.push(CacheNode::Dir {
            path: rel.into(),
            mode: md.mode() & 0o777,
        });
        let mut names: Vec<_> = fs::read_dir(p)
            .map_err(io(p.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for n in names {
            let child = if rel.is_empty() {
                n.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", n.to_string_lossy())
            };
            walk(&p.join(&n), &child, nodes, files, links)?;
        }
    }
    Ok(())
}

/// Publish a registered output: missing blobs first (asked in one batch), the signed entry last.
/// Returns how many blobs were uploaded.
pub fn push(
    cache: &dyn BinaryCache,
    key: &SecretKey,
    drv_hash: &str,
    name: &str,
    content_hash: &str,
    out: &Path,
) -> Result<usize, CacheError> {
    let (body, files) = describe(drv_hash, name, content_hash, out)?;
    let digests: Vec<String> = body.blobs().into_iter().map(|(d, _)| d).collect();
    let missing: std::collections::HashSet<String> =
        cache.missing_blobs(&digests)?.into_iter().collect();
    let mut uploaded = std::collections::HashSet::new();
    for (digest, path) in &files {
        if missing.contains(digest) && uploaded.insert(digest.clone()) {
            cache.put_blob(digest, path)?;
        }
    }
    let entry = CacheEntry {
        signatures: vec![key.sign(&body)],
        body,
    };
    cache.put_entry(
        drv_hash,
        &serde_json::to_vec(&entry).expect("entries serialize"),
    )?;
    Ok(uploaded.len())
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
        .map(|(h, bytes)| bytes.map(|b| parse_entry(h, &b, trusted)).transpose())
        .collect())
}

/// Parse an entry and check that it is the one asked for and that a trusted key signed it.
fn parse_entry(
    drv_hash: &str,
    bytes: &[u8],
    trusted: &[PublicKey],
) -> Result<CacheEntry, CacheError> {
    let entry: CacheEntry = serde_json::from_slice(bytes).map_err(|e| CacheError::BadEntry {
        drv: drv_hash.into(),
        msg: format!("not valid JSON: {e}"),
    })?;
    if entry.body.drv_hash != drv_hash {
        return Err(CacheError::BadEntry {
            drv: drv_hash.into(),
            msg: format!("the entry is for {}", entry.body.drv_hash),
        });
    }
    entry.verify(trusted).map_err(|msg| CacheError::BadEntry {
        drv: drv_hash.into(),
        msg,
    })?;
    Ok(entry)
}

/// Recreate a (verified) entry's output at `dest` (and its sidecar), checking every blob
/// against its digest. The caller registers it, which re-hashes it against `content_hash`.
pub fn fetch(cache: &dyn BinaryCache, entry: &CacheEntry, dest: &Path) -> Result<(), CacheError> {
    let drv = &entry.body.drv_hash;
    let bad = |msg: String| CacheError::BadEntry {
        drv: drv.clone(),
        msg,
    };
    // Every path must sit in a directory this fetch created: never below a symlink.
    let mut dirs: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for node in &entry.body.nodes {
        let rel = match node {
            CacheNode::Dir { path, .. }
            | CacheNode::File { path, .. }
            | CacheNode::Symlink { path, .. }
            | CacheNode::Hardlink { path, .. } => path,
        };
        if rel.split('/').any(|c| c == ".." || c == ".") || rel.starts_with('/') {
            return Err(bad(format!("path {rel:?} escapes the output")));
        }
        if !rel.is_empty() {
            let parent = rel.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            if !dirs.contains(parent) {
                return Err(bad(format!(
                    "{rel:?} is not inside a directory of the output"
                )));
            }
        } else if !matches!(node, CacheNode::Dir { .. } | CacheNode::File { .. }) {
            return Err(bad("the output itself must be a file or a directory".into()));
        }
        if let CacheNode::Dir { path, .. } = node {
            dirs.insert(path.as_str());
        }
        let p = if rel.is_empty() {
            dest.to_owned()
        } else {
            dest.join(rel)
        };
        match node {
            CacheNode::Dir { mode, .. } => {
                fs::create_dir(&p).map_err(io(p.display()))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode | 0o700))
                    .map_err(io(p.display()))?;
            }
            CacheNode::File {
                mode, sha256, size, ..
            } => {
                let mut f = HashingWriter {
                    file: fs::File::create(&p).map_err(io(p.display()))?,
                    hash: Sha256::new(),
                    n: 0,
                };
                cache.get_blob(sha256, &mut f)?;
                let actual = hex::encode(f.hash.finalize());
                if &actual != sha256 || f.n != *size {
                    return Err(bad(format!("{rel}: blob sha256 {actual} ({} bytes), the signed entry says {sha256} ({size} bytes)", f.n)));
                }
                fs::set_permissions(&p, fs::Permissions::from_mode(mode | 0o600))
                    .map_err(io(p.display()))?;
            }
            CacheNode::Symlink { target, .. } => {
                std::os::unix::fs::symlink(target, &p).map_err(io(p.display()))?
            }
            CacheNode::Hardlink { target, .. } => {
                let target_is_file = entry
                    .body
                    .nodes
                    .iter()
                    .any(|n| matches!(n, CacheNode::File { path, .. } if path == target));
                if !target_is_file || target.split('/').any(|c| c == "..") {
                    return Err(bad(format!(
                        "hardlink target {target:?} escapes the output"
                    )));
                }
                fs::hard_link(dest.join(target), &p).map_err(io(p.display()))?
            }
        }
    }
    if let Some(meta) = &entry.body.meta {
        meta.write(&sidecar(dest)).map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

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
mod tests {
    use super::*;

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
            push(cache.as_ref(), &key, "h1", "x", "c1", &out).unwrap(),
            1,
            "one blob for two equal files"
        );
        assert_eq!(
            push(cache.as_ref(), &key, "h1", "x", "c1", &out).unwrap(),
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
        push(cache.as_ref(), &alice, "h", "x", "c", &out).unwrap();
        let err = query(cache.as_ref(), "h", &[mallory.public()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no valid signature by a trusted key"), "{err}");
        // A changed entry no longer matches its signature.
        let p = dir.join("entries/h.json");
        let text = fs::read_to_string(&p).unwrap().replace("\"c\"", "\"evil\"");
        fs::write(&p, text).unwrap();
        assert!(query(cache.as_ref(), "h", &[alice.public()]).is_err());
        // A changed blob is caught while downloading.
        push(cache.as_ref(), &alice, "h", "x", "c", &out).unwrap();
        let entry = query(cache.as_ref(), "h", &[alice.public()])
            .unwrap()
            .unwrap();
        let digest = entry.body.blobs()[0].0.clone();
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
}
