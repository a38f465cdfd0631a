//! `grpc://HOST:PORT[/INSTANCE]` and `grpcs://…`: a binary cache on a Bazel Remote Execution API
//! v2 server (BuildGrid, Buildbarn, bazel-remote, NativeLink).
//!
//! - File blobs live in the CAS: existence is asked with `FindMissingBlobs` (thousands of digests
//!   a request), small blobs travel in `BatchUpdateBlobs` / `BatchReadBlobs` requests up to the
//!   server's batch limit, large ones stream through ByteStream `Write` / `Read` in 1 MiB chunks.
//! - A derivation's signed entry (the same JSON document the other backends store, listing and
//!   signature included) is a CAS blob too. The ActionCache maps a synthetic Action — whose
//!   Command names the derivation hash — to an ActionResult with one output file,
//!   `rbuild-entry.json`, naming that blob. A server may rewrite the ActionResult (add metadata,
//!   drop inlined contents) without breaking anything: only the entry blob's digest is read
//!   from it, and the entry is checked against its own signature and derivation hash.
//! - Digests are SHA-256, or BLAKE3 when the server lists BLAKE3 in `GetCapabilities`.
//!
//! The trait is blocking; this backend runs its own small tokio runtime, so it can be called from
//! any thread, including from inside another runtime's tasks.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use prost::Message;
use re::action_cache_client::ActionCacheClient;
use re::capabilities_client::CapabilitiesClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient as CasClient;
use re::digest_function::Value as DigestFunction;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{BinaryCache, BlobRef, BlobSink, CacheError, EntryError, RawEntry};

/// The output file of an entry's ActionResult.
pub(super) const ENTRY_FILE: &str = "rbuild-entry.json";
/// Largest gRPC message this client accepts.
const MAX_MESSAGE: usize = 64 << 20;
/// ByteStream chunk size.
const CHUNK: usize = 1 << 20;
/// Digests per FindMissingBlobs request.
const FIND_BATCH: usize = 4096;
/// What a blob costs in a batch request besides its bytes (digest, framing, status), counted
/// so that many tiny blobs never push a request over the server's message limit.
const PER_BLOB: u64 = 256;
/// Blobs per batch request at most.
const BATCH_BLOBS: usize = 4096;
/// Requests in flight at a time.
const PARALLEL: usize = 8;
/// Entries larger than this are refused (a tree listing of a whole system is a few MiB).
const MAX_ENTRY: u64 = 256 << 20;

/// What the server said in `GetCapabilities`.
#[derive(Debug, Clone, Copy)]
struct Caps {
    blake3: bool,
    /// Largest total of blob bytes in one batch request.
    batch: u64,
    ac_update: bool,
}

pub struct GrpcCache {
    url: String,
    instance: String,
    /// Always `Some` until drop (dropped in the background: this may be dropped inside another
    /// runtime).
    rt: Option<tokio::runtime::Runtime>,
    channel: Channel,
    caps: OnceLock<Result<Caps, Arc<GrpcError>>>,
}

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
        let mut source = std::error::Error::source(s);
        while let Some(e) = source {
            let text = e.to_string();
            if !msg.contains(&text) {
                msg += &format!(": {text}");
            }
            source = e.source();
        }
        f.write_str(&msg)
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
fn task(what: impl Into<String>) -> impl FnOnce(tokio::task::JoinError) -> GrpcError {
    let what = what.into();
    move |source| GrpcError::Task { what, source }
}

impl Drop for GrpcCache {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn status(what: &str, status: tonic::Status) -> GrpcError {
    GrpcError::Status(RpcStatus {
        what: what.to_owned(),
        status,
    })
}

/// A per-blob status of a batch answer: its code's name, and the server's message if any.
fn rpc_status(s: &bazel_remote_apis::google::rpc::Status) -> String {
    let code = format!("{:?}", tonic::Code::from_i32(s.code));
    if s.message.is_empty() {
        code
    } else {
        format!("{code}: {}", s.message)
    }
}

/// `"".to_string()` or `"INSTANCE/"`: the prefix of ByteStream resource names.
fn prefix(instance: &str) -> String {
    if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    }
}

