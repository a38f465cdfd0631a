//! Copying trees out of the sandbox's memory: [`copy_tree`], and [`Skeleton`], which makes a
//! tree's names ahead of the copy while the tree is still being worked on.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::SandboxError;

/// Copy the tree at `src`, made plain by [`normalize_tree`] (owned by the namespace's root, no
/// xattrs), to the new directory `dst` on another file system: types, contents, modes,
/// mtimes and hard links (files with several names stay one file) as they are.
///
/// Creating thousands of files costs the target file system far more than their bytes, so the
/// files are written on as many threads as there are cores (up to eight): directories first, then files and
/// symlinks in parallel, then the further names of hard-linked files, and last each
/// directory's mode and mtime, deepest first (a directory's mtime moves with every entry made
/// in it).
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(), SandboxError> {
    copy(src, dst, None)
}

/// [`copy_tree`] onto `dst` as [`Skeleton::create_in`] left it (or made anew): the names
/// the skeleton made are reused (a file is truncated and written, not made again), any of
/// another type is replaced, and any `src` does not have is removed, so that `dst` ends up
/// exactly as [`copy_tree`] makes it. A file in `ahead` whose inode and change time are still
/// those it was copied with is not written again.
pub fn copy_tree_onto(src: &Path, dst: &Path, ahead: &CopiedAhead) -> Result<(), SandboxError> {
    copy(src, dst, Some(ahead))
}

