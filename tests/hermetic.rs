//! End-to-end tests of `rbuild` against a throwaway archive built at test time and served over
//! `file://` or loopback HTTP. They cover locking, verification failures, the sandbox, the store's
//! atomicity and reuse, and the determinism of the packed outputs — as root, and as an
//! unprivileged user with a subordinate id range when `RBUILD_TEST_USER` names one.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use common::*;

/// What editing a layered recipe's top layer rebuilds: that layer's tree and its diff, and the
/// image with what describes it — its manifest, the SPDX and CycloneDX documents it carries as
/// referrers. Nothing below the edited layer.
const TOP_EDIT: u64 = 6;

/// The lock text with the pin of `old` (sha256 and size) changed to that of `new`.
fn repin(lock_text: &str, old: &[u8], new: &[u8]) -> String {
    let text = lock_text
        .replace(&sha256_hex(old), &sha256_hex(new))
        .replace(
            &format!("size = {}", old.len()),
            &format!("size = {}", new.len()),
        );
    assert_ne!(text, lock_text, "the lock pinned the old file");
    text
}

/// Realise `a`'s recipe into `store` from its mirror, expecting failure; returns stderr.
fn realise_fails(a: &Archive, store: &Path) -> String {
    let o = rbuild(&[
        "realise",
        a.recipe.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--mirror",
        &a.mirror_url(),
    ]);
    assert!(
        !o.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    stderr(&o)
}

fn lock(a: &Archive) {
    let o = rbuild(&[
        "lock",
        a.recipe.to_str().unwrap(),
        "--mirror",
        &a.mirror_url(),
    ]);
    ok(&o);
}

fn realise_json(
    user: Option<&str>,
    a: &Archive,
    target: &str,
    store: &Path,
    extra: &[&str],
) -> serde_json::Value {
    json(&realise_with(user, a, target, store, extra, &[]))
}

/// [`realise_json`]'s command, with `env`; its whole output.
fn realise_with(
    user: Option<&str>,
    a: &Archive,
    target: &str,
    store: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let recipe = format!("{}{target}", a.recipe.display());
    let mut args = vec![
        "realise",
        &recipe,
        "--store",
        store.to_str().unwrap(),
        "--json",
        "--mirror",
    ];
    let url = a.mirror_url();
    args.push(&url);
    args.extend_from_slice(extra);
    rbuild_as(user, &args, env)
}

/// One tar entry: (type, mode, uid, gid, link target, content).
type TarEntry = (char, u32, u64, u64, String, Vec<u8>);

/// Read a tar into path → entry.
fn read_tar(bytes: &[u8]) -> BTreeMap<String, TarEntry> {
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(bytes);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            _ => 'f',
        };
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut content = vec![];
        e.read_to_end(&mut content).unwrap();
        out.insert(
            path.trim_end_matches('/').to_owned(),
            (
                kind,
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                link,
                content,
            ),
        );
    }
    out
}

/// The image manifest digest of a `realise --json` result.
fn output_digest(r: &serde_json::Value) -> String {
    manifest_digest(Path::new(r["output"].as_str().unwrap()))
}

/// `(built, substituted)` of a `realise --json` result.
fn counts(r: &serde_json::Value) -> (u64, u64) {
    (
        r["built"].as_u64().unwrap(),
        r["substituted"].as_u64().unwrap(),
    )
}

fn realise_and_check(user: Option<&str>) {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let lock_text = fs::read_to_string(a.lock_path()).unwrap();
    assert!(
        lock_text.contains("name = \"hello\"") && lock_text.contains("name = \"libhello\""),
        "{lock_text}"
    );
    assert!(
        !lock_text.contains("\"unused\""),
        "optional package nothing needs is not locked"
    );
    assert!(
        !lock_text.contains("file://"),
        "the lock holds mirror-relative paths only"
    );
    if let Some(u) = user {
        // The recipe directory must be readable by the user.
        std::process::Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(t.path())
            .status()
            .unwrap();
        let _ = u;
    }
    let store = user_dir(t.path(), "store", user);
    let r = realise_json(user, &a, "", &store, &[]);
    // 1 InRelease + 1 index + 3 debs fetched, 1 verify, 3 unpacks, configure, the layer (from
    // the tree: the image needs no `^rootfs` tar), the image's manifest, the stanzas and two
    // SBOMs it carries as referrers, the image.
    assert_eq!(r["built"], 16, "{r}");
    assert_eq!(r["reused"], 0);
    let layout = Path::new(r["output"].as_str().unwrap()).to_owned();
    assert!(layout.starts_with(fs::canonicalize(&store).unwrap()));

    // The OCI layout: index → manifest → config, digests match the blobs.
    assert_eq!(
        fs::read_to_string(layout.join("oci-layout"))
            .unwrap()
            .trim(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    let mdigest = manifest_digest(&layout);
    let manifest_bytes = layout_blob(&layout, &mdigest);
    assert_eq!(format!("sha256:{}", sha256_hex(&manifest_bytes)), mdigest);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&layout_blob(
        &layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    assert_eq!(config["history"].as_array().unwrap().len(), 1);
    let layer_gz = layout_blob(&layout, manifest["layers"][0]["digest"].as_str().unwrap());
    let mut tar_bytes = vec![];
    flate2::read::MultiGzDecoder::new(&layer_gz[..])
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0].as_str().unwrap(),
        format!("sha256:{}", sha256_hex(&tar_bytes))
    );

    // The root filesystem: merged /usr, owners and special modes from the packages, symlinks verbatim.
    let entries = read_tar(&tar_bytes);
    assert_eq!(entries["bin"].0, 'l');
    assert_eq!(entries["bin"].4, "usr/bin");
    assert_eq!(
        entries["usr/bin/systemctl"].0, 'f',
        "bin/ content lands in usr/bin"
    );
    assert_eq!(
        entries["usr/sbin/telinit"].4, "/bin/systemctl",
        "absolute symlink kept as the package has it"
    );
    assert_eq!(entries["etc/localtime"].4, "/usr/share/zoneinfo/Etc/UTC");
    let chage = &entries["usr/bin/chage"];
    assert_eq!((chage.1 & 0o7777, chage.2, chage.3), (0o2755, 0, 42));
    assert_eq!(entries["usr/bin/su"].1 & 0o7777, 0o4755);
    assert_eq!(entries["tmp"].1 & 0o7777, 0o1777);
    assert_eq!(entries["var/mail"].1 & 0o7777, 0o2775);
    assert!(!entries.contains_key("opt/unused"));
    let staging: Vec<&String> = entries
        .keys()
        .filter(|k| k.starts_with("var/cache/rbuild"))
        .collect();
    assert!(
        staging.is_empty(),
        "the builder's staging is left: {staging:?}"
    );
    let hl = &entries["usr/bin/systemctl-again"];
    assert_eq!((hl.0, hl.4.as_str()), ('h', "usr/bin/systemctl"));
    let mut h = tar::Archive::new(&tar_bytes[..]);
    for e in h.entries().unwrap() {
        let e = e.unwrap();
        assert!(
            e.header().mtime().unwrap() as i64 <= SDE,
            "mtimes clamped to SOURCE_DATE_EPOCH"
        );
    }

    // ^rootfs is the same tar (made only now: the layer streams it from the tree), and the
    // store holds no setuid file on the host.
    let rootfs = realise_json(user, &a, "^rootfs", &store, &[]);
    assert_eq!(rootfs["built"], 1, "{rootfs}");
    assert_eq!(
        fs::read(rootfs["output"].as_str().unwrap()).unwrap(),
        tar_bytes
    );
    let tree = realise_json(user, &a, "^tree", &store, &[]);
    let su = Path::new(tree["output"].as_str().unwrap()).join("usr/bin/su");
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(&su).unwrap();
    assert_eq!(md.mode() & 0o7000, 0, "no setuid/setgid bits in the store");

    // Run again: nothing is built, even offline with a dead mirror.
    let again = json(&rbuild_as(
        user,
        &[
            "realise",
            a.recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--json",
            "--offline",
        ],
        &[],
    ));
    assert_eq!(
        (again["built"].as_u64(), again["output"].as_str()),
        (Some(0), r["output"].as_str())
    );
    assert!(again["reused"].as_u64().unwrap() >= 1);

    // Another store (and, if run as root here, another user) gets the same bits.
    let store2 = user_dir(t.path(), "store2", None);
    let r2 = realise_json(None, &a, "", &store2, &[]);
    assert_eq!(output_digest(&r2), mdigest);
}

#[test]
fn realise_extract_recipe_as_root() {
    realise_and_check(None);
}

#[test]
fn realise_extract_recipe_unprivileged() {
    let Some(user) = require_test_user("realise_extract_recipe_unprivileged") else {
        return;
    };
    realise_and_check(Some(&user));
}

#[test]
fn graph_has_five_stages_unique_hashes_network_only_on_fetch() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let g = json(&rbuild(&[
        "graph",
        a.recipe.to_str().unwrap(),
        "--format",
        "json",
    ]));
    let nodes = g["nodes"].as_array().unwrap();
    let stages: HashSet<&str> = nodes.iter().map(|n| n["stage"].as_str().unwrap()).collect();
    assert_eq!(
        stages,
        ["fetch", "verify", "unpack", "configure", "pack"]
            .into_iter()
            .collect()
    );
    let hashes: HashSet<&str> = nodes.iter().map(|n| n["hash"].as_str().unwrap()).collect();
    assert_eq!(hashes.len(), nodes.len());
    for n in nodes {
        assert_eq!(
            n["network"].as_bool().unwrap(),
            n["stage"] == "fetch",
            "{n}"
        );
        for i in n["inputs"].as_array().unwrap() {
            assert!(hashes.contains(i.as_str().unwrap()));
        }
    }
    let dot = ok(&rbuild(&[
        "graph",
        a.recipe.to_str().unwrap(),
        "--format",
        "dot",
    ]));
    assert!(dot.starts_with("digraph") && dot.contains("cluster_configure"));
    // The graph does not depend on the mirror: it comes from the recipe and lock alone.
    let g2 = json(&rbuild_as(
        None,
        &["graph", a.recipe.to_str().unwrap()],
        &[("RBUILD_MIRROR", "http://127.0.0.1:9")],
    ));
    assert_eq!(g, g2);
}

#[test]
fn hand_edited_lock_pointing_at_another_deb_fails_verification() {
    // `extract` unpacks every package (the unpack stage checks it); `debootstrap` unpacks only
    // the Essential closure, and configure checks the others before dpkg sees them.
    for variant in ["extract", "debootstrap"] {
        hand_edited_lock_fails(variant);
    }
}

fn hand_edited_lock_fails(variant: &str) {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    let text = fs::read_to_string(&a.recipe).unwrap();
    fs::write(
        &a.recipe,
        text.replace("variant = \"extract\"", &format!("variant = \"{variant}\"")),
    )
    .unwrap();
    lock(&a);
    // Swap hello's .deb for another one, and make the lock pin *its* hash: the fetch succeeds,
    // the signed index disagrees.
    let evil = build_deb(&Pkg {
        name: "hello",
        version: "2.10-2",
        priority: "important",
        essential: false,
        depends: "",
        entries: vec![Entry::File("usr/bin/evil", b"x", 0o4755, 0, 0)],
    });
    let path = a.deb_path("hello", "2.10-2");
    let good = fs::read(&path).unwrap();
    fs::write(&path, &evil).unwrap();
    let lock_text = fs::read_to_string(a.lock_path()).unwrap();
    fs::write(a.lock_path(), repin(&lock_text, &good, &evil)).unwrap();
    let store = t.path().join("store");
    let err = realise_fails(&a, &store);
    assert!(
        err.contains("verify")
            && err.contains("sha256")
            && err.contains(&sha256_hex(&good))
            && err.contains(&sha256_hex(&evil)),
        "{err}"
    );
    assert!(
        err.contains("hello_2.10-2_amd64.deb"),
        "names the file: {err}"
    );
}

#[test]
fn unpinned_signer_and_tampered_index_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let store = t.path().join("store");
    // Re-sign the same Release with another key, and pin the new InRelease in the lock.
    let other = rbuild_recipes::debian::testkit::generate_key("intruder <x@example.invalid>");
    let ir_path = a.mirror.join(format!("dists/{SUITE}/InRelease"));
    let good_ir = fs::read(&ir_path).unwrap();
    a.publish(&standard_packages(), &other);
    let bad_ir = fs::read(&ir_path).unwrap();
    let o = rbuild(&[
        "lock",
        a.recipe.to_str().unwrap(),
        "--mirror",
        &a.mirror_url(),
        "--output",
        t.path().join("x.lock").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("InRelease") && stderr(&o).contains(&a.key.fingerprint()),
        "{}",
        stderr(&o)
    );
    let lock_text = fs::read_to_string(a.lock_path()).unwrap();
    fs::write(a.lock_path(), repin(&lock_text, &good_ir, &bad_ir)).unwrap();
    let err = realise_fails(&a, &store);
    assert!(
        err.contains("verify") && err.contains("InRelease") && err.contains("signature"),
        "{err}"
    );

    // Correctly signed Release, but the Packages index on the mirror was changed and the lock
    // follows it: the signed Release hash disagrees.
    fs::write(&ir_path, &good_ir).unwrap();
    fs::write(a.lock_path(), &lock_text).unwrap();
    let idx = a
        .mirror
        .join(format!("dists/{SUITE}/main/binary-amd64/Packages.gz"));
    let good_idx = fs::read(&idx).unwrap();
    let bad_idx = gz(b"Package: hello\nVersion: 9\nArchitecture: amd64\nFilename: pool/x.deb\nSize: 1\nSHA256: 00\n");
    fs::write(&idx, &bad_idx).unwrap();
    fs::write(a.lock_path(), repin(&lock_text, &good_idx, &bad_idx)).unwrap();
    let err = realise_fails(&a, &store);
    assert!(
        err.contains("Packages.gz")
            && err.contains(&sha256_hex(&good_idx))
            && err.contains(&sha256_hex(&bad_idx)),
        "{err}"
    );
}

#[test]
fn offline_without_the_files_fails_clearly_and_registers_nothing() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let store = t.path().join("store");
    let o = rbuild(&[
        "realise",
        a.recipe.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--offline",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("rbuild is offline")
            && (err.contains("dists/testsuite/") || err.contains("pool/main/")),
        "{err}"
    );
    let dead = rbuild(&[
        "realise",
        a.recipe.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--mirror",
        "http://127.0.0.1:9/debian",
    ]);
    assert!(!dead.status.success());
    let err = stderr(&dead);
    // The mirror, the file, the cause in words and the ways out.
    assert!(
        err.contains("from the mirror http://127.0.0.1:9/debian failed: connection refused"),
        "{err}"
    );
    assert!(
        err.contains("dists/testsuite/") || err.contains("pool/main/"),
        "{err}"
    );
    for way in ["--mirror URL", "--substituter", "--offline"] {
        assert!(err.contains(way), "{way}: {err}");
    }
    // Locking goes through the same fetcher, and says the same.
    let lock_dead = rbuild(&[
        "lock",
        a.recipe.to_str().unwrap(),
        "--mirror",
        "http://127.0.0.1:9/debian",
        "--output",
        t.path().join("dead.lock").to_str().unwrap(),
    ]);
    assert!(!lock_dead.status.success());
    let err = stderr(&lock_dead);
    assert!(
        err.contains(
            "dists/testsuite/InRelease: downloading it from the mirror http://127.0.0.1:9/debian \
             failed: connection refused"
        ) && err.contains("--offline"),
        "{err}"
    );
    let db = rusqlite_count(&store);
    assert_eq!(db, 0, "nothing registered");
}

