//! The walls around the code a build runs: what keeps a builder, a maintainer script or a `run`
//! step from changing anything but its own output.
//!
//! Inside its sandbox a build is uid 0 of a user namespace and *owns* the store files it is
//! shown (they belong to the invoking user), so file modes are no wall against it. Three walls
//! are, each enough on its own against the escapes the tests try:
//!
//! * **Locked mounts.** The confined process continues in a user namespace nested in the
//!   sandbox's, with a mount namespace of its own. The kernel then locks every mount the sandbox
//!   made: read-only input binds cannot be remounted writable, and `/proc`, `/dev` and bind mounts
//!   cannot be unmounted to uncover what is below.
//! * **Landlock.** Write access only below `/build` (its own output and scratch), `/tmp`,
//!   `/dev/shm` and the harmless devices; no signals to processes outside its domain.
//! * **Least privilege.** `no_new_privs`; only the capabilities installing packages needs
//!   ([`PACKAGE_CAPS`]: no `SYS_ADMIN`, so no mounts; no `SYS_CHROOT`, so no chroot escape);
//!   a seccomp filter refusing new user namespaces (which would grant every capability again),
//!   keyrings, `bpf`, `userfaultfd`, `perf_event_open`, `kexec_*`, io_uring and the terminal
//!   injection ioctls `TIOCSTI` and `TIOCLINUX`, on the x32 entry points too; 32-bit x86 system
//!   calls kill the process.
//!
//! Everything that allocates happens in [`Confinement::prepare`], before `fork`; what runs between
//! `fork` and `exec` ([`Confinement::apply`]) only makes system calls on memory prepared earlier.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use landlock::{
    AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, Scope, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

use super::SandboxError;

/// The test-only switch that keeps only some walls up, to prove that each holds alone:
/// a comma-separated list of `mounts`, `landlock`, `privileges`, or `none`. Unset: all walls.
pub const TEST_ONLY_WALLS_VAR: &str = "RBUILD_TEST_ONLY_WALLS";

/// Which walls are up. Always all of them, except in rbuild's own tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Walls {
    pub mounts: bool,
    pub landlock: bool,
    pub privileges: bool,
}

impl Default for Walls {
    fn default() -> Walls {
        Walls {
            mounts: true,
            landlock: true,
            privileges: true,
        }
    }
}

impl Walls {
    /// All walls, unless [`TEST_ONLY_WALLS_VAR`] names some.
    pub fn from_env() -> Result<Walls, SandboxError> {
        let Ok(list) = std::env::var(TEST_ONLY_WALLS_VAR) else {
            return Ok(Walls::default());
        };
        let mut w = Walls {
            mounts: false,
            landlock: false,
            privileges: false,
        };
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "mounts" => w.mounts = true,
                "landlock" => w.landlock = true,
                "privileges" => w.privileges = true,
                "none" => {}
                other => {
                    return Err(SandboxError::Unsupported(format!(
                        "{TEST_ONLY_WALLS_VAR}: unknown wall {other:?} (expected mounts, landlock, privileges or none)"
                    )))
                }
            }
        }
        Ok(w)
    }
}

/// The capabilities dpkg, maintainer scripts and `run` steps keep (found by installing the
/// bullseye package set and README's layered example with nothing else): owning and moding
/// files of any id, `setuid`/`setgid` for `su`-like tools and file capabilities for packages
/// that set them (`ping`).
pub const PACKAGE_CAPS: &[(u32, &str)] = &[
    (0, "CHOWN"),
    (1, "DAC_OVERRIDE"),
    (3, "FOWNER"),
    (4, "FSETID"),
    (6, "SETGID"),
    (7, "SETUID"),
    (31, "SETFCAP"),
];

