use super::db::*;
use super::*;
use rbuild_engine::sandbox;
use std::os::unix::fs::MetadataExt;

/// A root with an empty dpkg database, and a package `hello` extracted into it: a
/// directory, a file, a conffile and a symlink, with a control, md5sums and conffiles.
fn setup(t: &Path) -> (PathBuf, Extracted, (i64, i64)) {
    let root = t.join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/triggers",
        "var/lib/dpkg/updates",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(
        root.join("var/lib/dpkg/status"),
        "Package: dpkg\nStatus: install ok installed\nVersion: 1.22\n\n",
    )
    .unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("usr/bin/hello"), "#!/bin/sh\n").unwrap();
    fs::write(root.join("etc/hello.conf"), "greeting=hi\n").unwrap();
    std::os::unix::fs::symlink("hello", root.join("usr/bin/hi")).unwrap();

    let dir = t.join("hello");
    fs::create_dir_all(dir.join("control")).unwrap();
    fs::write(
        dir.join("control/control"),
        "Package: hello\nVersion: 1.0-1\nArchitecture: amd64\nDescription: greets\n more\n",
    )
    .unwrap();
    fs::write(dir.join("control/md5sums"), "0123  usr/bin/hello\n").unwrap();
    fs::write(dir.join("control/conffiles"), "/etc/hello.conf\n").unwrap();
    let mut meta = TreeMeta::default();
    let file = |mode| EntryMeta::root(mode, 1_600_000_000);
    for (k, m) in [
        ("control/control", 0o644),
        ("control/md5sums", 0o644),
        ("control/conffiles", 0o644),
        ("data/usr", 0o755),
        ("data/usr/bin", 0o755),
        ("data/usr/bin/hello", 0o755),
        ("data/usr/bin/hi", 0o777),
        ("data/etc", 0o755),
        ("data/etc/hello.conf", 0o644),
    ] {
        meta.entries.insert(k.into(), file(m));
    }
    let listed = [
        ("/.", Listed::Dir),
        ("/usr", Listed::Dir),
        ("/usr/bin", Listed::Dir),
        ("/usr/bin/hello", Listed::File),
        ("/usr/bin/hi", Listed::Symlink),
        ("/etc", Listed::Dir),
        ("/etc/hello.conf", Listed::File),
    ]
    .map(|(p, k)| (p.to_owned(), k))
    .to_vec();
    let marker = t.join("marker");
    // The extraction is over once the marker's change time has moved on.
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&marker, "").unwrap();
    let md = fs::metadata(&marker).unwrap();
    (
        root,
        Extracted { dir, meta, listed },
        (md.ctime(), md.ctime_nsec()),
    )
}

#[test]
fn a_package_is_recorded_as_dpkg_unpack_records_it() {
    let t = tempfile::tempdir().unwrap();
    let (root, ex, at) = setup(t.path());
    // As the extraction may leave a directory: with a time of its own, from a tar.
    for dir in ["usr/bin", "etc"] {
        sandbox::set_entry_mtime(&root.join(dir), 1_500_000_000).unwrap();
    }
    let mut db = Db::read(&root).unwrap();
    let kept = HashMap::new();
    let source = Source::Extracted {
        kept: &kept,
        at,
        installed: &HashMap::new(),
    };
    assert_eq!(db.why_not("hello", &ex, &source).unwrap(), None);
    db.record("hello", &ex, &source).unwrap();
    db.write_status().unwrap();

    let info = root.join("var/lib/dpkg/info");
    // The list in the tar's order, the control members but `control` beside it.
    assert_eq!(
        fs::read_to_string(info.join("hello.list")).unwrap(),
        "/.\n/usr\n/usr/bin\n/usr/bin/hello\n/usr/bin/hi\n/etc\n/etc/hello.conf\n"
    );
    assert_eq!(
        fs::read_to_string(info.join("hello.md5sums")).unwrap(),
        "0123  usr/bin/hello\n"
    );
    assert!(info.join("hello.conffiles").exists());
    assert!(!info.join("hello.control").exists());
    // The conffile waits as .dpkg-new, the installed one untouched.
    assert_eq!(
        fs::read_to_string(root.join("etc/hello.conf.dpkg-new")).unwrap(),
        "greeting=hi\n"
    );
    // Files get their tar entries' times; their directories the time of the rename.
    let md = fs::symlink_metadata(root.join("usr/bin/hello")).unwrap();
    assert_eq!(md.mtime(), 1_600_000_000);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for dir in ["usr/bin", "etc"] {
        let m = fs::metadata(root.join(dir)).unwrap().mtime();
        assert!((now - 60..=now + 1).contains(&m), "{dir}: {m}");
    }
    // The stanza: unpacked, its conffile new, after what was there.
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert_eq!(
        status,
        "Package: dpkg\nStatus: install ok installed\nVersion: 1.22\n\n\
         Package: hello\nStatus: install ok unpacked\nVersion: 1.0-1\nArchitecture: amd64\n\
         Description: greets\n more\nConffiles:\n /etc/hello.conf newconffile\n\n"
    );
    // Once recorded, it is in the database: not recorded again.
    let db = Db::read(&root).unwrap();
    assert_eq!(
        db.why_not("hello", &ex, &source).unwrap().as_deref(),
        Some("it is in the database already")
    );
}

