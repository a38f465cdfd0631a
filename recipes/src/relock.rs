//! Keeping a recipe file's lock in step with the recipe, as cargo keeps `Cargo.lock` in step with
//! `Cargo.toml`: what a change to the recipe requires re-locking (only the new or changed parts:
//! what is pinned stays pinned), whether that needs the archive, and the new lock.
//!
//! Built-in recipes carry their locks and are never re-locked here (`rbuild lock NAME --output`
//! writes a fresh one).

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::bail;
use rbuild_engine::builtins::fetch::Fetcher;

use crate::layers::{self, AnyRecipe, LayerLock, LayeredRecipe, LockedLayer};
use crate::recipe::{self, Loaded, ResolvedFor};

/// Why a recipe file's lock must be rewritten before the recipe can build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The lock file to rewrite.
    pub lock_path: PathBuf,
    /// What changed, in words.
    pub changes: Vec<String>,
    /// Whether re-locking needs the archive's signed index (from the mirror), or only rewrites
    /// the lock from what it already pins.
    pub needs_archive: bool,
}

/// The lowest recipe of the stack (the base first) whose lock does not fit it, and why; `None`
/// when every lock fits.
pub fn stale(any: &AnyRecipe) -> anyhow::Result<Option<(Stale, &AnyRecipe)>> {
    match any {
        AnyRecipe::Debian(l) => Ok(stale_debian(l).map(|s| (s, any))),
        AnyRecipe::Layered {
            recipe,
            path,
            lock,
            base,
        } => {
            if let Some(s) = stale(base)? {
                return Ok(Some(s));
            }
            let plan = plan_layers(recipe, lock.as_ref(), base)?;
            Ok((!plan.changes.is_empty()).then(|| {
                let stale = Stale {
                    lock_path: path.with_extension("lock"),
                    changes: plan.changes,
                    needs_archive: plan.steps.contains(&Step::Resolve),
                };
                (stale, any)
            }))
        }
    }
}

fn stale_debian(l: &Loaded) -> Option<Stale> {
    let lock_path = l.lock_path()?;
    let r = &l.recipe;
    let Some(lock) = &l.lock else {
        return Some(Stale {
            lock_path,
            changes: vec!["there is no lock yet".into()],
            needs_archive: true,
        });
    };
    let mut changes = Vec::new();
    let (was_arches, now_arches) = (lock.arches().join(","), r.arches().join(","));
    for (what, was, now) in [
        ("suite", &lock.suite, &r.suite),
        ("architectures", &was_arches, &now_arches),
    ] {
        if was != now {
            changes.push(format!("{what} {was} → {now}"));
        }
    }
    let now = ResolvedFor::of(r);
    match &lock.resolved {
        Some(was) => {
            if was.components != now.components {
                changes.push(format!(
                    "components {:?} → {:?}",
                    was.components, now.components
                ));
            }
            if was.variant != now.variant {
                changes.push(format!("variant {:?} → {:?}", was.variant, now.variant));
            }
            if was.include != now.include {
                changes.push(format!("include {:?} → {:?}", was.include, now.include));
            }
            if was.also_required != now.also_required {
                changes.push(format!(
                    "also-required {:?} → {:?}",
                    was.also_required, now.also_required
                ));
            }
            if was.exclude_dependencies != now.exclude_dependencies {
                changes.push(format!(
                    "exclude-dependencies {:?} → {:?}",
                    was.exclude_dependencies, now.exclude_dependencies
                ));
            }
        }
        // A lock from before rbuild recorded what it was resolved for: all it can tell is
        // whether everything the recipe includes is pinned.
        None => {
            let pinned: HashSet<&str> = lock.packages.iter().map(|p| p.name.as_str()).collect();
            let missing: Vec<&str> = now
                .include
                .iter()
                .map(String::as_str)
                .filter(|n| !pinned.contains(n))
                .collect();
            if !missing.is_empty() {
                changes.push(format!(
                    "include lists {}, which the lock does not pin",
                    missing.join(", ")
                ));
            }
        }
    }
    (!changes.is_empty()).then_some(Stale {
        lock_path,
        changes,
        needs_archive: true,
    })
}

/// What re-locking does with one layer of the recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The lock's layer fits: keep its pins.
    Keep,
    /// The layer installs no packages: nothing to resolve.
    Empty,
    /// Resolve the layer's packages against the base's archive.
    Resolve,
}

struct LayerPlan {
    steps: Vec<Step>,
    changes: Vec<String>,
}

