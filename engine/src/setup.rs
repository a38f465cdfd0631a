//! What the commands share: the configuration file, the mirrors, the store and the engine, and
//! recipes loaded with their locks (re-locking only what an edit needs).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rbuild_engine::builtins::fetch::Fetcher;
use rbuild_engine::builtins::Builtins;
use rbuild_engine::progress::Progress;
use rbuild_engine::scheduler::Caches;
use rbuild_engine::Engine;
use rbuild_recipes::{expand, layers, mirror, recipe, relock};
use rbuild_store::Store;

#[derive(clap::Args)]
pub(crate) struct StoreArgs {
    /// The store directory [default: $XDG_DATA_HOME/rbuild/store]
    #[arg(long, env = "RBUILD_STORE", global = true)]
    pub(crate) store: Option<PathBuf>,
}

/// Where a recipe's bytes come from and which lock and architectures it is built with: what
/// `realise`, `check` and `attest` share.
#[derive(clap::Args)]
pub(crate) struct SourceArgs {
    /// Debian mirror URL (http://, https:// or file://); repeatable: each file comes from the
    /// first that has its pinned bytes [default: RBUILD_MIRROR (space-separated URLs), else
    /// config.toml's `mirrors`, else the host's apt configuration]
    #[arg(long, env = "RBUILD_MIRROR", value_name = "URL")]
    pub(crate) mirror: Vec<String>,
    /// Never touch the network; fail clearly when something is missing from the store
    #[arg(long)]
    pub(crate) offline: bool,
    /// Build these architectures instead of the recipe's (comma-separated, e.g. amd64,arm64;
    /// the lock must pin them): the image is then one multi-platform index
    #[arg(long, value_delimiter = ',', value_name = "ARCH")]
    pub(crate) arch: Vec<String>,
    /// Build with this lock instead of the recipe's own (one `rbuild lock RECIPE --output FILE`
    /// wrote); it is never rewritten
    #[arg(long, value_name = "FILE")]
    pub(crate) lock: Option<PathBuf>,
}

impl SourceArgs {
    /// RECIPE (without its `^OUTPUT`) expanded with its lock (re-locked as `realise` does unless
    /// `locked`), and the fetcher for what the store lacks.
    /// `locked` names what forbids re-locking (`--locked`, a command that never writes locks).
    pub(crate) fn load(
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

/// What one build step may use; a step that reaches a limit is stopped and named.
#[derive(clap::Args)]
pub(crate) struct LimitArgs {
    /// Wall-clock seconds one build step may take [default: 14400]
    #[arg(long, env = "RBUILD_MAX_BUILD_TIME")]
    pub(crate) max_build_time: Option<u64>,
    /// Bytes one build step may write (output and scratch) [default: 64 GiB]
    #[arg(long, env = "RBUILD_MAX_BUILD_BYTES")]
    pub(crate) max_build_bytes: Option<u64>,
    /// Processes one build step may run at once [default: 4096; not enforced for root]
    #[arg(long, env = "RBUILD_MAX_BUILD_PROCESSES")]
    pub(crate) max_build_processes: Option<u64>,
}

impl LimitArgs {
    /// The command line's limits, else the recipe's, else the defaults.
    pub(crate) fn limits(
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

/// `$XDG_CONFIG_HOME/rbuild/config.toml`
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Config {
    /// Debian mirrors, tried in order per file (when no --mirror or RBUILD_MIRROR is given).
    #[serde(default)]
    pub(crate) mirrors: Vec<String>,
    #[serde(default)]
    pub(crate) substituters: Vec<String>,
    #[serde(default)]
    pub(crate) trusted_keys: Vec<String>,
    #[serde(default)]
    pub(crate) push_to: Option<String>,
    #[serde(default)]
    pub(crate) secret_key: Option<PathBuf>,
    /// Registries (`HOST[:PORT]`) that `docker://` caches may reach in plain HTTP, besides
    /// loopback ones.
    #[serde(default)]
    pub(crate) insecure_registries: Vec<String>,
}

/// Open the binary cache `url`, with config.toml's `insecure-registries`.
pub(crate) fn open_cache(url: &str) -> anyhow::Result<Box<dyn rbuild_store::cache::BinaryCache>> {
    rbuild_store::cache::registry::allow_plain_http(&config()?.insecure_registries);
    Ok(rbuild_store::cache::open(url)?)
}

pub(crate) fn config() -> anyhow::Result<Config> {
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
pub(crate) fn mirrors(flags: &[String]) -> anyhow::Result<Vec<String>> {
    Ok(mirror::choose_all(flags, &config()?.mirrors))
}

/// What the sandbox re-executes: this very binary, even if its file was replaced meanwhile.
pub(crate) const SELF_EXE: &str = "/proc/self/exe";

pub(crate) fn builtins() -> Builtins {
    let mut b = Builtins::new();
    rbuild_recipes::builders::register(&mut b);
    b
}

pub(crate) fn default_store(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
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
pub(crate) fn open_store(flag: Option<PathBuf>) -> anyhow::Result<Store> {
    let dir = default_store(flag)?;
    Store::open(&dir)
        .map_err(|e| full_disk(&dir, e))
        .with_context(|| format!("opening the store at {}", dir.display()))
}

/// `-j N`, or the number of cores.
pub(crate) fn jobs_or_cores(jobs: Option<usize>) -> usize {
    jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    })
}

/// The engine every building command uses: this binary as the sandbox, the walls (all of them
/// unless rbuild's tests say otherwise) and the build steps' limits.
pub(crate) fn engine(
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
pub(crate) fn open_engine(
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
pub(crate) fn split_output(arg: &str) -> (&str, Option<&str>) {
    match arg.rsplit_once('^') {
        Some((r, o)) => (r, Some(o)),
        None => (arg, None),
    }
}

pub(crate) fn runtime(jobs: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(jobs.max(2))
        .enable_all()
        .build()?)
}

/// Lock `recipe` against the archive (through `fetcher`) and write its lock to `dest`.
pub(crate) fn lock_to(
    recipe: &layers::AnyRecipe,
    fetcher: &Fetcher,
    dest: &Path,
) -> anyhow::Result<String> {
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
pub(crate) fn load_locked(
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

/// `err`, with "no space left on device on the filesystem holding STORE" (and `rbuild gc`) in
/// front when it is a full disk.
pub(crate) fn full_disk<E: std::error::Error + Send + Sync + 'static>(
    store: &Path,
    err: E,
) -> anyhow::Error {
    match rbuild_engine::nospace::diagnose(store, &err) {
        Some(full) => anyhow::Error::new(err).context(full.to_string()),
        None => err.into(),
    }
}

/// Write to stdout; a reader that went away (`rbuild graph … | head`) is not an error.
pub(crate) fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
