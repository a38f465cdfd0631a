//! Layered recipes: container layers composed on top of a base image, each its own derivation.
//!
//! ```toml
//! base = "debian-bullseye"          # a built-in recipe, or a path to another recipe
//! [[layers]]
//! packages = ["curl"]               # resolved against the base's archive, pinned in the lock
//! [[layers]]
//! copy = [{ from = "files/motd", to = "/etc/motd", mode = "0644" }]
//! run = ["useradd --create-home app"]
//! [config]
//! user = "app"
//! ```
//!
//! Each layer is a `debian-layer` derivation (the base tree, the lower layers' change sets and the
//! layer's contents → this layer's change set, built on an overlay) and a `pack-change-set`
//! derivation (its OCI layer); the image lists the base's layers, byte for byte, followed by one
//! layer per `[[layers]]` entry. The whole root filesystem (`^tree`) is a derivation of its
//! own, which the image does not need.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rbuild_engine::archive::oci::ImageConfig;
use rbuild_engine::{Derivation, Stage};
use serde::{Deserialize, Serialize};

use crate::builders::{CopyFile, LayerPackage, LayerPlan};
use crate::debian::{self, packages::Package, resolve};
use crate::expand::{self, Expanded};
use crate::recipe::{self, Loaded, PinnedPackage};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CopySpec {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copy: Vec<CopySpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayeredRecipe {
    pub base: String,
    #[serde(default)]
    pub layers: Vec<LayerSpec>,
    #[serde(default)]
    pub config: ConfigSpec,
    /// What one build step may use; unset ones come from the base recipe.
    #[serde(default)]
    pub limits: crate::recipe::BuildLimits,
}

/// `NAME.lock` of a layered recipe: the new packages of each layer, in install order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerLock {
    /// The base archive's InRelease the packages were resolved against.
    pub base_inrelease_sha256: String,
    pub layer: Vec<LockedLayer>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockedLayer {
    /// The recipe's `packages` of this layer when it was locked (absent in locks written before
    /// rbuild recorded it): a layer whose list changed is resolved again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wants: Option<Vec<String>>,
    #[serde(default)]
    pub package: Vec<PinnedPackage>,
}

/// A recipe of either kind, with everything below it loaded.
#[derive(Debug, Clone)]
// One per loaded recipe, never in a collection: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum AnyRecipe {
    Debian(Loaded),
    Layered {
        recipe: LayeredRecipe,
        path: PathBuf,
        lock: Option<LayerLock>,
        base: Box<AnyRecipe>,
    },
}

fn is_layered(text: &str) -> bool {
    text.parse::<toml::Table>()
        .map(|t| t.contains_key("base"))
        .unwrap_or(false)
}

/// Load a built-in name or a recipe file of either kind (with its lock, unless `read_lock` is false).
pub fn load_any(arg: &str, read_lock: bool) -> anyhow::Result<AnyRecipe> {
    let path = Path::new(arg);
    if arg.ends_with(".toml") || arg.contains('/') {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {arg}"))?;
        if is_layered(&text) {
            let recipe: LayeredRecipe = toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{arg}: not a valid layered recipe: {e}"))?;
            let dir = path.parent().unwrap_or(Path::new("."));
            let base_arg = if recipe.base.ends_with(".toml") || recipe.base.contains('/') {
                dir.join(&recipe.base).to_string_lossy().into_owned()
            } else {
                recipe.base.clone()
            };
            let base = Box::new(
                load_any(&base_arg, true)
                    .with_context(|| format!("{arg}: loading its base {}", recipe.base))?,
            );
            let lock_path = path.with_extension("lock");
            let lock = match std::fs::read_to_string(&lock_path) {
                Ok(t) if read_lock && !t.trim().is_empty() => {
                    Some(toml::from_str(&t).map_err(|e| {
                        anyhow::anyhow!(
                            "{}: not a valid lock: {e}; run `rbuild lock {arg}`",
                            lock_path.display()
                        )
                    })?)
                }
                _ => None,
            };
            return Ok(AnyRecipe::Layered {
                recipe,
                path: path.to_owned(),
                lock,
                base,
            });
        }
    }
    Ok(AnyRecipe::Debian(if read_lock {
        recipe::load(arg)?
    } else {
        recipe::load_unlocked(arg)?
    }))
}

