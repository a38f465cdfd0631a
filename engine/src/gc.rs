//! `rbuild gc`: delete what no root needs.

use std::path::{Path, PathBuf};

use clap::ValueEnum;

use crate::setup::{open_store, SELF_EXE};

/// What `rbuild gc` keeps of what the roots were built from.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum GcKeep {
    /// Everything the roots were built from, transitively: editing a recipe and realising it
    /// again rebuilds only what the edit changed (the last layer: three derivations)
    All,
    /// The roots and the fixed-output fetches they were built from: rebuilding needs no
    /// download, but builds every other step again
    Fetches,
    /// Only the roots' own outputs: rebuilding after an edit downloads and builds everything
    Roots,
}

pub(crate) fn gc_cmd(store: Option<PathBuf>, keep: GcKeep, dry_run: bool) -> anyhow::Result<()> {
    use rbuild_engine::progress::human_bytes as human;
    pub(crate) fn count(n: usize, what: &str) -> String {
        format!("{n} {what}{}", if n == 1 { "" } else { "s" })
    }
    let store = open_store(store)?;
    let keep = match keep {
        GcKeep::All => rbuild_store::Keep::Closure,
        GcKeep::Fetches => {
            rbuild_store::Keep::Stages(vec![rbuild_engine::Stage::Fetch.as_str().to_owned()])
        }
        GcKeep::Roots => rbuild_store::Keep::Roots,
    };
    // On a terminal, a progress line while a large store is deleted.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = std::time::Instant::now();
    let r = store.gc_with(
        keep,
        dry_run,
        || eprintln!("gc: waiting for the other rbuild processes using this store to finish"),
        |done, total| {
            if terminal && last.elapsed() > std::time::Duration::from_millis(200) {
                last = std::time::Instant::now();
                eprint!("\rgc: deleting {done}/{total} outputs\x1b[K");
            }
        },
    )?;
    if terminal {
        eprint!("\r\x1b[K");
    }
    if !r.unremovable.is_empty() {
        let map = rbuild_engine::sandbox::check_support()?;
        for p in &r.unremovable {
            rbuild_engine::sandbox::remove_as_mapped_root(Path::new(SELF_EXE), p, &map)?;
        }
    }
    // One line: what was (or, with --dry-run, would be) kept, deleted and freed.
    let (head, kept, deleted, freed) = if dry_run {
        ("gc --dry-run", "would keep", "would delete", "freeing")
    } else {
        ("gc", "kept", "deleted", "freed")
    };
    let stale = match r.roots_dropped {
        0 => String::new(),
        n if dry_run => format!("; would drop {}", count(n, "stale root")),
        n => format!("; {} dropped", count(n, "stale root")),
    };
    eprintln!(
        "{head}: {kept} {} ({}) for {}; {deleted} {}, {freed} {}{stale}",
        count(r.kept, "output"),
        human(r.kept_bytes),
        count(r.roots_kept, "root"),
        count(r.deleted + r.unremovable.len(), "output"),
        human(r.freed_bytes + r.unremovable_bytes),
    );
    Ok(())
}