impl GrpcCache {
    /// A client for `url`. Nothing is contacted until the first request.
    pub fn new(url: &str) -> Result<GrpcCache, CacheError> {
        let bad = |e: GrpcError| CacheError::Backend {
            url: url.to_owned(),
            source: Box::new(e.into()),
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("grpcs://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("grpc://") {
            (false, r)
        } else {
            return Err(CacheError::UnsupportedUrl(url.to_owned()));
        };
        let (authority, instance) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() || !authority.contains(':') {
            return Err(bad(GrpcError::BadUrl));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rbuild-reapi")
            .enable_all()
            .build()
            .map_err(|e| bad(GrpcError::Runtime(e)))?;
        let scheme = if tls { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{authority}"))
            .map_err(|e| bad(GrpcError::Endpoint(e)))?
            .connect_timeout(super::timeout())
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .tcp_nodelay(true);
        if tls {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(|e| bad(GrpcError::Tls(e)))?;
        }
        let channel = {
            let _guard = rt.enter();
            endpoint.connect_lazy()
        };
        Ok(GrpcCache {
            url: url.to_owned(),
            instance: instance.trim_end_matches('/').to_owned(),
            rt: Some(rt),
            channel,
            caps: OnceLock::new(),
        })
    }

    fn can_publish(&self, ctx: &Ctx) -> Result<(), CacheError> {
        if ctx.caps.ac_update {
            Ok(())
        } else {
            Err(self.err(GrpcError::NoActionCacheUpdates))
        }
    }

    fn err(&self, e: GrpcError) -> CacheError {
        CacheError::Backend {
            url: self.url.clone(),
            source: Box::new(e.into()),
        }
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until drop")
    }

    /// Run `fut` on this cache's runtime and wait for it from this (any) thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, GrpcError>> + Send + 'static,
    ) -> Result<T, CacheError> {
        self.run_raw(fut).map_err(|e| self.err(e))
    }

    fn run_raw<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, GrpcError>> + Send + 'static,
    ) -> Result<T, GrpcError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| GrpcError::ClientStopped)?
    }

    fn ctx(&self) -> Result<Ctx, CacheError> {
        // A failure is kept too: a run does not wait twice for a cache that did not answer
        // (the scheduler stops asking a cache that failed, for the rest of the run).
        let caps = *self
            .caps
            .get_or_init(|| {
                let client = CapabilitiesClient::new(self.channel.clone())
                    .max_decoding_message_size(MAX_MESSAGE);
                let instance = self.instance.clone();
                self.run_raw(async move {
                    let req = re::GetCapabilitiesRequest {
                        instance_name: instance,
                    };
                    let caps = match timed("GetCapabilities", || {
                        let (mut client, req) = (client.clone(), req.clone());
                        async move { client.get_capabilities(req).await }
                    })
                    .await
                    {
                        Ok(r) => r.into_inner().cache_capabilities,
                        Err(e) => return Err(e),
                    };
                    let Some(caps) = caps else {
                        return Err(GrpcError::NoCas);
                    };
                    let fns = &caps.digest_functions;
                    let blake3 = fns.contains(&(DigestFunction::Blake3 as i32));
                    if !blake3 && !fns.is_empty() && !fns.contains(&(DigestFunction::Sha256 as i32))
                    {
                        return Err(GrpcError::NoDigestFunction(
                            fns.iter()
                                .map(|f| {
                                    DigestFunction::try_from(*f)
                                        .map(|v| v.as_str_name().to_owned())
                                        .unwrap_or_else(|_| f.to_string())
                                })
                                .collect(),
                        ));
                    }
                    // Leave room for the request's own fields.
                    let limit = match caps.max_batch_total_size_bytes {
                        n if n <= 0 => 4 << 20,
                        n => (n as u64).min(MAX_MESSAGE as u64),
                    };
                    Ok(Caps {
                        blake3,
                        batch: if limit > 128 << 10 {
                            limit - (64 << 10)
                        } else {
                            limit / 2
                        },
                        ac_update: caps
                            .action_cache_update_capabilities
                            .is_some_and(|c| c.update_enabled),
                    })
                })
                .map_err(Arc::new)
            })
            .as_ref()
            .map_err(|e| self.err(GrpcError::Capabilities(e.clone())))?;
        Ok(Ctx {
            instance: self.instance.clone(),
            caps,
            cas: CasClient::new(self.channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            ac: ActionCacheClient::new(self.channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            bytestream: bs::byte_stream_client::ByteStreamClient::new(self.channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        })
    }
}

/// How many times a call that a busy server refused (`RESOURCE_EXHAUSTED`, as BuildGrid answers
/// past its limit of concurrent calls, or `UNAVAILABLE`) is made again, after pauses doubling
/// from [`FIRST_PAUSE`] (6.3 s in all): the remote APIs ask clients to retry those.
const RETRIES: u32 = 6;
const FIRST_PAUSE: Duration = Duration::from_millis(100);

/// `call()`'s answer, asked again while the server is busy ([`RETRIES`]); an error after
/// [`super::timeout`] of one call.
async fn retried<T, Fut>(
    what: &str,
    mut call: impl FnMut() -> Fut,
) -> Result<Result<T, tonic::Status>, GrpcError>
where
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut pause = FIRST_PAUSE;
    for attempt in 0.. {
        match tokio::time::timeout(super::timeout(), call()).await {
            Ok(Err(s))
                if attempt < RETRIES
                    && matches!(
                        s.code(),
                        tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                    ) =>
            {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Ok(r) => return Ok(r),
            Err(_) => break,
        }
    }
    Err(GrpcError::Timeout {
        what: what.to_owned(),
        secs: super::timeout().as_secs(),
    })
}

/// [`retried`], with the server's error as a [`GrpcError`].
async fn timed<T, Fut>(what: &str, call: impl FnMut() -> Fut) -> Result<T, GrpcError>
where
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    retried(what, call).await?.map_err(|s| status(what, s))
}

/// Split `(size, item)`s into batch requests of at most `batch` bytes (counting [`PER_BLOB`]
/// each) and [`BATCH_BLOBS`] items, and the items to stream one by one (costing more than
/// `stream_over`).
fn plan_batches<T>(items: Vec<(u64, T)>, batch: u64, stream_over: u64) -> (Vec<Vec<T>>, Vec<T>) {
    let mut batches: Vec<Vec<T>> = vec![];
    let mut streamed = vec![];
    let mut total = 0u64;
    for (size, item) in items {
        let cost = size + PER_BLOB;
        if cost > stream_over {
            streamed.push(item);
            continue;
        }
        if batches
            .last()
            .is_none_or(|l| total + cost > batch || l.len() >= BATCH_BLOBS)
        {
            batches.push(vec![]);
            total = 0;
        }
        total += cost;
        batches.last_mut().expect("a batch").push(item);
    }
    (batches, streamed)
}

/// What a ByteStream upload sends.
enum Source {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// Everything a request needs; cheap to clone into tasks.
#[derive(Clone)]
struct Ctx {
    instance: String,
    caps: Caps,
    cas: CasClient<Channel>,
    ac: ActionCacheClient<Channel>,
    bytestream: bs::byte_stream_client::ByteStreamClient<Channel>,
}

impl Ctx {
    fn digest_function(&self) -> i32 {
        if self.caps.blake3 {
            DigestFunction::Blake3 as i32
        } else {
            DigestFunction::Sha256 as i32
        }
    }

    /// The digest of bytes made here.
    fn digest_of(&self, bytes: &[u8]) -> re::Digest {
        re::Digest {
            hash: if self.caps.blake3 {
                blake3::hash(bytes).to_hex().to_string()
            } else {
                hex::encode(Sha256::digest(bytes))
            },
            size_bytes: bytes.len() as i64,
        }
    }

    /// The server's address of a blob.
    fn digest(&self, b: &BlobRef) -> Result<re::Digest, GrpcError> {
        let hash = if self.caps.blake3 {
            b.blake3
                .clone()
                .ok_or_else(|| GrpcError::NoBlake3(b.sha256.clone()))?
        } else {
            b.sha256.clone()
        };
        Ok(re::Digest {
            hash,
            size_bytes: b.size as i64,
        })
    }

    /// `blobs/HASH/SIZE`, with the digest function's name for BLAKE3 (as REAPI asks for
    /// functions other than the classic ones).
    fn blob_path(&self, d: &re::Digest) -> String {
        if self.caps.blake3 {
            format!("blobs/blake3/{}/{}", d.hash, d.size_bytes)
        } else {
            format!("blobs/{}/{}", d.hash, d.size_bytes)
        }
    }

    /// The Action whose ActionCache entry holds `drv_hash`'s signed entry, and its digest.
    /// The Command is not meant to be run: it names the derivation.
    fn action(&self, drv_hash: &str) -> (Vec<(re::Digest, Vec<u8>)>, re::Digest) {
        let command = re::Command {
            arguments: vec!["rbuild-substitute".into(), drv_hash.into()],
            output_paths: vec![ENTRY_FILE.into()],
            ..Default::default()
        }
        .encode_to_vec();
        let command_digest = self.digest_of(&command);
        let action = re::Action {
            command_digest: Some(command_digest.clone()),
            input_root_digest: Some(self.digest_of(&[])),
            ..Default::default()
        }
        .encode_to_vec();
        let action_digest = self.digest_of(&action);
        (
            vec![(command_digest, command), (action_digest.clone(), action)],
            action_digest,
        )
    }

    async fn find_missing(
        &mut self,
        digests: Vec<re::Digest>,
    ) -> Result<Vec<re::Digest>, GrpcError> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(FIND_BATCH) {
            let req = re::FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: chunk.to_vec(),
                digest_function: self.digest_function(),
            };
            let resp = timed("FindMissingBlobs", || {
                let (mut cas, req) = (self.cas.clone(), req.clone());
                async move { cas.find_missing_blobs(req).await }
            })
            .await?;
            missing.extend(resp.into_inner().missing_blob_digests);
        }
        Ok(missing)
    }

    async fn batch_update(&mut self, blobs: Vec<(re::Digest, Vec<u8>)>) -> Result<(), GrpcError> {
        let req = re::BatchUpdateBlobsRequest {
            instance_name: self.instance.clone(),
            requests: blobs
                .into_iter()
                .map(|(digest, data)| re::batch_update_blobs_request::Request {
                    digest: Some(digest),
                    data,
                    ..Default::default()
                })
                .collect(),
            digest_function: self.digest_function(),
        };
        let resp = timed("BatchUpdateBlobs", || {
            let (mut cas, req) = (self.cas.clone(), req.clone());
            async move { cas.batch_update_blobs(req).await }
        })
        .await?;
        for r in resp.into_inner().responses {
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                let d = r.digest.unwrap_or_default();
                return Err(GrpcError::Blob {
                    what: "BatchUpdateBlobs",
                    hash: d.hash,
                    size: d.size_bytes,
                    status: s,
                });
            }
        }
        Ok(())
    }

    async fn batch_read(
        &mut self,
        digests: Vec<re::Digest>,
    ) -> Result<Vec<(re::Digest, Vec<u8>)>, GrpcError> {
        let req = re::BatchReadBlobsRequest {
            instance_name: self.instance.clone(),
            digests,
            digest_function: self.digest_function(),
            ..Default::default()
        };
        let resp = timed("BatchReadBlobs", || {
            let (mut cas, req) = (self.cas.clone(), req.clone());
            async move { cas.batch_read_blobs(req).await }
        })
        .await?;
        let mut out = Vec::new();
        for r in resp.into_inner().responses {
            let d = r.digest.unwrap_or_default();
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                return Err(GrpcError::Blob {
                    what: "BatchReadBlobs",
                    hash: d.hash,
                    size: d.size_bytes,
                    status: s,
                });
            }
            out.push((d, r.data));
        }
        Ok(out)
    }

    /// Stream a blob from the server, each chunk to `sink`; fails past the digest's size.
    async fn read_stream(
        &mut self,
        d: &re::Digest,
        mut sink: impl FnMut(Vec<u8>) -> Result<(), GrpcError>,
    ) -> Result<(), GrpcError> {
        let name = format!("{}{}", prefix(&self.instance), self.blob_path(d));
        let req = bs::ReadRequest {
            resource_name: name.clone(),
            read_offset: 0,
            read_limit: 0,
        };
        let what = format!("ByteStream.Read {name}");
        let mut stream = timed(&what, || {
            let (mut bytestream, req) = (self.bytestream.clone(), req.clone());
            async move { bytestream.read(req).await }
        })
        .await?
        .into_inner();
        let mut n = 0u64;
        loop {
            let msg = match tokio::time::timeout(super::timeout(), stream.message()).await {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => break,
                Ok(Err(s)) => return Err(status(&what, s)),
                Err(_) => {
                    return Err(GrpcError::Stalled {
                        what,
                        secs: super::timeout().as_secs(),
                    })
                }
            };
            n += msg.data.len() as u64;
            if n > d.size_bytes as u64 {
                return Err(GrpcError::TooLong {
                    what,
                    size: d.size_bytes,
                });
            }
            sink(msg.data)?;
        }
        Ok(())
    }

    /// Upload a blob through ByteStream, in [`CHUNK`]s.
    async fn write_stream(&mut self, d: re::Digest, src: Source) -> Result<(), GrpcError> {
        static UPLOADS: AtomicU64 = AtomicU64::new(0);
        let id = blake3::hash(
            format!(
                "{}-{}-{:?}",
                std::process::id(),
                UPLOADS.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now()
            )
            .as_bytes(),
        )
        .to_hex();
        let uuid = format!(
            "{}-{}-4{}-8{}-{}",
            &id[0..8],
            &id[8..12],
            &id[13..16],
            &id[17..20],
            &id[20..32]
        );
        let name = format!(
            "{}uploads/{uuid}/{}",
            prefix(&self.instance),
            self.blob_path(&d)
        );
        let what = format!("ByteStream.Write {name}");
        let size = d.size_bytes;
        let (tx, rx) = tokio::sync::mpsc::channel::<bs::WriteRequest>(4);
        let reader = {
            let name = name.clone();
            tokio::spawn(async move {
                let (mut file, label, bytes) = match src {
                    Source::File(path) => (
                        Some(tokio::fs::File::open(&path).await.map_err(|source| {
                            GrpcError::Read {
                                label: path.display().to_string(),
                                source,
                            }
                        })?),
                        path.display().to_string(),
                        Vec::new(),
                    ),
                    Source::Bytes(b) => (None, "entry".to_owned(), b),
                };
                let mut offset = 0i64;
                loop {
                    let buf = match &mut file {
                        Some(f) => {
                            let mut buf = vec![0u8; CHUNK];
                            let mut filled = 0;
                            while filled < CHUNK {
                                let n = f.read(&mut buf[filled..]).await.map_err(|source| {
                                    GrpcError::Read {
                                        label: label.clone(),
                                        source,
                                    }
                                })?;
                                if n == 0 {
                                    break;
                                }
                                filled += n;
                            }
                            buf.truncate(filled);
                            buf
                        }
                        None => {
                            let at = (offset as usize).min(bytes.len());
                            bytes[at..(at + CHUNK).min(bytes.len())].to_vec()
                        }
                    };
                    let filled = buf.len();
                    let last = offset + filled as i64 >= size || filled == 0;
                    let req = bs::WriteRequest {
                        resource_name: if offset == 0 {
                            name.clone()
                        } else {
                            String::new()
                        },
                        write_offset: offset,
                        finish_write: last,
                        data: buf,
                    };
                    offset += filled as i64;
                    if tx.send(req).await.is_err() {
                        // The server ended the write early: it has the blob already (its
                        // committed size says so) or it failed (its status says so).
                        return Ok(());
                    }
                    if last {
                        break;
                    }
                }
                if offset != size {
                    return Err(GrpcError::Changed {
                        label,
                        got: offset,
                        expected: size,
                    });
                }
                Ok(())
            })
        };
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        // The cache timeout, plus a second for every MiB: a server that takes the bytes and
        // never answers does not hang the push.
        let limit = super::timeout() + Duration::from_secs(size as u64 >> 20);
        let resp = match tokio::time::timeout(limit, self.bytestream.write(stream)).await {
            Ok(r) => r.map_err(|s| status(&what, s))?,
            Err(_) => {
                reader.abort();
                return Err(GrpcError::Timeout {
                    what,
                    secs: limit.as_secs(),
                });
            }
        };
        reader.await.map_err(task(format!("{what}: reader")))??;
        let committed = resp.into_inner().committed_size;
        // A server that already had the blob may stop early and report its full size.
        if committed != size {
            return Err(GrpcError::Committed {
                what,
                committed,
                size,
            });
        }
        Ok(())
    }

    /// Read a whole blob (batch if it fits, stream otherwise).
    async fn read_whole(&mut self, d: re::Digest) -> Result<Vec<u8>, GrpcError> {
        if (d.size_bytes as u64) + PER_BLOB <= self.caps.batch {
            let mut got = self.batch_read(vec![d.clone()]).await?;
            match got.pop() {
                Some((_, data)) => Ok(data),
                None => Err(GrpcError::NoAnswer(d.hash)),
            }
        } else {
            // Grown as bytes arrive, not reserved on the server's word.
            let mut v = Vec::with_capacity((d.size_bytes as u64).min(super::SMALL_BLOB) as usize);
            self.read_stream(&d, |chunk| {
                v.extend(chunk);
                Ok(())
            })
            .await?;
            Ok(v)
        }
    }

    /// Entries whose blobs are not all in the CAS any more become misses: servers evict CAS
    /// blobs independently of ActionCache results (BuildGrid only checks the blobs a result
    /// names, here the entry itself), and a half-evicted output is a miss, not a failure.
    /// Entries that do not parse are left for the caller to report.
    async fn complete_only(&mut self, mut entries: Vec<Entry>) -> Result<Vec<Entry>, GrpcError> {
        let mut wanted: Vec<Vec<String>> = vec![Vec::new(); entries.len()];
        let mut digests = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, bytes) in entries.iter().enumerate() {
            let Some(entry) = bytes
                .as_ref()
                .ok()
                .and_then(|b| b.as_deref())
                .and_then(|b| serde_json::from_slice::<super::CacheEntry>(b).ok())
            else {
                continue;
            };
            for blob in entry.body.blobs() {
                let Ok(d) = self.digest(&blob) else { continue };
                wanted[i].push(d.hash.clone());
                if d.size_bytes > 0 && seen.insert(d.hash.clone()) {
                    digests.push(d);
                }
            }
        }
        if digests.is_empty() {
            return Ok(entries);
        }
        let missing: std::collections::HashSet<String> = self
            .find_missing(digests)
            .await?
            .into_iter()
            .map(|d| d.hash)
            .collect();
        for (entry, hashes) in entries.iter_mut().zip(wanted) {
            if hashes.iter().any(|h| missing.contains(h)) {
                tracing::debug!("an entry's blobs were evicted from the CAS: treated as a miss");
                *entry = Ok(None);
            }
        }
        Ok(entries)
    }

    /// The signed entry of `drv_hash`, if the ActionCache has one. The outer error is the
    /// server's (unreachable, failing); the inner one is about this entry alone.
    async fn get_entry(mut self, drv_hash: String) -> Result<Entry, GrpcError> {
        let (_, action_digest) = self.action(&drv_hash);
        let req = re::GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action_digest),
            inline_output_files: vec![ENTRY_FILE.into()],
            digest_function: self.digest_function(),
            ..Default::default()
        };
        let answer = retried("GetActionResult", || {
            let (mut ac, req) = (self.ac.clone(), req.clone());
            async move { ac.get_action_result(req).await }
        })
        .await?;
        let result = match answer {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(Ok(None)),
            Err(s) => return Err(status("GetActionResult", s)),
        };
        let bad = |source: EntryError| {
            Ok(Err(CacheError::BadEntry {
                drv: drv_hash.clone(),
                source: Box::new(source),
            }))
        };
        let Some(file) = result
            .output_files
            .into_iter()
            .find(|f| f.path == ENTRY_FILE)
        else {
            return bad(EntryError::NoEntryFile);
        };
        let d = file.digest.unwrap_or_default();
        if d.size_bytes < 0 || d.size_bytes as u64 > MAX_ENTRY {
            return bad(EntryError::Size(d.size_bytes));
        }
        let bytes = if !file.contents.is_empty() || d.size_bytes == 0 {
            file.contents
        } else {
            // The entry blob itself may have been evicted while the result stayed: a miss.
            if !self.find_missing(vec![d.clone()]).await?.is_empty() {
                return Ok(Ok(None));
            }
            match self.read_whole(d.clone()).await {
                Ok(b) => b,
                Err(e) => return bad(EntryError::Read(e)),
            }
        };
        // Entries are checked against their signature later; this catches transport damage.
        if self.digest_of(&bytes) != d {
            return bad(EntryError::EntryDigest(d.hash));
        }
        Ok(Ok(Some(bytes)))
    }
}