impl AnyRecipe {
    /// The Debian recipe at the bottom of the stack.
    pub fn debian(&self) -> &Loaded {
        match self {
            AnyRecipe::Debian(l) => l,
            AnyRecipe::Layered { base, .. } => base.debian(),
        }
    }

    pub fn lock_path(&self) -> Option<PathBuf> {
        match self {
            AnyRecipe::Debian(l) => l.lock_path(),
            AnyRecipe::Layered { path, .. } => Some(path.with_extension("lock")),
        }
    }

    /// This recipe built for `arches` instead of its own (`--arch`; empty: unchanged).
    pub fn with_arches(mut self, arches: &[String]) -> anyhow::Result<AnyRecipe> {
        if arches.is_empty() {
            return Ok(self);
        }
        match &mut self {
            AnyRecipe::Debian(l) => l
                .recipe
                .set_architectures(arches.to_vec())
                .map_err(|e| anyhow::anyhow!("--arch: {e}"))?,
            AnyRecipe::Layered { path, .. } => bail!(
                "--arch applies to Debian recipes; {} is layered (its base decides the architecture)",
                path.display()
            ),
        }
        Ok(self)
    }

    /// This recipe with the lock in `file` instead of its own (`rbuild realise --lock FILE`, with
    /// a lock `rbuild lock … --output FILE` wrote).
    pub fn with_lock_file(mut self, file: &Path) -> anyhow::Result<AnyRecipe> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        match &mut self {
            AnyRecipe::Debian(l) => {
                l.lock = Some(
                    recipe::parse_lock(file, &text)?
                        .with_context(|| format!("{}: an empty lock", file.display()))?,
                );
            }
            AnyRecipe::Layered { lock, .. } => {
                *lock = Some(toml::from_str(&text).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not a valid lock of a layered recipe: {e}",
                        file.display()
                    )
                })?);
            }
        }
        Ok(self)
    }

    pub fn has_lock(&self) -> bool {
        match self {
            AnyRecipe::Debian(l) => l.lock.is_some(),
            AnyRecipe::Layered { lock, .. } => lock.is_some(),
        }
    }

    /// Packages installed by every layer up to and including this recipe's (names).
    pub(crate) fn installed(&self) -> anyhow::Result<HashSet<String>> {
        match self {
            AnyRecipe::Debian(l) => Ok(l
                .require_lock()?
                .packages
                .iter()
                .map(|p| p.name.clone())
                .collect()),
            AnyRecipe::Layered {
                lock, base, path, ..
            } => {
                let mut s = base.installed()?;
                let lock = lock.as_ref().with_context(|| {
                    format!("{}: no lock; run `rbuild lock` on it", path.display())
                })?;
                s.extend(
                    lock.layer
                        .iter()
                        .flat_map(|l| l.package.iter().map(|p| p.name.clone())),
                );
                Ok(s)
            }
        }
    }

    /// Expand into the derivation graph.
    pub fn expand(&self) -> anyhow::Result<Expanded> {
        match self {
            AnyRecipe::Debian(l) => Ok(expand::expand(&l.recipe, &l.keyring, l.require_lock()?)?),
            AnyRecipe::Layered {
                recipe,
                path,
                lock,
                base,
            } => {
                let lock = lock.as_ref().with_context(|| {
                    format!(
                        "{}: no lock; run `rbuild lock {}`",
                        path.with_extension("lock").display(),
                        path.display()
                    )
                })?;
                expand_layered(recipe, path, lock, base)
            }
        }
    }
}

fn name_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

/// The history line of a layer: the recipe text that made it.
fn history_line(spec: &LayerSpec) -> String {
    let mut parts = Vec::new();
    let mut field = |key: &str, v: Option<toml::Value>| {
        if let Some(v) = v {
            parts.push(format!("{key} = {v}"));
        }
    };
    let non_empty = |v: toml::Value| v.as_array().is_some_and(|a| !a.is_empty()).then_some(v);
    field(
        "packages",
        toml::Value::try_from(&spec.packages)
            .ok()
            .and_then(non_empty),
    );
    field(
        "copy",
        toml::Value::try_from(&spec.copy).ok().and_then(non_empty),
    );
    field(
        "run",
        toml::Value::try_from(&spec.run).ok().and_then(non_empty),
    );
    format!("rbuild layer: {}", parts.join(", "))
}

