//! End-to-end: the built-in suites (`debian-bullseye`, `debian-bookworm`, `debian-trixie`)
//! against debootstrap, from the host's Debian mirror. Each is locked at test time into a
//! temporary file (`rbuild lock NAME --output FILE`, then `realise --lock FILE`), so a point
//! release on the mirror never breaks the test; that the committed locks fit their recipes is a
//! unit test (`recipe::tests::builtin_locks_fit_their_recipes`).
//!
//! For each suite: the package set equals `debootstrap --print-debs SUITE` on the same mirror;
//! it realises again offline, from the store alone; and its root filesystem (`^rootfs`) is,
//! entry for entry, the tree a real `debootstrap SUITE DIR MIRROR` run makes (default variant,
//! as root) but for the differences `tests/debootstrap-differences.toml` allows, each with its
//! reason (README.md lists them). For bookworm and trixie also: the unprivileged test user
//! builds the same image digest as root, and rootless podman runs it with a clean
//! `dpkg --audit` and every locked package installed (`tests/bullseye.rs` does that for
//! bullseye, with the committed lock).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::real::*;
use common::*;

fn suite(suite: &str, version: &str, unprivileged: bool) {
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

    // The oracle: debootstrap's own resolution of the suite on the same mirror, and the system
    // it makes.
    let debootstrapped = can_debootstrap(&test).then(|| {
        let out = sh(Command::new("debootstrap")
            .arg("--print-debs")
            .arg(suite)
            .arg(work.join("print-debs-target"))
            .arg(&mirror));
        let debootstrap: BTreeSet<&str> = out.split_whitespace().collect();
        assert_eq!(
            pinned, debootstrap,
            "{name}: the locked package set differs from debootstrap's"
        );
        let target = work.join("debootstrap");
        let started = Instant::now();
        sh(Command::new("debootstrap")
            .arg(suite)
            .arg(&target)
            .arg(&mirror));
        eprintln!("{test}: debootstrap took {:.0?}", started.elapsed());
        target
    });

    // Root, cold, with the fresh lock; then again offline from the store alone.
    let lock_arg = lock.to_str().unwrap();
    let s1 = work.join("root-store");
    let realise = |user: Option<&str>, what: &str, store: &Path, extra: &[&str]| {
        let mut args = vec![
            "realise",
            what,
            "--lock",
            lock_arg,
            "--store",
            store.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&rbuild_as(user, &args, &env))
    };
    let r = realise(None, &name, &s1, &[]);
    assert!(r["built"].as_u64().unwrap() > 100, "{r}");
    let digest = manifest_digest(Path::new(r["output"].as_str().unwrap()));
    let again = realise(None, &name, &s1, &["--offline"]);
    assert_eq!(
        (again["built"].as_u64(), &again["output"]),
        (Some(0), &r["output"])
    );
    // The root filesystem as one tar, from the same configured tree: only the tar is new.
    let rootfs = realise(None, &format!("{name}^rootfs"), &s1, &["--offline"]);
    assert!(rootfs["built"].as_u64().unwrap() <= 1, "{rootfs}");
    let rootfs = PathBuf::from(rootfs["output"].as_str().unwrap());

    if unprivileged {
        as_unprivileged_user(
            &test,
            &name,
            version,
            &pinned,
            t.path(),
            &digest,
            |u, s, x| realise(Some(u), &name, s, x),
        );
    }

    if let Some(dir) = debootstrapped {
        tree_against_debootstrap(suite, &dir, &rootfs);
    }
}

/// Whether debootstrap can run here (as root, installed); if not, the parts that need it are
/// skipped the shared way.
fn can_debootstrap(test: &str) -> bool {
    let what = format!("{test}: the package set and the tree against debootstrap's");
    if !nix_is_root() {
        skip::skip(
            &what,
            "debootstrap runs as root only",
            "run the tests as root (CI does)",
        );
        return false;
    }
    have(&what, "debootstrap")
}