/// A store on a full filesystem (a 30 MB tmpfs, filled up after a first realise): the failure
/// says "no space left on device on the filesystem holding STORE" and suggests `rbuild gc`,
/// instead of naming whichever build happened to fail. Mounting needs root (CI is root).
#[test]
fn a_full_disk_is_named_as_such() {
    if !nix_is_root() {
        skip(
            "a_full_disk_is_named_as_such",
            "the tests do not run as root (mounting a small tmpfs as the store needs it)",
            "run them as root (.ci/run does)",
        );
        return;
    }
    struct Mounted(std::path::PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let small = t.path().join("small");
    std::fs::create_dir(&small).unwrap();
    ok(&std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=30m", "tmpfs"])
        .arg(&small)
        .output()
        .unwrap());
    let _mounted = Mounted(small.clone());
    let store = small.join("store");
    // The store works, and holds the verified index.
    realise_json(None, &a, "^index", &store, &[]);
    // Fill what is left of the filesystem.
    {
        use std::io::Write;
        let mut ballast = std::fs::File::create(small.join("ballast")).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while ballast.write_all(&chunk).is_ok() {}
        while ballast.write_all(&[0u8; 512]).is_ok() {}
        let _ = ballast.flush();
    }
    let full = |when: &str| {
        let err = realise_fails(&a, &store);
        eprintln!("{when}: {err}");
        assert!(
            err.contains(&format!(
                "no space left on device on the filesystem holding {}",
                store.display()
            )) && err.contains("rbuild gc"),
            "{when}: {err}"
        );
    };
    // No byte left: the store's database cannot even be opened.
    full("full");
    // Room to open the store, not to build: the builds fail.
    let ballast = small.join("ballast");
    let len = std::fs::metadata(&ballast).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ballast)
        .unwrap()
        .set_len(len - (256 << 10))
        .unwrap();
    full("256 KiB free");
}

