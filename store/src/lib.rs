//! rbuild's content store.
//!
//! A store is a directory holding immutable build outputs (`o/<derivation-hash>-<name>`, each a file
//! or a tree with an optional ownership sidecar, see [`meta`]), scratch space for builds in progress
//! (`tmp/`), per-derivation build locks (`locks/`), one name per shared file (`links/`: the files of
//! equal content and disk mode in different outputs are one inode, as Nix's optimised store
//! does) and an SQLite database that is the single source of truth for which outputs are *valid*. An output exists for readers only once its row is
//! committed; anything on disk without a row is garbage from an interrupted build and is removed.
//!
//! The store knows nothing about recipes, Debian or sandboxes: it stores, hashes, locks and
//! collects garbage.

pub mod cache;
pub mod dsse;
pub mod hash;
pub mod meta;
pub mod verify;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{params, Connection, OptionalExtension};

/// Errors of the store. Each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store database {path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: {what}")]
    Corrupt { path: PathBuf, what: String },
}

impl StoreError {
    pub fn io(path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What the store records about a derivation when its output is registered.
#[derive(Debug, Clone)]
pub struct DrvRecord {
    pub hash: String,
    pub name: String,
    pub stage: String,
    /// Canonical JSON of the derivation (for `rbuild show` and debugging).
    pub json: String,
    /// Hashes of the derivations whose outputs were inputs.
    pub inputs: Vec<String>,
}

/// A registered, valid output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub path: PathBuf,
    pub content_hash: String,
}

/// A valid output and the derivation it is the output of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub drv_hash: String,
    /// The derivation's (path-safe) name.
    pub name: String,
    pub output: Output,
}

/// A scratch directory for one build, removed on drop. Holds a lock so that a concurrent
/// `Store::open` never mistakes it for the leftovers of a killed build.
pub struct BuildDir {
    path: PathBuf,
    _lock: Flock<fs::File>,
}

impl BuildDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor of the directory's lock: a process holding a copy of it keeps the
    /// directory from being taken for the leftovers of a killed build.
    pub fn lock_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self._lock.as_raw_fd()
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        let _ = remove_all(&self.path);
        let _ = fs::remove_file(lock_of(&self.path));
    }
}

/// An exclusive lock on building one derivation (across processes sharing the store).
pub struct DrvLock {
    _lock: Flock<fs::File>,
}

pub struct Store {
    root: PathBuf,
    db_path: PathBuf,
    db: Mutex<Connection>,
    /// Scratch directories of killed builds that could not be removed as this user (they hold
    /// files owned by subordinate ids); the engine removes them inside a user namespace.
    leftovers: Vec<PathBuf>,
    /// A shared lock on `gc.lock`, held while this store is open: [`Store::gc`] turns it into an
    /// exclusive one, so it never deletes an output another process is building from.
    users: Mutex<Option<Flock<fs::File>>>,
}

