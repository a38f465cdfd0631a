//! Recipe files (`NAME.toml`) and their locks (`NAME.lock`, beside them).
//!
//! A recipe says *what* to build (suite, architecture, components, variant, the signing keys to
//! trust); its lock pins *exactly which bytes* (the InRelease, the Packages indices and every
//! `.deb`, by sha256 and size, with mirror-relative paths). Built-in recipes are embedded in the
//! binary, so an installed rbuild works anywhere.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: {msg}")]
    Architectures {
        path: PathBuf,
        msg: ArchitecturesError,
    },
    #[error("{path}: [apt-sources]: {msg}")]
    AptSources { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid recipe: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: not a valid recipe: keyring {keyring} is not embedded")]
    KeyringNotEmbedded { path: PathBuf, keyring: String },
    #[error("{path}: not a valid lock: {source}; fix it or run `rbuild lock` again")]
    LockParse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: the lock marks no package of debootstrap's required set for {architecture} (it was written by an older rbuild); run `rbuild lock` again")]
    NoRequiredSet { path: PathBuf, architecture: String },
    #[error("unknown recipe {0:?}: give a built-in name ({1}) or a path to a .toml recipe file")]
    Unknown(String, String),
    #[error("{path}: no lock file; run `rbuild lock {recipe}` to create it")]
    NoLock { path: PathBuf, recipe: String },
    #[error("{path}: the lock is for {what} {found:?} but the recipe says {expected:?}; run `rbuild lock` again")]
    Stale {
        path: PathBuf,
        what: &'static str,
        expected: String,
        found: String,
    },
    /// `RECIPE^NAME` names an output the recipe does not have.
    #[error("no output named {name:?}; this recipe has: {}", .available.join(", "))]
    UnknownOutput {
        name: String,
        available: Vec<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ImageSection {
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub env: Vec<String>,
    /// How the image's layers are compressed (a layered recipe's layers as its base's).
    #[serde(default, skip_serializing_if = "Compression::is_gzip")]
    pub compression: Compression,
}

/// The compression of an image's layers: gzip (every OCI tool reads it) or zstd (smaller and
/// faster; podman, skopeo, containerd and Docker 23+ read it).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Gzip,
    Zstd,
}

impl Compression {
    pub fn is_gzip(&self) -> bool {
        *self == Compression::Gzip
    }

    /// The layer builders' extra argument: none for gzip, so that gzip layers keep the
    /// derivation hashes they had before zstd existed; zstd with its library's version.
    pub fn layer_args(&self) -> Option<String> {
        match self {
            Compression::Gzip => None,
            Compression::Zstd => Some(rbuild_engine::archive::tar_out::zstd_layer_arg()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Debootstrap,
    Extract,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub suite: String,
    /// The (first) architecture; with `architectures`, the first of those.
    #[serde(default)]
    pub architecture: String,
    /// Several architectures: the `image` output is then one OCI image index with a manifest
    /// per architecture.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    pub components: Vec<String>,
    pub variant: Variant,
    #[serde(default = "yes")]
    pub merged_usr: bool,
    pub keyring: String,
    pub fingerprints: Vec<String>,
    /// Extra packages beyond the variant's set.
    #[serde(default)]
    pub include: Vec<String>,
    /// debootstrap's adjustments for this suite (its `scripts/debian-common`), as data: packages
    /// added to the required set (bookworm: `usr-is-merged`)...
    #[serde(default)]
    pub also_required: Vec<String>,
    /// ...and packages never pulled in as a dependency (from bookworm on: `usrmerge`).
    #[serde(default)]
    pub exclude_dependencies: Vec<String>,
    #[serde(default = "default_image")]
    pub image: ImageSection,
    #[serde(default)]
    pub limits: BuildLimits,
    /// The apt sources the image carries, so `apt-get update` works in the container; unset, the
    /// image names no archive (as the built-in recipes leave it: where to fetch from is the
    /// user's choice, not the recipe's).
    #[serde(default)]
    pub apt_sources: Option<AptSources>,
    /// Where this suite keeps its static qemu-user binaries, to build an architecture foreign
    /// to the machine building (data: the package was renamed between suites).
    #[serde(default)]
    pub emulator: Option<EmulatorSource>,
}

/// `[emulator]`: the package of the recipe's own archive that ships static qemu-user
/// binaries, and the interpreter's path in it (`{qemu}`: qemu's name for the architecture).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EmulatorSource {
    pub package: String,
    pub interpreter: String,
}

/// The emulator a lock pins for building on a machine of architecture `host`: the package,
/// checked like every other `.deb` against the signed index of that architecture (pinned too).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct EmulatorPin {
    pub host: String,
    pub index: PinnedFile,
    pub package: PinnedPackage,
}

/// `[apt-sources]`: written as `/etc/apt/sources.list.d/debian.sources` (deb822).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AptSources {
    /// The archive's URL (`http://`, `https://` or `file://`).
    pub uri: String,
    /// Default: the recipe's suite.
    #[serde(default)]
    pub suites: Vec<String>,
    /// Default: the recipe's components.
    #[serde(default)]
    pub components: Vec<String>,
    /// The keyring apt checks the archive with. Default: the one `debian-archive-keyring`
    /// installs (Priority important: every debootstrap system has it).
    #[serde(default)]
    pub signed_by: Option<String>,
}

impl AptSources {
    pub const PATH: &'static str = "etc/apt/sources.list.d/debian.sources";

    /// The deb822 text for `recipe`, or why a field cannot go into one: values are single
    /// words (a newline or a space would start another field or value).
    pub fn render(&self, recipe: &Recipe, origin: &Path) -> Result<String, RecipeError> {
        let word = |what: &str, v: &str| -> Result<(), RecipeError> {
            if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(RecipeError::AptSources {
                    path: origin.to_owned(),
                    msg: format!("{what} {v:?} must be one word, without spaces or line breaks"),
                });
            }
            Ok(())
        };
        word("uri", &self.uri)?;
        if !["http://", "https://", "file://"]
            .iter()
            .any(|s| self.uri.starts_with(s))
        {
            return Err(RecipeError::AptSources {
                path: origin.to_owned(),
                msg: format!(
                    "uri {:?} must start with http://, https:// or file://",
                    self.uri
                ),
            });
        }
        let or = |v: &Vec<String>, d: Vec<String>| if v.is_empty() { d } else { v.clone() };
        let suites = or(&self.suites, vec![recipe.suite.clone()]);
        let components = or(&self.components, recipe.components.clone());
        let signed_by = self
            .signed_by
            .clone()
            .unwrap_or_else(|| "/usr/share/keyrings/debian-archive-keyring.gpg".to_owned());
        for s in &suites {
            word("suite", s)?;
        }
        for c in &components {
            word("component", c)?;
        }
        word("signed-by", &signed_by)?;
        Ok(format!(
            "Types: deb\nURIs: {}\nSuites: {}\nComponents: {}\nSigned-By: {signed_by}\n",
            self.uri,
            suites.join(" "),
            components.join(" ")
        ))
    }
}

