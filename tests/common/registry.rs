//! A real OCI registry for the tests: Debian's `docker-registry` (the CNCF distribution
//! registry) on a loopback port, with htpasswd auth and TLS when asked; a test CA; and a proxy
//! that rewrites bytes on their way back from a server.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::skip::{have_tool, skip};
use super::stderr;

/// A CA (`ca.pem`) and a certificate for 127.0.0.1 it signed (`cert.pem`, `key.pem`) in `dir`.
pub fn test_ca(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=rbuild test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// A running registry; stopped when dropped.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    child: Child,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the registry and htpasswd can run here (loudly skipped otherwise; a failure under CI).
pub fn available(test: &str) -> bool {
    have_tool(test, "docker-registry", "docker-registry")
        && (Path::new("/usr/bin/htpasswd").exists() || {
            skip(
                test,
                "`htpasswd` is not installed",
                "apt install apache2-utils (.ci/run does)",
            );
            false
        })
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start a registry storing in `dir`, with TLS from `dir`'s `cert.pem`/`key.pem` ([`test_ca`])
/// and the user `user` of password `password` when `secure`; plain HTTP and anonymous otherwise.
pub fn start(dir: &Path, secure: Option<(&str, &str)>) -> Registry {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut config = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
        dir.join("data").display()
    );
    if let Some((user, password)) = secure {
        let o = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .unwrap();
        assert!(o.status.success(), "htpasswd: {}", stderr(&o));
        std::fs::write(dir.join("htpasswd"), &o.stdout).unwrap();
        config += &format!(
            "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: rbuild-test\n    path: {}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
            dir.join("htpasswd").display()
        );
    }
    launch(dir, addr, config)
}

/// Start a registry in plain HTTP storing in `dir` whose clients need a bearer token from
/// `realm` (a [`token_server`]'s `/token`), issued by `issuer` for `service` and signed by the
/// key of the certificate in `bundle`.
pub fn start_with_tokens(
    dir: &Path,
    realm: &str,
    issuer: &str,
    service: &str,
    bundle: &Path,
) -> Registry {
    std::fs::create_dir_all(dir).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\nauth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
        dir.join("data").display(),
        bundle.display()
    );
    launch(dir, addr, config)
}

