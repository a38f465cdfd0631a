//! User namespace id maps: which host ids back uid/gid 0..N inside the sandbox, and why that
//! might not work on this machine.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::SandboxError;

/// How many ids the sandbox maps (uid/gid 0 … 65535 inside), as rootless podman does.
pub const RANGE: u32 = 65536;

/// The id map of a sandbox's user namespace.
#[derive(Debug, Clone)]
pub enum IdMap {
    /// We are root (of the host, or of a sandbox whose commands get a namespace nested in it):
    /// write `/proc/PID/{uid,gid}_map` directly (identity map of the range).
    Root,
    /// Unprivileged: uid 0 inside is the invoking user; 1… come from `/etc/subuid`/`subgid`
    /// through the setuid helpers `newuidmap`/`newgidmap`.
    Subordinate {
        uid: u32,
        gid: u32,
        subuid: (u32, u32),
        subgid: (u32, u32),
        newuidmap: PathBuf,
        newgidmap: PathBuf,
    },
}

/// Why writing a sandbox's id map failed.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("running {tool}: {source}")]
    Run {
        tool: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Refused { command: String, stderr: String },
    #[error("id mapper thread panicked")]
    Panicked,
}

impl IdMap {
    pub(super) fn apply(&self, pid: i32) -> Result<(), MapError> {
        match self {
            IdMap::Root => {
                // Two extents, as an unprivileged sandbox's own map has (0 → the user, 1… →
                // its subordinate range): each extent of a nested map must lie within one
                // extent of its parent's.
                let line = format!("0 0 1\n1 1 {}\n", RANGE - 1);
                for f in ["uid_map", "gid_map"] {
                    let p = format!("/proc/{pid}/{f}");
                    fs::write(&p, &line).map_err(|source| MapError::Write {
                        path: p.clone(),
                        source,
                    })?;
                }
                Ok(())
            }
            IdMap::Subordinate {
                uid,
                gid,
                subuid,
                subgid,
                newuidmap,
                newgidmap,
            } => {
                let n = RANGE - 1;
                for (tool, own, sub) in [(newuidmap, uid, subuid), (newgidmap, gid, subgid)] {
                    let out = Command::new(tool)
                        .arg(pid.to_string())
                        .args([
                            "0",
                            &own.to_string(),
                            "1",
                            "1",
                            &sub.0.to_string(),
                            &n.to_string(),
                        ])
                        .output()
                        .map_err(|source| MapError::Run {
                            tool: tool.display().to_string(),
                            source,
                        })?;
                    if !out.status.success() {
                        return Err(MapError::Refused {
                            command: format!("{} {pid} 0 {own} 1 1 {} {n}", tool.display(), sub.0),
                            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                        });
                    }
                }
                Ok(())
            }
        }
    }
}

fn read_sysctl(path: &str) -> Option<i64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/bin".into(), "/usr/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Look up the subordinate range of `user` (name or numeric id) in an `/etc/subuid`-style file.
pub fn subordinate_range(file: &Path, user: &str, id: u32) -> Option<(u32, u32)> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        if who == user || who == id.to_string() {
            Some((start.parse().ok()?, count.parse().ok()?))
        } else {
            None
        }
    })
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| uid.to_string())
}

/// Decide how to map ids on this machine, or say exactly why sandboxes cannot work and how to fix it.
pub fn check_support() -> Result<IdMap, SandboxError> {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    if read_sysctl("/proc/sys/user/max_user_namespaces") == Some(0) {
        return Err(SandboxError::Unsupported(
            "user namespaces are disabled on this machine (user.max_user_namespaces = 0); enable them with `sysctl -w user.max_user_namespaces=15000` (and persist it in /etc/sysctl.d/)".into(),
        ));
    }
    if uid == 0 {
        return Ok(IdMap::Root);
    }
    if read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        return Err(SandboxError::Unsupported(
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0); enable them with `sysctl -w kernel.unprivileged_userns_clone=1`".into(),
        ));
    }
    if read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        return Err(SandboxError::Unsupported(
            "AppArmor restricts unprivileged user namespaces here (kernel.apparmor_restrict_unprivileged_userns = 1, as on recent Ubuntu); either allow them with `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or give the rbuild binary an AppArmor profile with `userns,` (see /etc/apparmor.d/ and apparmor.d(5))".into(),
        ));
    }
    let name = user_name(uid);
    let newuidmap = find_tool("newuidmap");
    let newgidmap = find_tool("newgidmap");
    let (Some(newuidmap), Some(newgidmap)) = (newuidmap, newgidmap) else {
        return Err(SandboxError::Unsupported(
            "newuidmap/newgidmap are not installed; they map the subordinate ids of /etc/subuid into the sandbox. Install them (Debian/Ubuntu: `apt install uidmap`; Fedora: `dnf install shadow-utils`)".into(),
        ));
    };
    let subuid = subordinate_range(Path::new("/etc/subuid"), &name, uid);
    let subgid = subordinate_range(Path::new("/etc/subgid"), &name, gid.max(uid));
    let subgid = subgid.or_else(|| subordinate_range(Path::new("/etc/subgid"), &name, uid));
    let need = RANGE - 1;
    match (subuid, subgid) {
        (Some(u), Some(g)) if u.1 >= need && g.1 >= need => Ok(IdMap::Subordinate {
            uid,
            gid,
            subuid: u,
            subgid: g,
            newuidmap,
            newgidmap,
        }),
        (u, g) => {
            let which = match (u, g) {
                (None, _) => "/etc/subuid has no entry",
                (_, None) => "/etc/subgid has no entry",
                _ => "the subordinate id range is too small",
            };
            Err(SandboxError::Unsupported(format!(
                "{which} for user {name} (uid {uid}); rbuild needs {need} subordinate uids and gids to map a whole system into its sandbox. As root: `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}` (or add `{name}:100000:65536` to /etc/subuid and /etc/subgid)"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_by_name_or_id() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("subuid");
        fs::write(&f, "alice:100000:65536\n1001:200000:65536\n").unwrap();
        assert_eq!(subordinate_range(&f, "alice", 1000), Some((100000, 65536)));
        assert_eq!(subordinate_range(&f, "bob", 1001), Some((200000, 65536)));
        assert_eq!(subordinate_range(&f, "carol", 1002), None);
    }
}
