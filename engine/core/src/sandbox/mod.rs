//! The sandbox: every builder runs in fresh user, mount, pid, network, uts and ipc namespaces.
//!
//! This module is the only place in rbuild that makes raw system calls or uses `unsafe`. Its safe
//! API is small:
//!
//! * [`check_support`] explains, before anything is spawned, why user namespaces cannot work here
//!   and how to fix it;
//! * [`run`] (host side) spawns `rbuild __sandbox SPEC` in a new user namespace whose id map covers
//!   a full range (`newuidmap`/`newgidmap` and `/etc/subuid` when unprivileged, written directly
//!   when root), waits for it and reports its exit status and the tail of its stderr;
//! * [`enter`] (sandbox side, called by that re-executed process) builds the filesystem view —
//!   only declared inputs (read-only), the build directory, a fresh `/proc`, a minimal `/dev`
//!   (no terminal), a private `/tmp` — pivots into it, and runs the builder as pid 1 of its own
//!   pid namespace, which dies with the rbuild that started it;
//! * [`run_chrooted`] runs the untrusted commands of a build (dpkg and its maintainer scripts,
//!   `run` steps) behind the walls of [`confine`]: locked mounts, Landlock, and least privilege.
//! * tree helpers used inside the sandbox: [`normalize_tree`] (record real ownership into
//!   metadata, then give the tree to the invoking user without special bits), [`apply_meta`]
//!   (materialize recorded ownership) and [`run_chrooted`].

mod confine;
mod copy;
mod ids;
mod in_root;
mod tree;

pub use confine::{cap_names, landlock_abi, Walls, PACKAGE_CAPS, TEST_ONLY_WALLS_VAR};
pub use copy::{change_time_after, copy_tree, copy_tree_onto, ChangeTime, CopiedAhead, Skeleton};
pub use ids::{check_support, IdMap, MapError};
pub use in_root::{InRoot, Leaf};
pub use tree::{
    apply_meta, entry_meta, is_opaque, is_whiteout, keeps_acls, normalize_tree, read_caps,
    set_entry_mtime,
};

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pivot_root, ForkResult};
use serde::{Deserialize, Serialize};

/// Errors of the sandbox. Each says what failed and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    Unsupported(String),
    #[error("sandbox setup: {what}: {source}")]
    Setup {
        what: String,
        source: std::io::Error,
    },
    #[error("setting up the user namespace id map failed: {0}")]
    IdMap(ids::MapError),
}

fn setup(what: impl Into<String>) -> impl FnOnce(nix::Error) -> SandboxError {
    let what = what.into();
    move |e| SandboxError::Setup {
        what,
        source: e.into(),
    }
}

fn setup_io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Setup { what, source }
}

/// Where things are inside every sandbox.
pub const INPUTS_DIR: &str = "/inputs";
pub const BUILD_DIR: &str = "/build";
pub const OUT_PATH: &str = "/build/out";

/// The environment every builder starts from (a derivation's `env` is applied on top).
pub fn fixed_env() -> Vec<(String, String)> {
    [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("LC_ALL", "C.UTF-8"),
        ("TZ", "UTC"),
        ("HOME", "/build"),
        ("SOURCE_DATE_EPOCH", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// What the sandboxed process needs to know. Serialized to a file in the build directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Host scratch directory; its `build/` subdirectory is `/build` inside.
    pub build_dir: PathBuf,
    /// Host paths of input outputs and the name each gets under `/inputs`.
    pub inputs: Vec<(PathBuf, String)>,
    /// Share the host's network namespace (fixed-output derivations only).
    pub network: bool,
    /// The builder to run and its arguments; see `crate::builtins`.
    pub builder: String,
    pub args: Vec<String>,
    /// The complete, fixed environment of the builder.
    pub env: Vec<(String, String)>,
    /// The walls around the untrusted commands the builder runs (all, but in rbuild's tests).
    #[serde(default)]
    pub walls: Walls,
    #[serde(default)]
    pub limits: Limits,
    /// For a builder whose commands are of a foreign architecture: the interpreter the sandbox
    /// registers with binfmt_misc in its own user namespace (never the host's).
    #[serde(default)]
    pub emulator: Option<EmulatorSpec>,
}

/// An interpreter for a foreign architecture's ELF files (a static qemu-user), as binfmt_misc
/// takes it: a name, the magic bytes and mask (hex) of the ELF header it handles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmulatorSpec {
    pub name: String,
    /// The interpreter on the host (a store path).
    pub interpreter: PathBuf,
    pub magic: String,
    pub mask: String,
    /// Whether the host already has `name` registered (system-wide, as kernels before 6.7
    /// require): then a sandbox that cannot register its own uses the host's.
    #[serde(default)]
    pub host_registered: bool,
}

/// Where the interpreter appears inside the sandbox.
const EMULATOR_DIR: &str = "/emulator";

impl EmulatorSpec {
    /// Whether the host has an enabled binfmt_misc entry named `name` with the `F` flag (the
    /// interpreter opened when it was registered: one that must be found by path would not be
    /// in the chroot).
    pub fn registered_on_host(name: &str) -> bool {
        fs::read_to_string(Path::new("/proc/sys/fs/binfmt_misc").join(name)).is_ok_and(|s| {
            s.lines().next() == Some("enabled")
                && s.lines()
                    .any(|l| l.strip_prefix("flags: ").is_some_and(|f| f.contains('F')))
        })
    }

    /// binfmt_misc's registration line for the interpreter at `path`: the `F` flag opens the
    /// interpreter now, so it keeps working in chroots that do not contain it.
    fn register_line(&self, path: &str) -> Result<String, SandboxError> {
        let esc = |hex: &str| -> Result<String, SandboxError> {
            if !hex.len().is_multiple_of(2) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(SandboxError::Unsupported(format!(
                    "emulator {}: {hex:?} is not hex bytes",
                    self.name
                )));
            }
            Ok(hex
                .as_bytes()
                .chunks(2)
                .map(|c| format!("\\x{}", std::str::from_utf8(c).expect("hex is ASCII")))
                .collect())
        };
        Ok(format!(
            ":{}:M::{}:{}:{path}:F",
            self.name,
            esc(&self.magic)?,
            esc(&self.mask)?
        ))
    }
}

