//! `http://` / `https://`: plain GET, PUT and HEAD of `entries/<drv-hash>.json` and
//! `blobs/sha256/<digest>` below the URL, so any WebDAV-enabled server or object-store gateway
//! serves it. Plain HTTP has no batch requests: lookups and transfers run several at a time.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::runtime::ClientRuntime;
use super::{BackendError, BinaryCache, BlobRef, BlobSink, CacheError, RawEntry};

/// Requests in flight at a time.
const PARALLEL: usize = 8;

/// Why a request to an HTTP cache failed: the message after "binary cache URL: ".
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No answer: the connection, TLS or a timeout failed.
    #[error("{method} {url}: {}", chain(.source))]
    Request {
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The body of an answer could not be read (or written where it goes).
    #[error("{method} {url}: {source}")]
    Body {
        method: &'static str,
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// An answer other than the ones the protocol expects.
    #[error("{method} {url}: HTTP {status}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
    },
    #[error("request thread panicked")]
    ThreadPanicked,
    #[error("starting the HTTP client: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the HTTP client stopped")]
    ClientStopped,
}

/// A request error with its causes ("Connection refused", the certificate's fault), which
/// reqwest's own message leaves out.
fn chain(e: &reqwest::Error) -> String {
    super::error::and_causes(e.to_string(), std::error::Error::source(e))
}

pub struct HttpCache {
    url: String,
    client: reqwest::Client,
    rt: ClientRuntime,
}

impl HttpCache {
    pub fn new(url: &str) -> Result<HttpCache, CacheError> {
        let bad = |e: HttpError| CacheError::Backend {
            url: url.to_owned(),
            source: Box::new(e.into()),
        };
        let rt = ClientRuntime::new("rbuild-http").map_err(|e| bad(HttpError::Runtime(e)))?;
        let client = {
            let _guard = rt.handle().enter();
            reqwest::Client::builder()
                .connect_timeout(super::timeout())
                .read_timeout(super::timeout())
                .build()
                .map_err(|source| {
                    bad(HttpError::Request {
                        method: "starting",
                        url: url.to_owned(),
                        source,
                    })
                })?
        };
        Ok(HttpCache {
            url: url.trim_end_matches('/').to_owned(),
            client,
            rt,
        })
    }

    /// Send `req` on this cache's runtime and wait for its answer (status and head only).
    fn send(
        &self,
        method: &'static str,
        url: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CacheError> {
        self.rt
            .run(async move { req.send().await })
            .ok_or_else(|| self.err(HttpError::ClientStopped))?
            .map_err(self.no_answer(method, url))
    }

    /// The body of `resp`, piece by piece into `out`, up to `max` bytes (what follows is not
    /// read: the caller's checks tell a body that was longer).
    fn read_body(
        &self,
        url: &str,
        resp: reqwest::Response,
        max: u64,
        out: &mut dyn Write,
    ) -> Result<(), CacheError> {
        let mut resp = Some(resp);
        let mut got = 0u64;
        loop {
            let r = resp.take().expect("the response is put back");
            let (r, piece) = self
                .rt
                .run(async move {
                    let mut r = r;
                    let piece = r.chunk().await;
                    (r, piece)
                })
                .ok_or_else(|| self.err(HttpError::ClientStopped))?;
            resp = Some(r);
            let Some(bytes) = piece.map_err(self.no_answer("GET", url))? else {
                return Ok(());
            };
            let take = bytes.len().min((max - got) as usize);
            out.write_all(&bytes[..take])
                .map_err(self.body("GET", url))?;
            got += take as u64;
            if got == max {
                return Ok(());
            }
        }
    }

    /// Run `f` on every item, [`PARALLEL`] at a time, results in order.
    fn parallel<T: Sync, R: Send>(
        &self,
        items: &[T],
        f: impl Fn(&T) -> Result<R, CacheError> + Sync,
    ) -> Result<Vec<R>, CacheError> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(PARALLEL) {
            let results: Vec<Result<R, CacheError>> = std::thread::scope(|sc| {
                let handles: Vec<_> = chunk.iter().map(|x| sc.spawn(|| f(x))).collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(self.err(HttpError::ThreadPanicked)))
                    })
                    .collect()
            });
            for r in results {
                out.push(r?);
            }
        }
        Ok(out)
    }
    fn err(&self, source: impl Into<BackendError>) -> CacheError {
        CacheError::Backend {
            url: self.url.clone(),
            source: Box::new(source.into()),
        }
    }

    /// For a request that got no answer.
    fn no_answer<'a>(
        &'a self,
        method: &'static str,
        url: &'a str,
    ) -> impl FnOnce(reqwest::Error) -> CacheError + 'a {
        move |source| {
            self.err(HttpError::Request {
                method,
                url: url.to_owned(),
                source,
            })
        }
    }

    /// For a body that could not be read (or written where it goes).
    fn body<'a>(
        &'a self,
        method: &'static str,
        url: &'a str,
    ) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
        move |source| {
            self.err(HttpError::Body {
                method,
                url: url.to_owned(),
                source,
            })
        }
    }

    fn status(&self, method: &'static str, url: &str, status: u16) -> CacheError {
        self.err(HttpError::Status {
            method,
            url: url.to_owned(),
            status,
        })
    }

    fn entry_url(&self, drv_hash: &str) -> String {
        format!("{}/entries/{drv_hash}.json", self.url)
    }

    fn blob_url(&self, blob: &BlobRef) -> Result<String, CacheError> {
        blob.check().map_err(|e| self.err(e))?;
        Ok(format!("{}/blobs/sha256/{}", self.url, blob.sha256))
    }

    fn check_put(&self, what: &str, status: u16) -> Result<(), CacheError> {
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(self.status("PUT", what, status))
        }
    }
}

