//! Shared helpers of the end-to-end tests: a throwaway Debian-style archive built at test time
//! (real `.deb`s made with the ar/tar crates, a Packages index, an InRelease signed by a key
//! generated for the test), and running the `rbuild` binary as root or as an unprivileged user.

#![allow(dead_code)]

pub mod busybox;
pub mod readme;
pub mod real;
pub mod reapi_server;
pub mod registry;
/// The one way a test that cannot run here skips (and fails under `CI=true`).
#[path = "../skip.rs"]
pub mod skip;

pub use skip::skip;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rbuild_recipes::debian::testkit;

pub const SUITE: &str = "testsuite";
pub const DATE: &str = "Sat, 09 Aug 2025 09:16:30 UTC";
pub const SDE: i64 = 1754730990;

/// One file in a test package: path, content (None = directory), mode, uid, gid, symlink target.
#[derive(Clone)]
pub enum Entry {
    Dir(&'static str, u32),
    File(&'static str, &'static [u8], u32, u32, u32),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
}

pub struct Pkg {
    pub name: &'static str,
    pub version: &'static str,
    pub priority: &'static str,
    pub essential: bool,
    pub depends: &'static str,
    pub entries: Vec<Entry>,
}

/// Build a `.deb` (ar: debian-binary, control.tar.gz, data.tar.gz).
pub fn build_deb(p: &Pkg) -> Vec<u8> {
    let control = format!(
        "Package: {}\nVersion: {}\nArchitecture: amd64\nMaintainer: t <t@example.invalid>\nPriority: {}\n{}{}Description: test package\n",
        p.name,
        p.version,
        p.priority,
        if p.essential { "Essential: yes\n" } else { "" },
        if p.depends.is_empty() { String::new() } else { format!("Depends: {}\n", p.depends) },
    );
    let mut ctl = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("./control").unwrap();
    h.set_size(control.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(SDE as u64 - 1000);
    h.set_cksum();
    ctl.append(&h, control.as_bytes()).unwrap();
    let ctl = gz(&ctl.into_inner().unwrap());

    let mut data = tar::Builder::new(Vec::new());
    for e in &p.entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(SDE as u64 - 1000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir(path, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_path(format!("./{path}/")).unwrap();
                h.set_mode(*mode);
                h.set_size(0);
                h.set_cksum();
                data.append(&h, &[][..]).unwrap();
            }
            Entry::File(path, content, mode, uid, gid) => {
                h.set_path(format!("./{path}")).unwrap();
                h.set_mode(*mode);
                h.set_uid(*uid as u64);
                h.set_gid(*gid as u64);
                h.set_size(content.len() as u64);
                h.set_cksum();
                data.append(&h, *content).unwrap();
            }
            Entry::Symlink(path, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_path(format!("./{path}")).unwrap();
                h.set_link_name(target).unwrap();
                h.set_mode(0o777);
                h.set_size(0);
                h.set_cksum();
                data.append(&h, &[][..]).unwrap();
            }
            Entry::Hardlink(path, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_path(format!("./{path}")).unwrap();
                h.set_link_name(format!("./{target}")).unwrap();
                h.set_mode(0o755);
                h.set_size(0);
                h.set_cksum();
                data.append(&h, &[][..]).unwrap();
            }
        }
    }
    let data = gz(&data.into_inner().unwrap());
    let mut ar = ar::Builder::new(Vec::new());
    for (name, bytes) in [
        ("debian-binary", &b"2.0\n"[..]),
        ("control.tar.gz", &ctl[..]),
        ("data.tar.gz", &data[..]),
    ] {
        let h = ar::Header::new(name.as_bytes().to_vec(), bytes.len() as u64);
        ar.append(&h, bytes).unwrap();
    }
    ar.into_inner().unwrap()
}

pub fn gz(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The standard test packages: an essential base with a setuid file owned by gid 43, an
/// absolute symlink and a hardlink; an important package that depends on a library; an
/// optional package nothing needs.
pub fn standard_packages() -> Vec<Pkg> {
    vec![
        Pkg {
            name: "base-files",
            version: "11.1",
            priority: "required",
            essential: true,
            depends: "",
            entries: vec![
                Entry::Dir("etc", 0o755),
                Entry::File("etc/os-release", b"PRETTY_NAME=\"Test\"\n", 0o644, 0, 0),
                Entry::Dir("bin", 0o755),
                Entry::File("bin/systemctl", b"#!/bin/sh\necho systemctl\n", 0o755, 0, 0),
                Entry::Hardlink("bin/systemctl-again", "bin/systemctl"),
                Entry::Dir("usr", 0o755),
                Entry::Dir("usr/sbin", 0o755),
                Entry::Symlink("usr/sbin/telinit", "/bin/systemctl"),
                Entry::Dir("usr/bin", 0o755),
                Entry::File("usr/bin/chage", b"\x7fELF-not-really", 0o2755, 0, 42),
                Entry::File("usr/bin/su", b"\x7fELF-su", 0o4755, 0, 0),
                Entry::Dir("var", 0o755),
                Entry::Dir("var/mail", 0o2775),
                Entry::Dir("tmp", 0o1777),
            ],
        },
        Pkg {
            name: "hello",
            version: "2.10-2",
            priority: "important",
            essential: false,
            depends: "libhello (>= 1.0) | libhello-alt",
            entries: vec![
                Entry::Dir("usr", 0o755),
                Entry::Dir("usr/bin", 0o755),
                Entry::File("usr/bin/hello", b"#!/bin/sh\necho hello\n", 0o755, 0, 0),
            ],
        },
        Pkg {
            name: "libhello",
            version: "1.0-1",
            priority: "optional",
            essential: false,
            depends: "",
            entries: vec![
                Entry::Dir("usr", 0o755),
                Entry::Dir("usr/lib", 0o755),
                Entry::File("usr/lib/libhello.so.1", b"lib", 0o644, 0, 0),
                Entry::Dir("etc", 0o755),
                Entry::Symlink("etc/localtime", "/usr/share/zoneinfo/Etc/UTC"),
            ],
        },
        Pkg {
            name: "unused",
            version: "1",
            priority: "optional",
            essential: false,
            depends: "",
            entries: vec![
                Entry::Dir("opt", 0o755),
                Entry::File("opt/unused", b"x", 0o644, 0, 0),
            ],
        },
    ]
}

/// A throwaway archive on disk, with a recipe that uses it.
pub struct Archive {
    pub dir: PathBuf,
    pub mirror: PathBuf,
    pub recipe: PathBuf,
    pub key: testkit::TestKey,
}

impl Archive {
    pub fn mirror_url(&self) -> String {
        format!("file://{}", self.mirror.display())
    }

    pub fn lock_path(&self) -> PathBuf {
        self.recipe.with_extension("lock")
    }

    pub fn deb_path(&self, name: &str, version: &str) -> PathBuf {
        self.mirror
            .join(format!("pool/main/{name}_{version}_amd64.deb"))
    }

    /// Rewrite the index and the signed InRelease for the debs currently in the pool.
    pub fn publish(&self, pkgs: &[Pkg], signer: &testkit::TestKey) {
        let mut packages = String::new();
        for p in pkgs {
            let rel = format!("pool/main/{}_{}_amd64.deb", p.name, p.version);
            let bytes = fs::read(self.mirror.join(&rel)).unwrap();
            packages.push_str(&testkit::packages_stanza(
                p.name,
                p.version,
                "amd64",
                p.priority,
                p.essential,
                p.depends,
                &rel,
                &bytes,
            ));
            packages.push('\n');
        }
        let comp = self.mirror.join(format!("dists/{SUITE}/main/binary-amd64"));
        fs::create_dir_all(&comp).unwrap();
        let gzipped = gz(packages.as_bytes());
        fs::write(comp.join("Packages.gz"), &gzipped).unwrap();
        let release = testkit::release_text(
            SUITE,
            SUITE,
            DATE,
            &[
                ("main/binary-amd64/Packages.gz", &gzipped),
                ("main/binary-amd64/Packages", packages.as_bytes()),
            ],
        );
        fs::write(
            self.mirror.join(format!("dists/{SUITE}/InRelease")),
            testkit::clearsign(signer, &release),
        )
        .unwrap();
    }
}

/// Make an archive with the standard packages under `dir` and a recipe (variant `extract`).
pub fn make_archive(dir: &Path) -> Archive {
    let mirror = dir.join("mirror");
    fs::create_dir_all(mirror.join("pool/main")).unwrap();
    let key = testkit::generate_key("rbuild test archive <test@example.invalid>");
    let pkgs = standard_packages();
    for p in &pkgs {
        fs::write(
            mirror.join(format!("pool/main/{}_{}_amd64.deb", p.name, p.version)),
            build_deb(p),
        )
        .unwrap();
    }
    let recipes = dir.join("recipes");
    fs::create_dir_all(recipes.join("keys")).unwrap();
    fs::write(recipes.join("keys/test.asc"), key.public_armored()).unwrap();
    let recipe = recipes.join("testos.toml");
    fs::write(
        &recipe,
        format!(
            "name = \"testos\"\nsuite = \"{SUITE}\"\narchitecture = \"amd64\"\ncomponents = [\"main\"]\nvariant = \"extract\"\nmerged-usr = true\nkeyring = \"keys/test.asc\"\nfingerprints = [\"{}\"]\n\n[image]\ncmd = [\"/bin/sh\"]\n",
            key.fingerprint()
        ),
    )
    .unwrap();
    let a = Archive {
        dir: dir.to_owned(),
        mirror,
        recipe,
        key,
    };
    a.publish(&pkgs, &a.key);
    a
}

/// The binary under test, copied (once per test process) where an unprivileged user can execute it.
pub fn rbuild_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let src = PathBuf::from(env!("CARGO_BIN_EXE_rbuild"));
        // Copies left by test processes that have ended (a few hundred MB each) go first.
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let ended = name
                    .strip_prefix("rbuild-test-bin-")
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if ended {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("rbuild-test-bin-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let dst = dir.join("rbuild");
        fs::copy(&src, &dst).unwrap();
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).unwrap();
        dst
    })
    .clone()
}

