//! `rbuild lock`: resolve a recipe against the archive's *verified* index and pin the result.

use anyhow::{bail, Context};
use rbuild_engine::builtins::fetch::Fetcher;

use crate::debian::{self, arch, packages, resolve};
use crate::recipe::{EmulatorPin, Lock, PinnedFile, PinnedPackage, Recipe, ResolvedFor};

/// What a verified archive offers: the InRelease bytes, its signed Release, the pinned indices
/// and every package they list.
struct VerifiedArchive {
    inrelease: Vec<u8>,
    release: debian::release::Release,
    indices: Vec<PinnedFile>,
    packages: Vec<packages::Package>,
}

/// Download and verify the InRelease (against the pinned keys) and the Packages indices
/// (against the signed Release).
async fn fetch_verified(
    recipe: &Recipe,
    keyring: &[u8],
    fetcher: &Fetcher,
) -> anyhow::Result<VerifiedArchive> {
    let suite = &recipe.suite;
    let inrelease_path = format!("dists/{suite}/InRelease");
    let inrelease = fetcher.get_bytes(&inrelease_path).await?;
    let release = debian::release::verify_inrelease(
        &inrelease_path,
        &inrelease,
        keyring,
        &recipe.fingerprints,
    )?;
    let mut indices = Vec::new();
    let mut all = Vec::new();
    for comp in &recipe.components {
        let (pin, pkgs) = fetch_index(fetcher, &release, suite, comp, &recipe.architecture).await?;
        indices.push(pin);
        all.extend(pkgs);
    }
    Ok(VerifiedArchive {
        inrelease,
        release,
        indices,
        packages: all,
    })
}

/// One component's `Packages` index for `arch`, checked against the signed Release: its pin and
/// its packages.
async fn fetch_index(
    fetcher: &Fetcher,
    release: &debian::release::Release,
    suite: &str,
    comp: &str,
    arch: &str,
) -> anyhow::Result<(PinnedFile, Vec<packages::Package>)> {
    let rel = ["xz", "gz"]
        .iter()
        .map(|ext| format!("{comp}/binary-{arch}/Packages.{ext}"))
        .find(|r| release.sha256.contains_key(r))
        .with_context(|| format!("dists/{suite}/InRelease: the signed Release lists no Packages.xz or Packages.gz for {comp}/binary-{arch}"))?;
    let path = format!("dists/{suite}/{rel}");
    let bytes = fetcher.get_bytes(&path).await?;
    debian::release::check_file(&rel, &bytes, release)?;
    let text = String::from_utf8(packages::decompress(&path, &bytes)?)
        .with_context(|| format!("{path}: not UTF-8"))?;
    let pkgs = packages::parse_packages(&path, &text)?;
    let entry = &release.sha256[&rel];
    Ok((
        PinnedFile {
            path,
            sha256: entry.sha256.clone(),
            size: entry.size,
        },
        pkgs,
    ))
}

/// The emulator pins `recipe` needs: for each machine architecture that may build it (the
/// machine locking, and the recipe's architectures) on which its architecture is foreign, the recipe's
/// `[emulator]` package from that architecture's index.
async fn emulator_pins(
    recipe: &Recipe,
    all: &[String],
    fetcher: &Fetcher,
    release: &debian::release::Release,
) -> anyhow::Result<Vec<EmulatorPin>> {
    let Some(source) = &recipe.emulator else {
        return Ok(vec![]);
    };
    let mut hosts: Vec<&str> = all.iter().map(String::as_str).collect();
    if let Some(h) = arch::host() {
        hosts.push(h.debian);
    }
    hosts.sort();
    hosts.dedup();
    let mut pins = Vec::new();
    for host in hosts {
        let Some(h) = arch::by_name(host) else {
            continue;
        };
        if !arch::needs_emulator(h, &recipe.architecture) {
            continue;
        }
        let comp = recipe
            .components
            .first()
            .context("the recipe lists no component")?;
        let (index, pkgs) = fetch_index(fetcher, release, &recipe.suite, comp, host).await?;
        let best = pkgs
            .iter()
            .filter(|p| p.name == source.package && p.architecture == host)
            .max_by(|a, b| resolve::compare_versions(&a.version, &b.version))
            .with_context(|| {
                format!(
                    "{}: no package {} for {host} (the recipe's [emulator] package)",
                    index.path, source.package
                )
            })?;
        pins.push(EmulatorPin {
            host: host.to_owned(),
            index,
            package: pin(best),
        });
    }
    Ok(pins)
}

