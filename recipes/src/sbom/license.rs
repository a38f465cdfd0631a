//! Licences from Debian's machine-readable copyright files (DEP-5,
//! `copyright-format/1.0`) as SPDX licence expressions: Debian's short names mapped to SPDX
//! identifiers where the mapping is exact, `LicenseRef-…` for the rest, combined over the
//! `Files` stanzas.

use std::collections::BTreeMap;

/// Debian short name (compared case-insensitively) → SPDX identifier, where they name the same
/// licence text. Anything else becomes a `LicenseRef-`.
const EXACT: &[(&str, &str)] = &[
    ("AGPL-3", "AGPL-3.0-only"),
    ("AGPL-3+", "AGPL-3.0-or-later"),
    ("Apache-2.0", "Apache-2.0"),
    ("Artistic", "Artistic-1.0-Perl"),
    ("Artistic-2.0", "Artistic-2.0"),
    ("BSD-2-clause", "BSD-2-Clause"),
    ("BSD-3-clause", "BSD-3-Clause"),
    ("BSD-4-clause", "BSD-4-Clause"),
    ("BSL-1.0", "BSL-1.0"),
    ("CC0-1.0", "CC0-1.0"),
    ("CC-BY-3.0", "CC-BY-3.0"),
    ("CC-BY-4.0", "CC-BY-4.0"),
    ("CC-BY-SA-3.0", "CC-BY-SA-3.0"),
    ("CC-BY-SA-4.0", "CC-BY-SA-4.0"),
    ("curl", "curl"),
    ("Expat", "MIT"),
    ("GFDL-1.2", "GFDL-1.2-only"),
    ("GFDL-1.2+", "GFDL-1.2-or-later"),
    ("GFDL-1.3", "GFDL-1.3-only"),
    ("GFDL-1.3+", "GFDL-1.3-or-later"),
    ("GPL-1", "GPL-1.0-only"),
    ("GPL-1+", "GPL-1.0-or-later"),
    ("GPL-2", "GPL-2.0-only"),
    ("GPL-2+", "GPL-2.0-or-later"),
    ("GPL-3", "GPL-3.0-only"),
    ("GPL-3+", "GPL-3.0-or-later"),
    ("ISC", "ISC"),
    ("LGPL-2", "LGPL-2.0-only"),
    ("LGPL-2+", "LGPL-2.0-or-later"),
    ("LGPL-2.1", "LGPL-2.1-only"),
    ("LGPL-2.1+", "LGPL-2.1-or-later"),
    ("LGPL-3", "LGPL-3.0-only"),
    ("LGPL-3+", "LGPL-3.0-or-later"),
    ("MIT", "MIT"),
    ("MPL-1.1", "MPL-1.1"),
    ("MPL-2.0", "MPL-2.0"),
    ("OpenSSL", "OpenSSL"),
    ("Unicode-DFS-2016", "Unicode-DFS-2016"),
    ("Zlib", "Zlib"),
];

/// A copyright file's licence, as an SPDX expression, and the texts of the `LicenseRef-`s it
/// uses (from its stand-alone `License` stanzas, where it has one of that name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub expression: String,
    pub refs: BTreeMap<String, String>,
}