/// The unprivileged user the tests run rbuild as (`RBUILD_TEST_USER`, created by `.ci/run`),
/// when this process is root and the user exists.
pub fn test_user() -> Option<String> {
    let user = std::env::var("RBUILD_TEST_USER")
        .ok()
        .filter(|u| !u.is_empty())?;
    let is_root = nix_is_root();
    let exists = Command::new("id")
        .arg("-u")
        .arg(&user)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    (is_root && exists).then_some(user)
}

/// [`test_user`], or `None` after skipping `test` the shared way (a failure under CI), saying why
/// there is none.
pub fn require_test_user(test: &str) -> Option<String> {
    let user = test_user();
    if user.is_none() {
        let why = match std::env::var("RBUILD_TEST_USER") {
            Ok(u) if !u.is_empty() && !nix_is_root() => {
                format!("RBUILD_TEST_USER={u} is set, but the tests do not run as root")
            }
            Ok(u) if !u.is_empty() => format!("RBUILD_TEST_USER={u} names no user here"),
            _ => "RBUILD_TEST_USER is not set".to_owned(),
        };
        skip(
            test,
            &format!("no unprivileged test user ({why})"),
            "run the tests as root with RBUILD_TEST_USER=<a user with a subordinate id range> \
             (.ci/run creates rbuild-test)",
        );
    }
    user
}