/// Why a recipe's architectures cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ArchitecturesError {
    #[error("no architecture: set `architecture = \"amd64\"` or `architectures = [\"amd64\", \"arm64\"]`")]
    None,
    #[error("`architecture = {0:?}` is not the first of `architectures`")]
    Conflict(String),
    #[error("architecture {0:?} is listed twice")]
    Twice(String),
    #[error("unknown architecture {0:?} (known: {1})")]
    Unknown(String, String),
}

impl Recipe {
    /// The recipe's architectures, the first one first.
    pub fn arches(&self) -> Vec<String> {
        if self.architectures.is_empty() {
            vec![self.architecture.clone()]
        } else {
            self.architectures.clone()
        }
    }

    /// Build for `arches` (`--arch`): the first becomes `architecture`.
    pub fn set_architectures(&mut self, arches: Vec<String>) -> Result<(), ArchitecturesError> {
        let first = arches
            .first()
            .filter(|a| !a.is_empty())
            .ok_or(ArchitecturesError::None)?
            .clone();
        if !self.architectures.is_empty()
            && !self.architecture.is_empty()
            && self.architecture != self.architectures[0]
        {
            return Err(ArchitecturesError::Conflict(self.architecture.clone()));
        }
        for (i, a) in arches.iter().enumerate() {
            if arches[..i].contains(a) {
                return Err(ArchitecturesError::Twice(a.clone()));
            }
            if crate::debian::arch::by_name(a).is_none() {
                let known: Vec<&str> = crate::debian::arch::ARCHES
                    .iter()
                    .map(|a| a.debian)
                    .collect();
                return Err(ArchitecturesError::Unknown(a.clone(), known.join(", ")));
            }
        }
        self.architecture = first;
        self.architectures = if arches.len() > 1 { arches } else { vec![] };
        Ok(())
    }