/// Register `em` with a binfmt_misc instance of this sandbox's own user namespace (Linux 6.7
/// and later mount one per user namespace), or fall back on the host's registration.
fn register_emulator(em: &EmulatorSpec) -> Result<(), SandboxError> {
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    let inside = format!("{EMULATOR_DIR}/{}", em.name);
    let line = em.register_line(&inside)?;
    let mounted = mount(
        Some("binfmt_misc"),
        dir,
        Some("binfmt_misc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    );
    match mounted {
        Ok(()) => fs::write(dir.join("register"), line)
            .map_err(setup_io(format!("registering {inside} with binfmt_misc"))),
        Err(_) if em.host_registered => Ok(()),
        Err(e) => Err(SandboxError::Unsupported(format!(
            "cannot run {} programs: mounting binfmt_misc in the sandbox's user namespace failed ({e}); \
             Linux 6.7 or later allows that without privileges. Ways out: a newer kernel, or \
             registering the emulator on the host once, as root (`apt install qemu-user-static \
             binfmt-support` registers {} with the F flag)",
            em.name, em.name
        ))),
    }
}

/// What one build step may use. The defaults are far above what any normal build needs; a
/// step that reaches one is stopped and the error names the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock seconds (`--max-build-time`).
    pub wall_secs: u64,
    /// Bytes below `/build`: the output and scratch together (`--max-build-bytes`), checked
    /// every two seconds; no single file may be larger either (`RLIMIT_FSIZE`).
    pub bytes: u64,
    /// Processes of the build at once (`--max-build-processes`; `RLIMIT_NPROC`, counted per
    /// user namespace; the kernel does not apply it to the host's root).
    pub processes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            wall_secs: 4 * 3600,
            bytes: 64 << 30,
            processes: 4096,
        }
    }
}

impl SandboxSpec {
    /// The host path of `/build` for this spec.
    pub fn host_build(&self) -> PathBuf {
        self.build_dir.join("build")
    }
}

/// How a sandboxed build ended.
#[derive(Debug)]
pub struct RunResult {
    pub success: bool,
    pub status: String,
    /// The last lines the builder wrote to stderr.
    pub stderr_tail: String,
}

