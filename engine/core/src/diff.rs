//! Why two derivations differ, as `nix-diff` says it: walk two derivation graphs from their roots
//! in step, pairing inputs by name, and report for each pair that differs the first field that
//! does (and the change), or that nothing but its inputs differ — a change that only follows
//! from theirs.

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde::Serialize;

use crate::derivation::Derivation;

/// Where a side's derivations come from (a graph, the store's records, or both).
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<Derivation>;

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(
        "derivation {hash} ({side}) is neither in the recipe's graph nor recorded in the store"
    )]
    Unknown { side: &'static str, hash: String },
}

/// One pair of derivations that differ.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub name: String,
    pub a: String,
    pub b: String,
    /// The first field that differs (`builder`, `args[0].packages[3].version`, `env.X`,
    /// `inputs`, `builders epoch`…).
    pub field: String,
    /// The field's value on each side, shortened (absent for `inputs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Inputs (by name) only in A, only in B, and in both but different.
    pub removed_inputs: Vec<String>,
    pub added_inputs: Vec<String>,
    pub changed_inputs: Vec<String>,
    /// Nothing but the inputs' hashes differ: this change only follows from theirs.
    pub follows: bool,
}

/// The differences between the graphs below `a` and `b`, the roots' pair first, then breadth
/// first; each pair once.
pub fn diff(a: &str, b: &str, la: Lookup, lb: Lookup) -> Result<Vec<Difference>, DiffError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([(a.to_owned(), b.to_owned())]);
    while let Some((ha, hb)) = queue.pop_front() {
        if ha == hb || !seen.insert((ha.clone(), hb.clone())) {
            continue;
        }
        let (d, inputs) = compare(&ha, &hb, la, lb)?;
        queue.extend(inputs);
        out.push(d);
    }
    Ok(out)
}

/// Two derivation hashes, of A and of B, that stand in the same place.
pub type Pair = (String, String);

/// How derivation `ha` (of A) and `hb` (of B), different, differ themselves, and the pairs of
/// their inputs that differ (to compare next).
pub fn compare(
    ha: &str,
    hb: &str,
    la: Lookup,
    lb: Lookup,
) -> Result<(Difference, Vec<Pair>), DiffError> {
    let da = la(ha).ok_or_else(|| DiffError::Unknown {
        side: "A",
        hash: ha.to_owned(),
    })?;
    let db = lb(hb).ok_or_else(|| DiffError::Unknown {
        side: "B",
        hash: hb.to_owned(),
    })?;
    let (ia, ib) = (inputs_by_name(&da, la), inputs_by_name(&db, lb));
    let mut next = Vec::new();
    let mut d = Difference {
        name: db.name.clone(),
        a: ha.to_owned(),
        b: hb.to_owned(),
        field: String::new(),
        from: None,
        to: None,
        removed_inputs: ia
            .keys()
            .filter(|k| !ib.contains_key(*k))
            .cloned()
            .collect(),
        added_inputs: ib
            .keys()
            .filter(|k| !ia.contains_key(*k))
            .cloned()
            .collect(),
        changed_inputs: Vec::new(),
        follows: false,
    };
    for (name, hashes_a) in &ia {
        let Some(hashes_b) = ib.get(name) else {
            continue;
        };
        let pairs = paired(hashes_a, hashes_b);
        let before = next.len();
        next.extend(pairs.into_iter().filter(|(x, y)| x != y));
        if next.len() > before || hashes_a.len() != hashes_b.len() {
            d.changed_inputs.push(name.clone());
        }
    }
    match first_field_difference(&da, &db) {
        Some((field, from, to)) => {
            d.field = field;
            d.from = Some(from);
            d.to = Some(to);
        }
        None if !d.removed_inputs.is_empty()
            || !d.added_inputs.is_empty()
            || da.inputs.len() != db.inputs.len() =>
        {
            d.field = "inputs".into();
        }
        None if !d.changed_inputs.is_empty() => {
            d.field = "inputs".into();
            d.follows = true;
        }
        None => {
            // Every field and input the same, and yet another hash: the hash's prefix, the
            // builders' epoch, changed with rbuild's builder code.
            d.field = "builders epoch".into();
            d.from = Some("an older rbuild's builders".into());
            d.to = Some(
                crate::derivation::BUILDERS_EPOCH
                    .trim_end_matches('\0')
                    .into(),
            );
        }
    }
    Ok((d, next))
}