    /// This recipe for `arch` alone (the others dropped).
    pub fn for_arch(&self, arch: &str) -> Recipe {
        Recipe {
            architecture: arch.to_owned(),
            architectures: vec![],
            ..self.clone()
        }
    }
}

/// `[limits]` of a recipe: what one build step may use, where the defaults do not fit (the
/// command line's `--max-build-*` and `RBUILD_MAX_BUILD_*` take precedence). Never part of a
/// derivation's hash: limits decide whether a step finishes, not what it makes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BuildLimits {
    /// Wall-clock seconds.
    pub max_build_time: Option<u64>,
    /// Bytes written below the step's output and scratch.
    pub max_build_bytes: Option<u64>,
    /// Processes at once.
    pub max_build_processes: Option<u64>,
}

impl BuildLimits {
    /// These limits, each one not set here taken from `below` (a base recipe's).
    pub fn over(self, below: BuildLimits) -> BuildLimits {
        BuildLimits {
            max_build_time: self.max_build_time.or(below.max_build_time),
            max_build_bytes: self.max_build_bytes.or(below.max_build_bytes),
            max_build_processes: self.max_build_processes.or(below.max_build_processes),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_image() -> ImageSection {
    ImageSection {
        cmd: Some(vec!["/bin/bash".into()]),
        entrypoint: None,
        env: vec![],
        compression: Compression::Gzip,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PinnedFile {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PinnedPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub essential: bool,
    /// In debootstrap's *required* set (`Priority: required`, the suite's `also-required` and
    /// their dependencies): extracted before dpkg first runs, and configured before the rest,
    /// the *base* set, is unpacked. Not written for a layer's packages.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    pub filename: String,
    pub sha256: String,
    pub size: u64,
}

/// The lock: packages are listed in the order dpkg installs them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Lock {
    pub suite: String,
    pub architecture: String,
    /// From the signed Release `Date`; checked again by the verify stage.
    pub source_date_epoch: i64,
    pub inrelease: PinnedFile,
    pub indices: Vec<PinnedFile>,
    #[serde(rename = "package")]
    pub packages: Vec<PinnedPackage>,
    /// What the packages were resolved for, so a changed recipe is noticed and re-locked (absent
    /// in locks written before rbuild recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<ResolvedFor>,
    /// Emulators for building the recipe's architecture on machines of other architectures.
    #[serde(default, rename = "emulator", skip_serializing_if = "Vec::is_empty")]
    pub emulators: Vec<EmulatorPin>,
    /// The locks of a multi-architecture recipe's other architectures (same InRelease).
    #[serde(
        default,
        rename = "other-architecture",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub others: Vec<Lock>,
}

impl Lock {
    /// The lock of `arch`: this one, or one of `others`.
    pub fn for_arch(&self, arch: &str) -> Option<&Lock> {
        std::iter::once(self)
            .chain(&self.others)
            .find(|l| l.architecture == arch)
    }

    /// The architectures pinned, this lock's first.
    pub fn arches(&self) -> Vec<String> {
        std::iter::once(self)
            .chain(&self.others)
            .map(|l| l.architecture.clone())
            .collect()
    }
}

/// The parts of a recipe that decide its package set, as they were when it was locked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ResolvedFor {
    pub components: Vec<String>,
    pub variant: Variant,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_required: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_dependencies: Vec<String>,
}

impl ResolvedFor {
    pub fn of(recipe: &Recipe) -> ResolvedFor {
        ResolvedFor {
            components: recipe.components.clone(),
            variant: recipe.variant,
            include: recipe.include.clone(),
            also_required: recipe.also_required.clone(),
            exclude_dependencies: recipe.exclude_dependencies.clone(),
        }
    }
}

/// A recipe as loaded: the parsed file, its keyring bytes, its lock (if any) and where they came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub recipe: Recipe,
    pub keyring: Vec<u8>,
    pub lock: Option<Lock>,
    /// The recipe file for path recipes; `None` for built-ins.
    pub path: Option<PathBuf>,
}

impl Loaded {
    pub fn lock_path(&self) -> Option<PathBuf> {
        self.path.as_ref().map(|p| p.with_extension("lock"))
    }

    /// The lock, or an error that says how to make one.
    pub fn require_lock(&self) -> Result<&Lock, RecipeError> {
        let lock = self.lock.as_ref().ok_or_else(|| RecipeError::NoLock {
            path: self
                .lock_path()
                .unwrap_or_else(|| PathBuf::from(format!("{}.lock", self.recipe.name))),
            recipe: self.recipe.name.clone(),
        })?;
        let path = self
            .lock_path()
            .unwrap_or_else(|| PathBuf::from(format!("<built-in {}.lock>", self.recipe.name)));
        // Every architecture asked for must be pinned (a lock may pin more).
        let pinned = lock.arches();
        let covered = self.recipe.arches().iter().all(|a| pinned.contains(a));
        let (expected_arches, found_arches) = (self.recipe.arches().join(","), pinned.join(","));
        for (what, expected, found, ok) in [
            (
                "suite",
                &self.recipe.suite,
                &lock.suite,
                self.recipe.suite == lock.suite,
            ),
            ("architectures", &expected_arches, &found_arches, covered),
        ] {
            if !ok {
                return Err(RecipeError::Stale {
                    path,
                    what,
                    expected: expected.clone(),
                    found: found.clone(),
                });
            }
        }
        Ok(lock)
    }
}

struct Builtin {
    name: &'static str,
    toml: &'static str,
    lock: &'static str,
    keyrings: &'static [(&'static str, &'static [u8])],
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "debian-bullseye",
        toml: include_str!("../debian-bullseye.toml"),
        lock: include_str!("../debian-bullseye.lock"),
        keyrings: &[(
            "keys/debian-bullseye-archive.asc",
            include_bytes!("../keys/debian-bullseye-archive.asc"),
        )],
    },
    Builtin {
        name: "debian-bookworm",
        toml: include_str!("../debian-bookworm.toml"),
        lock: include_str!("../debian-bookworm.lock"),
        keyrings: &[(
            "keys/debian-bookworm-archive.asc",
            include_bytes!("../keys/debian-bookworm-archive.asc"),
        )],
    },
    Builtin {
        name: "debian-trixie",
        toml: include_str!("../debian-trixie.toml"),
        lock: include_str!("../debian-trixie.lock"),
        keyrings: &[(
            "keys/debian-trixie-archive.asc",
            include_bytes!("../keys/debian-trixie-archive.asc"),
        )],
    },
];

pub fn builtin_names() -> Vec<&'static str> {
    BUILTINS.iter().map(|b| b.name).collect()
}

