//! Turning a locked recipe into the derivation graph: fetch → verify → unpack → configure → pack.

use std::collections::BTreeMap;
use std::path::Path;

use rbuild_engine::archive::oci::ImageConfig;
use rbuild_engine::{Derivation, DrvHash, Emulator, FixedOutput, Graph, Stage};
use serde::{Deserialize, Serialize};

use crate::debian::arch;
use crate::recipe::{Lock, PinnedFile, Recipe, RecipeError, Variant};

/// The named outputs of a recipe (`RECIPE^NAME`).
#[derive(Debug, Clone)]
pub struct Expanded {
    pub graph: Graph,
    /// `image`, `rootfs`, `tree`, `index`; with several architectures also each of them
    /// suffixed `-ARCH` (the unsuffixed ones are the first architecture's, but `image`, which
    /// is then the multi-platform index).
    pub outputs: BTreeMap<String, DrvHash>,
    /// The architectures built, the first first.
    pub arches: Vec<String>,
    /// The image's layer derivations, bottom first.
    pub layers: Vec<DrvHash>,
    /// The image's root filesystem as the first architecture's base tree, then each layered
    /// recipe's change sets (bottom first): what a layer on top is built from.
    pub stack: Vec<DrvHash>,
    pub config: ImageConfig,
    pub source_date_epoch: i64,
    /// The recipe's `[limits]` (a layered recipe's over its base's).
    pub limits: crate::recipe::BuildLimits,
    /// What the image's SBOMs and provenance are made from (one architecture only).
    pub evidence: Option<crate::evidence::Evidence>,
}

impl Expanded {
    pub const DEFAULT_OUTPUT: &'static str = "image";

    pub fn output(&self, name: Option<&str>) -> Result<&DrvHash, RecipeError> {
        let n = name.unwrap_or(Self::DEFAULT_OUTPUT);
        self.outputs
            .get(n)
            .ok_or_else(|| RecipeError::UnknownOutput {
                name: n.to_owned(),
                available: self.outputs.keys().cloned().collect(),
            })
    }
}

/// Arguments of the configure builder (one JSON argument).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigurePlan {
    pub variant: Variant,
    pub architecture: String,
    pub merged_usr: bool,
    /// In install order. `unpacked` and `deb` index the derivation's inputs.
    pub packages: Vec<ConfigurePackage>,
    /// The input holding the packages' stanzas of the signed index, as debootstrap writes them
    /// to dpkg's `available` (the debootstrap variant, whose `.deb`s are checked against them);
    /// without it, input 0 is the verified index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<usize>,
    /// The suite's `exclude-dependencies`, which debootstrap's dependency walk skips.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_dependencies: Vec<String>,
    /// The recipe's `[apt-sources]`, rendered (absent when unset, so recipes without it keep
    /// their derivation hashes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apt_sources: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigurePackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// In debootstrap's required set: extracted before dpkg first runs, and configured before
    /// the base set is unpacked.
    pub required: bool,
    /// The input holding the package unpacked by its own derivation (the extract variant);
    /// configure unpacks the debootstrap variant's required set itself, from the `.deb`.
    pub unpacked: Option<usize>,
    /// The input holding the `.deb`.
    pub deb: usize,
}

pub fn fetch(name: String, path: &str, sha256: &str, size: u64) -> Derivation {
    Derivation {
        name,
        stage: Stage::Fetch,
        builder: "builtin:fetch".into(),
        args: vec![path.to_owned()],
        env: BTreeMap::new(),
        inputs: vec![],
        system: None,
        fixed_output: Some(FixedOutput {
            sha256: sha256.to_owned(),
            size,
        }),
    }
}

pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Why a recipe could not be turned into its graph.
#[derive(Debug, thiserror::Error)]
pub enum ExpandError {
    #[error(transparent)]
    Graph(#[from] rbuild_engine::graph::GraphError),
    #[error(transparent)]
    Recipe(#[from] Box<crate::recipe::RecipeError>),
    #[error(
        "the lock pins no packages for {0}; run `rbuild lock` with that architecture (`--arch`)"
    )]
    ArchNotLocked(String),
    #[error("building {target} on this {host} machine needs an emulator, and the lock pins none for {host}: the recipe needs an [emulator] section (the package of its suite with static qemu-user binaries), then `rbuild lock` on this machine")]
    NoEmulator { target: String, host: String },
}

