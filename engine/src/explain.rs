//! "Why did this rebuild?": `realise --explain` (each derivation a realise builds, and why it
//! could not reuse the one the last realise of the same request used) and `rbuild diff A B`
//! (two derivation graphs compared, the changes that only follow from an input's collapsed).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use rbuild_engine::diff::{self, Difference};
use rbuild_engine::{Derivation, DrvHash, Graph};
use rbuild_store::Store;
use serde::Serialize;

/// The store's record of derivation `hash`, if it has one.
fn recorded(store: &Store, hash: &str) -> Option<Derivation> {
    let record = store.derivation(hash).ok().flatten()?;
    serde_json::from_str(&record.json).ok()
}

/// The name under which the store remembers what a request was last realised as: the recipe
/// (a built-in's name, or a recipe file's absolute path) and the output.
pub fn request_key(recipe: &str, output: Option<&str>) -> String {
    let recipe = match std::fs::canonicalize(recipe) {
        Ok(p) if Path::new(recipe).is_file() => p.display().to_string(),
        _ => recipe.to_owned(),
    };
    format!(
        "{recipe}^{}",
        output.unwrap_or(rbuild_recipes::expand::Expanded::DEFAULT_OUTPUT)
    )
}

/// Why one derivation is built.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub name: String,
    pub hash: String,
    pub reason: String,
    /// With substituters, for a derivation built: why none of them gave it (no entry, a refused
    /// entry or output, a cache that failed), cache by cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_substituted: Option<String>,
}