/// The directory of shared files' names ([`Store::share_files`]).
const LINKS: &str = "links";

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Read until `buf` is full or the file ends.
fn read_full(f: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS derivations (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, stage TEXT NOT NULL, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outputs (
    drv_hash TEXT PRIMARY KEY, path TEXT NOT NULL, content_hash TEXT NOT NULL,
    registered_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS refs (
    drv_hash TEXT NOT NULL, input_hash TEXT NOT NULL, PRIMARY KEY (drv_hash, input_hash));
CREATE TABLE IF NOT EXISTS roots (link TEXT PRIMARY KEY, drv_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS realised (what TEXT PRIMARY KEY, drv_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS listings (
    drv_hash TEXT PRIMARY KEY, content_hash TEXT NOT NULL, listing BLOB NOT NULL);
";

impl Store {
    /// Open (creating if needed) the store at `root`, and clean up after killed builds.
    pub fn open(root: &Path) -> Result<Store> {
        for sub in ["o", "tmp", "locks", LINKS] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|e| StoreError::io(&p, e))?;
        }
        let root = fs::canonicalize(root).map_err(|e| StoreError::io(root, e))?;
        let db_path = root.join("db.sqlite");
        let dberr = |source| StoreError::Db {
            path: db_path.clone(),
            source,
        };
        // One opener at a time sets the database up: switching a new database to WAL and
        // creating its tables are writes that SQLite may refuse at once (without waiting) to a
        // second process doing the same.
        let init = lock_file(&root.join("init.lock"), FlockArg::LockExclusive)?;
        let conn = Connection::open(&db_path).map_err(dberr)?;
        conn.busy_timeout(std::time::Duration::from_secs(60))
            .map_err(dberr)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(dberr)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(dberr)?;
        conn.execute_batch(SCHEMA).map_err(dberr)?;
        drop(init);
        // A pending gc holds `gc-intent.lock`: wait behind it rather than keep it waiting.
        let intent = lock_file(&root.join("gc-intent.lock"), FlockArg::LockShared)?;
        let users = lock_file(&root.join("gc.lock"), FlockArg::LockShared)?;
        drop(intent);
        let mut store = Store {
            root,
            db_path,
            db: Mutex::new(conn),
            leftovers: Vec::new(),
            users: Mutex::new(Some(users)),
        };
        store.leftovers = store.clean_stale_builds()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn leftovers(&self) -> &[PathBuf] {
        &self.leftovers
    }

    fn db_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db {
            path: self.db_path.clone(),
            source,
        }
    }

    /// Where the output of derivation `hash` named `name` lives once registered.
    pub fn output_path(&self, hash: &str, name: &str) -> PathBuf {
        self.root.join("o").join(format!("{hash}-{name}"))
    }

    /// The registered output of a derivation, if it is valid.
    pub fn valid_output(&self, hash: &str) -> Result<Option<Output>> {
        let db = self.db.lock().expect("store db lock");
        db.query_row(
            "SELECT path, content_hash FROM outputs WHERE drv_hash = ?1",
            params![hash],
            |r| {
                Ok(Output {
                    path: PathBuf::from(r.get::<_, String>(0)?),
                    content_hash: r.get(1)?,
                })
            },
        )
        .optional()
        .map_err(|e| self.db_err(e))
    }

    /// Take the build lock of a derivation, waiting for another process that holds it.
    pub fn lock_derivation(&self, hash: &str) -> Result<DrvLock> {
        let p = self.root.join("locks").join(format!("{hash}.lock"));
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| StoreError::io(&p, e))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| StoreError::io(&p, e.into()))?;
        Ok(DrvLock { _lock: lock })
    }

    /// A fresh scratch directory under `tmp/`.
    pub fn new_build_dir(&self, label: &str) -> Result<BuildDir> {
        let tmp = self.root.join("tmp");
        for n in 0u32.. {
            let name = format!("{}-{n}-{label}", std::process::id());
            let path = tmp.join(&name);
            let lock_path = lock_of(&path);
            if lock_path.exists() || path.exists() {
                continue;
            }
            // The lock is taken under a hidden name and then renamed into place, so a visible
            // lock file is always held by a live builder (`clean_stale_builds` relies on it).
            let hidden = tmp.join(format!(".{name}.lock.new"));
            let f = match fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&hidden)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(StoreError::io(&hidden, e)),
            };
            let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| StoreError::io(&hidden, e.into()))?;
            fs::rename(&hidden, &lock_path).map_err(|e| StoreError::io(&lock_path, e))?;
            fs::create_dir(&path).map_err(|e| StoreError::io(&path, e))?;
            return Ok(BuildDir { path, _lock: lock });
        }
        unreachable!()
    }

    /// Remove scratch directories whose builder died (their lock is free).
    fn clean_stale_builds(&self) -> Result<Vec<PathBuf>> {
        let tmp = self.root.join("tmp");
        let mut leftovers = Vec::new();
        for entry in fs::read_dir(&tmp).map_err(|e| StoreError::io(&tmp, e))? {
            let entry = entry.map_err(|e| StoreError::io(&tmp, e))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                // A lock being taken (or left by a builder killed while taking it).
                let free = fs::File::open(&path)
                    .map(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok())
                    .unwrap_or(false);
                let old = entry
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 60);
                if free && old {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            if path.extension().is_some_and(|e| e == "lock") {
                // A lock whose builder died before creating its directory.
                let dir = path.with_file_name(
                    path.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_suffix(".lock"))
                        .unwrap_or_default(),
                );
                if !dir.exists() {
                    let free = fs::File::open(&path)
                        .map(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok())
                        .unwrap_or(false);
                    if free {
                        let _ = fs::remove_file(&path);
                    }
                }
                continue;
            }
            let lock_path = lock_of(&path);
            let held = match fs::File::open(&lock_path) {
                Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err(),
                Err(_) => false,
            };
            if held {
                continue;
            }
            if remove_all(&path).is_err() && path.exists() {
                leftovers.push(path);
            } else {
                let _ = fs::remove_file(&lock_path);
            }
        }
        Ok(leftovers)
    }

    /// Atomically register the output a build left at `built` (and its `built.meta` sidecar, if
    /// any) as the output of `drv`. The files are moved into place first; the output becomes
    /// valid only when the database row is committed, so a crash in between leaves garbage that
    /// the next build of the same derivation removes, never a registered partial output.
    pub fn register(&self, drv: &DrvRecord, built: &Path) -> Result<Output> {
        self.register_expecting(drv, built, None)
    }

    /// [`Store::register`], refusing (before anything is moved) an output whose content hash is
    /// not `expected` — for outputs that came from a binary cache.
    pub fn register_expecting(
        &self,
        drv: &DrvRecord,
        built: &Path,
        expected: Option<&str>,
    ) -> Result<Output> {
        let built_meta = meta::sidecar(built);
        let tree_meta = if built_meta.exists() {
            Some(meta::TreeMeta::read(&built_meta)?)
        } else {
            None
        };
        // A built tree's files are shared with the store on another thread as they are hashed
        // (each once hashed: sharing changes no content and no mode, and a file's directory
        // has been read by then, so a name the sharing makes for a moment is never listed).
        // An output from a cache is shared only once it has passed its check.
        let beside = expected.is_none() && built.is_dir();
        let mut files = Vec::new();
        let started = std::time::Instant::now();
        let hashed = std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let sharing = beside.then(|| s.spawn(move || self.share_files(rx)));
            let hashed = hash::walk(
                built,
                tree_meta.as_ref(),
                &hash::Options {
                    list: true,
                    sha256: false,
                },
                &mut |v| {
                    if let hash::VisitNode::File { blake3, size, .. } = v.node {
                        let file = (v.path.to_owned(), blake3, size, v.mode);
                        if beside {
                            // The sharing thread gone (it panicked) shares nothing more.
                            let _ = tx.send(file);
                        } else {
                            files.push(file);
                        }
                    }
                    Ok(())
                },
            );
            drop(tx);
            if let Some(t) = sharing {
                // Only a saving: a panic there loses none of the output.
                let _ = t.join();
            }
            hashed
        });
        let hash::Hashed {
            content_hash,
            listing,
        } = hashed?;
        if let Some(expected) = expected.filter(|e| *e != content_hash) {
            return Err(StoreError::Corrupt {
                path: built.to_owned(),
                what: format!("content hash check failed: the signed cache entry says {expected}, the downloaded output hashes to {content_hash}"),
            });
        }
        if built.is_dir() && !beside {
            self.share_files(files);
        }
        tracing::debug!(
            output = %drv.name,
            secs = started.elapsed().as_secs_f64(),
            "hashed and shared"
        );
        let dest = self.output_path(&drv.hash, &drv.name);
        let dest_meta = meta::sidecar(&dest);
        // Leftovers of an interrupted registration of this very derivation (we hold its lock).
        if fs::symlink_metadata(&dest).is_ok() {
            remove_all(&dest).map_err(|e| StoreError::io(&dest, e))?;
        }
        let _ = fs::remove_file(&dest_meta);
        if tree_meta.is_some() {
            fs::rename(&built_meta, &dest_meta).map_err(|e| StoreError::io(&built_meta, e))?;
        }
        fs::rename(built, &dest).map_err(|e| StoreError::io(built, e))?;
        // Durability: the output's files and directories (and the renames) reach the disk
        // before the row that makes them valid is committed.
        let o = self.root.join("o");
        let dir = fs::File::open(&o).map_err(|e| StoreError::io(&o, e))?;
        let syncing = std::time::Instant::now();
        nix::unistd::syncfs(&dir).map_err(|e| StoreError::io(&o, e.into()))?;
        tracing::debug!(
            output = %drv.name,
            secs = syncing.elapsed().as_secs_f64(),
            "synced to disk"
        );
        let mut db = self.db.lock().expect("store db lock");
        let tx = db.transaction().map_err(|e| self.db_err(e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        tx.execute(
            "INSERT OR REPLACE INTO derivations (hash, name, stage, json) VALUES (?1, ?2, ?3, ?4)",
            params![drv.hash, drv.name, drv.stage, drv.json],
        )
        .map_err(|e| self.db_err(e))?;
        for input in &drv.inputs {
            tx.execute(
                "INSERT OR IGNORE INTO refs (drv_hash, input_hash) VALUES (?1, ?2)",
                params![drv.hash, input],
            )
            .map_err(|e| self.db_err(e))?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO outputs (drv_hash, path, content_hash, registered_at) VALUES (?1, ?2, ?3, ?4)",
            params![drv.hash, dest.to_string_lossy(), content_hash, now],
        )
        .map_err(|e| self.db_err(e))?;
        tx.execute(
            "INSERT OR REPLACE INTO listings (drv_hash, content_hash, listing) VALUES (?1, ?2, ?3)",
            params![drv.hash, content_hash, listing.encode()],
        )
        .map_err(|e| self.db_err(e))?;
        tx.commit().map_err(|e| self.db_err(e))?;
        Ok(Output {
            path: dest,
            content_hash,
        })
    }

    /// Every valid output, with its derivation's name where the store recorded one.
    pub fn outputs(&self) -> Result<Vec<Registered>> {
        let db = self.db.lock().expect("store db lock");
        let mut st = db
            .prepare(
                "SELECT o.drv_hash, o.path, o.content_hash, d.name FROM outputs o
                 LEFT JOIN derivations d ON d.hash = o.drv_hash ORDER BY o.drv_hash",
            )
            .map_err(|e| self.db_err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(Registered {
                    drv_hash: r.get(0)?,
                    output: Output {
                        path: PathBuf::from(r.get::<_, String>(1)?),
                        content_hash: r.get(2)?,
                    },
                    name: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                })
            })
            .map_err(|e| self.db_err(e))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| self.db_err(e))?;
        Ok(rows)
    }

    /// The per-path listing recorded when the output of `hash` was registered with content hash
    /// `content_hash` (`None` for outputs registered before rbuild kept listings).
    pub fn listing(&self, hash: &str, content_hash: &str) -> Result<Option<hash::Listing>> {
        let db = self.db.lock().expect("store db lock");
        let blob: Option<Vec<u8>> = db
            .query_row(
                "SELECT listing FROM listings WHERE drv_hash = ?1 AND content_hash = ?2",
                params![hash, content_hash],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db_err(e))?;
        blob.map(|b| {
            hash::Listing::decode(&b).ok_or_else(|| StoreError::Corrupt {
                path: self.db_path.clone(),
                what: format!("the listing of {hash} cannot be decoded"),
            })
        })
        .transpose()
    }

    /// What the store recorded about derivation `hash` when an output of it was registered.
    pub fn derivation(&self, hash: &str) -> Result<Option<DrvRecord>> {
        let db = self.db.lock().expect("store db lock");
        let row: Option<(String, String, String)> = db
            .query_row(
                "SELECT name, stage, json FROM derivations WHERE hash = ?1",
                params![hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.db_err(e))?;
        let Some((name, stage, json)) = row else {
            return Ok(None);
        };
        let mut st = db
            .prepare("SELECT input_hash FROM refs WHERE drv_hash = ?1")
            .map_err(|e| self.db_err(e))?;
        let inputs = st
            .query_map(params![hash], |r| r.get(0))
            .map_err(|e| self.db_err(e))?
            .collect::<std::result::Result<Vec<String>, _>>()
            .map_err(|e| self.db_err(e))?;
        Ok(Some(DrvRecord {
            hash: hash.to_owned(),
            name,
            stage,
            json,
            inputs,
        }))
    }

    /// Make the output of `hash` invalid (its row goes first) and delete its files: for an
    /// output found damaged, before it is built again. Takes the derivation's build lock.
    /// Returns what was registered, if anything was.
    pub fn invalidate(&self, hash: &str) -> Result<Option<Output>> {
        let _lock = self.lock_derivation(hash)?;
        let Some(out) = self.valid_output(hash)? else {
            return Ok(None);
        };
        {
            let mut db = self.db.lock().expect("store db lock");
            let tx = db.transaction().map_err(|e| self.db_err(e))?;
            for table in ["outputs", "listings"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE drv_hash = ?1"),
                    params![hash],
                )
                .map_err(|e| self.db_err(e))?;
            }
            tx.commit().map_err(|e| self.db_err(e))?;
        }
        // Out of the way into a scratch directory, deleted with it (or by the next open).
        let bin = self.new_build_dir("damaged")?;
        let side = meta::sidecar(&out.path);
        if fs::symlink_metadata(&side).is_ok() {
            fs::rename(&side, bin.path().join("out.meta")).map_err(|e| StoreError::io(&side, e))?;
        }
        if fs::symlink_metadata(&out.path).is_ok() {
            fs::rename(&out.path, bin.path().join("out"))
                .map_err(|e| StoreError::io(&out.path, e))?;
        }
        Ok(Some(out))
    }

    /// Make `link` a symlink to the output of `hash` and record it as a GC root.
    /// Remember that `what` (a caller's name for a request, e.g. a recipe and output) was last
    /// realised as derivation `hash`: what `realise --explain` compares a new request with.
    pub fn set_last_realised(&self, what: &str, hash: &str) -> Result<()> {
        let db = self.db.lock().expect("store db lock");
        db.execute(
            "INSERT OR REPLACE INTO realised (what, drv_hash) VALUES (?1, ?2)",
            params![what, hash],
        )
        .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// The derivation `what` was last realised as ([`Store::set_last_realised`]).
    pub fn last_realised(&self, what: &str) -> Result<Option<String>> {
        let db = self.db.lock().expect("store db lock");
        db.query_row(
            "SELECT drv_hash FROM realised WHERE what = ?1",
            params![what],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| self.db_err(e))
    }

    /// Make each of `files` (path, blake3, size, disk mode — of one output being registered) one
    /// inode with the files of equal content and mode already in the store, through
    /// `links/BLAKE3-MODE`; the first of its kind becomes that name. Left as they are: empty
    /// files, files with several names in the output (the content hash records that), a second
    /// file of the same kind in the output (it would become a hardlink of the first), and any
    /// file the sharing fails for (it is only an optimisation). A shared name whose bytes or
    /// mode are not its name's (damaged) is replaced, never linked to.
    fn share_files(&self, files: impl IntoIterator<Item = (PathBuf, blake3::Hash, u64, u32)>) {
        use std::os::unix::fs::MetadataExt;
        let links = self.root.join(LINKS);
        let mut kinds = std::collections::HashSet::new();
        let mut shared = (0usize, 0u64);
        let started = std::time::Instant::now();
        for (path, blake3, size, mode) in files {
            let key = format!("{}-{mode:o}", blake3.to_hex());
            if size == 0 || !kinds.insert(key.clone()) {
                continue;
            }
            let single = fs::symlink_metadata(&path).is_ok_and(|m| m.nlink() == 1);
            if !single {
                continue;
            }
            let name = links.join(&key);
            let r = (|| -> std::io::Result<bool> {
                match fs::symlink_metadata(&name) {
                    Ok(m)
                        if m.is_file()
                            && m.len() == size
                            && m.mode() & 0o7777 == mode
                            && same_bytes(&name, &path)? =>
                    {
                        let tmp = path.with_file_name(format!(
                            ".{}.rbuild-link",
                            path.file_name().unwrap_or_default().to_string_lossy()
                        ));
                        fs::hard_link(&name, &tmp)?;
                        if let Err(e) = fs::rename(&tmp, &path) {
                            let _ = fs::remove_file(&tmp);
                            return Err(e);
                        }
                        Ok(true)
                    }
                    Ok(_) => {
                        // Damaged: this file takes the name.
                        let tmp = links.join(format!(".{key}.{}", std::process::id()));
                        fs::hard_link(&path, &tmp)?;
                        fs::rename(&tmp, &name)?;
                        Ok(false)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        match fs::hard_link(&path, &name) {
                            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                            _ => Ok(false),
                        }
                    }
                    Err(e) => Err(e),
                }
            })();
            match r {
                Ok(true) => {
                    shared.0 += 1;
                    shared.1 += size;
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(path = %path.display(), error = %e, "not shared"),
            }
        }
        tracing::debug!(
            files = shared.0,
            bytes = shared.1,
            secs = started.elapsed().as_secs_f64(),
            "shared with the store"
        );
    }

    /// Remove the names in `links/` no output shares any more (an inode with one name).
    fn collect_links(&self) {
        use std::os::unix::fs::MetadataExt;
        let links = self.root.join(LINKS);
        let Ok(rd) = fs::read_dir(&links) else {
            return;
        };
        for e in rd.flatten() {
            if e.metadata().is_ok_and(|m| m.nlink() == 1) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    pub fn add_root(&self, link: &Path, hash: &str) -> Result<PathBuf> {
        let out = self
            .valid_output(hash)?
            .ok_or_else(|| StoreError::Corrupt {
                path: link.to_owned(),
                what: format!("cannot add a GC root for {hash}: it has no valid output"),
            })?;
        let parent = link
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        let parent = fs::canonicalize(parent).map_err(|e| StoreError::io(parent, e))?;
        let name = link.file_name().ok_or_else(|| StoreError::Corrupt {
            path: link.to_owned(),
            what: "an output link needs a file name".into(),
        })?;
        let abs = parent.join(name);
        let tmp = parent.join(format!(".{}.rbuild-tmp", name.to_string_lossy()));
        let _ = fs::remove_file(&tmp);
        symlink(&out.path, &tmp).map_err(|e| StoreError::io(&tmp, e))?;
        fs::rename(&tmp, &abs).map_err(|e| StoreError::io(&abs, e))?;
        let db = self.db.lock().expect("store db lock");
        db.execute(
            "INSERT OR REPLACE INTO roots (link, drv_hash) VALUES (?1, ?2)",
            params![abs.to_string_lossy(), hash],
        )
        .map_err(|e| self.db_err(e))?;
        Ok(abs)
    }

    /// Delete every output that `keep` does not keep for the live GC roots. Roots whose link was
    /// removed or now points elsewhere are dropped first. Reports what was kept and deleted,
    /// with the disk usage of each.
    ///
    /// Waits until no other process has the store open (`waiting` is called once if it has to),
    /// so no build or push is using an output while it goes.
    pub fn gc(&self, keep: Keep, waiting: impl FnOnce()) -> Result<GcReport> {
        self.gc_with(keep, false, waiting, |_, _| ())
    }

    /// [`Store::gc`], or with `dry_run` only what it would delete (nothing is changed: the
    /// report's `deleted` and `freed_bytes` are what a real run would delete and free).
    /// `progress(done, total)` follows the deletions.
    pub fn gc_with(
        &self,
        keep: Keep,
        dry_run: bool,
        waiting: impl FnOnce(),
        mut progress: impl FnMut(usize, usize),
    ) -> Result<GcReport> {
        let gc_lock = self.root.join("gc.lock");
        let intent_path = self.root.join("gc-intent.lock");
        let lock_err = |e: nix::errno::Errno| StoreError::io(&gc_lock, e.into());
        let mut waiting = Some(waiting);
        let mut wait = || waiting.take().map(|w| w());
        let mut users = self.users.lock().expect("store lock");
        let shared = users.take().expect("an open store holds its gc.lock");
        // Step aside first: another pending gc waits for every user, this one included.
        let file = shared.unlock().map_err(|(_, e)| lock_err(e))?;
        // Stores opened from now on wait for this gc (flock does not queue an exclusive lock
        // ahead of new shared ones: without this, a stream of builds could starve gc).
        let intent = match lock_file(&intent_path, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err(_) => {
                wait();
                lock_file(&intent_path, FlockArg::LockExclusive)?
            }
        };
        let exclusive = match flock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((file, _)) => {
                wait();
                flock(file, FlockArg::LockExclusive).map_err(|(_, e)| lock_err(e))?
            }
        };
        let report = self.gc_locked(&keep, dry_run, &mut progress);
        retry_eintr(|| exclusive.relock(FlockArg::LockShared)).map_err(lock_err)?;
        *users = Some(exclusive);
        drop(intent);
        report
    }

    fn gc_locked(
        &self,
        keep: &Keep,
        dry_run: bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GcReport> {
        use std::collections::{HashMap, HashSet};
        let mut db = self.db.lock().expect("store db lock");
        let pairs = |db: &Connection, sql: &str| -> Result<Vec<(String, String)>> {
            let mut st = db.prepare(sql).map_err(|e| self.db_err(e))?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(|e| self.db_err(e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| self.db_err(e));
            rows
        };
        let roots = pairs(&db, "SELECT link, drv_hash FROM roots")?;
        let outputs = pairs(&db, "SELECT drv_hash, path FROM outputs")?;
        let path_of: HashMap<&str, &str> = outputs
            .iter()
            .map(|(h, p)| (h.as_str(), p.as_str()))
            .collect();
        let mut alive = HashSet::new();
        let mut dead_roots = Vec::new();
        for (link, hash) in &roots {
            let points_here = fs::read_link(link).ok().is_some_and(|t| {
                path_of
                    .get(hash.as_str())
                    .is_some_and(|p| Path::new(p) == t)
            });
            if points_here {
                alive.insert(hash.clone());
            } else {
                dead_roots.push(link.clone());
            }
        }
        let kept: HashSet<String> = match keep {
            Keep::Roots => alive.clone(),
            Keep::Closure | Keep::Stages(_) => {
                let mut inputs: HashMap<String, Vec<String>> = HashMap::new();
                for (drv, input) in pairs(&db, "SELECT drv_hash, input_hash FROM refs")? {
                    inputs.entry(drv).or_default().push(input);
                }
                // Along every recorded reference, also through derivations without a valid
                // output (a substituted output's inputs need not be here; theirs may be).
                let mut closure = alive.clone();
                let mut todo: Vec<String> = alive.iter().cloned().collect();
                while let Some(h) = todo.pop() {
                    for input in inputs.get(&h).into_iter().flatten() {
                        if closure.insert(input.clone()) {
                            todo.push(input.clone());
                        }
                    }
                }
                match keep {
                    Keep::Stages(stages) => {
                        let stage_of: HashMap<String, String> =
                            pairs(&db, "SELECT hash, stage FROM derivations")?
                                .into_iter()
                                .collect();
                        closure
                            .into_iter()
                            .filter(|h| {
                                alive.contains(h)
                                    || stage_of.get(h).is_some_and(|s| stages.contains(s))
                            })
                            .collect()
                    }
                    _ => closure,
                }
            }
        };
        let tx = db.transaction().map_err(|e| self.db_err(e))?;
        for link in dead_roots.iter().filter(|_| !dry_run) {
            tx.execute("DELETE FROM roots WHERE link = ?1", params![link])
                .map_err(|e| self.db_err(e))?;
        }
        let mut report = GcReport {
            roots_kept: alive.len(),
            roots_dropped: dead_roots.len(),
            ..GcReport::default()
        };
        let mut doomed = Vec::new();
        let mut survivors = Vec::new();
        for (hash, path) in &outputs {
            if kept.contains(hash) {
                survivors.push(PathBuf::from(path));
                continue;
            }
            doomed.push((hash.clone(), PathBuf::from(path)));
            if dry_run {
                continue;
            }
            tx.execute("DELETE FROM outputs WHERE drv_hash = ?1", params![hash])
                .map_err(|e| self.db_err(e))?;
            tx.execute("DELETE FROM listings WHERE drv_hash = ?1", params![hash])
                .map_err(|e| self.db_err(e))?;
        }
        if dry_run {
            tx.rollback().map_err(|e| self.db_err(e))?;
        } else {
            tx.commit().map_err(|e| self.db_err(e))?;
        }
        drop(db);
        // Each inode once: what is kept first, so a file linked from a kept output and a deleted
        // one (which deleting does not free) counts as kept.
        let mut seen = HashSet::new();
        report.kept = survivors.len();
        report.kept_bytes = survivors
            .iter()
            .map(|p| disk_usage(p, &mut seen) + disk_usage(&meta::sidecar(p), &mut seen))
            .sum();
        // Invalidated first, deleted second: a crash in between leaves only unregistered files.
        let total = doomed.len();
        for (done, (hash, path)) in doomed.into_iter().enumerate() {
            let side = meta::sidecar(&path);
            let bytes = disk_usage(&path, &mut seen) + disk_usage(&side, &mut seen);
            if dry_run {
                report.deleted += 1;
                report.freed_bytes += bytes;
                continue;
            }
            progress(done, total);
            let _ = fs::remove_file(&side);
            let _ = fs::remove_file(self.root.join("log").join(format!("{hash}.log")));
            match remove_all(&path) {
                Ok(()) => {
                    report.deleted += 1;
                    report.freed_bytes += bytes;
                }
                Err(_) => {
                    report.unremovable.push(path);
                    report.unremovable_bytes += bytes;
                }
            }
        }
        if !dry_run {
            self.collect_links();
        }
        Ok(report)
    }
}

/// What [`Store::gc`] keeps besides the outputs the live GC roots point to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Keep {
    /// Every output reachable from a root through the recorded references (the derivations
    /// whose outputs were a build's inputs), transitively: what the roots were built from, so
    /// that rebuilding a root after an edit reuses all of it (as Nix's `keep-outputs`).
    #[default]
    Closure,
    /// Within the roots' closures, only the outputs of derivations whose stage is one of these
    /// (the store does not interpret stages; e.g. the engine's fixed-output fetches).
    Stages(Vec<String>),
    /// Only the roots' own outputs.
    Roots,
}

/// What a [`Store::gc`] kept and deleted. Bytes are disk usage (allocated blocks, each inode
/// counted once) of the outputs and their ownership sidecars, as far as they are readable.
#[derive(Debug, Default)]
pub struct GcReport {
    /// Outputs kept, and their bytes.
    pub kept: usize,
    pub kept_bytes: u64,
    /// Outputs deleted, and the bytes that freed.
    pub deleted: usize,
    pub freed_bytes: u64,
    /// Live roots, and roots dropped because their link is gone or points elsewhere.
    pub roots_kept: usize,
    pub roots_dropped: usize,
    /// Outputs invalidated but not removable as this user, and their bytes (freed once the
    /// caller removes them).
    pub unremovable: Vec<PathBuf>,
    pub unremovable_bytes: u64,
}

/// The disk usage of `path` (a file or a tree, not following symlinks): its allocated blocks,
/// skipping inodes already in `seen` (hardlinks). Unreadable parts count as nothing; a missing
/// path is 0.
fn disk_usage(path: &Path, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        total += md.blocks() * 512;
        if md.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

/// Open (creating) `path` and flock it (see [`flock`]).
fn lock_file(path: &Path, arg: FlockArg) -> Result<Flock<fs::File>> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    flock(f, arg).map_err(|(_, e)| StoreError::io(path, e.into()))
}

/// Flock `f`, retrying when a signal interrupts the wait; on failure, the file back.
fn flock(
    mut f: fs::File,
    arg: FlockArg,
) -> std::result::Result<Flock<fs::File>, (fs::File, nix::errno::Errno)> {
    loop {
        match Flock::lock(f, arg) {
            Err((back, nix::errno::Errno::EINTR)) => f = back,
            r => return r,
        }
    }
}

fn retry_eintr(mut f: impl FnMut() -> nix::Result<()>) -> nix::Result<()> {
    loop {
        match f() {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r,
        }
    }
}

/// The lock file held while the scratch directory `dir` is in use: `<dir>.lock`.
pub fn lock_of(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".lock");
    s.into()
}

/// Remove a file or a whole tree, making directories writable first where needed.
pub fn remove_all(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !md.is_dir() {
        return fs::remove_file(path);
    }
    if fs::remove_dir_all(path).is_ok() {
        return Ok(());
    }
    // Read-only directories inside: open them up and retry.
    fn open_up(p: &Path) {
        if let Ok(md) = fs::symlink_metadata(p) {
            if md.is_dir() {
                let _ = fs::set_permissions(
                    p,
                    fs::Permissions::from_mode(md.permissions().mode() | 0o700),
                );
                if let Ok(rd) = fs::read_dir(p) {
                    for e in rd.flatten() {
                        open_up(&e.path());
                    }
                }
            }
        }
    }
    open_up(path);
    fs::remove_dir_all(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(hash: &str) -> DrvRecord {
        DrvRecord {
            hash: hash.into(),
            name: "x".into(),
            stage: "pack".into(),
            json: "{}".into(),
            inputs: vec![],
        }
    }

    #[test]
    fn output_is_valid_only_after_registration_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.valid_output("h1").unwrap(), None);
        let b = store.new_build_dir("t").unwrap();
        let out = b.path().join("out");
        fs::write(&out, b"data").unwrap();
        let o = store.register(&record("h1"), &out).unwrap();
        assert_eq!(fs::read(&o.path).unwrap(), b"data");
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.valid_output("h1").unwrap(), Some(o));
    }

    #[test]
    fn killed_build_leftovers_are_cleaned_and_never_valid() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let b = store.new_build_dir("t").unwrap();
        fs::write(b.path().join("half"), b"partial").unwrap();
        let p = b.path().to_owned();
        // As if the process died: the directory stays. Its lock would be released by the
        // kernel; here the leaked descriptor still holds it, so take the lock file away instead.
        std::mem::forget(b);
        let _ = fs::remove_file(lock_of(&p));
        // A stale output dir of an unfinished registration is not valid either.
        fs::create_dir_all(store.output_path("h2", "x")).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(!p.exists(), "stale scratch dir removed on open");
        assert_eq!(store.valid_output("h2").unwrap(), None);
    }

    #[test]
    fn gc_keeps_rooted_outputs_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let mut paths = vec![];
        for h in ["a", "b"] {
            let b = store.new_build_dir("t").unwrap();
            let out = b.path().join("out");
            fs::create_dir(&out).unwrap();
            fs::write(out.join("f"), h).unwrap();
            paths.push(store.register(&record(h), &out).unwrap().path);
        }
        let link = dir.path().join("result");
        store.add_root(&link, "a").unwrap();
        let r = store
            .gc(Keep::default(), || panic!("nobody else has the store open"))
            .unwrap();
        assert_eq!(r.deleted, 1);
        assert!(paths[0].exists() && !paths[1].exists());
        assert!(store.valid_output("a").unwrap().is_some());
        assert!(store.valid_output("b").unwrap().is_none());
        fs::remove_file(&link).unwrap();
        assert_eq!(store.gc(Keep::default(), || ()).unwrap().deleted, 1);
        assert!(!paths[0].exists());
    }

    /// `n` bytes no filesystem compresses.
    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A store holding a small graph: `fetch` ← `unpack` ← `image` (the root, at `result`),
    /// `other` (a fetch nobody uses) and `old` (an image no root points to, built from `fetch`).
    /// Each output is a directory with one file of `size` bytes. Returns the store and the
    /// output paths by derivation hash.
    fn graph_store(
        dir: &Path,
        size: usize,
    ) -> (Store, std::collections::HashMap<&'static str, PathBuf>) {
        let store = Store::open(&dir.join("s")).unwrap();
        let mut paths = std::collections::HashMap::new();
        for (h, stage, inputs) in [
            ("fetch", "fetch", vec![]),
            ("other", "fetch", vec![]),
            ("unpack", "unpack", vec!["fetch"]),
            ("image", "pack", vec!["unpack"]),
            ("old", "pack", vec!["fetch"]),
        ] {
            let b = store.new_build_dir("t").unwrap();
            let out = b.path().join("out");
            fs::create_dir(&out).unwrap();
            // Each output its own bytes (equal ones would share an inode).
            let mut bytes = noise(size);
            bytes[..h.len()].copy_from_slice(h.as_bytes());
            fs::write(out.join("f"), bytes).unwrap();
            let rec = DrvRecord {
                stage: stage.into(),
                inputs: inputs.into_iter().map(String::from).collect(),
                ..record(h)
            };
            paths.insert(h, store.register(&rec, &out).unwrap().path);
        }
        store.add_root(&dir.join("result"), "image").unwrap();
        (store, paths)
    }

    /// Files of equal content and mode in two outputs become one inode (with one name in
    /// `links/`); both outputs stay intact by `store verify`'s check. Left alone: two equal
    /// files of one output (else the second would hash as a hardlink), empty files, a file
    /// another mode. A damaged shared name is replaced, not linked to; gc removes names no
    /// output shares.
    #[test]
    fn equal_files_of_different_outputs_share_an_inode() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let big = noise(50_000);
        let register = |h: &str, exec: bool| {
            let b = store.new_build_dir("t").unwrap();
            let out = b.path().join("out");
            fs::create_dir(&out).unwrap();
            fs::write(out.join("a"), &big).unwrap();
            fs::write(out.join("twin"), &big).unwrap();
            fs::write(out.join("empty"), b"").unwrap();
            if exec {
                fs::set_permissions(out.join("a"), fs::Permissions::from_mode(0o755)).unwrap();
            }
            store.register(&record(h), &out).unwrap().path
        };
        let (p1, p2, p3) = (
            register("one", false),
            register("two", false),
            register("three", true),
        );
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        assert_eq!(
            ino(&p1.join("a")),
            ino(&p2.join("a")),
            "shared across outputs"
        );
        assert_ne!(
            ino(&p1.join("a")),
            ino(&p1.join("twin")),
            "not within one output"
        );
        assert_ne!(ino(&p1.join("empty")), ino(&p2.join("empty")));
        assert_ne!(
            ino(&p3.join("a")),
            ino(&p1.join("a")),
            "another mode, another inode"
        );
        // p1/a, p2/a, p3/twin (0644 in that output) and its name in links/: four names.
        assert_eq!(ino(&p3.join("twin")), ino(&p1.join("a")));
        assert_eq!(fs::metadata(p1.join("a")).unwrap().nlink(), 4);
        for o in store.outputs().unwrap() {
            let c = verify::check(&store, &o).unwrap();
            assert!(c.damage.is_none(), "{:?}: {:?}", o.drv_hash, c.damage);
        }

        // A shared name whose bytes are not its name's is replaced by the next equal file.
        let links = dir.path().join("s").join(LINKS);
        let name = fs::read_dir(&links)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| fs::metadata(p).unwrap().ino() == ino(&p1.join("a")))
            .unwrap();
        let mut wrong = big.clone();
        wrong[0] ^= 1;
        fs::remove_file(&name).unwrap();
        fs::write(&name, &wrong).unwrap();
        let p4 = register("four", false);
        assert_eq!(fs::read(p4.join("a")).unwrap(), big);
        assert_eq!(
            ino(&name),
            ino(&p4.join("a")),
            "the name is the good file now"
        );
        // The same for a mode that is not the name's.
        fs::set_permissions(&name, fs::Permissions::from_mode(0o600)).unwrap();
        let p5 = register("five", false);
        assert_eq!(fs::metadata(p5.join("a")).unwrap().mode() & 0o7777, 0o644);
        assert_eq!(ino(&name), ino(&p5.join("a")));

        // gc: the names of what is gone go too.
        let r = store.gc(Keep::Roots, || ()).unwrap();
        assert_eq!(r.deleted, 5);
        assert_eq!(fs::read_dir(&links).unwrap().count(), 0);
    }

    /// Files shared while the output is still being hashed (on another thread) change
    /// neither its content hash nor its check: many directories and files, equal contents
    /// across them and across outputs, hard links.
    #[test]
    fn sharing_beside_the_hashing_leaves_outputs_intact() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let register = |h: &str| {
            let b = store.new_build_dir("t").unwrap();
            let out = b.path().join("out");
            for d in 0..30 {
                let sub = out.join(format!("d{d:02}"));
                fs::create_dir_all(&sub).unwrap();
                for f in 0..40 {
                    // One content in three is found in every directory.
                    let body = if f % 3 == 0 {
                        format!("common {f}")
                    } else {
                        format!("{h} {d} {f}")
                    };
                    fs::write(sub.join(format!("f{f:02}")), body).unwrap();
                }
                fs::hard_link(sub.join("f01"), sub.join("zz-link")).unwrap();
            }
            let expected = hash::content_hash(&out, None).unwrap();
            let o = store.register(&record(h), &out).unwrap();
            assert_eq!(o.content_hash, expected, "{h}");
            o
        };
        let (first, second) = (register("one"), register("two"));
        assert_eq!(
            fs::metadata(first.path.join("d00/f00")).unwrap().ino(),
            fs::metadata(second.path.join("d00/f00")).unwrap().ino(),
            "shared across outputs"
        );
        for o in store.outputs().unwrap() {
            let c = verify::check(&store, &o).unwrap();
            assert!(c.damage.is_none(), "{:?}: {:?}", o.drv_hash, c.damage);
        }
    }

    fn valid(store: &Store) -> Vec<String> {
        let mut v: Vec<String> = store
            .outputs()
            .unwrap()
            .into_iter()
            .map(|r| r.drv_hash)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn gc_keeps_the_closure_of_roots_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let (store, paths) = graph_store(dir.path(), 100_000);
        let r = store.gc(Keep::default(), || ()).unwrap();
        assert_eq!(valid(&store), ["fetch", "image", "unpack"]);
        assert!(!paths["other"].exists() && !paths["old"].exists());
        assert!(paths["fetch"].exists() && paths["unpack"].exists());
        assert_eq!((r.kept, r.deleted, r.roots_kept), (3, 2, 1));
        // Two outputs of one 100 kB file each (and their directories) went; three stay.
        assert!(r.freed_bytes >= 200_000, "{r:?}");
        assert!(r.kept_bytes >= 300_000, "{r:?}");
        assert!(r.freed_bytes < 300_000 && r.kept_bytes < 400_000, "{r:?}");
        // Nothing more to collect.
        let again = store.gc(Keep::default(), || ()).unwrap();
        assert_eq!((again.kept, again.deleted, again.freed_bytes), (3, 0, 0));
        assert_eq!(again.kept_bytes, r.kept_bytes);
    }

    #[test]
    fn gc_dry_run_says_what_gc_would_delete_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, paths) = graph_store(dir.path(), 100_000);
        let before = valid(&store);
        let dry = store
            .gc_with(
                Keep::default(),
                true,
                || (),
                |_, _| panic!("nothing is deleted"),
            )
            .unwrap();
        assert_eq!(valid(&store), before);
        assert!(paths.values().all(|p| p.exists()));
        assert_eq!((dry.kept, dry.deleted), (3, 2));
        let mut seen = Vec::new();
        let real = store
            .gc_with(
                Keep::default(),
                false,
                || (),
                |done, total| seen.push((done, total)),
            )
            .unwrap();
        assert_eq!(
            (real.deleted, real.freed_bytes),
            (dry.deleted, dry.freed_bytes)
        );
        assert_eq!(seen, [(0, 2), (1, 2)]);
    }

    #[test]
    fn gc_keeping_stages_keeps_roots_and_their_inputs_of_those_stages() {
        let dir = tempfile::tempdir().unwrap();
        let (store, paths) = graph_store(dir.path(), 10);
        let r = store.gc(Keep::Stages(vec!["fetch".into()]), || ()).unwrap();
        // `fetch` is in the root's closure; `other` is a fetch too, but of nothing rooted.
        assert_eq!(valid(&store), ["fetch", "image"]);
        assert!(!paths["unpack"].exists() && !paths["other"].exists());
        assert_eq!((r.kept, r.deleted), (2, 3));
    }

    #[test]
    fn gc_keeping_roots_keeps_only_their_own_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let (store, paths) = graph_store(dir.path(), 10);
        let r = store.gc(Keep::Roots, || ()).unwrap();
        assert_eq!(valid(&store), ["image"]);
        assert!(paths["image"].exists() && !paths["fetch"].exists());
        assert_eq!((r.kept, r.deleted, r.roots_kept), (1, 4, 1));
        assert!(r.freed_bytes > 0);
    }

    /// A file hardlinked within an output counts once; its sidecar counts too.
    #[test]
    fn gc_bytes_count_each_inode_once_and_sidecars() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let b = store.new_build_dir("t").unwrap();
        let out = b.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("big"), noise(1 << 20)).unwrap();
        fs::hard_link(out.join("big"), out.join("again")).unwrap();
        let path = store.register(&record("h"), &out).unwrap().path;
        let sidecar = meta::sidecar(&path);
        fs::write(&sidecar, noise(50_000)).unwrap();
        let r = store.gc(Keep::default(), || ()).unwrap();
        assert_eq!(r.deleted, 1);
        assert!(!sidecar.exists());
        assert!(
            r.freed_bytes >= (1 << 20) + 50_000 && r.freed_bytes < 2 << 20,
            "{r:?}"
        );
    }

    /// GC waits while another process (here: another open handle, as a concurrent build has)
    /// uses the store, and deletes nothing until it is gone; stores opened meanwhile wait for it.
    #[test]
    fn gc_waits_for_other_users_of_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        let builder = Store::open(&root).unwrap();
        let b = builder.new_build_dir("t").unwrap();
        let out = b.path().join("out");
        fs::write(&out, b"input of a running build").unwrap();
        let path = builder.register(&record("x"), &out).unwrap().path;
        let (tx, rx) = std::sync::mpsc::channel();
        let gc = std::thread::spawn(move || {
            let store = Store::open(&root).unwrap();
            store
                .gc(Keep::default(), || tx.send("waiting").unwrap())
                .unwrap()
                .deleted
        });
        assert_eq!(rx.recv().unwrap(), "waiting");
        // A store opened meanwhile waits behind the pending gc instead of starving it.
        let root2 = dir.path().join("s");
        let late = std::thread::spawn(move || Store::open(&root2).map(|_| ()).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(path.exists(), "nothing deleted while the store is in use");
        assert!(!gc.is_finished());
        assert!(!late.is_finished(), "a new user waits for the pending gc");
        drop(b);
        drop(builder);
        assert_eq!(gc.join().unwrap(), 1);
        assert!(late.join().unwrap());
        assert!(!path.exists());
    }

    /// Two gcs at once (each process also a user of the store) both finish.
    #[test]
    fn concurrent_gcs_do_not_wait_for_each_other_forever() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        Store::open(&root).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..2 {
            let (root, tx) = (root.clone(), tx.clone());
            std::thread::spawn(move || {
                let store = Store::open(&root).unwrap();
                tx.send(
                    store
                        .gc(Keep::default(), || ())
                        .map(|_| true)
                        .map_err(|e| e.to_string()),
                )
                .unwrap();
            });
        }
        for _ in 0..2 {
            let done = rx.recv_timeout(std::time::Duration::from_secs(30));
            assert_eq!(done, Ok(Ok(true)), "a gc never finished, or failed");
        }
    }
}
