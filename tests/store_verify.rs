//! End-to-end tests of `rbuild store verify` (and `--repair`), of `cache push` refusing a
//! damaged output, and of content hashes that do not depend on the user's umask — against the
//! throwaway archive of `common`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// Realise `target` (`""` for the image, `"^tree"`, …) of `a`'s recipe into `store`: the output.
fn realise(a: &Archive, store: &Path, target: &str) -> PathBuf {
    let recipe = format!("{}{target}", a.recipe.display());
    let r = json(&rbuild(&[
        "realise",
        &recipe,
        "--store",
        store.to_str().unwrap(),
        "--json",
        "--mirror",
        &a.mirror_url(),
    ]));
    PathBuf::from(r["output"].as_str().unwrap())
}

fn verify(store: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["store", "verify", "--store", store.to_str().unwrap()];
    args.extend_from_slice(extra);
    rbuild(&args)
}

/// `store verify --json` (and its exit status).
fn verify_json(store: &Path, extra: &[&str]) -> (bool, serde_json::Value) {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let o = verify(store, &args);
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        )
    });
    (o.status.success(), v)
}

/// Every registered output of a store: derivation hash → content hash.
fn content_hashes(store: &Path) -> BTreeMap<String, String> {
    rbuild_store::Store::open(store)
        .unwrap()
        .outputs()
        .unwrap()
        .into_iter()
        .map(|r| (r.drv_hash, r.output.content_hash))
        .collect()
}

/// The content hash of an output as the store computes it (with its sidecar).
fn hash_of(out: &Path) -> String {
    let side = rbuild_store::meta::sidecar(out);
    let meta = side
        .exists()
        .then(|| rbuild_store::meta::TreeMeta::read(&side).unwrap());
    rbuild_store::hash::content_hash(out, meta.as_ref()).unwrap()
}

/// A `.deb` downloaded into the store (a fixed-output file output).
fn a_deb(store: &Path) -> PathBuf {
    let mut debs: Vec<PathBuf> = fs::read_dir(store.join("o"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort();
    debs.into_iter().next().expect("a .deb in the store")
}

/// The first regular file (relative path) of a tree that has `content` bigger than a byte.
fn a_file(tree: &Path, skip: &[&str]) -> String {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() {
                n.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", n.to_string_lossy())
            };
            let p = dir.join(&n);
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                walk(&p, &r, out);
            } else if md.is_file() && md.len() > 1 {
                out.push(r);
            }
        }
    }
    let mut files = Vec::new();
    walk(tree, "", &mut files);
    files
        .into_iter()
        .find(|f| !skip.contains(&f.as_str()))
        .expect("a file in the tree")
}

fn flip_first_byte(p: &Path) {
    let mode = fs::metadata(p).unwrap().permissions().mode();
    fs::set_permissions(p, fs::Permissions::from_mode(mode | 0o200)).unwrap();
    let mut b = fs::read(p).unwrap();
    b[0] ^= 0x20;
    fs::write(p, b).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// The damaged output named `name`-suffixed path in a verify report, and its paths.
fn damaged_entry<'a>(report: &'a serde_json::Value, path: &Path) -> &'a serde_json::Value {
    report["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["path"].as_str() == path.to_str())
        .unwrap_or_else(|| panic!("{} not reported damaged: {report}", path.display()))
}

