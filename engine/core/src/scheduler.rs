//! The scheduler: realise a target of the DAG, running every derivation whose output is not yet
//! valid, each exactly once, in parallel where the graph allows.
//!
//! Only what the target needs is built: the walk stops at outputs that are already valid, so a
//! store holding the final image never looks at (or fetches) its build-time inputs. Across
//! processes sharing a store, a per-derivation lock plus a second validity check after taking it
//! ensures that a derivation is never built twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rbuild_store::cache::{Answer, BinaryCache, CacheEntry, PublicKey, SecretKey};
use rbuild_store::{DrvRecord, Store};
use tokio::task::JoinSet;

use crate::builtins::fetch::{FetchError, Fetcher};
use crate::derivation::{Derivation, DrvHash, Stage};
use crate::graph::{Graph, GraphError};
use crate::progress::Progress;
use crate::sandbox::{self, IdMap, SandboxError, SandboxSpec};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] rbuild_store::StoreError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// Why sandboxes cannot work here: found out once per engine, given to every build.
    #[error(transparent)]
    SandboxSupport(Arc<SandboxError>),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{stage} {name} failed ({status}); full log: {log}\n{tail}")]
    BuildFailed {
        name: String,
        stage: Stage,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{stage} {name}: the builder succeeded but wrote no output at $out")]
    NoOutput { name: String, stage: Stage },
    #[error("{0} is not a derivation of this graph")]
    UnknownTarget(DrvHash),
    #[error("substituting {name} from {url} failed: {source}")]
    Substitute {
        hash: DrvHash,
        name: String,
        url: String,
        #[source]
        source: Box<SubstituteError>,
    },
}

/// Why a substitute could not be used: its download failed, or what came down does not
/// register (its content hash is not the signed one).
#[derive(Debug, thiserror::Error)]
pub enum SubstituteError {
    #[error(transparent)]
    Fetch(#[from] rbuild_store::cache::CacheError),
    #[error(transparent)]
    Register(#[from] rbuild_store::StoreError),
}

/// The binary caches a realise may substitute from and push to.
#[derive(Default, Clone)]
pub struct Caches {
    pub substituters: Vec<Arc<dyn BinaryCache>>,
    pub trusted: Vec<PublicKey>,
    pub push: Option<(Arc<dyn BinaryCache>, Arc<SecretKey>)>,
}

/// What one `realise` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub output: PathBuf,
    /// Derivations executed by this run (fetches included).
    pub built: usize,
    /// Derivations whose output came from a binary cache.
    pub substituted: usize,
    /// Derivations that were already valid in the store.
    pub reused: usize,
    /// Bytes the fetch derivations downloaded (from the mirror).
    pub fetched_bytes: u64,
    /// Bytes of the outputs substituted from binary caches.
    pub substituted_bytes: u64,
    /// When each derivation built or substituted ran (for `--timings`).
    #[serde(skip)]
    pub timings: Vec<crate::timings::Timing>,
    /// For each derivation that substituters were asked for and could not give, why, cache by
    /// cache (for `--explain`).
    #[serde(skip)]
    pub not_substituted: BTreeMap<DrvHash, String>,
}

/// `target` and what it needs, down to (not including) what `store` has a valid output of: what
/// a realise builds or substitutes.
pub fn unbuilt(
    store: &Store,
    graph: &Graph,
    target: &DrvHash,
) -> Result<Vec<DrvHash>, EngineError> {
    let mut unbuilt = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![target.clone()];
    while let Some(h) = stack.pop() {
        if !seen.insert(h.clone()) || store.valid_output(&h.0)?.is_some() {
            continue;
        }
        if let Some(drv) = graph.get(&h) {
            stack.extend(graph.needs(drv));
        }
        unbuilt.push(h);
    }
    Ok(unbuilt)
}

pub struct Engine {
    store: Arc<Store>,
    exe: PathBuf,
    fetcher: Fetcher,
    jobs: usize,
    progress: Arc<Progress>,
    idmap: OnceLock<Result<IdMap, Arc<SandboxError>>>,
    /// The walls around builds' untrusted commands: all of them, but in rbuild's own tests.
    walls: sandbox::Walls,
    /// What each sandboxed build step may use.
    limits: sandbox::Limits,
    caches: Caches,
    /// Derivations the current plan takes from a cache: substituter index and verified entry.
    substitutes: Mutex<HashMap<DrvHash, (usize, CacheEntry)>>,
    /// Cache entries that failed to substitute in this run: built locally instead.
    refused: Mutex<HashSet<DrvHash>>,
    /// Caches already warned about in this run.
    warned: Mutex<HashSet<String>>,
    /// Substituters (by index) that failed to answer: not asked again.
    dead: Mutex<HashSet<usize>>,
    /// Answers of substituters asked in one batch before planning.
    prefetched: Mutex<HashMap<(usize, DrvHash), Answer>>,
    /// Why each derivation asked for was not substituted, cache by cache.
    missed: Mutex<HashMap<DrvHash, Vec<String>>>,
}

enum Outcome {
    Built,
    Substituted,
    Reused,
}

impl Engine {
    /// `exe` is the rbuild binary the sandbox re-executes (normally `/proc/self/exe`).
    pub fn new(
        store: Arc<Store>,
        exe: PathBuf,
        fetcher: Fetcher,
        jobs: usize,
        progress: Arc<Progress>,
    ) -> Engine {
        Engine {
            store,
            exe,
            fetcher,
            jobs: jobs.max(1),
            progress,
            idmap: OnceLock::new(),
            walls: sandbox::Walls::default(),
            limits: sandbox::Limits::default(),
            caches: Caches::default(),
            substitutes: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashSet::new()),
            warned: Mutex::new(HashSet::new()),
            dead: Mutex::new(HashSet::new()),
            prefetched: Mutex::new(HashMap::new()),
            missed: Mutex::new(HashMap::new()),
        }
    }