/// Downloading package `p`'s `.deb`, pinned.
pub fn fetch_package(p: &crate::recipe::PinnedPackage) -> Derivation {
    fetch(
        base_name(&p.filename).to_owned(),
        &p.filename,
        &p.sha256,
        p.size,
    )
}

/// Unpacking package `p`'s `.deb` (checked against the verified index `verify` first).
fn unpack_drv(p: &crate::recipe::PinnedPackage, verify: DrvHash, deb: DrvHash) -> Derivation {
    Derivation {
        name: format!("{}_{}_{}", p.name, p.version, p.architecture),
        stage: Stage::Unpack,
        builder: "builtin:debian-unpack".into(),
        args: vec![p.name.clone(), p.version.clone(), p.architecture.clone()],
        env: BTreeMap::new(),
        inputs: vec![verify, deb],
        system: None,
        fixed_output: None,
    }
}

/// The fetch of a pinned `Packages` index.
fn index_fetch(idx: &PinnedFile) -> Derivation {
    fetch(idx.path.replace('/', "_"), &idx.path, &idx.sha256, idx.size)
}

/// The `verify` derivation of `indices` (and of the InRelease that lists them), named `name`,
/// with their fetches: the compact verified index packages are checked against.
fn verified_index(
    g: &mut Graph,
    recipe: &Recipe,
    keyring: &[u8],
    lock: &Lock,
    indices: &[PinnedFile],
    name: String,
) -> Result<DrvHash, ExpandError> {
    let mut inputs = vec![g.add(fetch(
        format!("{}-InRelease", lock.suite),
        &lock.inrelease.path,
        &lock.inrelease.sha256,
        lock.inrelease.size,
    ))?];
    let mut args = vec![
        lock.suite.clone(),
        String::from_utf8_lossy(keyring).into_owned(),
        recipe.fingerprints.join(","),
        lock.source_date_epoch.to_string(),
    ];
    for idx in indices {
        inputs.push(g.add(index_fetch(idx))?);
        args.push(idx.path.clone());
    }
    Ok(g.add(Derivation {
        name,
        stage: Stage::Verify,
        builder: "builtin:debian-verify".into(),
        args,
        env: BTreeMap::new(),
        inputs,
        system: None,
        fixed_output: None,
    })?)
}

/// The `available` derivation: the stanzas `packages` have in the indices `verify` checks, as
/// debootstrap hands them to dpkg and the SBOMs read them. It runs beside `verify`, not after
/// it: it takes `verify`'s own inputs and arguments (the InRelease, the keys, the suite and
/// date, the indices) and makes the same checks itself before it reads an index, so that no
/// byte the signature does not cover is decompressed, and a bad index fails with `verify`'s
/// message whichever of the two fails first.
pub fn available_drv(
    g: &mut Graph,
    name: String,
    verify: &DrvHash,
    packages: &[String],
) -> Result<DrvHash, ExpandError> {
    let v =
        g.get(verify)
            .cloned()
            .ok_or_else(|| rbuild_engine::graph::GraphError::MissingInput {
                name: name.clone(),
                input: verify.clone(),
            })?;
    let mut args = v.args;
    args.push("--".into());
    args.extend(packages.iter().cloned());
    Ok(g.add(Derivation {
        name,
        stage: Stage::Verify,
        builder: "builtin:debian-available".into(),
        args,
        env: BTreeMap::new(),
        inputs: v.inputs,
        system: None,
        fixed_output: None,
    })?)
}

