//! Progress reporting: a live display per stage on a terminal, plain lines otherwise. Always on
//! stderr; stdout is kept for results.
//!
//! A stage's line shows its done/total count, the bytes it moved (downloads from the mirror and
//! from binary caches; nothing for stages that moved none) and, while derivations of the stage
//! run, the longest-running one with its elapsed time. [`summary`] is the one line a realise ends
//! with.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::derivation::Stage;
use crate::scheduler::Report;

/// The longest derivation name a stage's line shows (a terminal line must not wrap).
const NAME_WIDTH: usize = 40;

/// What a stage's line shows besides its counts: the bytes it moved and what is running. Shared
/// with the bar's template, which renders it at every tick (so elapsed times move).
#[derive(Debug, Default)]
struct Live {
    bytes: u64,
    /// Running derivations of the stage, in the order they started.
    running: Vec<(String, Instant)>,
}

impl Live {
    fn start(&mut self, name: &str, now: Instant) {
        self.running.push((name.to_owned(), now));
    }

    /// `name` no longer runs (the first of that name, should two run at once).
    fn stop(&mut self, name: &str) {
        if let Some(i) = self.running.iter().position(|(n, _)| n == name) {
            self.running.remove(i);
        }
    }

    /// E.g. `12.3 MiB, libc6_2.31-13_amd64.deb 3s (+23 more)`; bytes only when some moved.
    fn message(&self, now: Instant) -> String {
        let mut parts = Vec::new();
        if self.bytes > 0 {
            parts.push(human_bytes(self.bytes));
        }
        // The first started is the longest running.
        if let Some((name, since)) = self.running.first() {
            let mut s = format!(
                "{} {}",
                elide(name, NAME_WIDTH),
                short_duration(now.saturating_duration_since(*since))
            );
            if self.running.len() > 1 {
                s += &format!(" (+{} more)", self.running.len() - 1);
            }
            parts.push(s);
        }
        parts.join(", ")
    }
}

struct StageState {
    total: usize,
    done: usize,
    live: Arc<Mutex<Live>>,
    bar: Option<ProgressBar>,
}

pub struct Progress {
    multi: Option<MultiProgress>,
    stages: Mutex<BTreeMap<Stage, StageState>>,
    quiet: bool,
}

/// `61.2 MiB`: binary units, one decimal.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `12s`, `3m05s`, `1h02m`: a running derivation's age.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `28.4 s`, `9 min 12 s`: a whole run's wall time.
fn wall_time(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        let s = d.as_secs();
        format!("{} min {:02} s", s / 60, s % 60)
    }
}

/// `name`, cut to `max` characters with an ellipsis.
fn elide(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        name.to_owned()
    } else {
        let cut: String = name.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// A stage's plain line (no terminal): `unpack: 3/40 done libc6` or, when the stage moved
/// bytes, `fetch: 243/243 done (61.2 MiB) zlib1g`.
fn plain_line(stage: Stage, done: usize, total: usize, bytes: u64, name: &str) -> String {
    if bytes > 0 {
        format!(
            "{stage}: {done}/{total} done ({}) {name}",
            human_bytes(bytes)
        )
    } else {
        format!("{stage}: {done}/{total} done {name}")
    }
}

/// The line a realise ends with, e.g. `built 243, reused 0, substituted 0; fetched 61.2 MiB;
/// 28.4 s`. Bytes from the mirror and from binary caches are named apart when both moved.
pub fn summary(report: &Report, elapsed: Duration) -> String {
    let (mirror, caches) = (report.fetched_bytes, report.substituted_bytes);
    let fetched = match (mirror, caches) {
        (0, 0) => "nothing fetched".to_owned(),
        (m, 0) => format!("fetched {}", human_bytes(m)),
        (0, c) => format!("fetched {} from binary caches", human_bytes(c)),
        (m, c) => format!(
            "fetched {} ({} from the mirror, {} from binary caches)",
            human_bytes(m + c),
            human_bytes(m),
            human_bytes(c)
        ),
    };
    format!(
        "built {}, reused {}, substituted {}; {fetched}; {}",
        report.built,
        report.reused,
        report.substituted,
        wall_time(elapsed)
    )
}

fn bar_style(live: Arc<Mutex<Live>>) -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {live}")
        .expect("valid template")
        .progress_chars("=> ")
        .with_key(
            "live",
            move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let msg = live.lock().expect("progress lock").message(Instant::now());
                let _ = w.write_str(&msg);
            },
        )
}

