//! The content-addressable storage: which blobs the server lacks, batch reads and writes of small
//! blobs, ByteStream reads and writes of large ones.

use super::*;

/// ByteStream chunk size.
pub(super) const CHUNK: usize = 1 << 20;

/// Digests per FindMissingBlobs request.
pub(super) const FIND_BATCH: usize = 4096;

/// What a blob costs in a batch request besides its bytes (digest, framing, status), counted
/// so that many tiny blobs never push a request over the server's message limit.
pub(super) const PER_BLOB: u64 = 256;

/// Blobs per batch request at most.
pub(super) const BATCH_BLOBS: usize = 4096;

/// Split `(size, item)`s into batch requests of at most `batch` bytes (counting [`PER_BLOB`]
/// each) and [`BATCH_BLOBS`] items, and the items to stream one by one (costing more than
/// `stream_over`).
pub(super) fn plan_batches<T>(
    items: Vec<(u64, T)>,
    batch: u64,
    stream_over: u64,
) -> (Vec<Vec<T>>, Vec<T>) {
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
#[derive(Clone)]
pub(super) enum Source {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl Ctx {
    pub(super) async fn find_missing(
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

    pub(super) async fn batch_update(
        &mut self,
        blobs: Vec<(re::Digest, Vec<u8>)>,
    ) -> Result<(), GrpcError> {
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

    pub(super) async fn batch_read(
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
    pub(super) async fn read_stream(
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
            let msg = match tokio::time::timeout(crate::cache::timeout(), stream.message()).await {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => break,
                Ok(Err(s)) => return Err(status(&what, s)),
                Err(_) => {
                    return Err(GrpcError::Stalled {
                        what,
                        secs: crate::cache::timeout().as_secs(),
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

    /// Upload a blob through ByteStream, in [`CHUNK`]s; from the start again while the server
    /// is busy, as every other call (a new upload each time).
    pub(super) async fn write_stream(
        &mut self,
        d: re::Digest,
        src: Source,
    ) -> Result<(), GrpcError> {
        let what = format!("ByteStream.Write of {}", self.blob_path(&d));
        // The cache timeout, plus a second for every MiB: a server that takes the bytes and
        // never answers does not hang the push.
        let limit = crate::cache::timeout() + Duration::from_secs(d.size_bytes as u64 >> 20);
        let ctx = self.clone();
        retried_within(&what, limit, || {
            let (mut ctx, d, src) = (ctx.clone(), d.clone(), src.clone());
            async move { ctx.write_stream_once(d, src).await }
        })
        .await?
        .map_err(|s| status(&what, s))?
    }

    /// One ByteStream upload: the server's status apart from every other error.
    async fn write_stream_once(
        &mut self,
        d: re::Digest,
        src: Source,
    ) -> Result<Result<(), GrpcError>, tonic::Status> {
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
        let resp = match self.bytestream.write(stream).await {
            Ok(r) => r,
            Err(s) => {
                reader.abort();
                return Err(s);
            }
        };
        let read = reader.await.map_err(task(format!("{what}: reader")));
        if let Err(e) = read.and_then(|r| r) {
            return Ok(Err(e));
        }
        let committed = resp.into_inner().committed_size;
        // A server that already had the blob may stop early and report its full size.
        if committed != size {
            return Ok(Err(GrpcError::Committed {
                what,
                committed,
                size,
            }));
        }
        Ok(Ok(()))
    }

    /// Read a whole blob (batch if it fits, stream otherwise).
    pub(super) async fn read_whole(&mut self, d: re::Digest) -> Result<Vec<u8>, GrpcError> {
        if (d.size_bytes as u64) + PER_BLOB <= self.caps.batch {
            let mut got = self.batch_read(vec![d.clone()]).await?;
            match got.pop() {
                Some((_, data)) => Ok(data),
                None => Err(GrpcError::NoAnswer(d.hash)),
            }
        } else {
            // Grown as bytes arrive, not reserved on the server's word.
            let mut v =
                Vec::with_capacity((d.size_bytes as u64).min(crate::cache::SMALL_BLOB) as usize);
            self.read_stream(&d, |chunk| {
                v.extend(chunk);
                Ok(())
            })
            .await?;
            Ok(v)
        }
    }
}