/// `d`'s inputs by name (an input `look` does not know goes by its hash), each name's in
/// input order.
fn inputs_by_name(d: &Derivation, look: Lookup) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in &d.inputs {
        let name = look(&i.0).map(|d| d.name).unwrap_or_else(|| i.0.clone());
        m.entry(name).or_default().push(i.0.clone());
    }
    m
}

/// Inputs of one name on each side paired by position (one recipe's architectures).
fn paired(a: &[String], b: &[String]) -> Vec<Pair> {
    a.iter().cloned().zip(b.iter().cloned()).collect()
}

/// The inputs of `a` (of A) and `b` (of B) that stand in the same place, equal or not: paired
/// by name and, among equal names, by position.
pub fn input_pairs(a: &Derivation, b: &Derivation, la: Lookup, lb: Lookup) -> Vec<Pair> {
    let (ia, ib) = (inputs_by_name(a, la), inputs_by_name(b, lb));
    ia.iter()
        .filter_map(|(name, xs)| ib.get(name).map(|ys| paired(xs, ys)))
        .flatten()
        .collect()
}

/// The first field of the derivation itself (inputs aside) that differs, with both values.
fn first_field_difference(a: &Derivation, b: &Derivation) -> Option<(String, String, String)> {
    let simple = [
        ("name", json(&a.name), json(&b.name)),
        ("stage", json(&a.stage), json(&b.stage)),
        ("builder", json(&a.builder), json(&b.builder)),
        ("system", json(&a.system), json(&b.system)),
        ("fixed_output", json(&a.fixed_output), json(&b.fixed_output)),
    ];
    for (field, x, y) in simple {
        if x != y {
            return Some((field.into(), short(&x.to_string()), short(&y.to_string())));
        }
    }
    for i in 0..a.args.len().max(b.args.len()) {
        let (x, y) = (a.args.get(i), b.args.get(i));
        if x == y {
            continue;
        }
        let field = format!("args[{i}]");
        return Some(match (x, y) {
            (Some(x), Some(y)) => value_difference(&field, &parse(x), &parse(y)),
            (x, y) => (field, shown(x), shown(y)),
        });
    }
    let keys: std::collections::BTreeSet<&String> = a.env.keys().chain(b.env.keys()).collect();
    for k in keys {
        let (x, y) = (a.env.get(k), b.env.get(k));
        if x != y {
            return Some((format!("env.{k}"), shown(x), shown(y)));
        }
    }
    None
}

fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("derivation fields serialize")
}

/// An argument as JSON when it is (plans are), else as a string.
fn parse(s: &str) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(v) if v.is_object() || v.is_array() => v,
        _ => serde_json::Value::String(s.to_owned()),
    }
}

fn shown(v: Option<&String>) -> String {
    v.map(|s| short(&format!("{s:?}")))
        .unwrap_or_else(|| "(absent)".into())
}

/// The first place two JSON values differ, as a path below `path`, with both sides there.
fn value_difference(
    path: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
) -> (String, String, String) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) if p == q => continue,
                    (Some(p), Some(q)) => return value_difference(&format!("{path}.{k}"), p, q),
                    (p, q) => {
                        let s = |v: Option<&Value>| {
                            v.map(|v| short(&v.to_string()))
                                .unwrap_or_else(|| "(absent)".into())
                        };
                        return (format!("{path}.{k}"), s(p), s(q));
                    }
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                if p != q {
                    return value_difference(&format!("{path}[{i}]"), p, q);
                }
            }
            if x.len() != y.len() {
                let extra = |v: &[Value]| {
                    v.get(x.len().min(y.len()))
                        .map(|e| short(&e.to_string()))
                        .unwrap_or_else(|| "(absent)".into())
                };
                return (
                    format!("{path}[{}]", x.len().min(y.len())),
                    extra(x),
                    extra(y),
                );
            }
        }
        (Value::String(x), Value::String(y)) if x.contains('\n') || y.contains('\n') => {
            // A script or a file's text: the first line that differs.
            let (lx, ly): (Vec<&str>, Vec<&str>) = (x.lines().collect(), y.lines().collect());
            let n = lx.iter().zip(&ly).take_while(|(p, q)| p == q).count();
            let line = |v: &[&str]| {
                v.get(n)
                    .map(|l| short(&format!("{l:?}")))
                    .unwrap_or_else(|| "(absent)".into())
            };
            return (format!("{path} line {}", n + 1), line(&lx), line(&ly));
        }
        _ => {}
    }
    (
        path.to_owned(),
        short(&a.to_string()),
        short(&b.to_string()),
    )
}

