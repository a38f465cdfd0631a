//! A tree's paths resolved the way a chroot into it resolves them.
//!
//! A builder that works on a tree after untrusted code has run in it (maintainer scripts in a
//! chroot) must not follow the symlinks that code may have left as the builder's own file
//! system would: an absolute `/var/run -> /run`, or `etc -> ../../..`, would lead its reads
//! and writes out of the tree. Here every path is resolved by the kernel with
//! `RESOLVE_IN_ROOT` (symlinks, absolute ones and `..` included, stay in the tree, as in the
//! chroot), and a path's last component is named through its parent's open descriptor.

use std::cell::RefCell;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// A tree, its paths resolved within it ([the module](self)). It remembers the directory it
/// last resolved: open a new one after anything else (a chroot's commands) may have moved the
/// tree's directories.
pub struct InRoot {
    root: OwnedFd,
    /// The parent directory last resolved for [`InRoot::leaf`], by path: entries come by
    /// directory, and resolving each one's parent again was most of the cost of laying a tree
    /// out. Within the tree, as any resolution here.
    last_dir: RefCell<Option<(String, Rc<OwnedFd>)>>,
}

/// A path's last component in its parent directory, resolved within the tree: [`Leaf::path`]
/// names it through the parent's open descriptor (`/proc/self/fd/N/NAME`), so that a call
/// that does not follow a final symlink (`symlink_metadata`, `rename`, `create_dir`,
/// [`super::apply_meta`], [`super::set_entry_mtime`]) reaches that entry and nothing else.
/// A call that follows a final symlink would follow it as the builder's file system does: use
/// [`InRoot::metadata`] and [`InRoot::read`] for those.
pub struct Leaf {
    _dir: Rc<OwnedFd>,
    pub path: PathBuf,
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl InRoot {
    pub fn open(root: &Path) -> io::Result<InRoot> {
        let root = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(InRoot {
            root,
            last_dir: RefCell::new(None),
        })
    }

    /// `rel` (relative to the tree's root; a leading `/` is the root) opened with `flags`,
    /// resolved within the tree.
    fn resolve(&self, rel: &str, flags: OFlag) -> io::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let rel = rel.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        // EAGAIN: a rename or mount anywhere on the machine raced with a `..` on the way
        // (`openat2(2)`); the kernel asks to try again.
        let mut tries = 0;
        loop {
            match nix::fcntl::openat2(&self.root, rel, how) {
                Err(nix::errno::Errno::EAGAIN) if tries < 1000 => tries += 1,
                r => return Ok(r?),
            }
        }
    }

