//! Deterministic tar output of store trees, and reproducible gzip.
//!
//! [`write_tar`] streams a tree as a POSIX (ustar + PAX) archive whose bytes depend only on the
//! tree's contents, its [`TreeMeta`] and SOURCE_DATE_EPOCH: entries are sorted bytewise, owners are
//! numeric from the metadata, mtimes are clamped, and nothing about the host (user names, atime,
//! ctime, inode numbers, the tree's location) leaks in. [`gzip_reproducible`] and
//! [`gzip_parallel`] compress with a fixed gzip header; the parallel variant compresses fixed-size
//! blocks independently so that its output depends on the input, block size and level only.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

use flate2::{Compress, Compression, Crc, FlushCompress, GzBuilder};
use rbuild_store::meta::{EntryMeta, TreeMeta};
use tar::{EntryType, Header};

use super::ArchiveError;

/// The PAX record carrying a file's `security.capability` xattr.
const CAPS_PAX_KEY: &str = "SCHILY.xattr.security.capability";
/// POSIX ACLs as GNU tar `--xattrs` and container tools write them: the raw xattr values.
const ACL_PAX_KEYS: [(&str, &str); 2] = [
    (
        "system.posix_acl_access",
        "SCHILY.xattr.system.posix_acl_access",
    ),
    (
        "system.posix_acl_default",
        "SCHILY.xattr.system.posix_acl_default",
    ),
];
/// The largest value an 8-byte octal ustar field holds.
const MAX_OCTAL_8: u64 = 0o7777777;
/// The largest value the 12-byte octal ustar size field holds.
const MAX_OCTAL_12: u64 = 0o77777777777;

/// Write `tree` as a deterministic tar to `w` and return `w` (not flushed).
///
/// Ownership, mode (with special bits), mtime and capabilities come from `meta`; paths without
/// metadata get uid/gid 0, their on-disk mode and `source_date_epoch` as mtime. Every mtime is
/// clamped to `source_date_epoch`. Files that are the same inode are written once, then as
/// hardlinks to the first path in archive order.
pub fn write_tar<W: Write>(
    tree: &Path,
    meta: &TreeMeta,
    source_date_epoch: i64,
    w: W,
) -> Result<W, ArchiveError> {
    let md = fs::symlink_metadata(tree).map_err(|e| ArchiveError::io(tree, e))?;
    if !md.is_dir() {
        return Err(ArchiveError::tree(tree, "is not a directory"));
    }
    let mut t = TarWriter {
        builder: tar::Builder::new(w),
        meta,
        sde: source_date_epoch,
        inodes: HashMap::new(),
    };
    let mut rel = Vec::new();
    t.walk(tree, &mut rel)?;
    t.builder
        .into_inner()
        .map_err(|e| ArchiveError::tree(tree, format!("writing the end of the tar: {e}")))
}

struct TarWriter<'a, W: Write> {
    builder: tar::Builder<W>,
    meta: &'a TreeMeta,
    sde: i64,
    /// (dev, ino) of multiply-linked files already written → their archive path and metadata.
    inodes: HashMap<(u64, u64), (Vec<u8>, Option<EntryMeta>)>,
}

