//! What a realise spent its time on, as `cargo build --timings` and Bazel's `--profile` show it:
//! one bar per derivation built or substituted, on a time line, in the lane (build slot) it ran
//! in, coloured by stage, with the critical path marked — as one self-contained HTML page (no
//! network, no CDN: its data and script are inline) and as Chrome trace events, which Perfetto
//! and `chrome://tracing` open.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::derivation::Stage;

/// One derivation this run built or substituted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    pub hash: String,
    pub name: String,
    pub stage: Stage,
    /// `built` or `substituted`.
    pub outcome: &'static str,
    /// Seconds since the realise started, when it got its slot and when it finished.
    pub start: f64,
    pub end: f64,
    /// The hashes of its inputs that this run also built or substituted.
    pub deps: Vec<String>,
}

/// A run's timings, with what the page and the trace show beside each bar.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub title: String,
    /// Derivations that were already valid (not drawn).
    pub reused: usize,
    pub seconds: f64,
    pub bars: Vec<Bar>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    #[serde(flatten)]
    pub timing: Timing,
    /// The lane (0-based) the bar is drawn in: no two bars of a lane overlap.
    pub lane: usize,
    /// On the critical path: the chain of derivations, each waiting for the one before, that
    /// ends with the last to finish.
    pub critical: bool,
}

impl Timeline {
    pub fn new(title: &str, timings: &[Timing], reused: usize, seconds: f64) -> Timeline {
        let mut order: Vec<&Timing> = timings.iter().collect();
        order.sort_by(|a, b| a.start.total_cmp(&b.start).then(a.name.cmp(&b.name)));
        let critical = critical_path(timings);
        let mut lane_ends: Vec<f64> = Vec::new();
        let mut bars = Vec::new();
        for t in order {
            let lane = match lane_ends.iter().position(|&end| end <= t.start) {
                Some(l) => l,
                None => {
                    lane_ends.push(0.0);
                    lane_ends.len() - 1
                }
            };
            lane_ends[lane] = t.end;
            bars.push(Bar {
                timing: t.clone(),
                lane,
                critical: critical.contains(&t.hash.as_str()),
            });
        }
        Timeline {
            title: title.to_owned(),
            reused,
            seconds,
            bars,
        }
    }

    /// Chrome trace events (the JSON object form): one complete event per bar, its lane as the
    /// thread, named `slot N`.
    pub fn chrome_trace(&self) -> serde_json::Value {
        let us = |s: f64| (s * 1e6).round() as i64;
        let mut events: Vec<serde_json::Value> = self
            .bars
            .iter()
            .map(|b| {
                serde_json::json!({
                    "name": b.timing.name,
                    "cat": b.timing.stage.as_str(),
                    "ph": "X",
                    "ts": us(b.timing.start),
                    "dur": us(b.timing.end - b.timing.start),
                    "pid": 1,
                    "tid": b.lane,
                    "args": {
                        "hash": b.timing.hash,
                        "outcome": b.timing.outcome,
                        "critical": b.critical,
                    },
                })
            })
            .collect();
        let lanes = self.bars.iter().map(|b| b.lane + 1).max().unwrap_or(0);
        events.push(serde_json::json!({
            "name": "process_name", "ph": "M", "pid": 1,
            "args": {"name": format!("rbuild realise {}", self.title)},
        }));
        for lane in 0..lanes {
            events.push(serde_json::json!({
                "name": "thread_name", "ph": "M", "pid": 1, "tid": lane,
                "args": {"name": format!("slot {lane}")},
            }));
        }
        serde_json::json!({"traceEvents": events, "displayTimeUnit": "ms"})
    }

