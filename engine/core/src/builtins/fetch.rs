//! The fetch builder: fixed-output downloads, the only builder that touches the network.
//!
//! It runs in the rbuild process itself (one connection pool for hundreds of parallel requests),
//! not in a sandbox: what it produces is checked against the sha256 and size the derivation
//! declares *before* the store registers it, so the bytes are exactly the ones the lock pinned,
//! whichever mirror served them.
//!
//! Several mirrors may be configured, in order. A fixed-output fetch asks each in turn and takes
//! the first that delivers the pinned bytes: a file that is gone (a point release removed it), a
//! mirror that cannot be reached, or bytes that are not the pinned ones move on to the next. A
//! fetch is identified by its path and hash, never by where it came from. Unpinned downloads
//! (the InRelease and indices `rbuild lock` reads) all come from the first mirror that serves
//! one, so that a lock is read from one archive state.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::derivation::FixedOutput;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: rbuild is offline (--offline) and this file is not in the store; realise once with network access, or copy a store that has it")]
    Offline { path: String },
    #[error("{path}: no Debian mirror is configured; pass --mirror URL, set RBUILD_MIRROR, list `mirrors` in config.toml, or add one to the host's apt sources")]
    NoMirror { path: String },
    /// No mirror delivered the file: each one asked, and what it said.
    #[error("{0}")]
    Unavailable(Box<Unavailable>),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// What a user can do when no mirror delivers a file.
const WAYS_OUT: &str = "pass --mirror URL (more than once: each is tried in order) for a mirror \
                        that has the file, e.g. a snapshot archive of the date the lock was made, \
                        --substituter URL for a binary cache that has the outputs, or --offline \
                        with a store that already holds everything needed";

/// A file no mirror delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// The file, relative to the mirrors (its path in the archive).
    pub file: String,
    /// The bytes the lock pinned (fixed-output fetches).
    pub pinned: Option<FixedOutput>,
    /// Each mirror asked, in order, and what it said.
    pub tried: Vec<Attempt>,
    /// Why the other mirrors were not asked, if some were not.
    pub note: Option<String>,
}

/// One mirror's answer for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub mirror: String,
    pub url: String,
    pub failure: Failure,
}

/// Why a mirror did not deliver a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Net(NetCause),
    #[error("sha256 mismatch: it served other bytes (sha256 {actual}, {size} bytes), so the fixed-output check failed and they were thrown away")]
    Mismatch { actual: String, size: u64 },
    #[error("sha256 mismatch: it served more than the pinned {limit} bytes, so the fixed-output check failed and the download was stopped and thrown away")]
    TooLarge { limit: u64 },
    #[error("not asked: {0}, earlier in this run")]
    Down(NetCause),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(p) = &self.pinned {
            write!(f, " (pinned: sha256 {}, {} bytes)", p.sha256, p.size)?;
        }
        let note = |f: &mut fmt::Formatter<'_>| match &self.note {
            Some(n) => write!(f, "; {n}"),
            None => Ok(()),
        };
        match self.tried.as_slice() {
            [one] => {
                write!(
                    f,
                    ": downloading it from the mirror {} failed: {} (URL {})",
                    one.mirror, one.failure, one.url
                )?;
                note(f)?;
                write!(f, ". Ways out: {WAYS_OUT}")
            }
            all => {
                write!(
                    f,
                    ": none of the {} mirrors delivered it; each one asked, in order:",
                    all.len()
                )?;
                for a in all {
                    write!(f, "\n  - from the mirror {}: {}", a.mirror, a.failure)?;
                }
                note(f)?;
                write!(f, "\nWays out: {WAYS_OUT}")
            }
        }
    }
}

impl std::error::Error for Unavailable {}

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
    Status(reqwest::StatusCode),
    #[error("not found ({0})")]
    NotFound(String),
    #[error("network or host unreachable ({0})")]
    Unreachable(String),
    #[error("the connection was reset or closed ({0})")]
    Reset(String),
    #[error("{0}")]
    Other(String),
}

