//! Tests across the archive modules: packages built here with the `ar` and `tar` crates are
//! unpacked (benign and hostile ones), re-packed as deterministic tars, and made into OCI layouts
//! that external tools (skopeo, umoci), when installed, must accept.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rbuild_store::meta::{EntryMeta, TreeMeta};
use tar::{EntryType, Header};

use super::deb::{decompress_data, read_control, unpack_deb};
use super::oci::{self, ImageConfig, Layer};
use super::tar_out::{gzip_parallel, write_tar};
use super::ArchiveError;

const CAPS_HEX: &str = "0100000200200000000000000000000000000000";

/// A tar being built, with raw control over names (so hostile ones can be written).
struct T(tar::Builder<Vec<u8>>);

impl T {
    fn new() -> T {
        T(tar::Builder::new(Vec::new()))
    }

    fn header(etype: EntryType, name: &[u8], mode: u32, uid: u64, gid: u64, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(etype);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_600_000_000);
        h.set_size(size);
        let field = &mut h.as_gnu_mut().unwrap().name;
        field[..name.len()].copy_from_slice(name);
        h
    }

    fn raw(&mut self, mut h: Header, link: Option<&[u8]>, data: &[u8]) -> &mut T {
        if let Some(l) = link {
            h.set_link_name_literal(l).unwrap();
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, name: &str, mode: u32) -> &mut T {
        let h = T::header(EntryType::Directory, name.as_bytes(), mode, 0, 0, 0);
        self.raw(h, None, b"")
    }

    fn file(&mut self, name: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut T {
        if name.len() > 100 {
            let mut h = T::header(EntryType::Regular, b"", mode, uid, gid, data.len() as u64);
            self.0.append_data(&mut h, name, data).unwrap();
            return self;
        }
        let h = T::header(
            EntryType::Regular,
            name.as_bytes(),
            mode,
            uid,
            gid,
            data.len() as u64,
        );
        self.raw(h, None, data)
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut T {
        let h = T::header(EntryType::Symlink, name.as_bytes(), 0o777, 0, 0, 0);
        self.raw(h, Some(target.as_bytes()), b"")
    }

    fn hardlink(&mut self, name: &str, target: &str) -> &mut T {
        let h = T::header(EntryType::Link, name.as_bytes(), 0o644, 0, 0, 0);
        self.raw(h, Some(target.as_bytes()), b"")
    }

    fn special(&mut self, name: &str, etype: EntryType) -> &mut T {
        let h = T::header(etype, name.as_bytes(), 0o644, 0, 0, 0);
        self.raw(h, None, b"")
    }

    fn pax(&mut self, key: &str, value: &[u8]) -> &mut T {
        self.0.append_pax_extensions([(key, value)]).unwrap();
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

fn compress(suffix: &str, data: &[u8]) -> Vec<u8> {
    match suffix {
        "" => data.to_vec(),
        ".gz" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        ".xz" => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        ".zst" => zstd::encode_all(data, 3).unwrap(),
        other => panic!("no compressor for {other}"),
    }
}

/// Write a .deb with the given member compressions.
fn build_deb(path: &Path, control: &[u8], csuf: &str, data: &[u8], dsuf: &str) {
    let mut ar = ar::Builder::new(fs::File::create(path).unwrap());
    let members: [(String, Vec<u8>); 3] = [
        ("debian-binary".into(), b"2.0\n".to_vec()),
        (format!("control.tar{csuf}"), compress(csuf, control)),
        (format!("data.tar{dsuf}"), compress(dsuf, data)),
    ];
    for (name, bytes) in members {
        let h = ar::Header::new(name.into_bytes(), bytes.len() as u64);
        ar.append(&h, bytes.as_slice()).unwrap();
    }
    ar.into_inner().unwrap().flush().unwrap();
}

fn control_tar() -> Vec<u8> {
    T::new()
        .dir("./", 0o755)
        .file(
            "./control",
            0o644,
            0,
            0,
            b"Package: test\nVersion: 1.0\nArchitecture: amd64\n",
        )
        .file("./md5sums", 0o644, 0, 0, b"")
        .file("./postinst", 0o755, 0, 0, b"#!/bin/sh\nexit 0\n")
        .finish()
}

fn long_path() -> String {
    format!("usr/share/doc/{}/{}.txt", "x".repeat(60), "y".repeat(80))
}

fn data_tar() -> Vec<u8> {
    let caps = hex::decode(CAPS_HEX).unwrap();
    T::new()
        .dir("./", 0o755)
        .dir("./usr/", 0o755)
        .dir("./usr/bin/", 0o755)
        .pax("SCHILY.xattr.security.capability", &caps)
        .file("./usr/bin/su", 0o4755, 0, 43, b"#!/bin/su\n")
        .symlink("./usr/bin/sh", "/usr/bin/dash")
        .hardlink("./usr/bin/su2", "./usr/bin/su")
        .dir("./etc/", 0o755)
        .file("./etc/shadow", 0o640, 0, 42, b"root:*:1::::::\n")
        .file(&format!("./{}", long_path()), 0o644, 0, 0, b"long\n")
        .dir("./var/mail/", 0o2775)
        .finish()
}

fn main_deb(dir: &Path, csuf: &str, dsuf: &str) -> PathBuf {
    let deb = dir.join(format!(
        "test_1.0{}{}_amd64.deb",
        csuf.replace('.', "-"),
        dsuf.replace('.', "-")
    ));
    build_deb(&deb, &control_tar(), csuf, &data_tar(), dsuf);
    deb
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn check_unpacked(out: &Path, meta: &TreeMeta) {
    for key in [
        "",
        "control",
        "data",
        "control/control",
        "control/postinst",
        "data/usr",
        "data/usr/bin",
    ] {
        assert!(
            meta.entries.contains_key(key),
            "meta lacks {key:?}: {:?}",
            meta.entries.keys()
        );
    }
    let su = meta.get("data/usr/bin/su").unwrap();
    assert_eq!(
        (su.uid, su.gid, su.mode, su.mtime),
        (0, 43, 0o4755, 1_600_000_000)
    );
    assert_eq!(su.caps.as_deref(), Some(CAPS_HEX));
    assert_eq!(
        mode(&out.join("data/usr/bin/su")),
        0o755,
        "no setuid bit on disk"
    );
    let shadow = meta.get("data/etc/shadow").unwrap();
    assert_eq!((shadow.gid, shadow.mode), (42, 0o640));
    assert_eq!(mode(&out.join("data/etc/shadow")), 0o640);
    assert_eq!(meta.get("data/var/mail").unwrap().mode, 0o2775);
    assert_eq!(
        mode(&out.join("data/var/mail")),
        0o775,
        "no setgid bit on disk"
    );
    assert_eq!(meta.get("data/var").unwrap().mode, 0o755, "implied parent");

    let sh = out.join("data/usr/bin/sh");
    assert!(fs::symlink_metadata(&sh).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_link(&sh).unwrap(), Path::new("/usr/bin/dash"));

    let a = fs::metadata(out.join("data/usr/bin/su")).unwrap();
    let b = fs::metadata(out.join("data/usr/bin/su2")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "a real hardlink");
    assert_eq!(meta.get("data/usr/bin/su2").unwrap(), su);

    assert_eq!(
        fs::read(out.join("data").join(long_path())).unwrap(),
        b"long\n"
    );
    assert_eq!(a.mtime(), 1_600_000_000, "file mtime set on disk");
    assert!(read_control(out).unwrap().contains("Package: test\n"));
}

#[test]
fn unpack_xz_data_gz_control() {
    let tmp = tempfile::tempdir().unwrap();
    let deb = main_deb(tmp.path(), ".gz", ".xz");
    let out = tmp.path().join("out");
    let meta = unpack_deb(&deb, &out).unwrap();
    check_unpacked(&out, &meta);
}

#[test]
fn unpack_zst_and_plain_variants() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (c, d)) in [(".zst", ".zst"), ("", ".gz"), (".xz", "")]
        .into_iter()
        .enumerate()
    {
        let deb = main_deb(tmp.path(), c, d);
        let out = tmp.path().join(format!("out{i}"));
        let meta = unpack_deb(&deb, &out).unwrap_or_else(|e| panic!("{c} {d}: {e}"));
        check_unpacked(&out, &meta);
    }
}

#[test]
fn duplicates_later_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let data = T::new()
        .dir("./d/", 0o755)
        .file("./d/f", 0o644, 0, 0, b"first")
        .file("./d/f", 0o600, 5, 6, b"second")
        .dir("./d/", 0o750)
        .symlink("./d/l", "f")
        .file("./d/l", 0o644, 0, 0, b"now a file")
        .finish();
    let deb = tmp.path().join("dup_1_all.deb");
    build_deb(&deb, &control_tar(), ".gz", &data, ".xz");
    let out = tmp.path().join("out");
    let meta = unpack_deb(&deb, &out).unwrap();
    assert_eq!(fs::read(out.join("data/d/f")).unwrap(), b"second");
    let f = meta.get("data/d/f").unwrap();
    assert_eq!((f.uid, f.gid, f.mode), (5, 6, 0o600));
    assert_eq!(meta.get("data/d").unwrap().mode, 0o750);
    assert_eq!(fs::read(out.join("data/d/l")).unwrap(), b"now a file");
}

/// Unpacking `data` must fail with an error mentioning `needle`, and write nothing outside `out`.
fn refused(data: Vec<u8>, needle: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let deb = tmp.path().join("evil_1.0_all.deb");
    build_deb(&deb, &control_tar(), ".gz", &data, ".xz");
    let out = tmp.path().join("a").join("out");
    let err = unpack_deb(&deb, &out).expect_err(needle).to_string();
    assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
    assert!(err.starts_with("evil_1.0_all.deb: data.tar.xz: "), "{err}");
    let mut outside: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    outside.sort();
    assert_eq!(outside, ["a", "evil_1.0_all.deb"], "wrote outside the root");
    let a: Vec<_> = fs::read_dir(tmp.path().join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(a, ["out"], "wrote outside the root");
    err
}

#[test]
fn refuses_hostile_entries() {
    let err = refused(
        T::new().file("../etc/passwd", 0o644, 0, 0, b"x").finish(),
        "escapes the root",
    );
    assert_eq!(
        err,
        r#"evil_1.0_all.deb: data.tar.xz: entry "../etc/passwd" escapes the root: refused"#
    );
    refused(
        T::new().file("/etc/passwd", 0o644, 0, 0, b"x").finish(),
        "absolute",
    );
    refused(
        T::new()
            .dir("./usr/", 0o755)
            .file("./usr/../../x", 0o644, 0, 0, b"x")
            .finish(),
        "escapes the root",
    );
    refused(T::new().dir("./../", 0o755).finish(), "escapes the root");
    refused(T::new().symlink("./..", "x").finish(), "escapes the root");

    // Hardlinks: absolute, escaping, dangling or forward targets.
    refused(T::new().hardlink("./p", "/etc/passwd").finish(), "absolute");
    refused(
        T::new().hardlink("./p", "../x").finish(),
        "escapes the root",
    );
    refused(
        T::new()
            .hardlink("./p", "./later")
            .file("./later", 0o644, 0, 0, b"x")
            .finish(),
        "not a file extracted before",
    );
    refused(
        T::new().dir("./d/", 0o755).hardlink("./p", "./d").finish(),
        "not a file extracted before",
    );
    refused(
        T::new()
            .symlink("./s", "/etc/passwd")
            .hardlink("./p", "./s")
            .finish(),
        "not a file extracted before",
    );
    refused(
        T::new()
            .file("./p", 0o644, 0, 0, b"x")
            .hardlink("./p", "./p")
            .finish(),
        "not a file extracted before",
    );

    // Writing through a symlink extracted earlier, to a file or a directory.
    refused(
        T::new()
            .symlink("./evil", "/etc")
            .file("./evil/passwd", 0o644, 0, 0, b"x")
            .finish(),
        "goes through the symlink \"evil\"",
    );
    refused(
        T::new()
            .symlink("./evil", "..")
            .dir("./evil/a/", 0o755)
            .finish(),
        "goes through the symlink",
    );
    refused(
        T::new()
            .symlink("./evil", "../..")
            .symlink("./evil/x", "y")
            .finish(),
        "goes through the symlink",
    );
    refused(
        T::new()
            .file("./f", 0o644, 0, 0, b"x")
            .file("./f/g", 0o644, 0, 0, b"x")
            .finish(),
        "goes through the non-directory",
    );

    // Replacing a directory by something else.
    refused(
        T::new()
            .dir("./usr/", 0o755)
            .file("./usr", 0o644, 0, 0, b"x")
            .finish(),
        "replace a directory",
    );
    refused(
        T::new().dir("./usr/", 0o755).symlink("./usr", "/").finish(),
        "replace a directory",
    );
    refused(
        T::new().file("./", 0o644, 0, 0, b"x").finish(),
        "replace a directory",
    );

    // Special files.
    refused(
        T::new().special("./dev/null", EntryType::Char).finish(),
        "character device",
    );
    refused(
        T::new().special("./dev/sda", EntryType::Block).finish(),
        "block device",
    );
    refused(
        T::new().special("./run/fifo", EntryType::Fifo).finish(),
        "fifo",
    );
    refused(T::new().symlink("./l", "").finish(), "without a target");
    let latin1 = T::header(EntryType::Regular, b"./caf\xe9", 0o644, 0, 0, 0);
    refused(T::new().raw(latin1, None, b"").finish(), "not valid UTF-8");
}

#[test]
fn refuses_non_debs() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("junk.deb");
    fs::write(&p, b"not an ar archive at all").unwrap();
    let e = unpack_deb(&p, &tmp.path().join("o1"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("junk.deb: not a valid ar archive"), "{e}");

    let p = tmp.path().join("nodata.deb");
    let mut ar = ar::Builder::new(fs::File::create(&p).unwrap());
    ar.append(
        &ar::Header::new(b"debian-binary".to_vec(), 4),
        &b"2.0\n"[..],
    )
    .unwrap();
    let c = control_tar();
    ar.append(
        &ar::Header::new(b"control.tar".to_vec(), c.len() as u64),
        c.as_slice(),
    )
    .unwrap();
    drop(ar);
    let e = unpack_deb(&p, &tmp.path().join("o2"))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "nodata.deb: no data.tar member");

    let p = tmp.path().join("bz.deb");
    let mut ar = ar::Builder::new(fs::File::create(&p).unwrap());
    ar.append(
        &ar::Header::new(b"debian-binary".to_vec(), 4),
        &b"2.0\n"[..],
    )
    .unwrap();
    ar.append(
        &ar::Header::new(b"control.tar.bz2".to_vec(), 3),
        &b"abc"[..],
    )
    .unwrap();
    drop(ar);
    let e = unpack_deb(&p, &tmp.path().join("o3"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("control.tar.bz2: unsupported compression"),
        "{e}"
    );
}

/// A tar read back: path → (type, mode, uid, gid, mtime, link target, caps, contents).
type Listing = Vec<(
    String,
    EntryType,
    u32,
    u64,
    u64,
    u64,
    Option<String>,
    Option<String>,
    Vec<u8>,
)>;

fn list_tar(bytes: &[u8]) -> Listing {
    let mut a = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let h = e.header().clone();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap());
        let mut caps = None;
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                if x.key().unwrap() == "SCHILY.xattr.security.capability" {
                    caps = Some(hex::encode(x.value_bytes()));
                }
            }
        }
        assert_eq!(h.username_bytes(), Some(&b""[..]));
        assert_eq!(h.groupname_bytes(), Some(&b""[..]));
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((
            path,
            h.entry_type(),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mtime().unwrap(),
            link,
            caps,
            data,
        ));
    }
    out
}