pub fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Run rbuild with `args`, as `user` when given (through runuser).
pub fn rbuild_as(user: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let bin = rbuild_bin();
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg("env");
            c.args(["-u", "RBUILD_STORE", "-u", "RBUILD_MIRROR"]);
            for (k, v) in env {
                c.arg(format!("{k}={v}"));
            }
            c.arg(&bin);
            c
        }
        None => {
            let mut c = Command::new(&bin);
            c.env_remove("RBUILD_STORE").env_remove("RBUILD_MIRROR");
            c.envs(env.iter().copied());
            c
        }
    };
    cmd.args(args);
    cmd.output().unwrap()
}

pub fn rbuild(args: &[&str]) -> Output {
    rbuild_as(None, args, &[])
}

/// `rbuild cache push TARGET --store STORE --to URL --secret-key KEY`, with `env`.
pub fn cache_push(
    target: &str,
    store: &Path,
    to: &str,
    secret_key: &str,
    env: &[(&str, &str)],
) -> Output {
    rbuild_as(
        None,
        &[
            "cache",
            "push",
            target,
            "--store",
            store.to_str().unwrap(),
            "--to",
            to,
            "--secret-key",
            secret_key,
        ],
        env,
    )
}

/// Assert success and return stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "rbuild failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(ok(o).trim()).unwrap()
}

/// A directory the unprivileged user can write (world-traversable parents, owned by the user).
pub fn user_dir(parent: &Path, name: &str, user: Option<&str>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = parent.join(name);
    fs::create_dir_all(&d).unwrap();
    if let Some(u) = user {
        let mut p = d.clone();
        while let Some(parent) = p.parent() {
            if let Ok(md) = fs::metadata(parent) {
                let mode = md.permissions().mode();
                if mode & 0o001 == 0 {
                    let _ = fs::set_permissions(parent, fs::Permissions::from_mode(mode | 0o011));
                }
            }
            p = parent.to_owned();
        }
        assert!(Command::new("chown")
            .arg("-R")
            .arg(u)
            .arg(&d)
            .status()
            .unwrap()
            .success());
    }
    d
}

