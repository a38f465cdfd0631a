//! Debian version comparison (policy §5.6.12), the package set `debootstrap` (default variant)
//! installs, and an order in which dpkg can install that set.
//!
//! Resolution is deterministic: it depends only on the packages given, never on hash order or
//! time. Seeds are taken in name order and dependencies in breadth-first order; for each relation
//! the first alternative already selected wins, else the first that names a real package
//! satisfying its version constraint (the highest such version), else the lowest-named provider.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, VecDeque};

use super::packages::{format_alternatives, parse_relations, Dep, Package};
use super::DebianError;

/// The sort weight of one byte of a non-digit part: `~` before everything (even the end of the
/// part), then the end, then letters, then everything else.
fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => c as i32,
        Some(b'~') => -1,
        Some(c) => c as i32 + 256,
    }
}

/// dpkg's `verrevcmp`: compare an upstream version or a revision.
fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
    let (mut i, mut j) = (0, 0);
    let at = |s: &[u8], k: usize| s.get(k).copied();
    let digit = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_digit());
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(at(a, i))) || (j < b.len() && !digit(at(b, j))) {
            let (ac, bc) = (order(at(a, i)), order(at(b, j)));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while at(a, i) == Some(b'0') {
            i += 1;
        }
        while at(b, j) == Some(b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(at(a, i)) && digit(at(b, j)) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(at(a, i)) {
            return Ordering::Greater;
        }
        if digit(at(b, j)) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// Split `[epoch:]upstream[-revision]`.
fn split_version(v: &str) -> (&str, &str, &str) {
    let v = v.trim();
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) => (e, r),
        _ => ("0", v),
    };
    let (upstream, revision) = rest.rsplit_once('-').unwrap_or((rest, ""));
    (epoch, upstream, revision)
}

