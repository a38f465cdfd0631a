//! End-to-end: the real `debian-bullseye` from the host's Debian mirror (its apt configuration,
//! or `RBUILD_MIRROR`), as root and as an unprivileged user with a subordinate id range, checked
//! with real peers (podman/skopeo/umoci) where installed. Skipped, with a note, when no mirror is
//! configured.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;

fn mirror() -> Option<String> {
    rbuild_recipes::mirror::choose(None)
}

fn manifest_digest(layout: &Path) -> String {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false)
}

fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?} failed: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn debian_bullseye_as_root_and_unprivileged() {
    let Some(mirror) = mirror() else {
        eprintln!("skipped: no Debian mirror in the host's apt configuration and RBUILD_MIRROR unset");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let env = [("RBUILD_MIRROR", mirror.as_str())];

    // Root, cold.
    let s1 = t.path().join("root-store");
    let result = s1.join("result");
    let started = Instant::now();
    let r = json(&rbuild_as(None, &["realise", "debian-bullseye", "--store", s1.to_str().unwrap(), "-o", result.to_str().unwrap(), "--json"], &env));
    let cold = started.elapsed();
    assert!(r["built"].as_u64().unwrap() > 300, "{r}");
    let digest = manifest_digest(&result);

    // Warm, offline, without a network: nothing built, and far faster.
    let started = Instant::now();
    let o = Command::new("unshare")
        .args(["-n", rbuild_bin().to_str().unwrap(), "realise", "debian-bullseye", "--store", s1.to_str().unwrap(), "--offline", "--json"])
        .output()
        .unwrap();
    let warm = started.elapsed();
    let w = json(&o);
    assert_eq!(w["built"], 0);
    assert_eq!(w["output"], r["output"]);
    eprintln!("cold realise {cold:?}, warm offline realise {warm:?} ({:.0}x)", cold.as_secs_f64() / warm.as_secs_f64());

    // The plain root filesystem tar.
    let tar = t.path().join("chroot.tar");
    ok(&rbuild_as(None, &["realise", "debian-bullseye^rootfs", "--store", s1.to_str().unwrap(), "-o", tar.to_str().unwrap(), "--offline"], &env));
    let listing = sh(Command::new("tar").arg("-tvf").arg(&tar));
    assert!(listing.contains("usr/sbin/telinit -> /bin/systemctl"), "telinit symlink");
    assert!(listing.contains("etc/localtime -> /usr/share/zoneinfo/Etc/UTC"), "localtime symlink");
    assert!(listing.lines().any(|l| l.starts_with("-rwsr-xr-x 0/0") && l.ends_with("usr/bin/su")), "su is setuid root in the tar");

    // An unprivileged user, another store: the same image digest.
    if let Some(user) = test_user() {
        let s2 = user_dir(t.path(), "user-store", Some(&user));
        let u = json(&rbuild_as(Some(&user), &["realise", "debian-bullseye", "--store", s2.to_str().unwrap(), "-o", s2.join("result").to_str().unwrap(), "--json"], &env));
        assert_eq!(manifest_digest(Path::new(u["output"].as_str().unwrap())), digest, "same bits as root");
    } else {
        eprintln!("unprivileged part skipped: RBUILD_TEST_USER not set");
    }

    if have("skopeo") {
        sh(Command::new("skopeo").arg("inspect").arg(format!("oci:{}", result.display())));
    }
    if have("podman") {
        sh(Command::new("podman").args(["pull", "-q"]).arg(format!("oci:{}", result.display())));
        let script = "cat /etc/debian_version; dpkg-query -W -f '${binary:Package}\\n' | wc -l; dpkg --audit; echo audit-done; readlink /usr/sbin/telinit; readlink /etc/localtime";
        let out = sh(Command::new("podman").args(["run", "--rm", "--runtime", "runc", "--network", "none"]).arg(format!("oci:{}", result.display())).args(["/bin/sh", "-c", script]));
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("11."), "{out}");
        assert_eq!(lines[1].trim(), "164", "{out}");
        assert_eq!(lines[2], "audit-done", "dpkg --audit is empty: {out}");
        assert_eq!(lines[3], "/bin/systemctl");
        assert_eq!(lines[4], "/usr/share/zoneinfo/Etc/UTC");
    } else {
        eprintln!("podman not installed: image not run");
    }
}
