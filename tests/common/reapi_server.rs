//! A small in-memory Remote Execution API v2 server (Capabilities, CAS, ByteStream,
//! ActionCache) for what BuildGrid cannot show: a server that lists only BLAKE3 digests, and a
//! server that lies. It checks every uploaded blob against its BLAKE3 digest, so a client that
//! sends SHA-256 addresses fails, and it counts requests so tests can see batching.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use bazel_remote_apis::google::rpc;
use tonic::{Request, Response, Status, Streaming};

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// What the server holds and what it was asked; shared with the test.
#[derive(Default)]
pub struct State {
    /// BLAKE3 hex → bytes.
    pub blobs: Mutex<HashMap<String, Vec<u8>>>,
    pub actions: Mutex<HashMap<String, re::ActionResult>>,
    pub find_missing_calls: AtomicUsize,
    pub digests_asked: AtomicUsize,
    pub batch_reads: AtomicUsize,
    pub stream_reads: AtomicUsize,
    pub stream_writes: AtomicUsize,
    pub early_writes: AtomicUsize,
    /// While above 0, ActionCache and FindMissingBlobs calls are refused as BuildGrid refuses
    /// them past its limit of concurrent calls (`RESOURCE_EXHAUSTED`), one per call.
    pub busy: AtomicUsize,
    /// The same for ByteStream writes, refused after their first message.
    pub busy_writes: AtomicUsize,
}

impl State {
    fn busy(&self) -> Result<(), Status> {
        match self
            .busy
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        {
            Ok(_) => Err(Status::resource_exhausted("Concurrent RPC limit exceeded!")),
            Err(_) => Ok(()),
        }
    }
}

#[derive(Clone)]
struct Server(Arc<State>);

fn check(d: &re::Digest, data: &[u8]) -> Result<(), Status> {
    let actual = blake3::hash(data).to_hex().to_string();
    if d.hash != actual || d.size_bytes != data.len() as i64 {
        return Err(Status::invalid_argument(format!(
            "blob {}/{} is really blake3 {actual}/{}",
            d.hash,
            d.size_bytes,
            data.len()
        )));
    }
    Ok(())
}

fn need_blake3(f: i32) -> Result<(), Status> {
    if f != re::digest_function::Value::Blake3 as i32 {
        return Err(Status::invalid_argument(format!(
            "this server only speaks BLAKE3, request says digest function {f}"
        )));
    }
    Ok(())
}

/// `[INSTANCE/]blobs/blake3/HASH/SIZE` or `[INSTANCE/]uploads/UUID/blobs/blake3/HASH/SIZE`.
fn parse_resource(name: &str) -> Result<re::Digest, Status> {
    let parts: Vec<&str> = name.split('/').collect();
    match parts.as_slice() {
        [.., "blobs", "blake3", hash, size] => Ok(re::Digest {
            hash: hash.to_string(),
            size_bytes: size
                .parse()
                .map_err(|_| Status::invalid_argument(name.to_owned()))?,
        }),
        _ => Err(Status::invalid_argument(format!(
            "not a BLAKE3 resource name: {name}"
        ))),
    }
}

