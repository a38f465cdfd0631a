//! The `.deb`s configure hands to dpkg, rewritten with their data uncompressed
//! ([`archive::deb::decompress_data`]): the required set's before dpkg first runs (configure
//! extracts them from these), the rest on the cores dpkg leaves idle, ahead of the dpkg call
//! that reads them. dpkg's own decompressor is single-threaded and was a third of the time it
//! took to unpack the required set; a package not rewritten yet when dpkg needs it is given to
//! dpkg as it is, so nothing waits for a package the workers have not started.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rbuild_engine::archive;

use super::recorded_unpack::Extracted;

/// Where one package's rewriting stands.
enum State {
    Queued,
    Working,
    Ready(PathBuf),
    /// Not rewritten (an error, already logged): dpkg reads the `.deb` as it is.
    Failed,
    /// Given to dpkg, or no longer wanted.
    Taken,
}

/// How much larger than its `.deb` a rewritten package may be, at most (xz rarely does better
/// than 6:1 on a package's data), and what is left free for dpkg in any case.
const EXPANSION: u64 = 8;
const RESERVE: u64 = 512 << 20;

type Shared = Arc<(Mutex<HashMap<String, State>>, Condvar)>;

/// The packages the workers have unpacked as well (see [`PlainDebs::start`]), by name.
type Unpacked = Arc<Mutex<HashMap<String, Extracted>>>;

/// Bytes the workers' rewrites in progress may still take, so that two of them do not both
/// count the same free memory.
type Reserved = Arc<std::sync::atomic::AtomicU64>;

pub(super) struct PlainDebs {
    shared: Shared,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// The rewritten files' directory on the host, and as the chroot sees it.
    dir: PathBuf,
    dir_in_chroot: String,
    unpacked: Unpacked,
}