fn copy(src: &Path, dst: &Path, ahead: Option<&CopiedAhead>) -> Result<(), SandboxError> {
    let onto = ahead.is_some();
    let mut plan = CopyPlan::default();
    plan.walk(src, PathBuf::new())?;
    let io = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |source| SandboxError::Setup { what, source }
    };
    if onto {
        plan.prune(dst)?;
    }
    for (rel, _) in &plan.dirs {
        let d = dst.join(rel);
        match fs::create_dir(&d) {
            Err(e) if onto && e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !fs::symlink_metadata(&d).map_err(io("stat", &d))?.is_dir() {
                    fs::remove_file(&d).map_err(io("removing", &d))?;
                    fs::create_dir(&d).map_err(io("mkdir", &d))?;
                }
            }
            r => r.map_err(io("mkdir", &d))?,
        }
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed: std::sync::Mutex<Option<SandboxError>> = std::sync::Mutex::new(None);
    let work = || loop {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some((rel, md)) = plan.leaves.get(i) else {
            return;
        };
        if ahead.is_some_and(|a| a.holds(rel, md)) {
            continue;
        }
        if let Err(e) = copy_leaf(&src.join(rel), &dst.join(rel), md, onto) {
            let mut failed = failed.lock().unwrap_or_else(|p| p.into_inner());
            failed.get_or_insert(e);
            // Let every thread stop at its next entry.
            next.store(plan.leaves.len(), std::sync::atomic::Ordering::Relaxed);
            return;
        }
    };
    std::thread::scope(|scope| {
        let started = (0..threads)
            .filter(|_| {
                std::thread::Builder::new()
                    .name("copy-tree".into())
                    .spawn_scoped(scope, work)
                    .is_ok()
            })
            .count();
        if started == 0 {
            // No thread could be started (a process limit): the copy is done here.
            work();
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    for (rel, first) in &plan.links {
        let d = dst.join(rel);
        if onto {
            remove_any(&d)?;
        }
        fs::hard_link(dst.join(first), &d).map_err(io("linking", &d))?;
    }
    for (rel, md) in plan.dirs.iter().rev() {
        let d = dst.join(rel);
        fs::set_permissions(&d, fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(io("chmod", &d))?;
        set_mtime(&d, md)?;
    }
    Ok(())
}

/// What [`copy_tree`] makes, by path below the tree's root.
#[derive(Default)]
struct CopyPlan {
    /// Directories, each before what it holds (the root, `""`, first).
    dirs: Vec<(PathBuf, fs::Metadata)>,
    /// Files and symlinks; of a hard-linked file, its first name in path order.
    leaves: Vec<(PathBuf, fs::Metadata)>,
    /// The further names of hard-linked files, each with the first.
    links: Vec<(PathBuf, PathBuf)>,
    first_names: HashMap<(u64, u64), PathBuf>,
    /// Paths not walked (nor planned).
    skip: Vec<PathBuf>,
}

impl CopyPlan {
    /// Remove what `dst` holds and this plan does not make (deepest names first, a directory
    /// with what it holds).
    fn prune(&self, dst: &Path) -> Result<(), SandboxError> {
        let wanted: std::collections::HashSet<&Path> = self
            .dirs
            .iter()
            .map(|(rel, _)| rel)
            .chain(self.leaves.iter().map(|(rel, _)| rel))
            .chain(self.links.iter().map(|(rel, _)| rel))
            .map(PathBuf::as_path)
            .collect();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let d = dst.join(&rel);
            let entries = match fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(SandboxError::Setup {
                        what: format!("reading {}", d.display()),
                        source,
                    })
                }
            };
            for e in entries {
                let e = e.map_err(|source| SandboxError::Setup {
                    what: format!("reading {}", d.display()),
                    source,
                })?;
                let child = rel.join(e.file_name());
                let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                if !wanted.contains(child.as_path()) {
                    remove_any(&dst.join(&child))?;
                } else if is_dir {
                    stack.push(child);
                }
            }
        }
        Ok(())
    }

    fn walk(&mut self, src: &Path, rel: PathBuf) -> Result<(), SandboxError> {
        if self.skip.contains(&rel) {
            return Ok(());
        }
        let p = src.join(&rel);
        let io = |what: &str| {
            let what = format!("{what} {}", p.display());
            move |source| SandboxError::Setup { what, source }
        };
        let md = fs::symlink_metadata(&p).map_err(io("stat"))?;
        if md.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)
                .map_err(io("reading"))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(io("reading"))?;
            names.sort();
            self.dirs.push((rel.clone(), md));
            for name in names {
                self.walk(src, rel.join(name))?;
            }
        } else if md.is_file() && md.nlink() > 1 {
            match self.first_names.get(&(md.dev(), md.ino())) {
                Some(first) => self.links.push((rel, first.clone())),
                None => {
                    self.first_names.insert((md.dev(), md.ino()), rel.clone());
                    self.leaves.push((rel, md));
                }
            }
        } else {
            self.leaves.push((rel, md));
        }
        Ok(())
    }
}

/// Copy one file or symlink and give it its mtime. `onto`: `dst` may exist already; a plain
/// file there (with no other name) is truncated and written, anything else replaced.
fn copy_leaf(src: &Path, dst: &Path, md: &fs::Metadata, onto: bool) -> Result<(), SandboxError> {
    let io = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |source| SandboxError::Setup { what, source }
    };
    let is_symlink = md.file_type().is_symlink();
    let target = if is_symlink {
        Some(fs::read_link(src).map_err(io("readlink", src))?)
    } else {
        None
    };
    if onto {
        match fs::symlink_metadata(dst) {
            Ok(d) if md.is_file() && d.is_file() && d.nlink() == 1 => {}
            // The same symlink, made ahead: only its mtime is given.
            Ok(d)
                if is_symlink
                    && d.file_type().is_symlink()
                    && fs::read_link(dst).ok().as_ref() == target.as_ref() =>
            {
                return set_mtime(dst, md);
            }
            Ok(_) => remove_any(dst)?,
            Err(_) => {}
        }
    }
    if let Some(target) = target {
        std::os::unix::fs::symlink(target, dst).map_err(io("symlink", dst))?;
    } else {
        // `fs::copy` gives the copy the source's permission bits (and truncates a file already
        // there: `dst` is a plain file by now, never a symlink it would write through).
        fs::copy(src, dst).map_err(io("copying", src))?;
    }
    set_mtime(dst, md)
}

