//! The sandbox as a boundary: a `run` step — untrusted code, uid 0 of its user namespace, with
//! a real shell and `mount`, `unshare` and `chroot` (a static busybox packaged into the throwaway
//! archive) — tries the known ways out, and nothing outside its own output changes. Each wall is
//! also tried alone (the test-only switch `RBUILD_TEST_ONLY_WALLS`), and with none of them the
//! same attacks do get through, so the checks can fail.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::busybox::{busybox_archive, layered};
use common::skip::have_tool;
use common::*;

fn realise(a: &Archive, recipe: &Path, store: &Path, walls: Option<&str>) -> std::process::Output {
    let env: Vec<(&str, &str)> = walls
        .map(|w| vec![("RBUILD_TEST_ONLY_WALLS", w)])
        .unwrap_or_default();
    realise_with(a, recipe, store, None, &[], &env)
}

/// `rbuild realise RECIPE --store STORE --mirror (the archive) EXTRA…`, as `user` when given.
fn realise_with(
    a: &Archive,
    recipe: &Path,
    store: &Path,
    user: Option<&str>,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mirror = a.mirror_url();
    let mut args = vec![
        "realise",
        recipe.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--mirror",
        &mirror,
    ];
    args.extend_from_slice(extra);
    rbuild_as(user, &args, env)
}

