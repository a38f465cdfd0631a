//! `rbuild man`: manual pages made from the clap definitions.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// `rbuild man`: rbuild(1) on stdout, or every visible command's page into `dir`.
pub(crate) fn man_cmd(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let cmd = <crate::Cli as clap::CommandFactory>::command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    pub(crate) fn write(dir: &Path, name: &str, cmd: clap::Command) -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        // clap names commands with static strings; a page per command, once per run.
        let page: &'static str = Box::leak(name.to_owned().into_boxed_str());
        clap_mangen::Man::new(cmd.clone().name(page)).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(dir, &format!("{name}-{}", sub.get_name()), sub.clone())?;
        }
        Ok(())
    }
    write(&dir, "rbuild", cmd)
}