/// Run `docker-registry` with `config` (written in `dir`), listening on `addr`.
fn launch(dir: &Path, addr: String, config: String) -> Registry {
    let conf = dir.join("config.yml");
    std::fs::write(&conf, config).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry");
    let registry = Registry { addr, child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&registry.addr).is_err() {
        assert!(Instant::now() < deadline, "the registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    registry
}

/// `auths` for `addr` with `user`:`password`, as podman writes it, in `dir/auth.json`.
pub fn auth_file(dir: &Path, addr: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join("auth.json");
    std::fs::write(
        &path,
        format!(r#"{{"auths":{{"{addr}":{{"auth":"{token}"}}}}}}"#),
    )
    .unwrap();
    path
}

/// A proxy on a loopback port to `upstream` that replaces `from` by `to` (the same length) in
/// everything the upstream sends back. Returns its `127.0.0.1:PORT`.
pub fn tampering_proxy(upstream: String, from: &'static [u8], to: &'static [u8]) -> String {
    proxy(upstream, from, to, None)
}

/// A proxy on a loopback port to `upstream` that passes everything through and keeps what the
/// clients sent. Returns its `127.0.0.1:PORT` and those bytes.
pub fn recording_proxy(upstream: String) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    (proxy(upstream, b"", b"", Some(sent.clone())), sent)
}

fn proxy(
    upstream: String,
    from: &'static [u8],
    to: &'static [u8],
    record: Option<std::sync::Arc<std::sync::Mutex<Vec<u8>>>>,
) -> String {
    assert_eq!(from.len(), to.len());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let record = record.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                loop {
                    let n = match c_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(r) = &record {
                        r.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut carry: Vec<u8> = Vec::new();
                let mut buf = [0u8; 65536];
                loop {
                    let n = match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    carry.extend_from_slice(&buf[..n]);
                    let mut i = 0;
                    while !from.is_empty() && i + from.len() <= carry.len() {
                        if &carry[i..i + from.len()] == from {
                            carry[i..i + from.len()].copy_from_slice(to);
                            i += from.len();
                        } else {
                            i += 1;
                        }
                    }
                    // Keep only what starts a match that the next read may finish (never the
                    // end of a whole answer, which the client is waiting for).
                    let keep = (1..from.len().min(carry.len() + 1))
                        .rev()
                        .find(|k| carry.ends_with(&from[..*k]))
                        .unwrap_or(0);
                    let out: Vec<u8> = carry.drain(..carry.len() - keep).collect();
                    if c_write.write_all(&out).is_err() {
                        return;
                    }
                }
                let _ = c_write.write_all(&carry);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// The head of one HTTP request read from `conn`: its request line and headers (lower-cased
/// names), or None if the client sent no HTTP (a TLS handshake, which is answered with a plain
/// 400 as a plain HTTP server does) or went away.
fn read_head(conn: &mut TcpStream) -> Option<(String, Vec<(String, String)>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        if head.is_empty() && byte[0] == 0x16 {
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
            return None;
        }
        head.push(byte[0]);
        if head.len() > 64 << 10 {
            return None;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request = lines.next()?.to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    Some((request, headers))
}

/// A server on a loopback port answering each request (its request line and headers) with
/// `answer`, one request per connection. Returns its `127.0.0.1:PORT`.
fn serve(
    answer: impl Fn(&str, &[(String, String)], &mut TcpStream) + Send + Sync + 'static,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let answer = answer.clone();
            std::thread::spawn(move || {
                if let Some((request, headers)) = read_head(&mut conn) {
                    answer(&request, &headers, &mut conn);
                }
            });
        }
    });
    addr
}

/// A registry that lies about size: `/v2/` answers, and every manifest is endless (64 MiB of
/// spaces, in chunks, with no length given) or, with `declared`, declares that many bytes.
pub fn endless_manifests(declared: Option<u64>) -> String {
    serve(move |request, _, conn| {
        if request.starts_with("GET /v2/ ") {
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
            return;
        }
        let head = match declared {
            Some(n) => format!("Content-Length: {n}"),
            None => "Transfer-Encoding: chunked".into(),
        };
        if conn
            .write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n{head}\r\nConnection: close\r\n\r\n").as_bytes())
            .is_err()
        {
            return;
        }
        let piece = vec![b' '; 64 << 10];
        for _ in 0..1024 {
            let written = if declared.is_some() {
                conn.write_all(&piece)
            } else {
                conn.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .and_then(|()| conn.write_all(&piece))
                    .and_then(|()| conn.write_all(b"\r\n"))
            };
            if written.is_err() {
                return;
            }
        }
    })
}

/// A token server for the distribution registry's token auth: `GET /token?scope=…` with basic
/// credentials `user`:`password` gets a JWT (RS256, signed with `dir/token.key`, its certificate
/// `dir/token.pem` in the `x5c` header) granting the scopes asked for, issued by `issuer` for
/// `service`. Anything else gets 401. Returns its `127.0.0.1:PORT` and the number of tokens
/// it has given.
pub fn token_server(
    dir: &Path,
    user: &str,
    password: &str,
    issuer: &'static str,
    service: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use base64::Engine as _;
    let o = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(dir.join("token.key"))
        .arg("-out")
        .arg(dir.join("token.pem"))
        .args(["-days", "2", "-subj", "/CN=rbuild test tokens"])
        .output()
        .expect("openssl");
    assert!(o.status.success(), "openssl: {}", stderr(&o));
    let o = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(dir.join("token.pem"))
        .output()
        .unwrap();
    assert!(o.status.success(), "openssl: {}", stderr(&o));
    let b64 = base64::engine::general_purpose::STANDARD;
    let url64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = url64.encode(
        serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [b64.encode(&o.stdout)]})
            .to_string(),
    );
    let expected = format!("Basic {}", b64.encode(format!("{user}:{password}")));
    let key = dir.join("token.key");
    let given = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = given.clone();
    let addr = serve(move |request, headers, conn| {
        let authorized = headers
            .iter()
            .any(|(k, v)| k == "authorization" && *v == expected);
        let Some(query) = request
            .strip_prefix("GET /token?")
            .and_then(|r| r.split(' ').next())
            .filter(|_| authorized)
        else {
            let _ = conn.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        };
        let access: Vec<serde_json::Value> = query
            .split('&')
            .filter_map(|kv| kv.strip_prefix("scope="))
            .map(percent_decoded)
            .filter_map(|scope| {
                let mut parts = scope.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(serde_json::json!({
                    "type": kind, "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }))
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let claims = url64.encode(
            serde_json::json!({
                "iss": issuer, "sub": "alice", "aud": service, "exp": now + 600,
                "nbf": now - 10, "iat": now, "jti": format!("token-{n}"), "access": access,
            })
            .to_string(),
        );
        let signing_input = format!("{header}.{claims}");
        let mut openssl = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        openssl
            .stdin
            .take()
            .unwrap()
            .write_all(signing_input.as_bytes())
            .unwrap();
        let signed = openssl.wait_with_output().unwrap();
        assert!(signed.status.success());
        let token = format!("{signing_input}.{}", url64.encode(&signed.stdout));
        let body = serde_json::json!({"token": token, "expires_in": 600}).to_string();
        let _ = conn.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    });
    (addr, given)
}

/// `%XX` escapes (and `+`) of a query value, decoded.
fn percent_decoded(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
