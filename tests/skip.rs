//! The one way a test (or one part of a test) that cannot run here skips: it says so loudly,
//! records the skip for the summary `tests/run.sh` prints at the end of the run (cargo's output
//! capture swallows what a passing test prints), and under CI (`CI=true`) it fails instead,
//! naming what is missing and how to provide it: CI runs every test or fails.
//!
//! This file is compiled into every crate that needs it by path (`#[path]`): the end-to-end
//! tests' `common` module, and the `#[cfg(test)]` code of `rbuild-engine` and `rbuild-recipes`.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

/// Whether this is a CI run (`CI=true`, as CI services and `.ci/run` set it): nothing may skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Skip `what` (a test's name, or "test: part") because `missing` is missing here; `provide`
/// says how to provide it. Under CI this panics with the same words instead.
#[track_caller]
pub fn skip(what: &str, missing: &str, provide: &str) {
    let line = format!("{what}: {missing}; to run it: {provide}");
    if under_ci() {
        panic!("CI=true, and this test cannot run: {line}");
    }
    eprintln!("SKIPPED {line}");
    if let Some(path) = record_file() {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{line}"));
    }
}

/// Where skips are recorded: `RBUILD_SKIPPED_TESTS` (set by `tests/run.sh`), else
/// `skipped-tests.log` in the cargo target directory of this test binary
/// (`<target>/<profile>/deps/<binary>`).
pub fn record_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RBUILD_SKIPPED_TESTS").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("skipped-tests.log"))
}

/// Whether `tool` can be run (it answers `--version`); if not, skip `what` naming the package
/// that provides it.
#[track_caller]
pub fn have_tool(what: &str, tool: &str, package: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        skip(
            what,
            &format!("`{tool}` is not installed"),
            &format!("install it (Debian/Ubuntu: `apt install {package}`; .ci/run does)"),
        );
    }
    found
}
