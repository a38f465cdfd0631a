//! A recipe's lock and derivation graph: `rbuild lock`, `rbuild graph` and `rbuild diff`.

use std::path::PathBuf;

use anyhow::bail;
use clap::ValueEnum;
use rbuild_engine::builtins::fetch::Fetcher;
use rbuild_engine::Graph;
use rbuild_recipes::layers;

use crate::setup::{lock_to, mirrors, open_store, print_out, split_output, SourceArgs};

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum GraphFormat {
    Json,
    Dot,
}

/// `rbuild diff A B`; exits 1 when they differ.
pub(crate) fn diff_cmd(
    a: &str,
    b: &str,
    store: Option<PathBuf>,
    source: &SourceArgs,
    json: bool,
) -> anyhow::Result<()> {
    let store = open_store(store)?;
    let load = |arg: &str| -> anyhow::Result<(Graph, rbuild_engine::DrvHash)> {
        let (recipe, output) = split_output(arg);
        let (expanded, _) = source.load(recipe, Some("`rbuild diff`"))?;
        let target = expanded.output(output)?.clone();
        Ok((expanded.graph, target))
    };
    if !crate::explain::diff_cmd(a, b, &store, &load, json)? {
        std::process::exit(1);
    }
    Ok(())
}

pub(crate) fn graph_cmd(arg: &str, format: GraphFormat) -> anyhow::Result<()> {
    let (recipe_arg, _) = split_output(arg);
    let loaded = layers::load_any(recipe_arg, true)?;
    if !loaded.has_lock() {
        let lock = loaded.lock_path().unwrap_or_default();
        bail!(
            "{}: no lock; run `rbuild lock {recipe_arg}` first",
            lock.display()
        );
    }
    let expanded = loaded.expand()?;
    let g: &Graph = &expanded.graph;
    match format {
        GraphFormat::Json => print_out(&(serde_json::to_string_pretty(&g.to_json())? + "\n")),
        GraphFormat::Dot => print_out(&g.to_dot()),
    }
}

pub(crate) fn lock_cmd(
    arg: &str,
    mirror_flags: &[String],
    output: Option<PathBuf>,
    arches: &[String],
) -> anyhow::Result<()> {
    let loaded = layers::load_any(arg, false)?.with_arches(arches)?;
    let dest = output
        .or_else(|| loaded.lock_path())
        .unwrap_or_else(|| PathBuf::from(format!("{}.lock", loaded.debian().recipe.name)));
    let mirrors = mirrors(mirror_flags)?;
    if mirrors.is_empty() {
        bail!("no Debian mirror: pass --mirror URL, set RBUILD_MIRROR, list `mirrors` in config.toml, or configure one in /etc/apt");
    }
    let summary = lock_to(&loaded, &Fetcher::new(mirrors), &dest)?;
    eprintln!("{}: {summary}", dest.display());
    println!("{}", dest.display());
    Ok(())
}
