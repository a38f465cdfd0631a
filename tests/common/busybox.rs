//! A throwaway archive whose base has a real shell: a static busybox (`busybox-static`),
//! packaged as a required package, and layered recipes whose layer runs a script.

use std::fs;
use std::path::{Path, PathBuf};

use super::*;

pub const BUSYBOX: &str = "/bin/busybox";

/// The standard archive plus `busybox` (required, so it is in the base): a static busybox at
/// /usr/bin and the applets the attacks use.
pub fn busybox_archive(dir: &Path) -> Option<Archive> {
    if !Path::new(BUSYBOX).exists() {
        skip(
            "sandbox tests",
            &format!("{BUSYBOX} (a static busybox) is missing"),
            "apt-get install busybox-static (.ci/run installs it)",
        );
        return None;
    }
    let a = make_archive(dir);
    let bytes: &'static [u8] = Box::leak(fs::read(BUSYBOX).unwrap().into_boxed_slice());
    let mut entries = vec![
        Entry::Dir("usr", 0o755),
        Entry::Dir("usr/bin", 0o755),
        Entry::File("usr/bin/busybox", bytes, 0o755, 0, 0),
        // A nested directory and a symlink to a directory, for the layer tests.
        Entry::Dir("usr/share", 0o755),
        Entry::Dir("usr/share/doc", 0o755),
        Entry::Dir("usr/share/doc/busybox", 0o755),
        Entry::File("usr/share/doc/busybox/README", b"busybox\n", 0o644, 0, 0),
        Entry::Dir("usr/lib", 0o755),
        Entry::Symlink("usr/lib/linkdir", "../share"),
    ];
    for applet in [
        "sh", "mount", "umount", "unshare", "chroot", "touch", "mkdir", "ls", "cat", "echo",
        "sleep", "true", "find", "grep", "head", "rm", "chmod", "stat", "test",
    ] {
        let path: &'static str = Box::leak(format!("usr/bin/{applet}").into_boxed_str());
        entries.push(Entry::Symlink(path, "busybox"));
    }
    let busybox = Pkg {
        name: "busybox",
        version: "1.35",
        priority: "required",
        essential: true,
        depends: "",
        entries,
    };
    fs::write(a.deb_path("busybox", "1.35"), build_deb(&busybox)).unwrap();
    let mut pkgs = standard_packages();
    pkgs.push(busybox);
    a.publish(&pkgs, &a.key);
    ok(&rbuild(&[
        "lock",
        a.recipe.to_str().unwrap(),
        "--mirror",
        &a.mirror_url(),
    ]));
    Some(a)
}

/// A layered recipe on the test base whose one layer runs `run` (a shell script).
pub fn layered(a: &Archive, name: &str, run: &str) -> PathBuf {
    let dir = a.recipe.parent().unwrap().join(name);
    fs::create_dir_all(&dir).unwrap();
    let recipe = dir.join("app.toml");
    let run = toml::Value::String(run.to_owned());
    fs::write(
        &recipe,
        format!("base = \"../testos.toml\"\n\n[[layers]]\nrun = [{run}]\n"),
    )
    .unwrap();
    recipe
}