/// One entry lookup: its bytes, none, or why this entry cannot be used.
type Entry = Result<Option<Vec<u8>>, CacheError>;

impl BinaryCache for GrpcCache {
    fn url(&self) -> &str {
        &self.url
    }

    fn get_entry(&self, drv_hash: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.get_entries(&[drv_hash.to_owned()])?
            .pop()
            .unwrap_or(Ok(None))
    }

    fn get_entries(&self, drv_hashes: &[String]) -> Result<Vec<RawEntry>, CacheError> {
        // REAPI has no batch ActionCache lookup: PARALLEL lookups in flight, then one
        // existence query for the blobs of every entry found.
        let mut ctx = self.ctx()?;
        let hashes = drv_hashes.to_vec();
        self.run(async move {
            let n = hashes.len();
            let sem = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
            let mut tasks = tokio::task::JoinSet::new();
            for (i, h) in hashes.into_iter().enumerate() {
                let ctx = ctx.clone();
                let permit = sem.clone().acquire_owned().await.expect("semaphore open");
                tasks.spawn(async move {
                    let _permit = permit;
                    (i, ctx.get_entry(h).await)
                });
            }
            let mut out: Vec<Entry> = (0..n).map(|_| Ok(None)).collect();
            while let Some(r) = tasks.join_next().await {
                let (i, r) = r.map_err(task("lookup task"))?;
                out[i] = r?;
            }
            ctx.complete_only(out).await
        })
    }

