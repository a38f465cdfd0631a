//! The `rbuild` command line.

mod doctor;
mod explain;
mod store_cmd;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use rbuild_engine::builtins::fetch::Fetcher;
use rbuild_engine::builtins::Builtins;
use rbuild_engine::progress::Progress;
use rbuild_engine::scheduler::Caches;
use rbuild_engine::{Engine, Graph};
use rbuild_recipes::{expand, layers, mirror, recipe, relock};
use rbuild_store::cache::{PublicKey, SecretKey};
use rbuild_store::Store;

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

#[derive(clap::Args)]
struct StoreArgs {
    /// The store directory [default: $XDG_DATA_HOME/rbuild/store]
    #[arg(long, env = "RBUILD_STORE", global = true)]
    store: Option<PathBuf>,
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

#[derive(clap::Args)]
struct RealiseArgs {
    /// A built-in recipe name (e.g. debian-bullseye) or a path to a .toml recipe, optionally ^OUTPUT
    recipe: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Make PATH a symlink to the output, and a GC root
    #[arg(short = 'o', long = "out-link")]
    out_link: Option<PathBuf>,
    #[command(flatten)]
    source: SourceArgs,
    /// Refuse to create or update a recipe file's lock (for CI): fail if the recipe changed
    #[arg(long)]
    locked: bool,
    /// Sandboxed builds to run at once [default: number of cores]
    #[arg(short = 'j', long)]
    jobs: Option<usize>,
    /// Print one JSON object {output, built, substituted, reused, fetched_bytes, substituted_bytes, seconds} instead of the path
    #[arg(long)]
    json: bool,
    /// Write what each derivation took to DIR [default: rbuild-timings]: index.html (a time line,
    /// one bar per derivation, the critical path marked) and trace.json (Chrome trace events,
    /// for Perfetto)
    #[arg(long, value_name = "DIR", num_args = 0..=1, require_equals = true, default_missing_value = "rbuild-timings")]
    timings: Option<PathBuf>,
    /// Say why each derivation is built: which field differs from the derivation of the same
    /// name the last realise of this recipe and output used (or that it was never built, or its
    /// output was collected), and after the build, which no substituter had
    #[arg(long)]
    explain: bool,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Where a recipe's bytes come from and which lock and architectures it is built with: what
/// `realise`, `check` and `attest` share.
#[derive(clap::Args)]
struct SourceArgs {
    /// Debian mirror URL (http://, https:// or file://); repeatable: each file comes from the
    /// first that has its pinned bytes [default: RBUILD_MIRROR (space-separated URLs), else
    /// config.toml's `mirrors`, else the host's apt configuration]
    #[arg(long, env = "RBUILD_MIRROR", value_name = "URL")]
    mirror: Vec<String>,
    /// Never touch the network; fail clearly when something is missing from the store
    #[arg(long)]
    offline: bool,
    /// Build these architectures instead of the recipe's (comma-separated, e.g. amd64,arm64;
    /// the lock must pin them): the image is then one multi-platform index
    #[arg(long, value_delimiter = ',', value_name = "ARCH")]
    arch: Vec<String>,
    /// Build with this lock instead of the recipe's own (one `rbuild lock RECIPE --output FILE`
    /// wrote); it is never rewritten
    #[arg(long, value_name = "FILE")]
    lock: Option<PathBuf>,
}

impl SourceArgs {
    /// RECIPE (without its `^OUTPUT`) expanded with its lock (re-locked as `realise` does unless
    /// `locked`), and the fetcher for what the store lacks.
    /// `locked` names what forbids re-locking (`--locked`, a command that never writes locks).
    fn load(
        &self,
        recipe: &str,
        locked: Option<&str>,
    ) -> anyhow::Result<(expand::Expanded, Fetcher)> {
        let mirrors = if self.offline {
            Vec::new()
        } else {
            mirrors(&self.mirror)?
        };
        let expanded = load_locked(
            recipe,
            &mirrors,
            self.offline,
            locked,
            self.lock.as_deref(),
            &self.arch,
        )?;
        let fetcher = if self.offline {
            Fetcher::offline()
        } else {
            Fetcher::new(mirrors)
        };
        Ok((expanded, fetcher))
    }
}

#[derive(clap::Args)]
struct AttestArgs {
    /// A built-in recipe name or a path to a .toml recipe, optionally ^OUTPUT (default:
    /// provenance; with several architectures, provenance-ARCH)
    recipe: String,
    #[command(flatten)]
    store: StoreArgs,
    /// The key that signs (as `rbuild key generate` writes it)
    #[arg(long)]
    secret_key: PathBuf,
    /// Where to write the envelope
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    #[command(flatten)]
    source: SourceArgs,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// A built-in recipe name or a path to a .toml recipe, optionally ^OUTPUT
    recipe: String,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    source: SourceArgs,
    /// Sandboxed builds to run at once [default: number of cores]
    #[arg(short = 'j', long)]
    jobs: Option<usize>,
    /// Print a JSON array, one object per derivation built again, instead of the report
    #[arg(long)]
    json: bool,
    /// Compare with this binary cache's signed entries too (repeatable)
    #[arg(long = "substituter")]
    substituters: Vec<String>,
    /// Trust cache entries signed by this public key: a file or NAME:BASE64 (repeatable)
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// What one build step may use; a step that reaches a limit is stopped and named.
#[derive(clap::Args)]
struct LimitArgs {
    /// Wall-clock seconds one build step may take [default: 14400]
    #[arg(long, env = "RBUILD_MAX_BUILD_TIME")]
    max_build_time: Option<u64>,
    /// Bytes one build step may write (output and scratch) [default: 64 GiB]
    #[arg(long, env = "RBUILD_MAX_BUILD_BYTES")]
    max_build_bytes: Option<u64>,
    /// Processes one build step may run at once [default: 4096; not enforced for root]
    #[arg(long, env = "RBUILD_MAX_BUILD_PROCESSES")]
    max_build_processes: Option<u64>,
}

impl LimitArgs {
    /// The command line's limits, else the recipe's, else the defaults.
    fn limits(
        &self,
        recipe: &rbuild_recipes::recipe::BuildLimits,
    ) -> rbuild_engine::sandbox::Limits {
        let d = rbuild_engine::sandbox::Limits::default();
        rbuild_engine::sandbox::Limits {
            wall_secs: self
                .max_build_time
                .or(recipe.max_build_time)
                .unwrap_or(d.wall_secs),
            bytes: self
                .max_build_bytes
                .or(recipe.max_build_bytes)
                .unwrap_or(d.bytes),
            processes: self
                .max_build_processes
                .or(recipe.max_build_processes)
                .unwrap_or(d.processes),
        }
    }
}

#[derive(clap::Args, Default)]
struct CacheArgs {
    /// Substitute outputs from this binary cache (repeatable; also `substituters` in config.toml)
    #[arg(long = "substituter")]
    substituters: Vec<String>,
    /// Trust cache entries signed by this public key: a file or NAME:BASE64 (repeatable)
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
    /// Push what this run builds to this binary cache (needs --secret-key)
    #[arg(long)]
    push_to: Option<String>,
    /// The secret key that signs pushed entries
    #[arg(long)]
    secret_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new key pair: SECRET (keep it private) and PUBLIC (give it to those who trust you)
    Generate {
        name: String,
        secret: PathBuf,
        public: PathBuf,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Contact binary caches and say what each is (default: the substituters and push-to of
    /// config.toml)
    Check { urls: Vec<String> },
    /// Push every output of RECIPE's graph that is valid in the store
    Push {
        recipe: String,
        #[command(flatten)]
        store: StoreArgs,
        /// The binary cache: file:///DIR, http(s)://URL or grpc(s)://HOST:PORT[/INSTANCE]
        #[arg(long)]
        to: String,
        #[arg(long)]
        secret_key: PathBuf,
    },
}

/// `$XDG_CONFIG_HOME/rbuild/config.toml`
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Config {
    /// Debian mirrors, tried in order per file (when no --mirror or RBUILD_MIRROR is given).
    #[serde(default)]
    mirrors: Vec<String>,
    #[serde(default)]
    substituters: Vec<String>,
    #[serde(default)]
    trusted_keys: Vec<String>,
    #[serde(default)]
    push_to: Option<String>,
    #[serde(default)]
    secret_key: Option<PathBuf>,
}

fn config() -> anyhow::Result<Config> {
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    let Some(path) = dir.map(|d| d.join("rbuild/config.toml")) else {
        return Ok(Config::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(t) => toml::from_str(&t)
            .with_context(|| format!("{}: not a valid rbuild config", path.display())),
        Err(_) => Ok(Config::default()),
    }
}

/// The Debian mirrors, in the order they are tried: the `--mirror`s (clap fills them from
/// `RBUILD_MIRROR` when there are none), else config.toml's `mirrors`, else the host's apt
/// configuration. See [`mirror::choose_all`].
fn mirrors(flags: &[String]) -> anyhow::Result<Vec<String>> {
    Ok(mirror::choose_all(flags, &config()?.mirrors))
}

/// Flags first, then the config file.
fn caches(args: CacheArgs) -> anyhow::Result<Caches> {
    let cfg = config()?;
    let mut c = Caches::default();
    for url in args.substituters.iter().chain(&cfg.substituters) {
        c.substituters
            .push(Arc::from(rbuild_store::cache::open(url)?));
    }
    for k in args.trusted_keys.iter().chain(&cfg.trusted_keys) {
        c.trusted.push(PublicKey::load(k)?);
    }
    if !c.substituters.is_empty() && c.trusted.is_empty() {
        bail!("substituters are set but no --trusted-key: rbuild never uses unsigned or untrusted cache entries");
    }
    if let Some(url) = args.push_to.or(cfg.push_to) {
        let key = args
            .secret_key
            .or(cfg.secret_key)
            .context("--push-to needs --secret-key")?;
        c.push = Some((
            Arc::from(rbuild_store::cache::open(&url)?),
            Arc::new(SecretKey::read(&key)?),
        ));
    }
    Ok(c)
}

fn key_cmd(cmd: KeyCommand) -> anyhow::Result<()> {
    let KeyCommand::Generate {
        name,
        secret,
        public,
    } = cmd;
    let key = SecretKey::generate(&name)?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret)
        .with_context(|| format!("creating {}", secret.display()))?;
    use std::io::Write;
    writeln!(f, "{}", key.to_text())?;
    std::fs::write(&public, format!("{}\n", key.public().to_text()))
        .with_context(|| format!("writing {}", public.display()))?;
    Ok(())
}

fn cache_cmd(cmd: CacheCommand) -> anyhow::Result<()> {
    let (recipe, store, to, secret_key) = match cmd {
        CacheCommand::Check { urls } => return cache_check(urls),
        CacheCommand::Push {
            recipe,
            store,
            to,
            secret_key,
        } => (recipe, store, to, secret_key),
    };
    let (recipe_arg, output) = split_output(&recipe);
    let expanded = load_locked(
        recipe_arg,
        &[],
        true,
        Some("`rbuild cache push`"),
        None,
        &[],
    )?;
    let target = expanded.output(output)?.clone();
    let store = open_store(store.store)?;
    let cache = rbuild_store::cache::open(&to)?;
    let key = SecretKey::read(&secret_key)?;
    push_closure(&store, &expanded.graph, &target, cache.as_ref(), &key)
}

/// Sign and push every output of `target`'s closure that `store` holds to `cache` (what the
/// cache already has is not uploaded again).
fn push_closure(
    store: &rbuild_store::Store,
    graph: &rbuild_engine::Graph,
    target: &rbuild_engine::DrvHash,
    cache: &dyn rbuild_store::cache::BinaryCache,
    key: &SecretKey,
) -> anyhow::Result<()> {
    let mut stack = vec![target.clone()];
    let mut seen = std::collections::HashSet::new();
    let mut valid = Vec::new();
    while let Some(h) = stack.pop() {
        if !seen.insert(h.clone()) {
            continue;
        }
        let drv = graph.get(&h).context("derivation not in the graph")?;
        stack.extend(drv.inputs.iter().cloned());
        if let Some(out) = store.valid_output(&h.0)? {
            let listing = store.listing(&h.0, &out.content_hash)?;
            valid.push((h.0.clone(), drv.output_name(), out, listing));
        }
    }
    let outputs: Vec<rbuild_store::cache::Publish> = valid
        .iter()
        .map(|(h, name, out, listing)| rbuild_store::cache::Publish {
            drv_hash: h,
            name,
            content_hash: &out.content_hash,
            path: &out.path,
            listing: listing.as_ref(),
        })
        .collect();
    // Every output is hashed again before it is signed: a damaged one is refused, not pushed.
    let pushed = rbuild_store::cache::push_many(cache, key, &outputs)?;
    eprintln!(
        "{}: pushed {} outputs ({} new blobs)",
        cache.url(),
        pushed.entries,
        pushed.uploaded
    );
    for e in &pushed.refused {
        eprintln!("error: {e}");
    }
    if !pushed.refused.is_empty() {
        bail!(
            "{} damaged outputs were not pushed; `rbuild store verify --repair` rebuilds them",
            pushed.refused.len()
        );
    }
    Ok(())
}

fn cache_check(mut urls: Vec<String>) -> anyhow::Result<()> {
    if urls.is_empty() {
        let cfg = config()?;
        urls = cfg.substituters;
        urls.extend(cfg.push_to.filter(|p| !urls.contains(p)));
        if urls.is_empty() {
            bail!("no cache given, and config.toml names no substituters or push-to");
        }
    }
    let mut failed = 0;
    for url in &urls {
        match rbuild_store::cache::open(url).and_then(|c| c.check()) {
            Ok(what) => println!("{url}: ok, {what}"),
            Err(e) => {
                failed += 1;
                println!("{url}: FAILED: {e}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} caches cannot be used", urls.len());
    }
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Json,
    Dot,
}

/// What the sandbox re-executes: this very binary, even if its file was replaced meanwhile.
pub(crate) const SELF_EXE: &str = "/proc/self/exe";

fn builtins() -> Builtins {
    let mut b = Builtins::new();
    rbuild_recipes::builders::register(&mut b);
    b
}

fn default_store(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(s) = flag {
        return Ok(s);
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .context("cannot find a default store: set --store, RBUILD_STORE, XDG_DATA_HOME or HOME")?;
    Ok(data.join("rbuild/store"))
}

/// Open the store `flag` names (or the default one), saying which and why it cannot be opened
/// (a full disk named as such).
fn open_store(flag: Option<PathBuf>) -> anyhow::Result<Store> {
    let dir = default_store(flag)?;
    Store::open(&dir)
        .map_err(|e| full_disk(&dir, e))
        .with_context(|| format!("opening the store at {}", dir.display()))
}

/// `-j N`, or the number of cores.
fn jobs_or_cores(jobs: Option<usize>) -> usize {
    jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    })
}

/// The engine every building command uses: this binary as the sandbox, the walls (all of them
/// unless rbuild's tests say otherwise) and the build steps' limits.
fn engine(
    store: Arc<Store>,
    fetcher: Fetcher,
    jobs: usize,
    progress: Arc<Progress>,
    caches: Caches,
    limits: rbuild_engine::sandbox::Limits,
) -> anyhow::Result<Arc<Engine>> {
    Ok(Arc::new(
        Engine::new(store, PathBuf::from(SELF_EXE), fetcher, jobs, progress)
            .with_caches(caches)
            .with_walls(rbuild_engine::sandbox::Walls::from_env()?)
            .with_limits(limits),
    ))
}

/// The store (opened) and an engine on it with a progress display, as `realise`, `check` and
/// `attest` make them.
fn open_engine(
    store: Option<PathBuf>,
    fetcher: Fetcher,
    jobs: usize,
    caches: Caches,
    limits: rbuild_engine::sandbox::Limits,
) -> anyhow::Result<(Arc<Store>, Arc<Engine>, Arc<Progress>)> {
    let store = Arc::new(open_store(store)?);
    let progress = Arc::new(Progress::new(false));
    let engine = engine(
        store.clone(),
        fetcher,
        jobs,
        progress.clone(),
        caches,
        limits,
    )?;
    Ok((store, engine, progress))
}

/// `RECIPE^OUTPUT` → (RECIPE, OUTPUT).
fn split_output(arg: &str) -> (&str, Option<&str>) {
    match arg.rsplit_once('^') {
        Some((r, o)) => (r, Some(o)),
        None => (arg, None),
    }
}

fn runtime(jobs: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(jobs.max(2))
        .enable_all()
        .build()?)
}

/// Lock `recipe` against the archive (through `fetcher`) and write its lock to `dest`.
fn lock_to(recipe: &layers::AnyRecipe, fetcher: &Fetcher, dest: &Path) -> anyhow::Result<String> {
    let rt = runtime(2)?;
    let (text, summary) = match recipe {
        layers::AnyRecipe::Debian(l) => {
            let lock = rt.block_on(rbuild_recipes::lock::lock(&l.recipe, &l.keyring, fetcher))?;
            (
                recipe::render_lock(&lock),
                format!("{} packages pinned", lock.packages.len()),
            )
        }
        layered => {
            let lock = rt.block_on(relock::lock_layered(layered, fetcher))?;
            let n: usize = lock.layer.iter().map(|l| l.package.len()).sum();
            (
                layers::render_lock(&lock),
                format!("{} layers, {n} added packages pinned", lock.layer.len()),
            )
        }
    };
    std::fs::write(dest, text).with_context(|| format!("writing {}", dest.display()))?;
    Ok(summary)
}

/// Load a recipe and its lock. A recipe file whose lock does not fit it (none yet, or the recipe
/// changed) is re-locked first, keeping every pin that still fits, and says so; with `locked`
/// that is an error instead, as with cargo's `--locked`.
fn load_locked(
    arg: &str,
    mirrors: &[String],
    offline: bool,
    locked: Option<&str>,
    lock_file: Option<&Path>,
    arches: &[String],
) -> anyhow::Result<expand::Expanded> {
    if let Some(file) = lock_file {
        let loaded = layers::load_any(arg, true)?
            .with_arches(arches)?
            .with_lock_file(file)?;
        if let Some((stale, recipe)) = relock::stale(&loaded)? {
            let why = stale.changes.join("; ");
            if std::ptr::eq(recipe, &loaded) {
                bail!(
                    "{}: the lock does not fit {arg} ({why}); run `rbuild lock {arg} --output {}`",
                    file.display(),
                    file.display()
                );
            }
            bail!(
                "{}: the lock of a recipe below {arg} does not fit it ({why}); realise that recipe once, or run `rbuild lock` on it",
                stale.lock_path.display()
            );
        }
        return loaded.expand();
    }
    // Each round re-locks the lowest recipe of the stack that needs it: a base before the
    // recipes standing on it.
    loop {
        let loaded = layers::load_any(arg, true)?.with_arches(arches)?;
        let Some((stale, recipe)) = relock::stale(&loaded)? else {
            return loaded.expand();
        };
        let (path, why) = (stale.lock_path.display(), stale.changes.join("; "));
        if let Some(who) = locked {
            bail!("{path}: the lock does not fit the recipe ({why}), and {who} never updates a lock; run `rbuild lock` on the recipe, or realise it first");
        }
        if offline && stale.needs_archive {
            bail!("{path}: the lock does not fit the recipe ({why}); re-locking needs the archive's signed index from the mirror, and --offline forbids the network; realise once without --offline, or run `rbuild lock` on the recipe with network access");
        }
        eprintln!("{path}: locking for the recipe's changes: {why}");
        let fetcher = if stale.needs_archive {
            Fetcher::new(mirrors.to_vec())
        } else {
            Fetcher::offline()
        };
        let new = runtime(2)?.block_on(relock::relock(recipe, &fetcher))?;
        std::fs::write(&stale.lock_path, new.text).with_context(|| format!("writing {path}"))?;
        eprintln!("{path}: {}", new.summary);
    }
}

fn realise(args: RealiseArgs) -> anyhow::Result<()> {
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
    let key = explain::request_key(recipe_arg, output);
    let explained = if explain {
        let e = explain::explain(&store, &graph, &target, &key)?;
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
    if explained.is_some() && has_substituters {
        for t in report.timings.iter().filter(|t| t.outcome == "built") {
            eprintln!("explain: {}: no substituter had an entry for it", t.name);
        }
    }
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
        println!(
            "{}",
            serde_json::json!({
                "output": report.output, "built": report.built, "substituted": report.substituted, "reused": report.reused,
                "fetched_bytes": report.fetched_bytes, "substituted_bytes": report.substituted_bytes,
                "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
                "explain": explained,
            })
        );
    } else {
        println!("{}", report.output.display());
    }
    Ok(())
}

/// `DIR/index.html` and `DIR/trace.json` of `timeline`.
fn write_timings(dir: &Path, timeline: &rbuild_engine::timings::Timeline) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("index.html"), timeline.html())?;
    std::fs::write(
        dir.join("trace.json"),
        serde_json::to_vec(&timeline.chrome_trace())?,
    )?;
    Ok(())
}

/// `rbuild attest`: realise the statement and sign it.
fn attest_cmd(args: AttestArgs) -> anyhow::Result<()> {
    let AttestArgs {
        recipe,
        store,
        secret_key,
        output,
        source,
    } = args;
    let key = SecretKey::read(&secret_key)?;
    let (recipe_arg, out) = split_output(&recipe);
    // What is signed is what the lock already pins: attest never re-locks.
    let (expanded, fetcher) = source.load(recipe_arg, Some("`rbuild attest`"))?;
    let target = expanded.output(Some(out.unwrap_or("provenance")))?.clone();
    let jobs = jobs_or_cores(None);
    let (store, engine, progress) = open_engine(
        store.store,
        fetcher,
        jobs,
        Caches::default(),
        rbuild_engine::sandbox::Limits::default(),
    )?;
    let result = runtime(jobs)?.block_on(engine.realise(Arc::new(expanded.graph), &target));
    progress.finish();
    let report = result
        .map_err(|e| full_disk(store.root(), e))
        .with_context(|| format!("realising {recipe}"))?;
    let statement = std::fs::read(&report.output).with_context(|| {
        format!(
            "reading {} (a statement is one file)",
            report.output.display()
        )
    })?;
    let envelope = rbuild_store::dsse::sign(rbuild_store::dsse::IN_TOTO, &statement, &key);
    let mut text = serde_json::to_vec_pretty(&envelope)?;
    text.push(b'\n');
    std::fs::write(&output, text).with_context(|| format!("writing {}", output.display()))?;
    eprintln!(
        "{}: {} signed by {}",
        output.display(),
        report.output.display(),
        key.name
    );
    Ok(())
}

/// `rbuild verify-attestation`: a trusted signature, then the statement's subjects.
fn verify_attestation(file: &Path, trusted_keys: &[String]) -> anyhow::Result<()> {
    let trusted = trusted_keys
        .iter()
        .map(|k| PublicKey::load(k))
        .collect::<Result<Vec<_>, _>>()?;
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let envelope: rbuild_store::dsse::Envelope = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a DSSE envelope", file.display()))?;
    let payload = rbuild_store::dsse::verify(&envelope, &trusted)
        .with_context(|| format!("{}: signature check failed", file.display()))?;
    if envelope.payload_type != rbuild_store::dsse::IN_TOTO {
        bail!(
            "{}: signed, but its payload type is {:?}, not {:?}",
            file.display(),
            envelope.payload_type,
            rbuild_store::dsse::IN_TOTO
        );
    }
    let statement: serde_json::Value = serde_json::from_slice(&payload)
        .with_context(|| format!("{}: the signed payload is not JSON", file.display()))?;
    let mut text = format!(
        "{}: signed by {}; {}\n",
        file.display(),
        envelope
            .signatures
            .iter()
            .map(|s| s.keyid.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        statement["predicateType"]
            .as_str()
            .unwrap_or("no predicate type")
    );
    for s in statement["subject"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "sha256:{}  {}\n",
            s["digest"]["sha256"].as_str().unwrap_or("?"),
            s["name"].as_str().unwrap_or("?")
        ));
    }
    print_out(&text)
}

/// `rbuild check`: realise, build every derivation again into scratch, and report.
fn check_cmd(args: CheckArgs) -> anyhow::Result<()> {
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

/// `err`, with "no space left on device on the filesystem holding STORE" (and `rbuild gc`) in
/// front when it is a full disk.
fn full_disk<E: std::error::Error + Send + Sync + 'static>(store: &Path, err: E) -> anyhow::Error {
    match rbuild_engine::nospace::diagnose(store, &err) {
        Some(full) => anyhow::Error::new(err).context(full.to_string()),
        None => err.into(),
    }
}

/// Write to stdout; a reader that went away (`rbuild graph … | head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// `rbuild man`: rbuild(1) on stdout, or every visible command's page into `dir`.
fn man_cmd(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fn write(dir: &Path, name: &str, cmd: clap::Command) -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        // clap names commands with static strings; a page per command, once per run.
        let page: &'static str = Box::leak(name.to_owned().into_boxed_str());
        clap_mangen::Man::new(cmd.clone().name(page)).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(dir, &format!("{name}-{}", sub.get_name()), sub.clone())?;
        }
        Ok(())
    }
    write(&dir, "rbuild", cmd)
}