impl Progress {
    /// A live display when stderr is a terminal and `quiet` is false.
    pub fn new(quiet: bool) -> Progress {
        if !quiet && std::io::stderr().is_terminal() {
            return Progress::drawing_to(ProgressDrawTarget::stderr());
        }
        Progress {
            multi: None,
            stages: Mutex::new(BTreeMap::new()),
            quiet,
        }
    }

    /// A live display drawing to `target`.
    fn drawing_to(target: ProgressDrawTarget) -> Progress {
        Progress {
            multi: Some(MultiProgress::with_draw_target(target)),
            stages: Mutex::new(BTreeMap::new()),
            quiet: false,
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
                    bar.finish();
                } else if bar.is_finished() {
                    // A stage done before the replan has work again.
                    bar.reset();
                    bar.set_position(st.done as u64);
                    bar.enable_steady_tick(TICK);
                }
            }
        }
        for (stage, total) in counts {
            if stages.contains_key(stage) {
                continue;
            }
            let live = Arc::new(Mutex::new(Live::default()));
            let bar = self.multi.as_ref().map(|m| {
                let b = m.add(ProgressBar::new(*total as u64));
                b.set_style(bar_style(live.clone()));
                b.set_prefix(stage.to_string());
                b.enable_steady_tick(TICK);
                b
            });
            stages.insert(
                *stage,
                StageState {
                    total: *total,
                    done: 0,
                    live,
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

    /// A derivation of `stage` started running (or substituting).
    pub fn started(&self, stage: Stage, name: &str) {
        let stages = self.stages.lock().expect("progress lock");
        let Some(st) = stages.get(&stage) else {
            return;
        };
        // The bar's template locks `live` while drawing: never draw while holding it.
        st.live
            .lock()
            .expect("progress lock")
            .start(name, Instant::now());
        if let Some(bar) = &st.bar {
            bar.tick();
        }
    }

    /// A derivation of `stage` stopped without finishing (it failed).
    pub fn failed(&self, stage: Stage, name: &str) {
        let stages = self.stages.lock().expect("progress lock");
        let Some(st) = stages.get(&stage) else {
            return;
        };
        st.live.lock().expect("progress lock").stop(name);
        if let Some(bar) = &st.bar {
            bar.tick();
        }
    }

    /// A derivation of `stage` finished, having moved `bytes` (downloaded or substituted).
    pub fn finished(&self, stage: Stage, name: &str, bytes: u64) {
        let mut stages = self.stages.lock().expect("progress lock");
        let Some(st) = stages.get_mut(&stage) else {
            return;
        };
        st.done += 1;
        let total_bytes = {
            let mut live = st.live.lock().expect("progress lock");
            live.stop(name);
            live.bytes += bytes;
            live.bytes
        };
        if let Some(bar) = &st.bar {
            bar.set_position(st.done as u64);
            if st.done == st.total {
                bar.finish();
            }
        } else if !self.quiet && (st.total <= 3 || st.done == st.total) {
            eprintln!(
                "{}",
                plain_line(stage, st.done, st.total, total_bytes, name)
            );
        }
    }

    /// Draw the bars one last time and stop drawing, so that what is printed next (the summary,
    /// the output path) stays below them and is never redrawn over. Call it before printing the
    /// result; dropping the display does the same without the last draw.
    pub fn finish(&self) {
        self.close(true);
    }

    fn close(&self, draw: bool) {
        let Some(m) = &self.multi else {
            return;
        };
        let mut stages = self.stages.lock().expect("progress lock");
        if !draw {
            m.set_draw_target(ProgressDrawTarget::hidden());
        }
        for st in stages.values_mut() {
            if let Some(bar) = st.bar.take() {
                if !bar.is_finished() {
                    // Left as it stopped: where a failed run was.
                    bar.abandon();
                }
            }
        }
        m.set_draw_target(ProgressDrawTarget::hidden());
    }
}

/// How often a live display redraws (running derivations' elapsed times move).
const TICK: Duration = Duration::from_millis(250);

impl Drop for Progress {
    fn drop(&mut self) {
        // Whatever was printed since the last draw stays: no redraw, no clear.
        self.close(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(p: &Progress, stage: Stage) -> u64 {
        p.stages.lock().unwrap()[&stage].live.lock().unwrap().bytes
    }

    fn running(p: &Progress, stage: Stage) -> Vec<String> {
        p.stages.lock().unwrap()[&stage]
            .live
            .lock()
            .unwrap()
            .running
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    #[test]
    fn a_replan_extends_the_stages_instead_of_starting_over() {
        let p = Progress::new(true);
        p.plan(&BTreeMap::from([(Stage::Fetch, 3), (Stage::Pack, 1)]));
        p.finished(Stage::Fetch, "a", 10);
        p.finished(Stage::Pack, "img", 5);
        // A refused substitute: two fetches left, and now an unpack.
        p.plan(&BTreeMap::from([(Stage::Fetch, 2), (Stage::Unpack, 1)]));
        let totals: Vec<(Stage, usize, usize)> = p
            .stages
            .lock()
            .unwrap()
            .iter()
            .map(|(s, st)| (*s, st.done, st.total))
            .collect();
        assert_eq!(
            totals,
            vec![
                (Stage::Fetch, 1, 3),
                (Stage::Unpack, 0, 1),
                (Stage::Pack, 1, 1)
            ]
        );
        assert_eq!(
            (bytes_of(&p, Stage::Fetch), bytes_of(&p, Stage::Pack)),
            (10, 5)
        );
    }

    #[test]
    fn running_derivations_are_tracked_per_stage_until_they_finish_or_fail() {
        let p = Progress::new(true);
        p.plan(&BTreeMap::from([(Stage::Fetch, 3), (Stage::Configure, 1)]));
        p.started(Stage::Fetch, "a.deb");
        p.started(Stage::Fetch, "b.deb");
        p.started(Stage::Configure, "debian-bullseye-configure");
        // A stage the plan does not have is ignored, not a panic.
        p.started(Stage::Pack, "img");
        assert_eq!(running(&p, Stage::Fetch), ["a.deb", "b.deb"]);
        assert_eq!(running(&p, Stage::Configure), ["debian-bullseye-configure"]);
        p.finished(Stage::Fetch, "a.deb", 100);
        assert_eq!(running(&p, Stage::Fetch), ["b.deb"]);
        p.failed(Stage::Fetch, "b.deb");
        assert!(running(&p, Stage::Fetch).is_empty());
        // A failure is not counted as done; the bytes are those of what finished.
        let st = &p.stages.lock().unwrap()[&Stage::Fetch];
        assert_eq!((st.done, st.total), (1, 3));
        assert_eq!(st.live.lock().unwrap().bytes, 100);
    }

    #[test]
    fn two_running_derivations_of_one_name_stop_one_at_a_time() {
        let mut live = Live::default();
        let t0 = Instant::now();
        live.start("x", t0);
        live.start("x", t0 + Duration::from_secs(5));
        live.stop("x");
        assert_eq!(
            live.running,
            [("x".to_owned(), t0 + Duration::from_secs(5))]
        );
        live.stop("not-running");
        assert_eq!(live.running.len(), 1);
    }

    #[test]
    fn a_line_shows_the_longest_running_derivation_and_its_age() {
        let t0 = Instant::now();
        let mut live = Live::default();
        assert_eq!(live.message(t0), "", "nothing moved, nothing running");
        live.start("debian-bullseye-configure", t0);
        assert_eq!(
            live.message(t0 + Duration::from_secs(12)),
            "debian-bullseye-configure 12s"
        );
        live.start("later", t0 + Duration::from_secs(10));
        live.start("latest", t0 + Duration::from_secs(11));
        assert_eq!(
            live.message(t0 + Duration::from_millis(125_900)),
            "debian-bullseye-configure 2m05s (+2 more)"
        );
        live.stop("debian-bullseye-configure");
        assert_eq!(
            live.message(t0 + Duration::from_secs(13)),
            "later 3s (+1 more)"
        );
    }

    #[test]
    fn bytes_show_only_where_some_moved() {
        let t0 = Instant::now();
        let mut live = Live::default();
        live.start("libc6_2.31-13+deb11u5_amd64.deb", t0);
        assert!(!live.message(t0).contains(" B"), "{}", live.message(t0));
        live.bytes = 64_172_851;
        assert_eq!(
            live.message(t0 + Duration::from_secs(3)),
            "61.2 MiB, libc6_2.31-13+deb11u5_amd64.deb 3s"
        );
        live.stop("libc6_2.31-13+deb11u5_amd64.deb");
        assert_eq!(live.message(t0), "61.2 MiB");

        assert_eq!(
            plain_line(Stage::Unpack, 3, 40, 0, "libc6"),
            "unpack: 3/40 done libc6"
        );
        assert_eq!(
            plain_line(Stage::Fetch, 243, 243, 64_172_851, "zlib1g"),
            "fetch: 243/243 done (61.2 MiB) zlib1g"
        );
    }

    #[test]
    fn long_names_are_cut_so_that_a_line_does_not_wrap() {
        let t0 = Instant::now();
        let mut live = Live::default();
        let name = "a".repeat(100);
        live.start(&name, t0);
        let msg = live.message(t0);
        assert_eq!(msg, format!("{}… 0s", "a".repeat(NAME_WIDTH - 1)));
        assert_eq!(elide("short", NAME_WIDTH), "short");
        assert_eq!(elide("é".repeat(41).as_str(), 40).chars().count(), 40);
    }

    #[test]
    fn sizes_and_times_read_like_a_person_wrote_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(64_172_851), "61.2 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(short_duration(Duration::from_millis(999)), "0s");
        assert_eq!(short_duration(Duration::from_secs(59)), "59s");
        assert_eq!(short_duration(Duration::from_secs(60)), "1m00s");
        assert_eq!(short_duration(Duration::from_secs(3725)), "1h02m");
        assert_eq!(wall_time(Duration::from_millis(28_440)), "28.4 s");
        assert_eq!(wall_time(Duration::from_secs(552)), "9 min 12 s");
    }

    #[test]
    fn the_summary_counts_what_was_built_reused_substituted_and_fetched() {
        let mut r = Report {
            built: 243,
            ..Report::default()
        };
        r.fetched_bytes = 64_172_851;
        assert_eq!(
            summary(&r, Duration::from_millis(28_400)),
            "built 243, reused 0, substituted 0; fetched 61.2 MiB; 28.4 s"
        );
        let warm = Report {
            reused: 1,
            ..Report::default()
        };
        assert_eq!(
            summary(&warm, Duration::from_millis(120)),
            "built 0, reused 1, substituted 0; nothing fetched; 0.1 s"
        );
        let cached = Report {
            substituted: 1,
            reused: 2,
            substituted_bytes: 10 << 20,
            ..Report::default()
        };
        assert_eq!(
            summary(&cached, Duration::from_secs(3)),
            "built 0, reused 2, substituted 1; fetched 10.0 MiB from binary caches; 3.0 s"
        );
        let both = Report {
            built: 2,
            substituted: 1,
            fetched_bytes: 1 << 20,
            substituted_bytes: 2 << 20,
            ..Report::default()
        };
        assert_eq!(
            summary(&both, Duration::from_secs(75)),
            "built 2, reused 0, substituted 1; fetched 3.0 MiB (1.0 MiB from the mirror, 2.0 MiB from binary caches); 1 min 15 s"
        );
    }

    /// A terminal that records what is drawn on it.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Recorder {
        fn events(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
        fn push(&self, e: String) -> std::io::Result<()> {
            self.0.lock().unwrap().push(e);
            Ok(())
        }
    }

    impl indicatif::TermLike for Recorder {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            self.push(format!("up {n}"))
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.push(format!("down {n}"))
        }
        fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
            self.push(format!("right {n}"))
        }
        fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
            self.push(format!("left {n}"))
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.push(format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if s.trim().is_empty() {
                return Ok(());
            }
            self.push(s.to_owned())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.push("clear".into())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn recorded() -> (Progress, Recorder) {
        let rec = Recorder::default();
        let p = Progress::drawing_to(ProgressDrawTarget::term_like(Box::new(rec.clone())));
        (p, rec)
    }

    #[test]
    fn a_live_line_shows_the_running_derivation_ticking_and_bytes_only_where_they_moved() {
        let (p, rec) = recorded();
        p.plan(&BTreeMap::from([(Stage::Fetch, 1), (Stage::Configure, 1)]));
        p.started(Stage::Fetch, "libc6.deb");
        p.finished(Stage::Fetch, "libc6.deb", 2048);
        p.started(Stage::Configure, "debian-bullseye-configure");
        // No call after this one: the steady tick alone redraws the elapsed time.
        std::thread::sleep(Duration::from_millis(1300));
        let drawn = rec.events();
        let configure: Vec<&String> = drawn.iter().filter(|e| e.contains("configure [")).collect();
        assert!(
            configure
                .iter()
                .any(|e| e.ends_with("0/1 debian-bullseye-configure 1s")),
            "{drawn:#?}"
        );
        assert!(
            drawn
                .iter()
                .any(|e| e.contains("fetch [") && e.ends_with("1/1 2.0 KiB")),
            "{drawn:#?}"
        );
        assert!(!drawn.iter().any(|e| e.contains(" 0 B")), "{drawn:#?}");
        p.finished(Stage::Configure, "debian-bullseye-configure", 0);
        let last = rec.events();
        assert!(
            last.iter()
                .rev()
                .find(|e| e.contains("configure ["))
                .unwrap()
                .ends_with("1/1 "),
            "{last:#?}"
        );
    }

    #[test]
    fn after_finish_nothing_is_drawn_over_what_follows() {
        let (p, rec) = recorded();
        p.plan(&BTreeMap::from([(Stage::Fetch, 2), (Stage::Configure, 1)]));
        p.started(Stage::Fetch, "a.deb");
        p.finished(Stage::Fetch, "a.deb", 10);
        p.started(Stage::Configure, "debian-bullseye-configure");
        p.finish();
        let after_finish = rec.events();
        // The unfinished bars were drawn a last time, as they stopped.
        assert!(
            after_finish
                .iter()
                .any(|e| e.contains("configure [") && e.contains("0/1 debian-bullseye-configure")),
            "{after_finish:#?}"
        );
        // What realise prints next (summary, path) is never redrawn or cleared: no tick, no
        // late call, not the drop.
        std::thread::sleep(Duration::from_millis(600));
        p.line("late");
        p.finished(Stage::Fetch, "b.deb", 10);
        drop(p);
        assert_eq!(rec.events(), after_finish);
    }

    #[test]
    fn dropping_a_live_display_draws_and_clears_nothing() {
        let (p, rec) = recorded();
        p.plan(&BTreeMap::from([(Stage::Unpack, 2)]));
        p.started(Stage::Unpack, "a");
        drop(p);
        let after = rec.events();
        // The bars are left as last drawn, not cleared (that wiped out an error or the path).
        assert!(after.last().unwrap().contains("unpack ["), "{after:#?}");
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(rec.events(), after);
    }

    #[test]
    fn finishing_a_plain_display_twice_is_harmless() {
        let p = Progress::new(true);
        p.plan(&BTreeMap::from([(Stage::Fetch, 1)]));
        p.finish();
        p.finish();
        p.finished(Stage::Fetch, "a", 1);
        assert_eq!(bytes_of(&p, Stage::Fetch), 1);
    }
}