/// `hello` with a preinst holding `script`.
fn with_preinst(ex: &mut Extracted, script: &str) {
    fs::write(ex.dir.join("control/preinst"), script).unwrap();
    ex.meta.entries.insert(
        "control/preinst".into(),
        EntryMeta::root(0o755, 1_600_000_000),
    );
}

/// `unpack` of `hello` alone (extracted), its scripts run by `run`; dpkg never. `installed`:
/// when its recorded install was over, if it was (see [`Source::Extracted`]).
fn unpack_hello(
    root: &Path,
    ex: Extracted,
    at: (i64, i64),
    installed: Option<(i64, i64)>,
    run: RunScript,
) -> anyhow::Result<()> {
    let kept = HashMap::from([("hello".to_owned(), ex)]);
    let installed: HashMap<String, (i64, i64)> = installed
        .map(|i| ("hello".to_owned(), i))
        .into_iter()
        .collect();
    unpack(
        root,
        "the test set",
        &["hello"],
        &Source::Extracted {
            kept: &kept,
            at,
            installed: &installed,
        },
        &|names| panic!("dpkg was asked to unpack {names:?}"),
        Some(run),
        &|_| {},
    )
}

/// A package with a preinst is recorded once its preinst ran as dpkg runs it: from the
/// control members in `tmp.ci`, the package half-installed in the status file, with
/// dpkg's variables; `tmp.ci` is gone after.
#[test]
fn a_preinst_runs_as_dpkg_runs_it_then_the_package_is_recorded() {
    let t = tempfile::tempdir().unwrap();
    let (root, mut ex, at) = setup(t.path());
    with_preinst(&mut ex, "#!/bin/sh\necho hi\n");
    let ran = std::cell::RefCell::new(Vec::new());
    let run = |name: &str, _: &[&str], env: &[(String, String)]| -> anyhow::Result<()> {
        let ci = root.join("var/lib/dpkg/tmp.ci");
        assert_eq!(
            fs::read_to_string(ci.join("preinst")).unwrap(),
            "#!/bin/sh\necho hi\n"
        );
        assert!(ci.join("control").is_file() && ci.join("conffiles").is_file());
        let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
        assert!(
            status.ends_with(
                "Package: hello\nStatus: install reinstreq half-installed\n\
                 Architecture: amd64\nVersion: 1.0-1\n\n"
            ),
            "{status}"
        );
        // What the script does to the tree stays.
        fs::write(root.join("etc/made-by-preinst"), "x").unwrap();
        ran.borrow_mut().push((name.to_owned(), env.to_vec()));
        Ok(())
    };
    unpack_hello(&root, ex, at, None, &run).unwrap();
    let ran = ran.into_inner();
    assert_eq!(ran.len(), 1);
    let env: HashMap<_, _> = ran[0].1.iter().cloned().collect();
    for (k, v) in [
        ("DPKG_MAINTSCRIPT_PACKAGE", "hello"),
        ("DPKG_MAINTSCRIPT_NAME", "preinst"),
        ("DPKG_MAINTSCRIPT_ARCH", "amd64"),
        ("DPKG_MAINTSCRIPT_PACKAGE_REFCOUNT", "1"),
        ("DPKG_MAINTSCRIPT_DEBUG", "0"),
        ("DPKG_RUNNING_VERSION", "1.22"),
        ("DPKG_ADMINDIR", "/var/lib/dpkg"),
        ("DPKG_ROOT", ""),
    ] {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(!root.join("var/lib/dpkg/tmp.ci").exists());
    assert!(root.join("etc/made-by-preinst").exists());
    let info = root.join("var/lib/dpkg/info");
    assert_eq!(
        fs::read_to_string(info.join("hello.preinst")).unwrap(),
        "#!/bin/sh\necho hi\n"
    );
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert!(
        status.contains("Package: hello\nStatus: install ok unpacked\n"),
        "{status}"
    );
    assert!(!status.contains("half-installed"), "{status}");
}

/// A preinst that leaves what stops the recording (a diversion of one of the package's
/// paths, a change to its own files, a stat override, a change to the status) is an
/// error: dpkg would run it twice now. A diversion of another path is not.
#[test]
fn a_preinst_that_changes_what_the_recording_needs_is_an_error() {
    let diversion = |path: &str| format!("{path}\n{path}.usr-is-merged\n:\n");
    for (what, file, bytes) in [
        (
            "/usr/bin/hello is diverted",
            "var/lib/dpkg/diversions",
            diversion("/usr/bin/hello"),
        ),
        (
            "/usr/bin/hello changed since it was laid out",
            "usr/bin/hello",
            "x".to_owned(),
        ),
        (
            "stat overrides",
            "var/lib/dpkg/statoverride",
            "root root 0755 /x\n".to_owned(),
        ),
        (
            "dpkg's status",
            "var/lib/dpkg/status",
            "Package: dpkg\nStatus: install ok installed\nVersion: 1.22\n\n".to_owned(),
        ),
    ] {
        let t = tempfile::tempdir().unwrap();
        let (root, mut ex, at) = setup(t.path());
        with_preinst(&mut ex, "#!/bin/sh\n");
        let run = |_: &str, _: &[&str], _: &[(String, String)]| -> anyhow::Result<()> {
            fs::write(root.join(file), &bytes).unwrap();
            Ok(())
        };
        let e = format!("{:#}", unpack_hello(&root, ex, at, None, &run).unwrap_err());
        assert!(e.contains(what) && e.contains("preinst of hello"), "{e}");
    }
    // A diversion of a path it does not hold, as trixie's /usr-move mitigations add.
    let t = tempfile::tempdir().unwrap();
    let (root, mut ex, at) = setup(t.path());
    with_preinst(
        &mut ex,
        "#!/bin/sh\ndpkg-divert --no-rename --add /bin/hello\n",
    );
    let run = |_: &str, _: &[&str], _: &[(String, String)]| -> anyhow::Result<()> {
        let d = root.join("var/lib/dpkg/diversions");
        fs::write(d, diversion("/bin/hello")).unwrap();
        Ok(())
    };
    unpack_hello(&root, ex, at, None, &run).unwrap();
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert!(
        status.contains("Package: hello\nStatus: install ok unpacked\n"),
        "{status}"
    );
}

#[test]
fn whatever_dpkg_would_do_more_for_leaves_the_package_to_dpkg() {
    let reason = |change: &dyn Fn(&Path, &mut Extracted)| {
        let t = tempfile::tempdir().unwrap();
        let (root, mut ex, at) = setup(t.path());
        change(&root, &mut ex);
        let kept = HashMap::new();
        let source = Source::Extracted {
            kept: &kept,
            at,
            installed: &HashMap::new(),
        };
        Db::read(&root)
            .unwrap()
            .why_not("hello", &ex, &source)
            .unwrap()
    };
    let has = |r: Option<String>, what: &str| {
        let r = r.expect("left to dpkg");
        assert!(r.contains(what), "{r:?} should say {what:?}");
    };
    // A file changed after the extraction.
    has(
        reason(&|root, _| fs::write(root.join("usr/bin/hello"), "x").unwrap()),
        "/usr/bin/hello changed since it was laid out",
    );
    // A preinst, where none can be run here.
    has(
        reason(&|_, ex| with_preinst(ex, "#!/bin/sh\n")),
        "it has a preinst",
    );
    // One that writes dpkg's database, where preinsts can be run.
    for tool in DATABASE_WRITERS {
        let t = tempfile::tempdir().unwrap();
        let (root, mut ex, at) = setup(t.path());
        with_preinst(&mut ex, &format!("#!/bin/sh\n{tool} --add /x\n"));
        let kept = HashMap::new();
        let mut db = Db::read(&root).unwrap();
        db.runs_scripts = true;
        let source = Source::Extracted {
            kept: &kept,
            at,
            installed: &HashMap::new(),
        };
        has(
            db.why_not("hello", &ex, &source).unwrap(),
            &format!("its preinst calls {tool}"),
        );
    }
    // A diversion of one of its files.
    has(
        reason(&|root, _| {
            fs::write(
                root.join("var/lib/dpkg/diversions"),
                "/usr/bin/hello\n/usr/bin/hello.real\nother\n",
            )
            .unwrap()
        }),
        "/usr/bin/hello is diverted",
    );
    // Another package lists one of its files.
    has(
        reason(&|root, _| {
            fs::write(
                root.join("var/lib/dpkg/info/other.list"),
                "/.\n/usr/bin/hi\n",
            )
            .unwrap()
        }),
        "other lists /usr/bin/hi too",
    );
    // An installed package breaks this version; one that breaks only older ones does not.
    let breaks = |v: &'static str| {
        move |root: &Path, _: &mut Extracted| {
            fs::write(
                root.join("var/lib/dpkg/status"),
                format!(
                    "Package: dpkg\nStatus: install ok installed\nVersion: 1.22\nBreaks: hello (<< {v})\n\n"
                ),
            )
            .unwrap()
        }
    };
    has(reason(&breaks("2.0")), "dpkg's Breaks (hello (<< 2.0))");
    assert_eq!(reason(&breaks("1.0")), None);
    // Through what it provides: a versioned provide by its version, an unversioned one
    // whatever the relation's.
    let provides = |p: &'static str| {
        move |root: &Path, ex: &mut Extracted| {
            breaks("0")(root, ex);
            fs::write(
                root.join("var/lib/dpkg/status"),
                "Package: dpkg\nStatus: install ok installed\nVersion: 1.22\nConflicts: greeter (<< 2)\n\n",
            )
            .unwrap();
            let control = ex.dir.join("control/control");
            let text = fs::read_to_string(&control).unwrap();
            fs::write(&control, format!("{text}Provides: {p}\n")).unwrap();
        }
    };
    has(
        reason(&provides("greeter (= 1.5)")),
        "dpkg's Conflicts (greeter (<< 2))",
    );
    assert_eq!(reason(&provides("greeter (= 3)")), None);
    has(
        reason(&provides("greeter")),
        "dpkg's Conflicts (greeter (<< 2))",
    );
    // An installed package is interested in a trigger it activates, awaiting it.
    has(
        reason(&|root, ex| {
            fs::write(ex.dir.join("control/triggers"), "activate ldconfig\n").unwrap();
            fs::write(root.join("var/lib/dpkg/triggers/ldconfig"), "dpkg\n").unwrap();
        }),
        "it activates ldconfig, which dpkg awaits",
    );
    // A file trigger activated by name (dpkg would activate it for the packages
    // interested in the path).
    has(
        reason(&|_, ex| {
            fs::write(ex.dir.join("control/triggers"), "activate /usr/share/x\n").unwrap()
        }),
        "its triggers line",
    );
}