/// The unprivileged user, another store: the same bits as root; podman runs the image.
fn as_unprivileged_user(
    test: &str,
    name: &str,
    version: &str,
    pinned: &BTreeSet<&str>,
    tmp: &Path,
    digest: &str,
    realise: impl Fn(&str, &Path, &[&str]) -> serde_json::Value,
) {
    let Some(user) = require_test_user(&format!("{test}: as an unprivileged user")) else {
        return;
    };
    let home = user_dir(tmp, "user", Some(&user));
    let s2 = home.join("store");
    let result = home.join("result");
    let u = realise(&user, &s2, &["-o", result.to_str().unwrap()]);
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
    let lines: Vec<&str> = lines_from(&out, version);
    assert!(
        lines.len() >= 4,
        "no Debian {version} version printed: {out}"
    );
    assert_eq!(lines[1], pinned.len().to_string(), "{out}");
    assert_eq!(lines[2], "audit-done", "dpkg --audit is empty: {out}");
    assert_eq!(lines[3], "usr/bin", "merged /usr: {out}");
}

/// One entry of `tests/debootstrap-differences.toml`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Allowed {
    paths: Vec<String>,
    differs: Vec<String>,
    suites: Option<Vec<String>>,
    ignoring: Option<String>,
    reason: String,
}

const SUITES: [&str; 3] = ["bullseye", "bookworm", "trixie"];
const KINDS: [&str; 10] = [
    "only-debootstrap",
    "only-rbuild",
    "type",
    "mode",
    "owner",
    "target",
    "content",
    "device",
    "xattrs",
    "hardlinks",
];

/// The allow-list, checked: known kinds, suites and normalisations, a reason for each entry.
fn allow_list() -> Vec<Allowed> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        allow: Vec<Allowed>,
    }
    let file: File = toml::from_str(include_str!("debootstrap-differences.toml"))
        .expect("tests/debootstrap-differences.toml");
    for a in &file.allow {
        assert!(!a.paths.is_empty() && !a.reason.trim().is_empty(), "{a:?}");
        assert!(
            a.differs.iter().all(|k| KINDS.contains(&k.as_str())),
            "{a:?}"
        );
        assert!(
            a.suites
                .iter()
                .flatten()
                .all(|s| SUITES.contains(&s.as_str())),
            "{a:?}"
        );
        if let Some(how) = &a.ignoring {
            assert!(
                a.differs == ["content"] && normalise(how, b"").is_some(),
                "{a:?}: `ignoring` applies to content alone, and is one of: last-change"
            );
        }
    }
    file.allow
}

/// A file's bytes without what `how` says to ignore (`None`: no such normalisation).
fn normalise(how: &str, bytes: &[u8]) -> Option<Vec<u8>> {
    match how {
        // shadow(5): name:password:LAST-CHANGE:min:max:warn:inactive:expire:
        "last-change" => Some(
            bytes
                .split(|&b| b == b'\n')
                .map(|line| {
                    let mut fields: Vec<&[u8]> = line.split(|&b| b == b':').collect();
                    if fields.len() > 2 {
                        fields[2] = b"";
                    }
                    fields.join(&b':')
                })
                .collect::<Vec<_>>()
                .join(&b'\n'),
        ),
        _ => None,
    }
}

/// rbuild's root filesystem (the `^rootfs` tar) against debootstrap's `dir`, entry by entry,
/// with the allow-list: every difference it does not allow fails, and so does every pattern of
/// it that allows nothing here.
fn tree_against_debootstrap(suite: &str, dir: &Path, rootfs: &Path) {
    let all = allow_list();
    let allowed: Vec<&Allowed> = all
        .iter()
        .filter(|a| a.suites.is_none() || a.suites.iter().flatten().any(|s| s == suite))
        .collect();
    let keep = |p: &str| {
        allowed
            .iter()
            .any(|a| a.ignoring.is_some() && a.paths.iter().any(|g| path_matches(g, p)))
    };
    let started = Instant::now();
    let expected = read_dir_tree(dir, &keep);
    let actual = read_tar(std::fs::File::open(rootfs).unwrap(), &keep);
    let differences = diff_trees(&expected, &actual);
    eprintln!(
        "debian-{suite}: {} entries from debootstrap, {} from rbuild, {} differences, compared in {:.1?}",
        expected.len(),
        actual.len(),
        differences.len(),
        started.elapsed()
    );

    let (unexplained, stale) = judge(&allowed, differences, &expected, &actual);

    let mut report = String::new();
    if !unexplained.is_empty() {
        // Show how the contents differ (rbuild's side read again, for these files only).
        let texts: BTreeSet<&str> = unexplained
            .iter()
            .filter(|d| d.kind == "content")
            .map(|d| d.path.as_str())
            .collect();
        let ours = read_tar(std::fs::File::open(rootfs).unwrap(), &|p| texts.contains(p));
        report.push_str(&format!(
            "debian-{suite}: {} differences from debootstrap's tree that \
             tests/debootstrap-differences.toml does not allow (debootstrap's vs rbuild's):\n",
            unexplained.len()
        ));
        for d in unexplained.iter().take(300) {
            report.push_str(&format!("  {} [{}] {}\n", d.path, d.kind, d.detail));
            if d.kind == "content" {
                let theirs = std::fs::read(dir.join(d.path.trim_start_matches('/'))).ok();
                let mine = ours.get(&d.path).and_then(|e| e.data.clone());
                if let (Some(a), Some(b)) = (theirs, mine) {
                    report.push_str(&file_diff(&a, &b));
                }
            }
        }
        if unexplained.len() > 300 {
            report.push_str(&format!("  … and {} more\n", unexplained.len() - 300));
        }
    }
    if !stale.is_empty() {
        report.push_str(&format!(
            "debian-{suite}: allowed differences that no longer occur (remove them from \
             tests/debootstrap-differences.toml and README.md, or narrow their suites):\n{}\n",
            stale.join("\n")
        ));
    }
    assert!(report.is_empty(), "{report}");
}

