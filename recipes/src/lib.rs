//! rbuild recipes: the files users read and the code that turns them into derivations.
//!
//! [`recipe`] loads recipe files and their locks (built-in ones are embedded), [`debian`] models
//! the archive (signed Release, Packages indices, dependency resolution), [`lock`] pins a recipe
//! to exact bytes, [`expand`] turns a locked recipe into the fetch → verify → unpack → configure
//! → pack graph, and [`builders`] are the Debian builders that run inside the sandbox. Nothing
//! here runs a build: the engine does.

pub mod builders;
pub mod debian;
pub mod evidence;
pub mod expand;
pub mod layers;
pub mod lock;
pub mod mirror;
pub mod recipe;
pub mod relock;
pub mod sbom;

/// The shared way a test that cannot run here skips (and fails under `CI=true`).
#[cfg(test)]
#[path = "../../tests/skip.rs"]
mod skip;
