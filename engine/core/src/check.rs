//! `rbuild check`: build a realised output's derivations again from their registered inputs,
//! into scratch, and compare what comes out with what is registered — with
//! [`rbuild_store::verify`]'s comparison, the one `rbuild store verify` uses — and with what a
//! binary cache claims for them. Nothing registered is replaced: a rebuild is thrown away.
//!
//! Fetches are not fetched again: their outputs are fixed by the sha256 the lock pins, checked
//! when they were registered.

use std::collections::HashSet;
use std::sync::Arc;

use rbuild_store::hash;
use rbuild_store::meta::{self, TreeMeta};
use rbuild_store::verify::{self, Damage};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::derivation::{Derivation, DrvHash};
use crate::graph::{Emulator, Graph};
use crate::scheduler::{Engine, EngineError};

/// A path that differs between the registered output and the rebuild.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathDiff {
    pub path: String,
    /// What the listing says changed (`contents changed`, `mode or owner changed`, …).
    pub change: String,
    /// Both sides described, and the lines that differ for text files.
    pub details: Vec<String>,
}

/// What rebuilding one derivation came to.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum CheckResult {
    /// The rebuild hashes to the registered content hash (and to the cache's, if one has it).
    Reproduced,
    /// The rebuild hashes to `rebuilt`; `paths` name what differs from the registered output
    /// (at most [`MAX_PATHS`]; `more` counts the rest).
    Differs {
        rebuilt: String,
        paths: Vec<PathDiff>,
        more: usize,
    },
    /// The rebuild reproduces the registered output, but a cache's signed entry claims another
    /// content hash.
    CacheDiffers { cache: String, claimed: String },
    /// It could not be built again.
    Failed { error: String },
}

/// How many differing paths a report names per derivation.
pub const MAX_PATHS: usize = 20;

/// The check of one derivation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rechecked {
    pub drv_hash: String,
    pub name: String,
    /// The content hash it is registered with.
    pub registered: String,
    #[serde(flatten)]
    pub result: CheckResult,
}

impl Engine {
    /// Realise `target`, then build every derivation of its closure that is not a fetch again,
    /// from the registered outputs of its inputs (realising any input the store lacks, as after
    /// a substitution), and compare. Results come in topological order (inputs first), so the
    /// first that differs is where a difference starts.
    pub async fn check(
        self: &Arc<Self>,
        graph: Arc<Graph>,
        target: &DrvHash,
    ) -> Result<Vec<Rechecked>, EngineError> {
        self.realise(graph.clone(), target).await?;
        let closure = closure(&graph, target)?;
        let order: Vec<DrvHash> = graph
            .topo_order()?
            .into_iter()
            .filter(|h| closure.contains(h))
            .filter(|h| graph.get(h).is_some_and(|d| d.fixed_output.is_none()))
            .collect();
        for h in &order {
            let drv = graph.get(h).expect("in the graph");
            for input in graph.needs(drv) {
                if self.store().valid_output(&input.0)?.is_none() {
                    self.realise(graph.clone(), &input).await?;
                }
            }
        }
        let slots = Arc::new(Semaphore::new(self.jobs()));
        let mut tasks = JoinSet::new();
        for (i, h) in order.iter().enumerate() {
            let drv = graph.get(h).expect("in the graph").clone();
            let emulator = graph.emulator_for(&drv).cloned();
            let (this, slots, h) = (Arc::clone(self), slots.clone(), h.clone());
            tasks.spawn(async move {
                let _slot = slots.acquire_owned().await.expect("semaphore open");
                this.progress().started(drv.stage, &drv.name);
                let r = this.recheck(&h, &drv, emulator.as_ref()).await;
                this.progress().finished(drv.stage, &drv.name, 0);
                (i, r)
            });
        }
        // Every task is waited for, even after an error: a sandbox must not outlive the
        // scratch directory it writes to.
        let mut results: Vec<Option<Rechecked>> = vec![None; order.len()];
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            let (i, r) = joined.expect("check task does not panic");
            match r {
                Ok(r) => results[i] = Some(r),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every task"))
            .collect())
    }

