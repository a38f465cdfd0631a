//! `rbuild realise`: build a recipe's output (with `--explain` and `--timings`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::cache_cmd::{caches, push_closure, CacheArgs};
use crate::setup::{
    full_disk, jobs_or_cores, open_engine, runtime, split_output, LimitArgs, SourceArgs, StoreArgs,
};

#[derive(clap::Args)]
pub(crate) struct RealiseArgs {
    /// A built-in recipe name (e.g. debian-bullseye) or a path to a .toml recipe, optionally ^OUTPUT
    pub(crate) recipe: String,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Make PATH a symlink to the output, and a GC root
    #[arg(short = 'o', long = "out-link")]
    pub(crate) out_link: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) source: SourceArgs,
    /// Refuse to create or update a recipe file's lock (for CI): fail if the recipe changed
    #[arg(long)]
    pub(crate) locked: bool,
    /// Sandboxed builds to run at once [default: number of cores]
    #[arg(short = 'j', long)]
    pub(crate) jobs: Option<usize>,
    /// Print one JSON object {output, built, substituted, reused, fetched_bytes, substituted_bytes, seconds} instead of the path (with --explain, also explain)
    #[arg(long)]
    pub(crate) json: bool,
    /// Write what each derivation took to DIR [default: rbuild-timings]: index.html (a time line,
    /// one bar per derivation, the critical path marked) and trace.json (Chrome trace events,
    /// for Perfetto)
    #[arg(long, value_name = "DIR", num_args = 0..=1, require_equals = true, default_missing_value = "rbuild-timings")]
    pub(crate) timings: Option<PathBuf>,
    /// Say why each derivation is built: which field differs from the derivation of the same
    /// name the last realise of this recipe and output used (or that it was never built, or its
    /// output was collected), and after the build, which no substituter had
    #[arg(long)]
    pub(crate) explain: bool,
    #[command(flatten)]
    pub(crate) cache: CacheArgs,
    #[command(flatten)]
    pub(crate) limits: LimitArgs,
}

pub(crate) fn realise(args: RealiseArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let RealiseArgs {
        recipe,
        store,
        out_link,
        source,
        locked,
        jobs,
        json,
        timings,
        explain,
        cache,
        limits,
    } = args;
    let (arg, store, caches) = (recipe.as_str(), store.store, caches(cache)?);
    let (recipe_arg, output) = split_output(arg);
    let (expanded, fetcher) = source.load(recipe_arg, locked.then_some("--locked"))?;
    let target = expanded.output(output)?.clone();
    let jobs = jobs_or_cores(jobs);
    let push = caches.push.clone();
    let has_substituters = !caches.substituters.is_empty();
    let (store, engine, progress) = open_engine(
        store,
        fetcher,
        jobs,
        caches,
        limits.limits(&expanded.limits),
    )?;
    let graph = Arc::new(expanded.graph);
    let key = crate::explain::request_key(recipe_arg, output);
    let explained = if explain {
        let e = crate::explain::explain(&store, &graph, &target, &key)?;
        for x in &e {
            progress.line(&format!("explain: {}: {}", x.name, x.reason));
        }
        Some(e)
    } else {
        None
    };
    let result = runtime(jobs)?.block_on(engine.realise(graph.clone(), &target));
    // The bars stop drawing before anything else is printed, so nothing is drawn over it.
    progress.finish();
    let report = result
        .map_err(|e| full_disk(store.root(), e))
        .with_context(|| format!("realising {arg}"))?;
    store
        .set_last_realised(&key, &target.0)
        .context("recording what was realised")?;
    let explained = explained.map(|mut e| {
        if has_substituters {
            let built: std::collections::HashSet<&str> = report
                .timings
                .iter()
                .filter(|t| t.outcome == "built")
                .map(|t| t.hash.as_str())
                .collect();
            for x in e.iter_mut().filter(|x| built.contains(x.hash.as_str())) {
                let why = report
                    .not_substituted
                    .get(&rbuild_engine::DrvHash(x.hash.clone()))
                    .cloned()
                    // Every derivation a plan needs is asked for; this is only a fallback.
                    .unwrap_or_else(|| "no substituter was asked for it".to_owned());
                eprintln!("explain: {}: not substituted: {why}", x.name);
                x.not_substituted = Some(why);
            }
        }
        e
    });
    if let Some(link) = out_link {
        store
            .add_root(&link, &target.0)
            .with_context(|| format!("creating the output link {}", link.display()))?;
    }
    // What was built was pushed as it was built; what this store already had goes now, so the
    // cache ends up with the whole closure either way.
    if let Some((cache, key)) = push.filter(|_| report.reused + report.substituted > 0) {
        push_closure(&store, &graph, &target, cache.as_ref(), &key)
            .with_context(|| format!("pushing {arg} to {}", cache.url()))?;
    }
    let elapsed = started.elapsed();
    eprintln!("{}", rbuild_engine::progress::summary(&report, elapsed));
    if let Some(dir) = timings {
        let timeline = rbuild_engine::timings::Timeline::new(
            arg,
            &report.timings,
            report.reused,
            elapsed.as_secs_f64(),
        );
        write_timings(&dir, &timeline)
            .with_context(|| format!("writing the timings report to {}", dir.display()))?;
        eprintln!("timings: {}", dir.join("index.html").display());
    }
    if json {
        let mut out = serde_json::json!({
                "output": report.output, "built": report.built, "substituted": report.substituted, "reused": report.reused,
                "fetched_bytes": report.fetched_bytes, "substituted_bytes": report.substituted_bytes,
                "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        });
        if let Some(e) = explained {
            out["explain"] = serde_json::to_value(e)?;
        }
        println!("{out}");
    } else {
        println!("{}", report.output.display());
    }
    Ok(())
}

/// `DIR/index.html` and `DIR/trace.json` of `timeline`.
pub(crate) fn write_timings(
    dir: &Path,
    timeline: &rbuild_engine::timings::Timeline,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("index.html"), timeline.html())?;
    std::fs::write(
        dir.join("trace.json"),
        serde_json::to_vec(&timeline.chrome_trace())?,
    )?;
    Ok(())
}