/// Of the `differences` between `expected` (debootstrap's) and `actual` (rbuild's), those
/// `allowed` does not allow; and the patterns of `allowed` (with their entries) that allow none.
fn judge(
    allowed: &[&Allowed],
    differences: Vec<TreeDifference>,
    expected: &Tree,
    actual: &Tree,
) -> (Vec<TreeDifference>, Vec<String>) {
    let mut used = BTreeSet::new();
    let mut unexplained = Vec::new();
    for d in differences {
        let by = allowed.iter().enumerate().find_map(|(i, a)| {
            let j = a.paths.iter().position(|g| path_matches(g, &d.path))?;
            let kind_ok = a.differs.iter().any(|k| k == d.kind);
            let rest_equal = match &a.ignoring {
                None => true,
                Some(how) => {
                    let data = |t: &Tree| t[&d.path].data.as_deref().map(|b| normalise(how, b));
                    let (x, y) = (data(expected), data(actual));
                    x.is_some() && x == y
                }
            };
            (kind_ok && rest_equal).then_some((i, j))
        });
        match by {
            Some(ij) => {
                used.insert(ij);
            }
            None => unexplained.push(d),
        }
    }
    let used = &used;
    let stale: Vec<String> = allowed
        .iter()
        .enumerate()
        .flat_map(|(i, a)| {
            a.paths
                .iter()
                .enumerate()
                .filter(move |(j, _)| !used.contains(&(i, *j)))
                .map(move |(_, g)| format!("  {g} ({}; {})", a.differs.join(", "), a.reason))
        })
        .collect();
    (unexplained, stale)
}

/// What differs between two files, as `diff -u` shows it (the first lines), indented.
fn file_diff(a: &[u8], b: &[u8]) -> String {
    const SHOWN: usize = 30;
    let write = |bytes: &[u8]| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    };
    let (fa, fb) = (write(a), write(b));
    let out = Command::new("diff")
        .args(["-u", "--label", "debootstrap", "--label", "rbuild"])
        .arg(fa.path())
        .arg(fb.path())
        .output();
    let Ok(out) = out else {
        return "      (no diff command to show how)\n".into();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let mut shown: String = lines
        .iter()
        .take(SHOWN)
        .map(|l| format!("      {l}\n"))
        .collect();
    if lines.len() > SHOWN {
        shown.push_str(&format!("      … {} more lines\n", lines.len() - SHOWN));
    }
    shown
}

/// README's "Differences from debootstrap" lists exactly the allow-list's paths, so what users
/// read is what the tests hold.
#[test]
fn readme_lists_the_differences_from_debootstrap() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let heading = "### Differences from debootstrap";
    let section = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("README.md has no {heading:?}"))
        .1;
    let section = section.split("\n#").next().unwrap();
    let patterns: BTreeSet<String> = allow_list().into_iter().flat_map(|a| a.paths).collect();
    let quoted: BTreeSet<String> = section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|q| q.starts_with('/'))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        quoted, patterns,
        "README.md's {heading:?} quotes (`/…`) exactly the paths of \
         tests/debootstrap-differences.toml"
    );
}