impl NetCause {
    /// Whether asking the same mirror again may help: not after a definite answer (the file is
    /// not there, a refusal, a certificate the client does not accept).
    fn transient(&self) -> bool {
        match self {
            NetCause::Status(s) => {
                s.is_server_error()
                    || *s == reqwest::StatusCode::REQUEST_TIMEOUT
                    || *s == reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            NetCause::NotFound(_) | NetCause::Tls(_) => false,
            _ => true,
        }
    }

    /// Whether the mirror as a whole cannot be reached: it is not asked again in this run.
    fn unreachable(&self) -> bool {
        matches!(
            self,
            NetCause::ConnectionRefused
                | NetCause::Dns(_)
                | NetCause::Unreachable(_)
                | NetCause::Tls(_)
        )
    }
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

/// Why one download from one mirror did not succeed: the mirror's fault (try the next one), or
/// a local one (the destination cannot be written: no mirror helps).
#[derive(Debug)]
enum Fail {
    Mirror(Failure),
    Local(FetchError),
}

/// Where a download goes.
enum Sink<'a> {
    File(&'a Path),
    Memory(&'a mut Vec<u8>),
}

/// Downloads files from an ordered list of mirrors (`http://`, `https://` or `file://`).
#[derive(Clone)]
pub struct Fetcher {
    mirrors: Vec<String>,
    offline: bool,
    client: reqwest::Client,
    retries: u32,
    /// Mirrors found unreachable in this run (connection refused, no DNS name, unreachable, TLS
    /// refused), with why: not asked again. Shared by the clones.
    down: Arc<Mutex<HashMap<String, NetCause>>>,
    /// The mirror unpinned downloads come from, once one has served the first (its index and
    /// that file's path). Shared by the clones.
    index_mirror: Arc<tokio::sync::Mutex<Option<(usize, String)>>>,
}

impl Fetcher {
    /// A fetcher that never touches the network.
    pub fn offline() -> Fetcher {
        Fetcher {
            offline: true,
            ..Fetcher::new(Vec::new())
        }
    }

    /// `mirrors` are base URLs, in the order they are tried (none: none configured).
    pub fn new(mirrors: Vec<String>) -> Fetcher {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .user_agent(concat!("rbuild/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client builds");
        let mut list: Vec<String> = Vec::new();
        for m in mirrors {
            let m = m.trim().trim_end_matches('/').to_owned();
            if !m.is_empty() && !list.contains(&m) {
                list.push(m);
            }
        }
        Fetcher {
            mirrors: list,
            offline: false,
            client,
            retries: 3,
            down: Arc::default(),
            index_mirror: Arc::default(),
        }
    }

    /// The mirrors, in the order they are tried.
    pub fn mirrors(&self) -> &[String] {
        &self.mirrors
    }

    /// Refuse a download when offline or without a mirror.
    fn check(&self, rel: &str) -> Result<(), FetchError> {
        if self.offline {
            return Err(FetchError::Offline {
                path: rel.to_owned(),
            });
        }
        if self.mirrors.is_empty() {
            return Err(FetchError::NoMirror {
                path: rel.to_owned(),
            });
        }
        Ok(())
    }

    /// Download `rel` (mirror-relative) to `dest`, from the first mirror that delivers exactly
    /// the bytes `expected` pins. Bytes that are not those are never kept.
    pub async fn fetch_fixed(
        &self,
        rel: &str,
        expected: &FixedOutput,
        dest: &Path,
    ) -> Result<(), FetchError> {
        self.check(rel)?;
        let mut tried = Vec::new();
        for mirror in &self.mirrors {
            let url = join(mirror, rel);
            let failure = match self.known_down(mirror) {
                Some(cause) => Failure::Down(cause),
                None => match self
                    .download(&url, Sink::File(dest), Some(expected.size))
                    .await
                {
                    Ok((sha256, size)) if sha256 == expected.sha256 && size == expected.size => {
                        if !tried.is_empty() {
                            tracing::info!(file = rel, %mirror, "fetched from a later mirror");
                        }
                        // An explicit mode, not what the umask left: it is part of the output's
                        // content hash.
                        use std::os::unix::fs::PermissionsExt;
                        return tokio::fs::set_permissions(
                            dest,
                            std::fs::Permissions::from_mode(0o644),
                        )
                        .await
                        .map_err(|source| FetchError::Io {
                            path: dest.display().to_string(),
                            source,
                        });
                    }
                    Ok((actual, size)) => Failure::Mismatch { actual, size },
                    Err(Fail::Mirror(f)) => self.note_down(mirror, f),
                    Err(Fail::Local(e)) => {
                        let _ = tokio::fs::remove_file(dest).await;
                        return Err(e);
                    }
                },
            };
            tried.push(Attempt {
                mirror: mirror.clone(),
                url,
                failure,
            });
        }
        // What the last mirror left there is not the pinned file.
        let _ = tokio::fs::remove_file(dest).await;
        Err(FetchError::Unavailable(Box::new(Unavailable {
            file: rel.to_owned(),
            pinned: Some(expected.clone()),
            tried,
            note: None,
        })))
    }

    /// Download a small unpinned file into memory (index files while locking). The first
    /// mirror that serves one serves them all from then on: a lock is read from one archive
    /// state, never from several mirrors mixed.
    pub async fn get_bytes(&self, rel: &str) -> Result<Vec<u8>, FetchError> {
        self.check(rel)?;
        let mut chosen = self.index_mirror.lock().await;
        if let Some((i, first)) = chosen.clone() {
            drop(chosen);
            let mirror = &self.mirrors[i];
            let url = join(mirror, rel);
            let mut buf = Vec::new();
            return match self.download(&url, Sink::Memory(&mut buf), None).await {
                Ok(_) => Ok(buf),
                Err(Fail::Local(e)) => Err(e),
                Err(Fail::Mirror(f)) => {
                    let note = (self.mirrors.len() > 1).then(|| {
                        format!(
                            "no other mirror is asked: this one served {first}, and a lock is \
                             read from one archive state, never from several mirrors mixed"
                        )
                    });
                    Err(FetchError::Unavailable(Box::new(Unavailable {
                        file: rel.to_owned(),
                        pinned: None,
                        tried: vec![Attempt {
                            mirror: mirror.clone(),
                            url,
                            failure: self.note_down(mirror, f),
                        }],
                        note,
                    })))
                }
            };
        }
        // None chosen yet: the first that answers is (the lock is held meanwhile, so that
        // downloads started at the same time agree).
        let mut tried = Vec::new();
        for (i, mirror) in self.mirrors.iter().enumerate() {
            let url = join(mirror, rel);
            let failure = match self.known_down(mirror) {
                Some(cause) => Failure::Down(cause),
                None => {
                    let mut buf = Vec::new();
                    match self.download(&url, Sink::Memory(&mut buf), None).await {
                        Ok(_) => {
                            *chosen = Some((i, rel.to_owned()));
                            return Ok(buf);
                        }
                        Err(Fail::Local(e)) => return Err(e),
                        Err(Fail::Mirror(f)) => self.note_down(mirror, f),
                    }
                }
            };
            tried.push(Attempt {
                mirror: mirror.clone(),
                url,
                failure,
            });
        }
        Err(FetchError::Unavailable(Box::new(Unavailable {
            file: rel.to_owned(),
            pinned: None,
            tried,
            note: None,
        })))
    }

    /// Why `mirror` was found unreachable earlier in this run, if it was.
    fn known_down(&self, mirror: &str) -> Option<NetCause> {
        self.down
            .lock()
            .expect("the down list is never poisoned")
            .get(mirror)
            .cloned()
    }

    /// Remember `mirror` as unreachable if `failure` says it is; returns `failure`.
    fn note_down(&self, mirror: &str, failure: Failure) -> Failure {
        if let Failure::Net(cause) = &failure {
            if cause.unreachable() {
                tracing::info!(%mirror, %cause, "mirror unreachable: not asked again in this run");
                self.down
                    .lock()
                    .expect("the down list is never poisoned")
                    .entry(mirror.to_owned())
                    .or_insert_with(|| cause.clone());
            }
        }
        failure
    }

    /// Download `url` into `sink` (at most `limit` bytes), asking again after a failure that
    /// may be transient; returns (sha256 hex, size).
    async fn download(
        &self,
        url: &str,
        mut sink: Sink<'_>,
        limit: Option<u64>,
    ) -> Result<(String, u64), Fail> {
        let mut attempt = 0;
        loop {
            let result = match &mut sink {
                Sink::File(dest) => {
                    let io = |source| {
                        Fail::Local(FetchError::Io {
                            path: dest.display().to_string(),
                            source,
                        })
                    };
                    let mut file =
                        tokio::io::BufWriter::new(tokio::fs::File::create(dest).await.map_err(io)?);
                    match self.download_once(url, &mut file, limit).await {
                        Ok(r) => file.flush().await.map(|()| r).map_err(io),
                        Err(e) => Err(e),
                    }
                }
                Sink::Memory(buf) => {
                    buf.clear();
                    self.download_once(url, &mut **buf, limit).await
                }
            };
            match result {
                Err(Fail::Mirror(Failure::Net(cause)))
                    if attempt < self.retries
                        && cause.transient()
                        && !url.starts_with("file://") =>
                {
                    tracing::debug!(url, %cause, attempt, "download failed; trying again");
                }
                other => return other,
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200 * (1 << attempt))).await;
        }
    }

    async fn download_once<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        url: &str,
        sink: &mut W,
        limit: Option<u64>,
    ) -> Result<(String, u64), Fail> {
        let write_failed = |source| {
            Fail::Local(FetchError::Io {
                path: format!("writing what {url} served"),
                source,
            })
        };
        let net = |cause| Fail::Mirror(Failure::Net(cause));
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut take = |chunk: &[u8]| -> Result<(), Fail> {
            if let Some(limit) = limit.filter(|l| size + chunk.len() as u64 > *l) {
                return Err(Fail::Mirror(Failure::TooLarge { limit }));
            }
            hasher.update(chunk);
            size += chunk.len() as u64;
            Ok(())
        };
        if let Some(path) = url.strip_prefix("file://") {
            let mut src = tokio::fs::File::open(path).await.map_err(|e| {
                net(match e.kind() {
                    std::io::ErrorKind::NotFound => NetCause::NotFound(e.to_string()),
                    _ => NetCause::Other(e.to_string()),
                })
            })?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                use tokio::io::AsyncReadExt;
                let n = src
                    .read(&mut buf)
                    .await
                    .map_err(|e| net(NetCause::Other(format!("reading it: {e}"))))?;
                if n == 0 {
                    break;
                }
                take(&buf[..n])?;
                sink.write_all(&buf[..n]).await.map_err(write_failed)?;
            }
        } else if url.starts_with("http://") || url.starts_with("https://") {
            let transfer = |e: reqwest::Error| net(classify(&e));
            let mut resp = self.client.get(url).send().await.map_err(transfer)?;
            if !resp.status().is_success() {
                return Err(net(NetCause::Status(resp.status())));
            }
            while let Some(chunk) = resp.chunk().await.map_err(transfer)? {
                take(&chunk)?;
                sink.write_all(&chunk).await.map_err(write_failed)?;
            }
        } else {
            return Err(net(NetCause::Other(
                "unsupported URL scheme (use http://, https:// or file://)".into(),
            )));
        }
        Ok((hex::encode(hasher.finalize()), size))
    }
}

/// The URL of `rel` below `mirror`.
fn join(mirror: &str, rel: &str) -> String {
    format!("{mirror}/{}", rel.trim_start_matches('/'))
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

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A loopback port that was free a moment ago: nothing listens there now.
    fn dead_url() -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("http://127.0.0.1:{port}/debian")
    }

