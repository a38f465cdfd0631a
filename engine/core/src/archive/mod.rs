//! Archive formats rbuild reads and writes: Debian packages in ([`deb`]), deterministic tars and
//! reproducible gzip out ([`tar_out`]), and OCI image layouts ([`oci`]).
//!
//! Every reader here treats its input as hostile: paths are normalised and confined to the output
//! root, links cannot redirect later writes, and ownership/special mode bits never reach the disk —
//! they are returned as a [`rbuild_store::meta::TreeMeta`] instead. Every writer is deterministic:
//! its output bytes depend only on the tree, its metadata and the explicit parameters.

pub mod deb;
pub mod oci;
pub mod tar_out;

#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

/// What can go wrong reading or writing an archive. Messages name the archive (or tree), the
/// member and the entry concerned, then the problem.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// An I/O error on a file that is not inside an archive.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A problem with a whole member of an archive (or the archive itself, with member "").
    #[error("{archive}: {}{problem}", member_prefix(.member))]
    Member {
        archive: String,
        member: String,
        problem: String,
    },
    /// A member compressed in a way that cannot be decoded.
    #[error("{archive}: {}{source}", member_prefix(.member))]
    Decoder {
        archive: String,
        member: String,
        #[source]
        source: deb::DecoderError,
    },
    /// A problem with one entry of an archive member.
    #[error("{archive}: {member}: entry {entry:?} {problem}")]
    Entry {
        archive: String,
        member: String,
        entry: String,
        problem: String,
    },
    /// An entry whose path is refused.
    #[error("{archive}: {member}: entry {entry:?} {source}")]
    EntryPath {
        archive: String,
        member: String,
        entry: String,
        #[source]
        source: deb::UnsafePath,
    },
    /// A hardlink entry whose target's path is refused.
    #[error("{archive}: {member}: entry {entry:?} is a hardlink to {target:?} which {source}")]
    LinkTarget {
        archive: String,
        member: String,
        entry: String,
        target: String,
        #[source]
        source: deb::UnsafePath,
    },
    /// A problem with one path of a tree being archived.
    #[error("{}: {problem}", path.display())]
    Tree { path: PathBuf, problem: String },
    /// A digest or name given for a path of an OCI layout is not one.
    #[error("{}: {source}", path.display())]
    Malformed {
        path: PathBuf,
        #[source]
        source: oci::Malformed,
    },
    /// A compression or encoding step failed.
    #[error("{what}: {problem}")]
    Codec { what: String, problem: String },
}

fn member_prefix(member: &str) -> String {
    if member.is_empty() {
        String::new()
    } else {
        format!("{member}: ")
    }
}

impl ArchiveError {
    pub(crate) fn io(path: &Path, source: io::Error) -> ArchiveError {
        ArchiveError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn tree(path: &Path, problem: impl Into<String>) -> ArchiveError {
        ArchiveError::Tree {
            path: path.to_owned(),
            problem: problem.into(),
        }
    }
}