#[test]
fn round_trip_unpack_write_tar() {
    let tmp = tempfile::tempdir().unwrap();
    let deb = main_deb(tmp.path(), ".gz", ".xz");
    let out = tmp.path().join("out");
    let meta = unpack_deb(&deb, &out).unwrap();
    let sde = 1_700_000_000;
    let bytes = write_tar(&out, &meta, sde, Vec::new()).unwrap();
    let listing = list_tar(&bytes);

    let names: Vec<&str> = listing.iter().map(|e| e.0.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "sorted bytewise");
    assert_eq!(names.first(), Some(&"control/"));
    assert!(names.contains(&format!("data/{}", long_path()).as_str()));

    // Every path of the meta except the root is there, with its ownership and mode.
    assert_eq!(listing.len(), meta.entries.len() - 1);
    for (path, etype, mode, uid, gid, mtime, link, caps, _) in &listing {
        let key = path.trim_end_matches('/');
        let m = meta.get(key).unwrap_or_else(|| panic!("{key} has no meta"));
        assert_eq!(
            (*mode, *uid, *gid),
            (m.mode, u64::from(m.uid), u64::from(m.gid)),
            "{path}"
        );
        assert_eq!(*mtime as i64, m.mtime.min(sde), "{path}");
        assert_eq!(caps, &m.caps, "{path}");
        let disk = out.join(key);
        let ft = fs::symlink_metadata(&disk).unwrap().file_type();
        match etype {
            EntryType::Directory => assert!(ft.is_dir() && path.ends_with('/')),
            EntryType::Symlink => {
                assert_eq!(
                    Path::new(link.as_ref().unwrap()),
                    fs::read_link(&disk).unwrap()
                )
            }
            EntryType::Link => assert_eq!(
                (path.as_str(), link.as_deref()),
                ("data/usr/bin/su2", Some("data/usr/bin/su"))
            ),
            EntryType::Regular => assert!(ft.is_file()),
            other => panic!("unexpected {other:?}"),
        }
    }
    let su = listing.iter().find(|e| e.0 == "data/usr/bin/su").unwrap();
    assert_eq!((su.2, su.4), (0o4755, 43));
    assert_eq!(su.8, b"#!/bin/su\n");

    // Same package unpacked elsewhere (other inodes, other directory): identical bytes.
    let out2 = tmp.path().join("elsewhere").join("out");
    let meta2 = unpack_deb(&deb, &out2).unwrap();
    assert_eq!(meta, meta2);
    let bytes2 = write_tar(&out2, &meta2, sde, Vec::new()).unwrap();
    assert!(bytes == bytes2, "write_tar is not deterministic");
}