/// Every path below `dir` whose name starts with `pwned`.
fn pwned(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with("pwned") {
                found.push(p.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    found
}

/// The escapes of issue 8, one script: remount the inputs writable through `/proc/1/root`,
/// bind an input elsewhere and remount that, do both from a new user namespace, chroot out
/// through `/proc/1/root`, and write the store's database by its host path. Every line may
/// fail; the step itself succeeds, so what it changed is what the test looks at.
fn attacks(store: &Path, tag: &str) -> String {
    let db = store.join("db.sqlite");
    format!(
        r#": {tag}
for d in /proc/1/root/inputs/*; do
  mount -o remount,bind,rw "$d" ; touch "$d/pwned-remount"
done
mkdir -p /mnt/b
for d in /proc/1/root/inputs/*; do
  mount --bind "$d" /mnt/b && {{ mount -o remount,bind,rw /mnt/b ; touch /mnt/b/pwned-bind ; umount /mnt/b ; }}
done
unshare -U -r -m sh -c 'for d in /proc/1/root/inputs/*; do mount -o remount,bind,rw "$d" ; touch "$d/pwned-userns"; done'
chroot /proc/1/root /bin/sh -c 'touch /inputs/*/pwned-chroot' 
for b in /proc/1/root/inputs/*/usr/bin/busybox; do
  chroot /proc/1/root "${{b#/proc/1/root}}" sh -c 'for d in /inputs/*; do mount -o remount,bind,rw "$d"; touch "$d/pwned-chroot"; done'
done
echo pwned >> {db} ; echo pwned >> /proc/1/root{db}
ls -la /proc/1/root/inputs/ /dev/
true
"#,
        db = db.display()
    )
}

fn db_unchanged(store: &Path) {
    let db = fs::read(store.join("db.sqlite")).unwrap();
    assert!(
        !db.windows(6).any(|w| w == b"pwned\n"),
        "the store's database was written"
    );
}

#[test]
fn no_run_step_changes_anything_but_its_own_output() {
    let t = tempfile::tempdir().unwrap();
    let Some(a) = busybox_archive(t.path()) else {
        return;
    };
    let store = t.path().join("store");
    // All walls, then each wall alone: the inputs, the other outputs and the database stay
    // as they were.
    for walls in [None, Some("mounts"), Some("landlock"), Some("privileges")] {
        let tag = walls.unwrap_or("all");
        let recipe = layered(&a, &format!("attack-{tag}"), &attacks(&store, tag));
        let out = realise(&a, &recipe, &store, walls);
        ok(&out);
        let found = pwned(&store.join("o"));
        assert!(
            found.is_empty(),
            "walls {tag}: the run step wrote outside its output: {found:?}\n{}",
            stderr(&out)
        );
        db_unchanged(&store);
    }
    // The same, as an unprivileged user (uid 0 inside maps to the user, 1… to its subordinate
    // ids): the user owns the store's files, and still the build cannot change them.
    if let Some(user) =
        require_test_user("no_run_step_changes_anything_but_its_own_output: the unprivileged part")
    {
        let ustore = user_dir(t.path(), "user-store", Some(&user));
        let recipe = layered(&a, "attack-user", &attacks(&ustore, "user"));
        ok(&rbuild(&[
            "lock",
            recipe.to_str().unwrap(),
            "--mirror",
            &a.mirror_url(),
        ]));
        let out = realise_with(&a, &recipe, &ustore, Some(&user), &[], &[]);
        ok(&out);
        let found = pwned(&ustore.join("o"));
        assert!(
            found.is_empty(),
            "unprivileged: the run step wrote outside its output: {found:?}"
        );
        db_unchanged(&ustore);
    }
    // With no wall, the same script does get out: the checks above can fail.
    let bare = t.path().join("bare-store");
    let recipe = layered(&a, "attack-none", &attacks(&bare, "none"));
    ok(&realise(&a, &recipe, &bare, Some("none")));
    let found = pwned(&bare.join("o"));
    assert!(
        found.iter().any(|p| p.ends_with("pwned-bind"))
            && found.iter().any(|p| p.ends_with("pwned-chroot")),
        "without walls the attack should have written into the inputs: {found:?}"
    );
}

/// Flushes to disk inside a build are answered without flushing (the store flushes an output
/// once, when it registers it): `sync -d /dev/null` — `fdatasync`, which the kernel refuses for
/// /dev/null — succeeds in a `run` step; with every wall but the seccomp filter's, it is refused
/// again, so the check can fail.
#[test]
fn flushes_inside_a_build_are_answered_without_flushing() {
    let t = tempfile::tempdir().unwrap();
    let Some(a) = busybox_archive(t.path()) else {
        return;
    };
    let recipe = layered(
        &a,
        "flush",
        "if sync -d /dev/null; then echo answered > /flush; else echo refused > /flush; fi",
    );
    for (walls, expected) in [(None, "answered"), (Some("mounts,landlock"), "refused")] {
        let store = t.path().join(format!("store-{expected}"));
        let tree = format!("{}^tree", recipe.display());
        let out = realise(&a, Path::new(&tree), &store, walls);
        let path = ok(&out).trim().to_owned();
        assert_eq!(
            fs::read_to_string(Path::new(&path).join("flush")).unwrap(),
            format!("{expected}\n"),
            "walls {walls:?}"
        );
    }
}

/// No terminal reaches a build: rbuild runs on a pseudo-terminal of its own (as CI has none),
/// and the run step's writes to /dev/tty go nowhere.
#[test]
fn a_build_cannot_write_to_the_users_terminal() {
    if !have_tool(
        "a_build_cannot_write_to_the_users_terminal",
        "script",
        "util-linux",
    ) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let Some(a) = busybox_archive(t.path()) else {
        return;
    };
    let store = t.path().join("store");
    let recipe = layered(
        &a,
        "tty",
        "echo PW''NED-tty > /dev/tty; echo PW''NED-tty2 > /proc/1/root/dev/tty; true",
    );
    let cmd = format!(
        "{} realise {} --store {} --mirror {}",
        rbuild_bin().display(),
        recipe.display(),
        store.display(),
        a.mirror_url()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "realise on a terminal failed:\n{text}"
    );
    assert!(text.contains("/o/"), "the output path is printed:\n{text}");
    assert!(
        !text.contains("PWNED"),
        "a build wrote to the terminal:\n{text}"
    );
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

/// `kill -9` of rbuild while a run step runs: a moment later none of the step's processes is
/// left, and the next realise builds it again from a clean scratch directory.
#[test]
fn a_sandbox_dies_with_the_rbuild_that_started_it() {
    let t = tempfile::tempdir().unwrap();
    let Some(a) = busybox_archive(t.path()) else {
        return;
    };
    let store = t.path().join("store");
    let marker = format!("{}", 90_000 + std::process::id() % 9_000);
    let recipe = layered(&a, "sleepy", &format!("sleep {marker} ; true"));
    // Build the base first, so that the step starts quickly.
    ok(&realise(&a, &a.recipe.clone(), &store, None));
    let mut child = Command::new(rbuild_bin())
        .args([
            "realise",
            recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--mirror",
            &a.mirror_url(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while processes_with(&format!("sleep {marker}")).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the run step never started"
        );
        assert!(child.try_wait().unwrap().is_none(), "rbuild ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed = Instant::now();
    while !processes_with(&format!("sleep {marker}")).is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the run step outlived rbuild: {:?}",
            processes_with(&format!("sleep {marker}"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next rbuild finds the killed build's scratch directory free and removes it.
    let again = layered(&a, "sleepy", &format!("sleep 0 ; : {marker}"));
    ok(&realise(&a, &again, &store, None));
    let tmp: Vec<_> = fs::read_dir(store.join("tmp")).unwrap().flatten().collect();
    assert!(
        tmp.is_empty(),
        "scratch left: {:?}",
        tmp.iter().map(|e| e.path()).collect::<Vec<_>>()
    );
}

/// A build step that reaches its wall-time or byte limit is stopped, and the error names the
/// step and the limit. Limits come from the command line or the recipe's `[limits]`; the
/// command line wins.
#[test]
fn a_build_step_is_stopped_at_its_limits() {
    let t = tempfile::tempdir().unwrap();
    let Some(a) = busybox_archive(t.path()) else {
        return;
    };
    let store = t.path().join("store");
    let run = |name: &str, script: &str, limits: &str, args: &[&str]| {
        let recipe = layered(&a, name, script);
        let text = fs::read_to_string(&recipe).unwrap();
        fs::write(&recipe, format!("{text}\n[limits]\n{limits}")).unwrap();
        let started = Instant::now();
        let out = realise_with(&a, &recipe, &store, None, args, &[]);
        assert!(
            !out.status.success(),
            "{name}: the step should have been stopped"
        );
        (stderr(&out), started.elapsed())
    };
    // The recipe allows an hour; the command line, 3 s.
    let (err, took) = run(
        "slow",
        "sleep 600",
        "max-build-time = 3600\n",
        &["--max-build-time", "3"],
    );
    assert!(
        err.contains("app-layer1-tree") && err.contains("wall-time limit of 3 s"),
        "{err}"
    );
    assert!(took < Duration::from_secs(60), "stopped late: {took:?}");
    let (err, _) = run(
        "big",
        "i=0; while [ $i -lt 40 ]; do head -c 1000000 /dev/zero > /f$i; i=$((i+1)); done; sleep 600",
        "max-build-bytes = 10000000\n",
        &[],
    );
    assert!(
        err.contains("app-layer1-tree") && err.contains("limit of 10000000 bytes written"),
        "{err}"
    );
    let tmp: Vec<_> = fs::read_dir(store.join("tmp")).unwrap().flatten().collect();
    assert!(tmp.is_empty(), "a stopped build left its scratch directory");
}