/// `hello` not laid out yet: its tree beside the root, the root without its files, and
/// libc-bin configured, interested in the ldconfig trigger hello activates.
fn setup_unpacked(t: &Path) -> (PathBuf, Extracted) {
    let (root, ex, _) = setup(t);
    for f in ["usr/bin/hello", "usr/bin/hi", "etc/hello.conf"] {
        let from = root.join(f);
        let to = ex.dir.join("data").join(f);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::rename(from, to).unwrap();
    }
    fs::write(
        root.join("var/lib/dpkg/status"),
        "Package: libc-bin\nStatus: install ok installed\nVersion: 2.41\n\n\
         Package: hello\nStatus: install ok not-installed\n\n",
    )
    .unwrap();
    fs::write(root.join("var/lib/dpkg/triggers/ldconfig"), "libc-bin\n").unwrap();
    fs::write(
        ex.dir.join("control/triggers"),
        "activate-noawait ldconfig\n",
    )
    .unwrap();
    (root, ex)
}

#[test]
fn a_package_not_laid_out_is_moved_in_and_its_trigger_left_pending() {
    let t = tempfile::tempdir().unwrap();
    let (root, ex) = setup_unpacked(t.path());
    let take = |_: &str| None;
    let source = Source::Unpacked(&take);
    let mut db = Db::read(&root).unwrap();
    assert_eq!(db.why_not("hello", &ex, &source).unwrap(), None);
    db.record("hello", &ex, &source).unwrap();
    db.write_status().unwrap();

    // Files and symlinks moved in; the conffile only as .dpkg-new.
    assert_eq!(
        fs::read_to_string(root.join("usr/bin/hello")).unwrap(),
        "#!/bin/sh\n"
    );
    assert_eq!(
        fs::read_link(root.join("usr/bin/hi")).unwrap(),
        Path::new("hello")
    );
    assert!(!root.join("etc/hello.conf").exists());
    assert_eq!(
        fs::read_to_string(root.join("etc/hello.conf.dpkg-new")).unwrap(),
        "greeting=hi\n"
    );
    assert!(!ex.dir.join("data/usr/bin/hello").exists());
    let md = fs::symlink_metadata(root.join("usr/bin/hi")).unwrap();
    assert_eq!(md.mtime(), 1_600_000_000);
    // The selection became the stanza; libc-bin has the trigger pending.
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert_eq!(
        status,
        "Package: libc-bin\nStatus: install ok triggers-pending\nVersion: 2.41\n\
         Triggers-Pending: ldconfig\n\n\
         Package: hello\nStatus: install ok unpacked\nVersion: 1.0-1\nArchitecture: amd64\n\
         Description: greets\n more\nConffiles:\n /etc/hello.conf newconffile\n\n"
    );
}