/// Remove whatever is at `p` (a directory with what it holds); nothing there is fine.
fn remove_any(p: &Path) -> Result<(), SandboxError> {
    let r = match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(|source| SandboxError::Setup {
        what: format!("removing {}", p.display()),
        source,
    })
}

/// The directories, plain files and symlinks of a tree, by path below its root (directories
/// each before what they hold; of a hard-linked file, its first name only): what
/// [`Skeleton::create_in`] makes ahead of [`copy_tree_onto`], with the contents of the files
/// that have not changed lately, so that the cost of making thousands of names and writing
/// most of the bytes on the target file system is paid while the tree is still being worked
/// on (dpkg leaves a core idle), and the copy at the end only writes what changed since.
pub struct Skeleton {
    src: PathBuf,
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    /// With their targets.
    symlinks: Vec<(PathBuf, PathBuf)>,
}

impl Skeleton {
    /// The skeleton of the tree at `src`, as it is now, leaving out the names below `except`
    /// (relative paths: mount points, scratch that does not stay) and `except` themselves.
    pub fn scan(src: &Path, except: &[PathBuf]) -> Result<Skeleton, SandboxError> {
        let mut plan = CopyPlan {
            skip: except.to_vec(),
            ..CopyPlan::default()
        };
        plan.walk(src, PathBuf::new())?;
        let mut files = Vec::new();
        let mut symlinks = Vec::new();
        for (rel, md) in plan.leaves {
            if md.is_file() {
                files.push(rel);
            } else if md.file_type().is_symlink() {
                let target =
                    fs::read_link(src.join(&rel)).map_err(|source| SandboxError::Setup {
                        what: format!("readlink {}", src.join(&rel).display()),
                        source,
                    })?;
                symlinks.push((rel, target));
            }
        }
        Ok(Skeleton {
            src: src.to_owned(),
            dirs: plan.dirs.into_iter().map(|(rel, _)| rel).collect(),
            files,
            symlinks,
        })
    }