/// For each derivation of `graph` below `target` that the store has no valid output of (what a
/// realise builds or substitutes), why: compared with the derivation that stood in its place
/// below what `key` was last realised as.
pub fn explain(
    store: &Store,
    graph: &Graph,
    target: &DrvHash,
    key: &str,
) -> anyhow::Result<Vec<Explanation>> {
    let previous = store.last_realised(key)?;
    let now = |h: &str| {
        graph
            .get(&DrvHash(h.to_owned()))
            .cloned()
            .or_else(|| recorded(store, h))
    };
    let then = |h: &str| recorded(store, h);
    // Where each derivation stands in the last realise: the two graphs walked in step.
    let before = match &previous {
        Some(p) => counterparts(p, &target.0, &then, &now),
        None => HashMap::new(),
    };
    let mut out = Vec::new();
    for h in rbuild_engine::scheduler::unbuilt(store, graph, target)? {
        let drv = graph
            .get(&h)
            .with_context(|| format!("derivation {} is not in the graph", h.0))?;
        let reason = match (&previous, before.get(&h.0)) {
            (None, _) => format!("never built: {key} was never realised in this store"),
            (Some(_), None) => {
                format!("never built: nothing stood in its place in the last realise of {key}")
            }
            (Some(_), Some(old)) if *old == h.0 => {
                "the same derivation as last time, but its output is no longer in the store \
                 (collected by gc?)"
                    .to_owned()
            }
            (Some(_), Some(old)) => match diff::compare(old, &h.0, &then, &now) {
                Ok((d, _)) => describe(&d),
                Err(e) => format!("differs from last time ({e})"),
            },
        };
        out.push(Explanation {
            name: drv.name.clone(),
            hash: h.0.clone(),
            reason,
            not_substituted: None,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// For each derivation below `new` (hash → hash), the one that stood in its place below `old`:
/// from the roots down, inputs paired by name and, among equal names (one recipe's
/// architectures), by position — as `diff` pairs them.
fn counterparts(
    old: &str,
    new: &str,
    then: &dyn Fn(&str) -> Option<Derivation>,
    now: &dyn Fn(&str) -> Option<Derivation>,
) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let mut queue = vec![(old.to_owned(), new.to_owned())];
    while let Some((o, n)) = queue.pop() {
        if map.contains_key(&n) {
            continue;
        }
        map.insert(n.clone(), o.clone());
        let (Some(od), Some(nd)) = (then(&o), now(&n)) else {
            continue;
        };
        queue.extend(diff::input_pairs(&od, &nd, then, now));
    }
    map
}

/// One difference as a line: the field and its change, or the inputs it follows from.
fn describe(d: &Difference) -> String {
    let list = |v: &[String]| v.join(", ");
    let mut s = if d.follows {
        format!(
            "only follows from its inputs: {} changed",
            list(&d.changed_inputs)
        )
    } else if d.field == "inputs" {
        "its inputs differ".to_owned()
    } else {
        format!(
            "{}: {} -> {}",
            d.field,
            d.from.as_deref().unwrap_or("?"),
            d.to.as_deref().unwrap_or("?")
        )
    };
    if !d.follows && !d.changed_inputs.is_empty() {
        s.push_str(&format!("; changed inputs: {}", list(&d.changed_inputs)));
    }
    if !d.added_inputs.is_empty() {
        s.push_str(&format!("; new inputs: {}", list(&d.added_inputs)));
    }
    if !d.removed_inputs.is_empty() {
        s.push_str(&format!("; inputs gone: {}", list(&d.removed_inputs)));
    }
    s
}

/// `rbuild diff A B`: each side a recipe (name or path, optionally ^OUTPUT), an output path in
/// the store, or an `-o` link to one.
pub fn diff_cmd(
    a: &str,
    b: &str,
    store: &Store,
    load: &dyn Fn(&str) -> anyhow::Result<(Graph, DrvHash)>,
    json: bool,
) -> anyhow::Result<bool> {
    let (ga, ha) = side(a, store, load)?;
    let (gb, hb) = side(b, store, load)?;
    fn look<'a>(
        g: &'a Option<Graph>,
        store: &'a Store,
    ) -> impl Fn(&str) -> Option<Derivation> + 'a {
        move |h: &str| {
            g.as_ref()
                .and_then(|g| g.get(&DrvHash(h.to_owned())).cloned())
                .or_else(|| recorded(store, h))
        }
    }
    let (la, lb) = (look(&ga, store), look(&gb, store));
    let differences = diff::diff(&ha.0, &hb.0, &la, &lb)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "a": ha.0, "b": hb.0, "differences": differences,
            }))?
        );
    } else if differences.is_empty() {
        println!("{a} and {b} are the same derivation ({})", ha.0);
    } else {
        let (causes, follow): (Vec<&Difference>, Vec<&Difference>) =
            differences.iter().partition(|d| !d.follows);
        for d in &causes {
            println!("{} ({} -> {}):", d.name, short_hash(&d.a), short_hash(&d.b));
            println!("  {}", describe(d));
        }
        if !follow.is_empty() {
            let names: Vec<&str> = follow.iter().map(|d| d.name.as_str()).collect();
            println!(
                "and {} derivation{} that only follow from {}: {}",
                follow.len(),
                if follow.len() == 1 { "" } else { "s" },
                if causes.len() == 1 { "it" } else { "these" },
                names.join(", ")
            );
        }
    }
    Ok(differences.is_empty())
}

fn short_hash(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// One side of a diff: a store output (its path or a link to it) by the derivation the store
/// recorded, else a recipe by its graph.
fn side(
    arg: &str,
    store: &Store,
    load: &dyn Fn(&str) -> anyhow::Result<(Graph, DrvHash)>,
) -> anyhow::Result<(Option<Graph>, DrvHash)> {
    let path = Path::new(arg);
    let store_o = std::fs::canonicalize(store.root().join("o")).ok();
    if let (Ok(real), Some(o)) = (std::fs::canonicalize(path), &store_o) {
        if real.parent() == Some(o.as_path()) {
            let file = real.file_name().unwrap_or_default().to_string_lossy();
            let hash = file.split('-').next().unwrap_or_default().to_owned();
            if recorded(store, &hash).is_none() {
                bail!(
                    "{arg}: the store at {} has no record of derivation {hash}",
                    store.root().display()
                );
            }
            return Ok((None, DrvHash(hash)));
        }
        if path.is_dir() || (path.is_symlink() && !arg.ends_with(".toml")) {
            bail!(
                "{arg} is neither a recipe nor an output of the store at {} (is --store right?)",
                store.root().display()
            );
        }
    }
    let (g, h) = load(arg).with_context(|| format!("loading {arg}"))?;
    Ok((Some(g), h))
}
