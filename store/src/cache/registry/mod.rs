//! `docker://HOST[:PORT]/REPOSITORY`: a binary cache in an OCI registry, the name skopeo and
//! podman give registry references (their `oci:` is a local layout). Spoken to with the
//! `oci-client` crate (the distribution API).
//!
//! - File blobs are the repository's blobs, by SHA-256. Registries have no batch call: which are
//!   missing is asked with a `HEAD` each, [`PARALLEL`] at a time; uploads are the API's upload
//!   sessions.
//! - A derivation's signed entry is an OCI artifact, tagged with the derivation hash: a manifest
//!   whose `artifactType` is [`ENTRY_ARTIFACT`], with the empty config, the entry as its first
//!   layer and every file blob the entry names as the next ones, so that the registry's garbage
//!   collector keeps them (an output with more than [`LAYERS_PER_MANIFEST`] blobs also gets
//!   manifests tagged `DRV.N` holding the rest).
//! - Credentials as podman, skopeo and Docker keep them ([`auth`]); basic and bearer-token
//!   challenges. TLS with the system's roots (which honour `SSL_CERT_FILE` and `SSL_CERT_DIR`);
//!   plain HTTP only for a loopback host or one listed in `config.toml`'s `insecure-registries`.
//! - Nothing the registry sends is trusted: blobs are checked against their SHA-256 and size, the
//!   entry against its signature and derivation hash, as in every backend.

mod auth;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::{Digest as _, Sha256};
use tokio_stream::StreamExt as _;

pub use auth::{allow_plain_http, AuthFileError};

use super::runtime::ClientRuntime;
use super::{BinaryCache, BlobRef, CacheEntry, CacheError};

/// The `artifactType` of an entry's manifest, and the media type of the entry itself.
pub const ENTRY_ARTIFACT: &str = "application/vnd.rbuild.entry.v1+json";
/// The `artifactType` of the manifests that hold the rest of a large output's blobs.
pub const BLOBS_ARTIFACT: &str = "application/vnd.rbuild.blobs.v1+json";
/// The media type of a file blob in a manifest.
const BLOB_MEDIA: &str = "application/vnd.rbuild.blob.v1";
const MANIFEST_MEDIA: &str = "application/vnd.oci.image.manifest.v1+json";
/// The OCI empty descriptor: `{}`.
const EMPTY_MEDIA: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";
/// Requests in flight at a time.
const PARALLEL: usize = 16;
/// Entries larger than this are refused (a tree listing of a whole system is a few MiB), as
/// the HTTP cache refuses them.
const MAX_ENTRY: u64 = 64 << 20;
/// Manifests larger than this are refused unread: the distribution registry accepts none
/// larger, and ours hold at most [`LAYERS_PER_MANIFEST`] layers.
const MAX_MANIFEST: u64 = 4 << 20;
/// Layers per manifest: about 150 bytes each, well below the 4 MiB that the distribution
/// registry accepts.
const LAYERS_PER_MANIFEST: usize = 16_000;
/// Blobs up to this size go in one PUT each, read into memory, with at most `IN_FLIGHT_MIB`
/// MiB of them at a time; larger ones are streamed from their files in `CHUNK`-byte chunks (a
/// PATCH each, oci-client's chunk size), `PARALLEL_STREAMS` at a time, never held whole.
const STREAM_ABOVE: u64 = 16 << 20;
const IN_FLIGHT_MIB: u32 = 64;
const CHUNK: usize = 4 << 20;
const PARALLEL_STREAMS: usize = 4;