    /// Make the skeleton's directories, files and symlinks below `dst`, owned by the caller;
    /// [`copy_tree_onto`] gives them their contents, modes and mtimes. Names already there are
    /// left as they are (the copy replaces what differs).
    ///
    /// With `unchanged_before` (from [`change_time_after`], taken before this call), a plain
    /// file with one name whose last change came before it is copied whole, with its mode and
    /// mtime, and returned with its inode and change time: a change after that sets a later
    /// change time, so [`copy_tree_onto`] writes again any file that changed since, and only
    /// those. One in `earlier` (a former call's) still as it was then is not copied again.
    /// Files are read beneath the tree, through no symlink and no mount point, and checked to
    /// be the inode they are recorded as: scripts may be working on the tree meanwhile.
    pub fn create_in(
        &self,
        dst: &Path,
        unchanged_before: Option<ChangeTime>,
        earlier: &CopiedAhead,
    ) -> Result<CopiedAhead, SandboxError> {
        use nix::errno::Errno;
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
        use nix::sys::stat::Mode;
        use std::os::fd::OwnedFd;
        let setup = |what: &str, p: &Path, e: Errno| SandboxError::Setup {
            what: format!("{what} {}", p.display()),
            source: e.into(),
        };
        // Every name is made through its parent directory, opened beneath `dst` without
        // following any symlink: the tree's state may have changed since an earlier skeleton
        // (a symlink made then where a directory is now), and nothing is ever made through a
        // symlink, outside `dst`. A name there already, or whose parent is not (or not yet) a
        // directory, is the copy's to settle.
        let settled = |e: Errno| {
            matches!(
                e,
                Errno::EEXIST
                    | Errno::EISDIR
                    | Errno::ENOTDIR
                    | Errno::ENOENT
                    | Errno::ELOOP
                    | Errno::EXDEV
            )
        };
        match fs::create_dir(dst) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Setup {
                    what: format!("mkdir {}", dst.display()),
                    source: e,
                })
            }
            _ => {}
        }
        let root = nix::fcntl::open(
            dst,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| setup("opening", dst, e))?;
        let beneath = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        // The parent directory last opened, kept for the next names in it.
        let mut cached: Option<(PathBuf, std::rc::Rc<OwnedFd>)> = None;
        let mut parent_of = |rel: &Path| -> Result<Option<std::rc::Rc<OwnedFd>>, SandboxError> {
            let parent = rel.parent().unwrap_or(Path::new(""));
            if let Some((p, fd)) = &cached {
                if p == parent {
                    return Ok(Some(fd.clone()));
                }
            }
            let fd = if parent.as_os_str().is_empty() {
                nix::unistd::dup(&root)
            } else {
                nix::fcntl::openat2(&root, parent, beneath)
            };
            match fd {
                Ok(fd) => {
                    let fd = std::rc::Rc::new(fd);
                    cached = Some((parent.to_owned(), fd.clone()));
                    Ok(Some(fd))
                }
                Err(e) if settled(e) => Ok(None),
                Err(e) => Err(setup("opening", &dst.join(parent), e)),
            }
        };
        for rel in self.dirs.iter().filter(|r| !r.as_os_str().is_empty()) {
            let Some(parent) = parent_of(rel)? else {
                continue;
            };
            match nix::sys::stat::mkdirat(&*parent, leaf_name(rel), Mode::from_bits_truncate(0o755))
            {
                Err(e) if !settled(e) => return Err(setup("mkdir", &dst.join(rel), e)),
                _ => {}
            }
        }
        let src_root = nix::fcntl::open(
            &self.src,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| setup("opening", &self.src, e))?;
        let mut copied = CopiedAhead::default();
        for rel in &self.files {
            let Some(parent) = parent_of(rel)? else {
                continue;
            };
            let copy = |before| {
                copy_unchanged(&src_root, rel, &parent, before, earlier.0.get(rel))
                    .map_err(|e| setup("copying", &dst.join(rel), e))
            };
            if let Some(stamp) = unchanged_before.map(copy).transpose()?.flatten() {
                copied.0.insert(rel.clone(), stamp);
                continue;
            }
            let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            match nix::fcntl::openat(
                &*parent,
                leaf_name(rel),
                flags,
                Mode::from_bits_truncate(0o644),
            ) {
                Err(e) if !settled(e) => return Err(setup("creating", &dst.join(rel), e)),
                _ => {}
            }
        }
        for (rel, target) in &self.symlinks {
            let Some(parent) = parent_of(rel)? else {
                continue;
            };
            match nix::unistd::symlinkat(target.as_path(), &*parent, leaf_name(rel)) {
                Err(e) if !settled(e) => return Err(setup("symlink", &dst.join(rel), e)),
                _ => {}
            }
        }
        Ok(copied)
    }
}

/// A change time: seconds and nanoseconds.
pub type ChangeTime = (i64, i64);

/// A change time later than every change made (on the file system of `probe`) before the
/// call, at or before every change made after it, read off a file written at `probe`: the
/// kernel's file clock moves in ticks, so the last changes may share the tick of a file
/// written just after them; this waits (a few milliseconds) for the next tick.
pub fn change_time_after(probe: &Path) -> Result<ChangeTime, SandboxError> {
    let ctime = |p: &Path| -> std::io::Result<ChangeTime> {
        fs::write(p, b"")?;
        let md = fs::metadata(p)?;
        Ok((md.ctime(), md.ctime_nsec()))
    };
    let io = |source| SandboxError::Setup {
        what: format!("reading the file clock at {}", probe.display()),
        source,
    };
    let now = ctime(probe).map_err(io)?;
    for _ in 0..200 {
        std::thread::sleep(std::time::Duration::from_micros(500));
        fs::remove_file(probe).map_err(io)?;
        let next = ctime(probe).map_err(io)?;
        if next > now {
            let _ = fs::remove_file(probe);
            return Ok(next);
        }
    }
    Err(io(std::io::Error::other(
        "the file clock did not move in 100 ms",
    )))
}