/// Every package of the recipe's archive, from a verified index. With `pinned`, the archive must
/// still be the one that lock was made from.
pub async fn verified_packages(
    recipe: &Recipe,
    keyring: &[u8],
    fetcher: &Fetcher,
    pinned: Option<&Lock>,
) -> anyhow::Result<Vec<packages::Package>> {
    let archive = fetch_verified(recipe, keyring, fetcher).await?;
    if let Some(lock) = pinned {
        let actual = sha256_hex(&archive.inrelease);
        if actual != lock.inrelease.sha256 {
            bail!(
                "{}: the archive changed since the base was locked (InRelease sha256 {actual}, the base lock pins {}); run `rbuild lock` on the base first",
                lock.inrelease.path,
                lock.inrelease.sha256
            );
        }
    }
    Ok(archive.packages)
}

/// The lock entry of a package.
pub fn pin(p: &packages::Package) -> PinnedPackage {
    PinnedPackage {
        name: p.name.clone(),
        version: p.version.clone(),
        architecture: p.architecture.clone(),
        essential: p.essential,
        required: false,
        filename: p.filename.clone(),
        sha256: p.sha256.clone(),
        size: p.size,
    }
}

/// Download and verify the InRelease and indices, resolve the package set, and return the lock.
/// With several architectures, the first's lock carries the others' (made against the same
/// InRelease).
pub async fn lock(recipe: &Recipe, keyring: &[u8], fetcher: &Fetcher) -> anyhow::Result<Lock> {
    let arches = recipe.arches();
    let mut first = lock_one(&recipe.for_arch(&arches[0]), &arches, keyring, fetcher).await?;
    for a in &arches[1..] {
        let other = lock_one(&recipe.for_arch(a), &arches, keyring, fetcher).await?;
        if other.inrelease != first.inrelease {
            bail!(
                "{}: the archive changed while {a} was being locked; run `rbuild lock` again",
                first.inrelease.path
            );
        }
        first.others.push(other);
    }
    Ok(first)
}

/// The lock of one architecture; `all` are the recipe's architectures (a machine of any of them
/// may build this one: the emulators are pinned for those).
async fn lock_one(
    recipe: &Recipe,
    all: &[String],
    keyring: &[u8],
    fetcher: &Fetcher,
) -> anyhow::Result<Lock> {
    let suite = &recipe.suite;
    let archive = fetch_verified(recipe, keyring, fetcher).await?;
    let request = resolve::Request {
        include: &recipe.include,
        also_required: &recipe.also_required,
        exclude_dependencies: &recipe.exclude_dependencies,
    };
    let selected = resolve::resolve_request(&archive.packages, &recipe.architecture, &request)?;
    if selected.is_empty() {
        bail!("{suite}: resolution selected no packages");
    }
    let order = resolve::install_order(&selected);
    let required = resolve::required_set(&selected, &request);
    // debootstrap walks the whole archive; within the selection the walk must reach the same
    // packages, or the selection is not debootstrap's.
    let walked = resolve::required_set_within(
        archive
            .packages
            .iter()
            .filter(|p| p.architecture == recipe.architecture || p.architecture == "all"),
        &selected,
        &request,
    );
    if let Some(missing) = walked.iter().find(|n| !required.contains(*n)) {
        bail!("{suite}: debootstrap's required set would include {missing}, which the resolution did not select; the package set would not be debootstrap's");
    }
    if recipe.variant == crate::recipe::Variant::Debootstrap && required.is_empty() {
        bail!("{suite}: no package of the archive has Priority: required, so debootstrap's required set is empty and the system cannot be configured as debootstrap does");
    }
    let by_name: std::collections::HashMap<&str, &packages::Package> =
        selected.iter().map(|p| (p.name.as_str(), p)).collect();
    let packages = order
        .iter()
        .map(|n| {
            let p = by_name[n.as_str()];
            PinnedPackage {
                required: required.contains(&p.name),
                ..pin(p)
            }
        })
        .collect();
    Ok(Lock {
        suite: suite.clone(),
        architecture: recipe.architecture.clone(),
        source_date_epoch: archive.release.source_date_epoch,
        inrelease: PinnedFile {
            path: format!("dists/{suite}/InRelease"),
            sha256: sha256_hex(&archive.inrelease),
            size: archive.inrelease.len() as u64,
        },
        indices: archive.indices,
        packages,
        resolved: Some(ResolvedFor::of(recipe)),
        emulators: emulator_pins(recipe, all, fetcher, &archive.release).await?,
        others: vec![],
    })
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(b))
}