/// Where a confined process may write: below these paths (as the sandbox sees them).
pub const WRITABLE: &[&str] = &[
    "/build",
    "/tmp",
    "/dev/shm",
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// The Landlock ABI rbuild asks for (6: write rights, truncation, device ioctls, signal scoping).
const LANDLOCK_ABI: ABI = ABI::V6;

/// Everything a confined process needs, made before `fork`.
pub struct Confinement {
    walls: Walls,
    /// The Landlock ruleset to enforce (none when the kernel has no Landlock).
    ruleset: Option<OwnedFd>,
    filters: Vec<BpfProgram>,
    keep: u64,
    last_cap: u32,
}

impl Confinement {
    /// Prepare the walls `walls` names for a process that may write below `writable` and keeps
    /// the capabilities `keep`.
    pub fn prepare(
        walls: Walls,
        writable: &[&str],
        keep: &[(u32, &str)],
    ) -> Result<Confinement, SandboxError> {
        let ruleset = if walls.landlock {
            landlock_ruleset(writable)?
        } else {
            None
        };
        let filters = if walls.privileges {
            seccomp_filters()?
        } else {
            Vec::new()
        };
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        Ok(Confinement {
            walls,
            ruleset,
            filters,
            keep: keep.iter().fold(0, |m, (c, _)| m | (1u64 << c)),
            last_cap,
        })
    }

    /// Raise the walls on the calling process (between `fork` and `exec`, or before running a
    /// builder): `no_new_privs`, Landlock, the capability drop and the seccomp filters, in that
    /// order (the filter last, so that it cannot refuse the calls before it). Only system calls.
    pub fn apply(&self) -> std::io::Result<()> {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if let Some(fd) = &self.ruleset {
            // SAFETY: landlock_restrict_self with a ruleset fd this struct owns and no flags.
            let r =
                unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0u32) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if self.walls.privileges {
            drop_capabilities(self.keep, self.last_cap)?;
            for f in &self.filters {
                seccompiler::apply_filter(f).map_err(std::io::Error::other)?;
            }
        }
        Ok(())
    }
}

fn landlock_err(e: landlock::RulesetError) -> SandboxError {
    SandboxError::Setup {
        what: "preparing the Landlock ruleset".into(),
        source: std::io::Error::other(e),
    }
}

/// A ruleset that handles every write right and allows them below `writable` only; `None` when
/// the kernel has no Landlock (`rbuild doctor` says so).
fn landlock_ruleset(writable: &[&str]) -> Result<Option<OwnedFd>, SandboxError> {
    let access = AccessFs::from_write(LANDLOCK_ABI);
    let mut created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(access)
        .map_err(landlock_err)?
        .scope(Scope::Signal)
        .map_err(landlock_err)?
        .create()
        .map_err(landlock_err)?;
    for p in writable {
        let Ok(fd) = PathFd::new(p) else {
            continue; // not in this sandbox (a chroot-less builder has no /dev/shm, say)
        };
        let is_dir = Path::new(p).is_dir();
        let rights = if is_dir {
            access
        } else {
            access & AccessFs::from_file(LANDLOCK_ABI)
        };
        created = created
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(landlock_err)?;
    }
    Ok(Option::<OwnedFd>::from(created))
}

/// The terminal injection ioctls (the same numbers on every Linux architecture rbuild runs on).
const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541C;

/// The seccomp filters: one refusing (EPERM) what no build needs, one answering `clone3` with
/// ENOSYS (its flags cannot be inspected; C libraries fall back to `clone`, whose can), and one
/// answering the calls that flush files to disk (`fsync`, `fdatasync`, `sync_file_range`,
/// `syncfs`, `sync`) with success without flushing: a build writes into scratch that is thrown
/// away if it fails, and the store flushes an output once, when it registers it (outside the
/// sandbox), so flushes inside are cost without benefit.
fn seccomp_filters() -> Result<Vec<BpfProgram>, SandboxError> {
    #[cfg(target_arch = "x86_64")]
    let (arch, x32): (TargetArch, &[i64]) = (TargetArch::x86_64, &[0, 0x4000_0000]);
    #[cfg(target_arch = "aarch64")]
    let (arch, x32): (TargetArch, &[i64]) = (TargetArch::aarch64, &[0]);
    let err = |e: seccompiler::BackendError| SandboxError::Setup {
        what: "compiling the seccomp filter".into(),
        source: std::io::Error::other(e),
    };
    let cond = |arg: u8, mask: u64, value: u64| -> Result<SeccompRule, SandboxError> {
        let c = SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(mask),
            value,
        )
        .map_err(err)?;
        SeccompRule::new(vec![c]).map_err(err)
    };
    let denied = [
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_keyctl,
        libc::SYS_bpf,
        libc::SYS_userfaultfd,
        libc::SYS_perf_event_open,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ];
    let newuser = libc::CLONE_NEWUSER as u64;
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = Default::default();
    let mut enosys: std::collections::BTreeMap<i64, Vec<SeccompRule>> = Default::default();
    let mut no_flush: std::collections::BTreeMap<i64, Vec<SeccompRule>> = Default::default();
    for &abi in x32 {
        for nr in [
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_sync_file_range,
            libc::SYS_syncfs,
            libc::SYS_sync,
        ] {
            no_flush.insert(nr | abi, vec![]);
        }
        for nr in denied {
            rules.insert(nr | abi, vec![]);
        }
        let tty = vec![
            cond(1, 0xffff_ffff, TIOCSTI)?,
            cond(1, 0xffff_ffff, TIOCLINUX)?,
        ];
        rules.insert(libc::SYS_ioctl | abi, tty.clone());
        if abi != 0 {
            // x32's own ioctl entry point.
            rules.insert(514 | abi, tty);
        }
        rules.insert(libc::SYS_unshare | abi, vec![cond(0, newuser, newuser)?]);
        rules.insert(libc::SYS_clone | abi, vec![cond(0, newuser, newuser)?]);
        enosys.insert(libc::SYS_clone3 | abi, vec![]);
    }
    let mut out = Vec::new();
    // Errno(0): the call returns 0, as if it had succeeded.
    for (rules, errno) in [(rules, libc::EPERM), (enosys, libc::ENOSYS), (no_flush, 0)] {
        let f = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )
        .map_err(err)?;
        out.push(BpfProgram::try_from(f).map_err(err)?);
    }
    Ok(out)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Keep only the capabilities in the `keep` bit mask: out of the bounding set (so that no
/// `exec` brings them back), the ambient set, and the effective, permitted and inheritable sets.
fn drop_capabilities(keep: u64, last_cap: u32) -> std::io::Result<()> {
    for cap in 0..=last_cap.min(63) {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |bits: u32| CapData {
        effective: bits,
        permitted: bits,
        inheritable: bits,
    };
    let data = [half(keep as u32), half((keep >> 32) as u32)];
    // SAFETY: capset with a version-3 header and the two data words version 3 expects, both
    // living on this stack frame for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The Landlock ABI this kernel offers (0: none), for `rbuild doctor`.
pub fn landlock_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns the ABI version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0)
}

/// The names of the capabilities a mask holds (for messages).
pub fn cap_names(keep: &[(u32, &str)]) -> String {
    keep.iter()
        .map(|(_, n)| format!("CAP_{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