/// The licence a copyright file declares; `None` when it is not machine-readable (no `Format`
/// field in its first stanza), cannot be read as deb822, or names no licence in a `Files`
/// stanza.
pub fn declared(copyright: &str) -> Option<Declared> {
    let paragraphs = deb822_fast::borrowed::parse_borrowed(copyright).ok()?;
    let header = paragraphs.first()?;
    header.get("Format")?;
    // Stand-alone licence stanzas: short name → text.
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    for p in &paragraphs[1..] {
        if p.get("Files").is_none() {
            if let Some(lines) = p.get("License") {
                if let Some((name, body)) = lines.split_first() {
                    texts
                        .entry(name.trim().to_lowercase())
                        .or_insert_with(|| text_of(body));
                }
            }
        }
    }
    let mut parts: Vec<String> = Vec::new();
    let mut refs = BTreeMap::new();
    for p in &paragraphs[1..] {
        if p.get("Files").is_none() {
            continue;
        }
        let Some(lines) = p.get("License") else {
            continue;
        };
        let Some((first, body)) = lines.split_first() else {
            continue;
        };
        let first = first.trim();
        if first.is_empty() {
            continue;
        }
        let expr = expression(first, &mut |short| {
            let id = license_ref(short);
            let text = texts
                .get(&short.to_lowercase())
                .cloned()
                .filter(|t| !t.is_empty())
                .or_else(|| Some(text_of(body)).filter(|t| !t.is_empty()))
                .unwrap_or_else(|| format!("{short}: see the package's copyright file"));
            refs.entry(id.clone()).or_insert(text);
            id
        });
        if !expr.is_empty() && !parts.contains(&expr) {
            parts.push(expr);
        }
    }
    if parts.is_empty() {
        return None;
    }
    let expression = if parts.len() == 1 {
        parts.remove(0)
    } else {
        parts
            .iter()
            .map(|p| {
                if p.contains(' ') {
                    format!("({p})")
                } else {
                    p.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    Some(Declared { expression, refs })
}

/// A licence text's continuation lines: `.` is an empty line.
fn text_of(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|l| if l.trim() == "." { "" } else { l.trim_end() })
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

/// A `License` line (`GPL-2+ or Artistic`, `A and B, or C`, `GPL-2+ with OpenSSL exception`)
/// as an SPDX expression; `unknown` names the `LicenseRef-` of a short name with no exact
/// SPDX identifier (and records its text).
fn expression(line: &str, unknown: &mut dyn FnMut(&str) -> String) -> String {
    // A comma separates groups joined by the `and`/`or` that follows it (lowest precedence).
    let mut out = String::new();
    for g in line.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        let (op, rest) = match g.split_once(char::is_whitespace) {
            Some((op, rest)) if op.eq_ignore_ascii_case("and") => ("AND", rest),
            Some((op, rest)) if op.eq_ignore_ascii_case("or") => ("OR", rest),
            _ if g.eq_ignore_ascii_case("and") || g.eq_ignore_ascii_case("or") => continue,
            _ => ("AND", g),
        };
        let part = group(rest.trim(), unknown);
        if part.is_empty() {
            continue;
        }
        out = if out.is_empty() {
            part
        } else {
            format!("({out}) {op} ({part})")
        };
    }
    out
}

/// One comma-free group: short names joined by `and` / `or`; a `with …` clause makes its
/// licence one `LicenseRef-` (Debian's exceptions have no exact SPDX counterpart).
fn group(text: &str, unknown: &mut dyn FnMut(&str) -> String) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut flush = |current: &mut Vec<&str>, out: &mut Vec<String>| {
        if current.is_empty() {
            return;
        }
        let short = current.join(" ");
        out.push(
            identifier(&short)
                .map(str::to_owned)
                .unwrap_or_else(|| unknown(&short)),
        );
        current.clear();
    };
    for word in text.split_whitespace() {
        let lower = word.to_ascii_lowercase();
        let operator = lower == "and" || lower == "or";
        // Inside `X with Y exception`, `and`/`or` belong to the exception's name until it ends.
        let in_with = current.iter().any(|w| w.eq_ignore_ascii_case("with"))
            && !current
                .last()
                .is_some_and(|w| w.eq_ignore_ascii_case("exception"));
        if operator && !in_with {
            flush(&mut current, &mut out);
            out.push(lower.to_ascii_uppercase());
        } else {
            current.push(word);
        }
    }
    flush(&mut current, &mut out);
    // A dangling operator (a malformed line) is dropped rather than emitted.
    while out.last().is_some_and(|w| w == "AND" || w == "OR") {
        out.pop();
    }
    out.join(" ")
}

/// The SPDX identifier Debian's short name `short` maps to exactly.
pub fn identifier(short: &str) -> Option<&'static str> {
    EXACT
        .iter()
        .find(|(d, _)| d.eq_ignore_ascii_case(short))
        .map(|(_, s)| *s)
}

/// `LicenseRef-` + the short name with `+` spelt `-plus` and anything else outside
/// `[A-Za-z0-9.-]` as `-`.
pub fn license_ref(short: &str) -> String {
    let mut id = String::from("LicenseRef-");
    for c in short.chars() {
        match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '-' => id.push(c),
            '+' => id.push_str("-plus"),
            _ => id.push('-'),
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expr(line: &str) -> String {
        expression(line, &mut |s| license_ref(s))
    }

    #[test]
    fn short_names_map_exactly_or_become_references() {
        assert_eq!(expr("GPL-2+"), "GPL-2.0-or-later");
        // Malformed lines give no dangling operators or empty groups.
        assert_eq!(expr("GPL-2, and"), "GPL-2.0-only");
        assert_eq!(expr("and"), "");
        assert_eq!(
            expr("GPL-2+ or Artistic"),
            "GPL-2.0-or-later OR Artistic-1.0-Perl"
        );
        assert_eq!(expr("bsd-3-clause and Expat"), "BSD-3-Clause AND MIT");
        assert_eq!(expr("public-domain"), "LicenseRef-public-domain");
        assert_eq!(
            expr("GPL-2+ with OpenSSL exception"),
            "LicenseRef-GPL-2-plus-with-OpenSSL-exception"
        );
        assert_eq!(
            expr("GPL-2+ or LGPL-2.1+, and BSD-3-clause"),
            "(GPL-2.0-or-later OR LGPL-2.1-or-later) AND (BSD-3-Clause)"
        );
    }

    #[test]
    fn a_dep5_file_combines_its_files_stanzas() {
        let text = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: x\n\nFiles: *\nCopyright: 2020 A\nLicense: GPL-2+\n\nFiles: lib/*\nCopyright: 2020 B\nLicense: Custom\n\nFiles: doc/*\nCopyright: 2020 C\nLicense: GPL-2+\n\nLicense: Custom\n Permission is granted.\n .\n No warranty.\n";
        let d = declared(text).unwrap();
        assert_eq!(d.expression, "GPL-2.0-or-later AND LicenseRef-Custom");
        assert_eq!(
            d.refs["LicenseRef-Custom"],
            "Permission is granted.\n\nNo warranty."
        );
        assert_eq!(declared("This package was debianized by someone.\n"), None);
        assert_eq!(declared("Format: x\n\nFiles: *\nCopyright: A\n"), None);
    }
}