impl<W: Write> TarWriter<'_, W> {
    /// Write the contents of directory `dir` (archive path `rel`, empty for the root), sorted so
    /// that the archive as a whole is sorted bytewise by entry name (directories carry their
    /// trailing `/`, so `a-b` < `a/` < `a/x` < `a0`).
    fn walk(&mut self, dir: &Path, rel: &mut Vec<u8>) -> Result<(), ArchiveError> {
        let mut children = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| ArchiveError::io(dir, e))? {
            let entry = entry.map_err(|e| ArchiveError::io(dir, e))?;
            let is_dir = entry
                .file_type()
                .map_err(|e| ArchiveError::io(&entry.path(), e))?
                .is_dir();
            let mut key = entry.file_name().as_bytes().to_vec();
            if is_dir {
                key.push(b'/');
            }
            children.push((key, entry.file_name()));
        }
        children.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (_, name) in children {
            let path = dir.join(&name);
            let len = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            let md = fs::symlink_metadata(&path).map_err(|e| ArchiveError::io(&path, e))?;
            self.entry(&path, rel, &md)?;
            if md.is_dir() {
                self.walk(&path, rel)?;
            }
            rel.truncate(len);
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path, rel: &[u8], md: &fs::Metadata) -> Result<(), ArchiveError> {
        let m = std::str::from_utf8(rel).ok().and_then(|k| self.meta.get(k));
        let (uid, gid, mode, mtime) = match m {
            Some(e) => (e.uid, e.gid, e.mode & 0o7777, e.mtime.min(self.sde)),
            None => (0, 0, md.mode() & 0o7777, self.sde),
        };
        let caps = match m.and_then(|e| e.caps.as_deref()) {
            Some(h) => Some(hex::decode(h).map_err(|e| {
                ArchiveError::tree(path, format!("metadata has bad capabilities {h:?}: {e}"))
            })?),
            None => None,
        };
        let mut acls = Vec::new();
        for (name, h) in m.map(|e| &e.acls).into_iter().flatten() {
            let key = ACL_PAX_KEYS
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, k)| *k)
                .ok_or_else(|| {
                    ArchiveError::tree(path, format!("metadata has an unknown ACL {name:?}"))
                })?;
            let value = hex::decode(h).map_err(|e| {
                ArchiveError::tree(path, format!("metadata has a bad {name} {h:?}: {e}"))
            })?;
            acls.push((key, value));
        }

        let ft = md.file_type();
        let mut name = rel.to_vec();
        let mut size = 0;
        let mut link = None;
        let mut dev = None;
        let etype = if ft.is_dir() {
            name.push(b'/');
            EntryType::Directory
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(|e| ArchiveError::io(path, e))?;
            link = Some(target.as_os_str().as_bytes().to_vec());
            EntryType::Symlink
        } else if ft.is_file() {
            // A tar hardlink carries no metadata of its own, so only paths whose metadata agrees
            // are written as links; others get their own copy.
            let first = if md.nlink() > 1 {
                match self.inodes.get(&(md.dev(), md.ino())) {
                    Some((first, fm)) if fm.as_ref() == m => Some(first.clone()),
                    Some(_) => None,
                    None => {
                        self.inodes
                            .insert((md.dev(), md.ino()), (rel.to_vec(), m.cloned()));
                        None
                    }
                }
            } else {
                None
            };
            match first {
                Some(first) => {
                    link = Some(first);
                    EntryType::Link
                }
                None => {
                    size = md.len();
                    EntryType::Regular
                }
            }
        } else {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_fifo() {
                EntryType::Fifo
            } else if ft.is_char_device() || ft.is_block_device() {
                dev = Some(split_dev(md.rdev()));
                if ft.is_char_device() {
                    EntryType::Char
                } else {
                    EntryType::Block
                }
            } else {
                return Err(ArchiveError::tree(path, "is a socket: cannot be archived"));
            }
        };

        let mut h = Header::new_ustar();
        let mut pax: Vec<(&str, Vec<u8>)> = Vec::new();
        if !set_ustar_name(&mut h, &name) {
            pax.push(("path", name.clone()));
        }
        if let Some(link) = &link {
            if link.len() > 100 {
                pax.push(("linkpath", link.clone()));
            }
            let short = &link[..link.len().min(100)];
            h.set_link_name_literal(short)
                .map_err(|e| ArchiveError::tree(path, format!("bad link target: {e}")))?;
        }
        if size > MAX_OCTAL_12 {
            pax.push(("size", size.to_string().into_bytes()));
        }
        if u64::from(uid) > MAX_OCTAL_8 {
            pax.push(("uid", uid.to_string().into_bytes()));
        }
        if u64::from(gid) > MAX_OCTAL_8 {
            pax.push(("gid", gid.to_string().into_bytes()));
        }
        if let Some(caps) = caps {
            pax.push((CAPS_PAX_KEY, caps));
        }
        pax.extend(acls);
        let mtime = mtime.max(0) as u64;
        h.set_entry_type(etype);
        h.set_mode(mode);
        h.set_uid(u64::from(uid).min(MAX_OCTAL_8));
        h.set_gid(u64::from(gid).min(MAX_OCTAL_8));
        h.set_mtime(mtime);
        h.set_size(size);
        let (major, minor) = dev.unwrap_or((0, 0));
        h.set_device_major(major)
            .and_then(|()| h.set_device_minor(minor))
            .map_err(|e| ArchiveError::tree(path, format!("bad device number: {e}")))?;
        h.set_cksum();

        let werr = |e: io::Error| ArchiveError::tree(path, format!("writing the tar: {e}"));
        if !pax.is_empty() {
            let (ph, data) = pax_header(&pax, mtime);
            self.builder.append(&ph, data.as_slice()).map_err(werr)?;
        }
        if etype == EntryType::Regular {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| ArchiveError::io(path, e))?;
            let mut r = ExactReader {
                inner: f,
                remaining: size,
                failed: false,
            };
            self.builder.append(&h, &mut r).map_err(|e| {
                if r.failed {
                    ArchiveError::io(path, e)
                } else {
                    werr(e)
                }
            })?;
        } else {
            self.builder.append(&h, io::empty()).map_err(werr)?;
        }
        Ok(())
    }
}

