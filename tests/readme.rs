//! README.md against the binary, with no mirror needed: the command-line summary names only
//! subcommands and flags that exist, and the layered example README shows is the one in
//! `recipes/examples` that `tests/bullseye.rs` builds. (The commands of the quick start, the
//! layered-image and the cache sections are run as written by `tests/bullseye.rs`.)

mod common;

use std::path::Path;

use common::*;

/// Every `rbuild …` line of README's "Command line" block names a real subcommand, and every
/// `--flag` on it is one that subcommand takes.
#[test]
fn readme_command_line_names_real_subcommands_and_flags() {
    let lines = readme::commands("Command line");
    assert!(lines.len() >= 8, "{lines:?}");
    for line in lines.iter().filter(|l| l.starts_with("rbuild ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        // The subcommand: the leading lower-case words (`cache push`, `store verify`).
        let sub: Vec<&str> = words
            .iter()
            .take_while(|w| {
                w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-')
            })
            .copied()
            .collect();
        let mut args = sub.clone();
        args.push("--help");
        let help = ok(&rbuild(&args));
        let flags = words
            .iter()
            .flat_map(|w| w.split(['[', ']', '|', ',', '…']))
            .filter(|w| w.starts_with("--") || (w.starts_with('-') && w.len() == 2))
            .map(|w| w.split('=').next().unwrap());
        let known: std::collections::HashSet<&str> = help
            .split(|c: char| c.is_whitespace() || "=,[]<>".contains(c))
            .collect();
        for flag in flags {
            assert!(
                known.contains(flag),
                "README's `{line}`: `rbuild {}` has no {flag}:\n{help}",
                sub.join(" ")
            );
        }
    }
}

/// The layered recipe README shows is `recipes/examples/app/app.toml`, line for line (which
/// `tests/bullseye.rs` realises with README's command), and the files it copies exist.
#[test]
fn readme_layered_example_is_the_example_recipe() {
    let shown = readme::blocks("Layered images")
        .into_iter()
        .find(|(info, _)| info == "toml")
        .expect("a toml block")
        .1;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/examples/app");
    let file = std::fs::read_to_string(example.join("app.toml")).unwrap();
    // Both open with comment lines of their own (README's names the file); the rest is the same.
    let body = |t: &str| -> String {
        t.lines()
            .skip_while(|l| l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    assert!(shown.starts_with("# app.toml\n"), "{shown}");
    assert_eq!(
        body(&shown),
        body(&file),
        "README's layered example and recipes/examples/app/app.toml differ"
    );
    assert!(example.join("files/motd").is_file());
    assert!(readme::mentions("`rbuild realise app.toml -o result`"));
}

/// `rbuild man --dir` writes a page per command README's summary names, which `man` renders
/// with its flags; `rbuild completions bash` registers a completion that completes `rea` to
/// `realise` and `realise --ti` to `--timings`.
#[test]
fn man_pages_and_completions_cover_the_commands() {
    let t = tempfile::tempdir().unwrap();
    ok(&rbuild(&["man", "--dir", t.path().to_str().unwrap()]));
    for line in readme::commands("Command line")
        .iter()
        .filter(|l| l.starts_with("rbuild ") && !l.contains("--help"))
    {
        let sub: Vec<&str> = line
            .split_whitespace()
            .skip(1)
            .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            .filter(|w| !w.starts_with('-'))
            .collect();
        let page = t.path().join(format!("rbuild-{}.1", sub.join("-")));
        assert!(page.exists(), "no page {} for `{line}`", page.display());
    }
    if skip::have_tool(
        "man_pages_and_completions_cover_the_commands: rendering a page",
        "man",
        "man-db",
    ) {
        let o = std::process::Command::new("man")
            .arg("-l")
            .arg(t.path().join("rbuild-realise.1"))
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            text.contains("rbuild-realise")
                && text.contains("--explain")
                && text.contains("--timings"),
            "{text}"
        );
    }
    let script = ok(&rbuild(&["completions", "bash"]));
    let file = t.path().join("rbuild.bash");
    std::fs::write(&file, script).unwrap();
    let complete = |words: &str| {
        let o = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
                 COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; \
                 _rbuild rbuild \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                file.display()
            ))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(complete("rbuild rea").lines().any(|l| l == "realise"));
    assert!(complete("rbuild realise --ti")
        .lines()
        .any(|l| l == "--timings"));
}