/// Why a registry cache failed: the message after "binary cache URL: ".
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("expected docker://HOST[:PORT]/REPOSITORY")]
    BadUrl,
    #[error("{}: {source}", path.display())]
    AuthFile {
        path: PathBuf,
        #[source]
        source: AuthFileError,
    },
    /// What failed at the first contact (or authentication), kept for the rest of the run.
    #[error(transparent)]
    Earlier(Arc<RegistryError>),
    #[error("starting the registry client: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the registry client stopped")]
    ClientStopped,
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: the registry answered {status}: {detail}")]
    Status {
        what: String,
        status: u16,
        detail: String,
    },
    #[error("{}; in plain HTTP: {source}", super::error::and_causes(https.to_string(), std::error::Error::source(&**https)))]
    PlainHttp {
        https: Box<RegistryError>,
        #[source]
        source: Box<RegistryError>,
    },
    #[error("manifest {tag}: longer than {max} bytes, refused unread")]
    ManifestTooLong { tag: String, max: u64 },
    #[error("{what}: no answer within {secs} s")]
    Timeout { what: String, secs: u64 },
    #[error("manifest {tag}: {detail}")]
    BadManifest { tag: String, detail: String },
    #[error("blob {digest}: more than the {size} bytes it has")]
    TooLong { digest: String, size: u64 },
    #[error("blob {digest}: {got} bytes, expected {size}")]
    Short { digest: String, got: u64, size: u64 },
    #[error("blob {digest}: the registry sent bytes whose SHA-256 is {got}")]
    WrongBytes { digest: String, got: String },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing blob {digest}: {source}")]
    Write {
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entry {0}: not an rbuild entry: {1}")]
    NotAnEntry(String, String),
}

pub struct RegistryCache {
    url: String,
    /// `HOST[:PORT]`.
    host: String,
    repository: String,
    /// The client for HTTPS, or for plain HTTP where the host allows it and speaks no TLS:
    /// chosen at the first contact, and a failure then is kept for the run.
    client: OnceLock<Result<Chosen, Arc<RegistryError>>>,
    auth: RegistryAuth,
    /// The bearer token (if the registry gives tokens) for pulling, and for pushing: asked for
    /// once per run (a failure then is kept for the run).
    authed: [OnceLock<Result<SharedToken, Arc<RegistryError>>>; 2],
    rt: ClientRuntime,
}

/// A bearer token (None: the registry gives none), shared by the requests of one operation and
/// renewed in place when it expires.
type SharedToken = Arc<std::sync::Mutex<Option<String>>>;

/// The clients chosen at the first contact.
#[derive(Clone)]
struct Chosen {
    client: Arc<Client>,
    /// For manifests, which oci-client would read whole into memory, whatever their length.
    http: reqwest::Client,
    scheme: &'static str,
}

/// The parts of one request that its task needs.
#[derive(Clone)]
struct Ctx {
    client: Arc<Client>,
    http: reqwest::Client,
    scheme: &'static str,
    host: String,
    repository: String,
    auth: RegistryAuth,
    /// The token from [`RegistryCache::authenticate`].
    token: SharedToken,
}

impl Ctx {
    fn reference(&self, tag: &str) -> Reference {
        Reference::with_tag(self.host.clone(), self.repository.clone(), tag.to_owned())
    }

    /// A reference to the repository itself, for blob requests.
    fn repo(&self) -> Reference {
        self.reference("latest")
    }

    /// Manifest `tag`, or None if the registry has no such manifest (or repository), read
    /// piece by piece and refused past [`MAX_MANIFEST`] bytes, the whole answer within the
    /// cache timeout: what the registry sends is not trusted with memory or time. An expired
    /// token is renewed once (for every request after it too).
    async fn get_manifest(&self, tag: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        let what = format!("GET manifest {tag}");
        tokio::time::timeout(super::timeout(), self.read_manifest(tag, &what))
            .await
            .map_err(|_| RegistryError::Timeout {
                what,
                secs: super::timeout().as_secs(),
            })?
    }