/// Reads exactly `remaining` bytes of a file: an error if it shrank, the excess ignored if it grew.
struct ExactReader {
    inner: File,
    remaining: u64,
    failed: bool,
}

impl Read for ExactReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = match self.inner.read(&mut buf[..max]) {
            Ok(n) => n,
            Err(e) => {
                self.failed = true;
                return Err(e);
            }
        };
        if n == 0 {
            self.failed = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while being archived",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Put `name` into the ustar name (and prefix) fields. Returns false if it does not fit, in which
/// case the header holds a truncated name and a PAX `path` record must carry the real one.
fn set_ustar_name(h: &mut Header, name: &[u8]) -> bool {
    let Some(u) = h.as_ustar_mut() else {
        return false;
    };
    if name.len() <= u.name.len() {
        u.name[..name.len()].copy_from_slice(name);
        return true;
    }
    // Split at a '/' so that the prefix fits 155 bytes and the (non-empty) rest 100.
    for (i, _) in name.iter().enumerate().filter(|(_, &b)| b == b'/') {
        let rest = &name[i + 1..];
        if i > u.prefix.len() {
            break;
        }
        if !rest.is_empty() && rest.len() <= u.name.len() && i > 0 {
            u.prefix[..i].copy_from_slice(&name[..i]);
            u.name[..rest.len()].copy_from_slice(rest);
            return true;
        }
    }
    let n = u.name.len();
    u.name.copy_from_slice(&name[..n]);
    false
}

/// A PAX extended header (`x`) and its data for `records`.
fn pax_header(records: &[(&str, Vec<u8>)], mtime: u64) -> (Header, Vec<u8>) {
    let mut data = Vec::new();
    for (key, value) in records {
        // "LEN KEY=VALUE\n", LEN counting itself.
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while len.to_string().len() + rest != len {
            len = rest + len.to_string().len();
        }
        data.extend_from_slice(len.to_string().as_bytes());
        data.push(b' ');
        data.extend_from_slice(key.as_bytes());
        data.push(b'=');
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    let mut h = Header::new_ustar();
    set_ustar_name(&mut h, b"././@PaxHeader");
    h.set_entry_type(EntryType::XHeader);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_size(data.len() as u64);
    // Infallible on a ustar header.
    let _ = h.set_device_major(0);
    let _ = h.set_device_minor(0);
    h.set_cksum();
    (h, data)
}

/// Linux's encoding of a device number into (major, minor).
fn split_dev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Gzip's OS byte: "unknown", as flate2 writes by default — the output does not depend on the
/// host.
const GZIP_OS: u8 = 255;

/// The block size of [`gzip_parallel`]: part of the output's definition, never change it.
pub const GZIP_BLOCK: usize = 1 << 20;

fn check_level(level: u32) -> Result<Compression, ArchiveError> {
    if level > 9 {
        return Err(ArchiveError::Codec {
            what: "gzip".into(),
            problem: format!("compression level {level} is not in 0..=9"),
        });
    }
    Ok(Compression::new(level))
}

/// The zstd level of layers: zstd's default, already smaller than gzip -6 and several times
/// faster.
pub const ZSTD_LEVEL: i32 = 3;

/// How a layer builder's argument names zstd: `zstd@VERSION` of the library this binary links,
/// so that a derivation's hash changes with the library that makes its bytes.
pub fn zstd_layer_arg() -> String {
    format!("zstd@{}", zstd::zstd_safe::version_string())
}

/// Compress `r` into `w` as one zstd frame at [`ZSTD_LEVEL`], single-threaded and with a content
/// checksum: the output depends only on the input and on the zstd library's version, which
/// [`zstd_layer_arg`] puts into the derivation.
pub fn zstd_reproducible<R: Read, W: Write>(mut r: R, w: W) -> Result<(), ArchiveError> {
    let err = |e: io::Error| ArchiveError::Codec {
        what: "zstd".into(),
        problem: e.to_string(),
    };
    let mut enc = zstd::stream::Encoder::new(w, ZSTD_LEVEL).map_err(err)?;
    enc.include_checksum(true).map_err(err)?;
    io::copy(&mut r, &mut enc).map_err(err)?;
    enc.finish().map_err(err)?.flush().map_err(err)?;
    Ok(())
}

fn gzip_err(problem: impl Into<String>) -> ArchiveError {
    ArchiveError::Codec {
        what: "gzip".into(),
        problem: problem.into(),
    }
}

/// Gzip `r` into `w` with a fixed header (mtime 0, no file name, OS byte 255): identical input
/// gives identical output. Returns `w` (not flushed).
pub fn gzip_reproducible<R: Read, W: Write>(mut r: R, w: W, level: u32) -> Result<W, ArchiveError> {
    let lvl = check_level(level)?;
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(GZIP_OS)
        .write(w, lvl);
    let mut buf = vec![0; 1 << 17];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(gzip_err(format!("reading the input: {e}"))),
        };
        enc.write_all(&buf[..n])
            .map_err(|e| gzip_err(format!("writing the output: {e}")))?;
    }
    enc.finish()
        .map_err(|e| gzip_err(format!("writing the output: {e}")))
}

