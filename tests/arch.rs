//! End-to-end: a foreign architecture with no host setup. `debian-trixie` for amd64 and arm64
//! at once, as the unprivileged test user, locked at test time: the arm64 half runs its
//! maintainer scripts under the qemu-user of trixie's own archive (pinned in the lock, checked
//! like any package), registered with binfmt_misc in the sandbox's own user namespace — the
//! host's binfmt_misc is the same before and after. The `image` output is one multi-platform
//! index; its amd64 image is, digest for digest, the single-architecture build; podman runs
//! the arm64 one (the test registers qemu on the host for podman only, after the build, and
//! removes it again).

mod common;

use std::path::{Path, PathBuf};

use common::real::*;
use common::*;

/// What the host's binfmt_misc looks like: whether it is mounted, and its entries.
fn host_binfmt() -> (bool, Vec<String>) {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(" /proc/sys/fs/binfmt_misc ") && l.contains("binfmt_misc"));
    let mut entries: Vec<String> = std::fs::read_dir("/proc/sys/fs/binfmt_misc")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    (mounted, entries)
}

fn index_manifests(layout: &Path) -> Vec<serde_json::Value> {
    let blob = |d: &str| -> serde_json::Value {
        let hex = d.strip_prefix("sha256:").unwrap();
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(top["manifests"].as_array().unwrap().len(), 1, "{top}");
    assert_eq!(
        top["manifests"][0]["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let inner = blob(top["manifests"][0]["digest"].as_str().unwrap());
    inner["manifests"].as_array().unwrap().clone()
}

#[test]
fn trixie_amd64_and_arm64_with_no_host_setup() {
    let test = "trixie_amd64_and_arm64_with_no_host_setup";
    let Some(mirror) = mirror(test) else {
        return;
    };
    let Some(user) = require_test_user(&format!("{test}: as an unprivileged user")) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let home = user_dir(t.path(), "home", Some(&user));
    let env = [("RBUILD_MIRROR", mirror.as_str())];
    let lock = home.join("trixie.lock");
    let lock_s = lock.to_str().unwrap();
    ok(&rbuild_as(
        Some(&user),
        &[
            "lock",
            "debian-trixie",
            "--arch",
            "amd64,arm64",
            "--output",
            lock_s,
        ],
        &env,
    ));
    let text = std::fs::read_to_string(&lock).unwrap();
    assert!(text.contains("[[other-architecture]]") && text.contains("architecture = \"arm64\""));
    assert!(
        text.contains("name = \"qemu-user\""),
        "the emulator is pinned in the lock"
    );

    let before = host_binfmt();
    let store = home.join("store");
    let result = home.join("result");
    let r = json(&rbuild_as(
        Some(&user),
        &[
            "realise",
            "debian-trixie",
            "--arch",
            "amd64,arm64",
            "--lock",
            lock_s,
            "--store",
            store.to_str().unwrap(),
            "-o",
            result.to_str().unwrap(),
            "--json",
        ],
        &env,
    ));
    assert!(r["built"].as_u64().unwrap() > 250, "{r}");
    assert_eq!(host_binfmt(), before, "the host's binfmt_misc was touched");

    let manifests = index_manifests(&result);
    let platforms: Vec<(&str, Option<&str>)> = manifests
        .iter()
        .map(|m| {
            (
                m["platform"]["architecture"].as_str().unwrap(),
                m["platform"]["variant"].as_str(),
            )
        })
        .collect();
    assert_eq!(platforms, [("amd64", None), ("arm64", Some("v8"))]);

    // One SPDX and one CycloneDX document per architecture's image, each its referrer.
    let refs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(result.join("referrers/index.json")).unwrap())
            .unwrap();
    let artifacts = &refs["manifests"].as_array().unwrap()[1..];
    let mut described = Vec::new();
    for (a, arch) in artifacts.iter().zip(["amd64", "amd64", "arm64", "arm64"]) {
        let m: serde_json::Value =
            serde_json::from_slice(&layout_blob(&result, a["digest"].as_str().unwrap())).unwrap();
        let doc = layout_blob(&result, m["layers"][0]["digest"].as_str().unwrap());
        let i = usize::from(arch == "arm64");
        assert_eq!(m["subject"]["digest"], manifests[i]["digest"], "{m}");
        let output = format!(
            "{}-{arch}",
            if a["artifactType"] == "application/spdx+json" {
                "spdx"
            } else {
                "cyclonedx"
            }
        );
        let realised = ok(&rbuild_as(
            Some(&user),
            &[
                "realise",
                &format!("debian-trixie^{output}"),
                "--arch",
                "amd64,arm64",
                "--lock",
                lock_s,
                "--store",
                store.to_str().unwrap(),
                "--offline",
            ],
            &env,
        ));
        assert_eq!(std::fs::read(realised.trim()).unwrap(), doc, "{output}");
        let text = String::from_utf8(doc).unwrap();
        assert!(
            text.contains(&format!("arch={arch}")),
            "{output} names {arch} packages"
        );
        described.push(output);
    }
    assert_eq!(
        described,
        [
            "spdx-amd64",
            "cyclonedx-amd64",
            "spdx-arm64",
            "cyclonedx-arm64"
        ]
    );

    // The amd64 half is the single-architecture image: the same derivations, nothing built.
    let single = json(&rbuild_as(
        Some(&user),
        &[
            "realise",
            "debian-trixie",
            "--lock",
            lock_s,
            "--store",
            store.to_str().unwrap(),
            "--json",
            "--offline",
        ],
        &env,
    ));
    assert_eq!(single["built"], 0, "{single}");
    assert_eq!(
        manifest_digest(Path::new(single["output"].as_str().unwrap())),
        manifests[0]["digest"].as_str().unwrap()
    );

    // Run the arm64 image. podman needs the host's binfmt_misc for that: register the store's
    // emulator there for the run only (as root), and put everything back.
    if !nix_is_root() {
        skip::skip(
            &format!("{test}: running the arm64 image with podman"),
            "registering qemu with the host's binfmt_misc for podman needs root",
            "run the tests as root (CI does)",
        );
        return;
    }
    if !have(&format!("{test}: running the images with podman"), "podman") {
        return;
    }
    let qemu: PathBuf = std::fs::read_dir(store.join("o"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("data/usr/bin/qemu-aarch64"))
        .find(|p| p.is_file())
        .expect("the emulator's output in the store");
    let mounted_here = !before.0;
    if mounted_here {
        sh(std::process::Command::new("mount").args([
            "-t",
            "binfmt_misc",
            "binfmt_misc",
            "/proc/sys/fs/binfmt_misc",
        ]));
    }
    let name = format!("rbuild-test-aarch64-{}", std::process::id());
    std::fs::write(
        "/proc/sys/fs/binfmt_misc/register",
        format!(
            ":{name}:M::\\x7fELF\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:{}:F",
            qemu.display()
        ),
    )
    .unwrap();
    let runs: Vec<String> = ["arm64", "amd64"]
        .iter()
        .map(|arch| {
            run_podman(
                &user,
                &home,
                &format!("podman run --rm --arch {arch} oci:result /bin/sh -c \"uname -m; dpkg --print-architecture; dpkg --audit; echo audit-done\""),
            )
        })
        .collect();
    let _ = std::fs::write(format!("/proc/sys/fs/binfmt_misc/{name}"), "-1");
    if mounted_here {
        sh(std::process::Command::new("umount").arg("/proc/sys/fs/binfmt_misc"));
    }
    assert_eq!(
        host_binfmt(),
        before,
        "the host's binfmt_misc is back as it was"
    );
    for (out, (machine, arch)) in runs.iter().zip([("aarch64", "arm64"), ("x86_64", "amd64")]) {
        let lines: Vec<&str> = lines_from(out, machine);
        assert!(lines.len() >= 3, "{arch}: {out}");
        assert_eq!(&lines[..3], [machine, arch, "audit-done"], "{out}");
    }
}
