//! End-to-end: the real `debian-bullseye` from the host's Debian mirror (its apt configuration,
//! or `RBUILD_MIRROR`), as root and as an unprivileged user with a subordinate id range, checked
//! with real peers (podman/skopeo/umoci). Without a mirror, a test user or a peer, the part that
//! needs it is skipped the shared way (`common::skip`: loudly, summarised by `tests/run.sh`, and a
//! failure under CI).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::real::*;
use common::*;

#[test]
fn debian_bullseye_as_root_and_unprivileged() {
    let Some(mirror) = mirror("debian_bullseye_as_root_and_unprivileged") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let env = [("RBUILD_MIRROR", mirror.as_str())];

    // Root, cold.
    let s1 = t.path().join("root-store");
    let result = s1.join("result");
    let started = Instant::now();
    let r = json(&rbuild_as(
        None,
        &[
            "realise",
            "debian-bullseye",
            "--store",
            s1.to_str().unwrap(),
            "-o",
            result.to_str().unwrap(),
            "--json",
        ],
        &env,
    ));
    let cold = started.elapsed();
    // Everything: 166 fetches, the two verifications, configure and the packing.
    assert!(r["built"].as_u64().unwrap() > 170, "{r}");
    let digest = manifest_digest(&result);

    // Warm, offline, without a network: nothing built, and far faster.
    let started = Instant::now();
    let o = Command::new("unshare")
        .args([
            "-n",
            rbuild_bin().to_str().unwrap(),
            "realise",
            "debian-bullseye",
            "--store",
            s1.to_str().unwrap(),
            "--offline",
            "--json",
        ])
        .output()
        .unwrap();
    let warm = started.elapsed();
    let w = json(&o);
    assert_eq!(w["built"], 0);
    assert_eq!(w["output"], r["output"]);
    eprintln!(
        "cold realise {cold:?}, warm offline realise {warm:?} ({:.0}x)",
        cold.as_secs_f64() / warm.as_secs_f64()
    );

    // The plain root filesystem tar.
    let tar = t.path().join("chroot.tar");
    ok(&rbuild_as(
        None,
        &[
            "realise",
            "debian-bullseye^rootfs",
            "--store",
            s1.to_str().unwrap(),
            "-o",
            tar.to_str().unwrap(),
            "--offline",
        ],
        &env,
    ));
    let listing = sh(Command::new("tar").arg("-tvf").arg(&tar));
    assert!(
        listing.contains("usr/sbin/telinit -> /bin/systemctl"),
        "telinit symlink"
    );
    assert!(
        listing.contains("etc/localtime -> /usr/share/zoneinfo/Etc/UTC"),
        "localtime symlink"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwsr-xr-x 0/0") && l.ends_with("usr/bin/su")),
        "su is setuid root in the tar"
    );

    sboms_of_bullseye(&s1, &tar, &env, t.path());

    // Every derivation of the root filesystem, built again into scratch, reproduces.
    let started = Instant::now();
    let report = ok(&rbuild_as(
        None,
        &[
            "check",
            "debian-bullseye^rootfs",
            "--store",
            s1.to_str().unwrap(),
            "--offline",
        ],
        &env,
    ));
    assert!(
        report.contains("reproduce their registered outputs") && !report.contains("does not"),
        "{report}"
    );
    eprintln!(
        "check of debian-bullseye^rootfs: {:?}: {report}",
        started.elapsed()
    );

    // The layout carries the SBOMs as referrers, and stays what peers read: skopeo takes its
    // one image without a tag, umoci unpacks it by its tag.
    assert_sbom_referrers(
        &result,
        &std::fs::read(t.path().join("bullseye.spdx.json")).unwrap(),
        &std::fs::read(t.path().join("bullseye.cdx.json")).unwrap(),
    );
    if have(
        "debian_bullseye_as_root_and_unprivileged: skopeo inspect",
        "skopeo",
    ) {
        let inspected: serde_json::Value = serde_json::from_str(&sh(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}", result.display()))))
        .unwrap();
        assert_eq!(inspected["Digest"], digest.as_str());
    }
    if have(
        "debian_bullseye_as_root_and_unprivileged: umoci unpack",
        "umoci",
    ) {
        let bundle = t.path().join("bundle");
        sh(Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:debian-bullseye", result.display()))
            .arg(&bundle));
        let version = std::fs::read_to_string(bundle.join("rootfs/etc/debian_version")).unwrap();
        assert!(version.starts_with("11."), "{version}");
        // umoci's rootless unpack leaves directories it cannot remove without write permission.
        sh(Command::new("chmod").arg("-R").arg("u+rwX").arg(&bundle));
        std::fs::remove_dir_all(&bundle).unwrap();
    }

    // An unprivileged user, another store, README's quick start as written (the store and the
    // mirror given through RBUILD_STORE and RBUILD_MIRROR): the same image digest, and rootless
    // podman runs it.
    let Some(user) =
        require_test_user("debian_bullseye_as_root_and_unprivileged: the unprivileged part")
    else {
        return;
    };
    let home = user_dir(t.path(), "alice", Some(&user));
    let s2 = home.join("store");
    let s2_env = s2.to_string_lossy().into_owned();
    let a_env = [
        ("RBUILD_STORE", s2_env.as_str()),
        ("RBUILD_MIRROR", mirror.as_str()),
    ];
    let quick_start = readme::command("", "rbuild realise");
    assert_eq!(quick_start, "rbuild realise debian-bullseye -o result");
    let printed = readme::run_ok(Some(&user), &home, &quick_start, &a_env);
    let user_result = home.join("result");
    assert_eq!(
        std::fs::canonicalize(&user_result).unwrap(),
        Path::new(printed.trim()),
        "the output path is printed and linked"
    );
    assert_eq!(manifest_digest(&user_result), digest, "same bits as root");

    // README's cache section as developer A: a key, a realise that pushes to a shared
    // directory (everything is in A's store already: the closure is pushed anyway), and a
    // `cache push` to a REAPI cache — BuildGrid on loopback standing in for cache.internal:8980.
    let shared = user_dir(t.path(), "shared", Some(&user));
    let bg = buildgrid();
    let placeholders = |line: &str| {
        line.replace(
            "file:///shared/rbuild-cache",
            &format!("file://{}", shared.display()),
        )
        .replace("grpc://cache.internal:8980", &bg.url)
    };
    let lines = readme::commands("Sharing a cache");
    let [keygen, push_realise, cache_push, substitute]: [String; 4] = lines
        .iter()
        .filter(|l| l.starts_with("rbuild "))
        .cloned()
        .collect::<Vec<_>>()
        .try_into()
        .unwrap_or_else(|l| panic!("README's cache block changed: {l:?}"));
    assert!(keygen.starts_with("rbuild key generate"), "{keygen}");
    readme::run_ok(Some(&user), &home, &keygen, &a_env);
    for line in [&push_realise, &cache_push] {
        let started = Instant::now();
        let o = readme::run(Some(&user), &home, &placeholders(line), &a_env);
        assert!(o.status.success(), "`{line}`: {}", stderr(&o));
        let e = stderr(&o);
        eprintln!(
            "developer A: `{line}` in {:?}: {}",
            started.elapsed(),
            e.trim()
        );
        assert!(
            e.contains("pushed") && e.contains("outputs"),
            "`{line}`: {e}"
        );
    }

    // Developer B (a second unprivileged user, or root when there is none), with empty stores and
    // a dead mirror, substitutes the image with README's command (`--json` appended) from each
    // cache instead of building; with a key B does not trust, nothing from the cache is used.
    let dev_b = std::env::var("RBUILD_TEST_USER2")
        .ok()
        .filter(|u| !u.is_empty() && test_user().is_some());
    if dev_b.is_none() {
        skip(
            "debian_bullseye_as_root_and_unprivileged: developer B as a second user",
            "RBUILD_TEST_USER2 is not set (developer B is root instead)",
            "set RBUILD_TEST_USER2 to a second user with a subordinate id range \
             (.ci/run creates rbuild-test2)",
        );
    }
    let b_home = user_dir(t.path(), "bob", dev_b.as_deref());
    std::fs::copy(home.join("alice.pub"), b_home.join("alice.pub")).unwrap();
    ok(&rbuild_as(
        dev_b.as_deref(),
        &[
            "key",
            "generate",
            "dev-b",
            b_home.join("b.sec").to_str().unwrap(),
            b_home.join("b.pub").to_str().unwrap(),
        ],
        &[],
    ));
    let caches = [format!("file://{}", shared.display()), bg.url.clone()];
    for (i, cache) in caches.iter().enumerate() {
        let store = b_home.join(format!("store-{i}"));
        let store_env = store.to_string_lossy().into_owned();
        let b_env = [
            ("RBUILD_STORE", store_env.as_str()),
            ("RBUILD_MIRROR", "http://127.0.0.1:9/dead"),
        ];
        let line = format!(
            "{} --json",
            substitute.replace("grpc://cache.internal:8980", cache)
        );
        let o = readme::run(
            dev_b.as_deref(),
            &b_home,
            &line.replace("alice.pub", "b.pub"),
            &b_env,
        );
        assert!(!o.status.success(), "untrusted cache used: {}", stderr(&o));
        assert!(
            stderr(&o).contains("no valid signature by a trusted key"),
            "{}",
            stderr(&o)
        );
        let started = Instant::now();
        let sub: serde_json::Value =
            serde_json::from_str(readme::run_ok(dev_b.as_deref(), &b_home, &line, &b_env).trim())
                .unwrap();
        eprintln!(
            "developer B substituted from {cache} in {:?}",
            started.elapsed()
        );
        assert_eq!(
            (sub["built"].as_u64(), sub["substituted"].as_u64()),
            (Some(0), Some(1)),
            "{cache}: {sub}"
        );
        assert_eq!(
            manifest_digest(Path::new(sub["output"].as_str().unwrap())),
            digest,
            "{cache}"
        );
    }

    // README's podman line, with a command appended, under a pseudo-terminal (it asks for one
    // with -it) and this host's podman settings (runc, no network) in CONTAINERS_CONF.
    if !have(
        "debian_bullseye_as_root_and_unprivileged: running the image with podman",
        "podman",
    ) {
        return;
    }
    let podman = readme::command("", "podman run");
    assert_eq!(podman, "podman run --rm -it oci:result");
    let script = "cat /etc/debian_version; dpkg-query -W -f '${binary:Package}\\n' | wc -l; dpkg --audit; echo audit-done; readlink /usr/sbin/telinit; readlink /etc/localtime";
    let out = run_podman(
        &user,
        &home,
        &format!("{podman} /bin/sh -c \"{}\"", script.replace('$', "\\$")),
    );
    let lines: Vec<&str> = lines_from(&out, "11.");
    assert!(!lines.is_empty(), "no Debian 11 version printed: {out}");
    assert_eq!(lines[1], "164", "{out}");
    assert_eq!(lines[2], "audit-done", "dpkg --audit is empty: {out}");
    assert_eq!(lines[3], "/bin/systemctl");
    assert_eq!(lines[4], "/usr/share/zoneinfo/Etc/UTC");
}

/// The example layered recipe (curl, a copied file, `run` commands, config) on the real base,
/// realised with README's command as an unprivileged user: the base's layers are shared, podman
/// runs it as `app` in `/home/app` and curl works; a `run` layer added afterwards is locked
/// offline and cannot reach a listener on the host's loopback; and after a `gc`, editing the
/// last layer rebuilds six derivations (the layer's tree and diff, the image, its manifest and
/// its two SBOMs) and fetches nothing.
#[test]
fn layered_example_on_bullseye() {
    let Some(mirror) = mirror("layered_example_on_bullseye") else {
        return;
    };
    let user = require_test_user("layered_example_on_bullseye: as an unprivileged user");
    let t = tempfile::tempdir().unwrap();
    let work = user_dir(t.path(), "work", user.as_deref());
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/examples");
    let app = work.join("app");
    sh(Command::new("cp")
        .arg("-r")
        .arg(examples.join("app"))
        .arg(&app));
    if let Some(u) = &user {
        sh(Command::new("chown").arg("-R").arg(u).arg(&work));
    }
    let store = work.join("store");
    let store_env = store.to_string_lossy().into_owned();
    let env = [
        ("RBUILD_STORE", store_env.as_str()),
        ("RBUILD_MIRROR", mirror.as_str()),
    ];
    let recipe = app.join("app.toml");
    let result = app.join("result");
    // README's command, as written, in the example's directory.
    let line = "rbuild realise app.toml -o result";
    assert!(readme::mentions(&format!("`{line}`")));
    readme::run_ok(user.as_deref(), &app, line, &env);
    let realise = |args: &[&str]| {
        let mut a = vec!["realise", recipe.to_str().unwrap(), "--json"];
        a.extend_from_slice(args);
        rbuild_as(user.as_deref(), &a, &env)
    };
    let base = json(&rbuild_as(
        user.as_deref(),
        &["realise", "debian-bullseye", "--json", "--offline"],
        &env,
    ));
    assert!(
        base["built"].as_u64().unwrap() <= 4,
        "at most the base's own image, its manifest and two SBOMs: {base}"
    );
    let manifest = |l: &Path| -> serde_json::Value {
        let d = manifest_digest(l);
        serde_json::from_slice(
            &std::fs::read(
                l.join("blobs/sha256")
                    .join(d.strip_prefix("sha256:").unwrap()),
            )
            .unwrap(),
        )
        .unwrap()
    };
    let (bm, am) = (
        manifest(Path::new(base["output"].as_str().unwrap())),
        manifest(&result),
    );
    assert_eq!(
        am["layers"][0], bm["layers"][0],
        "leading layer is debian-bullseye's"
    );
    assert_eq!(am["layers"].as_array().unwrap().len(), 3);

    if let (Some(u), true) = (
        &user,
        user.is_some()
            && have(
                "layered_example_on_bullseye: running the image with podman",
                "podman",
            ),
    ) {
        let out = run_podman(
            u,
            &app,
            "podman run --rm oci:result 'id -un; pwd; cat hello; curl --version | head -n1'",
        );
        let lines = lines_from(&out, "app");
        assert!(lines.len() >= 4, "{out}");
        assert_eq!(&lines[..3], ["app", "/home/app", "hi"], "{out}");
        assert!(lines[3].starts_with("curl 7."), "{out}");
    }

    // A `run` layer added to the recipe: locked offline (it needs nothing pinned), built as
    // that layer's tree, its diff and the image (with its manifest and SBOMs), and without a network: the host's loopback
    // listener is not reached.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let text = std::fs::read_to_string(&recipe).unwrap();
    let probe = |word: &str| {
        format!("\n[[layers]]\nrun = [\"bash -c '(echo x > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo reached > /net-probe || echo {word} > /net-probe'\"]\n")
    };
    std::fs::write(&recipe, format!("{text}{}", probe("unreachable"))).unwrap();
    let o = realise(&["--offline"]);
    let added = json(&o);
    assert!(
        stderr(&o).contains("layer 3 is new"),
        "the re-lock is named: {}",
        stderr(&o)
    );
    assert_eq!(added["built"], 6, "{added}");
    let tree = json(&rbuild_as(
        user.as_deref(),
        &[
            "realise",
            &format!("{}^tree", recipe.display()),
            "--json",
            "--offline",
        ],
        &env,
    ));
    let net =
        std::fs::read_to_string(Path::new(tree["output"].as_str().unwrap()).join("net-probe"))
            .unwrap();
    assert_eq!(net.trim(), "unreachable");
    assert!(listener.accept().is_err(), "no connection arrived");

    // gc (keeping what the `result` root was built from), then an edit of the last layer:
    // the layer's tree and diff, the image, its manifest and two SBOMs, offline.
    let gc = rbuild_as(user.as_deref(), &["gc"], &env);
    ok(&gc);
    eprintln!("{}", stderr(&gc).trim());
    std::fs::write(&recipe, format!("{text}{}", probe("no-network"))).unwrap();
    let edited = json(&realise(&["--offline", "-o", result.to_str().unwrap()]));
    assert_eq!(edited["built"], 6, "{edited}");
    assert_ne!(edited["output"], added["output"]);
}

/// The SBOMs of the image in `store`: valid by the reference tools (spdx-tools, CycloneDX's
/// strict schema, the NTIA minimum elements), listing every locked package with the `.deb`'s
/// sha256 the lock pins and its purl, and carrying a licence for every package whose copyright
/// file (in `rootfs`, the image's tar) is machine-readable — about 60 % of bullseye's.
fn sboms_of_bullseye(store: &Path, rootfs: &Path, env: &[(&str, &str)], dir: &Path) {
    let realise = |output: &str, link: &Path| {
        ok(&rbuild_as(
            None,
            &[
                "realise",
                &format!("debian-bullseye^{output}"),
                "--store",
                store.to_str().unwrap(),
                "--offline",
                "-o",
                link.to_str().unwrap(),
            ],
            env,
        ))
    };
    let (spdx_path, cdx_path) = (
        dir.join("bullseye.spdx.json"),
        dir.join("bullseye.cdx.json"),
    );
    realise("spdx", &spdx_path);
    realise("cyclonedx", &cdx_path);
    let spdx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spdx_path).unwrap()).unwrap();
    let cdx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cdx_path).unwrap()).unwrap();

    let lock: rbuild_recipes::recipe::Lock =
        toml::from_str(include_str!("../recipes/debian-bullseye.lock")).unwrap();
    let pinned: std::collections::BTreeMap<&str, &str> = lock
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.sha256.as_str()))
        .collect();
    let packages: Vec<&serde_json::Value> = spdx["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["primaryPackagePurpose"] == "LIBRARY")
        .collect();
    let listed: std::collections::BTreeMap<&str, &str> = packages
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["checksums"][0]["checksumValue"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed, pinned,
        "the SPDX packages and their .deb sha256 are the lock's"
    );
    let components = cdx["components"].as_array().unwrap();
    assert_eq!(components.len(), pinned.len());
    for c in components {
        assert_eq!(
            c["hashes"][0]["content"].as_str(),
            pinned.get(c["name"].as_str().unwrap()).copied(),
            "{c}"
        );
        let purl = c["purl"].as_str().unwrap();
        assert!(
            // Names are percent-encoded as versions are (`libstdc++6` is `libstdc%2B%2B6`).
            purl.starts_with(&format!(
                "pkg:deb/debian/{}@",
                c["name"].as_str().unwrap().replace('+', "%2B")
            )) && (purl.ends_with("?arch=amd64&distro=debian-11")
                || purl.ends_with("?arch=all&distro=debian-11")),
            "{purl}"
        );
    }

    // Licences: every package whose own copyright file is machine-readable has one.
    let mut dep5 = std::collections::BTreeSet::new();
    let file = std::fs::File::open(rootfs).unwrap();
    let mut archive = tar::Archive::new(file);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let Some(pkg) = path
            .strip_prefix("usr/share/doc/")
            .and_then(|r| r.strip_suffix("/copyright"))
        else {
            continue;
        };
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let mut text = String::new();
        use std::io::Read;
        let _ = e.read_to_string(&mut text);
        if text.starts_with("Format:") {
            dep5.insert(pkg.to_owned());
        }
    }
    let licensed: std::collections::BTreeSet<String> = packages
        .iter()
        .filter(|p| p["licenseDeclared"] != "NOASSERTION")
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<&String> = dep5
        .iter()
        .filter(|p| pinned.contains_key(p.as_str()) && !licensed.contains(*p))
        .collect();
    assert!(
        missing.is_empty(),
        "machine-readable copyright but no licence: {missing:?}"
    );
    let share = 100 * licensed.len() / packages.len();
    eprintln!(
        "bullseye SBOM: {} packages, {} with a licence ({share} %), {} DEP-5 copyright files",
        packages.len(),
        licensed.len(),
        dep5.len()
    );
    assert!(share >= 50, "licence coverage fell to {share} %");

    let Some(python) = pytools("bullseye SBOMs: the reference validators") else {
        return;
    };
    let check = SbomValidators::new(&python);
    check.assert_both_valid(&spdx_path, &cdx_path);
    let (valid, said) = check.ntia(&spdx_path);
    assert!(valid, "ntia-checker: {said}");
    // The validators can fail: the same documents with a required field gone are refused.
    let mut broken = cdx.clone();
    broken.as_object_mut().unwrap().remove("bomFormat");
    let broken_path = dir.join("broken.cdx.json");
    std::fs::write(&broken_path, serde_json::to_vec(&broken).unwrap()).unwrap();
    assert!(!check.cyclonedx(&broken_path).0);
    let mut broken = spdx.clone();
    broken.as_object_mut().unwrap().remove("spdxVersion");
    let broken_path = dir.join("broken.spdx.json");
    std::fs::write(&broken_path, serde_json::to_vec(&broken).unwrap()).unwrap();
    let (valid, said) = check.spdx(&broken_path);
    assert!(!valid, "pyspdxtools accepted a broken document: {said}");
}