/// Spawn the sandbox for `spec` (host side). `exe` is the rbuild binary to re-execute.
/// `log` receives the builder's whole output. `hold` is a file descriptor (the build
/// directory's lock) that the sandbox holds open for as long as any of its processes lives, so
/// that no other rbuild takes the directory of a build that is still running for garbage.
pub fn run(
    exe: &Path,
    spec: &SandboxSpec,
    map: &IdMap,
    log: &Path,
    hold: Option<RawFd>,
) -> Result<RunResult, SandboxError> {
    fs::create_dir_all(spec.host_build()).map_err(setup_io("creating the build directory"))?;
    let spec_path = spec.build_dir.join("sandbox.json");
    fs::write(
        &spec_path,
        serde_json::to_vec(spec).expect("spec serializes"),
    )
    .map_err(setup_io(format!("writing {}", spec_path.display())))?;
    let mut log_file =
        fs::File::create(log).map_err(setup_io(format!("creating {}", log.display())))?;

    // The builder writes into a pipe, not the log file: a confined command that reopens
    // `/dev/stderr` then opens the pipe, not a host file outside its Landlock domain.
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(setup("pipe"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("__sandbox").arg(&spec_path);
    cmd.env_clear();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out_w.try_clone().map_err(setup_io("pipe"))?))
        .stderr(Stdio::from(out_w));
    let copier = std::thread::spawn(move || {
        let _ = std::io::copy(&mut fs::File::from(out_r), &mut log_file);
    });
    let before = move || match hold {
        // SAFETY: fcntl on a descriptor the caller keeps open across the spawn.
        Some(fd) if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 => {
            Err(std::io::Error::last_os_error())
        }
        _ => Ok(()),
    };
    let spawned = spawn(cmd, CloneFlags::CLONE_NEWUSER, Some(map), before);
    let child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = copier.join();
            return Err(e);
        }
    };
    let (done, watchdog) = watch(child.id(), spec.host_build(), spec.limits);
    let output = child
        .wait_with_output()
        .map_err(setup_io("waiting for the sandbox"));
    drop(done);
    let limit = watchdog.join().unwrap_or(None);
    let _ = copier.join();
    let output = output?;
    let tail = tail_of(log, 40);
    Ok(RunResult {
        success: output.status.success() && limit.is_none(),
        status: match limit {
            Some(l) => format!("stopped: {l}"),
            None => describe_status(output.status),
        },
        stderr_tail: tail,
    })
}

/// Stop the sandbox `pid` when it reaches its wall-time or byte limit. Dropping the returned
/// sender (once the sandbox has ended) stops the watch; the thread returns the limit reached.
fn watch(
    pid: u32,
    build: PathBuf,
    limits: Limits,
) -> (
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<Option<String>>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let started = std::time::Instant::now();
    // A pidfd names this very process even once it is reaped, so a limit reached as the
    // sandbox ends never signals another process that got its pid.
    // SAFETY: pidfd_open with a pid and no flags returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    // SAFETY: a non-negative result is a descriptor this function now owns.
    let pidfd = (pidfd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as RawFd) });
    let handle = std::thread::spawn(move || loop {
        match rx.recv_timeout(std::time::Duration::from_secs(2)) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return None,
        }
        let reached = if started.elapsed().as_secs() >= limits.wall_secs {
            Some(format!(
                "the wall-time limit of {} s was reached (--max-build-time)",
                limits.wall_secs
            ))
        } else if bytes_below(&build) > limits.bytes {
            Some(format!(
                "the limit of {} bytes written was reached (--max-build-bytes)",
                limits.bytes
            ))
        } else {
            None
        };
        if reached.is_some() {
            // Pid 1 of the sandbox dies with this process, and every process of the build
            // with pid 1.
            match &pidfd {
                // SAFETY: pidfd_send_signal on a pidfd this thread owns, no siginfo, no flags.
                Some(fd) => unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0u32,
                    );
                },
                // Kernels before 5.3 have no pidfds.
                None => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            return reached;
        }
    });
    (tx, handle)
}