/// `rbuild diff A B`; exits 1 when they differ.
fn diff_cmd(
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
    if !explain::diff_cmd(a, b, &store, &load, json)? {
        std::process::exit(1);
    }
    Ok(())
}

fn graph_cmd(arg: &str, format: GraphFormat) -> anyhow::Result<()> {
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

fn lock_cmd(
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

/// What `rbuild gc` keeps of what the roots were built from.
#[derive(Clone, Copy, ValueEnum)]
enum GcKeep {
    /// Everything the roots were built from, transitively: editing a recipe and realising it
    /// again rebuilds only what the edit changed (the last layer: three derivations)
    All,
    /// The roots and the fixed-output fetches they were built from: rebuilding needs no
    /// download, but builds every other step again
    Fetches,
    /// Only the roots' own outputs: rebuilding after an edit downloads and builds everything
    Roots,
}

fn gc_cmd(store: Option<PathBuf>, keep: GcKeep, dry_run: bool) -> anyhow::Result<()> {
    use rbuild_engine::progress::human_bytes as human;
    fn count(n: usize, what: &str) -> String {
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
    if dry_run {
        eprintln!(
            "gc --dry-run: would keep {} ({}) for {}; would delete {}, freeing {}",
            count(r.kept, "output"),
            human(r.kept_bytes),
            count(r.roots_kept, "root"),
            count(r.deleted, "output"),
            human(r.freed_bytes),
        );
        return Ok(());
    }
    if !r.unremovable.is_empty() {
        let map = rbuild_engine::sandbox::check_support()?;
        for p in &r.unremovable {
            rbuild_engine::sandbox::remove_as_mapped_root(Path::new(SELF_EXE), p, &map)?;
        }
    }
    let stale = match r.roots_dropped {
        0 => String::new(),
        n => format!("; {} dropped", count(n, "stale root")),
    };
    eprintln!(
        "gc: kept {} ({}) for {}; deleted {}, freed {}{stale}",
        count(r.kept, "output"),
        human(r.kept_bytes),
        count(r.roots_kept, "root"),
        count(r.deleted + r.unremovable.len(), "output"),
        human(r.freed_bytes + r.unremovable_bytes),
    );
    Ok(())
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
