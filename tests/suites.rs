//! End-to-end: Debian 12 and 13 (`debian-bookworm`, `debian-trixie`) from the host's Debian
//! mirror, as `tests/bullseye.rs` does Debian 11. Each is locked at test time into a temporary
//! file (`rbuild lock NAME --output FILE`, then `realise --lock FILE`), so a point release on the
//! mirror never breaks the test; that the committed locks fit their recipes is a unit test
//! (`recipe::tests::builtin_locks_fit_their_recipes`).
//!
//! For each suite: the package set equals `debootstrap --print-debs SUITE` on the same mirror;
//! root and the unprivileged test user build the same image digest; rootless podman runs it
//! with a clean `dpkg --audit` and every locked package installed; and it realises again
//! offline, from the store alone.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::real::*;
use common::*;

fn suite(suite: &str, version: &str) {
    let test = format!("debian_{suite}");
    let Some(mirror) = mirror(&test) else {
        return;
    };
    let name = format!("debian-{suite}");
    let t = tempfile::tempdir().unwrap();
    let work = user_dir(t.path(), "work", None);
    let lock = work.join(format!("{name}.lock"));
    let env = [("RBUILD_MIRROR", mirror.as_str())];
    ok(&rbuild_as(
        None,
        &["lock", &name, "--output", lock.to_str().unwrap()],
        &env,
    ));
    let text = std::fs::read_to_string(&lock).unwrap();
    let locked: rbuild_recipes::recipe::Lock = toml::from_str(&text).unwrap();
    let pinned: BTreeSet<&str> = locked.packages.iter().map(|p| p.name.as_str()).collect();

    // The oracle: debootstrap's own resolution of the suite on the same mirror.
    if !nix_is_root() {
        skip::skip(
            &format!("{test}: the package set against debootstrap --print-debs"),
            "debootstrap runs as root only",
            "run the tests as root (CI does)",
        );
    } else if have(&format!("{test}: debootstrap --print-debs"), "debootstrap") {
        let target = work.join("debootstrap-target");
        let out = sh(Command::new("debootstrap")
            .arg("--print-debs")
            .arg(suite)
            .arg(&target)
            .arg(&mirror));
        let debootstrap: BTreeSet<&str> = out.split_whitespace().collect();
        assert_eq!(
            pinned, debootstrap,
            "{name}: the locked package set differs from debootstrap's"
        );
    }

    // Root, cold, with the fresh lock; then again offline from the store alone.
    let lock_arg = lock.to_str().unwrap();
    let s1 = work.join("root-store");
    let realise = |user: Option<&str>, store: &Path, extra: &[&str]| {
        let mut args = vec![
            "realise",
            &name,
            "--lock",
            lock_arg,
            "--store",
            store.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&rbuild_as(user, &args, &env))
    };
    let r = realise(None, &s1, &[]);
    assert!(r["built"].as_u64().unwrap() > 100, "{r}");
    let digest = manifest_digest(Path::new(r["output"].as_str().unwrap()));
    let again = realise(None, &s1, &["--offline"]);
    assert_eq!(
        (again["built"].as_u64(), &again["output"]),
        (Some(0), &r["output"])
    );

    // The unprivileged user, another store: the same bits; podman runs the image.
    let Some(user) = require_test_user(&format!("{test}: as an unprivileged user")) else {
        return;
    };
    let home = user_dir(t.path(), "user", Some(&user));
    let s2 = home.join("store");
    let result = home.join("result");
    let u = realise(Some(&user), &s2, &["-o", result.to_str().unwrap()]);
    assert!(u["built"].as_u64().unwrap() > 100, "{u}");
    assert_eq!(
        manifest_digest(&result),
        digest,
        "{name}: same bits as root"
    );
    if !have(&format!("{test}: running the image with podman"), "podman") {
        return;
    }
    let script = "cat /etc/debian_version; dpkg-query -W -f '\\${binary:Package}\\n' | wc -l; dpkg --audit; echo audit-done; readlink /bin";
    let out = run_podman(
        &user,
        &home,
        &format!("podman run --rm oci:result /bin/sh -c \"{script}\""),
    );
    let lines: Vec<&str> = out
        .lines()
        .map(|l| {
            l.trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .trim_start_matches("^@")
        })
        .skip_while(|l| !l.starts_with(version))
        .collect();
    assert!(
        lines.len() >= 4,
        "no Debian {version} version printed: {out}"
    );
    assert_eq!(lines[1], pinned.len().to_string(), "{out}");
    assert_eq!(lines[2], "audit-done", "dpkg --audit is empty: {out}");
    assert_eq!(lines[3], "usr/bin", "merged /usr: {out}");
}

#[test]
fn debian_bookworm() {
    suite("bookworm", "12.");
}

#[test]
fn debian_trixie() {
    suite("trixie", "13.");
}
