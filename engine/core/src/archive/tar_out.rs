//! Deterministic tar output of store trees, and reproducible gzip.
//!
//! [`write_tar`] streams a tree as a POSIX (ustar + PAX) archive whose bytes depend only on the
//! tree's contents, its [`TreeMeta`] and SOURCE_DATE_EPOCH: entries are sorted bytewise, owners are
//! numeric from the metadata, mtimes are clamped, and nothing about the host (user names, atime,
//! ctime, inode numbers, the tree's location) leaks in. [`gzip_parallel`] compresses fixed-size
//! blocks independently, each a gzip member with a fixed header, so that its output depends on
//! the input, block size, level and libdeflate's version only.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

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

/// The gzip level of layers. Measured on bullseye's layer (196 MB of tar, one core), libdeflate's
/// level 4 made 78.8 MB in 1.42 s, level 5 77.6 MB in 1.66 s, level 6 77.2 MB in 1.99 s (zlib-rs's
/// level 5, before, 80.0 MB in 2.34 s). A change of level changes every layer's bytes (and so
/// needs a new `BUILDERS_EPOCH`).
pub const GZIP_LAYER_LEVEL: u32 = 4;

/// A gzip level as libdeflate takes it, or why not.
fn check_level(level: u32) -> Result<libdeflater::CompressionLvl, ArchiveError> {
    i32::try_from(level)
        .ok()
        .and_then(|l| libdeflater::CompressionLvl::new(l).ok())
        .ok_or_else(|| gzip_err(format!("compression level {level} is not in 0..=12")))
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

/// Gzip `r` into `w` on `threads` threads. The input is cut into [`GZIP_BLOCK`]-byte blocks;
/// libdeflate compresses each on its own (no dictionary shared) into a gzip member of its own,
/// with a fixed header (mtime 0, no file name, OS byte 255); the members follow each other in
/// the input's order. The output depends only on the input, the level and libdeflate's version
/// (pinned in Cargo.lock; `tests::gzip_output_is_pinned` notices a change, which needs a new
/// `BUILDERS_EPOCH`), never on `threads` or timing. Returns `w` (not flushed).
///
/// Members one after another are one gzip file (RFC 1952, 2.2), as eStargz layers are: GNU
/// gzip, Go's `gzip.Reader` (container engines and registries' tools), Python's `gzip` and
/// flate2's `MultiGzDecoder` read all of it; flate2's `GzDecoder` only the first member.
/// Members, not pigz's one member of sync-flushed runs, because libdeflate compresses whole
/// buffers and ends each with a final block. It is 40 % faster than zlib-rs: on bullseye's layer
/// (196 MB of tar, one core), its level 4 made 78.8 MB in 1.42 s where zlib-rs's level 5 made
/// 80.0 MB in 2.34 s.
pub fn gzip_parallel<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    level: u32,
    threads: usize,
) -> Result<W, ArchiveError> {
    let lvl = check_level(level)?;
    let werr = |e: io::Error| gzip_err(format!("writing the output: {e}"));
    if threads <= 1 {
        let mut c = libdeflater::Compressor::new(lvl);
        for first in std::iter::once(true).chain(std::iter::repeat(false)) {
            let block = read_block(&mut r)?;
            // An empty input is one member of nothing; a short block ends the input.
            if !block.is_empty() || first {
                w.write_all(&gzip_member(&mut c, lvl, &block)?)
                    .map_err(werr)?;
            }
            if block.len() < GZIP_BLOCK {
                break;
            }
        }
        return Ok(w);
    }
    type Done = (u64, Result<Vec<u8>, ArchiveError>);
    std::thread::scope(|s| -> Result<(), ArchiveError> {
        let (job_tx, job_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(threads);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        for _ in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            s.spawn(move || {
                let mut c = libdeflater::Compressor::new(lvl);
                loop {
                    let job = job_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((i, block)) = job else { break };
                    if done_tx.send((i, gzip_member(&mut c, lvl, &block))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let window = 2 * threads as u64;
        let (mut next_read, mut next_write) = (0u64, 0u64);
        let mut eof = false;
        let mut pending = BTreeMap::new();
        loop {
            // An empty input is one member of nothing; a short block ends the input.
            while !eof && next_read - next_write < window {
                let block = read_block(&mut r)?;
                eof = block.len() < GZIP_BLOCK;
                if block.is_empty() && next_read > 0 {
                    break;
                }
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
                w.write_all(&res?).map_err(werr)?;
                next_write += 1;
            }
        }
        Ok(())
    })?;
    Ok(w)
}

/// The 10-byte header of every member (the XFL byte follows libdeflate's rule).
fn gzip_header(lvl: libdeflater::CompressionLvl) -> [u8; 10] {
    let level: i32 = lvl.into();
    let xfl = match level {
        ..=1 => 4,
        8.. => 2,
        _ => 0,
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

/// `block` as one gzip member: the header, its deflate by `c`, its CRC-32 and its length.
fn gzip_member(
    c: &mut libdeflater::Compressor,
    lvl: libdeflater::CompressionLvl,
    block: &[u8],
) -> Result<Vec<u8>, ArchiveError> {
    let header = gzip_header(lvl);
    let mut out = vec![0; header.len() + c.deflate_compress_bound(block.len()) + 8];
    out[..header.len()].copy_from_slice(&header);
    let n = c
        .deflate_compress(block, &mut out[header.len()..])
        .map_err(|e| gzip_err(format!("deflate failed: {e}")))?;
    out.truncate(header.len() + n);
    out.extend_from_slice(&libdeflater::crc32(block).to_le_bytes());
    // ISIZE: the length modulo 2^32; a block is far shorter.
    out.extend_from_slice(&(block.len() as u32).to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Every member, as GNU gzip, Go and Python read a gzip file.
    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(gz)
            .read_to_end(&mut out)
            .expect("valid gzip");
        out
    }

    #[test]
    fn gzip_parallel_writes_a_member_per_block_with_a_fixed_header() {
        let data = sample(3 * GZIP_BLOCK + 12_345);
        let gz = gzip_parallel(data.as_slice(), Vec::new(), 4, 2).unwrap();
        let mut rest = gz.as_slice();
        let mut blocks = data.chunks(GZIP_BLOCK);
        let mut members = 0;
        while !rest.is_empty() {
            assert_eq!(&rest[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, GZIP_OS]);
            // One member read on its own is the next block of the input, no more.
            let mut d = flate2::bufread::GzDecoder::new(rest);
            let mut block = Vec::new();
            d.read_to_end(&mut block).unwrap();
            assert_eq!(Some(block.as_slice()), blocks.next(), "member {members}");
            rest = d.into_inner();
            members += 1;
        }
        assert_eq!(members, 4);
        assert_eq!(blocks.next(), None);
    }

    /// Layers' bytes are the output of this libdeflate at the layers' level. If this fails after
    /// a change of libdeflate (or of the blocks, the header, the level), every gzip layer
    /// changes: bump `BUILDERS_EPOCH` (engine/core/src/derivation.rs), then this digest.
    #[test]
    fn gzip_output_is_pinned() {
        use sha2::Digest;
        let mut data = sample(2 * GZIP_BLOCK + 777);
        data.extend(b"usr/share/doc/base-files/copyright\n".repeat(20_000));
        let gz = gzip_parallel(data.as_slice(), Vec::new(), GZIP_LAYER_LEVEL, 2).unwrap();
        assert_eq!(gunzip(&gz), data);
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&gz)),
            "bb517cdac3d8b32748bcbce7959e706fe220f5accc6b2c6e48198c6507acc8fc",
            "gzip_parallel's output changed"
        );
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
            assert_eq!(&four[..10], &gzip_header(check_level(6).unwrap()));
        }
        // A multiple of the block size ends with its last full block, not an empty member.
        let data = sample(GZIP_BLOCK);
        let gz = gzip_parallel(data.as_slice(), Vec::new(), 6, 2).unwrap();
        assert_eq!(gz.windows(3).filter(|w| *w == [0x1f, 0x8b, 8]).count(), 1);
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
        let e = gzip_parallel(&b""[..], Vec::new(), 13, 2).unwrap_err();
        assert!(e.to_string().contains("level 13 is not in 0..=12"), "{e}");
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
