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
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
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
                    while i + from.len() <= carry.len() {
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