    async fn read_manifest(&self, tag: &str, what: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        let url = format!(
            "{}://{}/v2/{}/manifests/{tag}",
            self.scheme, self.host, self.repository
        );
        let failed = |source| RegistryError::Http {
            what: what.to_owned(),
            source,
        };
        let mut token = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut renewed = false;
        let mut resp = loop {
            let req = self
                .http
                .get(&url)
                .header(http::header::ACCEPT, MANIFEST_MEDIA);
            let req = match (&token, &self.auth) {
                (Some(t), _) => req.bearer_auth(t),
                (None, RegistryAuth::Basic(user, password)) => req.basic_auth(user, Some(password)),
                _ => req,
            };
            let mut resp = req.send().await.map_err(failed)?;
            match resp.status().as_u16() {
                401 if token.is_some() && !renewed => {
                    renewed = true;
                    token = timed(
                        "renewing the token",
                        self.client
                            .auth(&self.repo(), &self.auth, RegistryOperation::Pull),
                    )
                    .await?;
                    *self.token.lock().unwrap_or_else(|p| p.into_inner()) = token.clone();
                }
                404 => return Ok(None),
                200..=299 => break resp,
                status => {
                    // The first bytes of the answer, as text a terminal shows as it is.
                    let body = resp.chunk().await.ok().flatten().unwrap_or_default();
                    let detail: String = String::from_utf8_lossy(&body[..body.len().min(300)])
                        .chars()
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect();
                    return Err(RegistryError::Status {
                        what: what.to_owned(),
                        status,
                        detail,
                    });
                }
            }
        };
        let too_long = || RegistryError::ManifestTooLong {
            tag: tag.to_owned(),
            max: MAX_MANIFEST,
        };
        if resp.content_length().is_some_and(|n| n > MAX_MANIFEST) {
            return Err(too_long());
        }
        let mut body = Vec::new();
        while let Some(piece) = resp.chunk().await.map_err(failed)? {
            if body.len() as u64 + piece.len() as u64 > MAX_MANIFEST {
                return Err(too_long());
            }
            body.extend_from_slice(&piece);
        }
        Ok(Some(body))
    }
}

/// The registry's answer to `fut`, or an error once `limit` has passed without one.
async fn answer<T>(
    what: &str,
    limit: std::time::Duration,
    fut: impl std::future::Future<Output = Result<T, OciDistributionError>>,
) -> Result<Result<T, OciDistributionError>, RegistryError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| RegistryError::Timeout {
            what: what.to_owned(),
            secs: limit.as_secs(),
        })
}

/// How many times a call the registry answered with 429 or a 5xx is made again, after pauses
/// doubling from 100 ms: the distribution registry answers 500 to a `HEAD` racing another
/// client's upload of the same blob, as a busy registry answers 429 or 503.
const RETRIES: u32 = 5;

/// Whether `e` is an answer worth asking again for.
fn transient(e: &OciDistributionError) -> bool {
    let busy = |code: u16| code == 429 || (500..600).contains(&code);
    match e {
        OciDistributionError::ServerError { code, .. } => busy(*code),
        OciDistributionError::RequestError(r) => r.status().is_some_and(|s| busy(s.as_u16())),
        _ => false,
    }
}

/// `call()`'s answer within `limit`, asked again while the registry answers as a busy one does
/// ([`RETRIES`]); the registry's error as a [`RegistryError`].
async fn retried<T, Fut>(
    what: impl Into<String>,
    limit: std::time::Duration,
    call: impl FnMut() -> Fut,
) -> Result<T, RegistryError>
where
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    let what = what.into();
    match super::retry::while_busy(limit, RETRIES, transient, call).await {
        Some(r) => r.map_err(|source| RegistryError::Request { what, source }),
        None => Err(RegistryError::Timeout {
            what,
            secs: limit.as_secs(),
        }),
    }
}

/// `fut`, failing after the cache timeout, with the registry's error as a [`RegistryError`].
async fn timed<T>(
    what: impl Into<String>,
    fut: impl std::future::Future<Output = Result<T, OciDistributionError>>,
) -> Result<T, RegistryError> {
    let what = what.into();
    answer(&what, super::timeout(), fut)
        .await?
        .map_err(|source| RegistryError::Request { what, source })
}

fn sha256_digest(hex: &str) -> String {
    format!("sha256:{hex}")
}

impl RegistryCache {
    /// A client for `url`. Nothing is contacted until the first request.
    pub fn new(url: &str) -> Result<RegistryCache, CacheError> {
        let bad = |e: RegistryError| CacheError::Backend {
            url: url.to_owned(),
            source: Box::new(e.into()),
        };
        let rest = url
            .strip_prefix("docker://")
            .ok_or_else(|| CacheError::UnsupportedUrl(url.to_owned()))?;
        let (host, repository) = rest
            .trim_end_matches('/')
            .split_once('/')
            .filter(|(h, r)| !h.is_empty() && !r.is_empty())
            .ok_or_else(|| bad(RegistryError::BadUrl))?;
        let auth = auth::credentials(host, &auth::auth_files()).map_err(bad)?;
        let rt =
            ClientRuntime::new("rbuild-registry").map_err(|e| bad(RegistryError::Runtime(e)))?;
        Ok(RegistryCache {
            url: url.to_owned(),
            host: host.to_owned(),
            repository: repository.to_owned(),
            client: OnceLock::new(),
            auth,
            authed: [OnceLock::new(), OnceLock::new()],
            rt,
        })
    }

