//! Built-in builders: code compiled into rbuild that a derivation names as `builtin:NAME`.
//!
//! All builders except `fetch` run inside the sandbox, in the re-executed rbuild binary, with no
//! network and no view of the host: they see their inputs under `/inputs`, write `$out`
//! (`/build/out`) and, for trees, the ownership sidecar `$out.meta`. The engine provides the
//! generic ones (pack); recipe crates register their own (Debian verify/unpack/configure).

pub mod fetch;
pub mod pack;
pub mod probe;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use crate::sandbox::{self, SandboxSpec};

/// What a builtin sees.
#[derive(Debug, Clone)]
pub struct BuildContext {
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Paths of the input outputs, in the derivation's order.
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
}

impl BuildContext {
    /// The SOURCE_DATE_EPOCH of this build (0 when the derivation does not set it).
    pub fn source_date_epoch(&self) -> i64 {
        self.env
            .get("SOURCE_DATE_EPOCH")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    pub fn meta_out(&self) -> PathBuf {
        rbuild_store::meta::sidecar(&self.out)
    }

    pub fn arg(&self, i: usize) -> anyhow::Result<&str> {
        self.args
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| anyhow::anyhow!("builder argument {i} is missing"))
    }
}

pub type BuiltinFn = fn(&BuildContext) -> anyhow::Result<()>;

/// The builders this binary knows, by name (without the `builtin:` prefix).
#[derive(Default, Clone)]
pub struct Builtins {
    map: HashMap<&'static str, BuiltinFn>,
    /// Builders that run untrusted commands in a chroot: they keep the privileges to mount the
    /// chroot's `/proc` and `/dev` and confine each command instead of themselves.
    chrooting: std::collections::HashSet<&'static str>,
}

impl Builtins {
    /// The engine's own builders.
    pub fn new() -> Builtins {
        let mut b = Builtins::default();
        b.register("probe", probe::probe);
        b.register("pack-tar", pack::pack_tar);
        b.register("pack-layer", pack::pack_layer);
        b.register("pack-oci", pack::pack_oci);
        b.register("pack-oci-manifest", pack::pack_oci_manifest);
        b.register("pack-oci-index", pack::pack_oci_index);
        b.register("pack-change-set", pack::pack_change_set);
        b
    }

    /// A builder that runs no command of its own: it is confined itself (Landlock, least
    /// privilege) before it starts.
    pub fn register(&mut self, name: &'static str, f: BuiltinFn) {
        self.map.insert(name, f);
    }

    /// A builder that runs untrusted commands through [`sandbox::run_chrooted`], which confines
    /// each of them.
    pub fn register_chrooting(&mut self, name: &'static str, f: BuiltinFn) {
        self.map.insert(name, f);
        self.chrooting.insert(name);
    }

    pub fn get(&self, builder: &str) -> Option<BuiltinFn> {
        builder
            .strip_prefix("builtin:")
            .and_then(|n| self.map.get(n).copied())
    }

    /// The body of `rbuild __sandbox SPEC`: enter the sandbox and run the named builtin.
    pub fn sandbox_main(&self, spec_path: &std::path::Path) -> i32 {
        sandbox::enter(spec_path, |spec: &SandboxSpec| {
            let Some(f) = self.get(&spec.builder) else {
                eprintln!("rbuild sandbox: unknown builder {}", spec.builder);
                return 70;
            };
            let ctx = BuildContext {
                args: spec.args.clone(),
                env: spec.env.iter().cloned().collect(),
                inputs: spec
                    .inputs
                    .iter()
                    .map(|(_, name)| PathBuf::from(sandbox::INPUTS_DIR).join(name))
                    .collect(),
                out: PathBuf::from(sandbox::OUT_PATH),
            };
            let name = spec.builder.trim_start_matches("builtin:");
            if !self.chrooting.contains(name) {
                if let Err(e) = sandbox::confine_builder() {
                    eprintln!("rbuild sandbox: {e}");
                    return 70;
                }
            }
            // Nothing here may panic on a full disk: stderr is the build log, on the store's
            // filesystem. A full disk exits with nospace::ENOSPC_EXIT, which the host names even
            // when the log is empty.
            use std::io::Write;
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&ctx))) {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => match crate::nospace::builder_exit_code(&e) {
                    Some((msg, code)) => {
                        let _ = writeln!(std::io::stderr(), "{msg}");
                        code
                    }
                    None => {
                        let _ = writeln!(
                            std::io::stderr(),
                            "error: {}",
                            crate::errors::chain(e.as_ref())
                        );
                        1
                    }
                },
                Err(payload) if crate::nospace::panic_says_no_space(payload.as_ref()) => {
                    crate::nospace::ENOSPC_EXIT
                }
                Err(payload) => std::panic::resume_unwind(payload),
            }
        })
    }
}