impl BinaryCache for HttpCache {
    fn url(&self) -> &str {
        &self.url
    }

    fn get_entry(&self, drv_hash: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let url = self.entry_url(drv_hash);
        let resp = self.send("GET", &url, self.client.get(&url))?;
        match resp.status().as_u16() {
            404 => Ok(None),
            200 => {
                let mut body = Vec::new();
                self.read_body(&url, resp, 64 << 20, &mut body)?;
                Ok(Some(body))
            }
            s => Err(self.status("GET", &url, s)),
        }
    }

    fn get_entries(&self, drv_hashes: &[String]) -> Result<Vec<RawEntry>, CacheError> {
        Ok(self
            .parallel(drv_hashes, |h| self.get_entry(h))?
            .into_iter()
            .map(Ok)
            .collect())
    }

    fn put_entry(&self, drv_hash: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let url = self.entry_url(drv_hash);
        let resp = self.send("PUT", &url, self.client.put(&url).body(bytes.to_vec()))?;
        self.check_put(&url, resp.status().as_u16())
    }

    fn missing_blobs(&self, blobs: &[BlobRef]) -> Result<Vec<BlobRef>, CacheError> {
        let found = self.parallel(blobs, |b| {
            let url = self.blob_url(b)?;
            let resp = self.send("HEAD", &url, self.client.head(&url))?;
            match resp.status().as_u16() {
                200 => Ok(true),
                404 => Ok(false),
                s => Err(self.status("HEAD", &url, s)),
            }
        })?;
        Ok(blobs
            .iter()
            .zip(found)
            .filter(|(_, f)| !f)
            .map(|(b, _)| b.clone())
            .collect())
    }

    fn get_blob(&self, blob: &BlobRef, dest: &mut dyn Write) -> Result<(), CacheError> {
        let url = self.blob_url(blob)?;
        let resp = self.send("GET", &url, self.client.get(&url))?;
        if resp.status().as_u16() != 200 {
            return Err(self.status("GET", &url, resp.status().as_u16()));
        }
        // One byte more than the listing says is enough to tell it is wrong.
        self.read_body(&url, resp, blob.size + 1, dest)
    }

    fn get_small_blobs(&self, blobs: &[BlobRef], sink: &mut BlobSink) -> Result<(), CacheError> {
        for (n, chunk) in blobs.chunks(PARALLEL * 4).enumerate() {
            let got = self.parallel(chunk, |b| {
                let mut v = Vec::with_capacity(b.size.min(super::SMALL_BLOB) as usize);
                self.get_blob(b, &mut v)?;
                Ok(v)
            })?;
            for (i, bytes) in got.into_iter().enumerate() {
                sink(n * PARALLEL * 4 + i, bytes)?;
            }
        }
        Ok(())
    }

    fn put_blobs(&self, blobs: &[(BlobRef, PathBuf)]) -> Result<(), CacheError> {
        self.parallel(blobs, |(b, p)| self.put_blob(b, p))
            .map(|_| ())
    }

    fn put_blob(&self, blob: &BlobRef, src: &Path) -> Result<(), CacheError> {
        let url = self.blob_url(blob)?;
        let f = std::fs::File::open(src).map_err(super::io(src.display()))?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(
            tokio::fs::File::from_std(f),
        ));
        // With its length: a streamed body would go chunked, which object-store gateways refuse.
        let put = self
            .client
            .put(&url)
            .header(reqwest::header::CONTENT_LENGTH, blob.size)
            .body(body);
        let resp = self.send("PUT", &url, put)?;
        self.check_put(&url, resp.status().as_u16())
    }
}