#[test]
fn write_tar_order_defaults_and_clamping() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("tree");
    for d in ["a", "a/x", "b"] {
        fs::create_dir_all(t.join(d)).unwrap();
    }
    for f in ["a-b", "a0", "a/x/f", "b/g"] {
        fs::write(t.join(f), f).unwrap();
    }
    fs::set_permissions(t.join("a0"), fs::Permissions::from_mode(0o640)).unwrap();
    let mut meta = TreeMeta::default();
    let em = |mtime| EntryMeta {
        uid: 7,
        gid: 8,
        mode: 0o1777,
        mtime,
        caps: None,
        acls: Default::default(),
    };
    meta.entries.insert("b".into(), em(10));
    meta.entries.insert("b/g".into(), em(5_000));
    let bytes = write_tar(&t, &meta, 1_000, Vec::new()).unwrap();
    let l = list_tar(&bytes);
    let names: Vec<&str> = l.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ["a-b", "a/", "a/x/", "a/x/f", "a0", "b/", "b/g"]);
    let a0 = &l[4];
    assert_eq!(
        (a0.2, a0.3, a0.4, a0.5),
        (0o640, 0, 0, 1_000),
        "defaults without meta"
    );
    let b = &l[5];
    assert_eq!((b.2, b.3, b.4, b.5), (0o1777, 7, 8, 10));
    assert_eq!(l[6].5, 1_000, "mtime clamped to SOURCE_DATE_EPOCH");
    // Raw header checks: ustar magic, no device garbage, trailing zero blocks.
    assert_eq!(&bytes[257..263], b"ustar\0");
    assert!(bytes.len() % 512 == 0 && bytes[bytes.len() - 1024..].iter().all(|&b| b == 0));
}

