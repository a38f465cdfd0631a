//! Repairing damaged outputs from the store alone.
//!
//! The store keeps every registered derivation's canonical JSON and inputs, so a damaged output
//! can be built again without its recipe: the closure is read back into a [`Graph`], the damaged
//! output is invalidated (its row first, then its files go), and the normal realise path builds
//! it — or substitutes it from the configured caches — reusing every input that is still valid.
//! The result must hash to what was registered before: anything else is reported as not
//! reproducible.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::derivation::{Derivation, DrvHash};
use crate::graph::Graph;
use crate::scheduler::{Engine, EngineError};

/// Why a derivation cannot be read back from the store.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{0}: the store has no derivation recorded for it (an input of what is repaired), so it cannot be built again")]
    Missing(String),
    #[error("{hash}: the store's record is not a derivation this rbuild reads: {msg}")]
    Unreadable { hash: String, msg: String },
    #[error("{hash}: the store's record hashes to {actual} here (written by a different rbuild version?), so it cannot be built again")]
    HashMismatch { hash: String, actual: String },
    #[error(transparent)]
    Store(#[from] rbuild_store::StoreError),
}

/// What repairing one output came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairResult {
    /// Built (or substituted) again, with the content hash it was registered with.
    Repaired,
    /// Built again, but it hashes to `rebuilt`, not to what was registered: the derivation is
    /// not reproducible (the new output stays registered).
    NotReproducible { rebuilt: String },
    /// It could not be built again (the output stays invalid if it was invalidated).
    Failed(String),
}

/// The repair of one damaged output.
#[derive(Debug, Clone)]
pub struct Repaired {
    pub drv_hash: String,
    /// The content hash it was registered with.
    pub registered: String,
    pub result: RepairResult,
}

/// Read derivation `hash` and everything it needs back from the store into `graph`.
fn load(
    store: &rbuild_store::Store,
    hash: &str,
    graph: &mut Graph,
    done: &mut HashSet<String>,
) -> Result<(), RecordError> {
    // Iterative post-order: a derivation goes into the graph after its inputs.
    let mut stack: Vec<(String, bool)> = vec![(hash.to_owned(), false)];
    let mut pending: HashMap<String, Derivation> = HashMap::new();
    while let Some((h, inputs_added)) = stack.pop() {
        if done.contains(&h) {
            continue;
        }
        if inputs_added {
            let drv = pending.remove(&h).expect("read before its inputs");
            graph.add(drv).map_err(|e| RecordError::Unreadable {
                hash: h.clone(),
                msg: e.to_string(),
            })?;
            done.insert(h);
            continue;
        }
        if pending.contains_key(&h) {
            continue;
        }
        let rec = store
            .derivation(&h)?
            .ok_or_else(|| RecordError::Missing(h.clone()))?;
        let drv: Derivation =
            serde_json::from_str(&rec.json).map_err(|e| RecordError::Unreadable {
                hash: h.clone(),
                msg: e.to_string(),
            })?;
        let actual = drv.hash();
        if actual.0 != h {
            return Err(RecordError::HashMismatch {
                hash: h,
                actual: actual.0,
            });
        }
        stack.push((h.clone(), true));
        for i in &drv.inputs {
            if !done.contains(&i.0) {
                stack.push((i.0.clone(), false));
            }
        }
        pending.insert(h, drv);
    }
    Ok(())
}

impl Engine {
    /// Build the outputs of `damaged` (derivation hashes) again from what the store recorded,
    /// and check each against the content hash it was registered with.
    ///
    /// Each one whose derivation can be read back is invalidated first (so the build does not
    /// reuse it); then each is realised through the normal path: substituted if a configured
    /// cache has it, otherwise built, with the inputs that are valid reused. Outputs the store
    /// holds no usable record for are left as they are and reported as failed.
    pub async fn repair(
        self: &Arc<Self>,
        damaged: &[String],
    ) -> Result<Vec<Repaired>, EngineError> {
        let store = self.store().clone();
        let mut graph = Graph::new();
        let mut done = HashSet::new();
        let mut results: Vec<Repaired> = Vec::new();
        let mut targets = Vec::new();
        for h in damaged {
            let Some(registered) = store.valid_output(h)?.map(|o| o.content_hash) else {
                results.push(Repaired {
                    drv_hash: h.clone(),
                    registered: String::new(),
                    result: RepairResult::Failed("it is not a valid output of this store".into()),
                });
                continue;
            };
            let loaded = tokio::task::block_in_place(|| load(&store, h, &mut graph, &mut done));
            match loaded {
                Ok(()) => targets.push((h.clone(), registered)),
                Err(e) => results.push(Repaired {
                    drv_hash: h.clone(),
                    registered,
                    result: RepairResult::Failed(e.to_string()),
                }),
            }
        }
        // Every damaged output goes before any is built: one may be an input of another.
        for (h, _) in &targets {
            tokio::task::block_in_place(|| store.invalidate(h))?;
        }
        let graph = Arc::new(graph);
        for (h, registered) in targets {
            let result = match self.realise(graph.clone(), &DrvHash(h.clone())).await {
                Err(e) => RepairResult::Failed(e.to_string()),
                Ok(_) => match store.valid_output(&h)? {
                    Some(o) if o.content_hash == registered => RepairResult::Repaired,
                    Some(o) => RepairResult::NotReproducible {
                        rebuilt: o.content_hash,
                    },
                    None => RepairResult::Failed("realised, but not registered".into()),
                },
            };
            results.push(Repaired {
                drv_hash: h,
                registered,
                result,
            });
        }
        // In the order asked.
        let order: HashMap<&String, usize> =
            damaged.iter().enumerate().map(|(i, h)| (h, i)).collect();
        results.sort_by_key(|r| order.get(&r.drv_hash).copied().unwrap_or(usize::MAX));
        Ok(results)
    }
}
