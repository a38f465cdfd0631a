//! Unpacking Debian binary packages (`.deb`) into a store tree plus its ownership metadata.
//!
//! A `.deb` is an `ar` archive holding `debian-binary`, `control.tar[.gz|.xz|.zst]` and
//! `data.tar[.gz|.xz|.zst|.lzma]`, in that order. [`unpack_deb`] streams both tars into
//! `out/control/` and `out/data/` without ever holding a member in memory, as the invoking user:
//! owners, special mode bits and file capabilities go into the returned [`TreeMeta`] only. The
//! package is treated as hostile: absolute paths, `..`, hardlinks to anything not extracted before,
//! writes through a symlink extracted earlier, and device nodes or fifos are refused with an error
//! naming the package, the member and the entry. Nothing is ever written through a symlink.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, BufReader, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rbuild_store::meta::{EntryMeta, TreeMeta};
use tar::EntryType;

use super::ArchiveError;

/// The PAX record carrying a file's `security.capability` xattr.
const CAPS_PAX_KEY: &[u8] = b"SCHILY.xattr.security.capability";

/// Unpack the `.deb` at `deb` into `out` (created if missing; `out/control` and `out/data` must not
/// exist yet). Returns the metadata of every path below `out`, keyed `""`, `"control"`,
/// `"control/…"`, `"data"` and `"data/…"`.
pub fn unpack_deb(deb: &Path, out: &Path) -> Result<TreeMeta, ArchiveError> {
    unpack_deb_listed(deb, out).map(|(meta, _)| meta)
}

/// What a data entry of a package is, as its tar says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    Dir,
    File,
    Symlink,
    /// A hardlink to a file listed before it.
    Hardlink,
}

/// [`unpack_deb`], and the data member's entries in the order its tar holds them, as dpkg
/// names them in a package's file list: `/.` for the tar's own root entry, `/PATH` for others
/// (hardlinks included; directories dpkg would only imply are not entries).
pub fn unpack_deb_listed(
    deb: &Path,
    out: &Path,
) -> Result<(TreeMeta, Vec<(String, Listed)>), ArchiveError> {
    let archive = archive_name(deb);
    let member_err = |member: &str, problem: String| ArchiveError::Member {
        archive: archive.clone(),
        member: member.to_owned(),
        problem,
    };

    let file = File::open(deb).map_err(|e| ArchiveError::io(deb, e))?;
    let mut ar = ar::Archive::new(BufReader::with_capacity(1 << 16, file));

    fs::create_dir_all(out).map_err(|e| ArchiveError::io(out, e))?;
    let mut meta = TreeMeta::default();
    meta.entries.insert(String::new(), default_dir_meta(0));
    let mut listed = Vec::new();

    // 0: expecting debian-binary, 1: expecting control.tar*, 2: expecting data.tar*, 3: done.
    let mut state = 0;
    while let Some(member) = ar.next_entry() {
        let mut member =
            member.map_err(|e| member_err("", format!("not a valid ar archive: {e}")))?;
        let ident = String::from_utf8_lossy(member.header().identifier()).into_owned();
        match state {
            0 => {
                if ident != "debian-binary" {
                    return Err(member_err(
                        &ident,
                        "the first member must be debian-binary: not a Debian package".into(),
                    ));
                }
                let mut version = Vec::new();
                member
                    .by_ref()
                    .take(64)
                    .read_to_end(&mut version)
                    .map_err(|e| member_err(&ident, format!("unreadable: {e}")))?;
                if !version.starts_with(b"2.") {
                    return Err(member_err(
                        &ident,
                        format!(
                            "unsupported package format version {:?}",
                            String::from_utf8_lossy(&version).trim_end()
                        ),
                    ));
                }
                state = 1;
            }
            _ if ident.starts_with('_') => {} // reserved for local use: ignored, as dpkg does
            1 | 2 => {
                let (kind, base) = if state == 1 {
                    ("control", "control.tar")
                } else {
                    ("data", "data.tar")
                };
                let Some(suffix) = ident.strip_prefix(base) else {
                    return Err(member_err(
                        &ident,
                        format!("unexpected member where {base}[.gz|.xz|.zst] should be"),
                    ));
                };
                let reader =
                    decoder(&mut member, suffix).map_err(|source| ArchiveError::Decoder {
                        archive: archive.clone(),
                        member: ident.clone(),
                        source,
                    })?;
                let root = out.join(kind);
                fs::create_dir(&root).map_err(|e| ArchiveError::io(&root, e))?;
                meta.entries.insert(kind.to_owned(), default_dir_meta(0));
                let mut x = Extractor {
                    archive: &archive,
                    member: &ident,
                    root,
                    prefix: kind,
                    kinds: HashMap::from([(String::new(), Kind::Dir)]),
                    meta: &mut meta,
                    buf: vec![0; 1 << 17],
                    order: Vec::new(),
                };
                x.extract(reader)?;
                if state == 2 {
                    listed = std::mem::take(&mut x.order);
                }
                // Members after data.tar are reserved for future formats: ignored.
                state += 1;
            }
            _ => break,
        }
    }
    match state {
        0 => Err(member_err("", "empty archive: not a Debian package".into())),
        1 => Err(member_err("", "no control.tar member".into())),
        2 => Err(member_err("", "no data.tar member".into())),
        _ => Ok((meta, listed)),
    }
}