fn parse_recipe(path: &Path, text: &str) -> Result<Recipe, RecipeError> {
    let mut recipe: Recipe = toml::from_str(text).map_err(|source| RecipeError::Parse {
        path: path.to_owned(),
        source,
    })?;
    recipe
        .set_architectures(recipe.arches())
        .map_err(|msg| RecipeError::Architectures {
            path: path.to_owned(),
            msg,
        })?;
    // Refused when the recipe is read, not when it is first built.
    if let Some(a) = &recipe.apt_sources {
        a.render(&recipe, path)?;
    }
    Ok(recipe)
}

/// Parse a lock; an empty file is no lock at all.
pub fn parse_lock(path: &Path, text: &str) -> Result<Option<Lock>, RecipeError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let lock: Lock = toml::from_str(text).map_err(|source| RecipeError::LockParse {
        path: path.to_owned(),
        source,
    })?;
    // Every Debian suite has Priority: required packages; a lock that marks none was written
    // before locks recorded debootstrap's required set, and cannot be configured as it would be.
    for l in std::iter::once(&lock).chain(&lock.others) {
        let debootstrap = l
            .resolved
            .as_ref()
            .is_none_or(|r| r.variant == Variant::Debootstrap);
        if debootstrap && !l.packages.is_empty() && !l.packages.iter().any(|p| p.required) {
            return Err(RecipeError::NoRequiredSet {
                path: path.to_owned(),
                architecture: l.architecture.clone(),
            });
        }
    }
    Ok(Some(lock))
}