/// Gzip `r` into `w` on `threads` threads, pigz-style with independent blocks: the input is cut
/// into [`GZIP_BLOCK`]-byte blocks, each compressed as its own raw-deflate run ended by a sync
/// flush, the runs concatenated and terminated by an empty final block, in one gzip member with
/// the same fixed header as [`gzip_reproducible`]. The output depends only on the input and the
/// level, never on `threads` or timing. Returns `w` (not flushed).
pub fn gzip_parallel<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    level: u32,
    threads: usize,
) -> Result<W, ArchiveError> {
    let lvl = check_level(level)?;
    let werr = |e: io::Error| gzip_err(format!("writing the output: {e}"));
    w.write_all(&gzip_header(lvl)).map_err(werr)?;
    let mut crc = Crc::new();
    let mut total: u64 = 0;

    if threads <= 1 {
        loop {
            let block = read_block(&mut r)?;
            if block.is_empty() {
                break;
            }
            let (bytes, bcrc) = deflate_block(&block, lvl)?;
            w.write_all(&bytes).map_err(werr)?;
            crc.combine(&bcrc);
            total += block.len() as u64;
            if block.len() < GZIP_BLOCK {
                break;
            }
        }
    } else {
        type Done = (u64, Result<(Vec<u8>, Crc), ArchiveError>);
        std::thread::scope(|s| -> Result<(), ArchiveError> {
            let (job_tx, job_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(threads);
            let job_rx = Arc::new(Mutex::new(job_rx));
            let (done_tx, done_rx) = mpsc::channel::<Done>();
            for _ in 0..threads {
                let job_rx = Arc::clone(&job_rx);
                let done_tx = done_tx.clone();
                s.spawn(move || loop {
                    let job = job_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((i, block)) = job else { break };
                    if done_tx.send((i, deflate_block(&block, lvl))).is_err() {
                        break;
                    }
                });
            }
            drop(done_tx);
            let window = 2 * threads as u64;
            let (mut next_read, mut next_write) = (0u64, 0u64);
            let mut eof = false;
            let mut pending = BTreeMap::new();
            loop {
                while !eof && next_read - next_write < window {
                    let block = read_block(&mut r)?;
                    if block.len() < GZIP_BLOCK {
                        eof = true;
                    }
                    if block.is_empty() {
                        break;
                    }
                    total += block.len() as u64;
                    job_tx
                        .send((next_read, block))
                        .map_err(|_| gzip_err("a compression thread died"))?;
                    next_read += 1;
                }
                if next_write == next_read {
                    break;
                }
                let (i, res) = done_rx
                    .recv()
                    .map_err(|_| gzip_err("a compression thread died"))?;
                pending.insert(i, res);
                while let Some(res) = pending.remove(&next_write) {
                    let (bytes, bcrc) = res?;
                    w.write_all(&bytes).map_err(werr)?;
                    crc.combine(&bcrc);
                    next_write += 1;
                }
            }
            Ok(())
        })?;
    }

    // An empty final fixed-Huffman block (BFINAL=1, BTYPE=01, end-of-block), then the trailer.
    w.write_all(&[0x03, 0x00]).map_err(werr)?;
    w.write_all(&crc.sum().to_le_bytes()).map_err(werr)?;
    w.write_all(&(total as u32).to_le_bytes()).map_err(werr)?;
    Ok(w)
}

/// The 10-byte gzip header both gzip writers use (the XFL byte follows flate2's rule).
fn gzip_header(lvl: Compression) -> [u8; 10] {
    let xfl = if lvl.level() >= Compression::best().level() {
        2
    } else if lvl.level() <= Compression::fast().level() {
        4
    } else {
        0
    };
    [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, GZIP_OS]
}

/// Read up to [`GZIP_BLOCK`] bytes; a short block means end of input.
fn read_block<R: Read>(r: &mut R) -> Result<Vec<u8>, ArchiveError> {
    let mut block = Vec::with_capacity(GZIP_BLOCK);
    r.take(GZIP_BLOCK as u64)
        .read_to_end(&mut block)
        .map_err(|e| gzip_err(format!("reading the input: {e}")))?;
    Ok(block)
}

/// Raw-deflate one block on its own (no shared dictionary), ended by a sync flush so the runs
/// can be concatenated; and its CRC.
fn deflate_block(block: &[u8], lvl: Compression) -> Result<(Vec<u8>, Crc), ArchiveError> {
    let mut c = Compress::new(lvl, false);
    let mut out = Vec::with_capacity(block.len() + block.len() / 16 + 64);
    loop {
        let done = c.total_in() as usize;
        c.compress_vec(&block[done..], &mut out, FlushCompress::Sync)
            .map_err(|e| gzip_err(format!("deflate failed: {e}")))?;
        if c.total_in() as usize == block.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(1 << 16));
    }
    let mut crc = Crc::new();
    crc.update(block);
    Ok((out, crc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: a small LCG over a few symbols.
        let mut x: u32 = 12345;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                b"abcdefgh \n"[(x >> 16) as usize % 10]
            })
            .collect()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        GzDecoder::new(gz)
            .read_to_end(&mut out)
            .expect("valid gzip");
        out
    }

    #[test]
    fn gzip_reproducible_roundtrip_and_stable() {
        let data = sample(300_000);
        let a = gzip_reproducible(data.as_slice(), Vec::new(), 6).unwrap();
        let b = gzip_reproducible(data.as_slice(), Vec::new(), 6).unwrap();
        assert_eq!(a, b);
        assert_eq!(&a[4..8], &[0, 0, 0, 0], "mtime is 0");
        assert_eq!(a[3] & 0x08, 0, "no file name");
        assert_eq!(a[9], GZIP_OS);
        assert_eq!(gunzip(&a), data);
    }

    #[test]
    fn gzip_parallel_is_valid_and_independent_of_threads() {
        for len in [
            0,
            1,
            1000,
            GZIP_BLOCK,
            GZIP_BLOCK + 1,
            3 * GZIP_BLOCK + 12_345,
        ] {
            let data = sample(len);
            let one = gzip_parallel(data.as_slice(), Vec::new(), 6, 1).unwrap();
            let four = gzip_parallel(data.as_slice(), Vec::new(), 6, 4).unwrap();
            assert_eq!(one, four, "len {len}: output depends on the thread count");
            assert_eq!(gunzip(&four), data, "len {len}: round trip");
            assert_eq!(&four[..10], &gzip_header(Compression::new(6)));
        }
    }

    #[test]
    fn gzip_parallel_small_reads() {
        // A reader returning tiny chunks must not change block boundaries.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(777).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data = sample(2 * GZIP_BLOCK + 5);
        let a = gzip_parallel(data.as_slice(), Vec::new(), 1, 3).unwrap();
        let b = gzip_parallel(Trickle(&data), Vec::new(), 1, 2).unwrap();
        assert_eq!(a, b);
        assert_eq!(gunzip(&b), data);
    }

    #[test]
    fn gzip_rejects_bad_level() {
        assert!(gzip_parallel(&b""[..], Vec::new(), 10, 2).is_err());
        assert!(gzip_reproducible(&b""[..], Vec::new(), 10).is_err());
    }

    #[test]
    fn pax_record_lengths() {
        // Around the digit-count boundaries, every record's length must count itself exactly.
        for n in [
            0, 1, 2, 3, 4, 5, 6, 89, 90, 91, 92, 93, 94, 95, 96, 990, 991, 992, 993, 994,
        ] {
            let (h, data) = pax_header(&[("k", vec![b'x'; n]), ("path", vec![b'y'; n])], 0);
            assert_eq!(h.size().unwrap(), data.len() as u64);
            let mut rest = data.as_slice();
            while !rest.is_empty() {
                let sp = rest.iter().position(|&b| b == b' ').unwrap();
                let len: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().unwrap();
                assert_eq!(rest[len - 1], b'\n', "value length {n}");
                rest = &rest[len..];
            }
        }
    }

    #[test]
    fn long_names_split_or_pax() {
        let mut h = Header::new_ustar();
        let name = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        assert!(set_ustar_name(&mut h, name.as_bytes()));
        assert_eq!(&*h.path_bytes(), name.as_bytes());
        let mut h = Header::new_ustar();
        assert!(!set_ustar_name(&mut h, "x".repeat(300).as_bytes()));
    }
}
