//! Helpers of the tests against the real Debian archive (the host's mirror): finding the
//! mirror, reading an image layout, running podman as the unprivileged test user, and reading
//! root filesystems (a tar, a directory) into comparable trees.

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

/// What one entry of a root filesystem is, as a tar shows it: everything but times (rbuild
/// clamps mtimes to the Release date; debootstrap's are the time of the run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeEntry {
    /// `dir`, `file`, `symlink`, `char`, `block` or `fifo`.
    pub kind: &'static str,
    /// Permission bits with setuid, setgid and sticky (none for symlinks: Linux ignores them).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// A symlink's target.
    pub target: Option<String>,
    /// A file's SHA-256.
    pub sha256: Option<String>,
    /// A device's (major, minor).
    pub device: Option<(u32, u32)>,
    /// Extended attributes (`security.capability`…), from the tar's `SCHILY.xattr.*` records.
    pub xattrs: std::collections::BTreeMap<String, Vec<u8>>,
    /// The other paths that are hardlinks of this file.
    pub links: std::collections::BTreeSet<String>,
    /// The file's bytes, kept only for the paths the reader was asked to keep.
    pub data: Option<Vec<u8>>,
}

/// A root filesystem by absolute path (`/` is the root directory itself).
pub type Tree = std::collections::BTreeMap<String, TreeEntry>;

fn tar_path(raw: &[u8]) -> String {
    let p = String::from_utf8_lossy(raw);
    let p = p.trim_start_matches("./").trim_start_matches('/');
    let p = p.trim_end_matches('/');
    if p.is_empty() || p == "." {
        "/".to_owned()
    } else {
        format!("/{p}")
    }
}

/// Read a tar into a [`Tree`]; files whose path `keep` accepts also keep their bytes.
pub fn read_tar(r: impl std::io::Read, keep: &dyn Fn(&str) -> bool) -> Tree {
    use sha2::Digest;
    use tar::EntryType as T;
    let mut tree = Tree::new();
    let mut hardlinks = Vec::new();
    let mut archive = tar::Archive::new(r);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = tar_path(&e.path_bytes());
        let mut xattrs = std::collections::BTreeMap::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                if let Some(name) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_owned(), x.value_bytes().to_vec());
                }
            }
        }
        let h = e.header();
        let kind = match h.entry_type() {
            T::Directory => "dir",
            T::Regular | T::Continuous => "file",
            T::Symlink => "symlink",
            T::Char => "char",
            T::Block => "block",
            T::Fifo => "fifo",
            T::Link => {
                let target = tar_path(&e.link_name_bytes().unwrap());
                hardlinks.push((path, target));
                continue;
            }
            other => panic!("{path}: unexpected tar entry type {other:?}"),
        };
        let mut entry = TreeEntry {
            kind,
            mode: if kind == "symlink" {
                0
            } else {
                h.mode().unwrap() & 0o7777
            },
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            target: None,
            sha256: None,
            device: None,
            xattrs,
            links: Default::default(),
            data: None,
        };
        match kind {
            "symlink" => {
                entry.target = Some(String::from_utf8_lossy(&e.link_name_bytes().unwrap()).into())
            }
            "char" | "block" => {
                entry.device = Some((
                    h.device_major().unwrap().unwrap(),
                    h.device_minor().unwrap().unwrap(),
                ))
            }
            "file" => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
                entry.sha256 = Some(hex::encode(sha2::Sha256::digest(&bytes)));
                if keep(&path) {
                    entry.data = Some(bytes);
                }
            }
            _ => {}
        }
        tree.insert(path, entry);
    }
    // A hardlink is its target's file; each member of a group names the others.
    let mut groups: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for (path, target) in hardlinks {
        let file = tree
            .get(&target)
            .unwrap_or_else(|| panic!("hardlink {path} to {target}, which the tar lacks"))
            .clone();
        tree.insert(path.clone(), file);
        groups
            .entry(target.clone())
            .or_insert_with(|| [target].into())
            .insert(path);
    }
    for group in groups.values() {
        for p in group {
            let e = tree.get_mut(p).unwrap();
            e.links = group.iter().filter(|q| *q != p).cloned().collect();
        }
    }
    tree
}