/// When the recipe's architecture is foreign to this machine: the emulator the lock pins for
/// this machine's architecture — its index verified against the same InRelease, its `.deb`
/// checked and unpacked like any other — set as the graph's emulator for that architecture.
/// Nothing of it enters the hash of any derivation of the recipe's architecture.
fn add_emulator(
    g: &mut Graph,
    recipe: &Recipe,
    keyring: &[u8],
    lock: &Lock,
) -> Result<(), ExpandError> {
    let (Some(host), Some(target)) = (arch::host(), arch::by_name(&recipe.architecture)) else {
        return Ok(());
    };
    if !arch::needs_emulator(host, target.debian) {
        return Ok(());
    }
    let no_emulator = || ExpandError::NoEmulator {
        target: target.debian.to_owned(),
        host: host.debian.to_owned(),
    };
    let source = recipe.emulator.as_ref().ok_or_else(no_emulator)?;
    let pin = lock
        .emulators
        .iter()
        .find(|e| e.host == host.debian)
        .ok_or_else(no_emulator)?;
    let verify = verified_index(
        g,
        recipe,
        keyring,
        lock,
        std::slice::from_ref(&pin.index),
        format!("{}-{}-verified-index", lock.suite, host.debian),
    )?;
    let deb = g.add(fetch_package(&pin.package))?;
    let unpacked = g.add(unpack_drv(&pin.package, verify, deb))?;
    let interpreter = source.interpreter.replace("{qemu}", target.qemu);
    g.set_emulator(
        target.debian,
        Emulator {
            drv: unpacked,
            interpreter: format!("data/{}", interpreter.trim_start_matches('/')),
            // Debian's own name for it, so a host registration (kernels before 6.7) is found.
            name: format!("qemu-{}", target.qemu),
            magic: target.magic.to_owned(),
            mask: target.mask.to_owned(),
        },
    )?;
    Ok(())
}

/// The graph of `recipe` (each of its architectures, from its lock's pins for it).
pub fn expand(recipe: &Recipe, keyring: &[u8], lock: &Lock) -> Result<Expanded, ExpandError> {
    let mut g = Graph::new();
    let arches = recipe.arches();
    let mut per_arch = Vec::new();
    for a in &arches {
        let pinned = lock
            .for_arch(a)
            .ok_or_else(|| ExpandError::ArchNotLocked(a.clone()))?;
        per_arch.push(expand_arch(&mut g, &recipe.for_arch(a), keyring, pinned)?);
    }
    let first = per_arch.remove(0);
    let mut outputs = first.outputs.clone();
    if !per_arch.is_empty() {
        let mut images = vec![first.outputs["image"].clone()];
        for (k, v) in &first.outputs {
            outputs.insert(format!("{k}-{}", arches[0]), v.clone());
        }
        for (a, e) in arches[1..].iter().zip(&per_arch) {
            images.push(e.outputs["image"].clone());
            for (k, v) in &e.outputs {
                outputs.insert(format!("{k}-{a}"), v.clone());
            }
        }
        let index = g.add(Derivation {
            name: format!("{}-oci-index", recipe.name),
            stage: Stage::Pack,
            builder: "builtin:pack-oci-index".into(),
            args: vec![recipe.name.clone()],
            env: sde_env(lock.source_date_epoch),
            inputs: images,
            system: None,
            fixed_output: None,
        })?;
        outputs.insert("image".into(), index);
    }
    Ok(Expanded {
        graph: g,
        outputs,
        arches,
        layers: first.layers,
        stack: vec![first.outputs["tree"].clone()],
        config: first.config,
        source_date_epoch: lock.source_date_epoch,
        limits: recipe.limits,
        // Evidence of a stack of layers is the one architecture's (layered recipes build one).
        evidence: per_arch.is_empty().then_some(first.evidence),
    })
}

/// One architecture's part of a recipe's graph.
struct ArchExpanded {
    outputs: BTreeMap<String, DrvHash>,
    layers: Vec<DrvHash>,
    config: ImageConfig,
    evidence: crate::evidence::Evidence,
}