    /// `rel`'s last component, in its parent resolved within the tree.
    pub fn leaf(&self, rel: &str) -> io::Result<Leaf> {
        let rel = rel.trim_start_matches('/').trim_end_matches('/');
        let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        if name.is_empty() || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{rel:?} names no entry of its own"),
            ));
        }
        let cached = match &*self.last_dir.borrow() {
            Some((p, fd)) if p == parent => Some(fd.clone()),
            _ => None,
        };
        let dir = match cached {
            Some(fd) => fd,
            None => {
                let fd = Rc::new(self.resolve(parent, OFlag::O_PATH | OFlag::O_DIRECTORY)?);
                *self.last_dir.borrow_mut() = Some((parent.to_owned(), fd.clone()));
                fd
            }
        };
        let path = fd_path(&dir).join(name);
        Ok(Leaf { _dir: dir, path })
    }

    /// The metadata of what `rel` leads to, a final symlink followed within the tree.
    pub fn metadata(&self, rel: &str) -> io::Result<fs::Metadata> {
        fs::metadata(fd_path(&self.resolve(rel, OFlag::O_PATH)?))
    }

    /// The metadata of `rel` itself (a symlink, not what it points to).
    pub fn symlink_metadata(&self, rel: &str) -> io::Result<fs::Metadata> {
        fs::symlink_metadata(self.leaf(rel)?.path)
    }

    /// The bytes of the file `rel` leads to, a final symlink followed within the tree.
    pub fn read(&self, rel: &str) -> io::Result<Vec<u8>> {
        let mut f = fs::File::from(self.resolve(rel, OFlag::O_RDONLY)?);
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// [`InRoot::read`], as UTF-8.
    pub fn read_to_string(&self, rel: &str) -> io::Result<String> {
        String::from_utf8(self.read(rel)?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The names in the directory `rel` leads to.
    pub fn read_dir(&self, rel: &str) -> io::Result<Vec<OsString>> {
        let dir = self.resolve(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        fs::read_dir(fd_path(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    /// Make the directory `rel` and those above it that are missing (mode 0755 less the
    /// umask, as `fs::create_dir_all`).
    pub fn create_dir_all(&self, rel: &str) -> io::Result<()> {
        let rel = rel.trim_matches('/');
        let mut upto = 0;
        for part in rel.split('/') {
            upto += part.len();
            let prefix = &rel[..upto];
            upto += 1;
            if part.is_empty() || self.metadata(prefix).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            match fs::create_dir(self.leaf(prefix)?.path) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Remove the entry `rel` (a symlink itself, not what it points to); not a directory.
    pub fn remove_file(&self, rel: &str) -> io::Result<()> {
        fs::remove_file(self.leaf(rel)?.path)
    }

    /// Give the directory `rel` leads to the modification time now (its access time left), as
    /// making, renaming or removing an entry in it does.
    pub fn touch_dir(&self, rel: &str) -> io::Result<()> {
        let dir = self.resolve(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        nix::sys::stat::futimens(
            &dir,
            &nix::sys::time::TimeSpec::UTIME_OMIT,
            &nix::sys::time::TimeSpec::UTIME_NOW,
        )?;
        Ok(())
    }

    /// Remove the empty directory `rel`.
    pub fn remove_dir(&self, rel: &str) -> io::Result<()> {
        fs::remove_dir(self.leaf(rel)?.path)
    }

    /// Make `rel` a new file holding `bytes`, with permissions `mode`, in place of whatever
    /// entry `rel` is (a symlink itself, not what it points to): written under a temporary
    /// name beside it, then renamed over it, as dpkg replaces its files.
    pub fn replace_file(&self, rel: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        let leaf = self.leaf(rel)?;
        let name = leaf.path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = leaf.path.with_file_name(format!(".{name}.rbuild-new"));
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        drop(f);
        fs::rename(&tmp, &leaf.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A path through `..` resolves while renames happen elsewhere on the machine: the kernel
    /// answers EAGAIN to some resolutions then, and they are tried again.
    #[test]
    fn paths_through_dotdot_resolve_while_files_are_renamed_elsewhere() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir_all(root.join("run/lock")).unwrap();
        fs::create_dir_all(root.join("var")).unwrap();
        symlink("../run/lock", root.join("var/lock")).unwrap();
        let tree = InRoot::open(&root).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let (a, b) = (t.path().join("a"), t.path().join("b"));
                fs::write(&a, "").unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    fs::rename(&a, &b).unwrap();
                    fs::rename(&b, &a).unwrap();
                }
            });
            for _ in 0..20_000 {
                if let Err(e) = tree.metadata("var/lock/../lock") {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    panic!("{e}");
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }

    #[test]
    fn symlinks_left_in_the_tree_resolve_within_it() {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        fs::create_dir_all(root.join("run")).unwrap();
        fs::create_dir_all(root.join("var")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), "host").unwrap();
        fs::write(root.join("run/secret"), "tree").unwrap();
        // Absolute, and climbing out: both stay in the tree, as in a chroot.
        symlink("/run", root.join("var/run")).unwrap();
        symlink("../../../outside", root.join("var/up")).unwrap();
        symlink("/outside/secret", root.join("var/leak")).unwrap();
        let tree = InRoot::open(&root).unwrap();

        assert_eq!(tree.read_to_string("var/run/secret").unwrap(), "tree");
        assert!(tree.read("var/up/secret").is_err(), "climbed out");
        assert!(tree.read("/var/leak").is_err(), "followed out");
        assert!(tree.metadata("var/run").unwrap().is_dir());
        assert!(tree
            .symlink_metadata("var/run")
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(tree.read_dir("var/run").unwrap(), ["secret"]);

        // Writing through them stays in the tree too; a symlink at the name is replaced.
        tree.replace_file("var/run/new", b"made", 0o640).unwrap();
        assert_eq!(fs::read_to_string(root.join("run/new")).unwrap(), "made");
        assert_eq!(
            fs::metadata(root.join("run/new"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o640
        );
        tree.replace_file("var/leak", b"mine", 0o644).unwrap();
        assert_eq!(fs::read_to_string(root.join("var/leak")).unwrap(), "mine");
        assert_eq!(fs::read_to_string(outside.join("secret")).unwrap(), "host");
        assert!(tree.leaf("var/up/made").is_err(), "made outside");
        fs::create_dir(tree.leaf("var/run/made").unwrap().path).unwrap();
        assert!(root.join("run/made").is_dir() && !outside.join("made").exists());
        // Through a dangling symlink, as `mkdir -p` in the chroot: refused; once it leads to
        // a directory (the tree's own `outside`), made there.
        assert!(tree.create_dir_all("var/up/a/b").is_err());
        fs::create_dir(root.join("outside")).unwrap();
        tree.create_dir_all("var/up/a/b").unwrap();
        assert!(root.join("outside/a/b").is_dir() && !outside.join("a").exists());
        tree.remove_file("var/leak").unwrap();
        assert!(!root.join("var/leak").exists() && outside.join("secret").exists());
    }
}
