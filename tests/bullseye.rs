//! End-to-end: the real `debian-bullseye` from the host's Debian mirror (its apt configuration,
//! or `RBUILD_MIRROR`), as root and as an unprivileged user with a subordinate id range, checked
//! with real peers (podman/skopeo/umoci). Without a mirror, a test user or a peer, the part that
//! needs it is skipped the shared way (`common::skip`: loudly, summarised by `tests/run.sh`, and a
//! failure under CI).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;

/// The host's Debian mirror, or `None` after skipping `test` the shared way.
fn mirror(test: &str) -> Option<String> {
    let m = rbuild_recipes::mirror::choose(None);
    if m.is_none() {
        skip(
            test,
            "no Debian mirror: none in the host's apt configuration and RBUILD_MIRROR unset",
            "set RBUILD_MIRROR to a Debian mirror's URL, or configure one for apt",
        );
    }
    m
}

fn manifest_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

/// Whether `tool` (from the Debian package of the same name) is installed; if not, `what` is
/// skipped the shared way.
fn have(what: &str, tool: &str) -> bool {
    skip::have_tool(what, tool, tool)
}

fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

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
    assert!(r["built"].as_u64().unwrap() > 200, "{r}");
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

    if have(
        "debian_bullseye_as_root_and_unprivileged: skopeo inspect",
        "skopeo",
    ) {
        sh(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}", result.display())));
    }

    // An unprivileged user, another store: the same image digest, and rootless podman runs it.
    let Some(user) =
        require_test_user("debian_bullseye_as_root_and_unprivileged: the unprivileged part")
    else {
        return;
    };
    let s2 = user_dir(t.path(), "user-store", Some(&user));
    let user_result = s2.join("result");
    let u = json(&rbuild_as(
        Some(&user),
        &[
            "realise",
            "debian-bullseye",
            "--store",
            s2.to_str().unwrap(),
            "-o",
            user_result.to_str().unwrap(),
            "--json",
        ],
        &env,
    ));
    assert!(u["built"].as_u64().unwrap() > 200);
    assert_eq!(manifest_digest(&user_result), digest, "same bits as root");

    // Developer A (the user) pushes the closure to a shared directory and to BuildGrid (REAPI).
    // Developer B (a second unprivileged user, or root when there is none), with empty stores and
    // a dead mirror, substitutes the image from each instead of building; with a key B does not
    // trust, nothing from the cache is used.
    let keys = user_dir(t.path(), "keys", Some(&user));
    let (sec, public) = (keys.join("a.sec"), keys.join("a.pub"));
    let shared = user_dir(t.path(), "shared", Some(&user));
    let bg = buildgrid();
    let caches = [format!("file://{}", shared.display()), bg.url.clone()];
    ok(&rbuild_as(
        Some(&user),
        &[
            "key",
            "generate",
            "dev-a",
            sec.to_str().unwrap(),
            public.to_str().unwrap(),
        ],
        &env,
    ));
    for cache in &caches {
        let started = Instant::now();
        let o = rbuild_as(
            Some(&user),
            &[
                "cache",
                "push",
                "debian-bullseye",
                "--store",
                s2.to_str().unwrap(),
                "--to",
                cache,
                "--secret-key",
                sec.to_str().unwrap(),
            ],
            &env,
        );
        ok(&o);
        eprintln!(
            "developer A pushed to {cache} in {:?}: {}",
            started.elapsed(),
            stderr(&o).trim()
        );
    }
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
    let b_keys = user_dir(t.path(), "b-keys", dev_b.as_deref());
    let b_own = b_keys.join("b.pub");
    ok(&rbuild_as(
        dev_b.as_deref(),
        &[
            "key",
            "generate",
            "dev-b",
            b_keys.join("b.sec").to_str().unwrap(),
            b_own.to_str().unwrap(),
        ],
        &[],
    ));
    for (i, cache) in caches.iter().enumerate() {
        let store = user_dir(t.path(), &format!("b-store-{i}"), dev_b.as_deref());
        let realise_b = |key: &Path| {
            rbuild_as(
                dev_b.as_deref(),
                &[
                    "realise",
                    "debian-bullseye",
                    "--store",
                    store.to_str().unwrap(),
                    "--json",
                    "--mirror",
                    "http://127.0.0.1:9/dead",
                    "--substituter",
                    cache,
                    "--trusted-key",
                    key.to_str().unwrap(),
                ],
                &[],
            )
        };
        let o = realise_b(&b_own);
        assert!(!o.status.success(), "untrusted cache used: {}", stderr(&o));
        assert!(
            stderr(&o).contains("no valid signature by a trusted key"),
            "{}",
            stderr(&o)
        );
        let started = Instant::now();
        let sub = json(&realise_b(&public));
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
    if !have(
        "debian_bullseye_as_root_and_unprivileged: running the image with podman",
        "podman",
    ) {
        return;
    }
    let script = "cat /etc/debian_version; dpkg-query -W -f '${binary:Package}\\n' | wc -l; dpkg --audit; echo audit-done; readlink /usr/sbin/telinit; readlink /etc/localtime";
    let xdg = format!("/tmp/rbuild-test-xdg-{user}");
    // podman names an image pulled from an OCI layout after its path, which must be lowercase.
    let link = std::env::temp_dir().join(format!("rbuild-podman-{}", std::process::id()));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&user_result, &link).unwrap();
    let podman = format!(
        "mkdir -p {xdg} && chmod 700 {xdg} && cd && XDG_RUNTIME_DIR={xdg} podman run --rm --runtime runc --network none oci:{} /bin/sh -c \"$0\"",
        link.display()
    );
    let out = sh(Command::new("runuser").args(["-u", &user, "--", "sh", "-c", &podman, script]));
    let _ = std::fs::remove_file(&link);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("11."), "{out}");
    assert_eq!(lines[1].trim(), "164", "{out}");
    assert_eq!(lines[2], "audit-done", "dpkg --audit is empty: {out}");
    assert_eq!(lines[3], "/bin/systemctl");
    assert_eq!(lines[4], "/usr/share/zoneinfo/Etc/UTC");
}

