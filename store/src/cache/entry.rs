//! The signed entry of one output: its listing (file blobs by SHA-256 and BLAKE3), ownership
//! sidecar and content hash, and how it is described from and checked against a tree.

use std::fs;
use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use ed25519_dalek::Verifier;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::meta::TreeMeta;

use super::{b64, io, CacheError, DigestError, PublicKey, UntrustedEntry};

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