fn merge_config(mut c: ImageConfig, spec: &ConfigSpec) -> ImageConfig {
    if spec.entrypoint.is_some() {
        c.entrypoint = spec.entrypoint.clone();
        // As with a Containerfile, a new entrypoint resets an inherited command.
        c.cmd = None;
    }
    if spec.cmd.is_some() {
        c.cmd = spec.cmd.clone();
    }
    for e in &spec.env {
        let key = e.split('=').next().unwrap_or(e);
        c.env.retain(|old| old.split('=').next() != Some(key));
        c.env.push(e.clone());
    }
    if spec.user.is_some() {
        c.user = spec.user.clone();
    }
    if spec.workdir.is_some() {
        c.working_dir = spec.workdir.clone();
    }
    c.labels.extend(spec.labels.clone());
    c
}

/// The regular files `copy` takes from `from`: `from` itself (relative path "") or, for a
/// directory, every file below it (relative paths, sorted). Symlinks and special files are refused.
fn files_to_copy(from: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let md =
        std::fs::symlink_metadata(from).with_context(|| format!("reading {}", from.display()))?;
    if md.is_file() {
        return Ok(vec![(String::new(), from.to_owned())]);
    }
    if !md.is_dir() {
        bail!(
            "{} is neither a regular file nor a directory",
            from.display()
        );
    }
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), from.to_owned())];
    while let Some((rel, dir)) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push((child_rel, e.path()));
            } else if ft.is_file() {
                out.push((child_rel, e.path()));
            } else {
                bail!(
                    "{} is a symlink or special file; copy takes regular files and directories",
                    e.path().display()
                );
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_executable(p: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(p)?.permissions().mode() & 0o111 != 0)
}

fn parse_mode(m: &Option<String>, what: &str) -> anyhow::Result<u32> {
    match m {
        None => Ok(0o644),
        Some(s) => {
            let v = u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .with_context(|| format!("{what}: mode {s:?} is not octal"))?;
            if v > 0o7777 {
                bail!("{what}: mode {s:?} is out of range");
            }
            Ok(v)
        }
    }
}