    /// A loopback HTTP server answering every request with `status` and an empty body; counts
    /// the requests.
    fn serve_status(status: &'static str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/debian", listener.local_addr().unwrap());
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().unwrap();
                    let mut r = BufReader::new(conn);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        // The blank line that ends a request's head (GET: no body).
                        if line.trim().is_empty() {
                            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let head = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                            if w.write_all(head.as_bytes()).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (url, count)
    }

    /// A `file://` mirror under `dir` holding `files` (path, bytes).
    fn file_mirror(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> String {
        let root = dir.join(name);
        for (rel, bytes) in files {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        std::fs::create_dir_all(&root).unwrap();
        format!("file://{}", root.display())
    }

    fn pin(bytes: &[u8]) -> FixedOutput {
        FixedOutput {
            sha256: hex::encode(Sha256::digest(bytes)),
            size: bytes.len() as u64,
        }
    }

    fn unavailable(err: FetchError) -> Unavailable {
        match err {
            FetchError::Unavailable(u) => *u,
            other => panic!("expected Unavailable, got {other}"),
        }
    }

    const DEB: &str = "pool/main/h/hello/hello_1_amd64.deb";

    /// A real refused connection on loopback, through reqwest: named, with the mirror, the file
    /// and the ways out.
    #[test]
    fn a_dead_mirror_is_named_with_the_ways_out() {
        let mirror = dead_url();
        let mut f = Fetcher::new(vec![mirror.clone()]);
        f.retries = 0;
        let err = runtime()
            .block_on(f.get_bytes("dists/bullseye/InRelease"))
            .unwrap_err();
        let msg = err.to_string();
        let u = unavailable(err);
        assert_eq!(
            u.tried.iter().map(|a| &a.failure).collect::<Vec<_>>(),
            [&Failure::Net(NetCause::ConnectionRefused)],
            "{msg}"
        );
        assert!(
            msg.starts_with(&format!(
                "dists/bullseye/InRelease: downloading it from the mirror {mirror} failed: \
                 connection refused"
            )),
            "{msg}"
        );
        for want in ["--mirror URL", "--substituter", "--offline", "snapshot"] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
    }

    /// Mirrors are asked in order: one without the file, one serving other bytes, one serving
    /// more than the pinned size, then one with the pinned bytes, which wins. The file left is
    /// exactly the pinned one (mode 0644).
    #[test]
    fn the_first_mirror_with_the_pinned_bytes_wins() {
        let t = tempfile::tempdir().unwrap();
        let good = b"the pinned deb".as_slice();
        let missing = file_mirror(t.path(), "missing", &[]);
        let wrong = file_mirror(t.path(), "wrong", &[(DEB, b"other bytes!!!")]);
        let long = file_mirror(t.path(), "long", &[(DEB, b"the pinned deb, and then more")]);
        let right = file_mirror(t.path(), "right", &[(DEB, good)]);
        let f = Fetcher::new(vec![missing, wrong, long, format!("{right}/")]);
        let dest = t.path().join("out");
        runtime()
            .block_on(f.fetch_fixed(DEB, &pin(good), &dest))
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), good);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        // A trailing slash and a repeated mirror change nothing.
        assert_eq!(f.mirrors().last(), Some(&right));
        let twice = Fetcher::new(vec![right.clone(), format!("{right}/")]);
        assert_eq!(twice.mirrors(), [right]);
    }

    /// When no mirror delivers the pinned bytes: one error naming the file, its pin, and every
    /// mirror with what it said, in order; nothing is left at the destination.
    #[test]
    fn no_mirror_with_the_file_names_each_and_why() {
        let t = tempfile::tempdir().unwrap();
        let good = b"the pinned deb".as_slice();
        let missing = file_mirror(t.path(), "missing", &[]);
        let dead = dead_url();
        let (gone, _) = serve_status("410 Gone");
        let wrong = file_mirror(t.path(), "wrong", &[(DEB, b"other bytes!!!")]);
        let mut f = Fetcher::new(vec![
            missing.clone(),
            dead.clone(),
            gone.clone(),
            wrong.clone(),
        ]);
        f.retries = 0;
        let dest = t.path().join("out");
        let err = runtime()
            .block_on(f.fetch_fixed(DEB, &pin(good), &dest))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            !dest.exists(),
            "the wrong bytes were left at {}",
            dest.display()
        );
        let u = unavailable(err);
        assert_eq!(u.file, DEB);
        assert_eq!(u.pinned, Some(pin(good)));
        let mirrors: Vec<&str> = u.tried.iter().map(|a| a.mirror.as_str()).collect();
        assert_eq!(mirrors, [&missing, &dead, &gone, &wrong]);
        assert!(matches!(
            u.tried[0].failure,
            Failure::Net(NetCause::NotFound(_))
        ));
        assert_eq!(
            u.tried[1].failure,
            Failure::Net(NetCause::ConnectionRefused)
        );
        assert_eq!(
            u.tried[2].failure,
            Failure::Net(NetCause::Status(reqwest::StatusCode::GONE))
        );
        assert!(matches!(u.tried[3].failure, Failure::Mismatch { .. }));
        let pinned = format!("{DEB} (pinned: sha256 {}, 14 bytes)", pin(good).sha256);
        assert!(msg.starts_with(&pinned), "{msg}");
        for line in [
            format!("\n  - from the mirror {missing}: not found ("),
            format!("\n  - from the mirror {dead}: connection refused"),
            format!("\n  - from the mirror {gone}: the server answered HTTP 410 Gone"),
            format!("\n  - from the mirror {wrong}: sha256 mismatch: it served other bytes"),
            "\nWays out: pass --mirror URL".to_owned(),
        ] {
            assert!(msg.contains(&line), "{line:?} in:\n{msg}");
        }
        // In that order.
        let at = |s: &str| msg.find(s).unwrap();
        assert!(at(&missing) < at(&dead) && at(&dead) < at(&gone) && at(&gone) < at(&wrong));
    }