#[test]
fn a_package_not_laid_out_is_left_to_dpkg_where_the_tree_has_its_files() {
    let reason = |change: &dyn Fn(&Path)| {
        let t = tempfile::tempdir().unwrap();
        let (root, ex) = setup_unpacked(t.path());
        change(&root);
        let take = |_: &str| None;
        Db::read(&root)
            .unwrap()
            .why_not("hello", &ex, &Source::Unpacked(&take))
            .unwrap()
    };
    let r = reason(&|root| fs::write(root.join("usr/bin/hello"), "x").unwrap());
    assert_eq!(r.as_deref(), Some("/usr/bin/hello is there already"));
    // A directory it ships, made missing: it makes it; there as a file: dpkg's to sort out.
    let r = reason(&|root| fs::remove_dir(root.join("usr/bin")).unwrap());
    assert_eq!(r, None);
    let r = reason(&|root| {
        fs::remove_dir(root.join("usr/bin")).unwrap();
        fs::write(root.join("usr/bin"), "").unwrap();
    });
    assert_eq!(r.as_deref(), Some("/usr/bin is there already"));
    let r = reason(&|root| fs::write(root.join("etc/hello.conf.dpkg-new"), "").unwrap());
    assert_eq!(
        r.as_deref(),
        Some("/etc/hello.conf.dpkg-new is there already")
    );
    // libc-bin has another trigger pending: dpkg's order of them is dpkg's to keep.
    let r = reason(&|root| {
        let status = root.join("var/lib/dpkg/status");
        let text = fs::read_to_string(&status).unwrap();
        let text = text.replacen(
            "Version: 2.41\n",
            "Version: 2.41\nTriggers-Pending: other\n",
            1,
        );
        fs::write(status, text).unwrap();
    });
    assert_eq!(r.as_deref(), Some("libc-bin has other triggers pending"));
    // Installed already (not only selected).
    let r = reason(&|root| {
        let status = root.join("var/lib/dpkg/status");
        let text = fs::read_to_string(&status).unwrap();
        fs::write(status, text.replace("ok not-installed", "ok unpacked")).unwrap();
    });
    assert_eq!(r.as_deref(), Some("it is in the database already"));
}

