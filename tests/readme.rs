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