/// What a file copied ahead was when it was read: its inode and its change time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    ctime: ChangeTime,
}

/// The files [`Skeleton::create_in`] copied, by path below the tree's root, each with what it
/// was when read.
#[derive(Debug, Default)]
pub struct CopiedAhead(HashMap<PathBuf, Stamp>);

impl CopiedAhead {
    /// How many files were copied.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the file at `rel`, whose metadata is now `md`, was copied and is still the
    /// inode it was, unchanged since.
    fn holds(&self, rel: &Path, md: &fs::Metadata) -> bool {
        md.is_file()
            && md.nlink() == 1
            && self.0.get(rel)
                == Some(&Stamp {
                    dev: md.dev(),
                    ino: md.ino(),
                    ctime: (md.ctime(), md.ctime_nsec()),
                })
    }
}

/// Copy the file at `rel` below `src_root` into `parent` (the directory of `rel` below the
/// target), with its mode and mtime, if it is a plain file with one name whose last change
/// came before `before`; return what it was then. None (nothing written) for anything else,
/// or a path that leads through a symlink or a mount point now, or that is gone: the copy at
/// the end settles those. A file still as `earlier` says was copied by an earlier call.
fn copy_unchanged(
    src_root: &std::os::fd::OwnedFd,
    rel: &Path,
    parent: &std::os::fd::OwnedFd,
    before: ChangeTime,
    earlier: Option<&Stamp>,
) -> Result<Option<Stamp>, nix::errno::Errno> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use nix::sys::stat::{Mode, SFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let Ok(from) = nix::fcntl::openat2(src_root, rel, how) else {
        return Ok(None);
    };
    let st = nix::sys::stat::fstat(&from)?;
    let stamp = Stamp {
        dev: st.st_dev,
        ino: st.st_ino,
        ctime: (st.st_ctime, st.st_ctime_nsec),
    };
    let plain = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG;
    if !plain || st.st_nlink != 1 || stamp.ctime >= before {
        return Ok(None);
    }
    if earlier == Some(&stamp) {
        return Ok(Some(stamp));
    }
    let to = match nix::fcntl::openat(
        parent,
        leaf_name(rel),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    ) {
        Ok(fd) => fd,
        // Not a plain file there (a directory, a symlink of an earlier tree): the copy's.
        Err(_) => return Ok(None),
    };
    let (mut from, mut to) = (fs::File::from(from), fs::File::from(to));
    std::io::copy(&mut from, &mut to).map_err(|e| {
        nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(nix::errno::Errno::EIO as i32))
    })?;
    nix::sys::stat::fchmod(&to, Mode::from_bits_truncate(st.st_mode & 0o7777))?;
    let mtime = nix::sys::time::TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
    nix::sys::stat::futimens(&to, &mtime, &mtime)?;
    Ok(Some(stamp))
}

/// The last component of `rel` (a skeleton's names are never empty but for the root's).
fn leaf_name(rel: &Path) -> &Path {
    rel.file_name().map(Path::new).unwrap_or(Path::new("."))
}