    /// Keep only these walls up (rbuild's tests prove that each holds alone).
    pub fn with_walls(mut self, walls: sandbox::Walls) -> Engine {
        self.walls = walls;
        self
    }

    /// Stop any build step that reaches one of these limits.
    pub fn with_limits(mut self, limits: sandbox::Limits) -> Engine {
        self.limits = limits;
        self
    }

    /// Substitute from and push to these binary caches.
    pub fn with_caches(mut self, caches: Caches) -> Engine {
        self.caches = caches;
        self
    }

    /// Record `why` a cache did not give `h` (once), for `--explain`.
    fn missed_because(&self, h: &DrvHash, why: String) {
        let mut missed = self.missed.lock().expect("lock");
        let whys = missed.entry(h.clone()).or_default();
        if !whys.contains(&why) {
            whys.push(why);
        }
    }

    /// The first substituter with a trusted entry for `h`. Untrusted, unreadable or unreachable
    /// caches are reported and skipped: the derivation is then built.
    fn find_substitute(&self, h: &DrvHash, name: &str) -> Option<(usize, CacheEntry)> {
        if self.refused.lock().expect("lock").contains(h) {
            return None;
        }
        let miss = |why: String| self.missed_because(h, why);
        for (i, cache) in self.caches.substituters.iter().enumerate() {
            if self.dead.lock().expect("lock").contains(&i) {
                miss(format!(
                    "{}: not asked (it failed earlier in this run)",
                    cache.url()
                ));
                continue;
            }
            let prefetched = self
                .prefetched
                .lock()
                .expect("lock")
                .remove(&(i, h.clone()));
            let answer = match prefetched {
                Some(answer) => answer,
                None => rbuild_store::cache::query(cache.as_ref(), &h.0, &self.caches.trusted),
            };
            match answer {
                Ok(Some(entry)) => return Some((i, entry)),
                Ok(None) => miss(format!("{}: no entry", cache.url())),
                Err(e) => {
                    // A cache that cannot be reached is not asked again in this run; a refused
                    // entry is reported once per cache (each is refused all the same).
                    let unreachable =
                        !matches!(e, rbuild_store::cache::CacheError::BadEntry { .. });
                    if unreachable {
                        self.dead.lock().expect("lock").insert(i);
                    }
                    // Backend errors name the cache themselves.
                    let why = match &e {
                        rbuild_store::cache::CacheError::Backend { source, .. } => {
                            crate::errors::chain(source.as_ref())
                        }
                        other => crate::errors::chain(other),
                    };
                    miss(format!(
                        "{}: {}: {why}",
                        cache.url(),
                        if unreachable {
                            "failed"
                        } else {
                            "its entry was refused"
                        },
                    ));
                    if self
                        .warned
                        .lock()
                        .expect("lock")
                        .insert(cache.url().to_owned())
                    {
                        self.progress.line(&format!(
                            "warning: binary cache {}: asking for {name}: {why}; {}",
                            cache.url(),
                            if unreachable {
                                "not using this cache in this run, building instead"
                            } else {
                                "building instead (other refused entries of this cache are not reported)"
                            }
                        ));
                    }
                }
            }
        }
        None
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// How many sandboxed builds run at once.
    pub(crate) fn jobs(&self) -> usize {
        self.jobs
    }

    pub(crate) fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// The content hash the first substituter with a trusted entry for `h` claims, and its URL.
    pub(crate) fn cache_claim(&self, h: &DrvHash, name: &str) -> Option<(String, String)> {
        let (i, entry) = self.find_substitute(h, name)?;
        Some((
            self.caches.substituters[i].url().to_owned(),
            entry.body.content_hash,
        ))
    }

    fn idmap(&self) -> Result<IdMap, EngineError> {
        self.idmap
            .get_or_init(|| sandbox::check_support().map_err(Arc::new))
            .clone()
            .map_err(EngineError::SandboxSupport)
    }

    /// Remove scratch directories of killed builds that hold files of subordinate ids.
    pub fn clean_leftovers(&self) {
        if self.store.leftovers().is_empty() {
            return;
        }
        if let Ok(map) = self.idmap() {
            for p in self.store.leftovers() {
                let _ = sandbox::remove_as_mapped_root(&self.exe, p, &map);
                let _ = std::fs::remove_file(rbuild_store::lock_of(p));
            }
        }
    }

    /// Ask each substituter in one batch about everything `target` would need built, unless it
    /// has `target` itself (then planning stops there after one question). Answers are kept for
    /// [`Engine::find_substitute`]; a cache that fails here is asked again (and reported) there.
    fn prefetch(&self, graph: &Graph, target: &DrvHash) -> Result<(), EngineError> {
        if self.caches.substituters.is_empty() {
            return Ok(());
        }
        let unbuilt = unbuilt(&self.store, graph, target)?;
        let trusted = &self.caches.trusted;
        for (i, cache) in self.caches.substituters.iter().enumerate() {
            let Ok(top) = rbuild_store::cache::query(cache.as_ref(), &target.0, trusted) else {
                continue;
            };
            let mut prefetched = self.prefetched.lock().expect("lock");
            if top.is_some() {
                prefetched.insert((i, target.clone()), Ok(top));
                continue;
            }
            let hashes: Vec<String> = unbuilt.iter().map(|h| h.0.clone()).collect();
            if let Ok(answers) = rbuild_store::cache::query_many(cache.as_ref(), &hashes, trusted) {
                for (h, a) in unbuilt.iter().zip(answers) {
                    prefetched.insert((i, h.clone()), a);
                }
            }
        }
        Ok(())
    }

    /// The derivations `target` needs built (not yet valid), and how many valid ones the walk met
    /// (not counting those `produced` by this run).
    fn plan(
        &self,
        graph: &Graph,
        target: &DrvHash,
        produced: &HashSet<DrvHash>,
    ) -> Result<(HashSet<DrvHash>, usize), EngineError> {
        let mut needed = HashSet::new();
        let mut seen = HashSet::new();
        let mut reused = 0;
        let mut stack = vec![target.clone()];
        while let Some(h) = stack.pop() {
            if !seen.insert(h.clone()) {
                continue;
            }
            let drv = graph
                .get(&h)
                .ok_or_else(|| EngineError::UnknownTarget(h.clone()))?;
            if self.store.valid_output(&h.0)?.is_some() {
                if !produced.contains(&h) {
                    reused += 1;
                }
                continue;
            }
            needed.insert(h.clone());
            // As in Nix: what a cache has is fetched, and its build-time inputs are not needed.
            if let Some(sub) = self.find_substitute(&h, &drv.name) {
                self.substitutes
                    .lock()
                    .expect("lock")
                    .insert(h.clone(), sub);
                continue;
            }
            stack.extend(graph.needs(drv));
        }
        Ok((needed, reused))
    }

    /// Build (or substitute) whatever `target` needs and return its output. A cache entry that
    /// turns out bad while downloading is reported and the plan is made again without it.
    pub async fn realise(
        self: &Arc<Self>,
        graph: Arc<Graph>,
        target: &DrvHash,
    ) -> Result<Report, EngineError> {
        self.clean_leftovers();
        // Counted over every attempt: what an attempt built stays built after a replan.
        let mut report = Report::default();
        let mut produced = HashSet::new();
        let t0 = std::time::Instant::now();
        loop {
            match self
                .realise_once(graph.clone(), target, &mut report, &mut produced, t0)
                .await
            {
                Ok(()) => {
                    let missed = std::mem::take(&mut *self.missed.lock().expect("lock"));
                    report.not_substituted = missed
                        .into_iter()
                        .map(|(h, whys)| (h, whys.join("; ")))
                        .collect();
                    return Ok(report);
                }
                Err(EngineError::Substitute {
                    hash,
                    name,
                    url,
                    source,
                }) => {
                    let why = crate::errors::chain(source.as_ref());
                    self.progress.line(&format!(
                        "warning: {url}: refused the output of {name}: {why}; building it instead"
                    ));
                    self.missed_because(&hash, format!("{url}: its output was refused: {why}"));
                    self.refused.lock().expect("lock").insert(hash);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: plan, then build what the plan needs, adding to `report` and `produced`.
    async fn realise_once(
        self: &Arc<Self>,
        graph: Arc<Graph>,
        target: &DrvHash,
        report: &mut Report,
        produced: &mut HashSet<DrvHash>,
        t0: std::time::Instant,
    ) -> Result<(), EngineError> {
        self.substitutes.lock().expect("lock").clear();
        let (needed, mut reused) = tokio::task::block_in_place(|| {
            self.prefetch(&graph, target)?;
            self.plan(&graph, target, produced)
        })?;
        self.prefetched.lock().expect("lock").clear();
        if !needed.is_empty() {
            let mut counts = BTreeMap::new();
            for h in &needed {
                let stage = graph.get(h).map(|d| d.stage).unwrap_or(Stage::Pack);
                *counts.entry(stage).or_insert(0) += 1;
            }
            self.progress.plan(&counts);
            // Downloads are I/O bound and get their own slots. Sandboxed builds share the -j
            // budget. Each kind of slot goes to the ready derivation that matters most (see
            // `BuildOrder`): the index that verify and configure wait for is not queued behind
            // a hundred `.deb`s.
            let mut free_fetches = FETCH_SLOTS;
            let mut free_builds = self.jobs.max(1);
            let mut order = BuildOrder::new(&graph, &needed)?;
            let mut fetch_order = order.clone();
            let mut pending: HashMap<DrvHash, usize> = HashMap::new();
            let mut ready = Vec::new();
            for h in &needed {
                let drv = graph.get(h).expect("planned from the graph");
                let n = graph
                    .needs(drv)
                    .iter()
                    .filter(|i| needed.contains(*i))
                    .collect::<HashSet<_>>()
                    .len();
                if n == 0 {
                    ready.push(h.clone());
                } else {
                    pending.insert(h.clone(), n);
                }
            }
            let mut tasks = JoinSet::new();
            let mut first_error = None;
            loop {
                if first_error.is_none() {
                    let mut start = Vec::new();
                    for h in ready.drain(..) {
                        if graph.get(&h).expect("planned").uses_network() {
                            fetch_order.push(h, 0);
                        } else {
                            let bytes = order.input_bytes(&h, &self.store);
                            order.push(h, bytes);
                        }
                    }
                    while free_fetches > 0 {
                        let Some(h) = fetch_order.pop() else {
                            break;
                        };
                        free_fetches -= 1;
                        start.push(h);
                    }
                    while free_builds > 0 {
                        let Some(h) = order.pop() else {
                            break;
                        };
                        free_builds -= 1;
                        start.push(h);
                    }
                    for h in start {
                        let drv = graph.get(&h).expect("planned").clone();
                        let emulator = graph.emulator_for(&drv).cloned();
                        let this = Arc::clone(self);
                        tasks.spawn(async move {
                            this.progress.started(drv.stage, &drv.name);
                            let started = std::time::Instant::now();
                            let r = this.build_one(&h, &drv, emulator.as_ref()).await;
                            tracing::debug!(stage = %drv.stage, name = %drv.name, secs = started.elapsed().as_secs_f64(), "built");
                            let span = (
                                started.duration_since(t0).as_secs_f64(),
                                t0.elapsed().as_secs_f64(),
                            );
                            (h, drv, r, span)
                        });
                    }
                }
                let Some(joined) = tasks.join_next().await else {
                    break;
                };
                let (h, drv, r, (start, end)) = joined.expect("build task does not panic");
                if drv.uses_network() {
                    free_fetches += 1;
                } else {
                    free_builds += 1;
                }
                match r {
                    Ok((outcome, bytes)) => {
                        let outcome_name = match outcome {
                            Outcome::Built => Some("built"),
                            Outcome::Substituted => Some("substituted"),
                            Outcome::Reused => None,
                        };
                        if let Some(outcome) = outcome_name {
                            report.timings.push(crate::timings::Timing {
                                hash: h.0.clone(),
                                name: drv.name.clone(),
                                stage: drv.stage,
                                outcome,
                                start,
                                end,
                                deps: graph
                                    .needs(&drv)
                                    .iter()
                                    .filter(|i| needed.contains(*i))
                                    .map(|i| i.0.clone())
                                    .collect(),
                            });
                        }
                        match outcome {
                            Outcome::Built => {
                                report.built += 1;
                                report.fetched_bytes += bytes;
                                produced.insert(h.clone());
                            }
                            Outcome::Substituted => {
                                report.substituted += 1;
                                report.substituted_bytes += bytes;
                                produced.insert(h.clone());
                            }
                            Outcome::Reused => reused += 1,
                        }
                        self.progress.finished(drv.stage, &drv.name, bytes);
                        for dep in graph.dependents(&h) {
                            if let Some(n) = pending.get_mut(&dep) {
                                *n -= 1;
                                if *n == 0 {
                                    pending.remove(&dep);
                                    ready.push(dep);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        self.progress.failed(drv.stage, &drv.name);
                        if first_error.is_none() {
                            first_error = Some(e);
                        }
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        report.reused = reused;
        report.output = self
            .store
            .valid_output(&target.0)?
            .ok_or_else(|| EngineError::UnknownTarget(target.clone()))?
            .path;
        Ok(())
    }

    /// Build, substitute or (built meanwhile by another process) reuse `drv`; with the bytes
    /// that moved for it: downloaded by a fetch, or substituted from a cache.
    async fn build_one(
        &self,
        hash: &DrvHash,
        drv: &Derivation,
        emulator: Option<&crate::graph::Emulator>,
    ) -> Result<(Outcome, u64), EngineError> {
        let store = self.store.clone();
        let h = hash.0.clone();
        let _lock = tokio::task::spawn_blocking(move || store.lock_derivation(&h))
            .await
            .expect("lock task")?;
        if self.store.valid_output(&hash.0)?.is_some() {
            return Ok((Outcome::Reused, 0));
        }
        let label: String = drv.output_name().chars().take(40).collect();
        let build_dir = self.store.new_build_dir(&label)?;
        let record = DrvRecord {
            hash: hash.0.clone(),
            name: drv.output_name(),
            stage: drv.stage.to_string(),
            json: drv.canonical_json(),
            inputs: drv.inputs.iter().map(|i| i.0.clone()).collect(),
        };
        let substitute = self.substitutes.lock().expect("lock").get(hash).cloned();
        if let Some((i, entry)) = substitute {
            let cache = self.caches.substituters[i].clone();
            let store = self.store.clone();
            let out = build_dir.path().join("out");
            let fail = |source: SubstituteError| EngineError::Substitute {
                hash: hash.clone(),
                name: drv.name.clone(),
                url: cache.url().to_owned(),
                source: Box::new(source),
            };
            let cache2 = cache.clone();
            let bytes: u64 = entry
                .body
                .nodes
                .iter()
                .map(|n| match n {
                    rbuild_store::cache::CacheNode::File { size, .. } => *size,
                    _ => 0,
                })
                .sum();
            tokio::task::spawn_blocking(move || -> Result<_, SubstituteError> {
                rbuild_store::cache::fetch(cache2.as_ref(), &entry, &out)?;
                Ok(store.register_expecting(&record, &out, Some(&entry.body.content_hash))?)
            })
            .await
            .expect("substitute task")
            .map_err(fail)?;
            drop(build_dir);
            return Ok((Outcome::Substituted, bytes));
        }
        let (built, fetched) = match &drv.fixed_output {
            Some(fo) => {
                let out = build_dir.path().join("out");
                let rel = drv.args.first().map(String::as_str).unwrap_or_default();
                self.fetcher.fetch_fixed(rel, fo, &out).await?;
                let fetched = size_of(&out);
                (out, fetched)
            }
            None => (
                self.run_sandboxed(
                    hash,
                    drv,
                    emulator,
                    build_dir.path(),
                    build_dir.lock_fd(),
                    "log",
                )
                .await?,
                0,
            ),
        };
        let store = self.store.clone();
        let out = tokio::task::spawn_blocking(move || store.register(&record, &built))
            .await
            .expect("register task")?;
        drop(build_dir);
        if let Some((cache, key)) = self.caches.push.clone() {
            let (h, name, out2) = (hash.0.clone(), drv.output_name(), out.clone());
            let pushed = tokio::task::spawn_blocking(move || {
                rbuild_store::cache::push(
                    cache.as_ref(),
                    &key,
                    &h,
                    &name,
                    &out2.content_hash,
                    &out2.path,
                )
            })
            .await
            .expect("push task");
            if let Err(e) = pushed {
                self.progress
                    .line(&format!("warning: pushing {}: {e}", drv.name));
            }
        }
        Ok((Outcome::Built, fetched))
    }

    /// Run `drv`'s builder in the sandbox in `build_dir`; its output is left at
    /// `build_dir/build/out`, its log kept as `<store>/log/<hash>.<log_kind>`.
    pub(crate) async fn run_sandboxed(
        &self,
        hash: &DrvHash,
        drv: &Derivation,
        emulator: Option<&crate::graph::Emulator>,
        build_dir: &Path,
        hold: std::os::fd::RawFd,
        log_kind: &str,
    ) -> Result<PathBuf, EngineError> {
        let map = self.idmap()?;
        let mut inputs = Vec::new();
        for i in &drv.inputs {
            let out = self
                .store
                .valid_output(&i.0)?
                .ok_or_else(|| EngineError::UnknownTarget(i.clone()))?;
            let name = out
                .path
                .file_name()
                .expect("store paths have names")
                .to_string_lossy()
                .into_owned();
            inputs.push((out.path, name));
        }
        let mut env: BTreeMap<String, String> = sandbox::fixed_env().into_iter().collect();
        env.extend(drv.env.clone());
        let spec = SandboxSpec {
            build_dir: build_dir.to_owned(),
            inputs,
            network: false,
            builder: drv.builder.clone(),
            args: drv.args.clone(),
            env: env.into_iter().collect(),
            walls: self.walls,
            limits: self.limits,
            emulator: match emulator {
                Some(em) => {
                    let out = self
                        .store
                        .valid_output(&em.drv.0)?
                        .ok_or_else(|| EngineError::UnknownTarget(em.drv.clone()))?;
                    Some(sandbox::EmulatorSpec {
                        name: em.name.clone(),
                        interpreter: out.path.join(&em.interpreter),
                        magic: em.magic.clone(),
                        mask: em.mask.clone(),
                        host_registered: sandbox::EmulatorSpec::registered_on_host(&em.name),
                    })
                }
                None => None,
            },
        };
        let exe = self.exe.clone();
        let log = build_dir.join("log");
        let log2 = log.clone();
        let map2 = map.clone();
        let result = tokio::task::spawn_blocking(move || {
            sandbox::run(&exe, &spec, &map2, &log2, Some(hold))
        })
        .await
        .expect("sandbox task")?;
        let out = build_dir.join("build").join("out");
        // Every build's log is kept beside the store (`<store>/log/<hash>.log`), like `nix log`.
        let kept = self
            .store
            .root()
            .join("log")
            .join(format!("{}.{log_kind}", hash.0));
        let _ = std::fs::create_dir_all(kept.parent().expect("log dir"));
        let _ = std::fs::copy(&log, &kept);
        if !result.success {
            // The builder may have left files owned by subordinate ids.
            let _ = sandbox::remove_as_mapped_root(&self.exe, &build_dir.join("build"), &map);
            return Err(EngineError::BuildFailed {
                name: drv.name.clone(),
                stage: drv.stage,
                status: result.status,
                log: kept,
                tail: result.stderr_tail,
            });
        }
        if std::fs::symlink_metadata(&out).is_err() {
            return Err(EngineError::NoOutput {
                name: drv.name.clone(),
                stage: drv.stage,
            });
        }
        Ok(out)
    }
}

fn size_of(p: &Path) -> u64 {
    std::fs::metadata(p)
        .map(|m| if m.is_file() { m.len() } else { 0 })
        .unwrap_or(0)
}

/// How many downloads run at once.
const FETCH_SLOTS: usize = 24;

/// The order in which ready builds take the build slots (and downloads the download slots):
/// first the one with the longest chain of builds still to come above it (the critical path:
/// with two slots and a hundred unpacks ready, the index that configure also waits for must not
/// queue behind them all), then the one with the most input bytes (the longest first, as list
/// scheduling does), then the order in which they became ready.
#[derive(Clone)]
struct BuildOrder {
    /// How many derivations still to build lie on the longest path from each to the target.
    height: HashMap<DrvHash, usize>,
    queue: std::collections::BinaryHeap<(usize, u64, std::cmp::Reverse<u64>, DrvHash)>,
    seq: u64,
    graph: Arc<Graph>,
}

impl BuildOrder {
    fn new(graph: &Arc<Graph>, needed: &HashSet<DrvHash>) -> Result<BuildOrder, EngineError> {
        // Users before their inputs; an emulator counts as an input of what runs under it.
        let mut height: HashMap<DrvHash, usize> = HashMap::new();
        for h in graph.topo_order()?.into_iter().rev() {
            if !needed.contains(&h) {
                continue;
            }
            let here = *height.entry(h.clone()).or_insert(0);
            let Some(drv) = graph.get(&h) else {
                continue;
            };
            for i in graph.needs(drv) {
                if needed.contains(&i) {
                    let h = height.entry(i).or_insert(0);
                    *h = (*h).max(here + 1);
                }
            }
        }
        Ok(BuildOrder {
            height,
            queue: Default::default(),
            seq: 0,
            graph: graph.clone(),
        })
    }

    /// The bytes of `h`'s inputs that are files (a tree counts nothing: sizing it means
    /// walking it).
    fn input_bytes(&self, h: &DrvHash, store: &Store) -> u64 {
        self.graph.get(h).map_or(0, |drv| {
            drv.inputs
                .iter()
                .filter_map(|i| store.valid_output(&i.0).ok().flatten())
                .filter_map(|o| std::fs::symlink_metadata(&o.path).ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
    }

    fn push(&mut self, h: DrvHash, bytes: u64) {
        let height = self.height.get(&h).copied().unwrap_or(0);
        self.seq += 1;
        self.queue
            .push((height, bytes, std::cmp::Reverse(self.seq), h));
    }

    fn pop(&mut self) -> Option<DrvHash> {
        self.queue.pop().map(|(.., h)| h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str, inputs: &[&DrvHash]) -> Derivation {
        crate::graph::tests::d(name, inputs.iter().map(|h| (*h).clone()).collect())
    }

    #[test]
    fn builds_start_by_critical_path_then_input_bytes_then_readiness() {
        let mut g = Graph::new();
        let index = g.add(d("index", &[])).unwrap();
        let unpacks: Vec<DrvHash> = (0..4)
            .map(|i| g.add(d(&format!("unpack{i}"), &[&index])).unwrap())
            .collect();
        let available = g.add(d("available", &[&index])).unwrap();
        let mut inputs: Vec<&DrvHash> = unpacks.iter().collect();
        inputs.push(&available);
        let configure = g.add(d("configure", &inputs)).unwrap();
        let pack = g.add(d("pack", &[&configure])).unwrap();
        // Beside them, a chain's end: as close to its target as configure is.
        let side = g.add(d("side", &[&index])).unwrap();
        let g = Arc::new(g);
        let mut needed: HashSet<DrvHash> = g.topo_order().unwrap().into_iter().collect();
        needed.remove(&index);
        let mut order = BuildOrder::new(&g, &needed).unwrap();
        assert_eq!(order.height[&pack], 0);
        assert_eq!(order.height[&configure], 1);
        assert_eq!(order.height[&available], 2);
        assert_eq!(order.height[&side], 0);
        // Ready in this order: the side build, the unpacks (two the same size), available.
        order.push(side.clone(), 1 << 30);
        for (u, bytes) in unpacks.iter().zip([10, 30, 20, 30]) {
            order.push(u.clone(), bytes);
        }
        order.push(available.clone(), 5);
        let popped: Vec<DrvHash> = std::iter::from_fn(|| order.pop()).collect();
        let want = [
            &unpacks[1],
            &unpacks[3],
            &unpacks[2],
            &unpacks[0],
            &available,
            &side,
        ];
        assert_eq!(popped, want.map(Clone::clone));
    }
}