/// The bytes of the regular files below `dir` (not following symlinks).
fn bytes_below(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if m.is_file() => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

fn describe_status(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

fn tail_of(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Spawn `cmd` so that, before it execs, it
/// 1. dies with the thread that spawned it (a parent-death signal, checked against a parent
///    that is already gone), in a new session without a controlling terminal;
/// 2. runs `before`;
/// 3. unshares `flags`, and with a new user namespace waits until `map` has been applied from
///    this side (so that it execs as uid 0 of the namespace, with full capabilities there);
/// 4. runs `then` (a chroot, the walls).
///
/// Every step between `fork` and `exec` is a system call on memory prepared before the fork.
fn spawn(
    mut cmd: Command,
    flags: CloneFlags,
    map: Option<&IdMap>,
    before: impl Fn() -> std::io::Result<()> + Send + Sync + 'static,
) -> Result<std::process::Child, SandboxError> {
    spawn_then(&mut cmd, flags, map, before, || Ok(()))
}

fn spawn_then(
    cmd: &mut Command,
    flags: CloneFlags,
    map: Option<&IdMap>,
    before: impl Fn() -> std::io::Result<()> + Send + Sync + 'static,
    then: impl Fn() -> std::io::Result<()> + Send + Sync + 'static,
) -> Result<std::process::Child, SandboxError> {
    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(setup("pipe"))?;
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(setup("pipe"))?;
    let ready_w_fd = ready_w.as_raw_fd();
    let go_r_fd = go_r.as_raw_fd();
    let wait_for_map = map.is_some();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec; it only makes system calls (prctl,
    // getppid, setsid, unshare, getpid, write, read, and those of `before`/`then`, which make
    // only system calls too) on file descriptors owned by this function, and builds errors
    // from raw error numbers, without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            before()?;
            if libc::unshare(flags.bits()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if wait_for_map {
                let pid = libc::getpid().to_le_bytes();
                if libc::write(ready_w_fd, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                    return Err(std::io::Error::last_os_error());
                }
                let mut ok = [0u8; 1];
                if libc::read(go_r_fd, ok.as_mut_ptr().cast(), 1) != 1 || ok[0] != 1 {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            then()
        });
    }
    let map = map.cloned();
    let mapper = std::thread::spawn(move || -> Result<(), ids::MapError> {
        let Some(map) = map else { return Ok(()) };
        let mut ready = fs::File::from(ready_r);
        let mut go = fs::File::from(go_w);
        let mut pid = [0u8; 4];
        if ready.read_exact(&mut pid).is_err() {
            return Ok(()); // the child failed before unsharing; spawn reports it
        }
        let pid = i32::from_le_bytes(pid);
        let res = map.apply(pid);
        let _ = go.write_all(&[u8::from(res.is_ok())]);
        res
    });
    let spawned = cmd.spawn();
    // Close our copies of the child's ends so the mapper sees EOF if the child died early.
    drop(ready_w);
    drop(go_r);
    let mapped = mapper.join().unwrap_or(Err(ids::MapError::Panicked));
    match (spawned, mapped) {
        (Ok(child), Ok(())) => Ok(child),
        (_, Err(e)) => Err(SandboxError::IdMap(e)),
        (Err(e), Ok(())) => Err(SandboxError::Setup {
            what: "spawning the sandbox".into(),
            source: e,
        }),
    }
}

/// Run `f` in a child process that is uid 0 of a user namespace with the full id map, and
/// nothing else isolated: used to remove trees holding files owned by subordinate ids.
pub fn remove_as_mapped_root(exe: &Path, path: &Path, map: &IdMap) -> Result<(), SandboxError> {
    let mut cmd = Command::new(exe);
    cmd.arg("__remove").arg(path).stdin(Stdio::null());
    let out = spawn(cmd, CloneFlags::CLONE_NEWUSER, Some(map), || Ok(()))?
        .wait_with_output()
        .map_err(setup_io("waiting for the remover"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SandboxError::Setup {
            what: format!("removing {}", path.display()),
            source: std::io::Error::other(describe_status(out.status)),
        })
    }
}

/// The walls of this sandbox, recorded by [`enter`] for [`run_chrooted`].
static WALLS: std::sync::OnceLock<Walls> = std::sync::OnceLock::new();

fn walls() -> Walls {
    WALLS.get().copied().unwrap_or_default()
}

/// What confines untrusted code in this sandbox: its walls, writes only below
/// [`confine::WRITABLE`], [`PACKAGE_CAPS`].
fn confinement() -> Result<confine::Confinement, SandboxError> {
    confine::Confinement::prepare(walls(), confine::WRITABLE, PACKAGE_CAPS)
}

/// Sandbox side: set up namespaces and the filesystem view, then run `builder` as pid 1 of the
/// new pid namespace. Returns the exit code for the process.
pub fn enter(spec_path: &Path, builder: impl FnOnce(&SandboxSpec) -> i32) -> i32 {
    let spec: SandboxSpec = match fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rbuild sandbox: cannot read {}: {e}", spec_path.display());
            return 70;
        }
    };
    let _ = WALLS.set(spec.walls);
    // SAFETY: prctl and umask with integer arguments. Not dumpable: the confined commands run
    // as the same uid and must not ptrace this process or read its /proc/PID/{fd,mem,root}.
    // The umask is fixed so that no mode depends on the user's.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::umask(0o022);
    }
    // Descriptors inherited from rbuild (the build directory's lock) stay open in this process
    // and pid 1, and go to no command they exec.
    for fd in 3..1024 {
        // SAFETY: fcntl on descriptor numbers; those that are not open fail with EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    if !spec.network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if let Err(e) = unshare(flags) {
        eprintln!("rbuild sandbox: unshare: {e}");
        return 70;
    }
    // Pid 1 learns that this process died when the write end of this pipe closes.
    let (alive_r, alive_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rbuild sandbox: pipe: {e}");
            return 70;
        }
    };
    // SAFETY: this process is single-threaded (freshly exec'd `rbuild __sandbox`).
    match unsafe { fork() } {
        Err(e) => {
            eprintln!("rbuild sandbox: fork: {e}");
            70
        }
        Ok(ForkResult::Parent { child }) => {
            drop(alive_r);
            let _alive = alive_w;
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return code,
                    Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
                    Ok(_) => continue,
                    Err(nix::Error::EINTR) => continue,
                    Err(e) => {
                        eprintln!("rbuild sandbox: waitpid: {e}");
                        return 70;
                    }
                }
            }
        }
        Ok(ForkResult::Child) => {
            drop(alive_w);
            // Pid 1 dies with this process, and with it every process of the pid namespace.
            // SAFETY: prctl with integer arguments; poll on a descriptor this process owns.
            let orphaned = unsafe {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                let mut p = libc::pollfd {
                    fd: alive_r.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                libc::poll(&mut p, 1, 0) > 0 && p.revents & libc::POLLHUP != 0
            };
            if orphaned {
                return 70;
            }
            if let Err(e) = build_view(&spec) {
                eprintln!("rbuild sandbox: {e}");
                return 70;
            }
            use nix::sys::resource::{getrlimit, setrlimit, Resource};
            let l = spec.limits;
            for (res, n) in [
                (Resource::RLIMIT_NPROC, l.processes),
                (Resource::RLIMIT_FSIZE, l.bytes),
            ] {
                // Never above what rbuild itself was given.
                let n = getrlimit(res).map_or(n, |(_, hard)| n.min(hard));
                if let Err(e) = setrlimit(res, n, n) {
                    eprintln!("rbuild sandbox: setting {res:?} to {n}: {e}");
                    return 70;
                }
            }
            builder(&spec)
        }
    }
}