/// Write the `.deb` at `deb` to `out` with its data member decompressed (`data.tar`), every
/// other member as it is. dpkg reads the same tar from it, without its single-threaded
/// decompressor; nothing dpkg records depends on how the member was compressed. `deb` must be
/// trusted already (checked against a signed index): this only copies bytes.
pub fn decompress_data(deb: &Path, out: &Path) -> Result<(), ArchiveError> {
    let archive = archive_name(deb);
    let member_err = |member: &str, problem: String| ArchiveError::Member {
        archive: archive.clone(),
        member: member.to_owned(),
        problem,
    };
    let write_err = |e: io::Error| ArchiveError::io(out, e);
    let file = File::open(deb).map_err(|e| ArchiveError::io(deb, e))?;
    let mut ar = ar::Archive::new(BufReader::with_capacity(1 << 16, file));
    let mut w = io::BufWriter::with_capacity(1 << 20, File::create(out).map_err(write_err)?);
    w.write_all(b"!<arch>\n").map_err(write_err)?;
    let mut offset: u64 = 8;
    let mut seen_data = false;
    while let Some(member) = ar.next_entry() {
        let mut member =
            member.map_err(|e| member_err("", format!("not a valid ar archive: {e}")))?;
        let header = member.header().clone();
        let ident = String::from_utf8_lossy(header.identifier()).into_owned();
        let suffix = ident.strip_prefix("data.tar").filter(|_| !seen_data);
        let size = match suffix {
            Some(suffix) => {
                seen_data = true;
                let mut reader =
                    decoder(&mut member, suffix).map_err(|source| ArchiveError::Decoder {
                        archive: archive.clone(),
                        member: ident.clone(),
                        source,
                    })?;
                // The size goes into the header once it is known.
                let start = offset;
                ar_header(b"data.tar", &header, 0)
                    .and_then(|h| w.write_all(&h))
                    .map_err(write_err)?;
                let n = io::copy(&mut reader, &mut w)
                    .map_err(|e| member_err(&ident, format!("cannot decompress: {e}")))?;
                let mut f = w.into_inner().map_err(|e| write_err(e.into_error()))?;
                f.seek(io::SeekFrom::Start(start))
                    .and_then(|_| f.write_all(&ar_header(b"data.tar", &header, n)?))
                    .and_then(|_| f.seek(io::SeekFrom::End(0)))
                    .map_err(write_err)?;
                w = io::BufWriter::with_capacity(1 << 20, f);
                n
            }
            None => {
                ar_header(header.identifier(), &header, header.size())
                    .and_then(|h| w.write_all(&h))
                    .map_err(write_err)?;
                let n = io::copy(&mut member, &mut w)
                    .map_err(|e| member_err(&ident, format!("unreadable: {e}")))?;
                if n != header.size() {
                    return Err(member_err(
                        &ident,
                        format!("truncated: {n} of {} bytes", header.size()),
                    ));
                }
                n
            }
        };
        if size % 2 == 1 {
            w.write_all(b"\n").map_err(write_err)?;
        }
        offset += 60 + size + size % 2;
    }
    if !seen_data {
        return Err(member_err("", "no data.tar member".into()));
    }
    w.into_inner()
        .map(drop)
        .map_err(|e| write_err(e.into_error()))
}