#[test]
fn symlinks_scripts_left_resolve_within_the_tree() {
    let t = tempfile::tempdir().unwrap();
    let (root, ex) = setup_unpacked(t.path());
    // `etc` made a symlink climbing out of the tree: in the chroot, `..` stops at its
    // root, so dpkg would write into the tree's own `outside`, and so must this.
    fs::remove_dir(root.join("etc")).unwrap();
    std::os::unix::fs::symlink("../outside", root.join("etc")).unwrap();
    fs::create_dir(root.join("outside")).unwrap();
    fs::create_dir(t.path().join("outside")).unwrap();
    let take = |_: &str| None;
    let source = Source::Unpacked(&take);
    let mut db = Db::read(&root).unwrap();
    assert_eq!(db.why_not("hello", &ex, &source).unwrap(), None);
    db.record("hello", &ex, &source).unwrap();
    assert!(root.join("outside/hello.conf.dpkg-new").exists());
    assert_eq!(fs::read_dir(t.path().join("outside")).unwrap().count(), 0);
}

/// `hello` with maintainer script `script` holding `text`.
fn with_script(ex: &mut Extracted, script: &str, text: &str) {
    fs::write(ex.dir.join("control").join(script), text).unwrap();
    ex.meta.entries.insert(
        format!("control/{script}"),
        EntryMeta::root(0o755, 1_600_000_000),
    );
}

