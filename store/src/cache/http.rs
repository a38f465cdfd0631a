//! `http://` / `https://`: plain GET, PUT and HEAD of `entries/<drv-hash>.json` and
//! `blobs/sha256/<digest>` below the URL, so any WebDAV-enabled server or object-store gateway
//! serves it. Plain HTTP has no batch requests: lookups and transfers run several at a time.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{io, BackendError, BinaryCache, BlobRef, BlobSink, CacheError, RawEntry};

/// Requests in flight at a time.
const PARALLEL: usize = 8;

/// Why a request to an HTTP cache failed: the message after "binary cache URL: ".
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No answer: the connection, TLS or a timeout failed.
    #[error("{method} {url}: {source}")]
    Request {
        method: &'static str,
        url: String,
        #[source]
        source: ureq::Error,
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
}

pub struct HttpCache {
    url: String,
    agent: ureq::Agent,
}

impl HttpCache {
    pub fn new(url: &str) -> HttpCache {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(super::timeout()))
            .timeout_recv_response(Some(super::timeout()))
            .timeout_per_read(Some(super::timeout()))
            .build()
            .into();
        HttpCache {
            url: url.trim_end_matches('/').to_owned(),
            agent,
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
    ) -> impl FnOnce(ureq::Error) -> CacheError + 'a {
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
        let resp = self
            .agent
            .get(&url)
            .call()
            .map_err(self.no_answer("GET", &url))?;
        match resp.status().as_u16() {
            404 => Ok(None),
            200 => {
                let mut body = Vec::new();
                resp.into_body()
                    .into_reader()
                    .take(64 << 20)
                    .read_to_end(&mut body)
                    .map_err(self.body("GET", &url))?;
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
        let resp = self
            .agent
            .put(&url)
            .send(bytes)
            .map_err(self.no_answer("PUT", &url))?;
        self.check_put(&url, resp.status().as_u16())
    }

    fn missing_blobs(&self, blobs: &[BlobRef]) -> Result<Vec<BlobRef>, CacheError> {
        let found = self.parallel(blobs, |b| {
            let url = self.blob_url(b)?;
            let resp = self
                .agent
                .head(&url)
                .call()
                .map_err(self.no_answer("HEAD", &url))?;
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
        let resp = self
            .agent
            .get(&url)
            .call()
            .map_err(self.no_answer("GET", &url))?;
        if resp.status().as_u16() != 200 {
            return Err(self.status("GET", &url, resp.status().as_u16()));
        }
        // One byte more than the listing says is enough to tell it is wrong.
        std::io::copy(
            &mut resp.into_body().into_reader().take(blob.size + 1),
            dest,
        )
        .map_err(self.body("GET", &url))?;
        Ok(())
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
        let f = fs::File::open(src).map_err(io(src.display()))?;
        let resp = self
            .agent
            .put(&url)
            .send(f)
            .map_err(self.no_answer("PUT", &url))?;
        self.check_put(&url, resp.status().as_u16())
    }
}
