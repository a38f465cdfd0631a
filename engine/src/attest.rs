//! `rbuild attest` and `rbuild verify-attestation`: provenance signed as DSSE envelopes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rbuild_engine::scheduler::Caches;
use rbuild_store::cache::{PublicKey, SecretKey};

use crate::setup::{
    full_disk, jobs_or_cores, open_engine, print_out, runtime, split_output, SourceArgs, StoreArgs,
};

#[derive(clap::Args)]
pub(crate) struct AttestArgs {
    /// A built-in recipe name or a path to a .toml recipe, optionally ^OUTPUT (default:
    /// provenance; with several architectures, provenance-ARCH)
    pub(crate) recipe: String,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// The key that signs (as `rbuild key generate` writes it)
    #[arg(long)]
    pub(crate) secret_key: PathBuf,
    /// Where to write the envelope
    #[arg(short = 'o', long = "output")]
    pub(crate) output: PathBuf,
    #[command(flatten)]
    pub(crate) source: SourceArgs,
}

/// `rbuild attest`: realise the statement and sign it.
pub(crate) fn attest_cmd(args: AttestArgs) -> anyhow::Result<()> {
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
pub(crate) fn verify_attestation(file: &Path, trusted_keys: &[String]) -> anyhow::Result<()> {
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
