//! Ownership in trees, inside the sandbox (where we are root of the user namespace).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rbuild_store::meta::{EntryMeta, TreeMeta};

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
    let c = cpath(p)?;
    let mut buf = [0u8; 64];
    // SAFETY: valid NUL-terminated path and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            CAPS.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(None),
            _ => Err(SandboxError::Setup {
                what: format!("reading capabilities of {}", p.display()),
                source: e,
            }),
        };
    }
    Ok(Some(buf[..n as usize].to_vec()))
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

/// Give `p` the ownership, mode and capabilities recorded in `e` (mtime too).
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
            let c = cpath(p)?;
            // SAFETY: valid path, name and value buffer.
            if unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    CAPS.as_ptr(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    0,
                )
            } != 0
            {
                return Err(os_err(format!("setting capabilities on {}", p.display())));
            }
        }
    }
    let t = nix::sys::time::TimeSpec::new(e.mtime, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|err| SandboxError::Setup {
        what: format!("setting mtime of {}", p.display()),
        source: err.into(),
    })?;
    Ok(())
}

/// Record the real ownership, mode, mtime (clamped to `clamp`) and capabilities of every entry
/// under `root` into a [`TreeMeta`], then make the tree plain: owned by uid/gid 0 of the
/// namespace (the invoking user on the host), owner-readable/writable, no setuid/setgid/sticky
/// bits, no capabilities. Fifos, sockets and device nodes are removed (they are recreated by a
/// container runtime, never shipped in a root filesystem).
pub fn normalize_tree(root: &Path, clamp: i64) -> Result<TreeMeta, SandboxError> {
    let mut meta = TreeMeta::default();
    let mut links = HashMap::new();
    walk(root, "", clamp, &mut meta, &mut links)?;
    Ok(meta)
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
    let caps = if ft.is_file() { read_caps(p)? } else { None };
    let entry = EntryMeta {
        uid: md.uid(),
        gid: md.gid(),
        mode: md.mode() & 0o7777,
        mtime: md.mtime().min(clamp),
        caps: caps.as_ref().map(hex::encode),
    };
    if ft.is_file() && md.nlink() > 1 {
        links.insert((md.dev(), md.ino()), entry.clone());
    }
    meta.entries.insert(rel.to_owned(), entry);
    if md.uid() != 0 || md.gid() != 0 {
        lchown(p, 0, 0)?;
    }
    if caps.is_some() {
        let c = cpath(p)?;
        // SAFETY: valid path and name.
        if unsafe { libc::lremovexattr(c.as_ptr(), CAPS.as_ptr()) } != 0 {
            return Err(os_err(format!("removing capabilities of {}", p.display())));
        }
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
