//! Helpers of the tests against the real Debian archive (the host's mirror): finding the
//! mirror, reading an image layout, running podman as the unprivileged test user.

use std::path::Path;
use std::process::Command;

use super::{readme, skip};

/// The host's Debian mirror, or `None` after skipping `test` the shared way.
pub fn mirror(test: &str) -> Option<String> {
    let m = rbuild_recipes::mirror::choose(None);
    if m.is_none() {
        skip::skip(
            test,
            "no Debian mirror: none in the host's apt configuration and RBUILD_MIRROR unset",
            "set RBUILD_MIRROR to a Debian mirror's URL, or configure one for apt",
        );
    }
    m
}

pub fn manifest_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

/// Whether `tool` (from the Debian package of the same name) is installed; if not, `what` is
/// skipped the shared way.
pub fn have(what: &str, tool: &str) -> bool {
    skip::have_tool(what, tool, tool)
}

pub fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run a podman command line as `user` in `dir` under a pseudo-terminal (`script`), with
/// rootless podman set up for this host: its own runtime directory, and `CONTAINERS_CONF`
/// choosing runc and no network (README says rootless podman may need both). Returns what the
/// terminal showed.
pub fn run_podman(user: &str, dir: &Path, line: &str) -> String {
    let xdg = format!("/tmp/rbuild-test-xdg-{user}");
    let conf = dir.join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\nnetns = \"none\"\n\n[engine]\nruntime = \"runc\"\n",
    )
    .unwrap();
    let inner = format!(
        "mkdir -p {xdg} && chmod 700 {xdg} && XDG_RUNTIME_DIR={xdg} CONTAINERS_CONF={} script -qec '{}' /dev/null",
        conf.display(),
        line.replace('\'', "'\\''")
    );
    readme::run_ok(Some(user), dir, &inner, &[])
}
