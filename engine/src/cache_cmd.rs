//! Binary caches on the command line: `--substituter`/`--push-to`, `rbuild key`, and
//! `rbuild cache push|check`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Subcommand;
use rbuild_engine::scheduler::Caches;
use rbuild_store::cache::{PublicKey, SecretKey};

use crate::setup::{config, load_locked, open_cache, open_store, split_output, StoreArgs};

#[derive(clap::Args, Default)]
pub(crate) struct CacheArgs {
    /// Substitute outputs from this binary cache (repeatable; also `substituters` in config.toml)
    #[arg(long = "substituter")]
    pub(crate) substituters: Vec<String>,
    /// Trust cache entries signed by this public key: a file or NAME:BASE64 (repeatable)
    #[arg(long = "trusted-key")]
    pub(crate) trusted_keys: Vec<String>,
    /// Push what this run builds to this binary cache (needs --secret-key)
    #[arg(long)]
    pub(crate) push_to: Option<String>,
    /// The secret key that signs pushed entries
    #[arg(long)]
    pub(crate) secret_key: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// Write a new key pair: SECRET (keep it private) and PUBLIC (give it to those who trust you)
    Generate {
        name: String,
        secret: PathBuf,
        public: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum CacheCommand {
    /// Contact binary caches and say what each is (default: the substituters and push-to of
    /// config.toml)
    Check { urls: Vec<String> },
    /// Push every output of RECIPE's graph that is valid in the store
    Push {
        recipe: String,
        #[command(flatten)]
        store: StoreArgs,
        /// The binary cache: file:///DIR, http(s)://URL, grpc(s)://HOST:PORT[/INSTANCE] or
        /// docker://HOST[:PORT]/REPOSITORY
        #[arg(long)]
        to: String,
        #[arg(long)]
        secret_key: PathBuf,
    },
}

/// Flags first, then the config file.
pub(crate) fn caches(args: CacheArgs) -> anyhow::Result<Caches> {
    let cfg = config()?;
    let mut c = Caches::default();
    for url in args.substituters.iter().chain(&cfg.substituters) {
        c.substituters.push(Arc::from(open_cache(url)?));
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
            Arc::from(open_cache(&url)?),
            Arc::new(SecretKey::read(&key)?),
        ));
    }
    Ok(c)
}

pub(crate) fn key_cmd(cmd: KeyCommand) -> anyhow::Result<()> {
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

pub(crate) fn cache_cmd(cmd: CacheCommand) -> anyhow::Result<()> {
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
    let cache = open_cache(&to)?;
    let key = SecretKey::read(&secret_key)?;
    push_closure(&store, &expanded.graph, &target, cache.as_ref(), &key)
}

/// Sign and push every output of `target`'s closure that `store` holds to `cache` (what the
/// cache already has is not uploaded again).
pub(crate) fn push_closure(
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

pub(crate) fn cache_check(mut urls: Vec<String>) -> anyhow::Result<()> {
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
        match open_cache(url).and_then(|c| Ok(c.check()?)) {
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
