//! Why a REAPI cache failed, and the server's statuses as messages a user can act on.

use super::*;

/// Why a REAPI cache failed: the message after "binary cache URL: ".
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("expected grpc://HOST:PORT or grpcs://HOST:PORT, optionally followed by /INSTANCE")]
    BadUrl,
    #[error("starting the gRPC client: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{0}")]
    Endpoint(#[source] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("the gRPC client stopped")]
    ClientStopped,
    /// The first `GetCapabilities` failed: remembered, and not asked again in this run.
    #[error(transparent)]
    Capabilities(Arc<GrpcError>),
    #[error("GetCapabilities: the server has no CAS")]
    NoCas,
    #[error("the server supports neither SHA-256 nor BLAKE3 digests (it lists {0:?})")]
    NoDigestFunction(Vec<String>),
    #[error("the server does not allow ActionCache updates (BuildGrid: allow-updates: true on its action cache)")]
    NoActionCacheUpdates,
    #[error(transparent)]
    Status(#[from] RpcStatus),
    #[error("{what}: no answer within {secs} s")]
    Timeout { what: String, secs: u64 },
    #[error("{what}: stalled for {secs} s")]
    Stalled { what: String, secs: u64 },
    #[error("{what}: more than the {size} bytes asked for")]
    TooLong { what: String, size: i64 },
    #[error("{what}: the server committed {committed} of {size} bytes")]
    Committed {
        what: String,
        committed: i64,
        size: i64,
    },
    /// A batch request's status for one blob.
    #[error("{what}: blob {hash}/{size}: {}", rpc_status(.status))]
    Blob {
        what: &'static str,
        hash: String,
        size: i64,
        status: bazel_remote_apis::google::rpc::Status,
    },
    #[error("BatchReadBlobs: no answer for {0}")]
    NoAnswer(String),
    #[error("the server sent blob {0} not asked for")]
    UnaskedBlob(String),
    #[error("blob {0} has no BLAKE3 digest (its entry predates them), and the server uses BLAKE3")]
    NoBlake3(String),
    /// A file (or the entry) being uploaded could not be read.
    #[error("{label}: {source}")]
    Read {
        label: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{label}: {got} bytes, expected {expected} (changed while uploading?)")]
    Changed {
        label: String,
        got: i64,
        expected: i64,
    },
    #[error("{what}: {source}")]
    Task {
        what: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the reader went away")]
    ReaderGone,
    #[error("writing blob {sha256}: {source}")]
    Write {
        sha256: String,
        #[source]
        source: std::io::Error,
    },
}

/// A request's error status. The message names the request, the status code and the server's
/// message, and keeps the useful part of the status's source chain ("Connection refused"),
/// which stays reachable as [`std::error::Error::source`].
#[derive(Debug)]
pub struct RpcStatus {
    what: String,
    status: tonic::Status,
}

impl std::fmt::Display for RpcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.status;
        let mut msg = format!("{}: {:?}", self.what, s.code());
        if !s.message().is_empty() {
            msg += &format!(": {}", s.message());
        }
        // Transport failures keep the useful part ("Connection refused") in the source chain.
        f.write_str(&crate::cache::error::and_causes(
            msg,
            std::error::Error::source(s),
        ))
    }
}

impl std::error::Error for RpcStatus {
    /// The status's own source: its text is in the message already, unlike the status's
    /// `Display` (code, message, details and metadata).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.status)
    }
}

/// For a task of the client's runtime that panicked or was cancelled.
pub(super) fn task(what: impl Into<String>) -> impl FnOnce(tokio::task::JoinError) -> GrpcError {
    let what = what.into();
    move |source| GrpcError::Task { what, source }
}

pub(super) fn status(what: &str, status: tonic::Status) -> GrpcError {
    GrpcError::Status(RpcStatus {
        what: what.to_owned(),
        status,
    })
}

/// A per-blob status of a batch answer: its code's name, and the server's message if any.
pub(super) fn rpc_status(s: &bazel_remote_apis::google::rpc::Status) -> String {
    let code = format!("{:?}", tonic::Code::from_i32(s.code));
    if s.message.is_empty() {
        code
    } else {
        format!("{code}: {}", s.message)
    }
}
