//! Which Debian mirrors to use, in order: the `--mirror`s, else `RBUILD_MIRROR` (several URLs
//! separated by spaces), else config.toml's `mirrors`, else the host's apt configuration (deb822
//! `.sources` files and one-line `sources.list`). A fetch tries them in order, so later ones are
//! fallbacks (a snapshot archive for the files a point release removed). The mirrors only decide
//! where bytes come from; the lock decides which bytes, so they never enter a derivation hash.

use std::path::Path;

/// The first `deb` source of the host's apt configuration that serves the main archive (not
/// a `-security` or `-updates` suite), searched under `apt_dir` (normally `/etc/apt`).
pub fn from_apt_config(apt_dir: &Path) -> Option<String> {
    let mut candidates: Vec<(String, Vec<String>)> = Vec::new();
    if let Ok(text) = std::fs::read_to_string(apt_dir.join("sources.list")) {
        candidates.extend(one_line_sources(&text));
    }
    let mut files: Vec<_> = std::fs::read_dir(apt_dir.join("sources.list.d"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => candidates.extend(deb822_sources(&text)),
            Some("list") => candidates.extend(one_line_sources(&text)),
            _ => {}
        }
    }
    candidates
        .into_iter()
        .find(|(_, suites)| {
            suites
                .iter()
                .any(|s| !s.contains("-security") && !s.contains("/updates"))
        })
        .map(|(uri, _)| uri.trim_end_matches('/').to_owned())
}

fn deb822_sources(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(doc) = text.parse::<deb822_fast::Deb822>() else {
        return out;
    };
    for para in doc.iter() {
        let get = |k: &str| {
            para.get(k)
                .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        if !get("Types").iter().any(|t| t == "deb") || get("Enabled").iter().any(|e| e == "no") {
            continue;
        }
        let suites = get("Suites");
        for uri in get("URIs") {
            out.push((uri, suites.clone()));
        }
    }
    out
}

fn one_line_sources(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace().peekable();
        if words.next() != Some("deb") {
            continue;
        }
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push((uri.to_owned(), vec![suite.to_owned()]));
        }
    }
    out
}

/// The mirrors to use, in order: those `given` (the `--mirror`s; each value may hold several
/// URLs separated by spaces, as `RBUILD_MIRROR` does), else `RBUILD_MIRROR`'s, else `config`'s
/// (config.toml's `mirrors`), else the host's apt configuration. The first of these that names
/// any mirror is the whole list: an explicit `--mirror` is never mixed with the config file's.
/// Trailing slashes are dropped, and a mirror named twice is kept once (its first place).
pub fn choose_all(given: &[String], config: &[String]) -> Vec<String> {
    let env = std::env::var("RBUILD_MIRROR").unwrap_or_default();
    pick(given, &env, config, || {
        from_apt_config(Path::new("/etc/apt"))
    })
}

/// [`choose_all`] with `RBUILD_MIRROR`'s value and the apt configuration's mirror given.
fn pick(
    given: &[String],
    env: &str,
    config: &[String],
    apt: impl FnOnce() -> Option<String>,
) -> Vec<String> {
    [
        split(given.iter().map(String::as_str)),
        split([env]),
        split(config.iter().map(String::as_str)),
    ]
    .into_iter()
    .find(|l| !l.is_empty())
    .or_else(|| apt().map(|m| vec![m.trim_end_matches('/').to_owned()]))
    .unwrap_or_default()
}

/// The URLs in `values`, each split on whitespace, without trailing slashes or repeats.
fn split<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for url in values.into_iter().flat_map(str::split_whitespace) {
        let url = url.trim_end_matches('/').to_owned();
        if !url.is_empty() && !out.contains(&url) {
            out.push(url);
        }
    }
    out
}

/// The first mirror of [`choose_all`] with no config file: `flag`, else `RBUILD_MIRROR`'s
/// first, else the host's apt configuration's.
pub fn choose(flag: Option<&str>) -> Option<String> {
    let given: Vec<String> = flag.into_iter().map(str::to_owned).collect();
    choose_all(&given, &[]).into_iter().next()
}

/// For tests that need real Debian data: the file named by the environment variable `var`
/// (a path), else `rel` downloaded from the host's mirror ([`choose`]). Without either, `test` is
/// skipped the shared way (a failure under CI) and this is `None`.
#[cfg(test)]
pub(crate) fn real_archive_file(test: &str, var: &str, rel: &str) -> Option<(String, Vec<u8>)> {
    if let Some(path) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{var}={}: {e}", path.to_string_lossy()));
        return Some((path.to_string_lossy().into_owned(), bytes));
    }
    let Some(mirror) = choose(None) else {
        crate::skip::skip(
            test,
            &format!(
                "no Debian mirror: RBUILD_MIRROR is unset and the host's apt configuration names \
                 none, and {var} is unset"
            ),
            &format!("set RBUILD_MIRROR to a Debian mirror's URL, or {var} to a copy of {rel}"),
        );
        return None;
    };
    let fetcher = rbuild_engine::builtins::fetch::Fetcher::new(vec![mirror]);
    let bytes = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(fetcher.get_bytes(rel))
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    Some((rel.to_owned(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_and_one_line_sources_skip_security() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sources.list.d")).unwrap();
        std::fs::write(
            d.path().join("sources.list.d/a.sources"),
            "Types: deb\nURIs: http://127.0.0.1:9/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb deb-src\nURIs: http://127.0.0.1:9/debian\nSuites: bookworm bookworm-updates\nComponents: main\n",
        )
        .unwrap();
        assert_eq!(
            from_apt_config(d.path()).as_deref(),
            Some("http://127.0.0.1:9/debian")
        );
        let e = tempfile::tempdir().unwrap();
        std::fs::write(
            e.path().join("sources.list"),
            "# c\ndeb [arch=amd64 signed-by=/x] file:///srv/mirror/ bullseye main\n",
        )
        .unwrap();
        assert_eq!(
            from_apt_config(e.path()).as_deref(),
            Some("file:///srv/mirror")
        );
        let f = tempfile::tempdir().unwrap();
        assert_eq!(from_apt_config(f.path()), None);
    }

    /// The first source that names any mirror is the whole list, in its order: the flags, then
    /// `RBUILD_MIRROR`, then config.toml, then apt. Values split on whitespace; trailing slashes
    /// and repeats dropped.
    #[test]
    fn the_first_source_naming_mirrors_gives_the_list() {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let apt = || Some("file:///apt/".to_owned());
        assert_eq!(
            split(["file:///a/ http://127.0.0.1:9/b", "file:///c", "file:///a"]),
            v(&["file:///a", "http://127.0.0.1:9/b", "file:///c"])
        );
        assert_eq!(split(["  ", ""]), Vec::<String>::new());
        let (flags, config) = (v(&["file:///f1", "file:///f2"]), v(&["file:///c1/"]));
        assert_eq!(
            pick(&flags, "file:///e", &config, apt),
            v(&["file:///f1", "file:///f2"])
        );
        assert_eq!(
            pick(&[], " file:///e1  file:///e2 ", &config, apt),
            v(&["file:///e1", "file:///e2"])
        );
        assert_eq!(
            pick(&[], "", &v(&["file:///c1/", "file:///c2"]), apt),
            v(&["file:///c1", "file:///c2"])
        );
        assert_eq!(pick(&[], " ", &[], apt), v(&["file:///apt"]));
        assert_eq!(pick(&[], "", &[], || None), Vec::<String>::new());
    }
}
