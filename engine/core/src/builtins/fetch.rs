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
    #[error(
        "{file}: downloading it from {from} failed: {cause} (URL {url}). Ways out: {WAYS_OUT}"
    )]
    Transfer {
        /// The file, relative to the mirror (the whole URL if it is not below the mirror).
        file: String,
        /// "the mirror URL".
        from: String,
        url: String,
        cause: NetCause,
    },
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

/// What a user can do when the mirror cannot be reached.
const WAYS_OUT: &str = "pass --mirror URL (or set RBUILD_MIRROR) to use a mirror that answers, \
                        --substituter URL for a binary cache that has the outputs, or --offline \
                        with a store that already holds everything needed";

/// Why a download failed, in words: what [`classify`] finds in a transfer error's source chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetCause {
    #[error(
        "connection refused (nothing listens at that address and port, or a firewall rejects it)"
    )]
    ConnectionRefused,
    #[error("DNS lookup failed: the host name does not resolve ({0})")]
    Dns(String),
    #[error("timed out ({0})")]
    TimedOut(String),
    #[error("TLS/certificate problem ({0})")]
    Tls(String),
    #[error("the server answered HTTP {0}")]
    Status(String),
    #[error("network or host unreachable ({0})")]
    Unreachable(String),
    #[error("the connection was reset or closed ({0})")]
    Reset(String),
    #[error("{0}")]
    Other(String),
}

/// Classify a transfer error by walking its source chain: `std::io::Error` kinds (connection
/// refused, timed out, reset, unreachable), hyper-util's connect errors (`dns error` wrapping the
/// resolver's failure), reqwest's own timeout flag, and rustls' errors (which name the
/// certificate or the handshake). The innermost message is kept as the detail.
pub fn classify(err: &(dyn std::error::Error + 'static)) -> NetCause {
    use std::io::ErrorKind;
    let mut chain: Vec<&(dyn std::error::Error + 'static)> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        chain.push(e);
        cur = e.source();
    }
    let detail = chain.last().map(|e| e.to_string()).unwrap_or_default();
    for e in &chain {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused => return NetCause::ConnectionRefused,
                ErrorKind::TimedOut => return NetCause::TimedOut(detail),
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof => return NetCause::Reset(detail),
                _ => {}
            }
            if matches!(
                io.raw_os_error(),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
            ) {
                return NetCause::Unreachable(detail);
            }
        }
    }
    let text: Vec<String> = chain.iter().map(|e| e.to_string().to_lowercase()).collect();
    let any = |needles: &[&str]| text.iter().any(|t| needles.iter().any(|n| t.contains(n)));
    if any(&[
        "dns error",
        "failed to lookup address",
        "name or service not known",
        "no address associated",
        "temporary failure in name resolution",
    ]) {
        return NetCause::Dns(detail);
    }
    if any(&["certificate", "tls", "handshake", "unknownissuer", "ssl"]) {
        return NetCause::Tls(detail);
    }
    if chain.iter().any(|e| {
        e.downcast_ref::<reqwest::Error>()
            .is_some_and(reqwest::Error::is_timeout)
    }) || any(&["timed out", "deadline has elapsed"])
    {
        return NetCause::TimedOut(detail);
    }
    if any(&["connection refused"]) {
        return NetCause::ConnectionRefused;
    }
    NetCause::Other(text.join(": "))
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
        // An explicit mode, not what the umask left: it is part of the output's content hash.
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o644))
            .await
            .map_err(|source| FetchError::Io {
                path: dest.display().to_string(),
                source,
            })?;
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
        let failed = |cause| self.transfer_error(url, cause);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        if let Some(path) = url.strip_prefix("file://") {
            let mut src = tokio::fs::File::open(path)
                .await
                .map_err(|e| failed(NetCause::Other(e.to_string())))?;
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
            let transfer = |e: reqwest::Error| failed(classify(&e));
            let mut resp = self.client.get(url).send().await.map_err(transfer)?;
            if !resp.status().is_success() {
                return Err(failed(NetCause::Status(resp.status().to_string())));
            }
            while let Some(chunk) = resp.chunk().await.map_err(transfer)? {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                sink.write_all(&chunk).await.map_err(io)?;
            }
        } else {
            return Err(failed(NetCause::Other(
                "unsupported URL scheme (use http://, https:// or file://)".into(),
            )));
        }
        Ok((hex::encode(hasher.finalize()), size))
    }

    /// A transfer error for `url`, naming the mirror and the file below it.
    fn transfer_error(&self, url: &str, cause: NetCause) -> FetchError {
        let below = self.mirror.as_deref().and_then(|m| {
            url.strip_prefix(m)
                .and_then(|rest| rest.strip_prefix('/'))
                .map(|file| (m, file))
        });
        let (from, file) = match below {
            Some((m, file)) => (format!("the mirror {m}"), file.to_owned()),
            None => (url.to_owned(), url.to_owned()),
        };
        FetchError::Transfer {
            file,
            from,
            url: url.to_owned(),
            cause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error of a given message with an optional source, as hyper-util's connect errors are.
    #[derive(Debug)]
    struct Wrapped(
        &'static str,
        Option<Box<dyn std::error::Error + Send + Sync>>,
    );

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn causes_are_named_from_the_source_chain() {
        // reqwest → hyper-util "client error (Connect)" → ConnectError "dns error" → the
        // resolver's io::Error, as a name that does not resolve gives.
        let dns = Wrapped(
            "error sending request for url (http://mirror.invalid/debian/dists/x/InRelease)",
            Some(Box::new(Wrapped(
                "client error (Connect)",
                Some(Box::new(Wrapped(
                    "dns error",
                    Some(Box::new(std::io::Error::other(
                        "failed to lookup address information: Name or service not known",
                    ))),
                ))),
            ))),
        );
        let cause = classify(&dns);
        assert!(matches!(cause, NetCause::Dns(_)), "{cause:?}");
        assert!(
            cause.to_string().starts_with("DNS lookup failed")
                && cause.to_string().contains("Name or service not known"),
            "{cause}"
        );

        let refused = Wrapped(
            "tcp connect error",
            Some(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))),
        );
        assert_eq!(classify(&refused), NetCause::ConnectionRefused);
        let timeout = Wrapped(
            "client error (Connect)",
            Some(Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut))),
        );
        assert!(matches!(classify(&timeout), NetCause::TimedOut(_)));
        let tls = Wrapped(
            "client error (Connect)",
            Some(Box::new(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "invalid peer certificate: UnknownIssuer",
            ))),
        );
        assert!(matches!(classify(&tls), NetCause::Tls(_)));
        assert!(matches!(
            classify(&Wrapped("something else", None)),
            NetCause::Other(_)
        ));
    }

    /// A real refused connection on loopback, through reqwest: named, with the mirror, the file
    /// and the ways out.
    #[test]
    fn a_dead_mirror_is_named_with_the_ways_out() {
        // A port that was free a moment ago: nothing listens there now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mirror = format!("http://127.0.0.1:{port}/debian");
        let mut f = Fetcher::new(Some(mirror.clone()));
        f.retries = 0;
        let err = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f.get_bytes("dists/bullseye/InRelease"))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                FetchError::Transfer {
                    cause: NetCause::ConnectionRefused,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.starts_with(&format!(
                "dists/bullseye/InRelease: downloading it from the mirror {mirror} failed: \
                 connection refused"
            )),
            "{msg}"
        );
        for want in ["--mirror URL", "--substituter", "--offline"] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
    }
}
