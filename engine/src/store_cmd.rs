//! `rbuild store …`: commands about the store itself.

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Subcommand;
use rbuild_engine::builtins::fetch::Fetcher;
use rbuild_engine::progress::Progress;
use rbuild_engine::repair::RepairResult;
use rbuild_store::verify::{self, Checked, Damage};
use serde_json::json;

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Hash every valid output again and compare it with its registration; name the outputs and
    /// paths that differ (exits non-zero if any do)
    Verify(VerifyArgs),
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    store: crate::setup::StoreArgs,
    /// Build the damaged outputs again (or substitute them), requiring the content hash they
    /// were registered with
    #[arg(long)]
    repair: bool,
    /// Print one JSON report instead of text
    #[arg(long)]
    json: bool,
    /// Debian mirror for downloads that must be fetched again (with --repair); repeatable, tried
    /// in order [default: RBUILD_MIRROR (space-separated URLs), else config.toml's `mirrors`,
    /// else the host's apt configuration]
    #[arg(long, env = "RBUILD_MIRROR", value_name = "URL")]
    mirror: Vec<String>,
    /// Threads hashing, and sandboxed builds at once [default: number of cores]
    #[arg(short = 'j', long)]
    jobs: Option<usize>,
    /// Substitute damaged outputs from this binary cache (repeatable; also `substituters` in
    /// config.toml)
    #[arg(long = "substituter")]
    substituters: Vec<String>,
    /// Trust cache entries signed by this public key: a file or NAME:BASE64 (repeatable)
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
}

/// Paths named per damaged output in the text report (JSON has up to [`JSON_PATHS`]).
const TEXT_PATHS: usize = 20;
const JSON_PATHS: usize = 1000;

pub fn run(cmd: StoreCommand) -> anyhow::Result<()> {
    let StoreCommand::Verify(args) = cmd;
    verify_cmd(args)
}

fn damage_json(c: &Checked) -> serde_json::Value {
    let o = &c.output;
    let mut v = json!({
        "drv_hash": o.drv_hash,
        "name": o.name,
        "path": o.output.path,
        "registered": o.output.content_hash,
    });
    match c.damage.as_ref().expect("damaged") {
        Damage::Missing => v["damage"] = "missing".into(),
        Damage::Unreadable(e) => {
            v["damage"] = "unreadable".into();
            v["error"] = e.as_str().into();
        }
        Damage::Differs { actual, changes } => {
            v["damage"] = "differs".into();
            v["actual"] = actual.as_str().into();
            v["listed"] = changes.is_some().into();
            if let Some(changes) = changes {
                v["paths"] = changes
                    .iter()
                    .take(JSON_PATHS)
                    .map(|c| json!({"path": c.path, "change": c.change.to_string()}))
                    .collect();
                v["more_paths"] = changes.len().saturating_sub(JSON_PATHS).into();
            }
        }
    }
    v
}

fn print_damage(c: &Checked) {
    let o = &c.output;
    println!("DAMAGED {} ({})", o.name, o.drv_hash);
    println!("  {}", o.output.path.display());
    match c.damage.as_ref().expect("damaged") {
        Damage::Missing => println!("  the output is missing"),
        Damage::Unreadable(e) => println!("  cannot be hashed: {e}"),
        Damage::Differs { actual, changes } => {
            println!(
                "  registered as {}, hashes to {actual}",
                o.output.content_hash
            );
            match changes {
                None => println!(
                    "  (registered before rbuild kept per-path listings: the paths that differ cannot be named)"
                ),
                Some(changes) => {
                    for ch in changes.iter().take(TEXT_PATHS) {
                        println!("  {}: {}", ch.path, ch.change);
                    }
                    if changes.len() > TEXT_PATHS {
                        println!("  … and {} more paths", changes.len() - TEXT_PATHS);
                    }
                }
            }
        }
    }
}

