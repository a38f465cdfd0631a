//! The `.deb`s configure hands to dpkg, rewritten with their data uncompressed
//! ([`archive::deb::decompress_data`]) on the cores dpkg leaves idle, ahead of the dpkg call
//! that reads them. dpkg's own decompressor is single-threaded and was a third of the time it
//! took to unpack the required set; a package not rewritten yet when dpkg needs it is given to
//! dpkg as it is, so nothing waits for a package the workers have not started.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rbuild_engine::archive;

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

type Shared = Arc<(Mutex<HashMap<String, State>>, Condvar)>;

pub(super) struct PlainDebs {
    shared: Shared,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// The rewritten files' directory on the host, and as the chroot sees it.
    dir: PathBuf,
    dir_in_chroot: String,
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
    /// (which the chroot sees as `/dir_in_chroot`), on one thread per core but one.
    pub(super) fn start(
        work: Vec<(String, PathBuf)>,
        dir: PathBuf,
        dir_in_chroot: String,
    ) -> PlainDebs {
        let shared: Shared = Arc::new((
            Mutex::new(
                work.iter()
                    .map(|(name, _)| (name.clone(), State::Queued))
                    .collect(),
            ),
            Condvar::new(),
        ));
        let work = Arc::new(work);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .saturating_sub(1)
            .clamp(1, 4);
        let workers = (0..threads)
            .map(|_| {
                let (shared, work, dir) = (shared.clone(), work.clone(), dir.clone());
                std::thread::spawn(move || rewrite_queued(&shared, &work, &dir))
            })
            .collect();
        PlainDebs {
            shared,
            workers,
            dir,
            dir_in_chroot,
        }
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
                    let file = p
                        .strip_prefix(&self.dir)
                        .unwrap_or(&p)
                        .display()
                        .to_string();
                    batch.args.push(format!("{}/{file}", self.dir_in_chroot));
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
    }
}

impl Drop for PlainDebs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One worker: take the first queued package, rewrite it, repeat.
fn rewrite_queued(shared: &Shared, work: &[(String, PathBuf)], dir: &Path) {
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
        let out = dir.join(deb.file_name().unwrap_or(name.as_ref()));
        let state = match archive::deb::decompress_data(deb, &out) {
            Ok(()) => State::Ready(out),
            Err(e) => {
                eprintln!("configure: {name} is given to dpkg compressed: {e}");
                let _ = std::fs::remove_file(&out);
                State::Failed
            }
        };
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
