//! A full disk, named as such. Without this, a store on a full filesystem fails with whatever the
//! first victim says (`unpack mawk… failed (exit status 101)`, an empty log: the log could not be
//! written either). Three signs are recognised:
//!
//! - `ENOSPC` anywhere in an error's source chain (the host side: fetching, registering, SQLite's
//!   "database or disk is full");
//! - a sandboxed builder that exited with [`ENOSPC_EXIT`]: [`builder_exit_code`] gives it to
//!   builders whose error chain (or panic) says no space is left, since their log may be empty;
//! - `statvfs` of the store showing (almost) no space left when the error surfaces.

use std::path::{Path, PathBuf};

use crate::scheduler::EngineError;

/// The exit status of a sandboxed builder that ran out of space (ENOSPC's errno).
pub const ENOSPC_EXIT: i32 = libc::ENOSPC;

/// Below this many free bytes (for unprivileged users), a store's filesystem counts as full.
const FULL_BELOW: u64 = 1 << 20;

/// "No space left on device on the filesystem holding STORE", with the way out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no space left on device on the filesystem holding {store}{free}: free space with `rbuild gc` \
     (it deletes every output no root reaches), remove other files there, or use --store DIR on a \
     larger filesystem",
    free = match free { Some(b) => format!(" ({b} bytes free)"), None => String::new() }
)]
pub struct NoSpace {
    pub store: PathBuf,
    /// Bytes available to unprivileged users, when `statvfs` could tell.
    pub free: Option<u64>,
}

/// Whether `err`, or an error in its source chain, is ENOSPC (or SQLite's "disk is full").
pub fn is_no_space(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::ENOSPC) {
                return true;
            }
        }
        if text_says_no_space(&e.to_string()) {
            return true;
        }
        cur = e.source();
    }
    false
}

fn text_says_no_space(text: &str) -> bool {
    let t = text.to_lowercase();
    t.contains("no space left on device")
        || t.contains("database or disk is full")
        || t.contains("storagefull")
}

/// Bytes available to unprivileged users on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Whether a build failure is a full disk: ENOSPC in the chain, a builder that exited with
/// [`ENOSPC_EXIT`], or a store filesystem with (almost) no space left. `None` otherwise.
pub fn diagnose(store: &Path, err: &(dyn std::error::Error + 'static)) -> Option<NoSpace> {
    let mut builder_out_of_space = false;
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(EngineError::BuildFailed { status, tail, .. }) = e.downcast_ref::<EngineError>()
        {
            builder_out_of_space |=
                *status == format!("exit status {ENOSPC_EXIT}") || text_says_no_space(tail);
        }
        cur = e.source();
    }
    let free = free_bytes(store);
    let full = free.is_some_and(|b| b < FULL_BELOW);
    (builder_out_of_space || full || is_no_space(err)).then(|| NoSpace {
        store: store.to_owned(),
        free,
    })
}

/// For a builder's top-level error (in the sandbox): if it is a full disk, the message to print
/// and the exit status to use ([`ENOSPC_EXIT`]), so the host names the full disk even when the
/// log could not be written.
pub fn builder_exit_code(err: &anyhow::Error) -> Option<(String, i32)> {
    err.chain().any(is_no_space).then(|| {
        (
            format!(
                "error: no space left on device (on the filesystem holding the store): {}",
                crate::errors::chain(err.as_ref())
            ),
            ENOSPC_EXIT,
        )
    })
}

/// Whether a builder's panic message says no space was left.
pub fn panic_says_no_space(payload: &(dyn std::any::Any + Send)) -> bool {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .is_some_and(text_says_no_space)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_found_in_the_chain_and_named_with_the_store() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let err = anyhow::Error::new(io).context("writing /build/out/usr/bin/mawk");
        let (msg, code) = builder_exit_code(&err).expect("recognised");
        assert_eq!(code, ENOSPC_EXIT);
        assert!(msg.starts_with("error: no space left on device"), "{msg}");
        assert!(builder_exit_code(&anyhow::anyhow!("other")).is_none());

        let store = tempfile::tempdir().unwrap();
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let n = diagnose(store.path(), &io).expect("ENOSPC is a full disk");
        let text = n.to_string();
        assert!(
            text.starts_with(&format!(
                "no space left on device on the filesystem holding {}",
                store.path().display()
            )) && text.contains("rbuild gc"),
            "{text}"
        );
        let other = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        // (This filesystem is not full while the tests run.)
        assert_eq!(diagnose(store.path(), &other), None);
    }

    #[test]
    fn a_builder_that_exited_enospc_is_a_full_disk() {
        let store = tempfile::tempdir().unwrap();
        let failed = EngineError::BuildFailed {
            name: "mawk".into(),
            stage: crate::Stage::Unpack,
            status: format!("exit status {ENOSPC_EXIT}"),
            log: "/nonexistent.log".into(),
            tail: String::new(),
        };
        assert!(diagnose(store.path(), &failed).is_some());
        let panicked = EngineError::BuildFailed {
            name: "mawk".into(),
            stage: crate::Stage::Unpack,
            status: "exit status 101".into(),
            log: "/nonexistent.log".into(),
            tail: "some other failure".into(),
        };
        assert!(diagnose(store.path(), &panicked).is_none());
        let payload: Box<dyn std::any::Any + Send> =
            Box::new("called `Result::unwrap()` on an `Err` value: No space left on device");
        assert!(panic_says_no_space(payload.as_ref()));
    }
}