/// The example layered recipe (curl, a copied file, `run` commands, config) on the real base,
/// as an unprivileged user: the base's layers are shared, podman runs it as `app` in
/// `/home/app`, curl works, a `run` step cannot reach a listener on the host's loopback, and
/// editing the last layer rebuilds at most three derivations.
#[test]
fn layered_example_on_bullseye() {
    let Some(mirror) = mirror("layered_example_on_bullseye") else {
        return;
    };
    let user = require_test_user("layered_example_on_bullseye: as an unprivileged user");
    let t = tempfile::tempdir().unwrap();
    let env = [("RBUILD_MIRROR", mirror.as_str())];
    let work = user_dir(t.path(), "work", user.as_deref());
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/examples");
    let app = work.join("app");
    sh(Command::new("cp")
        .arg("-r")
        .arg(examples.join("app"))
        .arg(&app));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let recipe = app.join("app.toml");
    let text = std::fs::read_to_string(&recipe).unwrap();
    let probe = format!("(echo x > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo reached > /net-probe || echo unreachable > /net-probe");
    let with_probe = text.replace(
        "run = [\"useradd --create-home app\", \"echo hi > /home/app/hello\"]",
        &format!("run = [\"useradd --create-home app\", \"echo hi > /home/app/hello\", \"bash -c '{probe}'\"]"),
    );
    assert_ne!(with_probe, text);
    std::fs::write(&recipe, &with_probe).unwrap();
    if let Some(u) = &user {
        sh(Command::new("chown").arg("-R").arg(u).arg(&work));
    }
    let store = work.join("store");
    let result = work.join("result");
    let realise = |out: &Path| {
        json(&rbuild_as(
            user.as_deref(),
            &[
                "realise",
                recipe.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--json",
            ],
            &env,
        ))
    };
    let r = realise(&result);
    assert!(r["built"].as_u64().unwrap() > 200, "{r}");
    let base = json(&rbuild_as(
        user.as_deref(),
        &[
            "realise",
            "debian-bullseye",
            "--store",
            store.to_str().unwrap(),
            "--json",
            "--offline",
        ],
        &env,
    ));
    assert!(
        base["built"].as_u64().unwrap() <= 1,
        "at most the base's own image manifest: {base}"
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
    // The run step had no network: the host's loopback listener was not reached.
    let tree = json(&rbuild_as(
        user.as_deref(),
        &[
            "realise",
            &format!("{}^tree", recipe.display()),
            "--store",
            store.to_str().unwrap(),
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

    if let (Some(u), true) = (
        &user,
        user.is_some()
            && have(
                "layered_example_on_bullseye: running the image with podman",
                "podman",
            ),
    ) {
        let xdg = format!("/tmp/rbuild-test-xdg-{u}");
        let link = std::env::temp_dir().join(format!("rbuild-podman-app-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&result, &link).unwrap();
        let cmd = format!(
            "mkdir -p {xdg} && chmod 700 {xdg} && cd && XDG_RUNTIME_DIR={xdg} podman run --rm --runtime runc --network none oci:{} 'id -un; pwd; cat hello; curl --version | head -n1'",
            link.display()
        );
        let out = sh(Command::new("runuser").args(["-u", u, "--", "sh", "-c", &cmd]));
        let _ = std::fs::remove_file(&link);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(&lines[..3], ["app", "/home/app", "hi"], "{out}");
        assert!(lines[3].starts_with("curl 7."), "{out}");
    }

    // Editing the last layer's commands rebuilds that layer and the image only.
    std::fs::write(&recipe, with_probe.replace("echo hi >", "echo hello >")).unwrap();
    let edited = realise(&work.join("result2"));
    assert!(edited["built"].as_u64().unwrap() <= 3, "{edited}");
    assert_ne!(edited["output"], r["output"]);
}