/// A common-format `ar` member header (60 bytes): `name` (printable ASCII without spaces, at most
/// 16 bytes), the rest from `like`; every field must fit its width.
fn ar_header(name: &[u8], like: &ar::Header, size: u64) -> Result<Vec<u8>, io::Error> {
    let refuse = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
    if name.is_empty() || name.len() > 16 || !name.iter().all(|b| b.is_ascii_graphic()) {
        return refuse(format!(
            "ar member name {:?} is not one ar's common format can hold",
            String::from_utf8_lossy(name)
        ));
    }
    let mut h = Vec::with_capacity(60);
    h.extend_from_slice(name);
    h.resize(16, b' ');
    for (value, width) in [
        (like.mtime().to_string(), 12),
        (like.uid().to_string(), 6),
        (like.gid().to_string(), 6),
        (format!("{:o}", like.mode()), 8),
        (size.to_string(), 10),
    ] {
        if value.len() > width {
            return refuse(format!(
                "ar header field {value} is wider than its {width} bytes"
            ));
        }
        let end = h.len() + width;
        h.extend_from_slice(value.as_bytes());
        h.resize(end, b' ');
    }
    h.extend_from_slice(b"`\n");
    Ok(h)
}

/// How errors name the archive at `deb`: its file name.
fn archive_name(deb: &Path) -> String {
    deb.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| deb.display().to_string())
}

/// The `control` file of a package unpacked by [`unpack_deb`].
pub fn read_control(deb_tree: &Path) -> Result<String, ArchiveError> {
    let path = deb_tree.join("control").join("control");
    fs::read_to_string(&path).map_err(|e| ArchiveError::io(&path, e))
}

fn default_dir_meta(mtime: i64) -> EntryMeta {
    EntryMeta::root(0o755, mtime)
}

/// Why a member cannot be decompressed.
#[derive(Debug, thiserror::Error)]
pub enum DecoderError {
    #[error("cannot set up an lzma decoder: {0}")]
    Lzma(#[source] liblzma::stream::Error),
    #[error("cannot set up a zstd decoder: {0}")]
    Zstd(#[source] io::Error),
    /// The suffix after `.tar`.
    #[error("unsupported compression {0:?}")]
    Unsupported(String),
}

/// A streaming decompressor for a member, chosen by the suffix after `.tar`.
fn decoder<'a, R: Read + 'a>(r: R, suffix: &str) -> Result<Box<dyn Read + 'a>, DecoderError> {
    Ok(match suffix {
        "" => Box::new(r),
        ".gz" => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(r))),
        ".xz" => Box::new(liblzma::read::XzDecoder::new_multi_decoder(r)),
        ".lzma" => {
            let stream =
                liblzma::stream::Stream::new_lzma_decoder(u64::MAX).map_err(DecoderError::Lzma)?;
            Box::new(liblzma::read::XzDecoder::new_stream(r, stream))
        }
        ".zst" => Box::new(zstd::stream::read::Decoder::new(r).map_err(DecoderError::Zstd)?),
        other => return Err(DecoderError::Unsupported(other.to_owned())),
    })
}

/// What an extracted path is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
}

/// Extracts one tar member under `root`, recording metadata under `prefix/`.
struct Extractor<'a> {
    archive: &'a str,
    member: &'a str,
    root: PathBuf,
    prefix: &'static str,
    /// Every path extracted so far (member-relative), and what it is. The root is `""`.
    kinds: HashMap<String, Kind>,
    meta: &'a mut TreeMeta,
    buf: Vec<u8>,
    /// The entries extracted, in the tar's order, as dpkg lists them (`/.`, `/PATH`).
    order: Vec<(String, Listed)>,
}