/// Give `dst` the mtime of `md` (as its access time too).
fn set_mtime(dst: &Path, md: &fs::Metadata) -> Result<(), SandboxError> {
    let t = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    super::tree::set_times(dst, t, Some(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Everything `copy_tree` keeps, by path: type, mode, mtime, size or target, and which
    /// paths share an inode.
    fn describe(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut inodes: HashMap<u64, String> = HashMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let p = root.join(&rel);
            let md = fs::symlink_metadata(&p).unwrap();
            let what = if md.is_dir() {
                let mut names: Vec<_> = fs::read_dir(&p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                names.sort();
                stack.extend(names.into_iter().map(|n| rel.join(n)));
                "dir".to_owned()
            } else if md.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&p).unwrap().display())
            } else {
                let first = inodes
                    .entry(md.ino())
                    .or_insert_with(|| rel.display().to_string());
                format!(
                    "file {:?} (inode of {first})",
                    fs::read_to_string(&p).unwrap()
                )
            };
            out.push(format!(
                "{} {what} {:o} {}.{}",
                rel.display(),
                md.mode() & 0o7777,
                md.mtime(),
                md.mtime_nsec()
            ));
        }
        out.sort();
        out
    }

    #[test]
    fn copy_tree_keeps_types_modes_mtimes_and_hard_links() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::create_dir_all(src.join("ro")).unwrap();
        for i in 0..200 {
            fs::write(src.join(format!("a/f{i}")), format!("{i}")).unwrap();
        }
        fs::write(src.join("a/b/setuid"), "s").unwrap();
        fs::set_permissions(src.join("a/b/setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(src.join("ro/linked"), "one file").unwrap();
        fs::hard_link(src.join("ro/linked"), src.join("a/linked-too")).unwrap();
        fs::hard_link(src.join("ro/linked"), src.join("a/b/linked-three")).unwrap();
        symlink("../ro/linked", src.join("a/to-linked")).unwrap();
        symlink("nowhere", src.join("dangling")).unwrap();
        let mut n = 0;
        for entry in [
            "a/f7",
            "a/b/setuid",
            "ro/linked",
            "a/to-linked",
            "dangling",
            "a/b",
            "a",
            "",
        ] {
            n += 1;
            let t = nix::sys::time::TimeSpec::new(1_000_000 + n, 17);
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &src.join(entry),
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
        }
        fs::set_permissions(src.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
        let dst = tmp.path().join("dst");
        copy_tree(&src, &dst).unwrap();
        let (want, got) = (describe(&src), describe(&dst));
        let shared = |lines: &[String]| {
            lines
                .iter()
                .filter(|l| l.contains("\"one file\" (inode of"))
                .map(|l| l.split("(inode of ").nth(1).unwrap().to_owned())
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        assert_eq!(shared(&want), 1, "{want:#?}");
        assert_eq!(want, got);
        fs::set_permissions(dst.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(src.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The names made ahead from an earlier state of the tree are reused, retyped or removed:
    /// the copy comes out as a copy into nothing does.
    #[test]
    fn copy_tree_onto_a_skeleton_of_an_earlier_tree_is_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("a")).unwrap();
        fs::create_dir_all(src.join("x")).unwrap();
        fs::create_dir_all(src.join("gone-dir/deep")).unwrap();
        fs::write(src.join("gone-dir/deep/f"), "old").unwrap();
        for name in [
            "a/f1",
            "a/f2",
            "gone",
            "y",
            "z",
            "a/linked-too",
            "a/shrinks",
        ] {
            fs::write(src.join(name), "old contents, longer than the new").unwrap();
        }
        for link in ["same-link", "retargeted", "becomes-file"] {
            symlink("a/f1", src.join(link)).unwrap();
        }
        let skeleton = Skeleton::scan(&src, &[]).unwrap();
        let dst = tmp.path().join("dst");
        let first = change_time_after(&tmp.path().join("probe")).unwrap();
        let copied = skeleton
            .create_in(&dst, Some(first), &CopiedAhead::default())
            .unwrap();
        assert_eq!(copied.len(), 8, "every plain file with one name");
        // What the tree became meanwhile.
        fs::remove_dir_all(src.join("gone-dir")).unwrap();
        fs::remove_file(src.join("gone")).unwrap();
        fs::remove_dir(src.join("x")).unwrap();
        fs::write(src.join("x"), "a file now").unwrap();
        fs::remove_file(src.join("y")).unwrap();
        fs::create_dir(src.join("y")).unwrap();
        fs::write(src.join("y/in"), "in a directory now").unwrap();
        fs::remove_file(src.join("z")).unwrap();
        symlink("a/f1", src.join("z")).unwrap();
        fs::write(src.join("ro-linked"), "one file").unwrap();
        fs::remove_file(src.join("a/linked-too")).unwrap();
        fs::hard_link(src.join("ro-linked"), src.join("a/linked-too")).unwrap();
        fs::write(src.join("a/shrinks"), "short").unwrap();
        fs::write(src.join("a/new"), "new").unwrap();
        fs::set_permissions(src.join("a/f2"), fs::Permissions::from_mode(0o4711)).unwrap();
        fs::remove_file(src.join("retargeted")).unwrap();
        symlink("a/f2", src.join("retargeted")).unwrap();
        fs::remove_file(src.join("becomes-file")).unwrap();
        fs::write(src.join("becomes-file"), "a file").unwrap();
        symlink("../a/new", src.join("a/new-link")).unwrap();
        // A second skeleton, of the tree as it is now, over the first's names and copies.
        let second = change_time_after(&tmp.path().join("probe")).unwrap();
        let copied = Skeleton::scan(&src, &[])
            .unwrap()
            .create_in(&dst, Some(second), &copied)
            .unwrap();
        // Changed again, after the second copy: within its clock tick, very likely.
        fs::write(src.join("a/f1"), "new contents, as long as the old").unwrap();
        fs::set_permissions(src.join("a/new"), fs::Permissions::from_mode(0o600)).unwrap();
        copy_tree_onto(&src, &dst, &copied).unwrap();
        assert_eq!(describe(&src), describe(&dst));
        let fresh = tmp.path().join("fresh");
        copy_tree(&src, &fresh).unwrap();
        assert_eq!(describe(&fresh), describe(&dst));
        // Into nothing, onto copies as copy_tree does.
        let none = tmp.path().join("none");
        copy_tree_onto(&src, &none, &CopiedAhead::default()).unwrap();
        assert_eq!(describe(&src), describe(&none));
    }

    /// A symlink made ahead where the tree later has a directory: a second skeleton makes
    /// nothing through it (nothing lands where it points), and the copy makes the directory.
    #[test]
    fn skeletons_never_make_names_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst, outside) = (
            tmp.path().join("src"),
            tmp.path().join("dst"),
            tmp.path().join("outside"),
        );
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&outside).unwrap();
        symlink(&outside, src.join("esc")).unwrap();
        symlink("../outside", src.join("rel")).unwrap();
        let names_only = |src: &Path, dst: &Path| {
            Skeleton::scan(src, &[])
                .unwrap()
                .create_in(dst, None, &CopiedAhead::default())
                .unwrap()
        };
        names_only(&src, &dst);
        assert_eq!(fs::read_link(dst.join("esc")).unwrap(), outside);
        for d in ["esc", "rel"] {
            fs::remove_file(src.join(d)).unwrap();
            fs::create_dir_all(src.join(d).join("sub")).unwrap();
            fs::write(src.join(d).join("planted"), "x").unwrap();
            symlink("/etc/passwd", src.join(d).join("sub/link")).unwrap();
        }
        let copied = names_only(&src, &dst);
        assert!(copied.is_empty());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        copy_tree_onto(&src, &dst, &copied).unwrap();
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert_eq!(describe(&src), describe(&dst));
    }

    /// What a skeleton is told to leave out (a mount point, staging) is neither made nor walked.
    #[test]
    fn skeletons_leave_out_what_they_are_told() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir_all(src.join("proc/1")).unwrap();
        fs::create_dir_all(src.join("var/cache/staging")).unwrap();
        fs::write(src.join("var/cache/staging/x.deb"), "x").unwrap();
        fs::write(src.join("var/cache/kept"), "k").unwrap();
        let except = [PathBuf::from("proc"), PathBuf::from("var/cache/staging")];
        let before = change_time_after(&tmp.path().join("probe")).unwrap();
        let copied = Skeleton::scan(&src, &except)
            .unwrap()
            .create_in(&dst, Some(before), &CopiedAhead::default())
            .unwrap();
        assert_eq!(copied.len(), 1);
        assert!(dst.join("var/cache/kept").is_file());
        assert!(!dst.join("proc").exists() && !dst.join("var/cache/staging").exists());
    }

    /// A file copied ahead and unchanged since is not written again; one changed since is,
    /// as is one changed too lately to be copied ahead.
    #[test]
    fn copy_tree_onto_writes_again_only_what_changed_since_it_was_copied_ahead() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir_all(&src).unwrap();
        for f in ["kept", "changed", "chmodded", "replaced"] {
            fs::write(src.join(f), "before").unwrap();
        }
        let before = change_time_after(&tmp.path().join("probe")).unwrap();
        // Changed after the clock was read, before the copy: too late to be copied ahead.
        fs::write(src.join("late"), "late").unwrap();
        let copied = Skeleton::scan(&src, &[])
            .unwrap()
            .create_in(&dst, Some(before), &CopiedAhead::default())
            .unwrap();
        let mut names: Vec<_> = copied.0.keys().cloned().collect();
        names.sort();
        assert_eq!(
            names,
            ["changed", "chmodded", "kept", "replaced"].map(PathBuf::from)
        );
        assert_eq!(fs::read(dst.join("kept")).unwrap(), b"before");
        assert_eq!(
            fs::read(dst.join("late")).unwrap(),
            b"",
            "only its name, made ahead"
        );
        // Same lengths, within the same clock tick as the copy, most likely.
        fs::write(src.join("changed"), "after!").unwrap();
        fs::set_permissions(src.join("chmodded"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(src.join("new"), "after!").unwrap();
        fs::rename(src.join("new"), src.join("replaced")).unwrap();
        // Proof that the unchanged file is left as it was copied: a mark put on the copy stays.
        fs::write(dst.join("kept"), "marked").unwrap();
        copy_tree_onto(&src, &dst, &copied).unwrap();
        assert_eq!(fs::read(dst.join("kept")).unwrap(), b"marked");
        let but_kept = |tree: &Path| -> Vec<String> {
            let all = describe(tree).into_iter();
            all.filter(|l| !l.starts_with("kept ")).collect()
        };
        assert_eq!(but_kept(&src), but_kept(&dst));
    }

    /// A directory of the tree swapped for a symlink leading out of it after the scan: the copy
    /// ahead reads nothing through it, and the copy at the end copies the symlink.
    #[test]
    fn copies_ahead_never_read_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst, outside) = (
            tmp.path().join("src"),
            tmp.path().join("dst"),
            tmp.path().join("outside"),
        );
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("d/f"), "tree").unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("f"), "secret").unwrap();
        let skeleton = Skeleton::scan(&src, &[]).unwrap();
        fs::rename(src.join("d"), tmp.path().join("d-moved")).unwrap();
        symlink(&outside, src.join("d")).unwrap();
        let before = change_time_after(&tmp.path().join("probe")).unwrap();
        let copied = skeleton
            .create_in(&dst, Some(before), &CopiedAhead::default())
            .unwrap();
        assert!(copied.is_empty());
        assert_eq!(
            fs::read(dst.join("d/f")).unwrap(),
            b"",
            "only its name, made ahead"
        );
        copy_tree_onto(&src, &dst, &copied).unwrap();
        assert_eq!(fs::read_link(dst.join("d")).unwrap(), outside);
        assert_eq!(describe(&src), describe(&dst));
    }

    #[test]
    fn copy_tree_names_what_it_could_not_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("f"), "x").unwrap();
        let dst = tmp.path().join("dst");
        fs::create_dir_all(&dst).unwrap();
        let e = copy_tree(&src, &dst).unwrap_err().to_string();
        assert!(e.contains("mkdir") && e.contains("dst"), "{e}");
    }
}