    fn err(&self, e: RegistryError) -> CacheError {
        CacheError::Backend {
            url: self.url.clone(),
            source: Box::new(e.into()),
        }
    }

    fn new_client(&self, plain: bool) -> Result<Chosen, RegistryError> {
        let config = ClientConfig {
            protocol: if plain {
                ClientProtocol::HttpsExcept(vec![self.host.clone()])
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(super::timeout()),
            read_timeout: Some(super::timeout()),
            max_concurrent_upload: PARALLEL,
            max_concurrent_download: PARALLEL,
            // One upload session, one PUT with the bytes (the chunked way takes three requests).
            use_monolithic_push: true,
            ..Default::default()
        };
        let _guard = self.rt.handle().enter();
        let http = reqwest::Client::builder()
            .connect_timeout(super::timeout())
            .read_timeout(super::timeout())
            .build()
            .map_err(|source| RegistryError::Http {
                what: "starting the HTTP client".into(),
                source,
            })?;
        Ok(Chosen {
            client: Arc::new(Client::new(config)),
            http,
            scheme: if plain { "http" } else { "https" },
        })
    }

    /// Ask for `/v2/` (and a token for `op`) with `client`: the bearer token, if the registry
    /// gives tokens.
    fn contact(
        &self,
        client: &Arc<Client>,
        op: RegistryOperation,
    ) -> Result<Option<String>, RegistryError> {
        let (client, auth) = (client.clone(), self.auth.clone());
        let repo = Reference::with_tag(self.host.clone(), self.repository.clone(), "latest".into());
        self.rt
            .run(async move { timed("authenticating", client.auth(&repo, &auth, op)).await })
            .unwrap_or(Err(RegistryError::ClientStopped))
    }

    /// The client, chosen at the first contact: HTTPS, or plain HTTP for a loopback or listed
    /// host whose answer to HTTPS is not TLS at all (never after any other failure: a
    /// certificate that is not trusted, a timeout, refused credentials).
    fn client(&self) -> Result<Chosen, CacheError> {
        let chosen = self.client.get_or_init(|| {
            let https = self.new_client(false)?;
            match self.contact(&https.client, RegistryOperation::Pull) {
                Ok(_) => Ok(https),
                Err(e) if auth::plain_http(&self.host) && speaks_no_tls(&e) => {
                    let plain = self.new_client(true)?;
                    self.contact(&plain.client, RegistryOperation::Pull)
                        .map(|_| plain)
                        .map_err(|plain_err| RegistryError::PlainHttp {
                            https: Box::new(e),
                            source: Box::new(plain_err),
                        })
                }
                Err(e) => Err(e),
            }
            .map_err(Arc::new)
        });
        chosen
            .clone()
            .map_err(|e| self.err(RegistryError::Earlier(e)))
    }

    /// The parts a request for `op` needs, authenticated for it.
    fn ctx(&self, op: RegistryOperation) -> Result<Ctx, CacheError> {
        let token = self.authenticate(op)?;
        let chosen = self.client()?;
        Ok(Ctx {
            client: chosen.client,
            http: chosen.http,
            scheme: chosen.scheme,
            host: self.host.clone(),
            repository: self.repository.clone(),
            auth: self.auth.clone(),
            token,
        })
    }

    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, RegistryError>> + Send + 'static,
    ) -> Result<T, CacheError> {
        self.rt
            .run(fut)
            .unwrap_or(Err(RegistryError::ClientStopped))
            .map_err(|e| self.err(e))
    }

    /// Authenticate for `op` once per run (a token, or the credentials for basic auth): the
    /// bearer token, if the registry gives tokens.
    fn authenticate(&self, op: RegistryOperation) -> Result<SharedToken, CacheError> {
        let client = self.client()?.client;
        let slot = &self.authed[matches!(op, RegistryOperation::Push) as usize];
        let result = slot.get_or_init(|| {
            self.contact(&client, op)
                .map(|t| Arc::new(std::sync::Mutex::new(t)))
                .map_err(Arc::new)
        });
        result
            .clone()
            .map_err(|e| self.err(RegistryError::Earlier(e)))
    }
}

