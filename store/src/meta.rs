//! Ownership metadata kept beside a tree in the store ("bare-user" mode).
//!
//! Trees in the store are owned by the invoking user and carry no setuid/setgid bits and no file
//! capabilities. What the tree *means* — numeric uid/gid as seen inside the sandbox, the full mode
//! including special bits, the clamped mtime, the `security.capability` xattr and POSIX ACLs — is recorded here,
//! one entry per path, and applied only inside a sandbox or when packing an archive.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// File name of the metadata sidecar a builder writes next to `$out` (`$out.meta`).
pub const META_SUFFIX: &str = ".meta";

/// Metadata of one path in a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    pub uid: u32,
    pub gid: u32,
    /// Full mode bits (permission and special bits, no file type).
    pub mode: u32,
    /// Modification time in seconds, already clamped by the builder.
    pub mtime: i64,
    /// Hex of the raw `security.capability` xattr value, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caps: Option<String>,
    /// Hex of the raw POSIX ACL xattrs ([`ACL_XATTRS`]) the entry has, by xattr name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub acls: BTreeMap<String, String>,
}

/// The extended attributes that hold POSIX ACLs: kept in [`EntryMeta::acls`], not on disk (their
/// ids, like the owner's, are the sandbox's).
pub const ACL_XATTRS: [&str; 2] = ["system.posix_acl_access", "system.posix_acl_default"];

impl EntryMeta {
    /// A path owned by root (uid and gid 0), without file capabilities.
    pub fn root(mode: u32, mtime: i64) -> EntryMeta {
        EntryMeta {
            uid: 0,
            gid: 0,
            mode,
            mtime,
            caps: None,
            acls: BTreeMap::new(),
        }
    }
}

/// Metadata of a whole tree, keyed by path relative to the tree root ("" is the root itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeMeta {
    pub entries: BTreeMap<String, EntryMeta>,
}

impl TreeMeta {
    pub fn read(path: &Path) -> Result<TreeMeta, StoreError> {
        let bytes = std::fs::read(path).map_err(|e| StoreError::io(path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.to_owned(),
            what: format!("tree metadata is not valid JSON: {e}"),
        })
    }

    pub fn write(&self, path: &Path) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(self).expect("TreeMeta serializes");
        std::fs::write(path, bytes).map_err(|e| StoreError::io(path, e))
    }

    pub fn get(&self, rel: &str) -> Option<&EntryMeta> {
        self.entries.get(rel)
    }
}

/// The sidecar path for an output path: `<out>.meta`.
pub fn sidecar(out: &Path) -> std::path::PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(META_SUFFIX);
    s.into()
}