#[test]
fn allow_list_patterns_match_as_documented() {
    assert!(path_matches("/dev/*", "/dev/null"));
    assert!(!path_matches("/dev/*", "/dev/pts/0"));
    assert!(!path_matches("/dev/*", "/dev"));
    assert!(path_matches("/var/**", "/var/lib/dpkg/status"));
    assert!(path_matches(
        "/var/cache/apt/archives/*.deb",
        "/var/cache/apt/archives/libc6_2.36_amd64.deb"
    ));
    assert!(!path_matches("/etc/shadow", "/etc/shadow-"));
    assert_eq!(
        normalise("last-change", b"root:*:20645:0:99999:7:::\nx\n").unwrap(),
        b"root:*::0:99999:7:::\nx\n"
    );
    assert_eq!(
        file_diff(b"a\nb\n", b"a\nc\n"),
        "      --- debootstrap\n      +++ rbuild\n      @@ -1,2 +1,2 @@\n       a\n      -b\n      +c\n"
    );
}

/// The allow-list's rules on made-up trees: a difference passes only through an entry whose
/// path and kind match (and, with `ignoring`, whose normalised contents are equal), and an entry
/// that allows nothing is reported.
#[test]
fn judge_allows_only_what_the_list_says() {
    let file = |bytes: &[u8]| TreeEntry {
        kind: "file",
        mode: 0o644,
        uid: 0,
        gid: 0,
        target: None,
        sha256: Some(format!("{:x?}", bytes)),
        device: None,
        xattrs: Default::default(),
        links: Default::default(),
        data: Some(bytes.to_vec()),
    };
    let tree = |entries: &[(&str, TreeEntry)]| -> Tree {
        entries
            .iter()
            .map(|(p, e)| (p.to_string(), e.clone()))
            .collect()
    };
    let entry = |paths: &[&str], differs: &[&str], ignoring: Option<&str>| Allowed {
        paths: paths.iter().map(|p| p.to_string()).collect(),
        differs: differs.iter().map(|k| k.to_string()).collect(),
        suites: None,
        ignoring: ignoring.map(str::to_owned),
        reason: "test".into(),
    };
    let expected = tree(&[
        ("/etc/shadow", file(b"root:*:20787:0:99999:7:::\n")),
        ("/etc/motd", file(b"hello\n")),
        ("/var/log/dpkg.log", file(b"log\n")),
        ("/etc/fstab", file(b"# UNCONFIGURED\n")),
    ]);
    let mut owner = file(b"hello\n");
    owner.gid = 4;
    let actual = tree(&[
        ("/etc/shadow", file(b"root:*:20645:0:99999:7:::\n")),
        ("/etc/motd", owner),
        ("/etc/extra", file(b"x")),
    ]);
    let entries = [
        entry(&["/etc/shadow"], &["content"], Some("last-change")),
        entry(
            &["/var/log/*.log", "/var/log/other"],
            &["only-debootstrap"],
            None,
        ),
        entry(&["/etc/motd"], &["content"], None),
    ];
    let allowed: Vec<&Allowed> = entries.iter().collect();
    let (unexplained, stale) = judge(&allowed, diff_trees(&expected, &actual), &expected, &actual);
    let found: Vec<(&str, &str)> = unexplained
        .iter()
        .map(|d| (d.path.as_str(), d.kind))
        .collect();
    assert_eq!(
        found,
        [
            ("/etc/extra", "only-rbuild"),
            ("/etc/fstab", "only-debootstrap"),
            ("/etc/motd", "owner"),
        ]
    );
    assert_eq!(stale.len(), 2, "{stale:?}");
    assert!(stale[0].starts_with("  /var/log/other "), "{stale:?}");
    assert!(stale[1].starts_with("  /etc/motd "), "{stale:?}");

    // A shadow file that differs in more than the dates is not allowed.
    let other = tree(&[("/etc/shadow", file(b"root:!:20645:0:99999:7:::\n"))]);
    let only = tree(&[("/etc/shadow", expected["/etc/shadow"].clone())]);
    let (unexplained, _) = judge(&allowed[..1], diff_trees(&only, &other), &only, &other);
    assert_eq!(unexplained.len(), 1);
}

#[test]
fn debian_bullseye() {
    // tests/bullseye.rs builds bullseye as the unprivileged user and runs it in podman.
    suite("bullseye", "11.", false);
}

#[test]
fn debian_bookworm() {
    suite("bookworm", "12.", true);
}

#[test]
fn debian_trixie() {
    suite("trixie", "13.", true);
}