fn expand_layered(
    recipe: &LayeredRecipe,
    path: &Path,
    lock: &LayerLock,
    base: &AnyRecipe,
) -> anyhow::Result<Expanded> {
    let mut ex = base.expand()?;
    if ex.arches.len() > 1 {
        bail!(
            "{}: its base builds {} architectures; layered images are built for one (set the base to one architecture)",
            path.display(),
            ex.arches.len()
        );
    }
    if lock.layer.len() != recipe.layers.len() {
        bail!(
            "{}: the lock has {} layers, the recipe {}; run `rbuild lock {}`",
            path.with_extension("lock").display(),
            lock.layer.len(),
            recipe.layers.len(),
            path.display()
        );
    }
    let name = name_of(path);
    let dir = path.parent().unwrap_or(Path::new("."));
    let sde = ex.source_date_epoch;
    let env: BTreeMap<String, String> = [("SOURCE_DATE_EPOCH".to_owned(), sde.to_string())]
        .into_iter()
        .collect();
    let index = ex.outputs["index"].clone();
    let mut evidence = ex
        .evidence
        .take()
        .context("the base has no evidence of one architecture")?;
    let mut installed = base.installed()?;
    // The base's tree, then the change sets of every layer below this recipe's, bottom first
    // (a layered base's own).
    let (base_tree, lower) = ex
        .stack
        .split_first()
        .context("the base has no root filesystem")?;
    let base_tree = base_tree.clone();
    let mut change_sets: Vec<rbuild_engine::DrvHash> = lower.to_vec();
    for (i, (spec, locked)) in recipe.layers.iter().zip(&lock.layer).enumerate() {
        installed.extend(locked.package.iter().map(|p| p.name.clone()));
        if let Some(missing) = spec.packages.iter().find(|p| !installed.contains(*p)) {
            bail!(
                "{}: layer {} wants {missing}, which its lock does not pin; run `rbuild lock {}`",
                path.display(),
                i + 1,
                path.display()
            );
        }
        let mut inputs = vec![base_tree.clone(), index.clone()];
        inputs.extend(change_sets.iter().cloned());
        for p in &locked.package {
            inputs.push(ex.graph.add(expand::fetch_package(p))?);
        }
        let mut copy = Vec::new();
        let mut copied: Vec<(String, Vec<u8>)> = Vec::new();
        for c in &spec.copy {
            let what = format!("{}: layer {} copy {}", path.display(), i + 1, c.from);
            let from = dir.join(&c.from);
            for (rel, file) in files_to_copy(&from).with_context(|| what.clone())? {
                let bytes = std::fs::read(&file)
                    .with_context(|| format!("{what}: reading {}", file.display()))?;
                let mode = match &c.mode {
                    Some(_) => parse_mode(&c.mode, &what)?,
                    // Files of a directory keep whether they are executable.
                    None if !rel.is_empty() && is_executable(&file)? => 0o755,
                    None => 0o644,
                };
                let to = if rel.is_empty() {
                    c.to.clone()
                } else {
                    format!("{}/{rel}", c.to.trim_end_matches('/'))
                };
                copy.push(CopyFile {
                    to: to.clone(),
                    mode,
                    content: hex::encode(&bytes),
                });
                copied.push((to, bytes));
            }
        }
        let plan = LayerPlan {
            packages: locked
                .package
                .iter()
                .map(|p| LayerPackage {
                    name: p.name.clone(),
                    version: p.version.clone(),
                    architecture: p.architecture.clone(),
                })
                .collect(),
            copy,
            run: spec.run.clone(),
            lower_layers: change_sets.len(),
        };
        let upper = ex.graph.add(Derivation {
            name: format!("{name}-layer{}-tree", i + 1),
            stage: Stage::Configure,
            builder: "builtin:debian-layer".into(),
            args: vec![serde_json::to_string(&plan)?],
            env: env.clone(),
            inputs,
            // The layer's dpkg and `run` commands are programs of the base's architecture.
            system: Some(base.debian().recipe.architecture.clone()),
            fixed_output: None,
        })?;
        let layer = ex.graph.add(Derivation {
            name: format!("{name}-layer{}", i + 1),
            stage: Stage::Pack,
            builder: "builtin:pack-change-set".into(),
            args: std::iter::once(history_line(spec))
                .chain(base.debian().recipe.image.compression.layer_args())
                .collect(),
            env: env.clone(),
            inputs: vec![upper.clone()],
            system: None,
            fixed_output: None,
        })?;
        ex.layers.push(layer);
        let files: Vec<(String, &[u8])> = copied
            .iter()
            .map(|(to, b)| (to.clone(), b.as_slice()))
            .collect();
        evidence.add_layer(&history_line(spec), &locked.package, &files);
        change_sets.push(upper);
    }
    // The whole root filesystem is made only for `^tree` and `^rootfs`: the image needs the
    // change sets alone, and its SBOMs read the stack.
    let trees: Vec<_> = std::iter::once(base_tree.clone())
        .chain(change_sets.iter().cloned())
        .collect();
    ex.stack = trees.clone();
    let tree = if change_sets.is_empty() {
        base_tree
    } else {
        ex.graph.add(Derivation {
            name: format!("{name}-rootfs"),
            stage: Stage::Configure,
            builder: "builtin:debian-layered-tree".into(),
            args: vec![],
            env: env.clone(),
            inputs: trees.clone(),
            system: None,
            fixed_output: None,
        })?
    };
    ex.config = merge_config(ex.config, &recipe.config);
    ex.limits = recipe.limits.over(ex.limits);
    let rootfs = expand::rootfs_tar(&mut ex.graph, &name, &tree, sde)?;
    evidence.layered(&name, &serde_json::to_vec(recipe)?, &render_lock(lock));
    let (image, extra) = expand::image_with_evidence(
        &mut ex.graph,
        &name,
        &ex.layers,
        &ex.config,
        sde,
        &evidence,
        &rootfs,
        &trees,
    )?;
    ex.outputs.extend(extra);
    ex.evidence = Some(evidence);
    ex.outputs.insert("image".into(), image);
    ex.outputs.insert("tree".into(), tree);
    ex.outputs.insert("rootfs".into(), rootfs);
    Ok(ex)
}