#[tonic::async_trait]
impl re::capabilities_server::Capabilities for Server {
    async fn get_capabilities(
        &self,
        _: Request<re::GetCapabilitiesRequest>,
    ) -> Result<Response<re::ServerCapabilities>, Status> {
        Ok(Response::new(re::ServerCapabilities {
            cache_capabilities: Some(re::CacheCapabilities {
                digest_functions: vec![re::digest_function::Value::Blake3 as i32],
                max_batch_total_size_bytes: 1 << 20,
                action_cache_update_capabilities: Some(re::ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl re::action_cache_server::ActionCache for Server {
    async fn get_action_result(
        &self,
        r: Request<re::GetActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        self.0.busy()?;
        let r = r.into_inner();
        need_blake3(r.digest_function)?;
        let key = r.action_digest.unwrap_or_default().hash;
        match self.0.actions.lock().unwrap().get(&key) {
            Some(a) => Ok(Response::new(a.clone())),
            None => Err(Status::not_found(key)),
        }
    }

    async fn update_action_result(
        &self,
        r: Request<re::UpdateActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        self.0.busy()?;
        let r = r.into_inner();
        need_blake3(r.digest_function)?;
        let action = r.action_digest.unwrap_or_default();
        if !self.0.blobs.lock().unwrap().contains_key(&action.hash) {
            return Err(Status::failed_precondition("the Action is not in the CAS"));
        }
        let result = r.action_result.unwrap_or_default();
        self.0
            .actions
            .lock()
            .unwrap()
            .insert(action.hash, result.clone());
        Ok(Response::new(result))
    }
}

#[tonic::async_trait]
impl re::content_addressable_storage_server::ContentAddressableStorage for Server {
    async fn find_missing_blobs(
        &self,
        r: Request<re::FindMissingBlobsRequest>,
    ) -> Result<Response<re::FindMissingBlobsResponse>, Status> {
        self.0.busy()?;
        let r = r.into_inner();
        need_blake3(r.digest_function)?;
        self.0.find_missing_calls.fetch_add(1, Ordering::Relaxed);
        self.0
            .digests_asked
            .fetch_add(r.blob_digests.len(), Ordering::Relaxed);
        let blobs = self.0.blobs.lock().unwrap();
        Ok(Response::new(re::FindMissingBlobsResponse {
            missing_blob_digests: r
                .blob_digests
                .into_iter()
                .filter(|d| d.size_bytes > 0 && !blobs.contains_key(&d.hash))
                .collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        r: Request<re::BatchUpdateBlobsRequest>,
    ) -> Result<Response<re::BatchUpdateBlobsResponse>, Status> {
        let r = r.into_inner();
        need_blake3(r.digest_function)?;
        let mut responses = vec![];
        for req in r.requests {
            let d = req.digest.unwrap_or_default();
            check(&d, &req.data)?;
            self.0
                .blobs
                .lock()
                .unwrap()
                .insert(d.hash.clone(), req.data);
            responses.push(re::batch_update_blobs_response::Response {
                digest: Some(d),
                status: Some(rpc::Status::default()),
            });
        }
        Ok(Response::new(re::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        r: Request<re::BatchReadBlobsRequest>,
    ) -> Result<Response<re::BatchReadBlobsResponse>, Status> {
        let r = r.into_inner();
        need_blake3(r.digest_function)?;
        self.0.batch_reads.fetch_add(1, Ordering::Relaxed);
        let blobs = self.0.blobs.lock().unwrap();
        let responses = r
            .digests
            .into_iter()
            .map(|d| {
                let data = if d.size_bytes == 0 {
                    Some(vec![])
                } else {
                    blobs.get(&d.hash).cloned()
                };
                re::batch_read_blobs_response::Response {
                    status: Some(rpc::Status {
                        code: if data.is_some() { 0 } else { 5 },
                        ..Default::default()
                    }),
                    digest: Some(d),
                    data: data.unwrap_or_default(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(Response::new(re::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = Stream<re::GetTreeResponse>;
    async fn get_tree(
        &self,
        _: Request<re::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        Err(Status::unimplemented("GetTree"))
    }
    async fn split_blob(
        &self,
        _: Request<re::SplitBlobRequest>,
    ) -> Result<Response<re::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("SplitBlob"))
    }
    type GetChunkMappingStream = Stream<re::GetChunkMappingResponse>;
    async fn get_chunk_mapping(
        &self,
        _: Request<re::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("GetChunkMapping"))
    }
    async fn splice_blob(
        &self,
        _: Request<re::SpliceBlobRequest>,
    ) -> Result<Response<re::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("SpliceBlob"))
    }
    async fn register_chunk_mapping(
        &self,
        _: Request<Streaming<re::RegisterChunkMappingRequest>>,
    ) -> Result<Response<re::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("RegisterChunkMapping"))
    }
}

#[tonic::async_trait]
impl bs::byte_stream_server::ByteStream for Server {
    type ReadStream = Stream<bs::ReadResponse>;

    async fn read(
        &self,
        r: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let d = parse_resource(&r.into_inner().resource_name)?;
        self.0.stream_reads.fetch_add(1, Ordering::Relaxed);
        let data = self
            .0
            .blobs
            .lock()
            .unwrap()
            .get(&d.hash)
            .cloned()
            .ok_or_else(|| Status::not_found(d.hash.clone()))?;
        let chunks: Vec<Result<bs::ReadResponse, Status>> = data
            .chunks(64 << 10)
            .map(|c| Ok(bs::ReadResponse { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn write(
        &self,
        r: Request<Streaming<bs::WriteRequest>>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        let mut stream = r.into_inner();
        let mut data = vec![];
        let mut digest = None;
        while let Some(msg) = stream.message().await? {
            if digest.is_none() {
                let d = parse_resource(&msg.resource_name)?;
                if self
                    .0
                    .busy_writes
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(Status::resource_exhausted("Concurrent RPC limit exceeded!"));
                }
                // As REAPI allows: a blob the server has already ends the write at once.
                if self.0.blobs.lock().unwrap().contains_key(&d.hash) {
                    self.0.early_writes.fetch_add(1, Ordering::Relaxed);
                    return Ok(Response::new(bs::WriteResponse {
                        committed_size: d.size_bytes,
                    }));
                }
                digest = Some(d);
            }
            if msg.write_offset != data.len() as i64 {
                return Err(Status::invalid_argument("write_offset"));
            }
            data.extend(msg.data);
            if msg.finish_write {
                break;
            }
        }
        let d = digest.ok_or_else(|| Status::invalid_argument("empty write"))?;
        check(&d, &data)?;
        self.0.stream_writes.fetch_add(1, Ordering::Relaxed);
        let n = data.len() as i64;
        self.0.blobs.lock().unwrap().insert(d.hash, data);
        Ok(Response::new(bs::WriteResponse { committed_size: n }))
    }

    async fn query_write_status(
        &self,
        _: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        Err(Status::unimplemented("QueryWriteStatus"))
    }
}

/// Start the server on a free loopback port: its `grpc://` URL and its state. It runs until the
/// test process ends.
pub fn start() -> (String, Arc<State>) {
    let state = Arc::new(State::default());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let server = Server(state.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(
                tokio::net::TcpListener::from_std(listener).unwrap(),
            );
            tonic::transport::Server::builder()
                .add_service(re::capabilities_server::CapabilitiesServer::new(
                    server.clone(),
                ))
                .add_service(re::action_cache_server::ActionCacheServer::new(
                    server.clone(),
                ))
                .add_service(
                    re::content_addressable_storage_server::ContentAddressableStorageServer::new(
                        server.clone(),
                    )
                    .max_decoding_message_size(64 << 20),
                )
                .add_service(bs::byte_stream_server::ByteStreamServer::new(server))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
    });
    (format!("grpc://{addr}"), state)
}