/// `hello` recorded as unpacked, then left as `dpkg --configure` leaves it (installed, its
/// conffile in place and hashed); the change time taken then, as configure takes it after a
/// core package's recorded install.
fn install_hello(root: &Path, ex: &Extracted, at: (i64, i64), probe: &Path) -> (i64, i64) {
    let mut db = Db::read(root).unwrap();
    db.runs_scripts = true;
    let kept = HashMap::new();
    let source = Source::Extracted {
        kept: &kept,
        at,
        installed: &HashMap::new(),
    };
    assert_eq!(db.why_not("hello", ex, &source).unwrap(), None);
    db.record("hello", ex, &source).unwrap();
    db.write_status().unwrap();
    let status = root.join("var/lib/dpkg/status");
    let text = fs::read_to_string(&status)
        .unwrap()
        .replace("install ok unpacked", "install ok installed")
        .replace(" /etc/hello.conf newconffile", " /etc/hello.conf 0123abcd");
    fs::write(&status, text).unwrap();
    fs::rename(
        root.join("etc/hello.conf.dpkg-new"),
        root.join("etc/hello.conf"),
    )
    .unwrap();
    sandbox::change_time_after(probe).unwrap()
}

/// debootstrap unpacks its core packages again, installed: recorded as dpkg 1.22's
/// `process_archive` does it — the old prerm `upgrade NEW` (half-configured), the new preinst
/// `upgrade OLD NEW` from `tmp.ci` (half-installed), the files laid down (the conffile as
/// `.dpkg-new`), the old postrm `upgrade NEW`, then unpacked, keeping its conffile's hash and
/// the version it had as `Config-Version` (what `dpkg --configure` gives the postinst).
#[test]
fn a_reinstall_is_recorded_as_dpkg_records_it() {
    let t = tempfile::tempdir().unwrap();
    let (root, mut ex, at) = setup(t.path());
    for script in ["prerm", "preinst", "postrm"] {
        with_script(&mut ex, script, &format!("#!/bin/sh\n# {script}\n"));
    }
    let installed = install_hello(&root, &ex, at, &t.path().join("probe"));
    let ran = std::cell::RefCell::new(Vec::new());
    let run = |name: &str, argv: &[&str], env: &[(String, String)]| -> anyhow::Result<()> {
        assert_eq!(name, "hello");
        let env: HashMap<_, _> = env.iter().cloned().collect();
        let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
        let state = status
            .split("\n\n")
            .find(|s| s.starts_with("Package: hello\n"))
            .unwrap()
            .lines()
            .take(4)
            .collect::<Vec<_>>()
            .join("|");
        ran.borrow_mut().push((
            argv.join(" "),
            env["DPKG_MAINTSCRIPT_NAME"].clone(),
            state,
            root.join("var/lib/dpkg/tmp.ci/preinst").exists(),
            root.join("etc/hello.conf.dpkg-new").exists(),
        ));
        Ok(())
    };
    unpack_hello(&root, ex, at, Some(installed), &run).unwrap();
    let half = |s: &str| {
        format!("Package: hello|Status: install reinstreq {s}|Version: 1.0-1|Config-Version: 1.0-1")
    };
    let ran = ran.into_inner();
    let want = [
        (
            "/var/lib/dpkg/info/hello.prerm upgrade 1.0-1",
            "prerm",
            half("half-configured"),
            true,
            false,
        ),
        (
            "/var/lib/dpkg/tmp.ci/preinst upgrade 1.0-1 1.0-1",
            "preinst",
            half("half-installed"),
            true,
            false,
        ),
        (
            "/var/lib/dpkg/info/hello.postrm upgrade 1.0-1",
            "postrm",
            half("half-installed"),
            true,
            true,
        ),
    ]
    .map(|(a, n, s, ci, new)| (a.to_owned(), n.to_owned(), s, ci, new));
    assert_eq!(ran, want);
    assert!(!root.join("var/lib/dpkg/tmp.ci").exists());
    assert_eq!(
        fs::read_to_string(root.join("etc/hello.conf.dpkg-new")).unwrap(),
        "greeting=hi\n"
    );
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert!(
        status.ends_with(
            "Package: hello\nStatus: install ok unpacked\nVersion: 1.0-1\n\
             Config-Version: 1.0-1\nArchitecture: amd64\nDescription: greets\n more\n\
             Conffiles:\n /etc/hello.conf 0123abcd\n\n"
        ),
        "{status}"
    );
    // Its list once, each path listed by it once.
    let db = Db::read(&root).unwrap();
    assert_eq!(db.owners["/usr/bin/hello"], ["hello"]);
}