    fn put_entry(&self, drv_hash: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let mut ctx = self.ctx()?;
        self.can_publish(&ctx)?;
        let (mut blobs, action_digest) = ctx.action(drv_hash);
        let entry_digest = ctx.digest_of(bytes);
        let bytes = bytes.to_vec();
        self.run(async move {
            if bytes.len() as u64 + 3 * PER_BLOB + 4096 <= ctx.caps.batch {
                blobs.push((entry_digest.clone(), bytes));
            } else {
                ctx.write_stream(entry_digest.clone(), Source::Bytes(bytes))
                    .await?;
            }
            ctx.batch_update(blobs).await?;
            let req = re::UpdateActionResultRequest {
                instance_name: ctx.instance.clone(),
                action_digest: Some(action_digest),
                action_result: Some(re::ActionResult {
                    output_files: vec![re::OutputFile {
                        path: ENTRY_FILE.into(),
                        digest: Some(entry_digest),
                        ..Default::default()
                    }],
                    exit_code: 0,
                    ..Default::default()
                }),
                digest_function: ctx.digest_function(),
                ..Default::default()
            };
            timed("UpdateActionResult", || {
                let (mut ac, req) = (ctx.ac.clone(), req.clone());
                async move { ac.update_action_result(req).await }
            })
            .await?;
            Ok(())
        })
    }