fn expand_arch(
    g: &mut Graph,
    recipe: &Recipe,
    keyring: &[u8],
    lock: &Lock,
) -> Result<ArchExpanded, ExpandError> {
    let sde = sde_env(lock.source_date_epoch);

    let verify = verified_index(
        g,
        recipe,
        keyring,
        lock,
        &lock.indices,
        format!("{}-verified-index", lock.suite),
    )?;
    add_emulator(g, recipe, keyring, lock)?;
    let mut configure_inputs = Vec::new();
    let layer_history = format!(
        "rbuild {} {} {} {:?} ({} packages)",
        recipe.name,
        recipe.suite,
        recipe.architecture,
        recipe.variant,
        lock.packages.len()
    );
    let evidence =
        crate::evidence::Evidence::of_debian(recipe, lock, verify.clone(), &layer_history);
    // The packages' stanzas: dpkg's `available` (the debootstrap variant), and the SBOMs'.
    let stanzas = evidence.stanzas(g)?;
    // The debootstrap variant's configure checks the `.deb`s against the stanzas (made from
    // the signed index, beside `verify`), and so starts without waiting for `verify`.
    let available = match recipe.variant {
        Variant::Debootstrap => {
            configure_inputs.push(stanzas.clone());
            Some(configure_inputs.len() - 1)
        }
        Variant::Extract => {
            configure_inputs.push(verify.clone());
            None
        }
    };
    let mut plan = ConfigurePlan {
        variant: recipe.variant,
        architecture: recipe.architecture.clone(),
        merged_usr: recipe.merged_usr,
        packages: vec![],
        available,
        exclude_dependencies: recipe.exclude_dependencies.clone(),
        apt_sources: recipe
            .apt_sources
            .as_ref()
            .map(|a| a.render(recipe, Path::new(&recipe.name)).map_err(Box::new))
            .transpose()?,
    };
    for p in &lock.packages {
        let deb = g.add(fetch_package(p))?;
        // The extract variant's packages are unpacked each in its own derivation. The
        // debootstrap variant's configure extracts the required set itself, from the `.deb`s,
        // on every core: cold, an unpack derivation per package kept configure waiting for a
        // hundred sandboxes and their store writes (about 3 s of a 20 s bullseye build), for
        // about 1 s saved when a point release changes a few of them.
        let unpack = recipe.variant == Variant::Extract;
        let unpacked = if unpack {
            configure_inputs.push(g.add(unpack_drv(p, verify.clone(), deb.clone()))?);
            Some(configure_inputs.len() - 1)
        } else {
            None
        };
        configure_inputs.push(deb);
        plan.packages.push(ConfigurePackage {
            name: p.name.clone(),
            version: p.version.clone(),
            architecture: p.architecture.clone(),
            required: p.required,
            unpacked,
            deb: configure_inputs.len() - 1,
        });
    }
    let tree = g.add(Derivation {
        name: format!("{}-rootfs", recipe.name),
        stage: Stage::Configure,
        builder: "builtin:debian-configure".into(),
        args: vec![serde_json::to_string(&plan).expect("plan serializes")],
        env: sde.clone(),
        inputs: configure_inputs,
        // dpkg and the maintainer scripts are programs of the recipe's architecture.
        system: Some(recipe.architecture.clone()),
        fixed_output: None,
    })?;
    let rootfs = rootfs_tar(g, &recipe.name, &tree, lock.source_date_epoch)?;
    let layer = g.add(Derivation {
        name: format!("{}-layer", recipe.name),
        stage: Stage::Pack,
        builder: "builtin:pack-layer".into(),
        args: std::iter::once(layer_history.clone())
            .chain(recipe.image.compression.layer_args())
            .collect(),
        env: sde.clone(),
        // The tree, not `rootfs`: the layer streams the same tar into its compressor, and an
        // image needs no 200 MB tar in the store (`^rootfs` and the provenance still make it).
        inputs: vec![tree.clone()],
        system: None,
        fixed_output: None,
    })?;
    let config = ImageConfig {
        architecture: recipe.architecture.clone(),
        os: "linux".into(),
        created: rbuild_engine::archive::oci::rfc3339(lock.source_date_epoch),
        cmd: recipe.image.cmd.clone(),
        entrypoint: recipe.image.entrypoint.clone(),
        env: if recipe.image.env.is_empty() {
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()]
        } else {
            recipe.image.env.clone()
        },
        user: None,
        working_dir: None,
        labels: BTreeMap::new(),
    };
    let layers = vec![layer];
    let (image, extra) = image_with_evidence(
        g,
        &recipe.name,
        &layers,
        &config,
        lock.source_date_epoch,
        &evidence,
        &rootfs,
        std::slice::from_ref(&tree),
    )?;
    let outputs = [
        ("image", image),
        ("rootfs", rootfs),
        ("tree", tree),
        ("index", verify),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .chain(extra)
    .collect();
    Ok(ArchExpanded {
        outputs,
        layers,
        config,
        evidence,
    })
}

fn sde_env(sde: i64) -> BTreeMap<String, String> {
    [("SOURCE_DATE_EPOCH".to_owned(), sde.to_string())]
        .into_iter()
        .collect()
}

/// The deterministic tar of a tree (`^rootfs`).
pub fn rootfs_tar(
    g: &mut Graph,
    name: &str,
    tree: &DrvHash,
    sde: i64,
) -> Result<DrvHash, rbuild_engine::graph::GraphError> {
    g.add(Derivation {
        name: format!("{name}-rootfs.tar"),
        stage: Stage::Pack,
        builder: "builtin:pack-tar".into(),
        args: vec![],
        env: sde_env(sde),
        inputs: vec![tree.clone()],
        system: None,
        fixed_output: None,
    })
}