/// At most 100 characters.
fn short(s: &str) -> String {
    if s.chars().count() <= 100 {
        s.to_owned()
    } else {
        let head: String = s.chars().take(97).collect();
        format!("{head}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::Stage;
    use std::collections::HashMap;

    fn drv(name: &str, args: &[&str], inputs: &[&Derivation]) -> Derivation {
        Derivation {
            name: name.into(),
            stage: Stage::Pack,
            builder: "builtin:x".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
            inputs: inputs.iter().map(|d| d.hash()).collect(),
            system: None,
            fixed_output: None,
        }
    }

    fn lookup(drvs: &[&Derivation]) -> HashMap<String, Derivation> {
        drvs.iter().map(|d| (d.hash().0, (*d).clone())).collect()
    }

    /// A leaf's plan changed: the leaf is named with the JSON path of the change; the two
    /// derivations above it only follow.
    #[test]
    fn names_the_cause_and_collapses_what_follows() {
        let leaf_a = drv(
            "leaf",
            &[r#"{"packages":[{"name":"a","version":"1"}]}"#],
            &[],
        );
        let leaf_b = drv(
            "leaf",
            &[r#"{"packages":[{"name":"a","version":"2"}]}"#],
            &[],
        );
        let other = drv("other", &["same"], &[]);
        let mid_a = drv("mid", &["m"], &[&leaf_a, &other]);
        let mid_b = drv("mid", &["m"], &[&leaf_b, &other]);
        let top_a = drv("top", &["t"], &[&mid_a]);
        let top_b = drv("top", &["t"], &[&mid_b]);
        let a = lookup(&[&leaf_a, &other, &mid_a, &top_a]);
        let b = lookup(&[&leaf_b, &other, &mid_b, &top_b]);
        let (la, lb) = (|h: &str| a.get(h).cloned(), |h: &str| b.get(h).cloned());
        let d = diff(&top_a.hash().0, &top_b.hash().0, &la, &lb).unwrap();
        let summary: Vec<(&str, &str, bool)> = d
            .iter()
            .map(|d| (d.name.as_str(), d.field.as_str(), d.follows))
            .collect();
        assert_eq!(
            summary,
            [
                ("top", "inputs", true),
                ("mid", "inputs", true),
                ("leaf", "args[0].packages[0].version", false)
            ]
        );
        assert_eq!(d[1].changed_inputs, ["leaf"]);
        assert_eq!(
            (d[2].from.as_deref(), d[2].to.as_deref()),
            (Some("\"1\""), Some("\"2\""))
        );
    }

    #[test]
    fn inputs_added_env_and_scripts() {
        let x = drv("x", &[], &[]);
        let mut a = drv("d", &["echo one\necho two"], &[]);
        let mut b = drv("d", &["echo one\necho 2"], &[&x]);
        let all = lookup(&[&x, &a, &b]);
        let l = |h: &str| all.get(h).cloned();
        let d = diff(&a.hash().0, &b.hash().0, &l, &l).unwrap();
        assert_eq!(d[0].field, "args[0] line 2");
        assert_eq!(d[0].added_inputs, ["x"]);
        a.args = b.args.clone();
        b.inputs.clear();
        b.env.insert("SOURCE_DATE_EPOCH".into(), "5".into());
        let all = lookup(&[&a, &b]);
        let l = |h: &str| all.get(h).cloned();
        let d = diff(&a.hash().0, &b.hash().0, &l, &l).unwrap();
        assert_eq!(
            (d[0].field.as_str(), d[0].to.as_deref()),
            ("env.SOURCE_DATE_EPOCH", Some("\"5\""))
        );
        let none = |_: &str| None;
        assert!(matches!(
            diff(&a.hash().0, &b.hash().0, &none, &l),
            Err(DiffError::Unknown { side: "A", .. })
        ));
    }
}