/// Pick the package that satisfies one alternative: the highest version of a real package
/// meeting the version constraint, else the lowest-named provider.
fn pick<'a>(
    alts: &[debian::packages::Dep],
    by_name: &HashMap<&str, Vec<&'a Package>>,
    providers: &HashMap<&str, Vec<&'a Package>>,
) -> Option<&'a Package> {
    for d in alts {
        let ok = |p: &&Package| {
            d.version
                .as_ref()
                .is_none_or(|(op, v)| resolve::satisfies(&p.version, op, v))
        };
        if let Some(p) = by_name.get(d.name.as_str()).and_then(|v| {
            v.iter()
                .copied()
                .filter(ok)
                .max_by(|a, b| resolve::compare_versions(&a.version, &b.version))
        }) {
            return Some(p);
        }
        if let Some(p) = providers
            .get(d.name.as_str())
            .and_then(|v| v.iter().copied().min_by(|a, b| a.name.cmp(&b.name)))
        {
            return Some(p);
        }
    }
    None
}

/// The packages to add so that `wanted` is installed on top of `installed` (dependencies already
/// there are not reinstalled), in install order.
pub fn resolve_additional(
    all: &[Package],
    arch: &str,
    installed: &HashSet<String>,
    wanted: &[String],
) -> anyhow::Result<Vec<Package>> {
    let mut by_name: HashMap<&str, Vec<&Package>> = HashMap::new();
    let mut providers: HashMap<&str, Vec<&Package>> = HashMap::new();
    for p in all
        .iter()
        .filter(|p| p.architecture == arch || p.architecture == "all")
    {
        by_name.entry(p.name.as_str()).or_default().push(p);
        for v in &p.provides {
            providers.entry(v.as_str()).or_default().push(p);
        }
    }
    let installed_provides: HashSet<&str> = all
        .iter()
        .filter(|p| installed.contains(&p.name))
        .flat_map(|p| p.provides.iter().map(String::as_str))
        .collect();
    let is_installed = |n: &str| installed.contains(n) || installed_provides.contains(n);
    let mut chosen: BTreeMap<String, Package> = BTreeMap::new();
    let mut stack: Vec<Package> = Vec::new();
    for w in wanted {
        if installed.contains(w) {
            continue;
        }
        let dep = debian::packages::Dep {
            name: w.clone(),
            arch: None,
            version: None,
        };
        let p = pick(std::slice::from_ref(&dep), &by_name, &providers)
            .with_context(|| format!("package {w} is not in the archive for {arch}"))?;
        stack.push(p.clone());
    }
    while let Some(p) = stack.pop() {
        if chosen.contains_key(&p.name) || installed.contains(&p.name) {
            continue;
        }
        for alts in p.pre_depends.iter().chain(&p.depends) {
            if alts
                .iter()
                .any(|d| is_installed(&d.name) || chosen.contains_key(&d.name))
            {
                continue;
            }
            let dep = pick(alts, &by_name, &providers).with_context(|| {
                format!(
                    "{} depends on {}, which nothing in the archive satisfies",
                    p.name,
                    debian::packages::format_alternatives(alts)
                )
            })?;
            stack.push(dep.clone());
        }
        chosen.insert(p.name.clone(), p);
    }
    let selected: Vec<Package> = chosen.into_values().collect();
    let order = resolve::install_order(&selected);
    let by: HashMap<&str, &Package> = selected.iter().map(|p| (p.name.as_str(), p)).collect();
    Ok(order.iter().map(|n| by[n.as_str()].clone()).collect())
}

pub fn render_lock(lock: &LayerLock) -> String {
    format!("# Generated by `rbuild lock`: the packages each layer adds, pinned by sha256 and size.\n{}", toml::to_string(lock).expect("locks serialize"))
}