fn verify_cmd(args: VerifyArgs) -> anyhow::Result<()> {
    let store = Arc::new(crate::setup::open_store(args.store.store)?);
    let jobs = crate::setup::jobs_or_cores(args.jobs);
    let started = std::time::Instant::now();
    let outputs = store.outputs()?;
    let checked = verify::check_all(&store, &outputs, jobs)?;
    let secs = started.elapsed().as_secs_f64();
    let bytes: u64 = checked.iter().map(|c| c.bytes).sum();
    let unlisted = checked.iter().filter(|c| !c.listed).count();
    let damaged: Vec<&Checked> = checked.iter().filter(|c| c.damage.is_some()).collect();
    let summary = format!(
        "verified {} outputs ({:.1} MB) in {secs:.2} s: {} damaged{}",
        checked.len(),
        bytes as f64 / 1e6,
        damaged.len(),
        if unlisted > 0 {
            format!(
                "; {unlisted} registered before rbuild kept per-path listings (their damage is found, its paths are not named)"
            )
        } else {
            String::new()
        }
    );
    if !args.json {
        for c in &damaged {
            print_damage(c);
        }
        eprintln!("{summary}");
    }
    let mut report = json!({
        "store": store.root(),
        "checked": checked.len(),
        "bytes": bytes,
        "seconds": secs,
        "unlisted": unlisted,
        "damaged": damaged.iter().map(|c| damage_json(c)).collect::<Vec<_>>(),
    });
    let mut unrepaired = damaged.len();
    if args.repair && !damaged.is_empty() {
        let hashes: Vec<String> = damaged.iter().map(|c| c.output.drv_hash.clone()).collect();
        let caches = crate::cache_cmd::caches(crate::cache_cmd::CacheArgs {
            substituters: args.substituters,
            trusted_keys: args.trusted_keys,
            push_to: None,
            secret_key: None,
        })?;
        let caches = rbuild_engine::scheduler::Caches {
            push: None,
            ..caches
        };
        let fetcher = Fetcher::new(crate::setup::mirrors(&args.mirror)?);
        let progress = Arc::new(Progress::new(false));
        let engine = crate::setup::engine(
            store.clone(),
            fetcher,
            jobs,
            progress.clone(),
            caches,
            Default::default(),
        )?;
        let repaired = crate::setup::runtime(jobs)?.block_on(engine.repair(&hashes));
        // The bars stop drawing before the report is printed.
        progress.finish();
        let repaired = repaired.context("repairing")?;
        unrepaired = 0;
        for (r, entry) in repaired.iter().zip(
            report["damaged"]
                .as_array_mut()
                .expect("an array")
                .iter_mut(),
        ) {
            let name = entry["name"].as_str().unwrap_or_default().to_owned();
            let (status, line) = match &r.result {
                RepairResult::Repaired => (
                    json!({"result": "repaired"}),
                    format!("repaired {name}: built again, same content hash as registered"),
                ),
                RepairResult::NotReproducible { rebuilt } => {
                    unrepaired += 1;
                    (
                        json!({"result": "not-reproducible", "rebuilt": rebuilt}),
                        format!(
                            "NOT REPRODUCIBLE {name} ({}): built again, it hashes to {rebuilt}, but it was registered as {}",
                            r.drv_hash, r.registered
                        ),
                    )
                }
                RepairResult::Failed(e) => {
                    unrepaired += 1;
                    (
                        json!({"result": "failed", "error": e}),
                        format!("repair of {name} ({}) failed: {e}", r.drv_hash),
                    )
                }
            };
            entry["repair"] = status;
            if !args.json {
                println!("{line}");
            }
        }
    }
    report["ok"] = (unrepaired == 0).into();
    if args.json {
        println!("{report}");
    }
    if unrepaired > 0 {
        if args.repair {
            bail!("{unrepaired} damaged outputs could not be repaired");
        }
        bail!("{unrepaired} damaged outputs; `rbuild store verify --repair` builds them again");
    }
    Ok(())
}