    /// The HTML page: the data inline as JSON, drawn by an inline script as SVG.
    pub fn html(&self) -> String {
        // Names come from recipes: in a script element, `</` could end it and `<!--` change how
        // it is parsed; `<` only stands in JSON strings, where `\u003c` is the same text.
        let data = serde_json::to_string(self)
            .expect("timings serialize")
            .replace('<', "\\u003c");
        let mut per_stage = String::new();
        for stage in Stage::ALL {
            let bars: Vec<&Bar> = self
                .bars
                .iter()
                .filter(|b| b.timing.stage == stage)
                .collect();
            if bars.is_empty() {
                continue;
            }
            let busy: f64 = bars.iter().map(|b| b.timing.end - b.timing.start).sum();
            let _ = write!(
                per_stage,
                "<tr><td><span class=\"key {s}\"></span>{s}</td><td>{}</td><td>{busy:.2} s</td></tr>",
                bars.len(),
                s = stage.as_str(),
            );
        }
        let title = html_escape(&self.title);
        format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>rbuild timings: {title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
svg {{ border: 1px solid #ddd; background: #fff; }}
.bar {{ stroke: #fff; stroke-width: 0.5; }}
.bar.critical {{ stroke: #000; stroke-width: 1.5; }}
.fetch {{ fill: #6baed6; background: #6baed6; }}
.verify {{ fill: #9e9ac8; background: #9e9ac8; }}
.unpack {{ fill: #74c476; background: #74c476; }}
.configure {{ fill: #fd8d3c; background: #fd8d3c; }}
.pack {{ fill: #e377c2; background: #e377c2; }}
.key {{ display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; }}
.axis {{ stroke: #bbb; }} .tick {{ font-size: 11px; fill: #666; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
td, th {{ padding: 0.2em 0.8em; text-align: left; border-bottom: 1px solid #eee; }}
</style></head>
<body>
<h1>rbuild realise {title}</h1>
<p id="summary"></p>
<svg id="chart" xmlns="http://www.w3.org/2000/svg"></svg>
<p>Each bar is a derivation, in the build slot it ran in; outlined bars are the critical path.
Hover a bar for its name and time.</p>
<table><tr><th>stage</th><th>derivations</th><th>time in builds</th></tr>{per_stage}</table>
<h2>Critical path</h2>
<ol id="critical"></ol>
<script type="application/json" id="timings">{data}</script>
<script>
(function () {{
  const t = JSON.parse(document.getElementById("timings").textContent);
  const svgNs = "http://www.w3.org/2000/svg";
  const lanes = t.bars.reduce((m, b) => Math.max(m, b.lane + 1), 0);
  const row = 18, left = 10, top = 24, width = 1100;
  const span = Math.max(t.seconds, ...t.bars.map(b => b.end), 0.001);
  const x = s => left + (s / span) * (width - 2 * left);
  const svg = document.getElementById("chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", top + lanes * row + 10);
  const el = (name, attrs, text) => {{
    const e = document.createElementNS(svgNs, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  }};
  const step = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600].find(s => span / s <= 12) || 1200;
  for (let s = 0; s <= span; s += step) {{
    el("line", {{class: "axis", x1: x(s), x2: x(s), y1: top - 6, y2: top + lanes * row}});
    el("text", {{class: "tick", x: x(s) + 2, y: top - 10}}, s.toFixed(step < 1 ? 1 : 0) + " s");
  }}
  for (const b of t.bars) {{
    const r = el("rect", {{
      class: "bar " + b.stage + (b.critical ? " critical" : ""),
      "data-hash": b.hash,
      x: x(b.start), y: top + b.lane * row + 2,
      width: Math.max(x(b.end) - x(b.start), 1), height: row - 4,
    }});
    const title = document.createElementNS(svgNs, "title");
    title.textContent = b.name + " (" + b.stage + ", " + b.outcome + "): " + (b.end - b.start).toFixed(2) + " s";
    r.appendChild(title);
  }}
  const built = t.bars.filter(b => b.outcome === "built").length;
  document.getElementById("summary").textContent =
    built + " built, " + (t.bars.length - built) + " substituted, " + t.reused +
    " already in the store (not drawn); " + t.seconds.toFixed(1) + " s in " + lanes + " slots";
  const ol = document.getElementById("critical");
  for (const b of t.bars.filter(b => b.critical).sort((a, c) => a.start - c.start)) {{
    const li = document.createElement("li");
    li.textContent = b.name + " (" + b.stage + "): " + (b.end - b.start).toFixed(2) + " s";
    ol.appendChild(li);
  }}
}})();
</script>
</body></html>
"#
        )
    }
}

/// The critical path: from the derivation that finished last, back through the input that
/// finished last, to one with no input built in this run.
fn critical_path(timings: &[Timing]) -> Vec<&str> {
    let by_hash: HashMap<&str, &Timing> = timings.iter().map(|t| (t.hash.as_str(), t)).collect();
    let mut path = Vec::new();
    let mut at = timings.iter().max_by(|a, b| a.end.total_cmp(&b.end));
    while let Some(t) = at {
        path.push(t.hash.as_str());
        at = t
            .deps
            .iter()
            .filter_map(|d| by_hash.get(d.as_str()).copied())
            .max_by(|a, b| a.end.total_cmp(&b.end));
    }
    path
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(hash: &str, stage: Stage, start: f64, end: f64, deps: &[&str]) -> Timing {
        Timing {
            hash: hash.into(),
            name: format!("{hash}-name"),
            stage,
            outcome: "built",
            start,
            end,
            deps: deps.iter().map(|d| d.to_string()).collect(),
        }
    }

    /// Two fetches in parallel, a verify after the slower, an unpack after the other: the
    /// critical path is the slow fetch and what waited for it, and the lanes never overlap.
    #[test]
    fn lanes_and_critical_path() {
        let timings = [
            t("a", Stage::Fetch, 0.0, 1.0, &[]),
            t("b", Stage::Fetch, 0.0, 3.0, &[]),
            t("c", Stage::Unpack, 1.0, 2.0, &["a"]),
            t("d", Stage::Verify, 3.0, 4.0, &["b", "a"]),
        ];
        let tl = Timeline::new("x", &timings, 5, 4.0);
        let lane = |h: &str| tl.bars.iter().find(|b| b.timing.hash == h).unwrap().lane;
        assert_ne!(lane("a"), lane("b"));
        assert_eq!(lane("c"), lane("a"), "a's slot is free again at 1.0");
        let critical: Vec<&str> = tl
            .bars
            .iter()
            .filter(|b| b.critical)
            .map(|b| b.timing.hash.as_str())
            .collect();
        assert_eq!(critical, ["b", "d"]);

        let trace = tl.chrome_trace();
        let events = trace["traceEvents"].as_array().unwrap();
        let complete: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(complete.len(), 4);
        let d = complete.iter().find(|e| e["args"]["hash"] == "d").unwrap();
        assert_eq!(
            (d["ts"].as_i64(), d["dur"].as_i64()),
            (Some(3_000_000), Some(1_000_000))
        );
        assert_eq!(d["cat"], "verify");
    }

    /// A name cannot end the page's script or inject markup.
    #[test]
    fn names_stay_data() {
        let mut evil = t("e", Stage::Pack, 0.0, 1.0, &[]);
        evil.name = "<!--<script></script><script>alert(1)</script>".into();
        let page = Timeline::new("<b>", &[evil], 0, 1.0).html();
        let data = page
            .split("<script type=\"application/json\" id=\"timings\">")
            .nth(1)
            .and_then(|rest| rest.split("</script>").next())
            .unwrap();
        assert!(!data.contains('<'), "{data}");
        let parsed: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(
            parsed["bars"][0]["name"],
            "<!--<script></script><script>alert(1)</script>"
        );
        assert!(page.contains("<title>rbuild timings: &lt;b&gt;</title>"));
        // Self-contained: nothing to fetch.
        for fetching in ["src=", "href=", "url(", "@import"] {
            assert!(!page.contains(fetching), "{fetching}");
        }
    }
}
