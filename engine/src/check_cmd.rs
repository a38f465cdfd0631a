//! `rbuild check`: build a closure again into scratch and compare it with what is registered.

use std::sync::Arc;

use anyhow::Context;

use crate::cache_cmd::{caches, CacheArgs};
use crate::setup::{
    full_disk, jobs_or_cores, open_engine, print_out, runtime, split_output, LimitArgs, SourceArgs,
    StoreArgs,
};

#[derive(clap::Args)]
pub(crate) struct CheckArgs {
    /// A built-in recipe name or a path to a .toml recipe, optionally ^OUTPUT
    pub(crate) recipe: String,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) source: SourceArgs,
    /// Sandboxed builds to run at once [default: number of cores]
    #[arg(short = 'j', long)]
    pub(crate) jobs: Option<usize>,
    /// Print a JSON array, one object per derivation built again, instead of the report
    #[arg(long)]
    pub(crate) json: bool,
    /// Compare with this binary cache's signed entries too (repeatable)
    #[arg(long = "substituter")]
    pub(crate) substituters: Vec<String>,
    /// Trust cache entries signed by this public key: a file or NAME:BASE64 (repeatable)
    #[arg(long = "trusted-key")]
    pub(crate) trusted_keys: Vec<String>,
    #[command(flatten)]
    pub(crate) limits: LimitArgs,
}

/// `rbuild check`: realise, build every derivation again into scratch, and report.
pub(crate) fn check_cmd(args: CheckArgs) -> anyhow::Result<()> {
    use rbuild_engine::check::CheckResult;
    let CheckArgs {
        recipe,
        store,
        source,
        jobs,
        json,
        substituters,
        trusted_keys,
        limits,
    } = args;
    let caches = caches(CacheArgs {
        substituters,
        trusted_keys,
        ..CacheArgs::default()
    })?;
    let (recipe_arg, output) = split_output(&recipe);
    // What is checked is what the lock already pins: check never re-locks.
    let (expanded, fetcher) = source.load(recipe_arg, Some("`rbuild check`"))?;
    let target = expanded.output(output)?.clone();
    let jobs = jobs_or_cores(jobs);
    let (store, engine, progress) = open_engine(
        store.store,
        fetcher,
        jobs,
        caches,
        limits.limits(&expanded.limits),
    )?;
    let result = runtime(jobs)?.block_on(engine.check(Arc::new(expanded.graph), &target));
    progress.finish();
    let results = result
        .map_err(|e| full_disk(store.root(), e))
        .with_context(|| format!("checking {recipe}"))?;
    let bad = results
        .iter()
        .filter(|r| !matches!(r.result, CheckResult::Reproduced))
        .count();
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        let mut text = String::new();
        for r in &results {
            let short = &r.drv_hash[..12.min(r.drv_hash.len())];
            match &r.result {
                CheckResult::Reproduced => {}
                CheckResult::Differs {
                    rebuilt,
                    paths,
                    more,
                } => {
                    text.push_str(&format!(
                        "{} ({short}) does not reproduce: registered {}, rebuilt {rebuilt}\n",
                        r.name, r.registered
                    ));
                    for p in paths {
                        text.push_str(&format!("  /{}: {}\n", p.path, p.change));
                        for d in &p.details {
                            text.push_str(&format!("    {d}\n"));
                        }
                    }
                    if *more > 0 {
                        text.push_str(&format!("  and {more} more paths\n"));
                    }
                }
                CheckResult::CacheDiffers { cache, claimed } => text.push_str(&format!(
                    "{} ({short}) reproduces its registered output {}, but {cache} claims {claimed}\n",
                    r.name, r.registered
                )),
                CheckResult::Failed { error } => text.push_str(&format!(
                    "{} ({short}) could not be built again: {error}\n",
                    r.name
                )),
            }
        }
        text.push_str(&format!(
            "check: {} derivations built again, {} reproduce their registered outputs{}\n",
            results.len(),
            results.len() - bad,
            if bad == 0 {
                ""
            } else {
                "; the first listed is where the difference starts"
            }
        ));
        print_out(&text)?;
    }
    if bad > 0 {
        std::process::exit(1);
    }
    Ok(())
}