/// Read a directory into a [`Tree`] as GNU tar archives it (`--numeric-owner --xattrs`), so it
/// is read exactly as rbuild's tar is (std has no access to extended attributes). Anything tar
/// warns about (a socket it skips, another filesystem below) fails.
pub fn read_dir_tree(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Tree {
    let errors = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new("tar")
        .args([
            "--create",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--one-file-system",
            "--file=-",
            "--directory",
        ])
        .arg(dir)
        .arg(".")
        .stdout(std::process::Stdio::piped())
        .stderr(errors.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let tree = read_tar(&mut stdout, keep);
    // The tar crate stops at the end-of-archive blocks; GNU tar pads its last record past them.
    // Read that padding too, or tar may die of SIGPIPE writing it.
    std::io::copy(&mut stdout, &mut std::io::sink()).unwrap();
    drop(stdout);
    let status = child.wait().unwrap();
    let warned = std::fs::read_to_string(errors.path()).unwrap();
    assert!(
        status.success() && warned.is_empty(),
        "tar of {} ({status}): {warned}",
        dir.display()
    );
    tree
}

/// One way two trees differ at one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeDifference {
    pub path: String,
    /// `only-debootstrap`, `only-rbuild`, `type`, `mode`, `owner`, `target`, `content`,
    /// `device`, `xattrs` or `hardlinks`.
    pub kind: &'static str,
    pub detail: String,
}

/// Every difference between `expected` (debootstrap's) and `actual` (rbuild's), by path. A
/// path whose type differs is reported once, as `type`.
pub fn diff_trees(expected: &Tree, actual: &Tree) -> Vec<TreeDifference> {
    let mut out = Vec::new();
    let mut push = |path: &str, kind, detail: String| {
        out.push(TreeDifference {
            path: path.to_owned(),
            kind,
            detail,
        })
    };
    let short = |e: &TreeEntry| {
        format!(
            "{} {:04o} {}:{}{}",
            e.kind,
            e.mode,
            e.uid,
            e.gid,
            e.target
                .as_ref()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default()
        )
    };
    for (path, d) in expected {
        let Some(r) = actual.get(path) else {
            push(path, "only-debootstrap", short(d));
            continue;
        };
        if d.kind != r.kind {
            push(path, "type", format!("{} vs {}", short(d), short(r)));
            continue;
        }
        if d.mode != r.mode {
            push(path, "mode", format!("{:04o} vs {:04o}", d.mode, r.mode));
        }
        if (d.uid, d.gid) != (r.uid, r.gid) {
            push(
                path,
                "owner",
                format!("{}:{} vs {}:{}", d.uid, d.gid, r.uid, r.gid),
            );
        }
        if d.target != r.target {
            push(
                path,
                "target",
                format!("{:?} vs {:?}", d.target.as_deref(), r.target.as_deref()),
            );
        }
        if d.sha256 != r.sha256 {
            push(path, "content", "the bytes differ".into());
        }
        if d.device != r.device {
            push(path, "device", format!("{:?} vs {:?}", d.device, r.device));
        }
        if d.xattrs != r.xattrs {
            let names = |e: &TreeEntry| e.xattrs.keys().cloned().collect::<Vec<_>>().join(",");
            push(
                path,
                "xattrs",
                format!("[{}] vs [{}] (or their values)", names(d), names(r)),
            );
        }
        if d.links != r.links {
            push(
                path,
                "hardlinks",
                format!("linked with {:?} vs {:?}", d.links, r.links),
            );
        }
    }
    for (path, r) in actual {
        if !expected.contains_key(path) {
            push(path, "only-rbuild", short(r));
        }
    }
    out.sort_by(|a, b| (&a.path, a.kind).cmp(&(&b.path, b.kind)));
    out
}

/// Whether `path` matches `pattern`: `*` stands for any characters but `/`, `**` for any
/// characters at all.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| go(rest, &s[i..])),
            [b'*', rest @ ..] => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != b'/')
                .any(|i| go(rest, &s[i..])),
            [c, rest @ ..] => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

/// The lines a pseudo-terminal showed (what [`run_podman`] returns), trimmed (the terminal
/// echoes control characters as `^@`), from the first line that starts with `first` on: podman
/// prints its own progress (copying the layers in) before the command's output.
pub fn lines_from<'a>(out: &'a str, first: &str) -> Vec<&'a str> {
    out.lines()
        .map(|l| {
            l.trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .trim_start_matches("^@")
        })
        .skip_while(|l| !l.starts_with(first))
        .collect()
}