#[test]
fn write_tar_very_long_names_use_pax() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("tree");
    let deep = format!("{}/{}", "d".repeat(200), "e".repeat(120));
    fs::create_dir_all(t.join(&deep)).unwrap();
    let long_file = format!("{deep}/{}", "f".repeat(150));
    fs::write(t.join(&long_file), b"x").unwrap();
    let target = "t".repeat(150);
    std::os::unix::fs::symlink(&target, t.join(&deep).join("l")).unwrap();
    let bytes = write_tar(&t, &TreeMeta::default(), 0, Vec::new()).unwrap();
    let l = list_tar(&bytes);
    let names: Vec<&str> = l.iter().map(|e| e.0.as_str()).collect();
    let d0 = format!("{}/", "d".repeat(200));
    let d1 = format!("{deep}/");
    let ln = format!("{deep}/l");
    assert_eq!(
        names,
        [d0.as_str(), d1.as_str(), long_file.as_str(), ln.as_str()]
    );
    assert_eq!(l[3].6.as_deref(), Some(target.as_str()));
}

fn make_layer(dir: &Path, name: &str) -> Layer {
    let tree = dir.join(format!("{name}-tree"));
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("hello"), format!("hello from {name}\n")).unwrap();
    fs::write(tree.join("etc/os-release"), "ID=test\n").unwrap();
    let tar_path = dir.join(format!("{name}.tar"));
    let mut meta = TreeMeta::default();
    for (k, mode) in [("etc", 0o755), ("etc/os-release", 0o644), ("hello", 0o644)] {
        meta.entries.insert(k.into(), EntryMeta::root(mode, 1));
    }
    write_tar(&tree, &meta, 100, fs::File::create(&tar_path).unwrap()).unwrap();
    let blob = dir.join(format!("{name}.tar.gz"));
    gzip_parallel(
        fs::File::open(&tar_path).unwrap(),
        fs::File::create(&blob).unwrap(),
        6,
        2,
    )
    .unwrap();
    let (diff, _) = oci::sha256_file(&tar_path).unwrap();
    let (digest, size) = oci::sha256_file(&blob).unwrap();
    Layer {
        blob_path: blob,
        media_type: oci::MEDIA_TYPE_LAYER_GZIP.into(),
        diff_id: format!("sha256:{diff}"),
        digest: format!("sha256:{digest}"),
        size,
        created_by: format!("rbuild test layer {name}"),
    }
}