    /// Build `drv` again into scratch and compare.
    async fn recheck(
        &self,
        h: &DrvHash,
        drv: &Derivation,
        emulator: Option<&Emulator>,
    ) -> Result<Rechecked, EngineError> {
        let store = self.store().clone();
        let registered = store
            .valid_output(&h.0)?
            .ok_or_else(|| EngineError::UnknownTarget(h.clone()))?;
        let done = |result| Rechecked {
            drv_hash: h.0.clone(),
            name: drv.name.clone(),
            registered: registered.content_hash.clone(),
            result,
        };
        let label: String = format!("check-{}", drv.output_name())
            .chars()
            .take(40)
            .collect();
        let build_dir = store.new_build_dir(&label)?;
        let built = match self
            .run_sandboxed(
                h,
                drv,
                emulator,
                build_dir.path(),
                build_dir.lock_fd(),
                "check.log",
            )
            .await
        {
            Ok(p) => p,
            Err(e) => {
                return Ok(done(CheckResult::Failed {
                    error: e.to_string(),
                }))
            }
        };
        let recorded = store.listing(&h.0, &registered.content_hash)?;
        let (reg_path, reg_hash) = (registered.path.clone(), registered.content_hash.clone());
        let compared = tokio::task::spawn_blocking(move || {
            let opts = hash::Options {
                list: true,
                sha256: false,
            };
            let (hashed, built_meta, _) = verify::rehash(&built, &opts, &mut |_| Ok(()))?;
            let damage = verify::compare(&reg_hash, recorded.as_ref(), &hashed);
            let Some(Damage::Differs { actual, changes }) = damage else {
                return Ok::<_, rbuild_store::StoreError>(None);
            };
            let reg_meta = read_meta(&reg_path)?;
            // Without a recorded listing (outputs registered by an older rbuild), diff the
            // fresh listings of both sides.
            let changes = match changes {
                Some(c) => c,
                None => {
                    let (was, _, _) = verify::rehash(&reg_path, &opts, &mut |_| Ok(()))?;
                    was.listing.diff(&hashed.listing)
                }
            };
            let more = changes.len().saturating_sub(MAX_PATHS);
            let paths = changes
                .iter()
                .take(MAX_PATHS)
                .map(|c| PathDiff {
                    path: c.path.clone(),
                    change: c.change.to_string(),
                    details: verify::explain(
                        &reg_path,
                        reg_meta.as_ref(),
                        &built,
                        built_meta.as_ref(),
                        &c.path,
                    ),
                })
                .collect();
            Ok(Some((actual, paths, more)))
        })
        .await
        .expect("compare task")?;
        drop(build_dir);
        if let Some((rebuilt, paths, more)) = compared {
            return Ok(done(CheckResult::Differs {
                rebuilt,
                paths,
                more,
            }));
        }
        if let Some((cache, claimed)) = self.cache_claim(h, &drv.name) {
            if claimed != registered.content_hash {
                return Ok(done(CheckResult::CacheDiffers { cache, claimed }));
            }
        }
        Ok(done(CheckResult::Reproduced))
    }
}

/// The sidecar of a registered output, if it has one.
fn read_meta(out: &std::path::Path) -> Result<Option<TreeMeta>, rbuild_store::StoreError> {
    let side = meta::sidecar(out);
    if std::fs::symlink_metadata(&side).is_err() {
        return Ok(None);
    }
    TreeMeta::read(&side).map(Some)
}

/// `target` and everything it needs.
fn closure(graph: &Graph, target: &DrvHash) -> Result<HashSet<DrvHash>, EngineError> {
    let mut seen = HashSet::new();
    let mut stack = vec![target.clone()];
    while let Some(h) = stack.pop() {
        if !seen.insert(h.clone()) {
            continue;
        }
        let drv = graph
            .get(&h)
            .ok_or_else(|| EngineError::UnknownTarget(h.clone()))?;
        stack.extend(graph.needs(drv));
    }
    Ok(seen)
}