fn plan_layers(
    recipe: &LayeredRecipe,
    lock: Option<&LayerLock>,
    base: &AnyRecipe,
) -> anyhow::Result<LayerPlan> {
    let base_sha = &base.debian().require_lock()?.inrelease.sha256;
    let mut changes = Vec::new();
    let empty = LayerLock::default();
    let had_lock = lock.is_some();
    let lock = lock.unwrap_or(&empty);
    if !had_lock {
        changes.push("there is no lock yet".into());
    }
    // Everything below the current layer installs what it did when the lock was made.
    let mut intact = had_lock && &lock.base_inrelease_sha256 == base_sha;
    if had_lock && !intact {
        changes.push("the base's archive changed (the base was locked again)".into());
    }
    let mut installed = base.installed()?;
    let mut steps = Vec::new();
    for (i, spec) in recipe.layers.iter().enumerate() {
        let n = i + 1;
        let Some(locked) = lock.layer.get(i) else {
            if had_lock {
                changes.push(format!("layer {n} is new"));
            }
            steps.push(if spec.packages.is_empty() {
                Step::Empty
            } else {
                intact = false;
                Step::Resolve
            });
            continue;
        };
        let fits = match &locked.wants {
            Some(w) => *w == spec.packages,
            // From before rbuild recorded each layer's list: it fits if it pins something
            // exactly when the recipe asks for something, and what is asked for is installed.
            None => {
                let after: HashSet<&str> = installed
                    .iter()
                    .map(String::as_str)
                    .chain(locked.package.iter().map(|p| p.name.as_str()))
                    .collect();
                locked.package.is_empty() == spec.packages.is_empty()
                    && spec.packages.iter().all(|p| after.contains(p.as_str()))
                    || locked.package.is_empty()
                        && spec.packages.iter().all(|p| installed.contains(p))
            }
        };
        let step = if spec.packages.is_empty() {
            Step::Empty
        } else if fits && intact {
            Step::Keep
        } else {
            Step::Resolve
        };
        if !fits {
            let was = locked.wants.as_ref().map_or_else(
                || format!("{} pinned", locked.package.len()),
                |w| format!("{w:?}"),
            );
            changes.push(format!(
                "layer {n}'s packages changed: {was} → {:?}",
                spec.packages
            ));
        } else if step == Step::Resolve {
            changes.push(format!(
                "layer {n} is resolved again after the change below it"
            ));
        }
        match step {
            Step::Keep => installed.extend(locked.package.iter().map(|p| p.name.clone())),
            Step::Empty => intact &= locked.package.is_empty(),
            Step::Resolve => intact = false,
        }
        steps.push(step);
    }
    let removed = lock.layer.len().saturating_sub(recipe.layers.len());
    if removed > 0 {
        let first = recipe.layers.len() + 1;
        changes.push(match removed {
            1 => format!("layer {first} was removed"),
            _ => format!("layers {first}–{} were removed", lock.layer.len()),
        });
    }
    Ok(LayerPlan { steps, changes })
}

/// A re-locked recipe: the new lock's text, and what was done.
#[derive(Debug)]
pub struct Relocked {
    pub text: String,
    pub summary: String,
}

/// Re-lock the recipe at the top of `any` (its base's locks must fit: see [`stale`]), keeping
/// every pin that still fits. `fetcher` is used only when a layer must be resolved (or for a
/// Debian recipe, which resolves as a whole); for a Debian recipe whose suite and architecture
/// did not change, the archive must still be the one its lock pins, so no pinned package moves.
pub async fn relock(any: &AnyRecipe, fetcher: &Fetcher) -> anyhow::Result<Relocked> {
    match any {
        AnyRecipe::Debian(l) => {
            let lock = crate::lock::lock(&l.recipe, &l.keyring, fetcher).await?;
            if let Some(old) = &l.lock {
                let same_system =
                    old.suite == l.recipe.suite && old.architecture == l.recipe.architecture;
                if same_system && old.inrelease.sha256 != lock.inrelease.sha256 {
                    bail!(
                        "{}: the recipe changed, and the mirror's archive has moved on since the lock was made (its InRelease is no longer the pinned one), so the change cannot be locked without moving every package; run `rbuild lock {}` to move to the current archive",
                        l.lock_path().unwrap_or_default().display(),
                        l.path.as_deref().unwrap_or(std::path::Path::new("")).display()
                    );
                }
            }
            let summary = format!("{} packages pinned", lock.packages.len());
            Ok(Relocked {
                text: recipe::render_lock(&lock),
                summary,
            })
        }
        AnyRecipe::Layered {
            recipe, lock, base, ..
        } => {
            let plan = plan_layers(recipe, lock.as_ref(), base)?;
            let new = lock_layers(recipe, lock.as_ref(), base, &plan.steps, fetcher).await?;
            let kept = plan.steps.iter().filter(|s| **s == Step::Keep).count();
            let resolved = plan.steps.iter().filter(|s| **s == Step::Resolve).count();
            let added: usize = new.layer.iter().map(|l| l.package.len()).sum();
            Ok(Relocked {
                text: layers::render_lock(&new),
                summary: format!(
                    "{} layers: {kept} kept as pinned, {resolved} resolved; {added} added packages pinned",
                    new.layer.len()
                ),
            })
        }
    }
}