fn test_config() -> ImageConfig {
    ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        created: oci::rfc3339(1_700_000_000),
        cmd: Some(vec!["/bin/sh".into()]),
        entrypoint: None,
        env: vec!["PATH=/usr/bin:/bin".into()],
        user: None,
        working_dir: Some("/".into()),
        labels: BTreeMap::from([
            ("org.example.b".into(), "2".into()),
            ("org.example.a".into(), "1".into()),
        ]),
    }
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let path = layout.join("blobs/sha256").join(hex);
    let (got, _) = oci::sha256_file(&path).unwrap();
    assert_eq!(got, hex, "blob {digest} has the wrong contents");
    fs::read(path).unwrap()
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn oci_layout_is_consistent_and_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = [
        make_layer(tmp.path(), "base"),
        make_layer(tmp.path(), "top"),
    ];
    let config = test_config();
    let l1 = tmp.path().join("image1");
    let l2 = tmp.path().join("image2");
    let d1 =
        oci::write_layout(&l1, &layers, &config, Some("test:1"), oci::LayerBlobs::Copy).unwrap();
    let d2 =
        oci::write_layout(&l2, &layers, &config, Some("test:1"), oci::LayerBlobs::Copy).unwrap();
    assert_eq!(d1, d2);

    assert_eq!(
        json(&fs::read(l1.join("oci-layout")).unwrap())["imageLayoutVersion"],
        "1.0.0"
    );
    let index = json(&fs::read(l1.join("index.json")).unwrap());
    assert_eq!(index["schemaVersion"], 2);
    let m = &index["manifests"][0];
    assert_eq!(m["mediaType"], oci::MEDIA_TYPE_MANIFEST);
    assert_eq!(m["digest"], d1.as_str());
    assert_eq!(m["annotations"][oci::ANNOTATION_REF_NAME], "test:1");
    assert_eq!(m["platform"]["architecture"], "amd64");
    let manifest_bytes = blob(&l1, &d1);
    assert_eq!(m["size"], manifest_bytes.len() as u64);
    let manifest = json(&manifest_bytes);
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], oci::MEDIA_TYPE_MANIFEST);

    let cdesc = &manifest["config"];
    assert_eq!(cdesc["mediaType"], oci::MEDIA_TYPE_CONFIG);
    let config_bytes = blob(&l1, cdesc["digest"].as_str().unwrap());
    assert_eq!(cdesc["size"], config_bytes.len() as u64);
    let cfg = json(&config_bytes);
    assert_eq!(cfg["architecture"], "amd64");
    assert_eq!(cfg["os"], "linux");
    assert_eq!(cfg["created"], "2023-11-14T22:13:20Z");
    assert_eq!(cfg["config"]["Cmd"][0], "/bin/sh");
    assert!(cfg["config"].get("Entrypoint").is_none() && cfg["config"].get("User").is_none());
    assert_eq!(cfg["config"]["Labels"]["org.example.a"], "1");
    assert_eq!(cfg["rootfs"]["type"], "layers");
    assert_eq!(cfg["history"].as_array().unwrap().len(), 2);
    assert_eq!(cfg["history"][1]["created_by"], "rbuild test layer top");

    let mlayers = manifest["layers"].as_array().unwrap();
    assert_eq!(mlayers.len(), 2);
    for (i, (desc, layer)) in mlayers.iter().zip(&layers).enumerate() {
        assert_eq!(desc["mediaType"], oci::MEDIA_TYPE_LAYER_GZIP);
        let bytes = blob(&l1, desc["digest"].as_str().unwrap());
        assert_eq!(desc["size"], bytes.len() as u64);
        // The diff_id is the sha256 of the decompressed blob.
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes.as_slice())
            .read_to_end(&mut tar)
            .unwrap();
        let diff = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&tar))
        );
        assert_eq!(cfg["rootfs"]["diff_ids"][i], diff.as_str());
        assert_eq!(diff, layer.diff_id);
    }

    // Byte-identical layouts.
    let files = |root: &Path| -> BTreeMap<PathBuf, Vec<u8>> {
        let mut m = BTreeMap::new();
        let mut stack = vec![root.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    m.insert(
                        p.strip_prefix(root).unwrap().to_owned(),
                        fs::read(&p).unwrap(),
                    );
                }
            }
        }
        m
    };
    assert!(files(&l1) == files(&l2), "layouts differ");
    assert_eq!(
        files(&l1).len(),
        2 + 2 + 2,
        "oci-layout, index.json, 2 layers, config, manifest"
    );
}

#[test]
fn oci_layout_rejects_wrong_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layer = make_layer(tmp.path(), "base");
    layer.size += 1;
    let e = oci::write_layout(
        &tmp.path().join("img"),
        &[layer.clone()],
        &test_config(),
        None,
        oci::LayerBlobs::Copy,
    )
    .unwrap_err();
    assert!(matches!(e, ArchiveError::Tree { .. }), "{e}");
    layer.size -= 1;
    layer.digest = format!("sha256:{}", "0".repeat(64));
    assert!(oci::write_layout(
        &tmp.path().join("img"),
        &[layer.clone()],
        &test_config(),
        None,
        oci::LayerBlobs::Copy,
    )
    .is_err());
    let stray: Vec<_> = fs::read_dir(tmp.path().join("img/blobs/sha256"))
        .unwrap()
        .collect();
    assert!(stray.is_empty(), "temporary blob left behind");
}

/// Whether `name` (from the Debian package of the same name) is installed; if not, the check is
/// skipped the shared way (a failure under CI).
fn tool(name: &str) -> bool {
    crate::skip::have_tool(
        &format!("oci_layout_accepted_by_skopeo_and_umoci: the {name} check"),
        name,
        name,
    )
}