/// A reinstall is left to dpkg where dpkg would write other bytes than those there, or do
/// more: an install configure did not record, a file changed since, another version, a
/// conffile not hashed, a trigger interest.
#[test]
fn a_reinstall_is_left_to_dpkg_unless_it_only_writes_what_is_there() {
    type Spoil = fn(&Path, &mut Extracted);
    let cases: [(&str, Spoil); 5] = [
        ("it is in the database already", |_, _| {}),
        ("/usr/bin/hello changed since it was laid out", |root, _| {
            fs::write(root.join("usr/bin/hello"), "#!/bin/sh\nexit 1\n").unwrap()
        }),
        ("another version of it is installed", |root, _| {
            let status = root.join("var/lib/dpkg/status");
            let text = fs::read_to_string(&status).unwrap();
            fs::write(&status, text.replace("Version: 1.0-1", "Version: 0.9-1")).unwrap();
        }),
        ("its conffiles are not the installed ones", |root, _| {
            let status = root.join("var/lib/dpkg/status");
            let text = fs::read_to_string(&status).unwrap();
            fs::write(&status, text.replace("0123abcd", "newconffile")).unwrap();
        }),
        ("its stanza has Triggers-Pending", |root, _| {
            let status = root.join("var/lib/dpkg/status");
            let text = fs::read_to_string(&status).unwrap();
            let text = text.replace("Version: 1.0-1\n", "Version: 1.0-1\nTriggers-Pending: x\n");
            fs::write(&status, text).unwrap();
        }),
    ];
    for (i, (why, spoil)) in cases.into_iter().enumerate() {
        let t = tempfile::tempdir().unwrap();
        let (root, mut ex, at) = setup(t.path());
        let installed = install_hello(&root, &ex, at, &t.path().join("probe"));
        spoil(&root, &mut ex);
        let (kept, none) = (HashMap::new(), HashMap::new());
        let marks = HashMap::from([("hello".to_owned(), installed)]);
        let source = Source::Extracted {
            kept: &kept,
            at,
            installed: if i == 0 { &none } else { &marks },
        };
        let mut db = Db::read(&root).unwrap();
        db.runs_scripts = true;
        let got = db
            .why_not("hello", &ex, &source)
            .unwrap()
            .unwrap_or_default();
        assert!(got.starts_with(why), "{why}: {got}");
    }
}

/// A script run for a reinstall that changes the package's files is an error: dpkg cannot
/// take the package over without running the script again.
#[test]
fn a_reinstall_script_that_changes_the_files_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let (root, mut ex, at) = setup(t.path());
    with_script(&mut ex, "prerm", "#!/bin/sh\n");
    let installed = install_hello(&root, &ex, at, &t.path().join("probe"));
    let run = |_: &str, _: &[&str], _: &[(String, String)]| -> anyhow::Result<()> {
        fs::write(root.join("usr/bin/hello"), "changed").unwrap();
        Ok(())
    };
    let e = format!(
        "{:#}",
        unpack_hello(&root, ex, at, Some(installed), &run).unwrap_err()
    );
    assert!(
        e.contains("the prerm of hello") && e.contains("/usr/bin/hello changed since"),
        "{e}"
    );
}

/// Files the tar links are recorded when the tree links them as the tar does, and only
/// then.
#[test]
fn hardlinked_files_are_recorded_only_linked_as_their_tar_links_them() {
    for extra_link in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let (root, mut ex, _) = setup(t.path());
        fs::hard_link(root.join("usr/bin/hello"), root.join("usr/bin/hullo")).unwrap();
        if extra_link {
            fs::hard_link(root.join("usr/bin/hello"), root.join("usr/bin/other")).unwrap();
        }
        ex.listed
            .insert(5, ("/usr/bin/hullo".to_owned(), Listed::Hardlink));
        ex.meta.entries.insert(
            "data/usr/bin/hullo".into(),
            EntryMeta::root(0o755, 1_600_000_000),
        );
        let at = sandbox::change_time_after(&t.path().join("probe")).unwrap();
        let mut db = Db::read(&root).unwrap();
        let kept = HashMap::new();
        let source = Source::Extracted {
            kept: &kept,
            at,
            installed: &HashMap::new(),
        };
        let why = db.why_not("hello", &ex, &source).unwrap();
        if extra_link {
            assert!(
                why.as_deref()
                    .is_some_and(|w| w.contains("linked otherwise than its tar")),
                "{why:?}"
            );
            continue;
        }
        assert_eq!(why, None);
        db.record("hello", &ex, &source).unwrap();
        let md = fs::metadata(root.join("usr/bin/hullo")).unwrap();
        assert_eq!((md.nlink(), md.mtime()), (2, 1_600_000_000));
    }
}