    fn check(&self) -> Result<String, CacheError> {
        let caps = self.ctx()?.caps;
        self.get_entry(&"0".repeat(64))?;
        Ok(format!(
            "a Remote Execution API v2 cache{}: {} digests, batches up to {} KiB, ActionCache updates {}",
            if self.instance.is_empty() {
                String::new()
            } else {
                format!(" (instance {:?})", self.instance)
            },
            if caps.blake3 { "BLAKE3" } else { "SHA-256" },
            caps.batch >> 10,
            if caps.ac_update {
                "allowed"
            } else {
                "refused (substitute only)"
            }
        ))
    }

    fn missing_blobs(&self, blobs: &[BlobRef]) -> Result<Vec<BlobRef>, CacheError> {
        let mut ctx = self.ctx()?;
        let mut by_hash: HashMap<String, BlobRef> = HashMap::new();
        let mut digests = Vec::with_capacity(blobs.len());
        for b in blobs {
            let d = ctx.digest(b).map_err(|e| self.err(e))?;
            by_hash.insert(d.hash.clone(), b.clone());
            digests.push(d);
        }
        let missing = self.run(async move { ctx.find_missing(digests).await })?;
        Ok(missing
            .into_iter()
            .filter_map(|d| by_hash.get(&d.hash).cloned())
            .collect())
    }

