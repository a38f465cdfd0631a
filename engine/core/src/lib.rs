//! rbuild's engine: derivations and their hashes, the build DAG, the scheduler that realises it
//! into the content store, the sandbox every builder runs in, and the built-in builders.
//!
//! It knows nothing about Debian: recipe crates turn their recipes into [`Graph`]s of
//! [`Derivation`]s and register their own builtins next to the engine's generic ones.

pub mod archive;
pub mod builtins;
pub mod check;
pub mod derivation;
pub mod diff;
pub mod errors;
pub mod graph;
pub mod nospace;
pub mod progress;
pub mod repair;
pub mod sandbox;
pub mod scheduler;
pub mod timings;

/// The shared way a test that cannot run here skips (and fails under `CI=true`).
#[cfg(test)]
#[path = "../../../tests/skip.rs"]
mod skip;

pub use derivation::{Derivation, DrvHash, FixedOutput, Stage};
pub use graph::{Emulator, Graph};
pub use scheduler::{Engine, EngineError, Report};