fn bind(src: &Path, dst: &Path, readonly: bool) -> Result<(), SandboxError> {
    let what = || format!("bind-mounting {} at {}", src.display(), dst.display());
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(setup(what()))?;
    if readonly {
        // Flags locked by the parent mount (nosuid, nodev, noexec…) must be kept on remount.
        let st = nix::sys::statvfs::statvfs(dst).map_err(setup(what()))?;
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        let f = st.flags();
        use nix::sys::statvfs::FsFlags;
        for (fs_flag, ms_flag) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if f.contains(fs_flag) {
                flags |= ms_flag;
            }
        }
        mount(None::<&str>, dst, None::<&str>, flags, None::<&str>).map_err(setup(what()))?;
    }
    Ok(())
}

fn mountpoint_like(src: &Path, dst: &Path) -> Result<(), SandboxError> {
    if src.is_dir() {
        fs::create_dir_all(dst).map_err(setup_io(format!("mkdir {}", dst.display())))
    } else {
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p).map_err(setup_io(format!("mkdir {}", p.display())))?;
        }
        fs::write(dst, b"").map_err(setup_io(format!("creating {}", dst.display())))
    }
}

fn mount_tmpfs(dir: &Path, flags: MsFlags, options: &str, what: &str) -> Result<(), SandboxError> {
    mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some(options)).map_err(setup(what))
}

/// The size of each of the sandbox's memory file systems (`/tmp`, `/dev/shm`): what the build
/// may write (its bytes-written limit, which the host's watchdog cannot see there), and at most
/// half the machine's memory (the kernel's default for tmpfs).
fn memory_bound(bytes: u64) -> u64 {
    let half_memory = meminfo_bytes("MemTotal").map_or(u64::MAX, |b| b / 2);
    // Inside a memory-limited cgroup (a container, a CI job), what the limit leaves free: a
    // builder then sees a small tmpfs and builds on disk instead of being killed.
    let cgroup_free = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|own| cgroup_memory_free(Path::new("/sys/fs/cgroup"), &own))
        .unwrap_or(u64::MAX);
    bytes.min(half_memory).min(cgroup_free).max(1 << 20)
}

/// The memory the cgroups of a process leave it, from its `/proc/PID/cgroup` text (`own`) and
/// the cgroup file systems at `root`: the least, over its memory cgroup and each above it, of
/// the limit less the usage (cgroup v2's `memory.max` and `memory.current`, or v1's
/// `memory.limit_in_bytes` and `memory.usage_in_bytes`), the inactive file cache (which the
/// kernel reclaims first) not counted as used. None: no limit anywhere.
fn cgroup_memory_free(root: &Path, own: &str) -> Option<u64> {
    let read = |p: PathBuf| -> Option<u64> { fs::read_to_string(p).ok()?.trim().parse().ok() };
    // v1's usage counts the cgroups below too, as its `total_` figures do.
    let inactive_file = |d: &Path, key: &str| -> u64 {
        fs::read_to_string(d.join("memory.stat"))
            .ok()
            .and_then(|stat| {
                stat.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok())?
                })
            })
            .unwrap_or(0)
    };
    // v1's `memory` hierarchy if there is one, else v2's unified one.
    let (dir, max, current) = own
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            controllers.split(',').any(|c| c == "memory").then(|| {
                (
                    root.join("memory"),
                    "memory.limit_in_bytes",
                    "memory.usage_in_bytes",
                    path,
                )
            })
        })
        .map(|(d, m, c, p)| (d.join(p.trim_start_matches('/')), m, c))
        .or_else(|| {
            let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
            Some((
                root.join(path.trim_start_matches('/')),
                "memory.max",
                "memory.current",
            ))
        })?;
    let inactive_key = if max == "memory.max" {
        "inactive_file"
    } else {
        "total_inactive_file"
    };
    let mut free: Option<u64> = None;
    for d in dir.ancestors().take_while(|d| d.starts_with(root)) {
        // "max" (v2) does not parse: no limit at that level.
        if let (Some(limit), Some(used)) = (read(d.join(max)), read(d.join(current))) {
            let used = used.saturating_sub(inactive_file(d, inactive_key));
            free = Some(free.unwrap_or(u64::MAX).min(limit.saturating_sub(used)));
        }
    }
    free
}