    fn get_blob(&self, blob: &BlobRef, dest: &mut dyn Write) -> Result<(), CacheError> {
        let mut ctx = self.ctx()?;
        let d = ctx.digest(blob).map_err(|e| self.err(e))?;
        // The stream is read on the runtime; chunks come here through a short queue so a slow
        // disk holds the download back instead of filling memory.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let task = self.rt().spawn(async move {
            let r = ctx
                .read_stream(&d, |chunk| {
                    // Waiting for the writer must not hold up this runtime's other work.
                    tokio::task::block_in_place(|| tx.send(chunk))
                        .map_err(|_| GrpcError::ReaderGone)
                })
                .await;
            drop(tx);
            let _ = done_tx.send(r);
        });
        for chunk in rx {
            if let Err(e) = dest.write_all(&chunk) {
                task.abort();
                return Err(self.err(GrpcError::Write {
                    sha256: blob.sha256.clone(),
                    source: e,
                }));
            }
        }
        done_rx
            .recv()
            .map_err(|_| self.err(GrpcError::ClientStopped))?
            .map_err(|e| self.err(e))
    }

    fn get_small_blobs(&self, blobs: &[BlobRef], sink: &mut BlobSink) -> Result<(), CacheError> {
        let ctx = self.ctx()?;
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut digests = Vec::with_capacity(blobs.len());
        for (i, b) in blobs.iter().enumerate() {
            let d = ctx.digest(b).map_err(|e| self.err(e))?;
            index.insert(d.hash.clone(), i);
            digests.push((b.size, d));
        }
        let (batches, streamed) = plan_batches(digests, ctx.caps.batch, ctx.caps.batch);
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Result<(re::Digest, Vec<u8>), GrpcError>>(64);
        // Aborting this task drops its JoinSet, which aborts every read still running.
        let coordinator = self.rt().spawn(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(PARALLEL / 2));
            let mut tasks = tokio::task::JoinSet::new();
            let jobs = batches
                .into_iter()
                .map(|b| (b, false))
                .chain(streamed.into_iter().map(|d| (vec![d], true)));
            for (digests, stream) in jobs {
                let mut ctx = ctx.clone();
                let tx = tx.clone();
                let permit = sem.clone().acquire_owned().await.expect("semaphore open");
                tasks.spawn(async move {
                    let _permit = permit;
                    let got = if stream {
                        let d = digests[0].clone();
                        ctx.read_whole(d.clone()).await.map(|v| vec![(d, v)])
                    } else {
                        ctx.batch_read(digests).await
                    };
                    let tx2 = tx;
                    // The receiver writes files: wait for room off the runtime's threads.
                    let _ = tokio::task::spawn_blocking(move || match got {
                        Ok(v) => v.into_iter().all(|x| tx2.send(Ok(x)).is_ok()),
                        Err(e) => tx2.send(Err(e)).is_ok(),
                    })
                    .await;
                });
            }
            drop(tx);
            while tasks.join_next().await.is_some() {}
        });
        let deliver = || -> Result<(), CacheError> {
            for r in rx {
                let (d, data) = r.map_err(|e| self.err(e))?;
                let i = *index
                    .get(&d.hash)
                    .ok_or_else(|| self.err(GrpcError::UnaskedBlob(d.hash.clone())))?;
                sink(i, data)?;
            }
            Ok(())
        };
        let r = deliver();
        if r.is_err() {
            coordinator.abort();
        }
        r
    }

    fn put_blob(&self, blob: &BlobRef, src: &Path) -> Result<(), CacheError> {
        self.put_blobs(&[(blob.clone(), src.to_owned())])
    }

    fn put_blobs(&self, blobs: &[(BlobRef, PathBuf)]) -> Result<(), CacheError> {
        let ctx = self.ctx()?;
        // Blobs without an entry to name them would only take space: say so before uploading.
        self.can_publish(&ctx)?;
        let mut files = Vec::with_capacity(blobs.len());
        for (b, p) in blobs {
            files.push((b.size, (ctx.digest(b).map_err(|e| self.err(e))?, p.clone())));
        }
        let (batches, streamed) =
            plan_batches(files, ctx.caps.batch, ctx.caps.batch.min(super::SMALL_BLOB));
        let streamed: Vec<Vec<_>> = streamed.into_iter().map(|x| vec![x]).collect();
        self.run(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(PARALLEL / 2));
            let mut tasks = tokio::task::JoinSet::new();
            for (job, stream) in batches
                .into_iter()
                .map(|b| (b, false))
                .chain(streamed.into_iter().map(|b| (b, true)))
            {
                let mut ctx = ctx.clone();
                let permit = sem.clone().acquire_owned().await.expect("semaphore open");
                tasks.spawn(async move {
                    let _permit = permit;
                    if stream {
                        let (d, p) = job.into_iter().next().expect("one blob");
                        return ctx.write_stream(d, Source::File(p)).await;
                    }
                    let mut blobs = Vec::with_capacity(job.len());
                    for (d, p) in job {
                        let data = tokio::fs::read(&p)
                            .await
                            .map_err(|source| GrpcError::Read {
                                label: p.display().to_string(),
                                source,
                            })?;
                        if data.len() as i64 != d.size_bytes {
                            return Err(GrpcError::Changed {
                                label: p.display().to_string(),
                                got: data.len() as i64,
                                expected: d.size_bytes,
                            });
                        }
                        blobs.push((d, data));
                    }
                    ctx.batch_update(blobs).await
                });
                while let Some(r) = tasks.try_join_next() {
                    r.map_err(task("upload task"))??;
                }
            }
            while let Some(r) = tasks.join_next().await {
                r.map_err(task("upload task"))??;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_bytes_overhead_and_count() {
        // Many empty blobs: the count cap and the per-blob overhead split them.
        let (b, s) = plan_batches((0..5000).map(|i| (0, i)).collect(), 4 << 20, 4 << 20);
        assert!(s.is_empty());
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![4096, 904]);
        let (b, _) = plan_batches((0..5000).map(|i| (0, i)).collect(), 256 * 1000, 1 << 20);
        assert!(b.iter().all(|x| x.len() <= 1000), "{}", b[0].len());
        // Bytes: every batch within the limit; big items streamed.
        let items: Vec<(u64, usize)> = (0..100).map(|i| ((i % 7) as u64 * 100_000, i)).collect();
        let (b, s) = plan_batches(items.clone(), 1 << 20, 500_000);
        for batch in &b {
            let bytes: u64 = batch.iter().map(|i| items[*i].0 + PER_BLOB).sum();
            assert!(bytes <= 1 << 20, "{bytes}");
        }
        assert!(s.iter().all(|i| items[*i].0 + PER_BLOB > 500_000));
        assert_eq!(b.iter().map(Vec::len).sum::<usize>() + s.len(), 100);
    }
}