/// Lock a layered recipe from scratch (`rbuild lock`): every layer resolved again.
pub async fn lock_layered(any: &AnyRecipe, fetcher: &Fetcher) -> anyhow::Result<LayerLock> {
    let AnyRecipe::Layered { recipe, base, .. } = any else {
        bail!("not a layered recipe")
    };
    let steps: Vec<Step> = recipe
        .layers
        .iter()
        .map(|l| match l.packages.is_empty() {
            true => Step::Empty,
            false => Step::Resolve,
        })
        .collect();
    lock_layers(recipe, None, base, &steps, fetcher).await
}

async fn lock_layers(
    recipe: &LayeredRecipe,
    old: Option<&LayerLock>,
    base: &AnyRecipe,
    steps: &[Step],
    fetcher: &Fetcher,
) -> anyhow::Result<LayerLock> {
    let deb = base.debian();
    let base_lock = deb.require_lock()?;
    let mut installed = base.installed()?;
    let all = if steps.contains(&Step::Resolve) {
        crate::lock::verified_packages(&deb.recipe, &deb.keyring, fetcher, Some(base_lock)).await?
    } else {
        vec![]
    };
    let mut out = LayerLock {
        base_inrelease_sha256: base_lock.inrelease.sha256.clone(),
        layer: vec![],
    };
    for (i, (spec, step)) in recipe.layers.iter().zip(steps).enumerate() {
        let package = match step {
            Step::Keep => old.expect("kept layers come from a lock").layer[i]
                .package
                .clone(),
            Step::Empty => vec![],
            Step::Resolve => layers::resolve_additional(
                &all,
                &deb.recipe.architecture,
                &installed,
                &spec.packages,
            )?
            .iter()
            .map(crate::lock::pin)
            .collect(),
        };
        installed.extend(package.iter().map(|p| p.name.clone()));
        out.layer.push(LockedLayer {
            wants: (!spec.packages.is_empty()).then(|| spec.packages.clone()),
            package,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::LayerSpec;
    use crate::recipe::PinnedPackage;

    fn base() -> AnyRecipe {
        layers::load_any("debian-bullseye", true).unwrap()
    }

    fn pinned(name: &str) -> PinnedPackage {
        PinnedPackage {
            name: name.into(),
            version: "1".into(),
            architecture: "amd64".into(),
            essential: false,
            required: false,
            filename: format!("pool/main/{name}_1_amd64.deb"),
            sha256: "00".repeat(32),
            size: 1,
        }
    }

    fn layered(layers: Vec<LayerSpec>, lock: Option<LayerLock>) -> AnyRecipe {
        AnyRecipe::Layered {
            recipe: LayeredRecipe {
                base: "debian-bullseye".into(),
                layers,
                config: Default::default(),
                limits: Default::default(),
            },
            path: PathBuf::from("/nonexistent/app.toml"),
            lock,
            base: Box::new(base()),
        }
    }

    fn run(cmd: &str) -> LayerSpec {
        LayerSpec {
            run: vec![cmd.into()],
            ..Default::default()
        }
    }

    fn packages(p: &[&str]) -> LayerSpec {
        LayerSpec {
            packages: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn lock_of(layers: Vec<LockedLayer>) -> LayerLock {
        let AnyRecipe::Debian(l) = base() else {
            unreachable!()
        };
        LayerLock {
            base_inrelease_sha256: l.lock.unwrap().inrelease.sha256,
            layer: layers,
        }
    }

    fn curl_layer() -> LockedLayer {
        LockedLayer {
            wants: Some(vec!["curl".into()]),
            package: vec![pinned("libcurl4"), pinned("curl")],
        }
    }

    #[test]
    fn a_fitting_lock_is_not_stale() {
        let any = layered(
            vec![packages(&["curl"]), run("true")],
            Some(lock_of(vec![curl_layer(), LockedLayer::default()])),
        );
        assert!(stale(&any).unwrap().is_none());
    }

    /// A new `run` layer needs nothing from the archive: the lock is rewritten offline, and the
    /// pinned layer keeps its pins.
    #[test]
    fn a_new_run_layer_is_locked_without_the_archive_and_keeps_the_pins() {
        let any = layered(
            vec![packages(&["curl"]), run("true")],
            Some(lock_of(vec![curl_layer()])),
        );
        let s = stale(&any).unwrap().expect("stale").0;
        assert_eq!(s.changes, ["layer 2 is new"]);
        assert!(!s.needs_archive);
        let r = futures_block_on(relock(&any, &Fetcher::offline())).unwrap();
        let new: LayerLock = toml::from_str(&r.text).unwrap();
        assert_eq!(new.layer[0], curl_layer());
        assert_eq!(new.layer[1], LockedLayer::default());
        assert!(
            r.summary.contains("1 kept as pinned, 0 resolved"),
            "{}",
            r.summary
        );
    }

    #[test]
    fn changed_packages_need_the_archive_and_so_do_the_package_layers_above() {
        let two = LockedLayer {
            wants: Some(vec!["jq".into()]),
            package: vec![pinned("jq")],
        };
        let any = layered(
            vec![packages(&["curl", "wget"]), run("true"), packages(&["jq"])],
            Some(lock_of(vec![curl_layer(), LockedLayer::default(), two])),
        );
        let s = stale(&any).unwrap().expect("stale").0;
        assert!(s.needs_archive);
        assert_eq!(
            s.changes,
            [
                "layer 1's packages changed: [\"curl\"] → [\"curl\", \"wget\"]",
                "layer 3 is resolved again after the change below it"
            ]
        );
        // Without the archive it fails (here: an offline fetcher), naming no partial lock.
        assert!(futures_block_on(relock(&any, &Fetcher::offline())).is_err());
    }

    #[test]
    fn removed_layers_and_a_moved_base_are_named() {
        let mut lock = lock_of(vec![curl_layer(), LockedLayer::default()]);
        let any = layered(vec![packages(&["curl"])], Some(lock.clone()));
        let s = stale(&any).unwrap().expect("stale").0;
        assert_eq!(s.changes, ["layer 2 was removed"]);
        assert!(!s.needs_archive);
        lock.base_inrelease_sha256 = "11".repeat(32);
        lock.layer.pop();
        let any = layered(vec![packages(&["curl"])], Some(lock));
        let s = stale(&any).unwrap().expect("stale").0;
        assert_eq!(
            s.changes,
            [
                "the base's archive changed (the base was locked again)",
                "layer 1 is resolved again after the change below it"
            ]
        );
        assert!(s.needs_archive);
    }

    /// Locks written before `wants` was recorded still fit when they cover the recipe.
    #[test]
    fn a_lock_without_wants_fits_when_it_covers_the_recipe() {
        let legacy = LockedLayer {
            wants: None,
            package: vec![pinned("libcurl4"), pinned("curl")],
        };
        let any = layered(
            vec![packages(&["curl"])],
            Some(lock_of(vec![legacy.clone()])),
        );
        assert!(stale(&any).unwrap().is_none());
        let any = layered(vec![packages(&["curl", "jq"])], Some(lock_of(vec![legacy])));
        assert!(stale(&any).unwrap().is_some());
    }

    #[test]
    fn a_debian_recipe_whose_include_changed_is_stale() {
        let AnyRecipe::Debian(mut l) = base() else {
            unreachable!()
        };
        l.path = Some(PathBuf::from("/nonexistent/os.toml"));
        let mut lock = l.lock.clone().unwrap();
        lock.resolved = Some(ResolvedFor::of(&l.recipe));
        l.lock = Some(lock);
        assert_eq!(stale_debian(&l), None);
        l.recipe.include.push("curl".into());
        let s = stale_debian(&l).expect("stale");
        assert_eq!(s.changes, ["include [] → [\"curl\"]"]);
        // Without the record (an older lock), an include the lock does not pin is noticed.
        l.lock.as_mut().unwrap().resolved = None;
        let s = stale_debian(&l).expect("stale");
        assert_eq!(
            s.changes,
            ["include lists curl, which the lock does not pin"]
        );
    }

    fn futures_block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }
}