/// Whether `e` says the server answered a TLS handshake with something that is not TLS
/// (rustls: "received corrupt message of type InvalidContentType"): a plain HTTP server.
fn speaks_no_tls(e: &RegistryError) -> bool {
    let text = super::error::and_causes(e.to_string(), std::error::Error::source(e));
    text.contains("InvalidContentType") && !text.to_lowercase().contains("certificate")
}

/// Read blob `digest` (`size` bytes) into `out`, refusing more than `size` bytes and bytes of
/// another SHA-256.
async fn pull_into(
    ctx: &Ctx,
    digest: &str,
    size: u64,
    mut out: impl FnMut(&[u8]) -> Result<(), RegistryError>,
) -> Result<(), RegistryError> {
    let desc = OciDescriptor {
        media_type: BLOB_MEDIA.into(),
        digest: digest.to_owned(),
        size: size as i64,
        ..Default::default()
    };
    let what = format!("GET blob {digest}");
    let mut stream = timed(&what, ctx.client.pull_blob_stream(&ctx.repo(), &desc)).await?;
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    loop {
        let chunk = match tokio::time::timeout(super::timeout(), stream.next()).await {
            Ok(Some(c)) => c.map_err(|e| RegistryError::Request {
                what: what.clone(),
                source: OciDistributionError::IoError(e),
            })?,
            Ok(None) => break,
            Err(_) => {
                return Err(RegistryError::Timeout {
                    what,
                    secs: super::timeout().as_secs(),
                })
            }
        };
        got += chunk.len() as u64;
        if got > size {
            return Err(RegistryError::TooLong {
                digest: digest.to_owned(),
                size,
            });
        }
        hasher.update(&chunk);
        out(&chunk)?;
    }
    if got != size {
        return Err(RegistryError::Short {
            digest: digest.to_owned(),
            got,
            size,
        });
    }
    let actual = sha256_digest(&hex::encode(hasher.finalize()));
    if actual != digest {
        return Err(RegistryError::WrongBytes {
            digest: digest.to_owned(),
            got: actual,
        });
    }
    Ok(())
}

/// Upload `bytes` as blob `digest` unless the registry has it.
async fn push_if_missing(ctx: &Ctx, digest: &str, bytes: &[u8]) -> Result<(), RegistryError> {
    if blob_exists(ctx, digest).await? {
        return Ok(());
    }
    upload(ctx, digest, bytes.to_vec()).await
}

/// Whether the registry has blob `digest` (a `HEAD`).
async fn blob_exists(ctx: &Ctx, digest: &str) -> Result<bool, RegistryError> {
    let repo = ctx.repo();
    retried(format!("HEAD blob {digest}"), super::timeout(), || {
        ctx.client.blob_exists(&repo, digest)
    })
    .await
}

/// Upload `bytes` as blob `digest`: one session and one PUT, given the cache timeout and a
/// second more per MiB.
async fn upload(ctx: &Ctx, digest: &str, bytes: Vec<u8>) -> Result<(), RegistryError> {
    let what = format!("uploading blob {digest}");
    let repo = ctx.repo();
    let limit = super::timeout() + std::time::Duration::from_secs(bytes.len() as u64 >> 20);
    if bytes.is_empty() {
        // The client's one-PUT upload refuses an empty body; a session closed with no chunk
        // is the same upload.
        retried(what, limit, || {
            let none = tokio_stream::empty::<oci_client::errors::Result<bytes::Bytes>>();
            ctx.client.push_blob_stream(&repo, none, digest)
        })
        .await?;
    } else {
        retried(what, limit, || {
            ctx.client.push_blob(&repo, bytes.clone(), digest)
        })
        .await?;
    }
    Ok(())
}