/// The OCI image of `layers` (bottom first) with `config`, its SBOMs attached as OCI referrers,
/// and the image's evidence outputs (`spdx`, `cyclonedx`, `provenance`) of `ev`.
#[allow(clippy::too_many_arguments)]
pub fn image_with_evidence(
    g: &mut Graph,
    name: &str,
    layers: &[DrvHash],
    config: &ImageConfig,
    sde: i64,
    ev: &crate::evidence::Evidence,
    rootfs: &DrvHash,
    trees: &[DrvHash],
) -> Result<(DrvHash, Vec<(String, DrvHash)>), ExpandError> {
    let args = vec![
        serde_json::to_string(config).expect("config serializes"),
        name.to_owned(),
    ];
    // The SBOMs describe the image by its manifest, which the layer blobs are not needed for.
    let manifest = g.add(Derivation {
        name: format!("{name}-oci-manifest"),
        stage: Stage::Pack,
        builder: "builtin:pack-oci-manifest".into(),
        args: args.clone(),
        env: sde_env(sde),
        inputs: layers.to_vec(),
        system: None,
        fixed_output: None,
    })?;
    let mut outputs = crate::evidence::sboms(g, ev, &manifest, trees)?;
    let kinds: Vec<&str> = crate::evidence::SBOM_FORMATS
        .iter()
        .map(|(_, kind)| *kind)
        .collect();
    let mut args = args;
    args.push(serde_json::to_string(&kinds).expect("strings serialize"));
    let image = g.add(Derivation {
        name: format!("{name}-oci"),
        stage: Stage::Pack,
        builder: "builtin:pack-oci".into(),
        args,
        env: sde_env(sde),
        inputs: layers
            .iter()
            .chain(outputs.iter().map(|(_, sbom)| sbom))
            .cloned()
            .collect(),
        system: None,
        fixed_output: None,
    })?;
    outputs.push((
        "provenance".to_owned(),
        crate::evidence::provenance(g, ev, &image, rootfs)?,
    ));
    Ok((image, outputs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{load, AptSources};

    /// `[image] compression = "zstd"` reaches the layer's derivation only when set: gzip layers
    /// (every built-in recipe's) keep their derivation hashes.
    #[test]
    fn compression_enters_the_layer_only_when_zstd() {
        let l = load("debian-bookworm").unwrap();
        let lock = l.require_lock().unwrap();
        let layer = |ex: &Expanded| ex.graph.get(&ex.layers[0]).unwrap().clone();
        let plain = expand(&l.recipe, &l.keyring, lock).unwrap();
        assert_eq!(layer(&plain).args.len(), 1, "the history line alone");
        let mut r = l.recipe.clone();
        r.image.compression = crate::recipe::Compression::Zstd;
        let zstd = expand(&r, &l.keyring, lock).unwrap();
        assert!(
            layer(&zstd).args[1].starts_with("zstd@1."),
            "{:?}",
            layer(&zstd).args
        );
        assert_eq!(plain.outputs["tree"], zstd.outputs["tree"]);
        assert_ne!(plain.outputs["image"], zstd.outputs["image"]);
        let bad = toml::from_str::<crate::recipe::ImageSection>("compression = \"lz4\"");
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown variant `lz4`"));
    }

    /// `[apt-sources]` reaches the configure plan only when set: recipes without it (every
    /// built-in) keep their derivation hashes.
    #[test]
    fn apt_sources_enter_the_configure_plan_only_when_set() {
        let l = load("debian-bookworm").unwrap();
        let lock = l.require_lock().unwrap();
        let plain = expand(&l.recipe, &l.keyring, lock).unwrap();
        let tree = |ex: &Expanded| ex.graph.get(&ex.outputs["tree"]).unwrap().clone();
        assert!(!tree(&plain).args[0].contains("apt_sources"));
        let mut r = l.recipe.clone();
        r.apt_sources = Some(AptSources {
            uri: "https://mirror.example/debian".into(),
            suites: vec![],
            components: vec![],
            signed_by: None,
        });
        let with = expand(&r, &l.keyring, lock).unwrap();
        assert!(tree(&with).args[0].contains("URIs: https://mirror.example/debian"));
        assert_ne!(plain.outputs["tree"], with.outputs["tree"]);
    }
}
