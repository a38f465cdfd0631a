//! `rbuild doctor`: a checklist a person reads — one line per capability the sandbox relies on,
//! each `ok` or what is missing and how to fix it — and, with `--json`, what a sandboxed builder
//! sees.

use std::path::PathBuf;

use anyhow::{bail, Context};
use rbuild_engine::sandbox;

struct Line {
    ok: bool,
    what: &'static str,
    detail: String,
}

fn line(ok: bool, what: &'static str, detail: impl Into<String>) -> Line {
    Line {
        ok,
        what,
        detail: detail.into(),
    }
}

/// The kernel's version as (major, minor).
fn kernel() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Run the probe builder in a sandbox and return its report.
fn probe(map: &sandbox::IdMap, connect: &[String]) -> anyhow::Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("rbuild-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let spec = sandbox::SandboxSpec {
        build_dir: dir.clone(),
        inputs: vec![],
        network: false,
        builder: "builtin:probe".into(),
        args: connect.iter().map(|c| format!("connect={c}")).collect(),
        env: sandbox::fixed_env(),
        walls: sandbox::Walls::default(),
        limits: sandbox::Limits::default(),
        emulator: None,
    };
    let result = sandbox::run(
        &PathBuf::from(crate::setup::SELF_EXE),
        &spec,
        map,
        &dir.join("log"),
        None,
    );
    let report = std::fs::read_to_string(spec.host_build().join("out"));
    let _ = rbuild_store::remove_all(&dir);
    let result = result?;
    if !result.success {
        bail!(
            "the sandbox probe failed ({}):\n{}",
            result.status,
            result.stderr_tail
        );
    }
    Ok(serde_json::from_str(&report?)?)
}

pub fn doctor(connect: Vec<String>, json: bool) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    let map = match sandbox::check_support() {
        Ok(map) => {
            lines.push(line(
                true,
                "user namespaces and id maps",
                match &map {
                    sandbox::IdMap::Root => "root: 65536 ids mapped directly".to_owned(),
                    sandbox::IdMap::Subordinate { subuid, .. } => format!(
                        "unprivileged: uid 0 is you, 1… are your subordinate ids {}-{}",
                        subuid.0,
                        subuid.0 + subuid.1 - 1
                    ),
                },
            ));
            Some(map)
        }
        Err(e) => {
            lines.push(line(false, "user namespaces and id maps", e.to_string()));
            None
        }
    };
    let report = match &map {
        Some(map) => match probe(map, &connect) {
            Ok(r) => Some(r),
            Err(e) => {
                lines.push(line(false, "sandbox", format!("{e:#}")));
                None
            }
        },
        None => None,
    };
    if let Some(r) = &report {
        let ifaces = r["interfaces"].as_array().map(Vec::len).unwrap_or(0);
        lines.push(line(
            true,
            "sandbox",
            format!(
                "a builder ran as uid {} with {ifaces} network interface(s) (lo only) and no host files",
                r["uid"]
            ),
        ));
        let status = &r["status"];
        let userns_max: u64 = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        lines.push(line(
            userns_max >= 2,
            "locked mounts",
            "untrusted commands continue in a nested user and mount namespace: the kernel locks \
             every mount of the sandbox (inputs stay read-only)",
        ));
        let abi = sandbox::landlock_abi();
        lines.push(match abi {
            0 => line(
                false,
                "Landlock",
                "not available: builds rely on the other walls only; use a kernel >= 5.13 with \
                 `lsm=…,landlock` on its command line",
            ),
            1..=5 => line(
                true,
                "Landlock",
                format!(
                    "ABI {abi}: writes only below the build directory (signal scoping needs \
                     ABI 6, kernel >= 6.12)"
                ),
            ),
            _ => line(
                true,
                "Landlock",
                format!("ABI {abi}: writes only below the build directory, signals scoped"),
            ),
        });
        let seccomp = status["Seccomp"].as_str().unwrap_or("");
        lines.push(line(
            seccomp == "2" && status["NoNewPrivs"] == "1",
            "seccomp and no_new_privs",
            if seccomp == "2" {
                "filter on every build: keyrings, bpf, userfaultfd, perf_event_open, kexec, \
                 io_uring, TIOCSTI/TIOCLINUX and new user namespaces refused (x32 too; i386 \
                 system calls kill)"
                    .to_owned()
            } else {
                format!("the probe ran without a seccomp filter (Seccomp: {seccomp:?}): a kernel built without CONFIG_SECCOMP_FILTER")
            },
        ));
        lines.push(line(
            status["CapBnd"] == "00000000800000db",
            "capabilities",
            format!(
                "builds keep {} only (bounding set {})",
                sandbox::cap_names(sandbox::PACKAGE_CAPS),
                status["CapBnd"].as_str().unwrap_or("?")
            ),
        ));
    }
    let (major, minor) = kernel();
    let overlay = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| {
        f.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    });
    lines.push(line(
        (major, minor) >= (5, 11) && overlay,
        "overlayfs in a user namespace",
        match ((major, minor) >= (5, 11), overlay) {
            (true, true) => format!("kernel {major}.{minor}: layers are built on an overlay of their base"),
            (false, _) => format!("kernel {major}.{minor} < 5.11: layered recipes cannot be built (their layers need overlayfs in a user namespace)"),
            (true, false) => "the kernel lists no overlay filesystem (modprobe overlay): layered recipes cannot be built".to_owned(),
        },
    ));
    lines.push(line(
        (major, minor) >= (6, 7),
        "binfmt_misc in a user namespace",
        if (major, minor) >= (6, 7) {
            format!("kernel {major}.{minor}: foreign-architecture builds can register an emulator without root")
        } else {
            format!("kernel {major}.{minor} < 6.7: foreign-architecture builds need binfmt_misc set up by root (qemu-user-static)")
        },
    ));
    for l in &lines {
        eprintln!(
            "{:<4} {:<32} {}",
            if l.ok { "ok" } else { "FAIL" },
            l.what,
            l.detail
        );
    }
    if json {
        if let Some(r) = &report {
            println!("{}", serde_json::to_string_pretty(r)?);
        }
    }
    let failed: Vec<&str> = lines.iter().filter(|l| !l.ok).map(|l| l.what).collect();
    // Only a sandbox that cannot run is fatal; the others weaken a wall or a feature.
    if report.is_none() {
        bail!("sandboxes cannot run here: {}", failed.join(", "));
    }
    Ok(())
}
