//! Ownership in trees, inside the sandbox (where we are root of the user namespace).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rbuild_store::meta::{EntryMeta, TreeMeta, ACL_XATTRS};

use super::SandboxError;

const CAPS: &std::ffi::CStr = c"security.capability";

fn cpath(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| SandboxError::Unsupported(format!("{}: path contains NUL", p.display())))
}

fn os_err(what: String) -> SandboxError {
    SandboxError::Setup {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// The raw `security.capability` xattr of a file, if it has one.
pub fn read_caps(p: &Path) -> Result<Option<Vec<u8>>, SandboxError> {
    read_xattr(p, CAPS, 64)
}

/// The raw value of xattr `name` of `p` (up to `max` bytes), if it has one.
fn read_xattr(
    p: &Path,
    name: &std::ffi::CStr,
    max: usize,
) -> Result<Option<Vec<u8>>, SandboxError> {
    let c = cpath(p)?;
    let mut buf = vec![0u8; max];
    // SAFETY: valid NUL-terminated path and name, and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(None),
            _ => Err(SandboxError::Setup {
                what: format!("reading {} of {}", name.to_string_lossy(), p.display()),
                source: e,
            }),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

/// Set xattr `name` of `p` to `value`.
fn set_xattr(p: &Path, name: &str, value: &[u8]) -> Result<(), SandboxError> {
    let c = cpath(p)?;
    let n = CString::new(name).map_err(|_| SandboxError::Unsupported("xattr name".into()))?;
    // SAFETY: valid path, name and value buffer.
    if unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    } != 0
    {
        return Err(os_err(format!("setting {name} on {}", p.display())));
    }
    Ok(())
}

/// Remove xattr `name` of `p`.
fn remove_xattr(p: &Path, name: &std::ffi::CStr) -> Result<(), SandboxError> {
    let c = cpath(p)?;
    // SAFETY: valid path and name.
    if unsafe { libc::lremovexattr(c.as_ptr(), name.as_ptr()) } != 0 {
        return Err(os_err(format!(
            "removing {} of {}",
            name.to_string_lossy(),
            p.display()
        )));
    }
    Ok(())
}

/// The POSIX ACLs of a file or directory, by xattr name (raw values).
fn read_acls(p: &Path) -> Result<Vec<(&'static str, Vec<u8>)>, SandboxError> {
    let mut out = Vec::new();
    for name in ACL_XATTRS {
        let c = CString::new(name).expect("no NUL in ACL xattr names");
        // An ACL entry is 8 bytes after a 4-byte header; 64 KiB is the kernel's xattr limit.
        if let Some(v) = read_xattr(p, &c, 65536)? {
            out.push((name, v));
        }
    }
    Ok(out)
}

fn lchown(p: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        p,
        Some(uid.into()),
        Some(gid.into()),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| SandboxError::Setup {
        what: format!("chown {}", p.display()),
        source: e.into(),
    })
}

/// Set the modification time of `p` (the symlink itself, not what it points to) to `mtime`
/// seconds since the epoch, as dpkg sets a file it unpacks to its tar entry's time.
pub fn set_entry_mtime(p: &Path, mtime: i64) -> Result<(), SandboxError> {
    set_times(p, nix::sys::time::TimeSpec::new(mtime, 0), None)
}

/// Give `p` (a symlink itself, not what it points to) the modification time `mtime`, and the
/// access time `atime` (None: left as it is).
pub(super) fn set_times(
    p: &Path,
    mtime: nix::sys::time::TimeSpec,
    atime: Option<nix::sys::time::TimeSpec>,
) -> Result<(), SandboxError> {
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &atime.unwrap_or(nix::sys::time::TimeSpec::UTIME_OMIT),
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| SandboxError::Setup {
        what: format!("setting mtime of {}", p.display()),
        source: e.into(),
    })
}

pub fn apply_meta(p: &Path, e: &EntryMeta) -> Result<(), SandboxError> {
    let md = fs::symlink_metadata(p).map_err(|source| SandboxError::Setup {
        what: format!("stat {}", p.display()),
        source,
    })?;
    lchown(p, e.uid, e.gid)?;
    if !md.file_type().is_symlink() {
        fs::set_permissions(p, fs::Permissions::from_mode(e.mode)).map_err(|source| {
            SandboxError::Setup {
                what: format!("chmod {}", p.display()),
                source,
            }
        })?;
        if let Some(hex) = &e.caps {
            let bytes = hex::decode(hex).map_err(|_| {
                SandboxError::Unsupported(format!("{}: bad caps metadata", p.display()))
            })?;
            set_xattr(p, "security.capability", &bytes)?;
        }
        for (name, hex) in &e.acls {
            let bytes = hex::decode(hex).map_err(|_| {
                SandboxError::Unsupported(format!("{}: bad {name} metadata", p.display()))
            })?;
            set_xattr(p, name, &bytes)?;
        }
        // An entry made below a directory with a default ACL inherits it: only the recorded
        // ACLs stay.
        for name in ACL_XATTRS.iter().filter(|n| !e.acls.contains_key(**n)) {
            let c = CString::new(*name).expect("no NUL in ACL xattr names");
            if let Err(err) = remove_xattr(p, &c) {
                let absent = matches!(&err, SandboxError::Setup { source, .. }
                    if matches!(source.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP)));
                if !absent {
                    return Err(err);
                }
            }
        }
    }
    let t = nix::sys::time::TimeSpec::new(e.mtime, 0);
    set_times(p, t, Some(t))
}