    /// A definite answer (404) is not asked again; a mirror found unreachable is not asked
    /// again in the run, and is named as such.
    #[test]
    fn definite_answers_and_dead_mirrors_are_not_asked_again() {
        let t = tempfile::tempdir().unwrap();
        let (missing, requests) = serve_status("404 Not Found");
        let dead = dead_url();
        let good = b"the pinned deb".as_slice();
        let right = file_mirror(t.path(), "right", &[(DEB, good)]);
        // Retries stay on: a 404 must not use them.
        let f = Fetcher::new(vec![missing.clone(), dead.clone(), right]);
        let rt = runtime();
        let other = "pool/main/o/other/other_1_amd64.deb";
        let err = rt
            .block_on(f.fetch_fixed(other, &pin(b"x"), &t.path().join("o1")))
            .unwrap_err();
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
        let u = unavailable(err);
        assert_eq!(
            u.tried[0].failure,
            Failure::Net(NetCause::Status(reqwest::StatusCode::NOT_FOUND))
        );
        assert_eq!(
            u.tried[1].failure,
            Failure::Net(NetCause::ConnectionRefused)
        );
        // The next fetch does not ask the dead mirror, and says so if it fails.
        rt.block_on(f.fetch_fixed(DEB, &pin(good), &t.path().join("o2")))
            .unwrap();
        let err = rt
            .block_on(f.fetch_fixed(other, &pin(b"x"), &t.path().join("o3")))
            .unwrap_err();
        let msg = err.to_string();
        let u = unavailable(err);
        assert_eq!(
            u.tried[1].failure,
            Failure::Down(NetCause::ConnectionRefused)
        );
        assert!(
            msg.contains(&format!(
                "from the mirror {dead}: not asked: connection refused"
            )),
            "{msg}"
        );
    }

