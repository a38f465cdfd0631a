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

    /// Announce how many derivations of each stage will run. Called again after a replan, it
    /// extends the existing bars instead of adding new ones.
    pub fn plan(&self, counts: &BTreeMap<Stage, usize>) {
        let mut stages = self.stages.lock().expect("progress lock");
        for (stage, st) in stages.iter_mut() {
            st.total = st.done + counts.get(stage).copied().unwrap_or(0);
            if let Some(bar) = &st.bar {
                bar.set_length(st.total as u64);
                if st.done == st.total {
                    bar.finish_with_message(human(st.bytes));
                }
            }
        }
        for (stage, total) in counts {
            if stages.contains_key(stage) {
                continue;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replan_extends_the_stages_instead_of_starting_over() {
        let p = Progress::new(true);
        p.plan(&BTreeMap::from([(Stage::Fetch, 3), (Stage::Pack, 1)]));
        p.finished(Stage::Fetch, "a", 10);
        p.finished(Stage::Pack, "img", 5);
        // A refused substitute: two fetches left, and now an unpack.
        p.plan(&BTreeMap::from([(Stage::Fetch, 2), (Stage::Unpack, 1)]));
        let stages = p.stages.lock().unwrap();
        let totals: Vec<(Stage, usize, usize, u64)> = stages
            .iter()
            .map(|(s, st)| (*s, st.done, st.total, st.bytes))
            .collect();
        assert_eq!(
            totals,
            vec![
                (Stage::Fetch, 1, 3, 10),
                (Stage::Unpack, 0, 1, 0),
                (Stage::Pack, 1, 1, 5)
            ]
        );
    }
}
