//! The `rbuild` command line.

mod attest;
mod cache_cmd;
mod check_cmd;
mod doctor;
mod explain;
mod gc;
mod manual;
mod realise;
mod recipe_cmd;
mod setup;
mod store_cmd;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use attest::{attest_cmd, verify_attestation, AttestArgs};
use cache_cmd::{cache_cmd, key_cmd, CacheCommand, KeyCommand};
use check_cmd::{check_cmd, CheckArgs};
use gc::{gc_cmd, GcKeep};
use manual::man_cmd;
use realise::{realise, RealiseArgs};
use recipe_cmd::{diff_cmd, graph_cmd, lock_cmd, GraphFormat};
use setup::{builtins, SourceArgs, StoreArgs};

#[derive(Parser)]
#[command(
    name = "rbuild",
    version,
    about = "Reproducible, verified, unprivileged Debian bootstraps and container images, built as a cached derivation graph"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build RECIPE[^OUTPUT] (outputs: image (default), rootfs, tree, index, spdx, cyclonedx,
    /// provenance) and print its store path
    Realise(RealiseArgs),
    /// Build RECIPE[^OUTPUT]'s derivations again into scratch and compare them with what is
    /// registered (and with a --substituter's entries); exit 1 naming what differs
    Check(CheckArgs),
    /// Sign RECIPE[^OUTPUT] (default: provenance) as a DSSE envelope of an in-toto statement
    Attest(AttestArgs),
    /// Check a DSSE envelope's signature against trusted keys and print its subjects
    VerifyAttestation {
        file: PathBuf,
        /// A public key the signature may be by: a file or NAME:BASE64 (repeatable)
        #[arg(long = "trusted-key", required = true)]
        trusted_keys: Vec<String>,
    },
    /// Generate a signing key pair for binary caches (NAME:BASE64 files, as nix-store's)
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Share outputs through a binary cache
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Compare two derivation graphs (each a recipe, an output path in the store, or an -o link
    /// to one): the derivations that differ, each with the first field that does; exit 1 when
    /// they differ
    Diff {
        a: String,
        b: String,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        source: SourceArgs,
        /// Print {a, b, differences: [{name, a, b, field, from, to, removed_inputs,
        /// added_inputs, changed_inputs, follows}]}
        #[arg(long)]
        json: bool,
    },
    /// Print the derivation graph of a recipe
    Graph {
        recipe: String,
        #[arg(long, value_enum, default_value_t = GraphFormat::Json)]
        format: GraphFormat,
    },
    /// Resolve a recipe against the archive's verified index and (re)write its lock
    Lock {
        recipe: String,
        /// Debian mirror URL; repeatable: the InRelease and indices all come from the first that
        /// serves the InRelease [default: RBUILD_MIRROR (space-separated URLs), else config.toml's
        /// `mirrors`, else the host's apt configuration]
        #[arg(long, env = "RBUILD_MIRROR", value_name = "URL")]
        mirror: Vec<String>,
        /// Where to write the lock [default: beside the recipe file; ./NAME.lock for built-ins]
        #[arg(long)]
        output: Option<PathBuf>,
        /// Lock these architectures instead of the recipe's (comma-separated, e.g. amd64,arm64)
        #[arg(long, value_delimiter = ',', value_name = "ARCH")]
        arch: Vec<String>,
    },
    /// Check (and repair) the store's outputs
    Store {
        #[command(subcommand)]
        command: store_cmd::StoreCommand,
    },
    /// Delete the store outputs that no GC root (an -o link) needs; print what was kept and freed
    Gc {
        #[command(flatten)]
        store: StoreArgs,
        /// What to keep besides the roots' own outputs
        #[arg(long, value_enum, default_value_t = GcKeep::All)]
        keep: GcKeep,
        /// Only say what would be deleted and freed; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Check, line by line, what the sandbox needs and has here (--json: what a builder sees)
    Doctor {
        /// Also try a TCP connection from inside the sandbox to HOST:PORT
        #[arg(long)]
        connect: Vec<String>,
        /// Also print the sandbox probe's report as JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (e.g. `rbuild completions bash >
    /// ~/.local/share/bash-completion/completions/rbuild`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the rbuild(1) manual page, or with --dir write one page per command into DIR
    /// (rbuild.1, rbuild-realise.1, …)
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    #[command(name = "__sandbox", hide = true)]
    Sandbox { spec: PathBuf },
    #[command(name = "__remove", hide = true)]
    Remove { path: PathBuf },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("RBUILD_LOG"))
        .with_writer(std::io::stderr)
        // Colours only for a person: a log redirected to a file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sandbox { spec } => std::process::exit(builtins().sandbox_main(&spec)),
        Command::Remove { path } => {
            std::process::exit(match rbuild_store::remove_all(Path::new(&path)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("rbuild: removing {}: {e}", path.display());
                    1
                }
            })
        }
        Command::Realise(args) => realise(args),
        Command::Check(args) => check_cmd(args),
        Command::Attest(args) => attest_cmd(args),
        Command::VerifyAttestation { file, trusted_keys } => {
            verify_attestation(&file, &trusted_keys)
        }
        Command::Key { command } => key_cmd(command),
        Command::Cache { command } => cache_cmd(command),
        Command::Graph { recipe, format } => graph_cmd(&recipe, format),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "rbuild", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man_cmd(dir),
        Command::Diff {
            a,
            b,
            store,
            source,
            json,
        } => diff_cmd(&a, &b, store.store, &source, json),
        Command::Lock {
            recipe,
            mirror,
            output,
            arch,
        } => lock_cmd(&recipe, &mirror, output, &arch),
        Command::Gc {
            store,
            keep,
            dry_run,
        } => gc_cmd(store.store, keep, dry_run),
        Command::Store { command } => store_cmd::run(command),
        Command::Doctor { connect, json } => doctor::doctor(connect, json),
    };
    if let Err(e) = result {
        eprintln!("error: {}", rbuild_engine::errors::chain(e.as_ref()));
        std::process::exit(1);
    }
}