/// Upload the file at `path` (`size` bytes) as blob `digest`, streamed in chunks: one session,
/// a PATCH per chunk, then the PUT that closes it (the registry checks the digest), given the
/// cache timeout and a second more per MiB.
async fn upload_file(
    ctx: &Ctx,
    digest: &str,
    path: PathBuf,
    size: u64,
) -> Result<(), RegistryError> {
    use tokio_stream::StreamExt;
    let what = format!("uploading blob {digest} from {}", path.display());
    let limit = super::timeout() + std::time::Duration::from_secs(size >> 20);
    let repo = ctx.repo();
    // Each attempt reads the file from the start.
    retried(what, limit, || async {
        let mut file = tokio::fs::File::open(&path).await?;
        // Whole chunks: tokio reads a file 2 MiB at a time unless told otherwise.
        file.set_max_buf_size(CHUNK);
        let chunks = tokio_util::io::ReaderStream::with_capacity(file, CHUNK)
            .map(|r| r.map_err(OciDistributionError::from));
        ctx.client.push_blob_stream(&repo, chunks, digest).await
    })
    .await?;
    Ok(())
}

/// An OCI image manifest (as JSON) of `artifact_type` over `layers`, with the empty config.
fn manifest(artifact_type: &str, layers: &[(String, u64, &str)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(digest, size, media)| {
            serde_json::json!({"mediaType": media, "digest": digest, "size": size})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA,
        "artifactType": artifact_type,
        "config": {
            "mediaType": EMPTY_MEDIA,
            "digest": sha256_digest(&hex::encode(Sha256::digest(EMPTY))),
            "size": EMPTY.len(),
        },
        "layers": layers,
    }))
    .expect("JSON values serialize")
}

async fn push_manifest(ctx: &Ctx, tag: &str, body: Vec<u8>) -> Result<(), RegistryError> {
    let reference = ctx.reference(tag);
    retried(format!("PUT manifest {tag}"), super::timeout(), || {
        ctx.client.push_manifest_raw(
            &reference,
            body.clone(),
            http::HeaderValue::from_static(MANIFEST_MEDIA),
        )
    })
    .await?;
    Ok(())
}

/// Run `f` on every item, [`PARALLEL`] at a time; the results in the items' order.
async fn each<T, R, F, Fut>(items: Vec<T>, parallel: usize, f: F) -> Result<Vec<R>, RegistryError>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<R, RegistryError>> + Send + 'static,
{
    let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, item) in items.into_iter().enumerate() {
        let permit = limit.clone().acquire_owned().await.expect("never closed");
        let fut = f(item);
        tasks.spawn(async move {
            let r = fut.await;
            drop(permit);
            (i, r)
        });
    }
    let mut out: Vec<Option<R>> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, r) = done.map_err(|_| RegistryError::ClientStopped)?;
        if out.len() <= i {
            out.resize_with(i + 1, || None);
        }
        out[i] = Some(r?);
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every task answered"))
        .collect())
}

impl BinaryCache for RegistryCache {
    fn url(&self) -> &str {
        &self.url
    }