impl Extractor<'_> {
    fn member_err(&self, problem: String) -> ArchiveError {
        ArchiveError::Member {
            archive: self.archive.to_owned(),
            member: self.member.to_owned(),
            problem,
        }
    }

    fn entry_err(&self, entry: &str, problem: impl Into<String>) -> ArchiveError {
        ArchiveError::Entry {
            archive: self.archive.to_owned(),
            member: self.member.to_owned(),
            entry: entry.to_owned(),
            problem: problem.into(),
        }
    }

    fn key(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.prefix.to_owned()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    fn extract(&mut self, reader: Box<dyn Read + '_>) -> Result<(), ArchiveError> {
        let mut tar = tar::Archive::new(reader);
        let entries = tar
            .entries()
            .map_err(|e| self.member_err(format!("not a valid tar stream: {e}")))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| self.member_err(format!("not a valid tar stream: {e}")))?;
            self.entry(&mut entry)?;
        }
        // Read to the end so that the decompressor verifies its checksums.
        io::copy(&mut tar.into_inner(), &mut io::sink())
            .map_err(|e| self.member_err(format!("corrupt after the end of the tar: {e}")))?;
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<(), ArchiveError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let etype = entry.header().entry_type();
        if etype.is_pax_global_extensions() {
            return Ok(());
        }
        let rel = normalize(&raw).map_err(|source| ArchiveError::EntryPath {
            archive: self.archive.to_owned(),
            member: self.member.to_owned(),
            entry: shown.clone(),
            source,
        })?;

        let header = entry.header();
        let bad =
            |what: &str, e: io::Error| self.entry_err(&shown, format!("has a bad {what}: {e}"));
        let mode = header.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let uid = header.uid().map_err(|e| bad("uid", e))?;
        let gid = header.gid().map_err(|e| bad("gid", e))?;
        let mut mtime = header
            .mtime()
            .map_err(|e| bad("mtime", e))?
            .min(i64::MAX as u64) as i64;
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(self.entry_err(&shown, format!("has an out-of-range owner {uid}:{gid}")));
        };
        let link = entry.link_name_bytes().map(|l| l.into_owned());

        let mut caps = None;
        let exts = entry
            .pax_extensions()
            .map_err(|e| self.entry_err(&shown, format!("has unreadable PAX records: {e}")))?;
        if let Some(exts) = exts {
            for ext in exts {
                let ext =
                    ext.map_err(|e| self.entry_err(&shown, format!("has a bad PAX record: {e}")))?;
                match ext.key_bytes() {
                    CAPS_PAX_KEY => caps = Some(hex::encode(ext.value_bytes())),
                    b"mtime" => {
                        let v = String::from_utf8_lossy(ext.value_bytes());
                        let secs = v.split('.').next().unwrap_or("");
                        mtime = secs.parse().map_err(|_| {
                            self.entry_err(&shown, format!("has a bad PAX mtime {v:?}"))
                        })?;
                    }
                    _ => {}
                }
            }
        }
        let listed = match etype {
            EntryType::Directory => Some(Listed::Dir),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Some(Listed::File),
            EntryType::Symlink => Some(Listed::Symlink),
            EntryType::Link => Some(Listed::Hardlink),
            _ => None, // refused below
        };
        if let Some(kind) = listed {
            let name = if rel.is_empty() {
                "/.".to_owned()
            } else {
                format!("/{rel}")
            };
            self.order.push((name, kind));
        }
        let em = EntryMeta {
            uid,
            gid,
            mode,
            mtime,
            caps,
            acls: Default::default(),
        };

        match etype {
            EntryType::Directory => self.dir(&shown, &rel, em),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.file(&shown, &rel, em, entry)
            }
            EntryType::Symlink => self.symlink(&shown, &rel, em, link),
            EntryType::Link => self.hardlink(&shown, &rel, link),
            EntryType::Char => Err(self.entry_err(&shown, "is a character device: refused")),
            EntryType::Block => Err(self.entry_err(&shown, "is a block device: refused")),
            EntryType::Fifo => Err(self.entry_err(&shown, "is a fifo: refused")),
            other => Err(self.entry_err(
                &shown,
                format!(
                    "has the unsupported tar entry type {:?}: refused",
                    other.as_byte() as char
                ),
            )),
        }
    }

    /// Make sure every proper prefix of `rel` is a directory extracted (or implied) here, creating
    /// missing ones; refuse to go through symlinks or files.
    fn parents(&mut self, shown: &str, rel: &str, mtime: i64) -> Result<(), ArchiveError> {
        for (i, _) in rel.match_indices('/') {
            let prefix = &rel[..i];
            match self.kinds.get(prefix) {
                Some(Kind::Dir) => {}
                Some(Kind::Symlink) => {
                    return Err(self.entry_err(
                        shown,
                        format!("goes through the symlink {prefix:?} extracted earlier: refused"),
                    ))
                }
                Some(Kind::File) => {
                    return Err(self.entry_err(
                        shown,
                        format!("goes through the non-directory {prefix:?}: refused"),
                    ))
                }
                None => {
                    let path = self.root.join(prefix);
                    fs::create_dir(&path)
                        .and_then(|()| fs::set_permissions(&path, Permissions::from_mode(0o755)))
                        .map_err(|e| self.write_err(shown, &path, e))?;
                    self.kinds.insert(prefix.to_owned(), Kind::Dir);
                    let key = self.key(prefix);
                    self.meta.entries.insert(key, default_dir_meta(mtime));
                }
            }
        }
        Ok(())
    }

    /// Remove whatever non-directory was extracted at `rel` before (a later entry wins). Returns
    /// whether a directory is already there; replacing a directory by a non-directory is refused.
    fn clear(&mut self, shown: &str, rel: &str, new_is_dir: bool) -> Result<bool, ArchiveError> {
        match self.kinds.get(rel) {
            None => Ok(false),
            Some(Kind::Dir) if new_is_dir => Ok(true),
            Some(Kind::Dir) => Err(self.entry_err(
                shown,
                "would replace a directory extracted earlier by a non-directory: refused",
            )),
            Some(Kind::File | Kind::Symlink) => {
                let path = self.root.join(rel);
                // remove_file never follows a symlink: it unlinks the link itself.
                fs::remove_file(&path).map_err(|e| self.write_err(shown, &path, e))?;
                self.kinds.remove(rel);
                let key = self.key(rel);
                self.meta.entries.remove(&key);
                Ok(false)
            }
        }
    }

    fn write_err(&self, shown: &str, path: &Path, e: io::Error) -> ArchiveError {
        self.entry_err(
            shown,
            format!("could not be written to {}: {e}", path.display()),
        )
    }

    fn record(&mut self, rel: &str, kind: Kind, em: EntryMeta) {
        self.kinds.insert(rel.to_owned(), kind);
        let key = self.key(rel);
        self.meta.entries.insert(key, em);
    }

    fn dir(&mut self, shown: &str, rel: &str, em: EntryMeta) -> Result<(), ArchiveError> {
        self.parents(shown, rel, em.mtime)?;
        let exists = self.clear(shown, rel, true)?;
        let path = self.root.join(rel);
        let perm = Permissions::from_mode((em.mode & 0o777) | 0o700);
        let res = if exists {
            fs::set_permissions(&path, perm)
        } else {
            fs::create_dir(&path).and_then(|()| fs::set_permissions(&path, perm))
        };
        res.map_err(|e| self.write_err(shown, &path, e))?;
        self.record(rel, Kind::Dir, em);
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        shown: &str,
        rel: &str,
        em: EntryMeta,
        data: &mut R,
    ) -> Result<(), ArchiveError> {
        self.parents(shown, rel, em.mtime)?;
        self.clear(shown, rel, false)?;
        let path = self.root.join(rel);
        let disk_mode = (em.mode & 0o777) | 0o600;
        // O_EXCL (create_new) plus O_NOFOLLOW: never write through anything already there.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(disk_mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| self.write_err(shown, &path, e))?;
        loop {
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(self.entry_err(shown, format!("has unreadable contents: {e}")))
                }
            };
            f.write_all(&self.buf[..n])
                .map_err(|e| self.write_err(shown, &path, e))?;
        }
        f.set_permissions(Permissions::from_mode(disk_mode))
            .map_err(|e| self.write_err(shown, &path, e))?;
        if let Some(t) = system_time(em.mtime) {
            f.set_modified(t)
                .map_err(|e| self.write_err(shown, &path, e))?;
        }
        self.record(rel, Kind::File, em);
        Ok(())
    }

    fn symlink(
        &mut self,
        shown: &str,
        rel: &str,
        em: EntryMeta,
        target: Option<Vec<u8>>,
    ) -> Result<(), ArchiveError> {
        let target = match target {
            Some(t) if !t.is_empty() => t,
            _ => return Err(self.entry_err(shown, "is a symlink without a target: refused")),
        };
        self.parents(shown, rel, em.mtime)?;
        self.clear(shown, rel, false)?;
        let path = self.root.join(rel);
        std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
            .map_err(|e| self.write_err(shown, &path, e))?;
        self.record(rel, Kind::Symlink, em);
        Ok(())
    }

    fn hardlink(
        &mut self,
        shown: &str,
        rel: &str,
        target: Option<Vec<u8>>,
    ) -> Result<(), ArchiveError> {
        let raw = target.unwrap_or_default();
        let target = normalize(&raw).map_err(|source| ArchiveError::LinkTarget {
            archive: self.archive.to_owned(),
            member: self.member.to_owned(),
            entry: shown.to_owned(),
            target: String::from_utf8_lossy(&raw).into_owned(),
            source,
        })?;
        if target == rel || self.kinds.get(&target) != Some(&Kind::File) {
            return Err(self.entry_err(
                shown,
                format!(
                    "is a hardlink to {target:?}, which is not a file extracted before: refused"
                ),
            ));
        }
        // One inode has one owner and mode: the link gets its target's metadata.
        let em = self
            .meta
            .entries
            .get(&self.key(&target))
            .cloned()
            .ok_or_else(|| {
                self.entry_err(shown, format!("links to {target:?}, which has no metadata"))
            })?;
        self.parents(shown, rel, em.mtime)?;
        self.clear(shown, rel, false)?;
        let path = self.root.join(rel);
        // linkat(2) without AT_SYMLINK_FOLLOW: the target itself is linked, never followed.
        fs::hard_link(self.root.join(&target), &path)
            .map_err(|e| self.write_err(shown, &path, e))?;
        self.record(rel, Kind::File, em);
        Ok(())
    }
}

/// Why a tar path is refused; the message completes "entry "…" …".
#[derive(Debug, thiserror::Error)]
pub enum UnsafePath {
    #[error("is an absolute path: refused")]
    Absolute,
    #[error("contains a NUL byte: refused")]
    Nul,
    #[error("is not valid UTF-8: refused")]
    NotUtf8,
    #[error("escapes the root: refused")]
    Escapes,
}

/// A tar path as a clean relative path: `./usr//bin/` → `usr/bin`, `./` → `""`. Refuses absolute
/// paths, `..`, NUL bytes and non-UTF-8 names (metadata keys are strings).
fn normalize(raw: &[u8]) -> Result<String, UnsafePath> {
    if raw.first() == Some(&b'/') {
        return Err(UnsafePath::Absolute);
    }
    if raw.contains(&0) {
        return Err(UnsafePath::Nul);
    }
    let s = std::str::from_utf8(raw).map_err(|_| UnsafePath::NotUtf8)?;
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(UnsafePath::Escapes),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

fn system_time(mtime: i64) -> Option<SystemTime> {
    if mtime >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(mtime as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(mtime.unsigned_abs()))
    }
}
