//! The fetch builder: fixed-output downloads, the only builder that touches the network.
//!
//! It runs in the rbuild process itself (one connection pool for hundreds of parallel requests),
//! not in a sandbox: what it produces is checked against the sha256 and size the derivation
//! declares *before* the store registers it, so the bytes are exactly the ones the lock pinned,
//! whichever mirror served them.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::derivation::FixedOutput;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: rbuild is offline (--offline) and this file is not in the store; realise once with network access, or copy a store that has it")]
    Offline { path: String },
    #[error("{path}: no Debian mirror is configured; pass --mirror URL, set RBUILD_MIRROR, or add one to the host's apt sources")]
    NoMirror { path: String },
    #[error("{url}: {msg}")]
    Transfer { url: String, msg: String },
    #[error("{path}: fixed-output check failed: expected sha256 {expected} ({expected_size} bytes), got {actual} ({actual_size} bytes) from {url}")]
    HashMismatch {
        path: String,
        url: String,
        expected: String,
        expected_size: u64,
        actual: String,
        actual_size: u64,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Downloads files from a mirror (`http://`, `https://` or `file://`).
#[derive(Clone)]
pub struct Fetcher {
    mirror: Option<String>,
    offline: bool,
    client: reqwest::Client,
    retries: u32,
}

impl Fetcher {
    /// A fetcher that never touches the network.
    pub fn offline() -> Fetcher {
        Fetcher {
            offline: true,
            ..Fetcher::new(None)
        }
    }

    /// `mirror` is the base URL (`None`: none configured).
    pub fn new(mirror: Option<String>) -> Fetcher {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .user_agent(concat!("rbuild/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client builds");
        Fetcher {
            mirror: mirror.map(|m| m.trim_end_matches('/').to_owned()),
            offline: false,
            client,
            retries: 3,
        }
    }

    pub fn mirror(&self) -> Option<&str> {
        self.mirror.as_deref()
    }

    /// The URL of a mirror-relative path, or why there is none.
    pub fn url(&self, rel: &str) -> Result<String, FetchError> {
        match (&self.mirror, self.offline) {
            (_, true) => Err(FetchError::Offline {
                path: rel.to_owned(),
            }),
            (None, false) => Err(FetchError::NoMirror {
                path: rel.to_owned(),
            }),
            (Some(m), false) => Ok(format!("{m}/{}", rel.trim_start_matches('/'))),
        }
    }

    /// Download `rel` (mirror-relative) to `dest` and check it against `expected`.
    pub async fn fetch_fixed(
        &self,
        rel: &str,
        expected: &FixedOutput,
        dest: &Path,
    ) -> Result<(), FetchError> {
        let url = self.url(rel)?;
        let (actual, size) = self.download(&url, dest).await?;
        if actual != expected.sha256 || size != expected.size {
            let _ = tokio::fs::remove_file(dest).await;
            return Err(FetchError::HashMismatch {
                path: rel.to_owned(),
                url,
                expected: expected.sha256.clone(),
                expected_size: expected.size,
                actual,
                actual_size: size,
            });
        }
        Ok(())
    }

    /// Download `url` to `dest` with retries; returns (sha256 hex, size).
    pub async fn download(&self, url: &str, dest: &Path) -> Result<(String, u64), FetchError> {
        let io = |source| FetchError::Io {
            path: dest.display().to_string(),
            source,
        };
        let mut last = None;
        for attempt in 0..=self.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * (1 << attempt))).await;
            }
            let mut file =
                tokio::io::BufWriter::new(tokio::fs::File::create(dest).await.map_err(io)?);
            match self.download_once(url, &mut file).await {
                Ok(r) => {
                    file.flush().await.map_err(io)?;
                    return Ok(r);
                }
                Err(e @ FetchError::Transfer { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// Download a small file into memory (index files while locking), with retries.
    pub async fn get_bytes(&self, rel: &str) -> Result<Vec<u8>, FetchError> {
        let url = self.url(rel)?;
        let mut last = None;
        for attempt in 0..=self.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * (1 << attempt))).await;
            }
            let mut buf = Vec::new();
            match self.download_once(&url, &mut buf).await {
                Ok(_) => return Ok(buf),
                Err(e @ FetchError::Transfer { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    async fn download_once<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        url: &str,
        sink: &mut W,
    ) -> Result<(String, u64), FetchError> {
        let io = |source| FetchError::Io {
            path: url.to_owned(),
            source,
        };
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        if let Some(path) = url.strip_prefix("file://") {
            let mut src = tokio::fs::File::open(path)
                .await
                .map_err(|e| FetchError::Transfer {
                    url: url.to_owned(),
                    msg: e.to_string(),
                })?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                use tokio::io::AsyncReadExt;
                let n = src.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                size += n as u64;
                sink.write_all(&buf[..n]).await.map_err(io)?;
            }
        } else if url.starts_with("http://") || url.starts_with("https://") {
            let transfer = |e: reqwest::Error| FetchError::Transfer {
                url: url.to_owned(),
                msg: e.to_string(),
            };
            let mut resp = self.client.get(url).send().await.map_err(transfer)?;
            if !resp.status().is_success() {
                return Err(FetchError::Transfer {
                    url: url.to_owned(),
                    msg: format!("HTTP {}", resp.status()),
                });
            }
            while let Some(chunk) = resp.chunk().await.map_err(transfer)? {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                sink.write_all(&chunk).await.map_err(io)?;
            }
        } else {
            return Err(FetchError::Transfer {
                url: url.to_owned(),
                msg: "unsupported URL scheme (use http://, https:// or file://)".into(),
            });
        }
        Ok((hex::encode(hasher.finalize()), size))
    }
}