/// Trigger interests are noted as dpkg notes them: a file trigger's appended to
/// `triggers/File`, an explicit trigger's to `triggers/NAME`; on a reinstall, taken back and
/// noted again, at the end.
#[test]
fn trigger_interests_are_noted_as_dpkg_notes_them() {
    let t = tempfile::tempdir().unwrap();
    let (root, mut ex, at) = setup(t.path());
    let triggers = root.join("var/lib/dpkg/triggers");
    fs::write(triggers.join("File"), "/usr/lib/x other/noawait\n").unwrap();
    fs::write(triggers.join("ping"), "other\n").unwrap();
    with_script(
        &mut ex,
        "triggers",
        "# interests\ninterest-noawait /usr/lib/hello\ninterest-await ping\n",
    );
    let installed = install_hello(&root, &ex, at, &t.path().join("probe"));
    assert_eq!(
        fs::read_to_string(triggers.join("File")).unwrap(),
        "/usr/lib/x other/noawait\n/usr/lib/hello hello/noawait\n"
    );
    assert_eq!(
        fs::read_to_string(triggers.join("ping")).unwrap(),
        "other\nhello\n"
    );
    // Another package's interest noted since, written as dpkg writes the file (no change time
    // of the package's files moves).
    fs::write(
        triggers.join("File"),
        "/usr/lib/x other/noawait\n/usr/lib/hello hello/noawait\n/usr/lib/y third\n",
    )
    .unwrap();
    let run = |_: &str, argv: &[&str], _: &[(String, String)]| -> anyhow::Result<()> {
        panic!("no script to run: {argv:?}")
    };
    unpack_hello(&root, ex, at, Some(installed), &run).unwrap();
    assert_eq!(
        fs::read_to_string(triggers.join("File")).unwrap(),
        "/usr/lib/x other/noawait\n/usr/lib/y third\n/usr/lib/hello hello/noawait\n"
    );
    assert_eq!(
        fs::read_to_string(triggers.join("ping")).unwrap(),
        "other\nhello\n"
    );
}

/// debootstrap's feigned install of dpkg (a stanza saying installed, an empty file list,
/// nothing else), unpacked again: recorded, with no old script to run, the files as the
/// extraction left them, the conffiles new and the feigned version as `Config-Version`.
#[test]
fn a_feigned_install_is_unpacked_again_as_dpkg_does() {
    let t = tempfile::tempdir().unwrap();
    let (root, ex, at) = setup(t.path());
    let status = root.join("var/lib/dpkg/status");
    let mut text = fs::read_to_string(&status).unwrap();
    text.push_str(
        "Package: hello\nVersion: 1.0-1\nMaintainer: unknown\nStatus: install ok installed\n\n",
    );
    fs::write(&status, text).unwrap();
    fs::write(root.join("var/lib/dpkg/info/hello.list"), "").unwrap();
    let run = |_: &str, argv: &[&str], _: &[(String, String)]| -> anyhow::Result<()> {
        panic!("no script to run: {argv:?}")
    };
    unpack_hello(&root, ex, at, None, &run).unwrap();
    let text = fs::read_to_string(&status).unwrap();
    assert!(
        text.ends_with(
            "Package: hello\nStatus: install ok unpacked\nVersion: 1.0-1\n\
             Config-Version: 1.0-1\nArchitecture: amd64\nDescription: greets\n more\n\
             Conffiles:\n /etc/hello.conf newconffile\n\n"
        ),
        "{text}"
    );
    assert!(root.join("etc/hello.conf.dpkg-new").exists());
    assert_eq!(
        fs::read_to_string(root.join("var/lib/dpkg/info/hello.list")).unwrap(),
        "/.\n/usr\n/usr/bin\n/usr/bin/hello\n/usr/bin/hi\n/etc\n/etc/hello.conf\n"
    );
}
