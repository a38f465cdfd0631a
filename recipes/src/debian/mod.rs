//! The Debian archive model: what rbuild trusts about a Debian archive and how it gets there.
//!
//! Trust starts at a set of pinned OpenPGP fingerprints. [`release::verify_inrelease`] checks
//! that the cleartext-signed `InRelease` carries at least one good signature by one of those keys
//! (fail closed: anything else is an error) and parses the signed `Release` fields;
//! [`release::check_file`] checks each index file against the sha256 and size the signed Release
//! lists; [`packages`] decompresses and parses `Packages` indices and writes and reads the compact
//! verified index (one line per package); [`resolve`] compares Debian versions, picks the package
//! set `debootstrap` (default variant) installs and the order dpkg can install it in.
//! [`testkit`] builds throwaway keys and signed archives for tests. Every error is a
//! [`DebianError`] whose message names the file, the check, and what was expected and found.

pub mod arch;
pub mod packages;
pub mod release;
pub mod resolve;
pub mod testkit;

pub use packages::{
    decompress, index_line, index_text, lookup_index_line, parse_packages, Dep, IndexEntry, Package,
};
pub use release::{check_file, parse_release, verify_inrelease, FileEntry, Release};
pub use resolve::{compare_versions, install_order, resolve_debootstrap};

/// Everything that can go wrong while checking or reading a Debian archive.
///
/// `file` is always the archive-relative path the caller passed (e.g.
/// `dists/bullseye/InRelease`), so a message tells which download is at fault.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    /// No signature in the InRelease verified with a pinned key.
    #[error("{file}: no valid signature by a pinned key (pinned: {pinned}; signatures found by: {found})")]
    NoValidSignature {
        /// The signed file.
        file: String,
        /// The pinned fingerprints, each with a note if the keyring lacks it.
        pinned: String,
        /// Who made the signatures the file carries, and why each failed.
        found: String,
    },
    /// The file is not an OpenPGP message sequoia can verify at all (e.g. not signed).
    #[error("{file}: signature check: expected an OpenPGP cleartext-signed message, got one that cannot be verified: {reason}")]
    NotSigned {
        /// The file.
        file: String,
        /// What the OpenPGP parser said.
        reason: String,
    },
    /// The keyring could not be read, or no fingerprint was pinned.
    #[error("{file}: keyring check: {reason}")]
    Keyring {
        /// The signed file the keyring was meant to verify.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// An index file's sha256 differs from the signed Release (the sizes are given too).
    #[error(
        "{file}: sha256 mismatch against the signed Release: expected {expected} ({expected_size} bytes), got {actual} ({actual_size} bytes)"
    )]
    HashMismatch {
        /// The index file.
        file: String,
        /// The sha256 the signed Release lists.
        expected: String,
        /// The size the signed Release lists.
        expected_size: u64,
        /// What the bytes hash to.
        actual: String,
        /// The size of the bytes.
        actual_size: u64,
    },
    /// An index file has the sha256 the signed Release lists but not its size.
    #[error("{file}: size mismatch against the signed Release: expected {expected} bytes, got {actual} bytes")]
    SizeMismatch {
        /// The index file.
        file: String,
        /// What the signed Release lists.
        expected: u64,
        /// The size of the bytes.
        actual: u64,
    },
    /// An index file is not listed in the signed Release at all.
    #[error("{file}: not listed in the signed Release: expected a SHA256 entry for it, got none (the Release lists {listed} files)")]
    NotInRelease {
        /// The index file.
        file: String,
        /// How many files the Release does list.
        listed: usize,
    },
    /// A file could not be decompressed.
    #[error("{file}: {format} decompression failed: {reason}")]
    Decompress {
        /// The compressed file.
        file: String,
        /// `xz`, `gzip`, or the unsupported extension.
        format: String,
        /// What the decoder said.
        reason: String,
    },
    /// A field or line of a Release or Packages file is missing or malformed.
    #[error("{file}: {check}: expected {expected}, got {actual}")]
    Invalid {
        /// The file.
        file: String,
        /// Which check failed, with where (stanza, field, line).
        check: String,
        /// What the format requires.
        expected: String,
        /// What the file holds.
        actual: String,
    },
    /// A relation field of a Packages file is malformed.
    #[error("{file}: {check}: expected a relation per Debian policy §7.1, got an error: expected {source}")]
    Relation {
        /// The file.
        file: String,
        /// Where: stanza and field.
        check: String,
        /// What is wrong with it.
        #[source]
        source: packages::RelationError,
    },
    /// A request of the include list is not a relation.
    #[error("unresolvable dependency: the include list {request:?}: expected a package (or a provider) satisfying one of the alternatives, got a malformed request (expected {source})")]
    MalformedInclude {
        /// The request as written.
        request: String,
        /// What is wrong with it.
        #[source]
        source: packages::RelationError,
    },
    /// A package (or a requested name) has a relation no package in the archive satisfies.
    #[error("unresolvable dependency: {package} {relation}: expected a package (or a provider) satisfying one of the alternatives, got {found}")]
    Unresolvable {
        /// The package with the relation, with its version (or `requested` for `include`).
        package: String,
        /// The relation, e.g. `Depends: libfoo (>= 2) | libbar`.
        relation: String,
        /// What the archive has under those names.
        found: String,
    },
}
