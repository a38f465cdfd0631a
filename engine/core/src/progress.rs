//! Progress reporting: a live display per stage (done/total, bytes) on a terminal, plain lines
//! otherwise. Always on stderr; stdout is kept for results.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::derivation::Stage;

struct StageState {
    total: usize,
    done: usize,
    bytes: u64,
    bar: Option<ProgressBar>,
}

pub struct Progress {
    multi: Option<MultiProgress>,
    stages: Mutex<BTreeMap<Stage, StageState>>,
    quiet: bool,
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

impl Progress {
    /// A live display when stderr is a terminal and `quiet` is false.
    pub fn new(quiet: bool) -> Progress {
        let live = !quiet && std::io::stderr().is_terminal();
        Progress {
            multi: live.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            stages: Mutex::new(BTreeMap::new()),
            quiet,
        }
    }

    /// Announce how many derivations of each stage will run.
    pub fn plan(&self, counts: &BTreeMap<Stage, usize>) {
        let mut stages = self.stages.lock().expect("progress lock");
        for (stage, total) in counts {
            let bar = self.multi.as_ref().map(|m| {
                let b = m.add(ProgressBar::new(*total as u64));
                b.set_style(
                    ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg}")
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                b.set_prefix(stage.to_string());
                b
            });
            stages.insert(
                *stage,
                StageState {
                    total: *total,
                    done: 0,
                    bytes: 0,
                    bar,
                },
            );
        }
    }

    pub fn line(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match &self.multi {
            Some(m) => {
                let _ = m.println(msg);
            }
            None => eprintln!("{msg}"),
        }
    }

    /// A derivation of `stage` finished, having produced `bytes`.
    pub fn finished(&self, stage: Stage, name: &str, bytes: u64) {
        let mut stages = self.stages.lock().expect("progress lock");
        let Some(st) = stages.get_mut(&stage) else {
            return;
        };
        st.done += 1;
        st.bytes += bytes;
        if let Some(bar) = &st.bar {
            bar.set_position(st.done as u64);
            bar.set_message(format!("{} {name}", human(st.bytes)));
            if st.done == st.total {
                bar.finish_with_message(human(st.bytes));
            }
        } else if !self.quiet && (st.total <= 3 || st.done == st.total) {
            eprintln!(
                "{stage}: {}/{} done ({}) {name}",
                st.done,
                st.total,
                human(st.bytes)
            );
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}