    /// Unpinned downloads come from the first mirror that serves one, and then only from it.
    #[test]
    fn unpinned_downloads_stay_on_the_first_mirror_that_answers() {
        let t = tempfile::tempdir().unwrap();
        let ir = "dists/s/InRelease";
        let pk = "dists/s/main/binary-amd64/Packages.xz";
        let none = file_mirror(t.path(), "none", &[]);
        let first = file_mirror(t.path(), "first", &[(ir, b"old release")]);
        let second = file_mirror(t.path(), "second", &[(ir, b"new release"), (pk, b"new")]);
        let f = Fetcher::new(vec![none, first.clone(), second]);
        let rt = runtime();
        assert_eq!(rt.block_on(f.get_bytes(ir)).unwrap(), b"old release");
        // The second mirror has the index, but it is of another archive state: not taken.
        let err = rt.block_on(f.get_bytes(pk)).unwrap_err();
        let msg = err.to_string();
        let u = unavailable(err);
        assert_eq!(u.tried.len(), 1);
        assert_eq!(u.tried[0].mirror, first);
        assert!(
            msg.contains(&format!("no other mirror is asked: this one served {ir}")),
            "{msg}"
        );
        // A clone shares the choice.
        assert_eq!(
            rt.block_on(f.clone().get_bytes(ir)).unwrap(),
            b"old release"
        );
    }

    #[test]
    fn offline_and_no_mirror_are_named() {
        let rt = runtime();
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("out");
        assert!(matches!(
            rt.block_on(Fetcher::offline().fetch_fixed(DEB, &pin(b"x"), &dest)),
            Err(FetchError::Offline { .. })
        ));
        let err = rt
            .block_on(Fetcher::new(vec![" ".into()]).get_bytes(DEB))
            .unwrap_err();
        assert!(matches!(err, FetchError::NoMirror { .. }), "{err}");
        assert!(
            err.to_string().contains("`mirrors` in config.toml"),
            "{err}"
        );
    }
}
