//! What can go wrong with a binary cache, as error enums that keep their causes.

use std::path::PathBuf;

use super::{http, reapi, registry};

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
    #[error("unsupported binary cache URL {0:?} (supported: file:///DIR, http(s)://HOST/PATH, grpc(s)://HOST:PORT[/INSTANCE], docker://HOST[:PORT]/REPOSITORY)")]
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
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
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

pub(crate) fn names_or_nobody(names: &[String]) -> String {
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

pub(crate) fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CacheError {
    let what = what.to_string();
    move |e| CacheError::Io(what, e)
}

/// `text`, followed by each cause in the chain from `source` that it does not already say
/// ("Connection refused", a certificate's fault), which many errors' own messages leave out.
pub(crate) fn and_causes(
    mut text: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text += &format!(": {part}");
        }
        source = e.source();
    }
    text
}