/// Record the real ownership, mode, mtime (clamped to `clamp`), capabilities and POSIX ACLs of
/// every entry under `root` into a [`TreeMeta`], then make the tree plain: owned by uid/gid 0
/// of the namespace (the invoking user on the host), owner-readable/writable, no
/// setuid/setgid/sticky bits, no capabilities, no ACLs. Fifos, sockets and device nodes are removed (they are recreated by a
/// container runtime, never shipped in a root filesystem).
pub fn normalize_tree(root: &Path, clamp: i64) -> Result<TreeMeta, SandboxError> {
    let mut meta = TreeMeta::default();
    let mut links = HashMap::new();
    walk(root, "", clamp, &mut meta, &mut links)?;
    Ok(meta)
}

/// The metadata of `p` as [`normalize_tree`] records it (mtime clamped to `clamp`), leaving `p`
/// as it is.
pub fn entry_meta(p: &Path, clamp: i64) -> Result<EntryMeta, SandboxError> {
    let md = fs::symlink_metadata(p).map_err(|source| SandboxError::Setup {
        what: format!("stat {}", p.display()),
        source,
    })?;
    Ok(read_entry(p, &md, clamp)?.0)
}

/// Raw capabilities and ACLs of an entry.
type RawXattrs = (Option<Vec<u8>>, Vec<(&'static str, Vec<u8>)>);

/// `p`'s [`EntryMeta`] from its `md`, with the raw capabilities and ACLs it was made from.
fn read_entry(
    p: &Path,
    md: &fs::Metadata,
    clamp: i64,
) -> Result<(EntryMeta, RawXattrs), SandboxError> {
    let ft = md.file_type();
    let (caps, acls): RawXattrs = (
        if ft.is_file() { read_caps(p)? } else { None },
        if ft.is_symlink() {
            vec![]
        } else {
            read_acls(p)?
        },
    );
    let entry = EntryMeta {
        uid: md.uid(),
        gid: md.gid(),
        mode: md.mode() & 0o7777,
        mtime: md.mtime().min(clamp),
        caps: caps.as_ref().map(hex::encode),
        acls: acls
            .iter()
            .map(|(n, v)| ((*n).to_owned(), hex::encode(v)))
            .collect(),
    };
    Ok((entry, (caps, acls)))
}

/// Whether `md` is an overlay whiteout (a character device 0/0): the path is deleted.
pub fn is_whiteout(md: &fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    md.file_type().is_char_device() && md.rdev() == 0
}

/// Whether the upper directory `dir` is opaque (`user.overlay.opaque`, as an overlay mounted
/// with `userxattr` marks a directory that replaced a lower one): nothing below it shows through.
pub fn is_opaque(dir: &Path) -> Result<bool, SandboxError> {
    Ok(read_xattr(dir, c"user.overlay.opaque", 8)?.as_deref() == Some(b"y"))
}

/// Whether files made in `dir` keep POSIX ACLs (a tmpfs without `CONFIG_TMPFS_POSIX_ACL` does
/// not, and a tree made there would record none).
pub fn keeps_acls(dir: &Path) -> bool {
    let probe = dir.join(".rbuild-acl-probe");
    if fs::write(&probe, b"").is_err() {
        return false;
    }
    // The access ACL equal to mode 0644: user::rw-, group::r--, other::r--.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm) in [(0x01u16, 6u16), (0x04, 4), (0x20, 4)] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    let ok = set_xattr(&probe, "system.posix_acl_access", &acl).is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

/// Hardlinked files: the metadata read at the first name (later names see it already normalized).
type Links = HashMap<(u64, u64), EntryMeta>;

fn walk(
    p: &Path,
    rel: &str,
    clamp: i64,
    meta: &mut TreeMeta,
    links: &mut Links,
) -> Result<(), SandboxError> {
    let md = fs::symlink_metadata(p).map_err(|source| SandboxError::Setup {
        what: format!("stat {}", p.display()),
        source,
    })?;
    let ft = md.file_type();
    if !(ft.is_dir() || ft.is_file() || ft.is_symlink()) {
        fs::remove_file(p).map_err(|source| SandboxError::Setup {
            what: format!("removing special file {}", p.display()),
            source,
        })?;
        return Ok(());
    }
    if ft.is_file() && md.nlink() > 1 {
        if let Some(first) = links.get(&(md.dev(), md.ino())) {
            meta.entries.insert(rel.to_owned(), first.clone());
            return Ok(());
        }
    }
    let (entry, (caps, acls)) = read_entry(p, &md, clamp)?;
    if ft.is_file() && md.nlink() > 1 {
        links.insert((md.dev(), md.ino()), entry.clone());
    }
    meta.entries.insert(rel.to_owned(), entry);
    if md.uid() != 0 || md.gid() != 0 {
        lchown(p, 0, 0)?;
    }
    if caps.is_some() {
        remove_xattr(p, CAPS)?;
    }
    for (name, _) in &acls {
        remove_xattr(p, &CString::new(*name).expect("no NUL in ACL xattr names"))?;
    }
    if !ft.is_symlink() {
        let plain = (md.mode() & 0o777) | if ft.is_dir() { 0o700 } else { 0o600 };
        if md.mode() & 0o7777 != plain {
            fs::set_permissions(p, fs::Permissions::from_mode(plain)).map_err(|source| {
                SandboxError::Setup {
                    what: format!("chmod {}", p.display()),
                    source,
                }
            })?;
        }
    }
    if ft.is_dir() {
        let entries = fs::read_dir(p).map_err(|source| SandboxError::Setup {
            what: format!("reading {}", p.display()),
            source,
        })?;
        for e in entries {
            let e = e.map_err(|source| SandboxError::Setup {
                what: format!("reading {}", p.display()),
                source,
            })?;
            let name = e.file_name();
            let child_rel = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            walk(&e.path(), &child_rel, clamp, meta, links)?;
        }
    }
    Ok(())
}