/// A field of `/proc/meminfo` (`MemTotal`, `MemAvailable`…), in bytes.
pub fn meminfo_bytes(field: &str) -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let kib = info
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// Where a builder may build in memory: the sandbox's private tmpfs, bounded by
/// [`memory_bound`] and gone with the sandbox.
pub const MEMORY_DIR: &str = "/tmp";

/// A fresh procfs (of the sandbox's own pid namespace) at `dir`.
fn mount_proc(dir: &Path) -> Result<(), SandboxError> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), dir, Some("proc"), flags, None::<&str>)
        .map_err(setup(format!("mounting proc at {}", dir.display())))
}

/// The device nodes every sandbox (and every chroot a builder enters) gets, bind-mounted. No
/// terminal: a build has no controlling terminal and cannot reach the user's.
pub const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

fn populate_dev(dev: &Path, shm_size: u64) -> Result<(), SandboxError> {
    mount_tmpfs(
        dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=755",
        "mounting /dev",
    )?;
    for d in DEVICES {
        let host = Path::new("/dev").join(d);
        let inside = dev.join(d);
        fs::write(&inside, b"").map_err(setup_io(format!("creating {}", inside.display())))?;
        bind(&host, &inside, false)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name)).map_err(setup_io("populating /dev"))?;
    }
    let shm = dev.join("shm");
    fs::create_dir(&shm).map_err(setup_io("mkdir /dev/shm"))?;
    mount_tmpfs(
        &shm,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=1777,size={shm_size}"),
        "mounting /dev/shm",
    )?;
    Ok(())
}

fn build_view(spec: &SandboxSpec) -> Result<(), SandboxError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(setup("making / private"))?;
    let root = spec.build_dir.join("root");
    fs::create_dir_all(&root).map_err(setup_io("mkdir root"))?;
    mount_tmpfs(
        &root,
        MsFlags::empty(),
        "mode=755",
        "mounting the sandbox root",
    )?;

    let inside = |p: &str| root.join(p.trim_start_matches('/'));
    let build = inside(BUILD_DIR);
    fs::create_dir_all(&build).map_err(setup_io("mkdir /build"))?;
    bind(&spec.host_build(), &build, false)?;

    for (host, name) in &spec.inputs {
        let dst = inside(INPUTS_DIR).join(name);
        mountpoint_like(host, &dst)?;
        bind(host, &dst, true)?;
        let meta = rbuild_store::meta::sidecar(host);
        if meta.exists() {
            let dst_meta = rbuild_store::meta::sidecar(&dst);
            mountpoint_like(&meta, &dst_meta)?;
            bind(&meta, &dst_meta, true)?;
        }
    }
    if let Some(em) = &spec.emulator {
        let dst = inside(EMULATOR_DIR).join(&em.name);
        mountpoint_like(&em.interpreter, &dst)?;
        bind(&em.interpreter, &dst, true)?;
    }
    // Read once (meminfo, the cgroups): /dev/shm and /tmp get the same size.
    let memory = memory_bound(spec.limits.bytes);
    let dev = inside("/dev");
    fs::create_dir_all(&dev).map_err(setup_io("mkdir /dev"))?;
    populate_dev(&dev, memory)?;
    let tmp = inside("/tmp");
    fs::create_dir_all(&tmp).map_err(setup_io("mkdir /tmp"))?;
    mount_tmpfs(
        &tmp,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=1777,size={memory}"),
        "mounting /tmp",
    )?;
    let proc_ = inside("/proc");
    fs::create_dir_all(&proc_).map_err(setup_io("mkdir /proc"))?;
    mount_proc(&proc_)?;

    let old = root.join(".old-root");
    fs::create_dir_all(&old).map_err(setup_io("mkdir .old-root"))?;
    pivot_root(&root, &old).map_err(setup("pivot_root"))?;
    nix::unistd::chdir("/").map_err(setup("chdir /"))?;
    umount2("/.old-root", MntFlags::MNT_DETACH).map_err(setup("detaching the host's root"))?;
    fs::remove_dir("/.old-root").map_err(setup_io("rmdir /.old-root"))?;
    nix::unistd::sethostname("rbuild").map_err(setup("sethostname"))?;
    if let Some(em) = &spec.emulator {
        register_emulator(em)?;
    }
    if !spec.network {
        loopback_up()?;
    }
    // The builder's environment is exactly the spec's (this process is single-threaded).
    for (k, _) in std::env::vars_os() {
        std::env::remove_var(k);
    }
    for (k, v) in &spec.env {
        std::env::set_var(k, v);
    }
    Ok(())
}