/// Two documents attached to `layout`'s image as referrers.
fn attach_two(tmp: &Path, layout: &Path) -> Vec<String> {
    let spdx = tmp.join("doc.spdx.json");
    fs::write(&spdx, br#"{"spdxVersion":"SPDX-2.3"}"#).unwrap();
    let cdx = tmp.join("doc.cdx.json");
    fs::write(&cdx, br#"{"bomFormat":"CycloneDX"}"#).unwrap();
    let refs = [
        oci::Referrer {
            artifact_type: "application/spdx+json".into(),
            path: spdx,
        },
        oci::Referrer {
            artifact_type: "application/vnd.cyclonedx+json".into(),
            path: cdx,
        },
    ];
    oci::attach_referrers(layout, &refs, "2023-11-14T22:13:20Z").unwrap()
}

#[test]
fn referrers_name_the_image_and_leave_its_index_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = [make_layer(tmp.path(), "base")];
    let layout = tmp.path().join("image");
    let image = oci::write_layout(
        &layout,
        &layers,
        &test_config(),
        Some("t"),
        oci::LayerBlobs::Copy,
    )
    .unwrap();
    let index_before = fs::read(layout.join("index.json")).unwrap();
    let digests = attach_two(tmp.path(), &layout);
    assert_eq!(fs::read(layout.join("index.json")).unwrap(), index_before);

    let refs = json(&fs::read(layout.join("referrers/index.json")).unwrap());
    let listed = refs["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{refs}");
    assert_eq!(listed[0], json(&index_before)["manifests"][0]);
    // The referrers layout reads the image layout's blobs.
    assert_eq!(
        fs::read_link(layout.join("referrers/blobs")).unwrap(),
        Path::new("../blobs")
    );
    let image_size = blob(&layout, &image).len() as u64;
    for (desc, (digest, (kind, body))) in listed[1..].iter().zip(digests.iter().zip([
        ("application/spdx+json", "SPDX-2.3"),
        ("application/vnd.cyclonedx+json", "CycloneDX"),
    ])) {
        assert_eq!(desc["digest"], digest.as_str());
        assert_eq!(desc["artifactType"], kind);
        let m = json(&blob(&layout.join("referrers"), digest));
        assert_eq!(m["mediaType"], oci::MEDIA_TYPE_MANIFEST);
        assert_eq!(m["artifactType"], kind);
        assert_eq!(m["subject"]["digest"], image.as_str());
        assert_eq!(m["subject"]["size"], image_size);
        assert_eq!(m["subject"]["mediaType"], oci::MEDIA_TYPE_MANIFEST);
        assert_eq!(m["config"]["mediaType"], oci::MEDIA_TYPE_EMPTY);
        assert_eq!(
            blob(&layout, m["config"]["digest"].as_str().unwrap()),
            b"{}"
        );
        assert_eq!(m["layers"][0]["mediaType"], kind);
        let doc = blob(&layout, m["layers"][0]["digest"].as_str().unwrap());
        assert!(String::from_utf8(doc).unwrap().contains(body));
        assert_eq!(
            m["annotations"][oci::ANNOTATION_CREATED],
            "2023-11-14T22:13:20Z"
        );
    }
}

#[test]
fn multi_platform_layout_keeps_each_images_referrers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    let mut artifacts = Vec::new();
    for arch in ["amd64", "arm64"] {
        let layers = [make_layer(tmp.path(), arch)];
        let layout = tmp.path().join(arch);
        let mut config = test_config();
        config.architecture = arch.into();
        oci::write_layout(&layout, &layers, &config, None, oci::LayerBlobs::Copy).unwrap();
        artifacts.extend(attach_two(tmp.path(), &layout));
        images.push(layout);
    }
    let out = tmp.path().join("multi");
    let paths: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    let top = oci::write_multi_platform_layout(&out, &paths, Some("m")).unwrap();
    let index = json(&fs::read(out.join("index.json")).unwrap());
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    let refs = json(&fs::read(out.join("referrers/index.json")).unwrap());
    let listed = refs["manifests"].as_array().unwrap();
    assert_eq!(listed[0]["digest"], top.as_str());
    assert_eq!(listed[0]["annotations"][oci::ANNOTATION_REF_NAME], "m");
    let got: Vec<&str> = listed[1..]
        .iter()
        .map(|d| d["digest"].as_str().unwrap())
        .collect();
    assert_eq!(got, artifacts);
    // Each image's two, in order, name that image's manifest, which the inner index lists.
    let inner = json(&blob(&out, &top));
    let manifests: Vec<&str> = inner["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(manifests.len(), 2);
    for (i, d) in got.iter().enumerate() {
        // Every artifact manifest and the document it carries were copied in.
        let m = json(&blob(&out, d));
        blob(&out, m["layers"][0]["digest"].as_str().unwrap());
        assert_eq!(m["subject"]["digest"], manifests[i / 2], "{m}");
    }
}

#[test]
fn oci_layout_accepted_by_skopeo_and_umoci() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = [make_layer(tmp.path(), "base")];
    let layout = tmp.path().join("image");
    oci::write_layout(
        &layout,
        &layers,
        &test_config(),
        Some("test"),
        oci::LayerBlobs::Copy,
    )
    .unwrap();
    // The form every rbuild image has: referrers attached.
    attach_two(tmp.path(), &layout);
    let image = format!("{}:test", layout.display());

    if tool("skopeo") {
        // By tag, without one (the layout's only image), and through the referrers layout.
        let untagged = layout.display().to_string();
        let through = format!("{}/referrers:test", layout.display());
        for name in [&image, &untagged, &through] {
            let o = Command::new("skopeo")
                .args(["inspect", &format!("oci:{name}")])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "skopeo inspect oci:{name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let v = json(&o.stdout);
            assert_eq!(v["Architecture"], "amd64");
            assert_eq!(v["Layers"].as_array().unwrap().len(), 1);
        }
    }
    if tool("umoci") {
        let bundle = tmp.path().join("bundle");
        let o = Command::new("umoci")
            .args(["unpack", "--rootless", "--image", &image])
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "umoci unpack: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            fs::read_to_string(bundle.join("rootfs/hello")).unwrap(),
            "hello from base\n"
        );
    }
}

