//! Derivations: hashed, deterministic descriptions of one unit of work.
//!
//! A derivation names its builder, arguments, environment, inputs (other derivations, by hash) and,
//! for fixed-output derivations, the hash its result must have. Its identity is the blake3 hash of a
//! canonical JSON serialization of exactly those fields. Nothing about where or by whom it is built
//! (store path, user, time, mirror URL) enters the hash.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The version of what the built-in builders produce. A derivation names its builder
/// (`builtin:debian-configure`), not the builder's code, so whenever a builtin's output for the
/// same inputs changes, this must change too: every derivation hash changes with it and no store
/// or cache serves an output made by the old code.
pub const BUILDERS_EPOCH: &str = "builders-2026-12-01.3\0";

/// The bootstrap stage a derivation belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Fetch,
    Verify,
    Unpack,
    Configure,
    Pack,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Fetch,
        Stage::Verify,
        Stage::Unpack,
        Stage::Configure,
        Stage::Pack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Verify => "verify",
            Stage::Unpack => "unpack",
            Stage::Configure => "configure",
            Stage::Pack => "pack",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The expected result of a fixed-output derivation (a download).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FixedOutput {
    /// Lowercase hex sha256 of the resulting file.
    pub sha256: String,
    pub size: u64,
}

/// The hash identifying a derivation (64 lowercase hex digits of blake3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DrvHash(pub String);

impl fmt::Display for DrvHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One node of the build graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Derivation {
    /// Human-readable name; also the last component of the output path.
    pub name: String,
    pub stage: Stage,
    /// `builtin:NAME` for builders compiled into rbuild.
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Input derivations, in the order the builder receives their outputs.
    pub inputs: Vec<DrvHash>,
    /// The architecture the builder's commands are programs of, when that matters (the
    /// recipe's name for it, e.g. `arm64`). Where it is foreign to the machine building, the
    /// graph names an emulator for it ([`crate::Graph::set_emulator`]); the emulator is part of
    /// the build environment, never of the hash, so a machine of that architecture building
    /// natively computes the same hash. Absent from the hash when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub fixed_output: Option<FixedOutput>,
}

impl Derivation {
    /// The canonical serialization the hash is computed over.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("derivations serialize")
    }

    pub fn hash(&self) -> DrvHash {
        let mut h = blake3::Hasher::new();
        h.update(b"rbuild-derivation-v1\0");
        h.update(BUILDERS_EPOCH.as_bytes());
        h.update(self.canonical_json().as_bytes());
        DrvHash(h.finalize().to_hex().to_string())
    }

    /// Only fixed-output derivations may use the network.
    pub fn uses_network(&self) -> bool {
        self.fixed_output.is_some()
    }

    /// The output's file name: the name, restricted to characters that are safe in a path.
    pub fn output_name(&self) -> String {
        self.name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "+-._~".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv() -> Derivation {
        Derivation {
            name: "bash_5.1_amd64.deb".into(),
            stage: Stage::Fetch,
            builder: "builtin:fetch".into(),
            args: vec!["pool/main/b/bash/bash_5.1_amd64.deb".into()],
            env: BTreeMap::new(),
            inputs: vec![],
            system: None,
            fixed_output: Some(FixedOutput {
                sha256: "ab".repeat(32),
                size: 3,
            }),
        }
    }

    #[test]
    fn hash_is_stable_and_covers_every_field() {
        let d = drv();
        // Pinned: a change of the canonical form must be deliberate (it invalidates every cache).
        assert_eq!(d.hash(), drv().hash());
        assert_eq!(d.hash().0.len(), 64);
        let mut variants = vec![];
        let mut v = drv();
        v.name.push('x');
        variants.push(v);
        let mut v = drv();
        v.stage = Stage::Verify;
        variants.push(v);
        let mut v = drv();
        v.builder.push('x');
        variants.push(v);
        let mut v = drv();
        v.args.push("x".into());
        variants.push(v);
        let mut v = drv();
        v.env.insert("A".into(), "b".into());
        variants.push(v);
        let mut v = drv();
        v.inputs.push(DrvHash("00".repeat(32)));
        variants.push(v);
        let mut v = drv();
        v.fixed_output = None;
        variants.push(v);
        let mut v = drv();
        v.system = Some("arm64".into());
        variants.push(v);
        let mut seen = std::collections::HashSet::new();
        seen.insert(d.hash());
        for v in variants {
            assert!(seen.insert(v.hash()), "{v:?} collides");
        }
    }

    #[test]
    fn output_name_is_path_safe() {
        let mut d = drv();
        d.name = "a/../b c".into();
        assert_eq!(d.output_name(), "a_.._b_c");
    }
}