fn changes(entry: &serde_json::Value) -> Vec<(String, String)> {
    entry["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_owned(),
                c["change"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn verify_names_damaged_outputs_and_paths_and_repair_restores_them() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(&t.path().join("archive"));
    let store = t.path().join("store");
    let image = realise(&a, &store, "");
    let tree = realise(&a, &store, "^tree");
    let deb = a_deb(&store);

    let (ok, clean) = verify_json(&store, &[]);
    assert!(ok, "{clean}");
    assert_eq!(clean["damaged"], serde_json::json!([]));
    assert_eq!(clean["unlisted"], 0);
    assert!(clean["checked"].as_u64().unwrap() >= 5, "{clean}");
    let before = content_hashes(&store);

    // The image layout (no sidecar: modes on disk count): one changed byte in a blob, a deleted
    // file, a changed mode.
    let blob = a_file(&image, &["index.json", "oci-layout"]);
    let in_tree = a_file(&tree, &[]);
    // Files of equal content and mode in different outputs are one inode: damage to one is
    // damage to every output that shares it, and verify must name each.
    let damaged_inodes: std::collections::HashSet<(u64, u64)> = [
        image.join(&blob),
        image.join("index.json"),
        tree.join(&in_tree),
        deb.clone(),
    ]
    .iter()
    .map(|p| {
        let m = fs::metadata(p).unwrap();
        (m.dev(), m.ino())
    })
    .collect();
    let mut expected: Vec<PathBuf> = fs::read_dir(store.join("o"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|o| inodes_below(o).iter().any(|i| damaged_inodes.contains(i)))
        .collect();
    expected.sort();
    for own in [&image, &tree, &deb] {
        assert!(expected.contains(own), "{}", own.display());
    }
    flip_first_byte(&image.join(&blob));
    fs::remove_file(image.join("oci-layout")).unwrap();
    let index = image.join("index.json");
    let mode = fs::metadata(&index).unwrap().permissions().mode() & 0o777;
    fs::set_permissions(&index, fs::Permissions::from_mode(mode ^ 0o111)).unwrap();
    // A tree with a sidecar: one changed byte in a file.
    flip_first_byte(&tree.join(&in_tree));
    // A download: one changed byte.
    flip_first_byte(&deb);

    let (ok, report) = verify_json(&store, &[]);
    assert!(!ok, "damage must fail the command: {report}");
    let mut reported: Vec<PathBuf> = report["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
        .collect();
    reported.sort();
    assert_eq!(reported, expected, "{report}");
    let img = damaged_entry(&report, &image);
    assert!(img["name"].as_str().unwrap().contains("oci"), "{img}");
    let mut got = changes(img);
    got.sort();
    let mut want = vec![
        (blob.clone(), "contents changed".to_owned()),
        ("index.json".to_owned(), "mode or owner changed".to_owned()),
        ("oci-layout".to_owned(), "deleted".to_owned()),
    ];
    want.sort();
    assert_eq!(got, want, "{img}");
    assert_eq!(
        changes(damaged_entry(&report, &tree)),
        [(in_tree.clone(), "contents changed".to_owned())]
    );
    // A file output: its one path is the output itself ("").
    assert_eq!(
        changes(damaged_entry(&report, &deb)),
        [(String::new(), "contents changed".to_owned())]
    );

    // The text report names the output and the path too.
    let o = verify(&store, &[]);
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("{}", image.display())) && text.contains("oci-layout: deleted"),
        "{text}"
    );
    assert!(
        stderr(&o).contains(&format!("{} damaged", expected.len())),
        "{}",
        stderr(&o)
    );

    // Repair: built (and downloaded) again from the store's own records, same content hashes.
    let (ok, repaired) = verify_json(&store, &["--repair", "--mirror", &a.mirror_url()]);
    assert!(ok, "{repaired}");
    for d in repaired["damaged"].as_array().unwrap() {
        assert_eq!(d["repair"]["result"], "repaired", "{d}");
    }
    let (ok, clean) = verify_json(&store, &[]);
    assert!(ok, "{clean}");
    assert_eq!(clean["damaged"], serde_json::json!([]));
    assert_eq!(content_hashes(&store), before);
    assert_eq!(hash_of(&image), before[&drv_of(&image)]);
    assert!(image.join("oci-layout").exists());
}

/// The (device, inode) of every file at or below `p` (symlinks not followed).
fn inodes_below(p: &Path) -> Vec<(u64, u64)> {
    let m = fs::symlink_metadata(p).unwrap();
    if m.is_dir() {
        fs::read_dir(p)
            .unwrap()
            .flat_map(|e| inodes_below(&e.unwrap().path()))
            .collect()
    } else if m.is_file() {
        vec![(m.dev(), m.ino())]
    } else {
        vec![]
    }
}

/// A realised test archive whose store has one downloaded `.deb` changed by one byte:
/// (its temporary directory, the archive, the store, the damaged `.deb`).
fn store_with_a_damaged_deb() -> (tempfile::TempDir, Archive, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(&t.path().join("archive"));
    let store = t.path().join("store");
    realise(&a, &store, "");
    let deb = a_deb(&store);
    flip_first_byte(&deb);
    (t, a, store, deb)
}

/// The derivation hash of a store path (`o/<hash>-<name>`).
fn drv_of(out: &Path) -> String {
    let name = out.file_name().unwrap().to_string_lossy();
    name.split_once('-').unwrap().0.to_owned()
}

#[test]
fn repair_reports_an_output_that_does_not_build_again_the_same() {
    let (_t, a, store, deb) = store_with_a_damaged_deb();
    // The mirror now serves other bytes for that file: the download's fixed-output check fails,
    // so the repair fails and says so; the output stays invalid, never wrong.
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    let pkg = name.split_once('-').unwrap().1.to_owned();
    let on_mirror = fs::read_dir(a.mirror.join("pool/main"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy() == pkg)
        .unwrap_or_else(|| panic!("{pkg} on the mirror"));
    flip_first_byte(&on_mirror);
    let (ok, report) = verify_json(&store, &["--repair", "--mirror", &a.mirror_url()]);
    assert!(!ok, "{report}");
    let d = damaged_entry(&report, &deb);
    assert_eq!(d["repair"]["result"], "failed", "{d}");
    assert!(
        d["repair"]["error"]
            .as_str()
            .unwrap()
            .contains("fixed-output check failed"),
        "{d}"
    );
    assert!(rbuild_store::Store::open(&store)
        .unwrap()
        .valid_output(&drv_of(&deb))
        .unwrap()
        .is_none());
}

#[test]
fn cache_push_refuses_a_damaged_output_and_pushes_the_rest() {
    let (t, a, store, deb) = store_with_a_damaged_deb();
    let sec = t.path().join("k.sec");
    ok(&rbuild(&[
        "key",
        "generate",
        "k",
        sec.to_str().unwrap(),
        t.path().join("k.pub").to_str().unwrap(),
    ]));
    let cache = t.path().join("cache");
    let o = cache_push(
        a.recipe.to_str().unwrap(),
        &store,
        &format!("file://{}", cache.display()),
        sec.to_str().unwrap(),
        &[],
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    let name = deb.file_name().unwrap().to_string_lossy();
    let pkg = name.split_once('-').unwrap().1;
    assert!(
        err.contains(&format!("refusing to push {pkg}")) && err.contains("contents changed"),
        "{err}"
    );
    assert!(err.contains("1 damaged outputs were not pushed"), "{err}");
    let entries: Vec<String> = fs::read_dir(cache.join("entries"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !entries.contains(&format!("{}.json", drv_of(&deb))),
        "the damaged output was signed"
    );
    assert_eq!(
        entries.len() + 1,
        content_hashes(&store).len(),
        "every other output was pushed"
    );
}

#[test]
fn content_hashes_do_not_depend_on_the_umask() {
    let t = tempfile::tempdir().unwrap();
    let a = make_archive(&t.path().join("archive"));
    let mut stores = Vec::new();
    for umask in ["077", "022"] {
        let store = t.path().join(format!("store-{umask}"));
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("umask {umask}; exec \"$@\""))
            .arg("sh")
            .arg(rbuild_bin())
            .args([
                "realise",
                a.recipe.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
                "--mirror",
                &a.mirror_url(),
            ])
            .env_remove("RBUILD_STORE")
            .env_remove("RBUILD_MIRROR")
            .output()
            .unwrap();
        ok(&o);
        stores.push(content_hashes(&store));
    }
    assert!(stores[0].len() >= 5);
    let differ: Vec<&String> = stores[0]
        .iter()
        .filter(|(h, c)| stores[1].get(*h) != Some(c))
        .map(|(h, _)| h)
        .collect();
    assert!(differ.is_empty(), "content hashes differ for {differ:?}");
}