#[test]
fn write_tar_hardlinks_only_with_equal_meta() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("tree");
    fs::create_dir(&t).unwrap();
    fs::write(t.join("a"), b"same inode").unwrap();
    fs::hard_link(t.join("a"), t.join("b")).unwrap();
    fs::hard_link(t.join("a"), t.join("c")).unwrap();
    let mut meta = TreeMeta::default();
    let em = |mode| EntryMeta::root(mode, 0);
    meta.entries.insert("a".into(), em(0o755));
    meta.entries.insert("b".into(), em(0o755));
    meta.entries.insert("c".into(), em(0o4755));
    let l = list_tar(&write_tar(&t, &meta, 0, Vec::new()).unwrap());
    assert_eq!(
        (l[0].1, l[0].8.as_slice()),
        (EntryType::Regular, &b"same inode"[..])
    );
    assert_eq!((l[1].1, l[1].6.as_deref()), (EntryType::Link, Some("a")));
    assert_eq!(
        (l[2].1, l[2].2, l[2].8.as_slice()),
        (EntryType::Regular, 0o4755, &b"same inode"[..])
    );
}

/// Run a tool if it is installed; `None` if it is not, after skipping `test` the shared way (a
/// failure under CI) naming `package`, which provides the tool.
fn run(test: &str, package: &str, cmd: &mut Command) -> Option<std::process::Output> {
    match cmd.output() {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::skip::skip(
                test,
                &format!("{:?} is not installed", cmd.get_program()),
                &format!("install it (Debian/Ubuntu: `apt install {package}`)"),
            );
            None
        }
        Err(e) => panic!("running {cmd:?}: {e}"),
    }
}

#[test]
fn unpack_debs_built_by_dpkg_deb() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    fs::write(
        pkg.join("DEBIAN/control"),
        "Package: real\nVersion: 1.0\nArchitecture: all\nMaintainer: T <t@example.org>\nDescription: t\n",
    )
    .unwrap();
    let doc = pkg.join("usr/share/doc/real").join("z".repeat(90));
    fs::create_dir_all(&doc).unwrap();
    fs::write(doc.join("w".repeat(90)), b"doc").unwrap();
    fs::create_dir_all(pkg.join("usr/bin")).unwrap();
    fs::write(pkg.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(pkg.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(pkg.join("usr/bin/tool"), pkg.join("usr/bin/tool2")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/tool", pkg.join("usr/bin/abs")).unwrap();
    for comp in ["xz", "gzip", "zstd", "none"] {
        let deb = tmp.path().join(format!("real_{comp}.deb"));
        let Some(o) = run(
            "unpack_debs_built_by_dpkg_deb",
            "dpkg",
            Command::new("dpkg-deb")
                .args(["--root-owner-group", &format!("-Z{comp}"), "--build"])
                .arg(&pkg)
                .arg(&deb),
        ) else {
            return;
        };
        if !o.status.success() {
            crate::skip::skip(
                &format!("unpack_debs_built_by_dpkg_deb: -Z{comp}"),
                &format!(
                    "this dpkg-deb cannot build it: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                "use a dpkg-deb that supports it (dpkg 1.21.18 or later for zstd)",
            );
            continue;
        }
        let out = tmp.path().join(format!("out-{comp}"));
        let meta = unpack_deb(&deb, &out).unwrap_or_else(|e| panic!("{comp}: {e}"));
        let tool = meta.get("data/usr/bin/tool").unwrap();
        assert_eq!((tool.uid, tool.gid, tool.mode), (0, 0, 0o4755), "{comp}");
        assert_eq!(mode(&out.join("data/usr/bin/tool")), 0o755);
        let a = fs::metadata(out.join("data/usr/bin/tool")).unwrap();
        let b = fs::metadata(out.join("data/usr/bin/tool2")).unwrap();
        assert_eq!(a.ino(), b.ino(), "{comp}: hardlink");
        assert_eq!(
            fs::read_link(out.join("data/usr/bin/abs")).unwrap(),
            Path::new("/usr/bin/tool")
        );
        let long = format!(
            "data/usr/share/doc/real/{}/{}",
            "z".repeat(90),
            "w".repeat(90)
        );
        assert_eq!(fs::read(out.join(&long)).unwrap(), b"doc");
        assert!(meta.entries.contains_key(&long));
        assert!(read_control(&out).unwrap().starts_with("Package: real\n"));
    }
}

#[test]
fn gnu_tar_and_gzip_read_our_output() {
    let tmp = tempfile::tempdir().unwrap();
    let deb = main_deb(tmp.path(), ".gz", ".xz");
    let out = tmp.path().join("out");
    let meta = unpack_deb(&deb, &out).unwrap();
    let tar_path = tmp.path().join("t.tar");
    write_tar(
        &out,
        &meta,
        1_700_000_000,
        fs::File::create(&tar_path).unwrap(),
    )
    .unwrap();
    let Some(o) = run(
        "gnu_tar_and_gzip_read_our_output",
        "tar",
        Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(&tar_path),
    ) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "tar: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("-rwsr-xr-x 0/43 ") && l.ends_with(" data/usr/bin/su")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(" data/{}\n", long_path())),
        "{stdout}"
    );
    assert!(
        stdout.contains(" data/usr/bin/su2 link to data/usr/bin/su\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains(" data/usr/bin/sh -> /usr/bin/dash\n"),
        "{stdout}"
    );

    let gz = tmp.path().join("t.tar.gz");
    gzip_parallel(
        fs::File::open(&tar_path).unwrap(),
        fs::File::create(&gz).unwrap(),
        6,
        2,
    )
    .unwrap();
    if let Some(o) = run(
        "gnu_tar_and_gzip_read_our_output: gzip -t",
        "gzip",
        Command::new("gzip").arg("-t").arg(&gz),
    ) {
        assert!(
            o.status.success(),
            "gzip -t: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// POSIX ACLs recorded in the metadata reach the tar as GNU tar `--xattrs` writes them (raw
/// values under `SCHILY.xattr.system.posix_acl_*`); a name that is no ACL is refused.
#[test]
fn write_tar_carries_posix_acls() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("tree");
    fs::create_dir_all(t.join("journal")).unwrap();
    // version 2; user::rwx, group::r-x, group:101:r-x, mask::r-x, other::r-x
    let acl =
        "02000000010007000000000004000500000000000800050065000000100005000000000020000500ffffffff";
    let mut e = EntryMeta::root(0o2755, 0);
    e.acls.insert("system.posix_acl_access".into(), acl.into());
    e.acls.insert("system.posix_acl_default".into(), acl.into());
    let mut meta = TreeMeta::default();
    meta.entries.insert("journal".into(), e.clone());
    let bytes = write_tar(&t, &meta, 0, Vec::new()).unwrap();
    let mut found = std::collections::BTreeMap::new();
    let mut ar = tar::Archive::new(&bytes[..]);
    for entry in ar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if let Some(exts) = entry.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                found.insert(x.key().unwrap().to_owned(), hex::encode(x.value_bytes()));
            }
        }
    }
    assert_eq!(found["SCHILY.xattr.system.posix_acl_access"], acl);
    assert_eq!(found["SCHILY.xattr.system.posix_acl_default"], acl);

    e.acls.insert("user.other".into(), "00".into());
    meta.entries.insert("journal".into(), e);
    let err = write_tar(&t, &meta, 0, Vec::new()).unwrap_err().to_string();
    assert!(
        err.contains("unknown ACL") && err.contains("user.other"),
        "{err}"
    );
}

/// zstd layers are the same bytes from every rbuild linking the same zstd: a fixed input's
/// frame has a pinned digest. A new zstd library may change it — then the layer argument
/// (`zstd@VERSION`, part of the derivation hash) changes with it, and this digest is re-pinned.
#[test]
fn zstd_layers_are_pinned_bytes() {
    let mut input = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..200_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half text, half noise: both of zstd's paths.
        if i % 2 == 0 {
            input.extend_from_slice(format!("line {i}\n").as_bytes());
        } else {
            input.push(x as u8);
        }
    }
    let mut out = Vec::new();
    super::tar_out::zstd_reproducible(input.as_slice(), &mut out).unwrap();
    assert_eq!(zstd::decode_all(out.as_slice()).unwrap(), input);
    assert_eq!(super::tar_out::zstd_layer_arg(), "zstd@1.5.7");
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&out)),
        "e16649bd3a536ad28d8dc44309dc1d8e6e9057fed5a2644f93475d61527cfd12"
    );
}