/// Compare two decimal strings of any length.
fn cmp_decimal(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Compare two Debian versions per policy §5.6.12: epoch numerically, then the upstream version
/// and the revision with dpkg's algorithm (alternating non-digit parts, compared with `~` first,
/// then letters, then other characters, and digit parts, compared numerically).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split_version(a);
    let (eb, ub, rb) = split_version(b);
    cmp_decimal(ea, eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

/// Whether `version` satisfies the constraint `op want` (`<<`, `<=`, `=`, `>=`, `>>`, and the
/// obsolete `<` and `>` meaning `<=` and `>=`). An unknown operator satisfies nothing.
pub fn satisfies(version: &str, op: &str, want: &str) -> bool {
    let o = compare_versions(version, want);
    match op {
        "<<" => o == Ordering::Less,
        "<=" | "<" => o != Ordering::Greater,
        "=" => o == Ordering::Equal,
        ">=" | ">" => o != Ordering::Less,
        ">>" => o == Ordering::Greater,
        _ => false,
    }
}

/// Whether the real package `p` satisfies `d` (by name and version).
fn real_satisfies(p: &Package, d: &Dep) -> bool {
    p.name == d.name
        && match &d.version {
            None => true,
            Some((op, v)) => satisfies(&p.version, op, v),
        }
}

/// Whether `p` satisfies `d` through its `Provides`: an unversioned relation is satisfied by any
/// provider, a versioned one only by a versioned `Provides` whose version satisfies it.
fn provide_satisfies(p: &Package, d: &Dep) -> bool {
    match &d.version {
        None => p.provides.iter().any(|n| n == &d.name),
        Some((op, want)) => p
            .provides_versioned
            .iter()
            .any(|(n, v)| n == &d.name && satisfies(v, op, want)),
    }
}

/// The archive as the resolver sees it: one architecture, versions sorted, providers by name.
struct Universe<'a> {
    /// name → packages of that name, highest version first.
    by_name: HashMap<&'a str, Vec<&'a Package>>,
    /// virtual name → the candidate (highest-version) packages providing it, by name.
    providers: HashMap<&'a str, Vec<&'a Package>>,
}

impl<'a> Universe<'a> {
    fn new(packages: impl Iterator<Item = &'a Package>) -> Self {
        let mut by_name: HashMap<&str, Vec<&Package>> = HashMap::new();
        for p in packages {
            by_name.entry(p.name.as_str()).or_default().push(p);
        }
        for v in by_name.values_mut() {
            // Stable: among equal versions, the first in the input wins.
            v.sort_by(|a, b| compare_versions(&b.version, &a.version));
        }
        let mut providers: HashMap<&str, Vec<&Package>> = HashMap::new();
        for v in by_name.values() {
            let best = v[0];
            for n in &best.provides {
                let list = providers.entry(n.as_str()).or_default();
                if !list.iter().any(|q| std::ptr::eq(*q, best)) {
                    list.push(best);
                }
            }
        }
        for v in providers.values_mut() {
            v.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Universe { by_name, providers }
    }

    /// What the archive has under the names of `alts`, for an error message.
    fn describe(&self, alts: &[Dep]) -> String {
        alts.iter()
            .map(|d| {
                let real = self.by_name.get(d.name.as_str()).map(|v| {
                    v.iter()
                        .map(|p| p.version.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                });
                let prov = self.providers.get(d.name.as_str()).map(|v| {
                    v.iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                });
                match (real, prov) {
                    (Some(r), None) => format!("{} version {r}", d.name),
                    (Some(r), Some(p)) => format!("{} version {r}, provided by {p}", d.name),
                    (None, Some(p)) => format!("{} (virtual) provided by {p}", d.name),
                    (None, None) => format!("no package or provider named {}", d.name),
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

struct Selection<'a> {
    selected: BTreeMap<&'a str, &'a Package>,
    /// virtual name → selected packages providing it.
    provided: HashMap<&'a str, Vec<&'a Package>>,
    queue: VecDeque<&'a Package>,
}

impl<'a> Selection<'a> {
    fn select(&mut self, p: &'a Package) {
        if self.selected.insert(p.name.as_str(), p).is_none() {
            for n in &p.provides {
                self.provided.entry(n.as_str()).or_default().push(p);
            }
            self.queue.push_back(p);
        }
    }

    fn satisfied(&self, d: &Dep) -> bool {
        self.selected
            .get(d.name.as_str())
            .is_some_and(|p| real_satisfies(p, d))
            || self
                .provided
                .get(d.name.as_str())
                .is_some_and(|v| v.iter().any(|p| provide_satisfies(p, d)))
    }

    /// Satisfy one relation group; false if nothing in the archive can (then
    /// [`Universe::describe`] says what it has under those names).
    fn resolve(&mut self, u: &Universe<'a>, alts: &[Dep]) -> bool {
        if alts.iter().any(|d| self.satisfied(d)) {
            return true;
        }
        for d in alts {
            if self.selected.contains_key(d.name.as_str()) {
                // Another version of it is selected already; two cannot be installed.
                continue;
            }
            if let Some(p) = u
                .by_name
                .get(d.name.as_str())
                .and_then(|v| v.iter().find(|p| real_satisfies(p, d)))
            {
                self.select(p);
                return true;
            }
        }
        for d in alts {
            let Some(provs) = u.providers.get(d.name.as_str()) else {
                continue;
            };
            if let Some(p) = provs
                .iter()
                .find(|p| provide_satisfies(p, d) && !self.selected.contains_key(p.name.as_str()))
            {
                self.select(p);
                return true;
            }
        }
        false
    }
}

/// The package set `debootstrap` (default variant) installs for `arch`: every package of
/// `Priority: required` or `important` (architecture `arch` or `all`), the `include` requests
/// (each a package name, or any relation such as `foo (>= 2) | bar`), and the transitive closure
/// of their `Pre-Depends` and `Depends`. Where a name has several versions the highest is taken.
/// Sorted by name. An unsatisfiable relation is an error naming the package and the relation.
pub fn resolve_debootstrap(
    packages: &[Package],
    arch: &str,
    include: &[String],
) -> Result<Vec<Package>, DebianError> {
    resolve_request(
        packages,
        arch,
        &Request {
            include,
            ..Request::default()
        },
    )
}

/// What to select besides Priority required + important, as debootstrap's per-suite script
/// (`scripts/debian-common`) adjusts it: suites differ in data, not in code.
#[derive(Debug, Default, Clone, Copy)]
pub struct Request<'a> {
    /// `--include`: relations to satisfy as well.
    pub include: &'a [String],
    /// Packages added to the required set (bookworm: `usr-is-merged`).
    pub also_required: &'a [String],
    /// Packages never pulled in as a dependency (debootstrap's `EXCLUDE_DEPENDENCY`; from bookworm
    /// on: `usrmerge`): a relation whose first alternative is one of them is left unsatisfied,
    /// as debootstrap drops the package it would have picked.
    pub exclude_dependencies: &'a [String],
}

/// [`resolve_debootstrap`] with the suite's adjustments.
pub fn resolve_request(
    packages: &[Package],
    arch: &str,
    request: &Request,
) -> Result<Vec<Package>, DebianError> {
    let include = request.include;
    let u = Universe::new(
        packages
            .iter()
            .filter(|p| p.architecture == arch || p.architecture == "all"),
    );
    let mut sel = Selection {
        selected: BTreeMap::new(),
        provided: HashMap::new(),
        queue: VecDeque::new(),
    };

    let mut names: Vec<&&str> = u.by_name.keys().collect();
    names.sort();
    for name in names {
        let best = u.by_name[*name][0];
        if matches!(best.priority.as_deref(), Some("required" | "important")) {
            sel.select(best);
        }
    }
    for name in request.also_required {
        let best = u
            .by_name
            .get(name.as_str())
            .and_then(|v| v.first())
            .ok_or_else(|| DebianError::Unresolvable {
                package: "the suite's required set".to_owned(),
                relation: format!("also-required: {name}"),
                found: "nothing of that name in the archive".to_owned(),
            })?;
        sel.select(best);
    }
    let excluded = |alts: &[Dep]| {
        alts.first()
            .is_some_and(|d| request.exclude_dependencies.contains(&d.name))
    };
    for req in include {
        let groups = parse_relations(req).map_err(|source| DebianError::MalformedInclude {
            request: req.clone(),
            source,
        })?;
        for alts in &groups {
            if !sel.resolve(&u, alts) {
                return Err(DebianError::Unresolvable {
                    package: "the include list".to_owned(),
                    relation: format!("Include: {}", format_alternatives(alts)),
                    found: u.describe(alts),
                });
            }
        }
    }
    while let Some(p) = sel.queue.pop_front() {
        for (field, groups) in [("Pre-Depends", &p.pre_depends), ("Depends", &p.depends)] {
            for alts in groups {
                if excluded(alts) && !alts.iter().any(|d| sel.satisfied(d)) {
                    continue;
                }
                if !sel.resolve(&u, alts) {
                    return Err(DebianError::Unresolvable {
                        package: format!("{} {}", p.name, p.version),
                        relation: format!("{field}: {}", format_alternatives(alts)),
                        found: u.describe(alts),
                    });
                }
            }
        }
    }
    Ok(sel.selected.into_values().cloned().collect())
}

/// debootstrap's `resolve_deps` within an already resolved set: `start` and, transitively, the
/// first alternative of each `Pre-Depends` and `Depends` relation of what is reached (version
/// and architecture qualifiers dropped, as its `pkgdetails GETDEPS` does), skipping names in
/// `exclude` (its `EXCLUDE_DEPENDENCY`) and keeping only names that are packages of `within` (its
/// `PKGS REAL` keeps real packages, and `within` is closed under the same walk). Returned in
/// byte order, as its `sort` under `LANG=C` leaves them.
pub fn first_alternative_closure<'a>(
    within: impl IntoIterator<Item = &'a Package>,
    start: impl IntoIterator<Item = &'a str>,
    exclude: &[String],
) -> std::collections::BTreeSet<String> {
    let by_name: HashMap<&str, &Package> =
        within.into_iter().map(|p| (p.name.as_str(), p)).collect();
    let mut out = std::collections::BTreeSet::new();
    let mut queue: VecDeque<&str> = start.into_iter().collect();
    while let Some(name) = queue.pop_front() {
        let Some(p) = by_name.get(name) else {
            continue;
        };
        if !out.insert(name.to_owned()) {
            continue;
        }
        for alts in p.pre_depends.iter().chain(&p.depends) {
            if let Some(first) = alts.first() {
                if !exclude.contains(&first.name) && !out.contains(&first.name) {
                    queue.push_back(first.name.as_str());
                }
            }
        }
    }
    out
}

/// debootstrap's walk for the required set over the whole archive (`archive`, this
/// architecture's packages), seeded from `selected`'s `Priority: required` packages as
/// [`required_set`] is: what it reaches outside `selected` shows the selection is not
/// debootstrap's.
pub fn required_set_within<'a>(
    archive: impl IntoIterator<Item = &'a Package>,
    selected: &'a [Package],
    request: &'a Request,
) -> std::collections::BTreeSet<String> {
    let seeds = selected
        .iter()
        .filter(|p| p.priority.as_deref() == Some("required"))
        .map(|p| p.name.as_str())
        .chain(request.also_required.iter().map(String::as_str));
    first_alternative_closure(archive, seeds, request.exclude_dependencies)
}

/// debootstrap's two sets (default variant): its *required* set — every package of `selected`
/// with `Priority: required`, the suite's `also_required`, and their dependencies, extracted
/// before dpkg first runs and configured first — and the rest of `selected`, its *base* set.
/// Returns the required set.
pub fn required_set(selected: &[Package], request: &Request) -> std::collections::BTreeSet<String> {
    required_set_within(selected, selected, request)
}

/// The names of `selected` in an order one `dpkg --install` run can take them: essential
/// packages first, then the rest, each group in name order, except that a package's dependencies
/// within the set (`Pre-Depends` first, then `Depends`; for alternatives the first satisfied
/// within the set) come before it — so an essential package's own dependencies precede it even
/// when they are not essential. Cycles are broken where the depth-first walk meets them, which
/// is deterministic. Dependencies outside the set are ignored.
pub fn install_order(selected: &[Package]) -> Vec<String> {
    let mut by_name: BTreeMap<&str, &Package> = BTreeMap::new();
    for p in selected {
        match by_name.get(p.name.as_str()) {
            Some(q) if compare_versions(&q.version, &p.version) != Ordering::Less => {}
            _ => {
                by_name.insert(p.name.as_str(), p);
            }
        }
    }
    let mut provided: BTreeMap<&str, Vec<&Package>> = BTreeMap::new();
    for p in by_name.values() {
        for n in &p.provides {
            provided.entry(n.as_str()).or_default().push(p);
        }
    }
    let target = |alts: &[Dep]| -> Option<&str> {
        for d in alts {
            if let Some(p) = by_name
                .get(d.name.as_str())
                .filter(|p| real_satisfies(p, d))
            {
                return Some(p.name.as_str());
            }
        }
        for d in alts {
            // Providers are in name order (by_name is a BTreeMap).
            if let Some(p) = provided
                .get(d.name.as_str())
                .and_then(|v| v.iter().find(|p| provide_satisfies(p, d)))
            {
                return Some(p.name.as_str());
            }
        }
        None
    };
    let deps_of = |p: &Package| -> Vec<&str> {
        p.pre_depends
            .iter()
            .chain(p.depends.iter())
            .filter_map(|alts| target(alts))
            .filter(|n| *n != p.name)
            .collect()
    };

    let roots: Vec<&str> = by_name
        .values()
        .filter(|p| p.essential)
        .chain(by_name.values().filter(|p| !p.essential))
        .map(|p| p.name.as_str())
        .collect();
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        New,
        Visiting,
        Done,
    }
    let mut state: HashMap<&str, State> = by_name.keys().map(|n| (*n, State::New)).collect();
    let mut order = Vec::with_capacity(by_name.len());
    for root in roots {
        if state[root] != State::New {
            continue;
        }
        state.insert(root, State::Visiting);
        let mut stack: Vec<(&str, Vec<&str>, usize)> = vec![(root, deps_of(by_name[root]), 0)];
        while let Some((name, deps, i)) = stack.last_mut() {
            if let Some(&d) = deps.get(*i) {
                *i += 1;
                if state[d] == State::New {
                    state.insert(d, State::Visiting);
                    stack.push((d, deps_of(by_name[d]), 0));
                }
            } else {
                let name = *name;
                state.insert(name, State::Done);
                order.push(name.to_owned());
                stack.pop();
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::debian::packages::parse_packages;

    /// A real `Packages` index named by `RBUILD_REAL_PACKAGES` (any compression [`decompress`]
    /// knows), else bullseye's main amd64 one downloaded from the host's mirror, resolved for
    /// amd64 (with neither, a skip, which fails under CI). With
    /// `RBUILD_DEBOOTSTRAP_DEBS` naming a file with the output of `debootstrap --print-debs` for
    /// the same index, the selection must equal it (it does for bullseye main amd64).
    ///
    /// [`decompress`]: crate::debian::packages::decompress
    #[test]
    fn real_packages_index() {
        let Some((name, bytes)) = crate::mirror::real_archive_file(
            "real_packages_index",
            "RBUILD_REAL_PACKAGES",
            "dists/bullseye/main/binary-amd64/Packages.xz",
        ) else {
            return;
        };
        let text =
            String::from_utf8(crate::debian::packages::decompress(&name, &bytes).unwrap()).unwrap();
        let t = std::time::Instant::now();
        let all = parse_packages(&name, &text).unwrap();
        let parse = t.elapsed();
        let t = std::time::Instant::now();
        let sel = resolve_debootstrap(&all, "amd64", &[]).unwrap();
        let order = install_order(&sel);
        let resolve = t.elapsed();
        eprintln!(
            "{} stanzas parsed in {parse:?}; {} packages resolved and ordered in {resolve:?}",
            all.len(),
            sel.len()
        );
        eprintln!("install order: {}", order.join(" "));
        for must in [
            "base-files",
            "bash",
            "coreutils",
            "dpkg",
            "apt",
            "libc6",
            "debconf",
            "passwd",
            "init-system-helpers",
        ] {
            assert!(sel.iter().any(|p| p.name == must), "{must} not selected");
        }
        assert_eq!(order.len(), sel.len());
        let mut names: Vec<&str> = sel.iter().map(|p| p.name.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), sel.len(), "one version per name");
        // Every essential package is installed before every non-essential one that is not a
        // dependency of an essential one; and the pre-dependencies of each come before it.
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        assert!(pos("libc6") < pos("bash") && pos("dpkg") < pos("apt"));
        // Optionally, the ground truth: what `debootstrap --print-debs SUITE DIR MIRROR` printed.
        if let Some(list) = std::env::var_os("RBUILD_DEBOOTSTRAP_DEBS") {
            let want = std::fs::read_to_string(list).unwrap();
            let mut want: Vec<&str> = want.split_whitespace().collect();
            want.sort();
            let mut got = order.clone();
            got.sort();
            assert_eq!(got, want, "differs from debootstrap --print-debs");
        }
    }

    #[test]
    fn version_table() {
        use Ordering::*;
        let table = [
            ("1.0~rc1", "1.0", Less),
            ("1:0.1", "2.0", Greater),
            ("1.0-1", "1.0-1+deb11u1", Less),
            ("1.0", "1.0", Equal),
            ("1.0", "1.0-0", Equal),
            ("0:1.0", "1.0", Equal),
            ("1.0", "1.0.0", Less),
            ("1.0a", "1.0", Greater),
            ("1.0~", "1.0", Less),
            ("1.0~~", "1.0~", Less),
            ("1.0~~a", "1.0~~", Greater),
            ("1.0+b1", "1.0", Greater),
            ("1.0+b1", "1.0.1", Less),
            ("2.30-1", "2.4-1", Greater),
            ("1.10", "1.9", Greater),
            ("1.01", "1.1", Equal),
            ("10:1", "9:99", Greater),
            ("1.0-10", "1.0-9", Greater),
            ("1.0-1~bpo1", "1.0-1", Less),
            ("2.31-13+deb11u11", "2.31-13+deb11u2", Greater),
            ("1:2.3-4-5", "1:2.3-4", Greater),
            ("a", "+", Less),
            ("1.0+dfsg", "1.0~dfsg", Greater),
            ("7.74.0-1.3+deb11u14", "7.74.0-1.3+deb11u7", Greater),
            ("0.1", "0.1-", Equal),
        ];
        for (a, b, want) in table {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
        assert!(satisfies("2.31-13", ">=", "2.14"));
        assert!(!satisfies("2.31-13", "<<", "2.31"));
        assert!(satisfies("1.0", "<", "1.0"));
        assert!(satisfies("1:1.0", ">>", "9.9"));
        assert!(!satisfies("1.0", "!=", "1.0"));
    }

    fn stanza(name: &str, version: &str, extra: &str) -> String {
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\n{extra}Filename: pool/{name}_{version}.deb\nSize: 1\nSHA256: {}\n\n",
            "0".repeat(64)
        )
    }

    fn archive(stanzas: &[String]) -> Vec<Package> {
        parse_packages("Packages", &stanzas.concat()).unwrap()
    }

    fn names(p: &[Package]) -> Vec<&str> {
        p.iter().map(|p| p.name.as_str()).collect()
    }

    /// debootstrap's required set follows only the first alternative of each relation, skips
    /// excluded names and keeps names of real packages; the rest of the selection is its base.
    #[test]
    fn required_set_is_debootstraps_first_alternative_walk() {
        let a = archive(&[
            stanza("a", "1", "Priority: required\nDepends: v | c (>= 2), b\n"),
            stanza("b", "1", "Priority: important\nPre-Depends: d:any (>= 1)\n"),
            stanza("c", "2", "Priority: important\nProvides: v\n"),
            stanza("d", "1", "Priority: optional\n"),
            stanza("e", "1", "Priority: required\nDepends: usrmerge | f\n"),
            stanza("f", "1", "Priority: optional\n"),
            stanza("g", "1", "Priority: optional\n"),
            stanza("h", "1", "Priority: important\nDepends: g\n"),
        ]);
        let none: Vec<String> = vec![];
        let exclude = vec!["usrmerge".to_owned()];
        let also = vec!["h".to_owned()];
        let request = Request {
            also_required: &none,
            exclude_dependencies: &exclude,
            ..Request::default()
        };
        let got: Vec<String> = required_set(&a, &request).into_iter().collect();
        // `v` is virtual (dropped, so `c` stays in base), `d:any (>= 1)` is `d`, `usrmerge` is
        // excluded (so `f` is not reached), and `h` is important.
        assert_eq!(got, ["a", "b", "d", "e"]);
        let request = Request {
            also_required: &also,
            ..request
        };
        let got: Vec<String> = required_set(&a, &request).into_iter().collect();
        assert_eq!(got, ["a", "b", "d", "e", "g", "h"]);
    }

    /// Over the whole archive, debootstrap's walk reaches a first alternative the selection
    /// satisfied with another package: the guard `rbuild lock` runs sees it.
    #[test]
    fn the_walk_over_the_archive_finds_what_the_selection_left_out() {
        let a = archive(&[
            stanza("a", "1", "Priority: required\nDepends: x | b\n"),
            stanza("b", "1", "Priority: required\n"),
            stanza("x", "1", "Priority: optional\n"),
        ]);
        let selected: Vec<Package> = a.iter().filter(|p| p.name != "x").cloned().collect();
        let none: Vec<String> = vec![];
        let request = Request {
            also_required: &none,
            exclude_dependencies: &none,
            ..Request::default()
        };
        let within: Vec<String> = required_set(&selected, &request).into_iter().collect();
        assert_eq!(within, ["a", "b"]);
        let walked: Vec<String> = required_set_within(&a, &selected, &request)
            .into_iter()
            .collect();
        assert_eq!(walked, ["a", "b", "x"]);
    }

    #[test]
    fn closure_of_required_and_important() {
        let a = archive(&[
            stanza("base-files", "11", "Essential: yes\nPriority: required\n"),
            stanza("bash", "5.1-2", "Essential: yes\nPriority: required\nPre-Depends: libc6 (>= 2.25), libtinfo6 (>= 6)\nDepends: base-files (>= 2.1.12), debianutils (>= 2.15)\n"),
            stanza("libc6", "2.31-13", "Priority: optional\nDepends: libgcc-s1\n"),
            stanza("libgcc-s1", "10.2.1-6", "Priority: optional\n"),
            stanza("libtinfo6", "6.2", "Priority: optional\n"),
            stanza("debianutils", "4.11.2", "Priority: required\nEssential: yes\n"),
            stanza("apt", "2.2.4", "Priority: important\nDepends: adduser, libc6\n"),
            stanza("adduser", "3.118", "Priority: important\n"),
            stanza("vim", "8.2", "Priority: optional\nDepends: vim-runtime\n"),
            stanza("vim-runtime", "8.2", "Priority: optional\n"),
            stanza("zsh", "5.8", "Priority: optional\n"),
        ]);
        let r = resolve_debootstrap(&a, "amd64", &[]).unwrap();
        assert_eq!(
            names(&r),
            [
                "adduser",
                "apt",
                "base-files",
                "bash",
                "debianutils",
                "libc6",
                "libgcc-s1",
                "libtinfo6"
            ]
        );
        let r = resolve_debootstrap(&a, "amd64", &["vim".to_owned()]).unwrap();
        assert!(
            names(&r).contains(&"vim")
                && names(&r).contains(&"vim-runtime")
                && !names(&r).contains(&"zsh")
        );
        // Another architecture sees none of these amd64 packages.
        assert!(resolve_debootstrap(&a, "arm64", &[]).unwrap().is_empty());
        let e = resolve_debootstrap(&a, "amd64", &["nonexistent".to_owned()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Include: nonexistent")
                && e.contains("no package or provider named nonexistent"),
            "{e}"
        );
    }

    /// bookworm's debootstrap adds `usr-is-merged` to the required set and never follows
    /// `usrmerge` (which would pull in perl); later suites only exclude it.
    #[test]
    fn suite_adjustments_add_to_the_required_set_and_exclude_dependencies() {
        let a = archive(&[
            stanza(
                "init-system-helpers",
                "1.65",
                "Priority: required\nDepends: usrmerge | usr-is-merged\n",
            ),
            stanza("usrmerge", "35", "Priority: optional\nDepends: perl\n"),
            stanza("perl", "5.36", "Priority: standard\n"),
            stanza("usr-is-merged", "35", "Priority: optional\n"),
            stanza("old-tool", "1", "Priority: important\nDepends: usrmerge\n"),
        ]);
        let plain = resolve_debootstrap(&a, "amd64", &[]).unwrap();
        assert_eq!(
            names(&plain),
            ["init-system-helpers", "old-tool", "perl", "usrmerge"]
        );
        let (also, exclude) = (["usr-is-merged".to_owned()], ["usrmerge".to_owned()]);
        let bookworm = Request {
            also_required: &also,
            exclude_dependencies: &exclude,
            ..Request::default()
        };
        assert_eq!(
            names(&resolve_request(&a, "amd64", &bookworm).unwrap()),
            ["init-system-helpers", "old-tool", "usr-is-merged"]
        );
        let later = Request {
            exclude_dependencies: &exclude,
            ..Request::default()
        };
        assert_eq!(
            names(&resolve_request(&a, "amd64", &later).unwrap()),
            ["init-system-helpers", "old-tool"]
        );
        let missing = ["no-such".to_owned()];
        let e = resolve_request(
            &a,
            "amd64",
            &Request {
                also_required: &missing,
                ..Request::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("also-required: no-such"), "{e}");
    }

    #[test]
    fn alternatives_and_provides() {
        let a = archive(&[
            // First alternative that exists wins.
            stanza("a", "1", "Priority: required\nDepends: missing | b2 | b1\n"),
            stanza("b1", "1", ""),
            stanza("b2", "1", ""),
            // An alternative already selected wins over an earlier one.
            stanza("c", "1", "Priority: required\nDepends: d1 | d2\n"),
            stanza("d1", "1", ""),
            stanza("d2", "1", "Priority: required\n"),
            // Version constraints rule alternatives out.
            stanza("e", "1", "Priority: required\nDepends: f1 (>= 2) | f2\n"),
            stanza("f1", "1", ""),
            stanza("f2", "1", ""),
            // A virtual package: lowest-named provider.
            stanza(
                "g",
                "1",
                "Priority: important\nDepends: mail-transport-agent\n",
            ),
            stanza("postfix", "3", "Provides: mail-transport-agent\n"),
            stanza("exim4", "4", "Provides: mail-transport-agent\n"),
            // Versioned dependency on a virtual: only a versioned Provides counts.
            stanza("h", "1", "Priority: important\nDepends: libvirt0 (>= 2)\n"),
            stanza("libvirt-old", "1", "Provides: libvirt0\n"),
            stanza("libvirt-new", "1", "Provides: libvirt0 (= 2.5)\n"),
            // Several versions: the highest.
            stanza("i", "1.0", "Priority: important\n"),
            stanza("i", "1.0+deb11u1", "Priority: important\n"),
            stanza("i", "1.0~rc1", "Priority: important\n"),
        ]);
        let r = resolve_debootstrap(&a, "amd64", &[]).unwrap();
        assert_eq!(
            names(&r),
            [
                "a",
                "b2",
                "c",
                "d2",
                "e",
                "exim4",
                "f2",
                "g",
                "h",
                "i",
                "libvirt-new"
            ]
        );
        assert_eq!(
            r.iter().find(|p| p.name == "i").unwrap().version,
            "1.0+deb11u1"
        );
    }

    #[test]
    fn missing_dependency_names_package_and_relation() {
        let a = archive(&[
            stanza("a", "1", "Priority: required\nDepends: b (>= 2) | c\n"),
            stanza("b", "1", ""),
        ]);
        let e = resolve_debootstrap(&a, "amd64", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "unresolvable dependency: a 1 Depends: b (>= 2) | c: expected a package (or a provider) satisfying one of the alternatives, got b version 1; no package or provider named c"
        );
    }

    #[test]
    fn arch_all_packages_are_used() {
        let mut s = stanza("tzdata", "2024a", "Priority: required\n");
        s = s.replace("Architecture: amd64", "Architecture: all");
        let a = archive(&[s, stanza("x", "1", "Priority: required\nDepends: tzdata\n")]);
        assert_eq!(
            names(&resolve_debootstrap(&a, "amd64", &[]).unwrap()),
            ["tzdata", "x"]
        );
    }

    #[test]
    fn install_order_puts_dependencies_first() {
        let a = archive(&[
            stanza(
                "base-files",
                "11",
                "Essential: yes\nPriority: required\nPre-Depends: awk\n",
            ),
            stanza(
                "mawk",
                "1.3",
                "Priority: required\nProvides: awk\nPre-Depends: libc6\n",
            ),
            stanza(
                "bash",
                "5.1",
                "Essential: yes\nPriority: required\nPre-Depends: libc6\nDepends: base-files\n",
            ),
            stanza("libc6", "2.31", "Priority: optional\nDepends: libgcc-s1\n"),
            stanza("libgcc-s1", "10", "Priority: optional\nDepends: libc6\n"),
            stanza(
                "apt",
                "2.2",
                "Priority: important\nDepends: libc6, adduser\n",
            ),
            stanza("adduser", "3", "Priority: important\nDepends: passwd\n"),
            stanza("passwd", "1", "Priority: required\nDepends: adduser\n"),
            stanza("dash", "0.5", "Essential: yes\nPriority: required\n"),
        ]);
        let sel = resolve_debootstrap(&a, "amd64", &[]).unwrap();
        let order = install_order(&sel);
        assert_eq!(
            order,
            [
                "libgcc-s1",
                "libc6",
                "mawk",
                "base-files",
                "bash",
                "dash",
                "passwd",
                "adduser",
                "apt"
            ]
        );
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        assert!(
            pos("libc6") < pos("bash")
                && pos("mawk") < pos("base-files")
                && pos("base-files") < pos("bash")
        );
        // Deterministic whatever the input order.
        let mut rev = sel.clone();
        rev.reverse();
        assert_eq!(install_order(&rev), order);
        assert_eq!(install_order(&[]), Vec::<String>::new());
    }
}