fn rusqlite_count(store: &Path) -> usize {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ls {}/o | grep -v '\\.meta$' | wc -l",
            store.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn sandbox_is_isolated_and_maps_a_full_id_range() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let unprivileged =
        require_test_user("sandbox_is_isolated_and_maps_a_full_id_range: the unprivileged part");
    for user in [None, unprivileged] {
        if user.is_none() && !nix_is_root() {
            skip(
                "sandbox_is_isolated_and_maps_a_full_id_range: the root part",
                "the tests do not run as root",
                "run them as root (.ci/run does)",
            );
            continue;
        }
        let target = format!("127.0.0.1:{port}");
        let o = rbuild_as(
            user.as_deref(),
            &["doctor", "--json", "--connect", &target],
            &[("SECRET_HOST_VAR", "leak")],
        );
        let report = json(&o);
        // The checklist a person reads: one line per capability, each ok on this kernel.
        let checklist = stderr(&o);
        for what in [
            "user namespaces and id maps",
            "sandbox",
            "locked mounts",
            "Landlock",
            "seccomp and no_new_privs",
            "capabilities",
            "overlayfs in a user namespace",
        ] {
            assert!(
                checklist
                    .lines()
                    .any(|l| l.starts_with("ok") && l[4..].trim_start().starts_with(what)),
                "doctor: {what} is not ok:\n{checklist}"
            );
        }
        assert_eq!(report["uid"], 0, "builders run as uid 0 of the namespace");
        let uid_map = report["uid_map"].as_str().unwrap();
        let mapped: u64 = uid_map
            .lines()
            .map(|l| l.split_whitespace().nth(2).unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(mapped, 65536, "full id range mapped: {uid_map}");
        assert_eq!(
            report["interfaces"],
            serde_json::json!(["lo"]),
            "only loopback"
        );
        assert!(
            report["connect"][&target]
                .as_str()
                .unwrap()
                .starts_with("failed"),
            "the host's loopback is unreachable: {report}"
        );
        assert_eq!(report["hostname"], "rbuild");
        let root: Vec<&str> = report["root"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            root,
            ["build", "dev", "proc", "tmp"],
            "no host files visible"
        );
        let dev: HashSet<&str> = report["dev"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for d in ["null", "zero", "full", "random", "urandom"] {
            assert!(dev.contains(d), "{d} in /dev");
        }
        assert!(!dev.contains("tty"), "no terminal in /dev");
        // The builder itself runs with no_new_privs, the seccomp filter, and only CHOWN,
        // DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID and SETFCAP (bits 0 1 3 4 6 7 31).
        let status = &report["status"];
        assert_eq!(status["NoNewPrivs"], "1", "{status}");
        assert_eq!(status["Seccomp"], "2", "{status}");
        assert_eq!(status["CapEff"], "00000000800000db", "{status}");
        assert_eq!(status["CapBnd"], "00000000800000db", "{status}");
        let env = report["env"].as_object().unwrap();
        assert!(!env.contains_key("SECRET_HOST_VAR"));
        assert_eq!(env["LC_ALL"], "C.UTF-8");
        assert_eq!(env["TZ"], "UTC");
        assert!(env.contains_key("SOURCE_DATE_EPOCH"));
    }
    drop(listener);
}

#[test]
fn concurrent_realises_share_a_store_without_building_twice() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let store = t.path().join("store");
    let bin = rbuild_bin();
    let spawn = || {
        std::process::Command::new(&bin)
            .args([
                "realise",
                a.recipe.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
                "--json",
                "--mirror",
                &a.mirror_url(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (p1, p2) = (spawn(), spawn());
    let (o1, o2) = (
        p1.wait_with_output().unwrap(),
        p2.wait_with_output().unwrap(),
    );
    let (j1, j2) = (json(&o1), json(&o2));
    assert_eq!(j1["output"], j2["output"]);
    assert_eq!(
        j1["built"].as_u64().unwrap() + j2["built"].as_u64().unwrap(),
        16,
        "every derivation built exactly once: {j1} {j2}"
    );
}

#[test]
fn killed_build_leaves_no_registered_output_and_is_cleaned_up() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let store = t.path().join("store");
    let bin = rbuild_bin();
    let mut child = std::process::Command::new(&bin)
        .args([
            "realise",
            a.recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--mirror",
            &a.mirror_url(),
            "-j",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as it has scratch space in use.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let busy = fs::read_dir(store.join("tmp"))
            .map(|rd| rd.count() > 0)
            .unwrap_or(false);
        if busy || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Whatever is registered is complete: rerunning verifies all of it and finishes the rest.
    let r = realise_json(None, &a, "", &store, &[]);
    assert!(r["built"].as_u64().unwrap() >= 1);
    // No scratch directory or lock is left; at most the empty stub of a lock the killed process
    // was taking (hidden, removed once it is a minute old).
    let leftover: Vec<String> = fs::read_dir(store.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !(n.starts_with('.') && n.ends_with(".lock.new")))
        .collect();
    assert!(leftover.is_empty(), "scratch space cleaned: {leftover:?}");
    let again = realise_json(None, &a, "", &store, &[]);
    assert_eq!(again["built"], 0);
}

/// `recipes/app/` beside the throwaway archive's recipe, with the files its layers copy:
/// `files/motd` and an executable-looking `files/tool`.
/// `app/app.toml`: one layer on the test base that copies `files/motd` to `/etc/motd`.
fn motd_layer(a: &Archive) -> std::path::PathBuf {
    let recipe = app_with_files(a).join("app.toml");
    fs::write(
        &recipe,
        "base = \"../testos.toml\"\n\n[[layers]]\ncopy = [{ from = \"files/motd\", to = \"/etc/motd\", mode = \"0644\" }]\n",
    )
    .unwrap();
    recipe
}

fn app_with_files(a: &Archive) -> std::path::PathBuf {
    let app_dir = a.recipe.parent().unwrap().join("app");
    fs::create_dir_all(app_dir.join("files")).unwrap();
    fs::write(app_dir.join("files/motd"), "hello from a layer\n").unwrap();
    fs::write(app_dir.join("files/tool"), "#!/bin/sh\necho tool\n").unwrap();
    app_dir
}

/// The entries of layer `i` (0 is the base's) of the image layout `layout`.
fn layer_entries(layout: &Path, i: usize) -> BTreeMap<String, TarEntry> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&layout_blob(
        layout,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let mut tar = vec![];
    flate2::read::MultiGzDecoder::new(
        &layout_blob(layout, manifest["layers"][i]["digest"].as_str().unwrap())[..],
    )
    .read_to_end(&mut tar)
    .unwrap();
    read_tar(&tar)
}

/// A layer's steps run on an overlay of the base tree and the lower layers' change sets, and the
/// layer is exactly what they changed: a deleted file is a `.wh.` entry, a directory removed
/// and made again hides what it held (below directories made inside it too), a directory
/// replaced by a file is that file alone, a symlink replaced by a directory is that directory, a
/// touched or rewritten-but-equal file is absent, and a mode change is present. The steps see
/// the image's real owners and special modes (which store files lack), the next layer sees the
/// lower layer's changes and can delete what it added, `^tree` is the whole result, and an
/// unprivileged user gets the same image.
#[test]
fn a_layer_is_what_its_steps_changed_on_an_overlay_of_the_layers_below() {
    let t = tempfile::tempdir().unwrap();
    let Some(a) = common::busybox::busybox_archive(t.path()) else {
        return;
    };
    let dir = a.recipe.parent().unwrap().join("overlay");
    fs::create_dir_all(&dir).unwrap();
    let recipe = dir.join("app.toml");
    let one = [
        "stat -c '%u:%g %a' /usr/bin/chage /usr/bin/su /var/mail /tmp > /seen",
        "rm /etc/os-release",
        "rm -r /usr/sbin && mkdir /usr/sbin && echo new > /usr/sbin/new",
        "rm -r /var/mail && echo file > /var/mail",
        "touch /usr/bin/su",
        "cat /bin/systemctl > /tmp/copy && cat /tmp/copy > /bin/systemctl && rm /tmp/copy",
        "chmod 2750 /usr/bin/chage",
        "rm -r /usr/share/doc && mkdir -p /usr/share/doc/busybox && echo again > /usr/share/doc/busybox/NEW",
        "rm /usr/lib/linkdir && mkdir /usr/lib/linkdir && echo d > /usr/lib/linkdir/f",
    ];
    let two = [
        "test ! -e /etc/os-release && test ! -e /usr/sbin/telinit && test -f /var/mail \
        && cat /usr/sbin/new > /seen2 && stat -c '%a %g' /usr/bin/chage >> /seen2",
        "rm /usr/sbin/new",
        "test -d /usr/lib/linkdir && test -f /usr/lib/linkdir/f && test ! -e /usr/share/doc/busybox/README",
    ];
    let list = |cmds: &[&str]| {
        cmds.iter()
            .map(|c| toml::Value::String(c.to_string()).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    fs::write(
        &recipe,
        format!(
            "base = \"../testos.toml\"\n\n[[layers]]\nrun = [{}]\n\n[[layers]]\nrun = [{}]\n",
            list(&one),
            list(&two)
        ),
    )
    .unwrap();
    let store = t.path().join("store");
    let realise = |user: Option<&str>, store: &Path, target: &str| {
        let target = format!("{}{target}", recipe.display());
        json(&rbuild_as(
            user,
            &[
                "realise",
                &target,
                "--store",
                store.to_str().unwrap(),
                "--json",
                "--mirror",
                &a.mirror_url(),
            ],
            &[],
        ))
    };
    let image = realise(None, &store, "");
    let layout = Path::new(image["output"].as_str().unwrap());

    let first = layer_entries(layout, 1);
    assert_eq!(
        first.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "etc",
            "etc/.wh.os-release",
            "seen",
            "usr",
            "usr/bin",
            "usr/bin/chage",
            "usr/lib",
            "usr/lib/linkdir",
            "usr/lib/linkdir/f",
            "usr/sbin",
            "usr/sbin/.wh.telinit",
            "usr/sbin/new",
            "usr/share",
            "usr/share/doc",
            "usr/share/doc/busybox",
            "usr/share/doc/busybox/.wh.README",
            "usr/share/doc/busybox/NEW",
            "var",
            "var/mail",
        ],
        "{first:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&first["seen"].5),
        "0:42 2755\n0:0 4755\n0:0 2775\n0:0 1777\n",
        "the step sees the image's owners and special modes"
    );
    let chage = &first["usr/bin/chage"];
    assert_eq!((chage.1 & 0o7777, chage.2, chage.3), (0o2750, 0, 42));
    assert_eq!(
        (first["var/mail"].0, &first["var/mail"].5[..]),
        ('f', &b"file\n"[..])
    );
    assert_eq!(first["usr/sbin/new"].5, b"new\n");

    let second = layer_entries(layout, 2);
    // A file of the layer below, deleted: the base never had it, so the overlay left no
    // whiteout of its own.
    assert_eq!(
        second.keys().map(String::as_str).collect::<Vec<_>>(),
        ["seen2", "usr", "usr/sbin", "usr/sbin/.wh.new"],
        "{second:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&second["seen2"].5),
        "new\n2750 42\n"
    );

    // The whole root filesystem, for `^tree` and `^rootfs` only.
    let tree = realise(None, &store, "^tree");
    let tree = Path::new(tree["output"].as_str().unwrap());
    for gone in ["etc/os-release", "usr/sbin/telinit"] {
        assert!(fs::symlink_metadata(tree.join(gone)).is_err(), "{gone}");
    }
    assert_eq!(fs::read(tree.join("var/mail")).unwrap(), b"file\n");
    assert!(tree.join("usr/sbin").is_dir() && !tree.join("usr/sbin/new").exists());
    // A directory made inside a re-created one hides what the base had there; a symlink to a
    // directory, replaced by a directory, is one.
    assert!(!tree.join("usr/share/doc/busybox/README").exists());
    assert_eq!(
        fs::read(tree.join("usr/share/doc/busybox/NEW")).unwrap(),
        b"again\n"
    );
    assert!(fs::symlink_metadata(tree.join("usr/lib/linkdir"))
        .unwrap()
        .is_dir());
    assert_eq!(fs::read(tree.join("usr/lib/linkdir/f")).unwrap(), b"d\n");
    assert!(tree.join("seen").is_file() && tree.join("seen2").is_file());
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(format!("{}.meta", tree.display())).unwrap()).unwrap();
    assert_eq!(meta["entries"]["usr/bin/chage"]["mode"], 0o2750);
    assert_eq!(meta["entries"]["usr/bin/chage"]["gid"], 42);
    assert_eq!(meta["entries"]["usr/bin/su"]["mode"], 0o4755);

    if let Some(user) = require_test_user(
        "a_layer_is_what_its_steps_changed_on_an_overlay_of_the_layers_below: the unprivileged part",
    ) {
        let ustore = user_dir(t.path(), "user-store", Some(&user));
        let theirs = realise(Some(&user), &ustore, "");
        assert_eq!(
            output_digest(&theirs),
            output_digest(&image),
            "the same image for every user"
        );
    }
}

/// A layered recipe on the throwaway base: the base's layer is reused byte for byte, each
/// `[[layers]]` entry adds one layer, config and history follow the recipe, and editing the last
/// layer rebuilds only that layer's tree, its diff and the image.
#[test]
fn layered_recipe_adds_one_cached_layer_per_entry() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let store = t.path().join("store");
    let base = realise_json(None, &a, "", &store, &[]);
    let base_layout = Path::new(base["output"].as_str().unwrap()).to_owned();
    let app_dir = app_with_files(&a);
    // A directory copied whole: files keep whether they are executable.
    fs::create_dir_all(app_dir.join("files/conf.d/sub")).unwrap();
    fs::write(app_dir.join("files/conf.d/a.conf"), "a = 1\n").unwrap();
    fs::write(app_dir.join("files/conf.d/sub/run.sh"), "#!/bin/sh\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(
            app_dir.join("files/conf.d/sub/run.sh"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    let write_recipe = |second_to: &str| {
        fs::write(
            app_dir.join("app.toml"),
            format!(
                "base = \"../testos.toml\"\n\n[[layers]]\ncopy = [{{ from = \"files/motd\", to = \"/etc/motd\", mode = \"0644\" }}, {{ from = \"files/conf.d\", to = \"/etc/app/\" }}]\n\n[[layers]]\ncopy = [{{ from = \"files/tool\", to = \"{second_to}\", mode = \"4755\" }}]\n\n[config]\nentrypoint = [\"/bin/sh\", \"-c\"]\ncmd = [\"echo hello\"]\nenv = [\"LANG=C.UTF-8\"]\nuser = \"app\"\nworkdir = \"/home/app\"\nlabels = {{ \"org.opencontainers.image.title\" = \"app\" }}\n"
            ),
        )
        .unwrap();
    };
    write_recipe("/usr/local/bin/tool");
    let recipe = app_dir.join("app.toml");
    let realise = || {
        json(&rbuild(&[
            "realise",
            recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--json",
            "--mirror",
            &a.mirror_url(),
        ]))
    };
    let r = realise();
    assert!(app_dir.join("app.lock").exists(), "locked first");
    assert_eq!(
        r["built"], 8,
        "two layer trees, two diffs, the image, its manifest and two SBOMs: {r}"
    );
    let layout = Path::new(r["output"].as_str().unwrap()).to_owned();

    let manifest = |l: &Path| -> serde_json::Value {
        serde_json::from_slice(&layout_blob(l, &manifest_digest(l))).unwrap()
    };
    let (bm, m) = (manifest(&base_layout), manifest(&layout));
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert_eq!(layers[0], bm["layers"][0], "the base layer, byte for byte");
    let config: serde_json::Value = serde_json::from_slice(&layout_blob(
        &layout,
        m["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let c = &config["config"];
    assert_eq!(c["User"], "app");
    assert_eq!(c["WorkingDir"], "/home/app");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(c["Cmd"], serde_json::json!(["echo hello"]));
    assert!(c["Env"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("LANG=C.UTF-8")));
    assert_eq!(c["Labels"]["org.opencontainers.image.title"], "app");
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    assert!(
        history[1]["created_by"]
            .as_str()
            .unwrap()
            .contains("files/motd"),
        "{history:?}"
    );
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 3);

    // The second layer holds exactly the new file (and its parent directories), owned by root,
    // setuid as the recipe asked, with the clamped mtime.
    let mut top = vec![];
    flate2::read::MultiGzDecoder::new(
        &layout_blob(&layout, layers[2]["digest"].as_str().unwrap())[..],
    )
    .read_to_end(&mut top)
    .unwrap();
    let entries = read_tar(&top);
    assert_eq!(
        entries.keys().cloned().collect::<Vec<_>>(),
        ["usr", "usr/local", "usr/local/bin", "usr/local/bin/tool"]
    );
    let tool = &entries["usr/local/bin/tool"];
    assert_eq!((tool.1 & 0o7777, tool.2, tool.3), (0o4755, 0, 0));
    assert_eq!(tool.5, b"#!/bin/sh\necho tool\n");
    let mut first = vec![];
    flate2::read::MultiGzDecoder::new(
        &layout_blob(&layout, layers[1]["digest"].as_str().unwrap())[..],
    )
    .read_to_end(&mut first)
    .unwrap();
    let first = read_tar(&first);
    assert!(first.contains_key("etc/motd"));
    let mode = |p: &str| first[p].1 & 0o7777;
    assert_eq!(
        (
            mode("etc/app"),
            mode("etc/app/a.conf"),
            mode("etc/app/sub/run.sh")
        ),
        (0o755, 0o644, 0o755)
    );
    assert_eq!(first["etc/app/a.conf"].5, b"a = 1\n");

    // Nothing edited: nothing built. Last layer edited: its tree, its diff, and the image with
    // what describes it (its manifest, two SBOMs) only.
    assert_eq!(realise()["built"], 0);
    write_recipe("/usr/local/bin/tool2");
    let edited = realise();
    assert_eq!(edited["built"], TOP_EDIT, "{edited}");
    let m2 = manifest(Path::new(edited["output"].as_str().unwrap()));
    assert_eq!(
        m2["layers"][1], m["layers"][1],
        "unchanged lower layer kept"
    );
    assert_ne!(m2["layers"][2], m["layers"][2]);
}

/// `rbuild gc --store STORE EXTRA…`: its report line (`gc: kept … freed …`).
fn gc(store: &Path, extra: &[&str]) -> String {
    let mut args = vec!["gc", "--store", store.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = rbuild(&args);
    ok(&o);
    let err = stderr(&o);
    err.lines()
        .find(|l| l.starts_with("gc: kept "))
        .unwrap_or_else(|| panic!("no report line: {err}"))
        .to_owned()
}

/// What a gc report line says was freed (`80.1 MiB`, `0 B`).
fn freed(line: &str) -> &str {
    line.split("freed ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| panic!("no freed bytes in {line:?}"))
}

/// `gc` keeps by default what the roots were built from, so after a gc editing the last layer of
/// a layered recipe still builds three derivations and downloads nothing; `--keep fetches` keeps
/// only the downloads (everything else is built again, offline), `--keep roots` only the roots.
#[test]
fn gc_keeps_what_roots_need_to_be_rebuilt_incrementally() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let store = t.path().join("store");
    // The base's image, with no root and not an input of the layered image: garbage.
    let base = realise_json(None, &a, "", &store, &[]);
    let base_image = Path::new(base["output"].as_str().unwrap()).to_owned();
    let app_dir = app_with_files(&a);
    let recipe = app_dir.join("app.toml");
    let edit_last_layer = |to: &str| {
        fs::write(
            &recipe,
            format!(
                "base = \"../testos.toml\"\n\n[[layers]]\ncopy = [{{ from = \"files/motd\", to = \"/etc/motd\" }}]\n\n[[layers]]\ncopy = [{{ from = \"files/tool\", to = \"{to}\", mode = \"0755\" }}]\n"
            ),
        )
        .unwrap();
    };
    let result = t.path().join("result");
    let realise = |extra: &[&str]| {
        let mut args = vec![
            "realise",
            recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "-o",
            result.to_str().unwrap(),
            "--json",
        ];
        let url = a.mirror_url();
        args.extend_from_slice(&["--mirror", &url]);
        args.extend_from_slice(extra);
        rbuild(&args)
    };
    let built = |o: &std::process::Output| json(o)["built"].as_u64().unwrap();
    edit_last_layer("/usr/local/bin/tool");
    assert_eq!(
        built(&realise(&[])),
        8,
        "two trees, two diffs, the image, its manifest and two SBOMs"
    );

    // --dry-run says what gc will delete and free, and deletes nothing.
    let o = rbuild(&["gc", "--store", store.to_str().unwrap(), "--dry-run"]);
    let dry = ok(&o).to_owned() + &stderr(&o);
    assert!(dry.contains("would delete 4 outputs, freeing "), "{dry}");
    assert!(base_image.exists());
    let line = gc(&store, &[]);
    assert!(line.contains(" for 1 root;"), "{line}");
    assert!(
        line.contains("deleted 4 outputs,"),
        "only the base's image, its manifest and its two SBOMs: {line}"
    );
    assert_ne!(freed(&line), "0 B", "{line}");
    assert!(
        dry.contains(&format!("freeing {}", freed(&line))),
        "the dry run's bytes are the real run's: {dry} / {line}"
    );
    assert!(!base_image.exists());
    // Editing the last layer: its tree, its diff and the image (with its manifest and SBOMs),
    // without the network.
    edit_last_layer("/usr/local/bin/tool2");
    let edited = realise(&["--offline"]);
    assert_eq!(built(&edited), TOP_EDIT, "{}", stderr(&edited));

    // The downloads only: the edit builds the base's steps again, still offline.
    let line = gc(&store, &["--keep", "fetches"]);
    assert_ne!(freed(&line), "0 B", "{line}");
    edit_last_layer("/usr/local/bin/tool3");
    let edited = realise(&["--offline"]);
    assert!(built(&edited) > TOP_EDIT, "{}", stderr(&edited));

    // The root alone: the edit needs the mirror again, and builds everything.
    let line = gc(&store, &["--keep", "roots"]);
    assert!(line.starts_with("gc: kept 1 output ("), "{line}");
    assert_ne!(freed(&line), "0 B", "{line}");
    edit_last_layer("/usr/local/bin/tool4");
    let offline = realise(&["--offline"]);
    assert!(
        !offline.status.success() && stderr(&offline).contains("rbuild is offline"),
        "{}",
        stderr(&offline)
    );
    let edited = realise(&[]);
    assert!(built(&edited) > 8, "{}", stderr(&edited));

    // The image before the edit goes; then nothing is left to collect.
    let line = gc(&store, &[]);
    assert!(line.contains("deleted 1 output,"), "{line}");
    let line = gc(&store, &[]);
    assert!(line.ends_with("deleted 0 outputs, freed 0 B"), "{line}");
}

fn keypair(dir: &Path, name: &str) -> (String, String) {
    let (sec, public) = (
        dir.join(format!("{name}.sec")),
        dir.join(format!("{name}.pub")),
    );
    ok(&rbuild(&[
        "key",
        "generate",
        name,
        sec.to_str().unwrap(),
        public.to_str().unwrap(),
    ]));
    (
        sec.to_str().unwrap().to_owned(),
        public.to_str().unwrap().to_owned(),
    )
}

/// `rbuild realise --json` of `a`'s recipe into `store` with these substituters, trusting `key`.
fn realise_from(
    a: &Archive,
    store: &Path,
    mirror: &str,
    caches: &[&str],
    key: &str,
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut args = vec![
        "realise",
        a.recipe.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--json",
        "--mirror",
        mirror,
        "--trusted-key",
        key,
    ];
    for c in caches {
        args.extend(["--substituter", c]);
    }
    rbuild_as(None, &args, env)
}

/// Overwrite every blob in `blobs`; a realise into `store` from `cache` must catch it, build
/// from the mirror instead, and still make the image of `built` (an earlier realise's JSON).
fn tampered_blobs_are_refused(
    a: &Archive,
    blobs: &Path,
    store: &Path,
    cache: &str,
    key: &str,
    built: &serde_json::Value,
) {
    for f in fs::read_dir(blobs).unwrap() {
        fs::write(f.unwrap().path(), b"tampered").unwrap();
    }
    let o = realise_from(a, store, &a.mirror_url(), &[cache], key, &[]);
    let r = json(&o);
    assert!(r["built"].as_u64().unwrap() >= 1, "{r}");
    assert!(stderr(&o).contains("blob sha256"), "{}", stderr(&o));
    assert_eq!(output_digest(&r), output_digest(built));
}

/// A shared-directory binary cache: a second store substitutes instead of building (without
/// touching the mirror), entries signed by an untrusted key or with tampered blobs are refused
/// and built instead, a partial cache is used for what it has, and pushing twice uploads nothing.
#[test]
fn file_cache_substitutes_signed_outputs_only() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let (alice_sec, alice_pub) = keypair(t.path(), "alice-2026");
    let (_, bob_pub) = keypair(t.path(), "bob");
    let store_a = t.path().join("a");
    let r = realise_json(None, &a, "", &store_a, &[]);
    let cache_dir = t.path().join("cache");
    let cache = format!("file://{}", cache_dir.display());
    let recipe = a.recipe.to_str().unwrap();
    let push = |target: &str| {
        let o = cache_push(target, &store_a, &cache, &alice_sec, &[]);
        ok(&o);
        stderr(&o)
    };
    assert!(push(recipe).contains("pushed 16 outputs"));
    assert!(
        push(recipe).contains("(0 new blobs)"),
        "pushing again uploads nothing"
    );

    let dead = "http://127.0.0.1:9/debian";
    let from_cache = |store: &Path, key: &str| realise_from(&a, store, dead, &[&cache], key, &[]);
    let b = json(&from_cache(&t.path().join("b"), &alice_pub));
    assert_eq!(counts(&b), (0, 1), "only the image itself is fetched: {b}");
    assert_eq!(output_digest(&b), output_digest(&r));

    // Untrusted: refused, said so, and (with a dead mirror) the build fails instead of using it.
    let o = from_cache(&t.path().join("c"), &bob_pub);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no valid signature by a trusted key"),
        "{}",
        stderr(&o)
    );

    // Tampered blob: caught while downloading; built from the mirror instead.
    tampered_blobs_are_refused(
        &a,
        &cache_dir.join("blobs/sha256"),
        &t.path().join("d"),
        &cache,
        &alice_pub,
        &r,
    );

    // A partial cache (only the root filesystem tar) and a cache that does not exist.
    let partial = t.path().join("partial");
    let partial_url = format!("file://{}", partial.display());
    ok(&cache_push(
        &format!("{recipe}^rootfs"),
        &store_a,
        &partial_url,
        &alice_sec,
        &[],
    ));
    let nowhere = format!("file://{}", t.path().join("nowhere").display());
    let e = json(&realise_from(
        &a,
        &t.path().join("e"),
        dead,
        &[&nowhere, &partial_url],
        &alice_pub,
        &[],
    ));
    assert_eq!(
        counts(&e),
        (6, 3),
        "from the ^rootfs closure, what the image needs substituted (the tree, and the \
         InRelease and Packages that the stanzas are checked against, as the verified index \
         was; not the verified index, which nothing of the image reads, nor the tar, which the \
         layer does without); the layer, the image, its manifest, the stanzas and two SBOMs \
         built: {e}"
    );
}

/// The same through plain HTTP (GET/PUT/HEAD) on loopback: push, substitute with a dead
/// mirror, a cache that does not answer does not stop a local build, an untrusted key and
/// tampered blobs are refused, a partial cache is used for what it has.
#[test]
fn http_cache_round_trip_and_dead_cache() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let (sec, public) = keypair(t.path(), "ci");
    let url = serve_http(&t.path().join("served"));
    let recipe = a.recipe.to_str().unwrap();
    let store_a = t.path().join("a");
    let r = json(&rbuild(&[
        "realise",
        recipe,
        "--store",
        store_a.to_str().unwrap(),
        "--json",
        "--mirror",
        &a.mirror_url(),
        "--push-to",
        &url,
        "--secret-key",
        &sec,
    ]));
    assert_eq!(r["built"], 16);
    assert!(
        t.path().join("served/entries").read_dir().unwrap().count() >= 13,
        "pushed while building"
    );
    let b = json(&realise_from(
        &a,
        &t.path().join("b"),
        "http://127.0.0.1:9/debian",
        &[&url],
        &public,
        &[],
    ));
    assert_eq!(counts(&b), (0, 1), "{b}");
    assert_eq!(output_digest(&b), output_digest(&r));
    // Nothing listens on port 9: the cache is dead, the build goes on from the mirror.
    let o = realise_from(
        &a,
        &t.path().join("c"),
        &a.mirror_url(),
        &["http://127.0.0.1:9/cache"],
        &public,
        &[],
    );
    let c = json(&o);
    assert_eq!(c["built"], 16);
    assert!(
        stderr(&o).contains("127.0.0.1:9/cache"),
        "warned: {}",
        stderr(&o)
    );

    // Untrusted: refused, said so; with a dead mirror the realise fails.
    let (_, bob_pub) = keypair(t.path(), "bob");
    let o = realise_from(
        &a,
        &t.path().join("d"),
        "http://127.0.0.1:9/debian",
        &[&url],
        &bob_pub,
        &[],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no valid signature by a trusted key"),
        "{}",
        stderr(&o)
    );

    // Partial: another path of the server holds only the root filesystem tar.
    let partial = format!("{url}/partial");
    ok(&cache_push(
        &format!("{recipe}^rootfs"),
        &store_a,
        &partial,
        &sec,
        &[],
    ));
    let e = json(&realise_from(
        &a,
        &t.path().join("e"),
        "http://127.0.0.1:9/debian",
        &[&partial],
        &public,
        &[],
    ));
    assert_eq!(
        counts(&e),
        (6, 3),
        "from the ^rootfs closure, what the image needs substituted (the tree, and the \
         InRelease and Packages that the stanzas are checked against, as the verified index \
         was; not the verified index, which nothing of the image reads, nor the tar, which the \
         layer does without); the layer, the image, its manifest, the stanzas and two SBOMs \
         built: {e}"
    );

    // Tampered blobs: caught while downloading, built from the mirror instead.
    tampered_blobs_are_refused(
        &a,
        &t.path().join("served/blobs/sha256"),
        &t.path().join("f"),
        &url,
        &public,
        &r,
    );
}

/// The same against a real REAPI server (BuildGrid): push while building, push again (nothing
/// new), substitute with a dead mirror, refuse an untrusted key and a rewritten entry, use a
/// partial cache (another instance name) for what it has, and survive a dead `grpc://` cache.
#[test]
fn grpc_cache_on_buildgrid() {
    let bg = buildgrid();
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let (sec, public) = keypair(t.path(), "alice-2026");
    let (_, bob_pub) = keypair(t.path(), "bob");
    let recipe = a.recipe.to_str().unwrap();
    let store_a = t.path().join("a");
    let r = realise_json(
        None,
        &a,
        "",
        &store_a,
        &["--push-to", &bg.url, "--secret-key", &sec],
    );
    assert_eq!(r["built"], 16);
    let again = cache_push(recipe, &store_a, &bg.url, &sec, &[]);
    ok(&again);
    assert!(
        stderr(&again).contains("(0 new blobs)"),
        "{}",
        stderr(&again)
    );

    let dead = "http://127.0.0.1:9/debian";
    let from = |store: &str, mirror: &str, caches: &[&str], key: &str| {
        realise_from(&a, &t.path().join(store), mirror, caches, key, &[])
    };
    let b = json(&from("b", dead, &[&bg.url], &public));
    assert_eq!(counts(&b), (0, 1), "{b}");
    let digest = output_digest(&r);
    assert_eq!(output_digest(&b), digest);

    // Untrusted key: refused, said so; with a dead mirror the realise fails.
    let o = from("c", dead, &[&bg.url], &bob_pub);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no valid signature by a trusted key"),
        "{}",
        stderr(&o)
    );

    // A cache that rewrites the image's entry (here: another content hash, same signature) is
    // refused; the layer below the image is still substituted, the image is built.
    let image_drv = Path::new(r["output"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .split_once('-')
        .unwrap()
        .0
        .to_owned();
    let cache = rbuild_store::cache::open(&bg.url).unwrap();
    let mut entry: serde_json::Value =
        serde_json::from_slice(&cache.get_entry(&image_drv).unwrap().expect("pushed")).unwrap();
    entry["body"]["content_hash"] = "blake3:0000".into();
    cache
        .put_entry(&image_drv, &serde_json::to_vec(&entry).unwrap())
        .unwrap();
    let o = from("d", &a.mirror_url(), &[&bg.url], &public);
    let d = json(&o);
    // The layer and the two SBOMs attached to the image are substituted.
    assert_eq!(counts(&d), (1, 3), "{d}");
    assert!(stderr(&o).contains("no valid signature"), "{}", stderr(&o));
    assert_eq!(output_digest(&d), digest);

    // `rbuild cache check` says what each cache is, and fails when one cannot be used.
    let o = rbuild(&["cache", "check", &bg.url, "grpc://127.0.0.1:9"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!(
            "{}: ok, a Remote Execution API v2 cache: SHA-256 digests",
            bg.url
        )) && out.contains("ActionCache updates allowed"),
        "{out}"
    );
    assert!(out.contains("grpc://127.0.0.1:9: FAILED"), "{out}");
    // A server whose ActionCache takes no updates: said by `cache check`, and a push stops
    // before uploading anything.
    let readonly = format!("{}/readonly", bg.url);
    let o = rbuild(&["cache", "check", &readonly]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ActionCache updates refused"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = cache_push(recipe, &store_a, &readonly, &sec, &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not allow ActionCache updates"),
        "{}",
        stderr(&o)
    );

    // Partial: instance `other` (same CAS, its own ActionCache) has only the root filesystem tar;
    // a dead cache in front of it is warned about and skipped.
    let other = format!("{}/other", bg.url);
    ok(&cache_push(
        &format!("{recipe}^rootfs"),
        &store_a,
        &other,
        &sec,
        &[],
    ));
    let o = from("e", dead, &["grpc://127.0.0.1:9", &other], &public);
    let e = json(&o);
    assert_eq!(
        counts(&e),
        (6, 3),
        "from the ^rootfs closure, what the image needs substituted (the tree, and the \
         InRelease and Packages that the stanzas are checked against, as the verified index \
         was; not the verified index, which nothing of the image reads, nor the tar, which the \
         layer does without); the layer, the image, its manifest, the stanzas and two SBOMs \
         built: {e}"
    );
    assert!(
        stderr(&o).contains("grpc://127.0.0.1:9"),
        "warned: {}",
        stderr(&o)
    );

    // A cache that accepts connections and never answers, and one that answers garbage: both
    // are reported (after RBUILD_CACHE_TIMEOUT for the silent one) and the build goes on.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("grpc://{}", silent.local_addr().unwrap());
    let garbage_url = format!("grpc://{}", garbage.local_addr().unwrap());
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().collect();
        drop(held);
    });
    std::thread::spawn(move || {
        for c in garbage.incoming() {
            let _ = std::io::Write::write_all(
                &mut c.unwrap(),
                b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\ngarbage",
            );
        }
    });
    let o = realise_from(
        &a,
        &t.path().join("f"),
        &a.mirror_url(),
        &[&silent_url, &garbage_url],
        &public,
        &[("RBUILD_CACHE_TIMEOUT", "2")],
    );
    assert_eq!(json(&o)["built"], 16);
    for url in [&silent_url, &garbage_url] {
        assert!(
            stderr(&o).contains(url.as_str()),
            "warned about {url}: {}",
            stderr(&o)
        );
    }
}

/// The REAPI backend below the CLI: small files go in batches, files over the batch limit
/// through ByteStream, equal files once; a fetched tree equals the pushed one, and the CAS is
/// shared across instance names while the ActionCache is not.
#[test]
fn grpc_backend_batches_small_blobs_and_streams_large_ones() {
    use rbuild_store::cache;
    use std::os::unix::fs::MetadataExt;
    let bg = buildgrid();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    fs::create_dir_all(out.join("many")).unwrap();
    for i in 0..300 {
        fs::write(
            out.join(format!("many/{i}")),
            format!("file {i}\n").repeat(i),
        )
        .unwrap();
    }
    // Not compressible, not all zero: 3 MiB twice (one blob), 9 MiB once (over the 4 MiB batch).
    let noise = |n: usize, seed: u8| -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        let mut x = seed as u64 | 1;
        while v.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.truncate(n);
        v
    };
    fs::write(out.join("three-a"), noise(3 << 20, 1)).unwrap();
    fs::write(out.join("three-b"), noise(3 << 20, 1)).unwrap();
    fs::write(out.join("nine"), noise((9 << 20) + 7, 2)).unwrap();
    fs::write(out.join("empty"), b"").unwrap();
    fs::hard_link(out.join("nine"), out.join("nine-link")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/env", out.join("abs")).unwrap();

    let c = cache::open(&bg.url).unwrap();
    let key = cache::SecretKey::generate("k").unwrap();
    // Push checks the output against the content hash it was registered with.
    let registered = rbuild_store::hash::content_hash(&out, None).unwrap();
    let n = cache::push(c.as_ref(), &key, "drv1", "x", &registered, &out).unwrap();
    // 299 non-empty small contents, one 3 MiB, one 9 MiB; the empty blob is always there.
    assert_eq!(n, 299 + 1 + 1, "one upload per distinct content");
    assert_eq!(
        cache::push(c.as_ref(), &key, "drv1", "x", &registered, &out).unwrap(),
        0
    );

    let other = cache::open(&format!("{}/other", bg.url)).unwrap();
    assert!(
        other.get_entry("drv1").unwrap().is_none(),
        "own ActionCache"
    );
    assert_eq!(
        cache::push(other.as_ref(), &key, "drv1", "x", &registered, &out).unwrap(),
        0,
        "shared CAS: nothing to upload"
    );

    let entry = cache::query(c.as_ref(), "drv1", &[key.public()])
        .unwrap()
        .unwrap();
    let dest = t.path().join("dest");
    cache::fetch(c.as_ref(), &entry, &dest).unwrap();
    for i in [0, 1, 150, 299] {
        let p = format!("many/{i}");
        assert_eq!(
            fs::read(dest.join(&p)).unwrap(),
            fs::read(out.join(&p)).unwrap()
        );
    }
    for f in ["three-a", "three-b", "nine", "empty"] {
        assert_eq!(
            fs::read(dest.join(f)).unwrap(),
            fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        fs::metadata(dest.join("nine")).unwrap().ino(),
        fs::metadata(dest.join("nine-link")).unwrap().ino()
    );
    assert_eq!(
        fs::read_link(dest.join("abs")).unwrap(),
        Path::new("/usr/bin/env")
    );
    assert_eq!(
        c.missing_blobs(&entry.body.blobs()).unwrap(),
        vec![],
        "every blob is in the CAS"
    );
}

/// A REAPI server that lists only BLAKE3 (and rejects any blob whose BLAKE3 digest is wrong):
/// push and substitute work with BLAKE3 addresses, existence is asked in batches, and large
/// blobs stream (a write the server is too busy for is made again). Then the server starts lying about blob contents: every lie is caught against
/// the signed SHA-256 listing, and the outputs are built instead.
#[test]
fn grpc_cache_speaks_blake3_when_listed_and_catches_a_lying_server() {
    use std::sync::atomic::Ordering;
    let (url, state) = reapi_server::start();
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let (sec, public) = keypair(t.path(), "alice-2026");
    let recipe = a.recipe.to_str().unwrap();
    let r = realise_json(
        None,
        &a,
        "",
        &t.path().join("a"),
        &["--push-to", &url, "--secret-key", &sec],
    );
    assert_eq!(r["built"], 16);
    let (calls, asked) = (
        state.find_missing_calls.load(Ordering::Relaxed),
        state.digests_asked.load(Ordering::Relaxed),
    );
    assert!(
        calls <= 16 && asked > 2 * calls,
        "one FindMissingBlobs per output, many digests each: {calls} calls, {asked} digests"
    );
    // `cache push` of the whole closure to an empty server asks about all its blobs at once,
    // and asks again while the server says it is busy.
    let (url2, state2) = reapi_server::start();
    state2.busy.store(3, Ordering::Relaxed);
    let o = cache_push(recipe, &t.path().join("a"), &url2, &sec, &[]);
    ok(&o);
    assert!(stderr(&o).contains("pushed 16 outputs"), "{}", stderr(&o));
    assert_eq!(
        state2.busy.load(Ordering::Relaxed),
        0,
        "the busy answers were met"
    );
    assert_eq!(state2.find_missing_calls.load(Ordering::Relaxed), 1);
    assert_eq!(state2.actions.lock().unwrap().len(), 16);
    let digest = output_digest(&r);
    let from = |store: &str, mirror: &str| {
        realise_from(&a, &t.path().join(store), mirror, &[&url], &public, &[])
    };
    let b = json(&from("b", "http://127.0.0.1:9/debian"));
    assert_eq!(counts(&b), (0, 1), "{b}");
    assert_eq!(output_digest(&b), digest);

    // Large blobs: over the server's 1 MiB batch limit, so through ByteStream both ways.
    {
        use rbuild_store::cache;
        let out = t.path().join("big");
        fs::create_dir_all(&out).unwrap();
        let big: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(out.join("big"), &big).unwrap();
        let big_hash = rbuild_store::hash::content_hash(&out, None).unwrap();
        let c = cache::open(&url).unwrap();
        let key = cache::SecretKey::generate("k").unwrap();
        // The first two writes are refused as a busy server refuses them: asked again.
        state.busy_writes.store(2, Ordering::Relaxed);
        assert_eq!(
            cache::push(c.as_ref(), &key, "big", "x", &big_hash, &out).unwrap(),
            1
        );
        assert_eq!(state.busy_writes.load(Ordering::Relaxed), 0);
        let entry = cache::query(c.as_ref(), "big", &[key.public()])
            .unwrap()
            .unwrap();
        cache::fetch(c.as_ref(), &entry, &t.path().join("big-back")).unwrap();
        assert_eq!(fs::read(t.path().join("big-back/big")).unwrap(), big);
        assert!(state.stream_writes.load(Ordering::Relaxed) >= 1);
        assert!(state.stream_reads.load(Ordering::Relaxed) >= 1);
        // Uploading a blob the server has (another pusher was first): the server ends the
        // write early with the full size, and that is a success.
        // (Larger than the upload queue, so the client is still sending when the server stops.)
        let huge: Vec<u8> = (0..24u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
        fs::write(t.path().join("huge"), &huge).unwrap();
        let blob = cache::BlobRef::of(&huge);
        c.put_blob(&blob, &t.path().join("huge")).unwrap();
        c.put_blob(&blob, &t.path().join("huge")).unwrap();
        assert_eq!(state.early_writes.load(Ordering::Relaxed), 1);

        // One unreadable entry is refused alone: the others of the batch are used. Push
        // "broken", then empty its ActionResult (no rbuild-entry.json any more).
        cache::push(c.as_ref(), &key, "broken", "x", &big_hash, &out).unwrap();
        let broken_action = {
            let actions = state.actions.lock().unwrap();
            let blobs = state.blobs.lock().unwrap();
            actions
                .iter()
                .find(|(_, r)| {
                    let d = r.output_files[0].digest.clone().unwrap();
                    serde_json::from_slice::<serde_json::Value>(&blobs[&d.hash]).unwrap()["body"]
                        ["drv_hash"]
                        == "broken"
                })
                .unwrap()
                .0
                .clone()
        };
        state
            .actions
            .lock()
            .unwrap()
            .insert(broken_action, Default::default());
        let answers = cache::query_many(
            c.as_ref(),
            &["broken".into(), "big".into(), "absent".into()],
            &[key.public()],
        )
        .unwrap();
        assert!(
            matches!(&answers[0], Err(cache::CacheError::BadEntry { .. })),
            "{:?}",
            answers[0].as_ref().err()
        );
        assert!(matches!(answers[1], Ok(Some(_))));
        assert!(matches!(answers[2], Ok(None)));
    }

    // The server evicts one blob of the image's output (as an LRU CAS does, keeping the
    // ActionCache result): the image is a quiet miss and is built from the substituted layer.
    // The blob is one no other entry holds (the layer's blob is in the image too, and which
    // file comes first goes by digests).
    let entries: Vec<serde_json::Value> = {
        let actions = state.actions.lock().unwrap();
        let blobs = state.blobs.lock().unwrap();
        actions
            .values()
            .filter_map(|r| r.output_files.first())
            .map(|f| {
                let d = f.digest.clone().unwrap();
                serde_json::from_slice::<serde_json::Value>(&blobs[&d.hash]).unwrap()
            })
            .collect()
    };
    let is_image = |e: &serde_json::Value| e["body"]["name"].as_str().unwrap().ends_with("-oci");
    let files = |e: &serde_json::Value| -> Vec<serde_json::Value> {
        e["body"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["type"] == "file" && n["size"].as_u64() > Some(0))
            .cloned()
            .collect()
    };
    let elsewhere: HashSet<String> = entries
        .iter()
        .filter(|e| !is_image(e))
        .flat_map(files)
        .map(|n| n["blake3"].as_str().unwrap().to_owned())
        .collect();
    let image_entry = entries
        .iter()
        .find(|e| is_image(e))
        .expect("the image's entry");
    let evicted = files(image_entry)
        .iter()
        .map(|n| n["blake3"].as_str().unwrap().to_owned())
        .find(|b| !elsewhere.contains(b))
        .expect("a blob of the image's alone");
    let kept = state.blobs.lock().unwrap().remove(&evicted).unwrap();
    let o = from("e", &a.mirror_url());
    let e = json(&o);
    // The image is built from its layer and the two SBOMs it carries, substituted.
    assert_eq!(counts(&e), (1, 3), "{e}");
    assert!(!stderr(&o).contains("refused"), "{}", stderr(&o));
    state.blobs.lock().unwrap().insert(evicted, kept);

    // The server now lies about every file blob (entries and Actions stay intact).
    let keep: HashSet<String> = state
        .actions
        .lock()
        .unwrap()
        .iter()
        .flat_map(|(action, result)| {
            let mut v = vec![action.clone()];
            v.extend(
                result
                    .output_files
                    .iter()
                    .map(|f| f.digest.clone().unwrap().hash),
            );
            v
        })
        .collect();
    for (hash, data) in state.blobs.lock().unwrap().iter_mut() {
        if !keep.contains(hash) && !data.is_empty() {
            data[0] ^= 0xff;
        }
    }
    let o = from("c", &a.mirror_url());
    let c = json(&o);
    assert!(c["built"].as_u64().unwrap() >= 1, "{c}");
    assert!(stderr(&o).contains("blob sha256"), "{}", stderr(&o));
    assert_eq!(output_digest(&c), digest);
}

/// `grpcs://`: BuildGrid serving TLS with a certificate from a CA made for the test. With that CA
/// in `SSL_CERT_FILE` the push goes through; without it the certificate is refused.
#[test]
fn grpcs_cache_checks_the_server_certificate() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    common::registry::test_ca(d);
    let bg = buildgrid_with_tls(Some((&d.join("key.pem"), &d.join("cert.pem"))));
    assert!(bg.url.starts_with("grpcs://"));

    ok(&rbuild(&[
        "key",
        "generate",
        "k",
        d.join("k.sec").to_str().unwrap(),
        d.join("k.pub").to_str().unwrap(),
    ]));
    let a = make_archive(&d.join("archive"));
    lock(&a);
    let store = d.join("store");
    realise_json(None, &a, "^rootfs", &store, &[]);
    let push = |env: &[(&str, &str)]| {
        cache_push(
            &format!("{}^rootfs", a.recipe.display()),
            &store,
            &bg.url,
            d.join("k.sec").to_str().unwrap(),
            env,
        )
    };
    let o = push(&[("SSL_CERT_FILE", d.join("ca.pem").to_str().unwrap())]);
    ok(&o);
    assert!(stderr(&o).contains("new blobs"), "{}", stderr(&o));
    let o = push(&[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("certificate"), "{}", stderr(&o));
}

/// What every binary cache backend promises, asked of each in the same words (as tvix runs one
/// suite over all its blob services): a directory, an HTTP server, BuildGrid, an in-memory REAPI
/// server that speaks BLAKE3, and an OCI registry. Blobs (empty, small, larger than a batch and
/// than a stream's piece) are missing until put (the empty one may be there from the start), then
/// present and read back byte for byte, whole
/// and through the small-blob path; a pushed output's entry is found and verified, and fetched
/// into the same tree; pushing it again uploads nothing; an unknown derivation has no entry.
#[test]
fn every_cache_backend_keeps_the_same_contract() {
    use rbuild_store::cache::{self, BinaryCache, BlobRef};
    const TEST: &str = "every_cache_backend_keeps_the_same_contract";
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let files = d.join("files");
    fs::create_dir_all(&files).unwrap();
    let contents: [(&str, Vec<u8>); 3] = [
        ("empty", vec![]),
        ("small", b"small blob\n".to_vec()),
        // Past the registry's 16 MiB streaming threshold, ending in a partial chunk.
        (
            "large",
            (0..(17u32 << 20) + 3)
                .map(|i| (i * 31 % 251) as u8)
                .collect(),
        ),
    ];
    let mut blobs = Vec::new();
    for (name, bytes) in &contents {
        let p = files.join(name);
        fs::write(&p, bytes).unwrap();
        blobs.push((BlobRef::of_file(&p).unwrap(), p));
    }
    let out = d.join("out");
    fs::create_dir_all(out.join("etc")).unwrap();
    fs::write(out.join("etc/motd"), "hello\n").unwrap();
    fs::write(out.join("data"), &contents[2].1).unwrap();
    std::os::unix::fs::symlink("etc/motd", out.join("link")).unwrap();
    let content_hash = rbuild_store::hash::content_hash(&out, None).unwrap();
    let key = cache::SecretKey::generate("contract").unwrap();

    let contract = |url: &str| {
        let c = cache::open(url).unwrap();
        let c: &dyn BinaryCache = c.as_ref();
        let refs: Vec<BlobRef> = blobs.iter().map(|(b, _)| b.clone()).collect();
        // The empty blob may be there from the start (REAPI servers always have it).
        let missing = c.missing_blobs(&refs).unwrap();
        assert!(
            refs[1..].iter().all(|b| missing.contains(b)) && missing.len() <= 3,
            "{url}: a new cache lacks them: {missing:?}"
        );
        c.put_blobs(&blobs).unwrap();
        assert!(
            c.missing_blobs(&refs).unwrap().is_empty(),
            "{url}: put, then present"
        );
        for ((_, bytes), b) in contents.iter().zip(&refs) {
            let mut got = Vec::new();
            c.get_blob(b, &mut got).unwrap();
            assert!(&got == bytes, "{url}: blob {} read back", b.sha256);
        }
        let small = &refs[..2];
        let mut seen = vec![None; 2];
        c.get_small_blobs(small, &mut |i, bytes| {
            seen[i] = Some(bytes);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen[1].as_deref(),
            Some(&contents[1].1[..]),
            "{url}: small blobs"
        );
        assert_eq!(seen[0].as_deref(), Some(&[][..]), "{url}: the empty blob");

        let unknown = "1".repeat(64);
        assert!(
            c.get_entry(&unknown).unwrap().is_none(),
            "{url}: no such entry"
        );
        cache::push(c, &key, "contract-drv", "contract-out", &content_hash, &out).unwrap();
        assert_eq!(
            cache::push(c, &key, "contract-drv", "contract-out", &content_hash, &out).unwrap(),
            0,
            "{url}: pushing again uploads nothing"
        );
        let entries = c
            .get_entries(&["contract-drv".to_owned(), unknown.clone()])
            .unwrap();
        assert!(
            matches!(&entries[..], [Ok(Some(_)), Ok(None)]),
            "{url}: {entries:?}"
        );
        let entry = cache::query(c, "contract-drv", &[key.public()])
            .unwrap()
            .expect("the pushed entry");
        let dest = d.join(format!("dest-{}", url.replace(['/', ':'], "_")));
        cache::fetch(c, &entry, &dest).unwrap();
        assert_eq!(
            rbuild_store::hash::content_hash(&dest, None).unwrap(),
            content_hash,
            "{url}: the same tree"
        );
        c.check().unwrap();
    };

    contract(&format!("file://{}", d.join("dir-cache").display()));
    fs::create_dir_all(d.join("http-cache")).unwrap();
    contract(&format!("{}/", serve_http(&d.join("http-cache"))));
    let (reapi, _state) = reapi_server::start();
    contract(&reapi);
    let bg = buildgrid();
    contract(&bg.url);
    if common::registry::available(TEST) {
        let reg = common::registry::start(&d.join("registry"), None);
        contract(&format!("docker://{}/contract", reg.addr));
    }
}

/// The test recipe realised into `d/a` with `--push-to url` (a new archive in `d/archive`, a
/// new key pair), then into the empty `d/b` from `url` alone with a dead mirror: everything
/// substituted, the same image. Returns the archive, the secret and public keys and the first
/// realise's JSON.
fn push_then_substitute_all(
    d: &Path,
    url: &str,
    env: &[(&str, &str)],
) -> (Archive, String, String, serde_json::Value) {
    let a = make_archive(&d.join("archive"));
    lock(&a);
    let (sec, public) = keypair(d, "alice-2026");
    let first = realise_with(
        None,
        &a,
        "",
        &d.join("a"),
        &["--push-to", url, "--secret-key", &sec],
        env,
    );
    // Every output was published as it was built.
    assert!(!stderr(&first).contains("warning"), "{}", stderr(&first));
    let built = json(&first);
    let b = json(&realise_from(
        &a,
        &d.join("b"),
        "http://127.0.0.1:9/debian",
        &[url],
        &public,
        env,
    ));
    assert_eq!(b["built"], 0, "{b}");
    assert_eq!(output_digest(&b), output_digest(&built));
    (a, sec, public, built)
}

/// An OCI registry as a binary cache (`docker://HOST:PORT/REPOSITORY`), on Debian's
/// distribution registry with htpasswd auth and TLS from a test CA: `--push-to` publishes the
/// closure, pushing again uploads nothing, a second store substitutes everything from it; no
/// credentials, or no trust in the CA, is a clear failure; and through a proxy that rewrites a
/// file's bytes, the blob is refused and the output built instead.
#[test]
fn oci_registry_cache_with_auth_tls_and_a_tampering_proxy() {
    use common::registry;
    const TEST: &str = "oci_registry_cache_with_auth_tls_and_a_tampering_proxy";
    if !registry::available(TEST) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    registry::test_ca(&d.join("reg"));
    let reg = registry::start(&d.join("reg"), Some(("alice", "s3cret")));
    let auth = registry::auth_file(d, &reg.addr, "alice", "s3cret");
    let url = format!("docker://{}/team/rbuild-cache", reg.addr);
    let ca = d.join("reg/ca.pem");
    let env = [
        ("SSL_CERT_FILE", ca.to_str().unwrap()),
        ("REGISTRY_AUTH_FILE", auth.to_str().unwrap()),
    ];
    let (a, sec, public, _) = push_then_substitute_all(d, &url, &env);
    let store = d.join("a");
    let push = |to: &str, env: &[(&str, &str)]| {
        cache_push(a.recipe.to_str().unwrap(), &store, to, &sec, env)
    };
    let again = push(&url, &env);
    ok(&again);
    assert!(
        stderr(&again).contains("(0 new blobs)"),
        "pushing again uploads nothing: {}",
        stderr(&again)
    );

    // No credentials; no trust in the test CA.
    let o = push(
        &url,
        &[
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("REGISTRY_AUTH_FILE", "/nonexistent"),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&reg.addr), "{}", stderr(&o));
    let o = push(&url, &[("REGISTRY_AUTH_FILE", auth.to_str().unwrap())]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).to_lowercase().contains("certificate"),
        "{}",
        stderr(&o)
    );

    // A registry in plain HTTP (allowed on loopback), behind a proxy that rewrites a file of the
    // base (its /etc/os-release) on the way back: the blob is refused, the tree built instead.
    let plain = registry::start(&d.join("plain"), None);
    ok(&push(&format!("docker://{}/rbuild", plain.addr), &[]));
    // Pushing again asks, and sends nothing: no upload session, no blob, no manifest.
    let (recording, sent) = registry::recording_proxy(plain.addr.clone());
    ok(&push(&format!("docker://{recording}/rbuild"), &[]));
    let sent = String::from_utf8_lossy(&sent.lock().unwrap()).into_owned();
    assert!(sent.contains("HEAD /v2/rbuild/blobs/"), "{sent}");
    for method in ["POST ", "PUT ", "PATCH "] {
        assert!(!sent.contains(method), "{method}in {sent}");
    }
    let proxy = registry::tampering_proxy(
        plain.addr.clone(),
        b"PRETTY_NAME=\"Test\"",
        b"PRETTY_NAME=\"Evil\"",
    );
    let o = realise_with(
        None,
        &a,
        "^tree",
        &d.join("c"),
        &[
            "--trusted-key",
            &public,
            "--substituter",
            &format!("docker://{proxy}/rbuild"),
        ],
        &[],
    );
    let c = json(&o);
    assert!(c["built"].as_u64().unwrap() >= 1, "{c}");
    assert!(stderr(&o).contains("blob sha256:"), "{}", stderr(&o));
    let out = Path::new(c["output"].as_str().unwrap());
    assert_eq!(
        fs::read(out.join("etc/os-release")).unwrap(),
        b"PRETTY_NAME=\"Test\"\n",
        "the rewritten bytes never land"
    );
}

/// A registry behind token auth (the distribution registry's `auth.token`, and a token server
/// that checks basic credentials and signs JWTs), as registries fronting an identity service
/// do it: `--push-to` and `--substituter` go through bearer tokens, entries signed by a key not
/// trusted are refused, no credentials is a clear failure. And a registry that answers a
/// manifest request with endless bytes (chunked, or a declared length past the bound) is refused
/// without them being read: `cache check` says so.
#[test]
fn oci_registry_cache_with_bearer_tokens_and_bounded_manifests() {
    use common::registry;
    const TEST: &str = "oci_registry_cache_with_bearer_tokens_and_bounded_manifests";
    if !registry::available(TEST) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (issuer, service) = ("rbuild-test-issuer", "rbuild-test-registry");
    fs::create_dir_all(d.join("tokens")).unwrap();
    let (tokens, given) =
        registry::token_server(&d.join("tokens"), "alice", "s3cret", issuer, service);
    let reg = registry::start_with_tokens(
        &d.join("reg"),
        &format!("http://{tokens}/token"),
        issuer,
        service,
        &d.join("tokens/token.pem"),
    );
    let auth = registry::auth_file(d, &reg.addr, "alice", "s3cret");
    let url = format!("docker://{}/team/rbuild-cache", reg.addr);
    let env = [("REGISTRY_AUTH_FILE", auth.to_str().unwrap())];
    let (a, sec, public, built) = push_then_substitute_all(d, &url, &env);
    // The registry takes nothing but tokens: a substitution asks for its own.
    let before = given.load(std::sync::atomic::Ordering::SeqCst);
    let e = json(&realise_from(
        &a,
        &d.join("e"),
        "http://127.0.0.1:9/debian",
        &[&url],
        &public,
        &env,
    ));
    assert_eq!(e["built"], 0, "{e}");
    assert!(given.load(std::sync::atomic::Ordering::SeqCst) > before);

    // Entries signed by a key not trusted: refused, said so, and `--explain` says so of each
    // derivation then built from the mirror.
    let (_, mallory) = keypair(d, "mallory-2026");
    let o = rbuild_as(
        None,
        &[
            "realise",
            a.recipe.to_str().unwrap(),
            "--store",
            d.join("c").to_str().unwrap(),
            "--json",
            "--explain",
            "--mirror",
            &a.mirror_url(),
            "--trusted-key",
            &mallory,
            "--substituter",
            &url,
        ],
        &env,
    );
    assert!(
        stderr(&o).contains("no valid signature by a trusted key"),
        "{}",
        stderr(&o)
    );
    let c = json(&o);
    assert_eq!(output_digest(&c), output_digest(&built));
    let explained = c["explain"].as_array().unwrap();
    assert!(c["built"].as_u64().unwrap() > 0, "{c}");
    assert_eq!(explained.len() as u64, c["built"].as_u64().unwrap(), "{c}");
    for e in explained {
        let why = e["not_substituted"].as_str().unwrap_or_default();
        assert!(
            why.starts_with(&format!("{url}: its entry was refused: "))
                && why.contains("no valid signature by a trusted key"),
            "{c}"
        );
    }

    // No credentials: the token server refuses, and the error names the registry.
    let before = given.load(std::sync::atomic::Ordering::SeqCst);
    let o = cache_push(
        a.recipe.to_str().unwrap(),
        &d.join("a"),
        &url,
        &sec,
        &[("REGISTRY_AUTH_FILE", "/nonexistent")],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&reg.addr)
            && stderr(&o).to_lowercase().contains("authentication failure"),
        "{}",
        stderr(&o)
    );
    assert_eq!(given.load(std::sync::atomic::Ordering::SeqCst), before);

    for declared in [None, Some(1u64 << 40)] {
        let liar = registry::endless_manifests(declared);
        let o = rbuild(&["cache", "check", &format!("docker://{liar}/rbuild")]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(!o.status.success(), "{declared:?}: {out}");
        assert!(
            out.contains(&format!("docker://{liar}/rbuild: FAILED"))
                && out.contains("longer than 4194304 bytes, refused unread"),
            "{declared:?}: {out}{}",
            stderr(&o)
        );
    }
}

/// A recipe file's lock follows the recipe, as cargo's does: `realise` locks what a change needs
/// (only that: pinned packages stay pinned) and says so, `--locked` refuses instead, `--offline`
/// refuses a re-lock that needs the archive, and a Debian recipe whose archive moved on since it
/// was locked is not silently moved.
#[test]
fn realise_relocks_only_what_a_recipe_change_needs() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    let store = t.path().join("store");
    let app_dir = a.recipe.parent().unwrap().join("app");
    fs::create_dir_all(app_dir.join("files")).unwrap();
    fs::write(app_dir.join("files/motd"), "hello\n").unwrap();
    let recipe = app_dir.join("app.toml");
    let lock_path = app_dir.join("app.lock");
    let first = "base = \"../testos.toml\"\n\n[[layers]]\ncopy = [{ from = \"files/motd\", to = \"/etc/motd\" }]\n";
    fs::write(&recipe, first).unwrap();
    let run = |target: &str, extra: &[&str]| {
        let r = format!("{}{target}", recipe.display());
        let url = a.mirror_url();
        let mut args = vec!["realise", &r, "--store", store.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        if !extra.contains(&"--offline") {
            args.extend_from_slice(&["--mirror", &url]);
        }
        rbuild(&args)
    };
    let fails = |o: std::process::Output, what: &str| {
        assert!(!o.status.success(), "{what}: expected a failure");
        stderr(&o)
    };

    // No lock at all: --locked refuses, for the base recipe first; a plain realise locks both.
    let e = fails(run("", &["--locked"]), "--locked without a lock");
    assert!(
        e.contains("testos.lock") && e.contains("there is no lock yet") && e.contains("--locked"),
        "{e}"
    );
    assert!(!lock_path.exists() && !a.lock_path().exists());
    let o = run("", &[]);
    let r = json(&o);
    assert!(
        stderr(&o).contains("app.lock: locking for the recipe's changes: there is no lock yet"),
        "{}",
        stderr(&o)
    );
    assert!(a.lock_path().exists() && lock_path.exists());
    let base_lock = fs::read_to_string(a.lock_path()).unwrap();
    assert!(
        base_lock.contains("[resolved]"),
        "what the lock was resolved for: {base_lock}"
    );
    assert_eq!(
        run("", &["--locked"]).status.code(),
        Some(0),
        "a fitting lock passes --locked"
    );

    // A new `run`/`copy` layer needs nothing from the archive: locked offline, and only the new
    // layer's tree, its diff and the image are built.
    fs::write(
        &recipe,
        format!("{first}\n[[layers]]\ncopy = [{{ from = \"files/motd\", to = \"/etc/motd2\" }}]\n"),
    )
    .unwrap();
    let e = fails(run("", &["--locked"]), "--locked with a new layer");
    assert!(
        e.contains("app.lock: the lock does not fit the recipe (layer 2 is new)"),
        "{e}"
    );
    let o = run("", &["--offline"]);
    let e = stderr(&o);
    let two = json(&o);
    assert!(
        e.contains("app.lock: locking for the recipe's changes: layer 2 is new"),
        "{e}"
    );
    assert!(e.contains("2 layers: 0 kept as pinned, 0 resolved"), "{e}");
    assert_eq!(two["built"], TOP_EDIT, "{two}");
    assert_ne!(two["output"], r["output"]);

    // A layer that now wants a package: --offline refuses (the archive's index is needed) and
    // leaves the lock alone; with the mirror, the lock pins it (checked through the base's
    // verified index, so nothing needs building that the throwaway image cannot run).
    let before = fs::read_to_string(&lock_path).unwrap();
    fs::write(
        &recipe,
        format!("{first}\n[[layers]]\npackages = [\"unused\"]\n"),
    )
    .unwrap();
    let e = fails(
        run("^index", &["--offline"]),
        "--offline re-lock needing the archive",
    );
    assert!(
        e.contains("layer 2's packages changed") && e.contains("--offline forbids the network"),
        "{e}"
    );
    assert_eq!(
        fs::read_to_string(&lock_path).unwrap(),
        before,
        "lock untouched"
    );
    let o = run("^index", &[]);
    ok(&o);
    let after = fs::read_to_string(&lock_path).unwrap();
    assert!(
        after.contains("wants = [\"unused\"]") && after.contains("unused_1_amd64.deb"),
        "{after}"
    );

    // The Debian recipe itself: a new `include` is locked against the pinned archive...
    let testos = fs::read_to_string(&a.recipe).unwrap();
    let realise_index = || {
        rbuild(&[
            "realise",
            &format!("{}^index", a.recipe.display()),
            "--store",
            store.to_str().unwrap(),
            "--mirror",
            &a.mirror_url(),
        ])
    };
    fs::write(
        &a.recipe,
        testos.replace("[image]", "include = [\"unused\"]\n\n[image]"),
    )
    .unwrap();
    let o = realise_index();
    ok(&o);
    assert!(
        stderr(&o).contains("include [] → [\"unused\"]"),
        "{}",
        stderr(&o)
    );
    let relocked = fs::read_to_string(a.lock_path()).unwrap();
    assert!(relocked.contains("name = \"unused\""), "{relocked}");
    // ...and once the archive has moved on (a new InRelease), a change is refused rather than
    // moving every pinned package.
    let mut pkgs = standard_packages();
    pkgs.retain(|p| p.name != "hello");
    a.publish(&pkgs, &a.key);
    fs::write(
        &a.recipe,
        testos.replace("[image]", "include = [\"unused\", \"libhello\"]\n\n[image]"),
    )
    .unwrap();
    let o = realise_index();
    let e = fails(o, "a re-lock after the archive moved on");
    assert!(
        e.contains("has moved on") && e.contains("rbuild lock"),
        "{e}"
    );
    assert_eq!(
        fs::read_to_string(a.lock_path()).unwrap(),
        relocked,
        "lock untouched"
    );
}

/// A copy of `a`'s mirror at `a.dir/name`, without the files `drop` (mirror-relative).
fn mirror_copy(a: &Archive, name: &str, drop: &[&Path]) -> std::path::PathBuf {
    let dst = a.dir.join(name);
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&a.mirror)
        .arg(&dst)
        .status()
        .unwrap()
        .success());
    for rel in drop {
        fs::remove_file(dst.join(rel)).unwrap();
    }
    dst
}

/// The mirror-relative path of a package's `.deb` in `a`.
fn deb_rel(a: &Archive, name: &str, version: &str) -> std::path::PathBuf {
    a.deb_path(name, version)
        .strip_prefix(&a.mirror)
        .unwrap()
        .to_owned()
}

/// The registered outputs of `store` (their paths, sidecars left out).
fn outputs(store: &Path) -> Vec<std::path::PathBuf> {
    fs::read_dir(store.join("o"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "meta"))
        .collect()
}

/// The store output of the fetch named `name` (`o/<hash>-<name>`), if one is registered.
fn fetched(store: &Path, name: &str) -> Option<std::path::PathBuf> {
    outputs(store).into_iter().find(|p| {
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .split_once('-')
            .is_some_and(|(_, n)| n == name)
    })
}

/// A point release after the lock was made: the mirror (served over loopback HTTP) has a new
/// InRelease and index, and no longer the pinned `hello`. With a snapshot of the archive as it
/// was given as a second `--mirror`, the lock still builds: the InRelease and index (other
/// bytes on the first mirror) and `hello` (404 there) come from the second, the rest from the
/// first. Same derivations, same image as from the complete archive.
#[test]
fn a_point_release_builds_from_a_second_mirror() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let lock_text = fs::read_to_string(a.lock_path()).unwrap();
    let whole = realise_json(None, &a, "", &t.path().join("whole"), &[]);
    let snapshot = mirror_copy(&a, "snapshot", &[]);
    let hello = deb_rel(&a, "hello", "2.10-2");
    let pinned_hello = fs::read(a.mirror.join(&hello)).unwrap();
    // The point release: hello is gone, the index and InRelease are new.
    fs::remove_file(a.mirror.join(&hello)).unwrap();
    let mut pkgs = standard_packages();
    pkgs.retain(|p| p.name != "hello");
    a.publish(&pkgs, &a.key);
    let served = serve_http(&a.mirror);
    // The first mirror alone no longer has it.
    let store = t.path().join("store");
    let only = rbuild(&[
        "realise",
        a.recipe.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--mirror",
        &served,
    ]);
    assert!(!only.status.success());
    let err = stderr(&only);
    assert!(
        err.contains("sha256 mismatch") || err.contains("404 Not Found"),
        "{err}"
    );
    let snapshot_url = format!("file://{}/", snapshot.display());
    let r = json(&rbuild(&[
        "realise",
        a.recipe.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--json",
        "--mirror",
        &served,
        "--mirror",
        &snapshot_url,
    ]));
    assert_eq!(output_digest(&r), output_digest(&whole), "{r}");
    // The same derivation: its output is named by the same hash.
    let name = |r: &serde_json::Value| {
        Path::new(r["output"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_owned()
    };
    assert_eq!(name(&r), name(&whole));
    assert_eq!(
        fs::read(fetched(&store, "hello_2.10-2_amd64.deb").expect("hello fetched")).unwrap(),
        pinned_hello
    );
    assert_eq!(
        fs::read_to_string(a.lock_path()).unwrap(),
        lock_text,
        "the lock is untouched"
    );
}

/// A first mirror serving other bytes for a `.deb` (and more than the pinned size for
/// another) is passed over for the second; what is registered is only ever the pinned bytes,
/// and the store verifies.
#[test]
fn a_mirror_serving_wrong_bytes_is_passed_over_and_nothing_wrong_is_registered() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let first = mirror_copy(&a, "first", &[]);
    let (hello, lib) = (
        deb_rel(&a, "hello", "2.10-2"),
        deb_rel(&a, "libhello", "1.0-1"),
    );
    let wrong = b"not the pinned hello".repeat(20);
    fs::write(first.join(&hello), &wrong).unwrap();
    let mut longer = fs::read(a.mirror.join(&lib)).unwrap();
    longer.extend_from_slice(b"and more");
    fs::write(first.join(&lib), &longer).unwrap();
    let store = t.path().join("store");
    let first_url = format!("file://{}", first.display());
    ok(&rbuild(&[
        "realise",
        a.recipe.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--mirror",
        &first_url,
        "--mirror",
        &a.mirror_url(),
    ]));
    for (rel, name) in [
        (&hello, "hello_2.10-2_amd64.deb"),
        (&lib, "libhello_1.0-1_amd64.deb"),
    ] {
        let out = fetched(&store, name).unwrap_or_else(|| panic!("{name} registered"));
        assert_eq!(
            fs::read(out).unwrap(),
            fs::read(a.mirror.join(rel)).unwrap()
        );
    }
    for out in outputs(&store).into_iter().filter(|p| p.is_file()) {
        let bytes = fs::read(&out).unwrap();
        assert!(
            bytes != wrong && bytes != longer,
            "{}: the first mirror's bytes were registered",
            out.display()
        );
    }
    ok(&rbuild(&[
        "store",
        "verify",
        "--store",
        store.to_str().unwrap(),
    ]));
}

/// When no mirror has a file: one error naming the file, its pinned sha256 and size, every
/// mirror tried in order with what it said, and the ways out; the file is not registered.
#[test]
fn no_mirror_with_a_file_names_it_and_every_mirror_tried() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let hello = deb_rel(&a, "hello", "2.10-2");
    let pinned = fs::read(a.mirror.join(&hello)).unwrap();
    let first = mirror_copy(&a, "first", &[&hello]);
    let first_url = format!("file://{}", first.display());
    let store = t.path().join("store");
    let o = rbuild(&[
        "realise",
        a.recipe.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--mirror",
        &first_url,
        "--mirror",
        "http://127.0.0.1:9/debian",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    let head = format!(
        "{} (pinned: sha256 {}, {} bytes): none of the 2 mirrors delivered it; each one asked, \
         in order:\n  - from the mirror {first_url}: not found (",
        hello.display(),
        sha256_hex(&pinned),
        pinned.len()
    );
    assert!(err.contains(&head), "{head:?} in:\n{err}");
    assert!(
        err.contains("\n  - from the mirror http://127.0.0.1:9/debian: connection refused"),
        "{err}"
    );
    for way in [
        "\nWays out: ",
        "--mirror URL",
        "snapshot",
        "--substituter",
        "--offline",
    ] {
        assert!(err.contains(way), "{way}: {err}");
    }
    assert_eq!(fetched(&store, "hello_2.10-2_amd64.deb"), None);
}

/// `RBUILD_MIRROR` may name several mirrors (separated by spaces), tried in order per file:
/// locking skips a dead first mirror; realising takes each `.deb` from whichever mirror has
/// it. config.toml's `mirrors` work the same without it, and a `--mirror` replaces them.
#[test]
fn several_mirrors_from_rbuild_mirror_and_config() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let lock_text = fs::read_to_string(a.lock_path()).unwrap();
    let env_lock = t.path().join("env.lock");
    let dead_then_good = format!("http://127.0.0.1:9/debian {}", a.mirror_url());
    ok(&rbuild_as(
        None,
        &[
            "lock",
            a.recipe.to_str().unwrap(),
            "--output",
            env_lock.to_str().unwrap(),
        ],
        &[("RBUILD_MIRROR", &dead_then_good)],
    ));
    assert_eq!(fs::read_to_string(&env_lock).unwrap(), lock_text);

    // Neither mirror alone has every file.
    let no_hello = mirror_copy(&a, "no-hello", &[&deb_rel(&a, "hello", "2.10-2")]);
    let no_lib = mirror_copy(&a, "no-lib", &[&deb_rel(&a, "libhello", "1.0-1")]);
    let urls = format!("file://{}  file://{}", no_hello.display(), no_lib.display());
    let store = t.path().join("store");
    let realise = |store: &Path, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "realise",
            a.recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        rbuild_as(None, &args, env)
    };
    let r = json(&realise(&store, &[], &[("RBUILD_MIRROR", &urls)]));
    assert_eq!(r["built"], 16, "{r}");

    let config = t.path().join("config");
    fs::create_dir_all(config.join("rbuild")).unwrap();
    fs::write(
        config.join("rbuild/config.toml"),
        format!(
            "mirrors = [\"file://{}\", \"file://{}\"]\n",
            no_hello.display(),
            no_lib.display()
        ),
    )
    .unwrap();
    let cfg = [("XDG_CONFIG_HOME", config.to_str().unwrap())];
    let store2 = t.path().join("store2");
    let r2 = json(&realise(&store2, &[], &cfg));
    // The same derivations whichever way the mirrors were given.
    let name = |r: &serde_json::Value| {
        Path::new(r["output"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_owned()
    };
    assert_eq!(name(&r2), name(&r));
    // A --mirror is the whole list: the config file's mirrors are not added to it.
    let no_hello_url = format!("file://{}", no_hello.display());
    let o = realise(&t.path().join("store3"), &["--mirror", &no_hello_url], &cfg);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "hello_2.10-2_amd64.deb (pinned: sha256 {}",
            sha256_hex(&fs::read(a.deb_path("hello", "2.10-2")).unwrap())
        )) && err.contains(&format!(
            "downloading it from the mirror {no_hello_url} failed: not found"
        )),
        "{err}"
    );
}

/// `[apt-sources]` puts the archive it names into the image as deb822, owned by root; a recipe
/// without it (the throwaway base before the edit) carries none.
#[test]
fn apt_sources_are_written_into_the_image() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    let store = t.path().join("store");
    let tree = |extra: &[&str]| {
        let r = realise_json(None, &a, "^tree", &store, extra);
        Path::new(r["output"].as_str().unwrap()).to_owned()
    };
    let plain = tree(&[]);
    assert!(!plain.join("etc/apt/sources.list.d/debian.sources").exists());
    let text = fs::read_to_string(&a.recipe).unwrap();
    fs::write(
        &a.recipe,
        format!("{text}\n[apt-sources]\nuri = \"http://127.0.0.1:9/debian\"\nsuites = [\"{SUITE}\", \"{SUITE}-updates\"]\n"),
    )
    .unwrap();
    let with = tree(&[]);
    assert_ne!(with, plain);
    assert_eq!(
        fs::read_to_string(with.join("etc/apt/sources.list.d/debian.sources")).unwrap(),
        format!("Types: deb\nURIs: http://127.0.0.1:9/debian\nSuites: {SUITE} {SUITE}-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    );
    // A value that would start another deb822 field is refused as the recipe is read.
    fs::write(
        &a.recipe,
        format!("{text}\n[apt-sources]\nuri = \"http://x/debian\\nTrusted: yes\"\n"),
    )
    .unwrap();
    let e = realise_fails(&a, &store);
    assert!(e.contains("[apt-sources]") && e.contains("one word"), "{e}");
}

/// `rbuild check` builds the closure again into scratch and compares: the base and a layer
/// that writes the same bytes every time reproduce (exit 0); a layer whose `run` step writes
/// random bytes does not (exit 1, naming that layer and the file). Nothing registered is
/// replaced: the store still verifies and the output is reused as it was.
#[test]
fn check_rebuilds_into_scratch_and_names_what_does_not_reproduce() {
    let t = tempfile::tempdir().unwrap();
    let Some(a) = common::busybox::busybox_archive(t.path()) else {
        return;
    };
    let store = t.path().join("store");
    let mirror = a.mirror_url();
    let check = |recipe: &Path, extra: &[&str]| {
        let mut args = vec![
            "check",
            recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--mirror",
            &mirror,
        ];
        args.extend_from_slice(extra);
        rbuild(&args)
    };

    let same = common::busybox::layered(&a, "same", "echo same > /etc/same");
    // Built, signed and pushed by one store; checked by another against that cache: each
    // entry is independently reproduced.
    let keys = t.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    let (sec, public) = (keys.join("k.sec"), keys.join("k.pub"));
    ok(&rbuild(&[
        "key",
        "generate",
        "test-1",
        sec.to_str().unwrap(),
        public.to_str().unwrap(),
    ]));
    let cache = format!("file://{}", t.path().join("cache").display());
    ok(&rbuild(&[
        "realise",
        same.to_str().unwrap(),
        "--store",
        t.path().join("pusher").to_str().unwrap(),
        "--mirror",
        &mirror,
        "--push-to",
        &cache,
        "--secret-key",
        sec.to_str().unwrap(),
    ]));
    let out = check(
        &same,
        &[
            "--substituter",
            &cache,
            "--trusted-key",
            public.to_str().unwrap(),
        ],
    );
    let report = ok(&out);
    assert!(
        report.contains("reproduce their registered outputs") && !report.contains("does not"),
        "{report}"
    );
    let n: usize = report
        .split("check: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        n >= 4,
        "the verify, unpacks, configure, layer and packs were built again: {report}"
    );

    let random = common::busybox::layered(
        &a,
        "random",
        "head -c 32 /dev/urandom > /etc/random; echo fixed > /etc/fixed",
    );
    let realised = json(&rbuild(&[
        "realise",
        random.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--mirror",
        &mirror,
        "--json",
    ]));
    let out = check(&random, &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let differs: Vec<&serde_json::Value> = results
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["result"] != "reproduced")
        .collect();
    // The layer's tree differs first; what is made from it (its diff, the image) follows.
    let first = differs
        .first()
        .expect("a derivation that does not reproduce");
    assert_eq!(first["result"], "differs", "{first}");
    assert!(first["name"].as_str().unwrap().contains("layer"), "{first}");
    let paths: Vec<&str> = first["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["etc/random"],
        "only the random file differs: {first}"
    );
    assert_eq!(first["paths"][0]["change"], "contents changed");
    // The human report names the derivation and the file.
    let out = check(&random, &[]);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        report.contains("does not reproduce") && report.contains("/etc/random: contents changed"),
        "{report}"
    );

    // Nothing was replaced.
    ok(&rbuild(&[
        "store",
        "verify",
        "--store",
        store.to_str().unwrap(),
    ]));
    let again = json(&rbuild(&[
        "realise",
        random.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--offline",
        "--json",
    ]));
    assert_eq!(
        (&again["output"], again["built"].as_u64()),
        (&realised["output"], Some(0))
    );
}

/// `^provenance` is an in-toto statement with a SLSA v1 predicate: its subjects are the image
/// manifest's digest and the rootfs tar's sha256, its dependencies exactly the lock's files
/// (InRelease, indices, packages, each with the lock's sha256; the InRelease with the key that
/// signed it), and it is the same bytes from another store. `attest` signs it as a DSSE
/// envelope that `verify-attestation` accepts with the signer's key, and refuses with another
/// key or with one byte of the payload flipped.
#[test]
fn provenance_names_the_outputs_and_every_fetched_file_and_attests() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let store = t.path().join("store");
    let image = realise_json(None, &a, "", &store, &[]);
    let rootfs = realise_json(None, &a, "^rootfs", &store, &["--offline"]);
    let prov = realise_json(None, &a, "^provenance", &store, &["--offline"]);
    assert_eq!(prov["built"], 1, "only the statement is new: {prov}");
    let prov_path = Path::new(prov["output"].as_str().unwrap()).to_owned();
    let bytes = fs::read(&prov_path).unwrap();
    let s: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(s["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(s["predicateType"], "https://slsa.dev/provenance/v1");
    let manifest = manifest_digest(Path::new(image["output"].as_str().unwrap()));
    assert_eq!(
        format!(
            "sha256:{}",
            s["subject"][0]["digest"]["sha256"].as_str().unwrap()
        ),
        manifest
    );
    let tar = fs::read(rootfs["output"].as_str().unwrap()).unwrap();
    assert_eq!(s["subject"][1]["digest"]["sha256"], sha256_hex(&tar));

    let locked: rbuild_recipes::recipe::Lock =
        toml::from_str(&fs::read_to_string(a.lock_path()).unwrap()).unwrap();
    let mut want: BTreeMap<String, String> = locked
        .packages
        .iter()
        .map(|p| (p.filename.clone(), p.sha256.clone()))
        .chain(
            locked
                .indices
                .iter()
                .map(|i| (i.path.clone(), i.sha256.clone())),
        )
        .collect();
    want.insert(
        locked.inrelease.path.clone(),
        locked.inrelease.sha256.clone(),
    );
    let deps = s["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    let got: BTreeMap<String, String> = deps
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_owned(),
                d["digest"]["sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, want, "the dependencies are the lock's files");
    assert_eq!(deps.len(), want.len(), "each once");
    assert_eq!(
        deps[0]["annotations"]["signedBy"],
        serde_json::json!([a.key.fingerprint()])
    );
    let builder = s["predicate"]["runDetails"]["builder"]["id"]
        .as_str()
        .unwrap();
    assert!(
        builder.starts_with("urn:rbuild:builder:builders-"),
        "{builder}"
    );

    // The same statement from another store, built from nothing.
    let other = realise_json(None, &a, "^provenance", &t.path().join("other"), &[]);
    assert_eq!(fs::read(other["output"].as_str().unwrap()).unwrap(), bytes);

    // The SBOMs: every locked package with the lock's sha256 (the index's), the same bytes
    // from both stores.
    for output in ["^spdx", "^cyclonedx"] {
        let one = realise_json(None, &a, output, &store, &["--offline"]);
        let two = realise_json(None, &a, output, &t.path().join("other"), &["--offline"]);
        let doc = fs::read(one["output"].as_str().unwrap()).unwrap();
        assert_eq!(
            doc,
            fs::read(two["output"].as_str().unwrap()).unwrap(),
            "{output}"
        );
        let doc: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        let listed: BTreeMap<String, String> = if output == "^spdx" {
            assert_eq!(doc["spdxVersion"], "SPDX-2.3");
            doc["packages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["primaryPackagePurpose"] == "LIBRARY")
                .map(|p| {
                    (
                        p["name"].as_str().unwrap().to_owned(),
                        p["checksums"][0]["checksumValue"]
                            .as_str()
                            .unwrap()
                            .to_owned(),
                    )
                })
                .collect()
        } else {
            assert_eq!(doc["specVersion"], "1.6");
            doc["components"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap().to_owned(),
                        c["hashes"][0]["content"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        };
        let pinned: BTreeMap<String, String> = locked
            .packages
            .iter()
            .map(|p| (p.name.clone(), p.sha256.clone()))
            .collect();
        assert_eq!(listed, pinned, "{output}");
    }

    // Signed, and checked.
    let keys = t.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    let key = |name: &str| {
        let (sec, public) = (
            keys.join(format!("{name}.sec")),
            keys.join(format!("{name}.pub")),
        );
        ok(&rbuild(&[
            "key",
            "generate",
            "release-1",
            sec.to_str().unwrap(),
            public.to_str().unwrap(),
        ]));
        (sec, public)
    };
    let (sec, public) = key("a");
    let (_, impostor) = key("b");
    let envelope = t.path().join("provenance.dsse.json");
    ok(&rbuild(&[
        "attest",
        &format!("{}", a.recipe.display()),
        "--store",
        store.to_str().unwrap(),
        "--offline",
        "--secret-key",
        sec.to_str().unwrap(),
        "-o",
        envelope.to_str().unwrap(),
    ]));
    let env: serde_json::Value = serde_json::from_slice(&fs::read(&envelope).unwrap()).unwrap();
    assert_eq!(env["payloadType"], "application/vnd.in-toto+json");
    let verify = |file: &Path, key: &Path| {
        rbuild(&[
            "verify-attestation",
            file.to_str().unwrap(),
            "--trusted-key",
            key.to_str().unwrap(),
        ])
    };
    let report = ok(&verify(&envelope, &public));
    assert!(
        report.contains(&manifest) && report.contains("signed by release-1"),
        "{report}"
    );
    // A standard DSSE implementation agrees.
    if let Some(python) = pytools("provenance: securesystemslib's DSSE verification") {
        const CHECK: &str = r#"
import base64, json, sys
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey
name, b64 = open(sys.argv[2]).read().strip().split(":", 1)
key = SSlibKey(name, "ed25519", "ed25519", {"public": base64.b64decode(b64).hex()})
env = Envelope.from_dict(json.load(open(sys.argv[1])))
print("verified by", ",".join(sorted(env.verify([key], 1))))
print(json.loads(env.payload)["predicateType"])
"#;
        let run = |file: &Path, key: &Path| {
            Command::new(&python)
                .args(["-c", CHECK])
                .arg(file)
                .arg(key)
                .output()
                .unwrap()
        };
        let out = run(&envelope, &public);
        assert!(
            out.status.success(),
            "securesystemslib refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("verified by release-1")
                && said.contains("https://slsa.dev/provenance/v1"),
            "{said}"
        );
        let out = run(&envelope, &impostor);
        assert!(
            !out.status.success(),
            "securesystemslib accepted another key"
        );
    }
    let refused = verify(&envelope, &impostor);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("signature check failed"),
        "{}",
        stderr(&refused)
    );
    // One byte of the statement flipped, the signature kept.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut payload = b64.decode(env["payload"].as_str().unwrap()).unwrap();
    payload[10] ^= 1;
    let mut flipped = env.clone();
    flipped["payload"] = b64.encode(&payload).into();
    let flipped_path = t.path().join("flipped.dsse.json");
    fs::write(&flipped_path, serde_json::to_vec(&flipped).unwrap()).unwrap();
    let refused = verify(&flipped_path, &public);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("signature check failed"),
        "{}",
        stderr(&refused)
    );
}

/// A layered image's SBOMs describe the whole image: the base's packages in the first layer,
/// each copied file (with its sha256) in the layer that copied it; the image carries both as
/// OCI referrers; its provenance names the layered image. Both SBOMs pass the reference
/// validators.
#[test]
fn layered_sboms_attribute_packages_and_files_to_layers() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let recipe = motd_layer(&a);
    let store = t.path().join("store");
    let realise = |output: &str, link: &Path| {
        json(&rbuild(&[
            "realise",
            &format!("{}{output}", recipe.display()),
            "--store",
            store.to_str().unwrap(),
            "--mirror",
            &a.mirror_url(),
            "--json",
            "-o",
            link.to_str().unwrap(),
        ]))
    };
    let image = realise("", &t.path().join("image"));
    let (spdx_path, cdx_path) = (
        t.path().join("app.spdx.json"),
        t.path().join("app.cdx.json"),
    );
    realise("^spdx", &spdx_path);
    realise("^cyclonedx", &cdx_path);
    let prov = realise("^provenance", &t.path().join("app.provenance.json"));
    let prov: serde_json::Value =
        serde_json::from_slice(&fs::read(prov["output"].as_str().unwrap()).unwrap()).unwrap();
    let manifest = manifest_digest(Path::new(image["output"].as_str().unwrap()));
    assert_eq!(
        format!(
            "sha256:{}",
            prov["subject"][0]["digest"]["sha256"].as_str().unwrap()
        ),
        manifest,
        "the provenance is the layered image's"
    );
    assert_eq!(
        prov["predicate"]["buildDefinition"]["externalParameters"]["recipe"]["name"],
        "app"
    );
    // The image carries both SBOMs as referrers.
    assert_sbom_referrers(
        Path::new(image["output"].as_str().unwrap()),
        &fs::read(&spdx_path).unwrap(),
        &fs::read(&cdx_path).unwrap(),
    );

    let motd = sha256_hex(b"hello from a layer\n");
    let spdx: serde_json::Value = serde_json::from_slice(&fs::read(&spdx_path).unwrap()).unwrap();
    let files = spdx["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0]["fileName"], "./etc/motd");
    assert_eq!(files[0]["checksums"][1]["checksumValue"], motd.as_str());
    let rel = spdx["relationships"].as_array().unwrap();
    let contains = |from: &str, to: &str| {
        rel.iter().any(|r| {
            r["spdxElementId"] == from
                && r["relationshipType"] == "CONTAINS"
                && r["relatedSpdxElement"] == to
        })
    };
    let layers: Vec<&serde_json::Value> = spdx["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["primaryPackagePurpose"] == "ARCHIVE")
        .collect();
    assert_eq!(layers.len(), 2, "the base's layer and the app's");
    let (base_layer, app_layer) = (
        layers[0]["SPDXID"].as_str().unwrap(),
        layers[1]["SPDXID"].as_str().unwrap(),
    );
    assert!(contains(app_layer, files[0]["SPDXID"].as_str().unwrap()));
    let packages: Vec<&serde_json::Value> = spdx["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["primaryPackagePurpose"] == "LIBRARY")
        .collect();
    assert!(!packages.is_empty());
    for p in &packages {
        assert!(contains(base_layer, p["SPDXID"].as_str().unwrap()), "{p}");
    }
    let cdx: serde_json::Value = serde_json::from_slice(&fs::read(&cdx_path).unwrap()).unwrap();
    let file = cdx["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "file")
        .unwrap();
    assert_eq!(file["name"], "/etc/motd");
    assert_eq!(file["hashes"][1]["content"], motd.as_str());
    assert_eq!(file["properties"][0]["value"], "2");

    let Some(python) = pytools("layered SBOMs: the reference validators") else {
        return;
    };
    SbomValidators::new(&python).assert_both_valid(&spdx_path, &cdx_path);
}

/// `[image] compression = "zstd"`: the image's layers become zstd blobs (OCI's `tar+zstd`
/// media type), each decompressing to the tar its `diff_id` names, the same bytes from another
/// store; a layered recipe's own layers follow its base; and skopeo reads and decompresses the
/// image. Without the setting, layers are gzip.
#[test]
fn zstd_layers_on_request() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let layers_of = |layout: &Path| -> Vec<(String, Vec<u8>, String)> {
        let m: serde_json::Value =
            serde_json::from_slice(&layout_blob(layout, &manifest_digest(layout))).unwrap();
        let c: serde_json::Value = serde_json::from_slice(&layout_blob(
            layout,
            m["config"]["digest"].as_str().unwrap(),
        ))
        .unwrap();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .zip(c["rootfs"]["diff_ids"].as_array().unwrap())
            .map(|(l, diff)| {
                (
                    l["mediaType"].as_str().unwrap().to_owned(),
                    layout_blob(layout, l["digest"].as_str().unwrap()),
                    diff.as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let gz = realise_json(None, &a, "", &t.path().join("s1"), &[]);
    let gz_layers = layers_of(Path::new(gz["output"].as_str().unwrap()));
    assert_eq!(
        gz_layers[0].0,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(&gz_layers[0].1[..2], &[0x1f, 0x8b], "a gzip blob");

    let text = fs::read_to_string(&a.recipe).unwrap();
    assert!(text.trim_end().ends_with("cmd = [\"/bin/sh\"]"), "{text}");
    fs::write(&a.recipe, format!("{text}compression = \"zstd\"\n")).unwrap();
    let zs = realise_json(None, &a, "", &t.path().join("s1"), &[]);
    let layout = Path::new(zs["output"].as_str().unwrap()).to_owned();
    let zs_layers = layers_of(&layout);
    assert_eq!(zs_layers.len(), 1);
    let (media, blob, diff_id) = &zs_layers[0];
    assert_eq!(media, "application/vnd.oci.image.layer.v1.tar+zstd");
    assert_eq!(&blob[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
    let tar = zstd::decode_all(blob.as_slice()).unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&tar)), *diff_id);
    assert_eq!(
        diff_id, &gz_layers[0].2,
        "the same tar, compressed otherwise"
    );
    let again = realise_json(None, &a, "", &t.path().join("s2"), &[]);
    assert_eq!(
        manifest_digest(Path::new(again["output"].as_str().unwrap())),
        manifest_digest(&layout),
        "reproducible"
    );

    // A layered recipe on it: its own layer is zstd too.
    let app = json(&rbuild(&[
        "realise",
        motd_layer(&a).to_str().unwrap(),
        "--store",
        t.path().join("s1").to_str().unwrap(),
        "--mirror",
        &a.mirror_url(),
        "--json",
    ]));
    let app_layers = layers_of(Path::new(app["output"].as_str().unwrap()));
    assert_eq!(app_layers.len(), 2);
    assert!(app_layers.iter().all(|l| l.0.ends_with("+zstd")));
    let motd = zstd::decode_all(app_layers[1].1.as_slice()).unwrap();
    assert!(
        motd.windows(b"hello from a layer".len())
            .any(|w| w == b"hello from a layer"),
        "the layer holds the copied file"
    );

    if skip::have_tool("zstd_layers_on_request: skopeo inspect", "skopeo", "skopeo") {
        let o = std::process::Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}", layout.display()))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // skopeo decompresses the zstd layer (umoci 0.4.7, Debian 12's, refuses its media type):
    // copied to a directory with --dest-decompress, the layer is the tar of the diff_id.
    if skip::have_tool("zstd_layers_on_request: skopeo copy", "skopeo", "skopeo") {
        let dir = t.path().join("copied");
        let o = std::process::Command::new("skopeo")
            .args(["copy", "-q", "--dest-decompress"])
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("dir:{}", dir.display()))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let hex = diff_id.strip_prefix("sha256:").unwrap();
        assert_eq!(fs::read(dir.join(hex)).unwrap(), tar);
    }
}

/// `realise --timings=DIR`: a trace with one complete event per derivation built, each inside
/// the run and after the inputs it waited for, the critical path a chain ending with the last
/// to finish; and a self-contained page that headless Chromium draws with one bar per
/// derivation built.
#[test]
fn timings_report_draws_one_bar_per_derivation_built() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let dir = t.path().join("timings");
    let arg = format!("--timings={}", dir.display());
    let r = realise_json(None, &a, "", &t.path().join("store"), &[&arg]);
    let built = r["built"].as_u64().unwrap() as usize;
    assert!(built > 10, "{r}");

    let trace: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("trace.json")).unwrap()).unwrap();
    let events: Vec<&serde_json::Value> = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] == "X")
        .collect();
    assert_eq!(events.len(), built);
    let by_hash: BTreeMap<&str, &serde_json::Value> = events
        .iter()
        .map(|e| (e["args"]["hash"].as_str().unwrap(), *e))
        .collect();
    assert_eq!(by_hash.len(), built, "one event per derivation");
    let seconds = r["seconds"].as_f64().unwrap();
    let end = |e: &serde_json::Value| e["ts"].as_i64().unwrap() + e["dur"].as_i64().unwrap();
    for e in &events {
        assert!(e["ts"].as_i64().unwrap() >= 0 && e["dur"].as_i64().unwrap() >= 0);
        assert!(end(e) as f64 <= seconds * 1e6 + 1.0, "{e}");
        assert!(["fetch", "verify", "unpack", "configure", "pack"]
            .contains(&e["cat"].as_str().unwrap()));
    }
    // No two events of one lane overlap.
    let mut lanes: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
    for e in &events {
        lanes
            .entry(e["tid"].as_i64().unwrap())
            .or_default()
            .push((e["ts"].as_i64().unwrap(), end(e)));
    }
    for spans in lanes.values_mut() {
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:?}");
    }
    // The image is built last, on the critical path, with the configure it waited for.
    let critical: Vec<&&serde_json::Value> = events
        .iter()
        .filter(|e| e["args"]["critical"] == true)
        .collect();
    let last = events.iter().max_by_key(|e| end(e)).unwrap();
    assert_eq!(last["name"], "testos-oci");
    assert_eq!(last["args"]["critical"], true);
    assert!(critical.iter().any(|e| e["cat"] == "configure"));
    assert!(critical.iter().any(|e| e["cat"] == "fetch"));

    let page = fs::read_to_string(dir.join("index.html")).unwrap();
    for fetching in ["src=", "href=", "url(", "@import"] {
        assert!(
            !page.contains(fetching),
            "self-contained, but has {fetching}"
        );
    }
    let Some(chromium) = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok())
    else {
        skip(
            "timings_report_draws_one_bar_per_derivation_built: rendering the page",
            "chromium is not installed",
            "install it (Debian/Ubuntu: `apt install chromium`)",
        );
        return;
    };
    let o = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!(
            "--user-data-dir={}",
            t.path().join("chromium").display()
        ))
        .arg("--dump-dom")
        .arg(format!("file://{}", dir.join("index.html").display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bars = dom.matches("<rect class=\"bar ").count();
    assert_eq!(bars, built, "one bar per derivation built:\n{dom}");
    assert!(
        dom.contains(&format!("{built} built, 0 substituted")),
        "{dom}"
    );

    // `--timings` with no directory writes `./rbuild-timings/` (here, all reused: no bars).
    let cwd = t.path().join("cwd");
    fs::create_dir_all(&cwd).unwrap();
    let o = Command::new(rbuild_bin())
        .args(["realise", a.recipe.to_str().unwrap(), "--store"])
        .arg(t.path().join("store"))
        .args(["--mirror", &a.mirror_url(), "--timings"])
        .current_dir(&cwd)
        .env_remove("RBUILD_STORE")
        .env_remove("RBUILD_MIRROR")
        .output()
        .unwrap();
    ok(&o);
    let trace: serde_json::Value =
        serde_json::from_slice(&fs::read(cwd.join("rbuild-timings/trace.json")).unwrap()).unwrap();
    assert!(
        trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["ph"] != "X"),
        "{trace}"
    );
    let page = fs::read_to_string(cwd.join("rbuild-timings/index.html")).unwrap();
    assert!(
        // The walk stops at the target, valid in the store.
        page.contains("\"bars\":[]") && page.contains("\"reused\":1,"),
        "{page}"
    );
}

/// "Why did this rebuild?": `realise --explain` gives a reason for each derivation it builds —
/// never built, the first field that differs from last time (down to the JSON path in a plan),
/// or that it only follows from its inputs — and `rbuild diff` compares the graph behind an
/// `-o` link with a recipe, the causes named and what only follows from them collapsed.
#[test]
fn explain_and_diff_say_why_a_layer_rebuilt() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let store = t.path().join("store");
    let recipe = motd_layer(&a);
    let app_dir = recipe.parent().unwrap().to_owned();
    let realise_explained = |extra: &[&str]| {
        let mirror = a.mirror_url();
        let mut args = vec![
            "realise",
            recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--mirror",
            &mirror,
            "--json",
            "--explain",
        ];
        args.extend_from_slice(extra);
        json(&rbuild(&args))
    };
    let realise = |link: &str| realise_explained(&["-o", t.path().join(link).to_str().unwrap()]);
    let first = realise("before");
    let reasons = |r: &serde_json::Value| -> BTreeMap<String, String> {
        r["explain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_owned(),
                    e["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let r1 = reasons(&first);
    assert_eq!(r1.len() as u64, first["built"].as_u64().unwrap(), "{first}");
    assert!(r1.values().all(|r| r.starts_with("never built")), "{r1:?}");

    // The copied file's bytes change: the layer's plan carries them, the SBOMs their digests;
    // the layer, the manifest and the image only follow.
    fs::write(app_dir.join("files/motd"), "hello again\n").unwrap();
    let second = realise("after");
    let r2 = reasons(&second);
    assert_eq!(second["built"], 6, "{second}");
    assert_eq!(
        r2.keys().collect::<Vec<_>>(),
        [
            "app-cyclonedx",
            "app-layer1",
            "app-layer1-tree",
            "app-oci",
            "app-oci-manifest",
            "app-spdx"
        ]
    );
    assert!(
        r2["app-layer1-tree"].starts_with("args[0].copy[0].content: \"68656c6c6f2066726f6d"),
        "{r2:?}"
    );
    for sbom in ["app-spdx", "app-cyclonedx"] {
        assert!(r2[sbom].starts_with("args[0].files[0].sha1: "), "{r2:?}");
    }
    assert_eq!(
        r2["app-layer1"],
        "only follows from its inputs: app-layer1-tree changed"
    );
    let oci = &r2["app-oci"];
    assert!(
        oci.starts_with("only follows from its inputs: ")
            && ["app-layer1", "app-spdx", "app-cyclonedx"]
                .iter()
                .all(|i| oci.contains(i)),
        "{oci}"
    );
    assert!(r2["app-oci-manifest"].starts_with("only follows"), "{r2:?}");

    // diff: the -o link of the first realise against the recipe as it is now.
    let diff = |x: &Path, extra: &[&str]| {
        let mut args = vec![
            "diff",
            x.to_str().unwrap(),
            recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--offline",
        ];
        args.extend_from_slice(extra);
        rbuild(&args)
    };
    let o = diff(&t.path().join("before"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains("app-layer1-tree (") && text.contains("  args[0].copy[0].content: "),
        "{text}"
    );
    assert!(
        text.contains("and 3 derivations that only follow from these: "),
        "{text}"
    );
    let o = diff(&t.path().join("before"), &["--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut causes: Vec<&str> = j["differences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["follows"] == false)
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    causes.sort();
    assert_eq!(
        causes,
        ["app-cyclonedx", "app-layer1-tree", "app-spdx"],
        "{j}"
    );
    // The same graph on both sides: no difference, exit 0.
    let o = diff(&t.path().join("after"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("are the same derivation"));

    // With a substituter: each derivation built says why the cache did not give it.
    fs::write(app_dir.join("files/motd"), "hello once more\n").unwrap();
    let empty = t.path().join("empty-cache");
    fs::create_dir_all(&empty).unwrap();
    let (_, public) = keypair(t.path(), "alice-2026");
    let cache = format!("file://{}", empty.display());
    let third = realise_explained(&["--substituter", &cache, "--trusted-key", &public]);
    let explained = third["explain"].as_array().unwrap();
    assert_eq!(explained.len(), 6, "{third}");
    for e in explained {
        assert_eq!(
            e["not_substituted"].as_str(),
            Some(format!("{cache}: no entry").as_str()),
            "{third}"
        );
    }
    // Without substituters, nothing is said of them.
    assert!(
        first["explain"][0].get("not_substituted").is_none(),
        "{first}"
    );
}

/// A tree that would not fit in the sandbox's memory with room to spare is built in `$out`
/// instead, and comes out the same.
#[test]
fn configure_builds_on_disk_when_memory_is_short() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(t.path());
    lock(&a);
    let configure_log = |store: &Path| -> String {
        fs::read_dir(store.join("log"))
            .unwrap()
            .flatten()
            .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
            .find(|l| l.contains("configure: "))
            .expect("configure's log")
    };
    let mem_store = t.path().join("mem");
    let mem = realise_json(None, &a, "", &mem_store, &[]);
    let available_gib = fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        >> 20;
    if available_gib >= 1 {
        // With a GiB free, the small test tree is built in memory.
        assert!(
            !configure_log(&mem_store).contains("building in $out"),
            "{}",
            configure_log(&mem_store)
        );
    }
    // 64 MB may be written, so the sandbox's tmpfs is 64 MB: less than configure's margin.
    let disk_store = t.path().join("disk");
    let disk = realise_json(
        None,
        &a,
        "",
        &disk_store,
        &["--max-build-bytes", "64000000"],
    );
    let log = configure_log(&disk_store);
    assert!(
        log.contains("MiB free in /tmp") && log.contains("building in $out"),
        "{log}"
    );
    let index = |r: &serde_json::Value| {
        fs::read(Path::new(r["output"].as_str().unwrap()).join("index.json")).unwrap()
    };
    assert_eq!(index(&mem), index(&disk), "the same image either way");
}