/// A minimal WebDAV-like HTTP/1.1 server on loopback for binary-cache tests: GET, HEAD and PUT
/// of files below `root` (bodies with Content-Length or chunked), keep-alive. Its thread ends
/// with the test process.
pub fn serve_http(root: &Path) -> String {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let root = root.to_owned();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let root = root.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let (method, path) = (
                        parts.next().unwrap_or("").to_owned(),
                        parts.next().unwrap_or("/").to_owned(),
                    );
                    let (mut len, mut chunked) = (0usize, false);
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let lower = h.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                            chunked = true;
                        }
                    }
                    let mut body = Vec::new();
                    if chunked {
                        loop {
                            let mut size = String::new();
                            r.read_line(&mut size).unwrap();
                            let n = usize::from_str_radix(size.trim(), 16).unwrap();
                            let mut chunk = vec![0; n + 2];
                            r.read_exact(&mut chunk).unwrap();
                            if n == 0 {
                                break;
                            }
                            body.extend_from_slice(&chunk[..n]);
                        }
                    } else {
                        body.resize(len, 0);
                        r.read_exact(&mut body).unwrap();
                    }
                    let file = root.join(path.trim_start_matches('/'));
                    let (status, payload) = match method.as_str() {
                        "PUT" => {
                            fs::create_dir_all(file.parent().unwrap()).unwrap();
                            fs::write(&file, &body).unwrap();
                            ("201 Created", Vec::new())
                        }
                        "GET" | "HEAD" => match fs::read(&file) {
                            Ok(b) => ("200 OK", b),
                            Err(_) => ("404 Not Found", Vec::new()),
                        },
                        _ => ("405 Method Not Allowed", Vec::new()),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n",
                        payload.len()
                    );
                    if w.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    if method != "HEAD" && w.write_all(&payload).is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// A BuildGrid server (the Remote Execution API's CAS, ByteStream and ActionCache, in memory) on
/// a free loopback port, stopped when dropped. `bgd` comes from `RBUILD_BGD` or `PATH`
/// (`tests/buildgrid/setup.sh` installs it; `.ci/run` does so and sets `RBUILD_BGD`).
pub struct BuildGrid {
    child: std::process::Child,
    /// `grpc://127.0.0.1:PORT`; instance `other` (`URL/other`) has its own ActionCache.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for BuildGrid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python with the reference tools of `tests/pytools/setup.sh` (`RBUILD_PYTHON`); `None`,
/// after a loud skip (a failure under `CI=true`), when it is not set.
pub fn pytools(what: &str) -> Option<String> {
    match std::env::var("RBUILD_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            skip(
                what,
                "RBUILD_PYTHON (a python with securesystemslib) is not set",
                "RBUILD_PYTHON=\"$(tests/pytools/setup.sh)\" (.ci/run sets it)",
            );
            None
        }
    }
}

/// The SBOM validators of `tests/pytools/setup.sh` (`python` is its `RBUILD_PYTHON`). Each
/// says whether the document passes, and what the tool printed.
pub struct SbomValidators {
    python: PathBuf,
}

impl SbomValidators {
    pub fn new(python: &str) -> SbomValidators {
        SbomValidators {
            python: PathBuf::from(python),
        }
    }

