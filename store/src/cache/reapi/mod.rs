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
//!
//! This file holds the client, its runtime, the retrying of calls and the [`BinaryCache`]
//! methods; `cas.rs` the CAS and ByteStream calls, `action_cache.rs` the ActionCache's entries,
//! `error.rs` what can fail.

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

mod action_cache;
mod cas;
mod error;

use action_cache::Entry;
pub(crate) use action_cache::ENTRY_FILE;
use cas::{plan_batches, Source, PER_BLOB};
use error::{status, task};
pub use error::{GrpcError, RpcStatus};

use super::runtime::ClientRuntime;
use super::{BinaryCache, BlobRef, BlobSink, CacheError, EntryError, RawEntry};

/// Largest gRPC message this client accepts.
const MAX_MESSAGE: usize = 64 << 20;

/// Requests in flight at a time.
const PARALLEL: usize = 8;

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
    rt: ClientRuntime,
    channel: Channel,
    caps: OnceLock<Result<Caps, Arc<GrpcError>>>,
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
        let rt = ClientRuntime::new("rbuild-reapi").map_err(|e| bad(GrpcError::Runtime(e)))?;
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
            let _guard = rt.handle().enter();
            endpoint.connect_lazy()
        };
        Ok(GrpcCache {
            url: url.to_owned(),
            instance: instance.trim_end_matches('/').to_owned(),
            rt,
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
        self.rt.run(fut).ok_or(GrpcError::ClientStopped)?
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
/// from 100 ms (6.3 s in all): the remote APIs ask clients to retry those.
const RETRIES: u32 = 6;

/// `call()`'s answer, asked again while the server is busy ([`RETRIES`]); an error after
/// [`super::timeout`] of one call.
async fn retried<T, Fut>(
    what: &str,
    call: impl FnMut() -> Fut,
) -> Result<Result<T, tonic::Status>, GrpcError>
where
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    retried_within(what, super::timeout(), call).await
}

/// [`retried`], with `limit` for one call.
async fn retried_within<T, Fut>(
    what: &str,
    limit: Duration,
    call: impl FnMut() -> Fut,
) -> Result<Result<T, tonic::Status>, GrpcError>
where
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let busy = |s: &tonic::Status| {
        matches!(
            s.code(),
            tonic::Code::ResourceExhausted | tonic::Code::Unavailable
        )
    };
    super::retry::while_busy(limit, RETRIES, busy, call)
        .await
        .ok_or_else(|| GrpcError::Timeout {
            what: what.to_owned(),
            secs: limit.as_secs(),
        })
}

/// [`retried`], with the server's error as a [`GrpcError`].
async fn timed<T, Fut>(what: &str, call: impl FnMut() -> Fut) -> Result<T, GrpcError>
where
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    retried(what, call).await?.map_err(|s| status(what, s))
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
    pub(super) fn digest_function(&self) -> i32 {
        if self.caps.blake3 {
            DigestFunction::Blake3 as i32
        } else {
            DigestFunction::Sha256 as i32
        }
    }

    /// The digest of bytes made here.
    pub(super) fn digest_of(&self, bytes: &[u8]) -> re::Digest {
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
    pub(super) fn digest(&self, b: &BlobRef) -> Result<re::Digest, GrpcError> {
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
    pub(super) fn blob_path(&self, d: &re::Digest) -> String {
        if self.caps.blake3 {
            format!("blobs/blake3/{}/{}", d.hash, d.size_bytes)
        } else {
            format!("blobs/{}/{}", d.hash, d.size_bytes)
        }
    }
}

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
        let task = self.rt.handle().spawn(async move {
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
        let coordinator = self.rt.handle().spawn(async move {
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