/// The members of an ar archive: name and bytes.
fn ar_members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut ar = ar::Archive::new(fs::File::open(path).unwrap());
    let mut out = Vec::new();
    while let Some(m) = ar.next_entry() {
        let mut m = m.unwrap();
        let name = String::from_utf8_lossy(m.header().identifier()).into_owned();
        let mut bytes = Vec::new();
        m.read_to_end(&mut bytes).unwrap();
        out.push((name, bytes));
    }
    out
}

#[test]
fn decompress_data_keeps_the_package_and_its_tar() {
    let tmp = tempfile::tempdir().unwrap();
    for dsuf in ["", ".gz", ".xz", ".zst"] {
        // With a member dpkg ignores, of odd size: the next header must follow its padding.
        let deb = tmp.path().join(format!("test{dsuf}.deb"));
        let mut ar = ar::Builder::new(fs::File::create(&deb).unwrap());
        for (name, bytes) in [
            ("debian-binary".to_owned(), b"2.0\n".to_vec()),
            ("_odd".to_owned(), b"abc".to_vec()),
            ("control.tar.xz".to_owned(), compress(".xz", &control_tar())),
            (format!("data.tar{dsuf}"), compress(dsuf, &data_tar())),
        ] {
            let h = ar::Header::new(name.into_bytes(), bytes.len() as u64);
            ar.append(&h, bytes.as_slice()).unwrap();
        }
        ar.into_inner().unwrap().flush().unwrap();
        let out = tmp.path().join(format!("plain{dsuf}.deb"));
        decompress_data(&deb, &out).unwrap();
        let (before, after) = (ar_members(&deb), ar_members(&out));
        let names: Vec<&str> = after.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["debian-binary", "_odd", "control.tar.xz", "data.tar"],
            "{dsuf}"
        );
        assert_eq!(before[..3], after[..3], "{dsuf}");
        assert_eq!(after[3].1, data_tar(), "{dsuf}");
        let a = unpack_deb(&deb, &tmp.path().join(format!("a{dsuf}"))).unwrap();
        let b = unpack_deb(&out, &tmp.path().join(format!("b{dsuf}"))).unwrap();
        assert_eq!(a.entries, b.entries, "{dsuf}");
        // dpkg reads it as the same package with the same files.
        let Some(o) = run(
            "decompress_data_keeps_the_package_and_its_tar",
            "dpkg",
            Command::new("dpkg-deb").arg("--fsys-tarfile").arg(&out),
        ) else {
            return;
        };
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.stdout, data_tar(), "{dsuf}");
        let o = Command::new("dpkg-deb")
            .args(["--field"])
            .arg(&out)
            .arg("Package")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "test", "{dsuf}");
    }
    // A member cut short is an error, not a header that promises more than follows.
    let whole = fs::read(tmp.path().join("test.xz.deb")).unwrap();
    let cut = tmp.path().join("cut.deb");
    fs::write(&cut, &whole[..8 + 60 + 4 + 60 + 4 + 60 + 20]).unwrap();
    let e = decompress_data(&cut, &tmp.path().join("cut-plain.deb"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cut.deb") && e.contains("control.tar.xz"), "{e}");
    let broken = tmp.path().join("broken.deb");
    fs::write(&broken, b"!<arch>\n").unwrap();
    let e = decompress_data(&broken, &tmp.path().join("x.deb"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("broken.deb") && e.contains("no data.tar"), "{e}");
}