/// The `.deb`s of one dpkg call, as dpkg is to be given them; the rewritten ones are deleted
/// when it is dropped.
pub(super) struct Batch {
    pub args: Vec<String>,
    made: Vec<PathBuf>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        for p in &self.made {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, HashMap<String, State>> {
    shared.0.lock().unwrap_or_else(|p| p.into_inner())
}

impl PlainDebs {
    /// Start rewriting `work` (package name, `.deb` on the host), in that order, into `dir`
    /// (which the chroot sees as `/dir_in_chroot`), on one thread per core but one (at least
    /// one, at most four); `ready` are packages rewritten there already. Without threads (none
    /// could be started), every package not ready goes to dpkg as it is. With `trees`, each
    /// package rewritten is unpacked as well, into `trees/NAME` ([`PlainDebs::take_unpacked`]).
    pub(super) fn start(
        ready: Vec<(String, PathBuf)>,
        work: Vec<(String, PathBuf)>,
        dir: PathBuf,
        dir_in_chroot: String,
        trees: Option<PathBuf>,
    ) -> PlainDebs {
        let unpacked = Unpacked::default();
        let states = ready
            .into_iter()
            .map(|(name, p)| (name, State::Ready(p)))
            .chain(work.iter().map(|(name, _)| (name.clone(), State::Queued)))
            .collect();
        let shared: Shared = Arc::new((Mutex::new(states), Condvar::new()));
        let work = Arc::new(work);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .saturating_sub(1)
            .clamp(1, 4);
        let reserved = Reserved::default();
        let workers = (0..threads)
            .filter_map(|_| {
                let (shared, work, dir) = (shared.clone(), work.clone(), dir.clone());
                let reserved = reserved.clone();
                let unpack = trees.clone().map(|t| (t, unpacked.clone()));
                std::thread::Builder::new()
                    .name("rewrite-debs".into())
                    .spawn(move || rewrite_queued(&shared, &work, &dir, &reserved, unpack))
                    .ok()
            })
            .collect();
        PlainDebs {
            shared,
            workers,
            dir,
            dir_in_chroot,
            unpacked,
        }
    }

    /// The states, once `name` is not being rewritten any more (waiting for a worker on it).
    fn settled(&self, name: &str) -> MutexGuard<'_, HashMap<String, State>> {
        let mut states = lock(&self.shared);
        while let Some(State::Working) = states.get(name) {
            states = self
                .shared
                .1
                .wait(states)
                .unwrap_or_else(|p| p.into_inner());
        }
        states
    }

    /// `name` unpacked by a worker (waiting for it if it is being rewritten now), if it was.
    pub(super) fn take_unpacked(&self, name: &str) -> Option<Extracted> {
        drop(self.settled(name));
        self.unpacked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    /// The `.deb`s of `names` for one dpkg call, each rewritten if it is (waiting for one being
    /// rewritten now), else `original` gives its path in the chroot.
    pub(super) fn batch(&self, names: &[&str], original: impl Fn(&str) -> Option<String>) -> Batch {
        let mut batch = Batch {
            args: Vec::new(),
            made: Vec::new(),
        };
        let mut states = lock(&self.shared);
        for name in names {
            let Some(orig) = original(name) else {
                continue;
            };
            let made = loop {
                match states.get(*name) {
                    Some(State::Working) => {
                        states = self
                            .shared
                            .1
                            .wait(states)
                            .unwrap_or_else(|p| p.into_inner());
                    }
                    Some(State::Ready(p)) => break Some(p.clone()),
                    _ => break None,
                }
            };
            states.insert((*name).to_owned(), State::Taken);
            match made {
                Some(p) => {
                    batch.args.push(self.in_chroot(&p));
                    batch.made.push(p);
                }
                None => batch.args.push(orig),
            }
        }
        eprintln!(
            "configure: {} of {} packages given to dpkg with their data uncompressed",
            batch.made.len(),
            batch.args.len()
        );
        batch
    }

    /// `name`'s `.deb` is not needed after all (its unpack was recorded): its rewritten copy
    /// goes (waiting for it if it is being rewritten now), and it is not rewritten later.
    pub(super) fn discard(&self, name: &str) {
        let mut states = self.settled(name);
        if let Some(State::Ready(p)) = states.insert(name.to_owned(), State::Taken) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The path in the chroot of `name`'s rewritten `.deb` if it is ready, leaving it for a
    /// later batch.
    pub(super) fn peek(&self, name: &str) -> Option<String> {
        match lock(&self.shared).get(name) {
            Some(State::Ready(p)) => Some(self.in_chroot(p)),
            _ => None,
        }
    }

    fn in_chroot(&self, p: &Path) -> String {
        let file = p.strip_prefix(&self.dir).unwrap_or(p).display().to_string();
        format!("{}/{file}", self.dir_in_chroot)
    }

    /// Stop rewriting: the workers finish the package they are on, and what they made is
    /// deleted.
    fn stop(&mut self) {
        for state in lock(&self.shared).values_mut() {
            if matches!(state, State::Queued) {
                *state = State::Taken;
            }
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        for state in lock(&self.shared).values() {
            if let State::Ready(p) = state {
                let _ = std::fs::remove_file(p);
            }
        }
        let mut unpacked = self.unpacked.lock().unwrap_or_else(|p| p.into_inner());
        for (_, e) in unpacked.drain() {
            let _ = std::fs::remove_dir_all(e.dir);
        }
    }
}

impl Drop for PlainDebs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Marks the package a worker is on as failed if the worker unwinds, so that nobody waits for
/// it for ever.
struct OnPanic<'a> {
    shared: &'a Shared,
    name: Option<String>,
}

impl Drop for OnPanic<'_> {
    fn drop(&mut self) {
        if let (true, Some(name)) = (std::thread::panicking(), self.name.take()) {
            lock(self.shared).insert(name, State::Failed);
            self.shared.1.notify_all();
        }
    }
}

/// One worker: take the first queued package, rewrite it (and unpack it into `unpack`'s
/// directory, when given), repeat.
fn rewrite_queued(
    shared: &Shared,
    work: &[(String, PathBuf)],
    dir: &Path,
    reserved: &Reserved,
    unpack: Option<(PathBuf, Unpacked)>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let mut guard = OnPanic { shared, name: None };
    loop {
        let next = {
            let mut states = lock(shared);
            let next = work
                .iter()
                .find(|(name, _)| matches!(states.get(name), Some(State::Queued)));
            if let Some((name, _)) = next {
                states.insert(name.clone(), State::Working);
            }
            next
        };
        let Some((name, deb)) = next else {
            return;
        };
        guard.name = Some(name.clone());
        // The rewritten files share the tree's memory: leave dpkg room, whatever the bound.
        let size = std::fs::metadata(deb).map_or(0, |m| m.len());
        let copies = if unpack.is_some() { 2 } else { 1 };
        let most = size.saturating_mul(EXPANSION * copies);
        let free = rbuild_engine::nospace::free_bytes(dir)
            .unwrap_or(0)
            .saturating_sub(reserved.fetch_add(most, SeqCst));
        if free < most + RESERVE {
            reserved.fetch_sub(most, SeqCst);
            eprintln!(
                "configure: {} bytes free in {}: {name} and the packages after it are given to dpkg compressed",
                free,
                dir.display()
            );
            lock(shared).insert(name.clone(), State::Failed);
            shared.1.notify_all();
            return;
        }
        let out = dir.join(deb.file_name().unwrap_or(name.as_ref()));
        let state = match archive::deb::decompress_data(deb, &out) {
            Ok(()) => {
                if let Some((trees, unpacked)) = &unpack {
                    let tree = trees.join(name);
                    match archive::deb::unpack_deb_listed(&out, &tree) {
                        Ok((meta, listed)) => {
                            let e = Extracted {
                                dir: tree,
                                meta,
                                listed,
                            };
                            let mut u = unpacked.lock().unwrap_or_else(|p| p.into_inner());
                            u.insert(name.clone(), e);
                        }
                        Err(e) => {
                            eprintln!("configure: {name} is left to dpkg: unpacking it: {e}");
                            let _ = std::fs::remove_dir_all(&tree);
                        }
                    }
                }
                State::Ready(out)
            }
            Err(e) => {
                eprintln!("configure: {name} is given to dpkg compressed: {e}");
                let _ = std::fs::remove_file(&out);
                State::Failed
            }
        };
        reserved.fetch_sub(most, SeqCst);
        guard.name = None;
        let mut states = lock(shared);
        match states.get(name) {
            Some(State::Working) => {
                states.insert(name.clone(), state);
            }
            // Stopped meanwhile: nobody will read it.
            _ => {
                if let State::Ready(p) = state {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        shared.1.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A `.deb` of one (empty) tar per member, the data xz-compressed.
    fn deb(path: &Path) {
        let tar = vec![0u8; 1024];
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&tar).unwrap();
        let data = xz.finish().unwrap();
        let mut out = b"!<arch>\n".to_vec();
        for (name, bytes) in [
            ("debian-binary", b"2.0\n".to_vec()),
            ("control.tar", tar.clone()),
            ("data.tar.xz", data),
        ] {
            let header = format!(
                "{name:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                0,
                0,
                0,
                100644,
                bytes.len()
            );
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(&bytes);
            if bytes.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn packages_are_given_rewritten_when_ready_and_as_they_are_otherwise() {
        let tmp = tempfile::tempdir().unwrap();
        let work: Vec<(String, PathBuf)> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| {
                let p = tmp.path().join(format!("{n}_1_all.deb"));
                deb(&p);
                (n.to_string(), p)
            })
            .collect();
        let dir = tmp.path().join("plain");
        std::fs::create_dir(&dir).unwrap();
        let ready = dir.join("r_1_all.deb");
        std::fs::write(&ready, b"made before").unwrap();
        let plain = PlainDebs::start(
            vec![("r".into(), ready.clone())],
            work,
            dir.clone(),
            "/staging/plain".into(),
            None,
        );
        assert_eq!(
            plain.peek("r").as_deref(),
            Some("/staging/plain/r_1_all.deb")
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while lock(&plain.shared)
            .values()
            .any(|s| matches!(s, State::Queued | State::Working))
        {
            assert!(std::time::Instant::now() < deadline, "never rewritten");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let original = |n: &str| (n != "gone").then(|| format!("/inputs/{n}.deb"));
        let batch = plain.batch(&["b", "gone", "other", "a", "r"], original);
        assert_eq!(
            batch.args,
            [
                "/staging/plain/b_1_all.deb",
                "/inputs/other.deb",
                "/staging/plain/a_1_all.deb",
                "/staging/plain/r_1_all.deb"
            ]
        );
        assert_eq!(plain.peek("r"), None, "taken");
        let data = std::fs::read(dir.join("a_1_all.deb")).unwrap();
        assert!(data.windows(16).any(|w| w == b"data.tar        "));
        // Taken once: asked again, it is the original.
        assert_eq!(plain.batch(&["a"], original).args, ["/inputs/a.deb"]);
        drop(batch);
        assert!(!dir.join("a_1_all.deb").exists() && !dir.join("b_1_all.deb").exists());
        assert!(!ready.exists());
        assert!(dir.join("c_1_all.deb").exists());
        // Not needed after all: gone, and taken.
        plain.discard("d");
        assert!(!dir.join("d_1_all.deb").exists());
        assert_eq!(plain.batch(&["d"], original).args, ["/inputs/d.deb"]);
        drop(plain);
        assert!(!dir.join("c_1_all.deb").exists(), "left behind");
    }
}