    fn run(cmd: &mut std::process::Command) -> (bool, String) {
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn tool(&self, name: &str) -> std::process::Command {
        std::process::Command::new(self.python.parent().unwrap().join(name))
    }

    /// `pyspdxtools -i` (which can exit 0 while printing ERROR).
    pub fn spdx(&self, file: &Path) -> (bool, String) {
        let (ok, said) = Self::run(self.tool("pyspdxtools").arg("-i").arg(file));
        (ok && !said.contains("ERROR"), said)
    }

    /// The NTIA minimum elements (`ntia-checker`), on an SPDX document.
    pub fn ntia(&self, file: &Path) -> (bool, String) {
        let (ok, said) = Self::run(self.tool("ntia-checker").arg("-v").arg(file));
        (ok && said.contains("Conformant: True"), said)
    }

    /// An image's two SBOMs pass pyspdxtools and CycloneDX's strict validator.
    pub fn assert_both_valid(&self, spdx: &Path, cyclonedx: &Path) {
        let (valid, said) = self.spdx(spdx);
        assert!(valid, "pyspdxtools: {said}");
        let (valid, said) = self.cyclonedx(cyclonedx);
        assert!(valid, "CycloneDX strict validation: {said}");
    }

    /// cyclonedx-python-lib's strict JSON validator, CycloneDX 1.6.
    pub fn cyclonedx(&self, file: &Path) -> (bool, String) {
        const CHECK: &str = r#"
import sys
from cyclonedx.validation.json import JsonStrictValidator
from cyclonedx.schema import SchemaVersion
errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(open(sys.argv[1]).read())
print(errors or "valid")
sys.exit(1 if errors else 0)
"#;
        Self::run(
            std::process::Command::new(&self.python)
                .args(["-c", CHECK])
                .arg(file),
        )
    }
}

pub fn buildgrid() -> BuildGrid {
    buildgrid_with_tls(None)
}

/// [`buildgrid`] serving TLS with this key and certificate (PEM): its URL is `grpcs://`.
pub fn buildgrid_with_tls(tls: Option<(&Path, &Path)>) -> BuildGrid {
    let bgd = std::env::var("RBUILD_BGD")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "bgd".into());
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/buildgrid/buildgrid.yml"),
    )
    .unwrap()
    .replace("127.0.0.1:50051", &format!("127.0.0.1:{port}"));
    let config = match tls {
        None => config,
        Some((key, cert)) => config.replace(
            "insecure-mode: true",
            &format!(
                "insecure-mode: false\n    credentials:\n      tls-server-key: {}\n      tls-server-cert: {}",
                key.display(),
                cert.display()
            ),
        ),
    };
    let config_path = dir.path().join("buildgrid.yml");
    fs::write(&config_path, config).unwrap();
    let log = dir.path().join("bgd.log");
    let mut child = Command::new(&bgd)
        .args(["server", "start"])
        .arg(&config_path)
        .current_dir(dir.path())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start BuildGrid ({bgd}: {e}): run tests/buildgrid/setup.sh and set \
                 RBUILD_BGD to the path it prints"
            )
        });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "BuildGrid exited ({status}): {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "BuildGrid did not listen on 127.0.0.1:{port} within 90 s: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    BuildGrid {
        child,
        url: format!(
            "{}://127.0.0.1:{port}",
            if tls.is_some() { "grpcs" } else { "grpc" }
        ),
        _dir: dir,
    }
}

/// The digest of the one image an OCI layout's `index.json` lists.
pub fn manifest_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{}: one image", layout.display());
    manifests[0]["digest"].as_str().unwrap().to_owned()
}

/// A blob of an OCI layout, checked against its digest.
pub fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let bytes = fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        hex,
        "blob {digest} of {}",
        layout.display()
    );
    bytes
}

/// The image layout `layout` carries `spdx` and `cyclonedx` (the `^spdx` and `^cyclonedx`
/// outputs' bytes) as OCI 1.1 referrers of its image: `index.json` lists the image alone, and
/// `referrers/` — a layout on the same blobs — lists the image as `index.json` does, then one
/// artifact manifest per document, whose `subject` is the image and whose one layer is the
/// document, byte for byte.
pub fn assert_sbom_referrers(layout: &Path, spdx: &[u8], cyclonedx: &[u8]) {
    let read =
        |p: &Path| -> serde_json::Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
    let index = read(&layout.join("index.json"));
    let image = manifest_digest(layout);
    let image_size = layout_blob(layout, &image).len() as u64;
    let referrers = layout.join("referrers");
    let listed = read(&referrers.join("index.json"));
    let listed = listed["manifests"].as_array().unwrap();
    assert_eq!(
        listed[0], index["manifests"][0],
        "the referrers layout's image"
    );
    let mut found = Vec::new();
    for d in &listed[1..] {
        let digest = d["digest"].as_str().unwrap();
        // Read through the referrers layout: its blobs are the image layout's.
        let m: serde_json::Value =
            serde_json::from_slice(&layout_blob(&referrers, digest)).unwrap();
        assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(m["artifactType"], d["artifactType"]);
        assert_eq!(
            (&m["subject"]["digest"], &m["subject"]["size"]),
            (&serde_json::json!(image), &serde_json::json!(image_size)),
            "{digest}: the subject is the image"
        );
        assert_eq!(
            m["config"]["mediaType"],
            "application/vnd.oci.empty.v1+json"
        );
        let layers = m["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        let doc = layout_blob(layout, layers[0]["digest"].as_str().unwrap());
        found.push((m["artifactType"].as_str().unwrap().to_owned(), doc));
    }
    assert_eq!(
        found,
        vec![
            ("application/spdx+json".to_owned(), spdx.to_vec()),
            (
                "application/vnd.cyclonedx+json".to_owned(),
                cyclonedx.to_vec()
            ),
        ],
        "the referrers are the SBOMs"
    );
}