    fn get_entry(&self, drv_hash: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let (ctx, tag) = (self.ctx(RegistryOperation::Pull)?, drv_hash.to_owned());
        self.run(async move {
            let Some(body) = ctx.get_manifest(&tag).await? else {
                return Ok(None);
            };
            let bad = |detail: &str| RegistryError::BadManifest {
                tag: tag.clone(),
                detail: detail.to_owned(),
            };
            let m: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| bad(&format!("not JSON: {e}")))?;
            if m["artifactType"] != ENTRY_ARTIFACT {
                return Err(bad(&format!(
                    "its artifactType is {}, not {ENTRY_ARTIFACT}",
                    m["artifactType"]
                )));
            }
            let layer = &m["layers"][0];
            let (Some(digest), Some(size)) = (layer["digest"].as_str(), layer["size"].as_u64())
            else {
                return Err(bad("its first layer has no digest and size"));
            };
            if layer["mediaType"] != ENTRY_ARTIFACT || !digest.starts_with("sha256:") {
                return Err(bad("its first layer is not a sha256-addressed entry"));
            }
            if size > MAX_ENTRY {
                return Err(bad(&format!("its entry is {size} bytes")));
            }
            // The manifest's word for the size is not trusted with memory up front.
            let mut bytes = Vec::with_capacity(size.min(1 << 20) as usize);
            pull_into(&ctx, digest, size, |c| {
                bytes.extend_from_slice(c);
                Ok(())
            })
            .await?;
            Ok(Some(bytes))
        })
    }

    fn get_entries(&self, drv_hashes: &[String]) -> Result<Vec<super::RawEntry>, CacheError> {
        // Each lookup is its own request: several at a time, one failing alone.
        std::thread::scope(|sc| {
            let chunks: Vec<_> = drv_hashes
                .chunks(drv_hashes.len().div_ceil(PARALLEL).max(1))
                .map(|chunk| {
                    sc.spawn(move || chunk.iter().map(|h| self.get_entry(h)).collect::<Vec<_>>())
                })
                .collect();
            let mut out = Vec::with_capacity(drv_hashes.len());
            for c in chunks {
                for r in c
                    .join()
                    .map_err(|_| self.err(RegistryError::ClientStopped))?
                {
                    match r {
                        Ok(e) => out.push(Ok(e)),
                        // The registry itself failing fails the lookup; a bad manifest is the
                        // entry's own fault.
                        Err(CacheError::Backend { url, source })
                            if matches!(
                                *source,
                                super::BackendError::Registry(
                                    RegistryError::BadManifest { .. }
                                        | RegistryError::ManifestTooLong { .. }
                                        | RegistryError::WrongBytes { .. }
                                        | RegistryError::TooLong { .. }
                                        | RegistryError::Short { .. }
                                )
                            ) =>
                        {
                            out.push(Err(CacheError::Backend { url, source }))
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(out)
        })
    }

    fn put_entry(&self, drv_hash: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let ctx = self.ctx(RegistryOperation::Push)?;
        let entry: CacheEntry = serde_json::from_slice(bytes).map_err(|e| {
            self.err(RegistryError::NotAnEntry(
                drv_hash.to_owned(),
                e.to_string(),
            ))
        })?;
        let mut seen = std::collections::HashSet::new();
        let blobs: Vec<(String, u64, &str)> = entry
            .body
            .blobs()
            .into_iter()
            .filter(|b| seen.insert(b.sha256.clone()))
            .map(|b| (sha256_digest(&b.sha256), b.size, BLOB_MEDIA))
            .collect();
        let entry_digest = sha256_digest(&hex::encode(Sha256::digest(bytes)));
        let (tag, bytes) = (drv_hash.to_owned(), bytes.to_vec());
        self.run(async move {
            let mut chunks = blobs.chunks(LAYERS_PER_MANIFEST);
            let first = chunks.next().unwrap_or(&[]);
            let mut layers = vec![(entry_digest.clone(), bytes.len() as u64, ENTRY_ARTIFACT)];
            layers.extend_from_slice(first);
            let body = manifest(ENTRY_ARTIFACT, &layers);
            // The same entry published before: nothing to send (a registry checks every blob a
            // manifest names when it is put).
            if let Ok(Some(there)) = ctx.get_manifest(&tag).await {
                if there == body {
                    return Ok(());
                }
            }
            push_if_missing(
                &ctx,
                &sha256_digest(&hex::encode(Sha256::digest(EMPTY))),
                EMPTY,
            )
            .await?;
            push_if_missing(&ctx, &entry_digest, &bytes).await?;
            for (n, rest) in chunks.enumerate() {
                push_manifest(
                    &ctx,
                    &format!("{tag}.{}", n + 1),
                    manifest(BLOBS_ARTIFACT, rest),
                )
                .await?;
            }
            push_manifest(&ctx, &tag, body).await
        })
    }

    fn missing_blobs(&self, blobs: &[BlobRef]) -> Result<Vec<BlobRef>, CacheError> {
        let ctx = self.ctx(RegistryOperation::Pull)?;
        let items = blobs.to_vec();
        self.run(async move {
            let found = each(items, PARALLEL, |b: BlobRef| {
                let ctx = ctx.clone();
                async move {
                    let digest = sha256_digest(&b.sha256);
                    let there = blob_exists(&ctx, &digest).await?;
                    Ok((!there).then_some(b))
                }
            })
            .await?;
            Ok(found.into_iter().flatten().collect())
        })
    }

    fn get_blob(&self, blob: &BlobRef, dest: &mut dyn Write) -> Result<(), CacheError> {
        let (ctx, digest, size) = (
            self.ctx(RegistryOperation::Pull)?,
            sha256_digest(&blob.sha256),
            blob.size,
        );
        // The download runs on the runtime; its pieces come here, where `dest` is.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<bytes::Bytes, RegistryError>>(16);
        self.rt.handle().spawn(async move {
            let sender = tx.clone();
            let r = pull_into(&ctx, &digest, size, |c| {
                let chunk = bytes::Bytes::copy_from_slice(c);
                tokio::task::block_in_place(|| sender.send(Ok(chunk)))
                    .map_err(|_| RegistryError::ClientStopped)
            })
            .await;
            if let Err(e) = r {
                let _ = tx.send(Err(e));
            }
        });
        for piece in rx {
            let chunk = piece.map_err(|e| self.err(e))?;
            dest.write_all(&chunk).map_err(|source| {
                self.err(RegistryError::Write {
                    digest: sha256_digest(&blob.sha256),
                    source,
                })
            })?;
        }
        Ok(())
    }

    fn put_blob(&self, blob: &BlobRef, src: &Path) -> Result<(), CacheError> {
        self.put_blobs(&[(blob.clone(), src.to_owned())])
    }

    fn put_blobs(&self, blobs: &[(BlobRef, PathBuf)]) -> Result<(), CacheError> {
        let ctx = self.ctx(RegistryOperation::Push)?;
        let (large, small): (Vec<_>, Vec<_>) = blobs
            .iter()
            .cloned()
            .partition(|(b, _)| b.size > STREAM_ABOVE);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MIB as usize));
        for (items, parallel) in [(small, PARALLEL), (large, PARALLEL_STREAMS)] {
            let (ctx, in_flight) = (ctx.clone(), in_flight.clone());
            self.run(async move {
                each(items, parallel, |(b, path): (BlobRef, PathBuf)| {
                    let (ctx, in_flight) = (ctx.clone(), in_flight.clone());
                    async move {
                        let digest = sha256_digest(&b.sha256);
                        if b.size > STREAM_ABOVE {
                            return upload_file(&ctx, &digest, path, b.size).await;
                        }
                        let mib = (b.size.div_ceil(1 << 20) as u32).clamp(1, IN_FLIGHT_MIB);
                        let _in_flight = in_flight.acquire_many(mib).await.expect("never closed");
                        let bytes = tokio::fs::read(&path)
                            .await
                            .map_err(|source| RegistryError::Read { path, source })?;
                        upload(&ctx, &digest, bytes).await
                    }
                })
                .await
                .map(|_| ())
            })?;
        }
        Ok(())
    }

    fn check(&self) -> Result<String, CacheError> {
        self.get_entry(&"0".repeat(64))?;
        Ok(format!(
            "an OCI registry: repository {} answers entry lookups",
            self.repository
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_host_and_a_repository() {
        let c = RegistryCache::new("docker://127.0.0.1:5000/team/rbuild-cache").unwrap();
        assert_eq!(
            (c.host.as_str(), c.repository.as_str()),
            ("127.0.0.1:5000", "team/rbuild-cache")
        );
        for bad in [
            "docker://127.0.0.1:5000",
            "docker:///repo",
            "docker://host/",
        ] {
            let err = RegistryCache::new(bad).err().unwrap().to_string();
            assert!(
                err.contains("expected docker://HOST[:PORT]/REPOSITORY"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn busy_answers_are_asked_again_and_refusals_are_not() {
        let server = |code| OciDistributionError::ServerError {
            code,
            url: "https://registry.test/v2/".into(),
            message: String::new(),
        };
        for code in [429, 500, 502, 503] {
            assert!(transient(&server(code)), "{code}");
        }
        for code in [400, 401, 403, 404] {
            assert!(!transient(&server(code)), "{code}");
        }
        assert!(!transient(&OciDistributionError::AuthenticationFailure(
            "no".into()
        )));
    }

    #[test]
    fn entry_manifests_keep_every_blob_they_name() {
        let m: serde_json::Value = serde_json::from_slice(&manifest(
            ENTRY_ARTIFACT,
            &[
                ("sha256:aa".into(), 3, ENTRY_ARTIFACT),
                ("sha256:bb".into(), 5, BLOB_MEDIA),
            ],
        ))
        .unwrap();
        assert_eq!(m["artifactType"], ENTRY_ARTIFACT);
        assert_eq!(m["config"]["mediaType"], EMPTY_MEDIA);
        assert_eq!(
            m["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(m["layers"][1]["digest"], "sha256:bb");
        assert_eq!(m["layers"].as_array().unwrap().len(), 2);
    }
}
