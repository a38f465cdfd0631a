//! `file:///DIR`: `DIR/entries/<drv-hash>.json` and `DIR/blobs/sha256/<digest>`. Every write goes
//! to a temporary name in the same directory and is renamed into place, so concurrent writers on
//! a shared filesystem are safe and readers never see half a file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{io, BackendError, BinaryCache, BlobRef, CacheError};

pub struct FileCache {
    url: String,
    dir: PathBuf,
}

impl FileCache {
    pub fn new(url: &str, dir: &str) -> FileCache {
        FileCache {
            url: url.to_owned(),
            dir: PathBuf::from(dir),
        }
    }

    fn entry_path(&self, drv_hash: &str) -> PathBuf {
        self.dir.join("entries").join(format!("{drv_hash}.json"))
    }

    fn blob_path(&self, blob: &BlobRef) -> Result<PathBuf, CacheError> {
        blob.check().map_err(|e| CacheError::Backend {
            url: self.url.clone(),
            source: Box::new(e.into()),
        })?;
        Ok(self.dir.join("blobs/sha256").join(&blob.sha256))
    }

    /// Write `path` atomically: temporary name in the same directory, then rename.
    fn write_atomic(
        &self,
        path: &Path,
        write: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
    ) -> Result<(), CacheError> {
        let parent = path.parent().expect("cache paths have parents");
        fs::create_dir_all(parent).map_err(io(parent.display()))?;
        // Unique across threads, processes and machines sharing the directory.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let tmp = parent.join(format!(
            ".tmp-{}-{}-{nanos}-{}",
            host.replace('/', "_"),
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut f = fs::File::create(&tmp).map_err(io(tmp.display()))?;
        write(&mut f).map_err(io(tmp.display()))?;
        let _ = f.set_permissions(fs::Permissions::from_mode(0o644));
        fs::rename(&tmp, path).map_err(io(path.display()))
    }
}

impl BinaryCache for FileCache {
    fn url(&self) -> &str {
        &self.url
    }

    fn get_entry(&self, drv_hash: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let p = self.entry_path(drv_hash);
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::Io(p.display().to_string(), e)),
        }
    }

    fn put_entry(&self, drv_hash: &str, bytes: &[u8]) -> Result<(), CacheError> {
        self.write_atomic(&self.entry_path(drv_hash), |f| f.write_all(bytes))
    }

    fn missing_blobs(&self, blobs: &[BlobRef]) -> Result<Vec<BlobRef>, CacheError> {
        let mut missing = Vec::new();
        for b in blobs {
            if !self.blob_path(b)?.exists() {
                missing.push(b.clone());
            }
        }
        Ok(missing)
    }

    fn get_blob(&self, blob: &BlobRef, dest: &mut dyn Write) -> Result<(), CacheError> {
        let p = self.blob_path(blob)?;
        let mut f = fs::File::open(&p).map_err(io(p.display()))?;
        // A FIFO or an endless file in a shared directory stops one byte past the listing.
        std::io::copy(&mut std::io::Read::take(&mut f, blob.size + 1), dest)
            .map_err(io(p.display()))?;
        Ok(())
    }

    fn check(&self) -> Result<String, CacheError> {
        let md = fs::metadata(&self.dir).map_err(io(self.dir.display()))?;
        if !md.is_dir() {
            return Err(CacheError::Backend {
                url: self.url.clone(),
                source: Box::new(BackendError::NotADirectory(self.dir.clone())),
            });
        }
        let entries = fs::read_dir(self.dir.join("entries"))
            .map(|d| d.count())
            .unwrap_or(0);
        let writable = nix::unistd::access(&self.dir, nix::unistd::AccessFlags::W_OK).is_ok();
        Ok(format!(
            "a directory with {entries} entries, {}",
            if writable {
                "writable by this user"
            } else {
                "read-only for this user (substitute only)"
            }
        ))
    }

    fn put_blob(&self, blob: &BlobRef, src: &Path) -> Result<(), CacheError> {
        let dest = self.blob_path(blob)?;
        self.write_atomic(&dest, |f| {
            std::io::copy(&mut fs::File::open(src)?, f).map(|_| ())
        })
    }
}