/// Bring up `lo` in the (new, empty) network namespace.
fn loopback_up() -> Result<(), SandboxError> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(setup("socket for lo"))?;
    // SAFETY: ifreq is plain old data; we pass a valid pointer to an initialized struct.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(SandboxError::Setup {
                what: "reading lo flags".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(SandboxError::Setup {
                what: "bringing lo up".into(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Inside a sandbox: mount `/proc` and the `/dev` devices into `root` for a chrooted command.
/// The returned guard unmounts them and removes the mount points again.
pub struct ChrootMounts {
    root: PathBuf,
    mounted: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

impl ChrootMounts {
    pub fn setup(root: &Path) -> Result<ChrootMounts, SandboxError> {
        let mut g = ChrootMounts {
            root: root.to_owned(),
            mounted: vec![],
            created: vec![],
        };
        // Mount points the tree lacks are made for the command and removed again.
        let proc_ = root.join("proc");
        if fs::symlink_metadata(&proc_).is_err() {
            fs::create_dir_all(&proc_).map_err(setup_io("mkdir proc in chroot"))?;
            g.created.push(proc_.clone());
        }
        mount_proc(&proc_)?;
        g.mounted.push(proc_);
        let dev = root.join("dev");
        if fs::symlink_metadata(&dev).is_err() {
            fs::create_dir_all(&dev).map_err(setup_io("mkdir dev in chroot"))?;
            g.created.push(dev.clone());
        }
        for d in DEVICES {
            let p = dev.join(d);
            if fs::symlink_metadata(&p).is_err() {
                fs::write(&p, b"").map_err(setup_io(format!("creating {}", p.display())))?;
                g.created.push(p.clone());
            }
            bind(&Path::new("/dev").join(d), &p, false)?;
            g.mounted.push(p);
        }
        Ok(g)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What is mounted below the root now, relative to it: nothing of the tree itself.
    pub fn mount_points(&self) -> Vec<PathBuf> {
        self.mounted
            .iter()
            .filter_map(|m| m.strip_prefix(&self.root).ok().map(Path::to_owned))
            .collect()
    }

    /// Make `src` (a directory of the sandbox) visible read-only at `rel` inside the chroot,
    /// until the guard is dropped.
    pub fn bind_readonly(&mut self, src: &Path, rel: &str) -> Result<(), SandboxError> {
        let dst = self.root.join(rel.trim_start_matches('/'));
        if !dst.exists() {
            fs::create_dir_all(&dst).map_err(setup_io(format!("mkdir {}", dst.display())))?;
            self.created.push(dst.clone());
        }
        bind(src, &dst, true)?;
        self.mounted.push(dst);
        Ok(())
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        for m in self.mounted.iter().rev() {
            let _ = umount2(m.as_path(), MntFlags::MNT_DETACH);
        }
        for c in self.created.iter().rev() {
            let _ = if c.is_dir() {
                fs::remove_dir(c)
            } else {
                fs::remove_file(c)
            };
        }
    }
}

/// Inside a sandbox: an overlay of `upper` on the read-only `lower` directories (topmost first)
/// at `merged`, so that what is written there lands in `upper` alone: new and changed entries,
/// a whiteout (a character device 0/0, [`is_whiteout`]) for each deleted one, an opaque
/// directory ([`is_opaque`]) for one that replaced a lower directory. `work` is overlayfs's
/// scratch directory, on `upper`'s filesystem. The guard unmounts it.
pub struct Overlay {
    merged: PathBuf,
}

impl Overlay {
    pub fn mount(
        lower: &[&Path],
        upper: &Path,
        work: &Path,
        merged: &Path,
    ) -> Result<Overlay, SandboxError> {
        // overlayfs splits its options at `,` and lower directories at `:`; `\` escapes both.
        let escape = |p: &Path| {
            let mut s = String::new();
            for c in p.to_string_lossy().chars() {
                if matches!(c, ',' | ':' | '\\') {
                    s.push('\\');
                }
                s.push(c);
            }
            s
        };
        let lowers: Vec<String> = lower.iter().map(|p| escape(p)).collect();
        // `userxattr`: the overlay's own marks are `user.overlay.*` xattrs, which the root of a
        // user namespace may set (the `trusted.` ones need the host's root).
        let options = format!(
            "lowerdir={},upperdir={},workdir={},userxattr",
            lowers.join(":"),
            escape(upper),
            escape(work)
        );
        mount(
            Some("overlay"),
            merged,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(setup(format!(
            "mounting an overlay at {} (overlayfs in a user namespace needs Linux 5.11)",
            merged.display()
        )))?;
        Ok(Overlay {
            merged: merged.to_owned(),
        })
    }

    pub fn merged(&self) -> &Path {
        &self.merged
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = umount2(self.merged.as_path(), MntFlags::MNT_DETACH);
    }
}

/// Inside a sandbox, before a builtin builder that runs no command of its own: raise Landlock
/// and least privilege on this very process (writes only below `/build`, [`PACKAGE_CAPS`], the
/// seccomp filter). Builders that run untrusted commands keep their privileges to mount the
/// chroot's `/proc` and `/dev`, and [`run_chrooted`] confines each command instead.
pub fn confine_builder() -> Result<(), SandboxError> {
    confinement()?
        .apply()
        .map_err(setup_io("confining the builder"))
}

/// Inside a sandbox: run `argv` chrooted into `mounts.root()` with exactly `env`, stdout and
/// stderr going to `log` (a file outside the chroot) or else to this process's stderr, behind
/// the sandbox's walls: a nested user and mount namespace (every mount locked), Landlock (writes
/// only below `/build`), `no_new_privs`, only [`PACKAGE_CAPS`] and the seccomp filter. Returns
/// the exit status.
pub fn run_chrooted(
    mounts: &ChrootMounts,
    argv: &[&str],
    env: &[(String, String)],
    log: Option<&Path>,
) -> Result<std::process::ExitStatus, SandboxError> {
    let root = CString::new(mounts.root().as_os_str().as_encoded_bytes())
        .map_err(|_| SandboxError::Unsupported("chroot path contains NUL".into()))?;
    let walls = walls();
    let confinement = confinement()?;
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    match log {
        Some(p) => {
            let f = fs::File::create(p).map_err(setup_io(format!("creating {}", p.display())))?;
            let f2 = f.try_clone().map_err(setup_io("log file"))?;
            cmd.stdout(f).stderr(f2);
        }
        None => {
            cmd.stdout(std::io::stderr()).stderr(std::io::stderr());
        }
    }
    cmd.stdin(Stdio::null());
    let (flags, map) = if walls.mounts {
        // The sandbox's root maps the same ids one level down; mounts copied into a mount
        // namespace owned by a less privileged user namespace are locked.
        (
            CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS,
            Some(IdMap::Root),
        )
    } else {
        (CloneFlags::empty(), None)
    };
    let then = move || {
        // SAFETY: chroot and chdir with a NUL-terminated path that lives in this closure.
        if unsafe { libc::chroot(root.as_ptr()) } != 0 || unsafe { libc::chdir(c"/".as_ptr()) } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        confinement.apply()
    };
    let mut child =
        spawn_then(&mut cmd, flags, map.as_ref(), || Ok(()), then).map_err(|e| match e {
            SandboxError::Setup { source, .. } => SandboxError::Setup {
                what: format!("running {} in the chroot", argv[0]),
                source,
            },
            other => other,
        })?;
    child
        .wait()
        .map_err(setup_io(format!("waiting for {}", argv[0])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_memory_free_takes_the_tightest_limit_above_a_process() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let put = |rel: &str, text: &str| {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        };
        // v2: a job limited to 1 GiB (768 MiB used, of which 256 MiB inactive cache: 512 MiB
        // free) below a slice limited to 2 GiB (1 GiB used); unlimited ("max") at the top.
        put("memory.max", "max\n");
        put("memory.current", "9999999999\n");
        put("ci.slice/memory.max", &format!("{}\n", 2u64 << 30));
        put("ci.slice/memory.current", &format!("{}\n", 1u64 << 30));
        put("ci.slice/job/memory.max", &format!("{}\n", 1u64 << 30));
        put("ci.slice/job/memory.current", &format!("{}\n", 3u64 << 28));
        put(
            "ci.slice/job/memory.stat",
            "anon 1\ninactive_anon 2\ninactive_file 268435456\n",
        );
        assert_eq!(
            cgroup_memory_free(root, "0::/ci.slice/job\n"),
            Some(1 << 29)
        );
        assert_eq!(cgroup_memory_free(root, "0::/\n"), None);
        // v1: the memory hierarchy's limit, in a hybrid layout beside a v2 line.
        put(
            "memory/job/memory.limit_in_bytes",
            &format!("{}\n", 3u64 << 30),
        );
        put(
            "memory/job/memory.usage_in_bytes",
            &format!("{}\n", 2u64 << 30),
        );
        put(
            "memory/job/memory.stat",
            "cache 5\ninactive_file 1\ntotal_cache 7\ntotal_inactive_file 1073741824\n",
        );
        assert_eq!(
            cgroup_memory_free(root, "4:memory:/job\n1:cpu:/\n0::/\n"),
            Some(2 << 30)
        );
    }
}
