//! README.md's commands, for the tests that run them as written — with only the substitutions
//! each test states (a temporary store through `RBUILD_STORE`, the test mirror through
//! `RBUILD_MIRROR`, a loopback cache for a placeholder host name) — so README cannot rot.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fenced code blocks under the heading `## {section}` (`""`: the text before the first
/// section), each as (info string, text).
pub fn blocks(section: &str) -> Vec<(String, String)> {
    let text = readme();
    let mut in_section = section.is_empty();
    let mut out = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some((info, body)) = &mut open {
            if line.trim_start() == "```" {
                out.push((info.clone(), body.clone()));
                open = None;
            } else {
                body.push_str(line.trim_start_matches("  "));
                body.push('\n');
            }
            continue;
        }
        if let Some(h) = line.strip_prefix("## ") {
            in_section = h.trim() == section;
            continue;
        }
        if let Some(info) = line.trim_start().strip_prefix("```") {
            if in_section {
                open = Some((info.to_owned(), String::new()));
            } else {
                open = Some(("(elsewhere)".into(), String::new()));
            }
        }
    }
    out.retain(|(info, _)| info != "(elsewhere)");
    assert!(
        !out.is_empty(),
        "README.md has no code block under ## {section:?}"
    );
    out
}

/// The command lines of the shell blocks (no info string) under `section`, with comments and
/// blank lines dropped.
pub fn commands(section: &str) -> Vec<String> {
    blocks(section)
        .into_iter()
        .filter(|(info, _)| info.is_empty())
        .flat_map(|(_, body)| {
            body.lines()
                .map(|l| l.split(" #").next().unwrap_or("").trim().to_owned())
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The one command of `section` that starts with `prefix`.
pub fn command(section: &str, prefix: &str) -> String {
    let all = commands(section);
    let found: Vec<&String> = all.iter().filter(|c| c.starts_with(prefix)).collect();
    assert_eq!(
        found.len(),
        1,
        "README.md, ## {section:?}: expected one command starting with {prefix:?} among {all:?}"
    );
    found[0].clone()
}

/// Whether README.md's text (outside code blocks too) contains `text`: for commands given
/// inline, in backquotes.
pub fn mentions(text: &str) -> bool {
    readme().contains(text)
}

/// Run `line` with `sh -c` in `dir`, as `user` (root when `None`), with the rbuild under test
/// first on `PATH` as `rbuild`, and `env` set (and no `RBUILD_*` from the test's environment).
pub fn run(user: Option<&str>, dir: &Path, line: &str, env: &[(&str, &str)]) -> Output {
    let bin_dir: PathBuf = super::rbuild_bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        bin_dir.display()
    );
    let script = format!("cd '{}' && {line}", dir.display());
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--", "env", "-i"]);
            c
        }
        None => {
            let mut c = Command::new("env");
            c.arg("-i");
            c
        }
    };
    let home = match user {
        Some(u) => {
            let o = Command::new("getent").args(["passwd", u]).output().unwrap();
            let line = String::from_utf8_lossy(&o.stdout).into_owned();
            line.trim().split(':').nth(5).unwrap_or("/").to_owned()
        }
        None => std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
    };
    cmd.arg(format!("PATH={path}")).arg(format!("HOME={home}"));
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.args(["sh", "-c", &script]);
    cmd.output().unwrap()
}

/// [`run`], asserting success; returns stdout.
pub fn run_ok(user: Option<&str>, dir: &Path, line: &str, env: &[(&str, &str)]) -> String {
    let o = run(user, dir, line, env);
    assert!(
        o.status.success(),
        "README command `{line}` failed in {}: {}\nstdout: {}\nstderr: {}",
        dir.display(),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