pub fn render_lock(lock: &Lock) -> String {
    let body = toml::to_string(lock).expect("locks serialize");
    format!("# Generated by `rbuild lock`. Pins every file by sha256 and size; mirror-relative paths.\n{body}")
}

/// Load a recipe: a built-in name, or a path to a `.toml` file (its lock sits beside it).
pub fn load(arg: &str) -> Result<Loaded, RecipeError> {
    load_inner(arg, true)
}

/// Load a recipe without reading its lock (for `rbuild lock`, which replaces it).
pub fn load_unlocked(arg: &str) -> Result<Loaded, RecipeError> {
    load_inner(arg, false)
}

fn load_inner(arg: &str, read_lock: bool) -> Result<Loaded, RecipeError> {
    let looks_like_path = arg.ends_with(".toml") || arg.contains('/');
    if !looks_like_path {
        if let Some(b) = BUILTINS.iter().find(|b| b.name == arg) {
            let origin = PathBuf::from(format!("<built-in {}>", b.name));
            let recipe = parse_recipe(&origin, b.toml)?;
            let keyring = b
                .keyrings
                .iter()
                .find(|(p, _)| *p == recipe.keyring)
                .map(|(_, k)| k.to_vec())
                .ok_or_else(|| RecipeError::KeyringNotEmbedded {
                    path: origin.clone(),
                    keyring: recipe.keyring.clone(),
                })?;
            let lock = if read_lock {
                parse_lock(&origin, b.lock)?
            } else {
                None
            };
            return Ok(Loaded {
                recipe,
                keyring,
                lock,
                path: None,
            });
        }
        return Err(RecipeError::Unknown(
            arg.to_owned(),
            builtin_names().join(", "),
        ));
    }
    let path = PathBuf::from(arg);
    let text = std::fs::read_to_string(&path).map_err(|source| RecipeError::Io {
        path: path.clone(),
        source,
    })?;
    let recipe = parse_recipe(&path, &text)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let keyring_path = dir.join(&recipe.keyring);
    let keyring = std::fs::read(&keyring_path).map_err(|source| RecipeError::Io {
        path: keyring_path,
        source,
    })?;
    let lock_path = path.with_extension("lock");
    let lock = match std::fs::read_to_string(&lock_path) {
        Ok(_) if !read_lock => None,
        Ok(t) => parse_lock(&lock_path, &t)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(RecipeError::Io {
                path: lock_path,
                source,
            })
        }
    };
    Ok(Loaded {
        recipe,
        keyring,
        lock,
        path: Some(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock from before locks recorded debootstrap's required set is refused with what to do,
    /// not configured as if nothing were required; the committed locks all record it.
    #[test]
    fn a_lock_without_the_required_set_is_refused() {
        let text = include_str!("../debian-bullseye.lock");
        assert!(parse_lock(Path::new("bullseye.lock"), text).is_ok());
        let old = text.replace("required = true\n", "bootstrap = true\n");
        let err = parse_lock(Path::new("old.lock"), &old)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("old.lock") && err.contains("required set") && err.contains("rbuild lock"),
            "{err}"
        );
    }

    #[test]
    fn apt_sources_render_as_deb822_and_refuse_what_would_inject_fields() {
        let mut r = load("debian-bookworm").unwrap().recipe;
        assert_eq!(r.apt_sources, None, "built-in recipes name no archive");
        let a = AptSources {
            uri: "https://mirror.example/debian".into(),
            suites: vec![],
            components: vec![],
            signed_by: None,
        };
        let origin = Path::new("os.toml");
        assert_eq!(
            a.render(&r, origin).unwrap(),
            "Types: deb\nURIs: https://mirror.example/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
        let more = AptSources {
            suites: vec!["bookworm".into(), "bookworm-updates".into()],
            components: vec!["main".into(), "contrib".into()],
            ..a.clone()
        };
        assert!(more
            .render(&r, origin)
            .unwrap()
            .contains("Suites: bookworm bookworm-updates\nComponents: main contrib\n"));
        for bad in [
            AptSources {
                uri: "https://x/debian\nTrusted: yes".into(),
                ..a.clone()
            },
            AptSources {
                suites: vec!["bookworm main".into()],
                ..a.clone()
            },
            AptSources {
                uri: "ftp://x/debian".into(),
                ..a.clone()
            },
        ] {
            let e = bad.render(&r, origin).unwrap_err().to_string();
            assert!(e.starts_with("os.toml: [apt-sources]: "), "{e}");
        }
        // Read from a recipe file, a bad value is refused as the recipe is parsed.
        r.apt_sources = Some(AptSources {
            uri: "https://x/debian\nTrusted: yes".into(),
            ..a
        });
        let text = toml::to_string(&r).unwrap();
        let e = parse_recipe(origin, &text).unwrap_err().to_string();
        assert!(e.contains("must be one word"), "{e}");
    }

    /// Every built-in recipe carries a lock that fits it: same suite and architecture, resolved
    /// for exactly the recipe's package request, with the Essential set pinned, and its pinned
    /// keys are the ones `keys/NAME-archive.fingerprints` lists. (`rbuild lock NAME --output
    /// recipes/NAME.lock` refreshes one.)
    #[test]
    fn builtin_locks_fit_their_recipes() {
        assert_eq!(
            builtin_names(),
            ["debian-bullseye", "debian-bookworm", "debian-trixie"]
        );
        for name in builtin_names() {
            let l = load(name).unwrap();
            let lock = l.require_lock().unwrap();
            assert_eq!(
                lock.resolved,
                Some(ResolvedFor::of(&l.recipe)),
                "{name}: the committed lock was resolved for another request"
            );
            assert!(lock
                .inrelease
                .path
                .ends_with(&format!("{}/InRelease", l.recipe.suite)));
            for essential in ["base-files", "dpkg", "libc6", "bash", "coreutils"] {
                assert!(
                    lock.packages.iter().any(|p| p.name == essential),
                    "{name}: {essential} is not pinned"
                );
            }
            let fprs = std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("keys")
                    .join(format!("{name}-archive.fingerprints")),
            )
            .unwrap();
            let listed: Vec<&str> = fprs
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .collect();
            assert_eq!(listed, l.recipe.fingerprints, "{name}");
        }
    }
}
