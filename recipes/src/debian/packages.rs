//! `Packages` indices: decompression, parsing of stanzas and of relation fields (Debian policy
//! §7.1), and the compact *verified index* — one line `name version architecture sha256 size
//! filename` per package — that the verify step writes and the unpack steps read.

use std::io::Read;

use serde::{Deserialize, Serialize};

use super::DebianError;

/// One alternative of a relation: `name[:arch] [(op version)]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Dep {
    /// The package (or virtual package) name.
    pub name: String,
    /// The architecture qualifier (`any`, `native`, or an architecture), if any.
    pub arch: Option<String>,
    /// The version constraint: operator (`<<`, `<=`, `=`, `>=`, `>>`; the obsolete `<` and `>`
    /// are read as `<=` and `>=`) and version.
    pub version: Option<(String, String)>,
}

impl std::fmt::Display for Dep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if let Some(a) = &self.arch {
            write!(f, ":{a}")?;
        }
        if let Some((op, v)) = &self.version {
            write!(f, " ({op} {v})")?;
        }
        Ok(())
    }
}

/// Render a relation group (alternatives) as Debian writes it: `a (>= 1) | b`.
pub fn format_alternatives(alts: &[Dep]) -> String {
    alts.iter()
        .map(Dep::to_string)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// One binary package stanza of a `Packages` index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// `Package`.
    pub name: String,
    /// `Version`.
    pub version: String,
    /// `Architecture` (`all` or a Debian architecture).
    pub architecture: String,
    /// `Priority` (`required`, `important`, `standard`, `optional`, `extra`).
    pub priority: Option<String>,
    /// `Essential: yes`.
    pub essential: bool,
    /// `Depends`: a conjunction of disjunctions.
    pub depends: Vec<Vec<Dep>>,
    /// `Pre-Depends`.
    pub pre_depends: Vec<Vec<Dep>>,
    /// `Provides`: the names of the virtual packages provided.
    pub provides: Vec<String>,
    /// The versioned entries of `Provides` (`name (= version)`): name → provided version.
    pub provides_versioned: Vec<(String, String)>,
    /// `Filename`: path of the `.deb` relative to the archive root.
    pub filename: String,
    /// `Size` of the `.deb` in bytes.
    pub size: u64,
    /// `SHA256` of the `.deb`, lowercase hex.
    pub sha256: String,
    /// `Multi-Arch` (`same`, `foreign`, `allowed`, `no`).
    pub multi_arch: Option<String>,
}

/// Decompress `bytes` according to `file`'s extension: `.xz`, `.gz`, or none (returned as is).
/// Other compressions (`.bz2`, `.lzma`, `.zst`, `.lz4`) are refused.
pub fn decompress(file: &str, bytes: &[u8]) -> Result<Vec<u8>, DebianError> {
    let base = file.rsplit('/').next().unwrap_or(file);
    let ext = base.rsplit_once('.').map(|(_, e)| e);
    let fail = |format: &str, reason: String| DebianError::Decompress {
        file: file.to_owned(),
        format: format.to_owned(),
        reason,
    };
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(6).min(1 << 28));
    match ext {
        Some("xz") => {
            decode_xz(bytes, &mut out).map_err(|e| fail("xz", e.to_string()))?;
        }
        Some("gz") => {
            flate2::read::MultiGzDecoder::new(bytes)
                .read_to_end(&mut out)
                .map_err(|e| fail("gzip", e.to_string()))?;
        }
        Some(e @ ("bz2" | "lzma" | "zst" | "zstd" | "lz4" | "lz")) => {
            return Err(fail(
                e,
                "unsupported compression: expected .xz, .gz or an uncompressed file".to_owned(),
            ));
        }
        _ => return Ok(bytes.to_vec()),
    }
    Ok(out)
}

/// How much memory the decoding of one index may take to use more than one core: two threads
/// of Debian's 24 MiB blocks take about 50 MiB. Past it, liblzma decodes on one thread.
const XZ_THREADS_MEMORY: u64 = 128 << 20;

/// Every stream of the .xz file `rest` (the format lets streams follow each other, with NUL
/// padding between them), appended to `out`; the blocks of each stream decoded on every core.
/// The archive writes its indexes in blocks of 24 MiB: bullseye's Packages, 45 MB in two
/// blocks, decodes in 0.23 s on two cores instead of 0.36 s.
fn decode_xz(mut rest: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    loop {
        let stream = liblzma::stream::MtStreamBuilder::new()
            .threads(u32::try_from(threads).unwrap_or(u32::MAX))
            .memlimit_threading(XZ_THREADS_MEMORY)
            .memlimit_stop(u64::MAX)
            .decoder()?;
        // Reads `rest` forward to the end of the stream, and no further.
        liblzma::bufread::XzDecoder::new_stream(&mut rest, stream).read_to_end(out)?;
        // Stream padding is NULs, a multiple of four of them (the .xz format, section 2.2).
        let padding = rest.iter().take_while(|b| **b == 0).count();
        if padding % 4 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{padding} NUL bytes after an xz stream: stream padding comes in fours"),
            ));
        }
        rest = &rest[padding..];
        if rest.is_empty() {
            return Ok(());
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_')
}

/// What a malformed relation lacks: the message completes "expected …", naming what was
/// expected, what came instead and the relation (or group) it is in.
#[derive(Debug, thiserror::Error)]
pub enum RelationError {
    #[error("an empty alternative in {group:?}")]
    EmptyAlternative { group: String },
    #[error("a package name, got {name:?} in {relation:?}")]
    Name { name: String, relation: String },
    #[error("an architecture qualifier, got {arch:?} in {relation:?}")]
    Arch { arch: String, relation: String },
    #[error("a closing '{close}' in {relation:?}")]
    Unclosed { close: char, relation: String },
    #[error("a version operator (<<, <=, =, >=, >>), got {op:?} in {relation:?}")]
    Operator { op: String, relation: String },
    #[error("a version after {op}, got {version:?} in {relation:?}")]
    Version {
        op: String,
        version: String,
        relation: String,
    },
    #[error("end of relation, an [arch list] or a <build profile>, got {rest:?} in {relation:?}")]
    Trailing { rest: String, relation: String },
}

/// Parse a relation field (`Depends`, `Pre-Depends`, `Provides`, …) per Debian policy §7.1:
/// comma-separated groups of `|`-separated alternatives, each `name[:arch] [(op version)]`.
/// Architecture restrictions (`[amd64 !i386]`) and build profiles (`<!nocheck>`) are accepted
/// and dropped. The error says what is wrong, for the caller to place.
pub fn parse_relations(field: &str) -> Result<Vec<Vec<Dep>>, RelationError> {
    let mut out = Vec::new();
    for group in field.split(',') {
        let group = group.trim();
        if group.is_empty() {
            continue;
        }
        let mut alts = Vec::with_capacity(1);
        for alt in group.split('|') {
            let alt = alt.trim();
            if alt.is_empty() {
                return Err(RelationError::EmptyAlternative {
                    group: group.to_owned(),
                });
            }
            alts.push(parse_dep(alt)?);
        }
        out.push(alts);
    }
    Ok(out)
}

fn parse_dep(s: &str) -> Result<Dep, RelationError> {
    let end = s
        .find(|c: char| c.is_whitespace() || matches!(c, '(' | '[' | '<'))
        .unwrap_or(s.len());
    let token = &s[..end];
    let (name, arch) = match token.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (token, None),
    };
    if name.is_empty() || !name.chars().all(is_name_char) {
        return Err(RelationError::Name {
            name: name.to_owned(),
            relation: s.to_owned(),
        });
    }
    if let Some(a) = arch {
        if a.is_empty() || !a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(RelationError::Arch {
                arch: a.to_owned(),
                relation: s.to_owned(),
            });
        }
    }
    let mut rest = s[end..].trim_start();
    let mut version = None;
    if let Some(r) = rest.strip_prefix('(') {
        let close = r.find(')').ok_or_else(|| RelationError::Unclosed {
            close: ')',
            relation: s.to_owned(),
        })?;
        let inner = r[..close].trim();
        let op_len = inner
            .bytes()
            .take_while(|b| matches!(b, b'<' | b'>' | b'='))
            .count();
        let (op, ver) = inner.split_at(op_len);
        let op = match op {
            "<<" | "<=" | "=" | ">=" | ">>" => op,
            "<" => "<=",
            ">" => ">=",
            _ => {
                return Err(RelationError::Operator {
                    op: op.to_owned(),
                    relation: s.to_owned(),
                })
            }
        };
        let ver = ver.trim();
        if ver.is_empty() || ver.contains(char::is_whitespace) {
            return Err(RelationError::Version {
                op: op.to_owned(),
                version: ver.to_owned(),
                relation: s.to_owned(),
            });
        }
        version = Some((op.to_owned(), ver.to_owned()));
        rest = r[close + 1..].trim_start();
    }
    while let Some(first) = rest.chars().next() {
        let close = match first {
            '[' => ']',
            '<' => '>',
            _ => {
                return Err(RelationError::Trailing {
                    rest: rest.to_owned(),
                    relation: s.to_owned(),
                })
            }
        };
        let c = rest.find(close).ok_or_else(|| RelationError::Unclosed {
            close,
            relation: s.to_owned(),
        })?;
        rest = rest[c + 1..].trim_start();
    }
    Ok(Dep {
        name: name.to_owned(),
        arch: arch.map(str::to_owned),
        version,
    })
}

/// 1-based line number of byte offset `off` in `text`.
fn line_of(text: &str, off: usize) -> usize {
    text.as_bytes()[..off.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The value of field `name` (case-insensitive) in the first stanza of `text`, its lines
/// (continuation lines without their indentation) joined by newlines; None if it has no such
/// field or does not parse as deb822.
pub fn field(text: &str, name: &str) -> Option<String> {
    let para = deb822_fast::borrowed::parse_borrowed(text).ok()?;
    Some(para.first()?.get(name)?.join("\n").trim().to_owned())
}

/// Parse a (decompressed) `Packages` index. `file` names it in errors. A stanza without
/// `Package`, `Version`, `Architecture`, `Filename`, `Size` or `SHA256`, or with a malformed
/// value or relation, is an error naming the stanza (number, line and package).
pub fn parse_packages(file: &str, text: &str) -> Result<Vec<Package>, DebianError> {
    let mut out = Vec::with_capacity(text.len() / 800 + 1);
    let base = text.as_ptr() as usize;
    for (i, para) in deb822_fast::borrowed::iter_paragraphs_borrowed(text).enumerate() {
        let para = para.map_err(|e| DebianError::Invalid {
            file: file.to_owned(),
            check: format!("deb822 syntax after stanza {i}"),
            expected: "`Field: value` lines and indented continuation lines".to_owned(),
            actual: e.to_string(),
        })?;
        let mut name = None;
        let mut version = None;
        let mut architecture = None;
        let mut priority = None;
        let mut essential = None;
        let mut depends = None;
        let mut pre_depends = None;
        let mut provides = None;
        let mut filename = None;
        let mut size = None;
        let mut sha256 = None;
        let mut multi_arch = None;
        let mut first_off = None;
        for f in para.iter() {
            let n = f.name();
            first_off.get_or_insert(n.as_ptr() as usize - base);
            let slot = match n.len() {
                4 if n.eq_ignore_ascii_case("Size") => &mut size,
                6 if n.eq_ignore_ascii_case("SHA256") => &mut sha256,
                7 if n.eq_ignore_ascii_case("Package") => &mut name,
                7 if n.eq_ignore_ascii_case("Version") => &mut version,
                7 if n.eq_ignore_ascii_case("Depends") => &mut depends,
                8 if n.eq_ignore_ascii_case("Priority") => &mut priority,
                8 if n.eq_ignore_ascii_case("Provides") => &mut provides,
                8 if n.eq_ignore_ascii_case("Filename") => &mut filename,
                9 if n.eq_ignore_ascii_case("Essential") => &mut essential,
                10 if n.eq_ignore_ascii_case("Multi-Arch") => &mut multi_arch,
                11 if n.eq_ignore_ascii_case("Pre-Depends") => &mut pre_depends,
                12 if n.eq_ignore_ascii_case("Architecture") => &mut architecture,
                _ => continue,
            };
            *slot = Some(f);
        }
        let name_value = name.and_then(|f| f.as_single_line()).map(str::trim);
        let where_ = || {
            let line = line_of(text, first_off.unwrap_or(0));
            match name_value {
                Some(n) => format!("stanza {} at line {line} (Package {n})", i + 1),
                None => format!("stanza {} at line {line}", i + 1),
            }
        };
        let bad = |field: &str, expected: &str, actual: String| DebianError::Invalid {
            file: file.to_owned(),
            check: format!("{}, field {field}", where_()),
            expected: expected.to_owned(),
            actual,
        };
        // A required single-line field with no whitespace in it.
        let word = |f: Option<&deb822_fast::borrowed::BorrowedField<'_>>,
                    field: &str|
         -> Result<String, DebianError> {
            let Some(f) = f else {
                return Err(bad(
                    field,
                    "the field to be present",
                    "no such field".to_owned(),
                ));
            };
            let Some(v) = f.as_single_line().map(str::trim) else {
                return Err(bad(
                    field,
                    "a single-line value",
                    format!("{} lines", f.lines().len()),
                ));
            };
            if v.is_empty() || v.contains(char::is_whitespace) {
                return Err(bad(
                    field,
                    "a non-empty value without whitespace",
                    format!("{v:?}"),
                ));
            }
            Ok(v.to_owned())
        };
        let optional = |f: Option<&deb822_fast::borrowed::BorrowedField<'_>>| {
            f.and_then(|f| f.as_single_line())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let relations = |f: Option<&deb822_fast::borrowed::BorrowedField<'_>>,
                         field: &str|
         -> Result<Vec<Vec<Dep>>, DebianError> {
            let Some(f) = f else { return Ok(Vec::new()) };
            let parsed = match f.as_single_line() {
                Some(v) => parse_relations(v),
                None => parse_relations(&f.lines().join(" ")),
            };
            parsed.map_err(|source| DebianError::Relation {
                file: file.to_owned(),
                check: format!("{}, field {field}", where_()),
                source,
            })
        };

        let name = word(name, "Package")?;
        let version = word(version, "Version")?;
        let architecture = word(architecture, "Architecture")?;
        let filename = word(filename, "Filename")?;
        let size_s = word(size, "Size")?;
        let size: u64 = size_s
            .parse()
            .map_err(|_| bad("Size", "a decimal number of bytes", format!("{size_s:?}")))?;
        let mut sha = word(sha256, "SHA256")?;
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("SHA256", "64 hex digits", format!("{sha:?}")));
        }
        sha.make_ascii_lowercase();
        let mut provides_names = Vec::new();
        let mut provides_versioned = Vec::new();
        for alts in relations(provides, "Provides")? {
            for d in alts {
                if let Some((op, v)) = &d.version {
                    if op == "=" {
                        provides_versioned.push((d.name.clone(), v.clone()));
                    }
                }
                provides_names.push(d.name);
            }
        }
        out.push(Package {
            priority: optional(priority),
            essential: optional(essential).is_some_and(|v| v.eq_ignore_ascii_case("yes")),
            depends: relations(depends, "Depends")?,
            pre_depends: relations(pre_depends, "Pre-Depends")?,
            provides: provides_names,
            provides_versioned,
            multi_arch: optional(multi_arch),
            name,
            version,
            architecture,
            filename,
            size,
            sha256: sha,
        });
    }
    Ok(out)
}

/// One line of the compact verified index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Package name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Architecture.
    pub architecture: String,
    /// sha256 of the `.deb`, lowercase hex.
    pub sha256: String,
    /// Size of the `.deb` in bytes.
    pub size: u64,
    /// Path of the `.deb` relative to the archive root.
    pub filename: String,
}

/// The verified-index line of a package: `name version architecture sha256 size filename`.
pub fn index_line(p: &Package) -> String {
    format!(
        "{} {} {} {} {} {}",
        p.name, p.version, p.architecture, p.sha256, p.size, p.filename
    )
}

/// The whole verified index of `packages`: one [`index_line`] each, sorted (bytewise, hence by
/// name, then version string), duplicates removed, newline-terminated.
pub fn index_text(packages: &[Package]) -> String {
    let mut lines: Vec<String> = packages.iter().map(index_line).collect();
    lines.sort_unstable();
    lines.dedup();
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// Parse one verified-index line; `None` if it does not have the six fields.
pub fn parse_index_line(line: &str) -> Option<IndexEntry> {
    let mut it = line.trim_end_matches('\r').splitn(6, ' ');
    let name = it.next()?;
    let version = it.next()?;
    let architecture = it.next()?;
    let sha256 = it.next()?;
    let size = it.next()?.parse().ok()?;
    let filename = it.next()?;
    if name.is_empty() || filename.is_empty() {
        return None;
    }
    Some(IndexEntry {
        name: name.to_owned(),
        version: version.to_owned(),
        architecture: architecture.to_owned(),
        sha256: sha256.to_owned(),
        size,
        filename: filename.to_owned(),
    })
}

/// Every entry for package `name` in a verified index (all versions and architectures), in the
/// order of the index. A linear scan for `name ` at line starts; it does not rely on the order.
pub fn lookup_index_line(index_text: &str, name: &str) -> Vec<IndexEntry> {
    let mut out = Vec::new();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return out;
    }
    let needle = format!("\n{name} ");
    let mut starts = Vec::new();
    if index_text.starts_with(&needle[1..]) {
        starts.push(0);
    }
    starts.extend(index_text.match_indices(&needle).map(|(i, _)| i + 1));
    for s in starts {
        let line = index_text[s..].split('\n').next().unwrap_or("");
        if let Some(e) = parse_index_line(line) {
            out.push(e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_field_is_read_whole_from_the_first_stanza() {
        let text =
            "Package: a\nbreaks: b (<< 2),\n c\nStatus: install ok installed\n\nPackage: z\n";
        assert_eq!(field(text, "Breaks").as_deref(), Some("b (<< 2),\nc"));
        assert_eq!(field(text, "Package").as_deref(), Some("a"));
        assert_eq!(field(text, "Provides"), None);
    }

    fn dep(name: &str, arch: Option<&str>, v: Option<(&str, &str)>) -> Dep {
        Dep {
            name: name.into(),
            arch: arch.map(Into::into),
            version: v.map(|(o, v)| (o.into(), v.into())),
        }
    }

    #[test]
    fn relations_per_policy() {
        let r = parse_relations("libc6 (>= 2.14), libfoo1 | libbar:any (<< 3~) [amd64 !i386] <!nocheck> <stage1 cross>, perl:any,  debconf (>=0.5) | debconf-2.0 ,").unwrap();
        assert_eq!(
            r,
            vec![
                vec![dep("libc6", None, Some((">=", "2.14")))],
                vec![
                    dep("libfoo1", None, None),
                    dep("libbar", Some("any"), Some(("<<", "3~")))
                ],
                vec![dep("perl", Some("any"), None)],
                vec![
                    dep("debconf", None, Some((">=", "0.5"))),
                    dep("debconf-2.0", None, None)
                ],
            ]
        );
        // Obsolete operators.
        assert_eq!(
            parse_relations("a (< 1), b (> 2)").unwrap(),
            vec![
                vec![dep("a", None, Some(("<=", "1")))],
                vec![dep("b", None, Some((">=", "2")))]
            ]
        );
        assert_eq!(
            parse_relations("a (= 1:2.3-4+deb11u1)").unwrap()[0][0].version,
            Some(("=".into(), "1:2.3-4+deb11u1".into()))
        );
        assert_eq!(parse_relations("").unwrap(), Vec::<Vec<Dep>>::new());
        assert_eq!(format_alternatives(&r[1]), "libfoo1 | libbar:any (<< 3~)");
        for bad in [
            "a (>= 1", "a | | b", "a (~ 1)", "a (>= )", "a b", "(>= 1)", "a [amd64", "a:",
        ] {
            assert!(parse_relations(bad).is_err(), "{bad:?} should be refused");
        }
    }

    const TWO: &str = "Package: libfoo1\nSource: foo (1.0-1)\nVersion: 1:1.0-1\nInstalled-Size: 10\nMaintainer: A <a@example.invalid>\nArchitecture: amd64\nMulti-Arch: same\nProvides: libfoo (= 1:1.0-1), foo-virtual\nPre-Depends: multiarch-support\nDepends: libc6 (>= 2.14),\n libgcc-s1 | libgcc1\nDescription: foo\n A library.\n .\n More text: with a colon.\nPriority: important\nSection: libs\nFilename: pool/main/f/foo/libfoo1_1.0-1_amd64.deb\nSize: 1234\nMD5sum: 00000000000000000000000000000000\nSHA256: ABCDEF0000000000000000000000000000000000000000000000000000000001\n\nPackage: base-files\nEssential: yes\nPriority: required\nVersion: 11.1+deb11u11\nArchitecture: amd64\nFilename: pool/main/b/base-files/base-files_11.1+deb11u11_amd64.deb\nSize: 70000\nSHA256: 0000000000000000000000000000000000000000000000000000000000000002\n";

    #[test]
    fn parses_stanzas_with_multiline_fields() {
        let p = parse_packages("Packages", TWO).unwrap();
        assert_eq!(p.len(), 2);
        let a = &p[0];
        assert_eq!(a.name, "libfoo1");
        assert_eq!(a.version, "1:1.0-1");
        assert_eq!(a.architecture, "amd64");
        assert_eq!(a.priority.as_deref(), Some("important"));
        assert!(!a.essential);
        assert_eq!(a.multi_arch.as_deref(), Some("same"));
        assert_eq!(a.provides, ["libfoo", "foo-virtual"]);
        assert_eq!(
            a.provides_versioned,
            [("libfoo".to_owned(), "1:1.0-1".to_owned())]
        );
        assert_eq!(
            a.pre_depends,
            vec![vec![dep("multiarch-support", None, None)]]
        );
        assert_eq!(
            a.depends,
            vec![
                vec![dep("libc6", None, Some((">=", "2.14")))],
                vec![dep("libgcc-s1", None, None), dep("libgcc1", None, None)]
            ]
        );
        assert_eq!(a.size, 1234);
        assert_eq!(a.sha256, format!("abcdef{}1", "0".repeat(57)));
        assert_eq!(a.filename, "pool/main/f/foo/libfoo1_1.0-1_amd64.deb");
        let b = &p[1];
        assert!(b.essential);
        assert_eq!(b.priority.as_deref(), Some("required"));
        assert!(b.depends.is_empty() && b.provides.is_empty() && b.multi_arch.is_none());
    }

    #[test]
    fn missing_field_names_file_and_stanza() {
        let text = TWO.replace("Version: 11.1+deb11u11\n", "");
        let e = parse_packages("dists/s/main/binary-amd64/Packages.xz", &text)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "dists/s/main/binary-amd64/Packages.xz: stanza 2 at line 23 (Package base-files), field Version: expected the field to be present, got no such field"
        );
        for (from, to, field) in [
            ("Size: 70000\n", "", "Size"),
            (
                "SHA256: 0000000000000000000000000000000000000000000000000000000000000002\n",
                "",
                "SHA256",
            ),
            (
                "Filename: pool/main/b/base-files/base-files_11.1+deb11u11_amd64.deb\n",
                "",
                "Filename",
            ),
            ("Package: base-files\n", "", "Package"),
            ("Size: 70000", "Size: 7e4", "Size"),
            ("SHA256: 0000", "SHA256: zz00", "SHA256"),
            ("Version: 11.1+deb11u11", "Version: 11 1", "Version"),
        ] {
            let text = TWO.replace(from, to);
            let e = parse_packages("P", &text).unwrap_err().to_string();
            assert!(
                e.starts_with("P: stanza 2 at line 23") && e.contains(&format!("field {field}:")),
                "{field}: {e}"
            );
        }
        let text = TWO.replace("libc6 (>= 2.14)", "libc6 (>= 2.14");
        let e = parse_packages("P", &text).unwrap_err().to_string();
        assert!(
            e.starts_with("P: stanza 1 at line 1 (Package libfoo1), field Depends"),
            "{e}"
        );
    }

    #[test]
    fn decompresses_by_extension() {
        let data = TWO.as_bytes();
        let mut xz = Vec::new();
        {
            let mut w = liblzma::write::XzEncoder::new(&mut xz, 6);
            w.write_all(data).unwrap();
            w.finish().unwrap();
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(data).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(
            decompress("dists/s/main/binary-amd64/Packages.xz", &xz).unwrap(),
            data
        );
        assert_eq!(
            decompress("dists/s/main/binary-amd64/Packages.gz", &gz).unwrap(),
            data
        );
        assert_eq!(
            decompress("dists/s/main/binary-amd64/Packages", data).unwrap(),
            data
        );
        let e = decompress("dists/s/main/binary-amd64/Packages.xz", &gz)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("dists/s/main/binary-amd64/Packages.xz: xz decompression failed"),
            "{e}"
        );
        let e = decompress("Packages.gz", &xz[..xz.len() / 2])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("Packages.gz: gzip decompression failed"),
            "{e}"
        );
        assert!(decompress("Packages.bz2", data).is_err());
    }

    /// An .xz of `data` in blocks of `block` bytes, as the archive's indexes are written.
    fn xz_in_blocks(data: &[u8], block: u64) -> Vec<u8> {
        let stream = liblzma::stream::MtStreamBuilder::new()
            .threads(2)
            .block_size(block)
            .preset(1)
            .encoder()
            .unwrap();
        let mut w = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn decodes_every_block_and_every_stream_of_an_xz_index() {
        let first: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let second = TWO.as_bytes();
        // 800 kB in blocks of 64 KiB: thirteen blocks, decoded on two threads.
        let one = xz_in_blocks(&first, 64 << 10);
        assert_eq!(decompress("Packages.xz", &one).unwrap(), first);
        // Two streams, with stream padding between them and after.
        let mut two = one.clone();
        two.extend_from_slice(&[0; 8]);
        two.extend_from_slice(&xz_in_blocks(second, 1 << 20));
        two.extend_from_slice(&[0; 4]);
        let mut both = first.clone();
        both.extend_from_slice(second);
        assert_eq!(decompress("Packages.xz", &two).unwrap(), both);
        // Padding not in fours, trailing bytes that are no stream, and a cut stream are refused.
        let mut odd = one.clone();
        odd.extend_from_slice(&[0; 3]);
        let e = decompress("Packages.xz", &odd).unwrap_err().to_string();
        assert!(e.contains("stream padding comes in fours"), "{e}");
        let mut trailing = one.clone();
        trailing.extend_from_slice(b"junk");
        assert!(decompress("Packages.xz", &trailing).is_err());
        assert!(decompress("Packages.xz", &one[..one.len() - 20]).is_err());
    }

    #[test]
    fn index_lines_round_trip_and_lookup() {
        let pkgs = parse_packages("P", TWO).unwrap();
        let mut more = pkgs.clone();
        let mut b2 = pkgs[1].clone();
        b2.version = "12.0".into();
        more.push(b2);
        let mut prefix = pkgs[0].clone();
        prefix.name = "libfoo1-dev".into();
        more.push(prefix);
        let text = index_text(&more);
        assert_eq!(text.lines().count(), 4);
        assert_eq!(
            text.lines().next().unwrap(),
            "base-files 11.1+deb11u11 amd64 0000000000000000000000000000000000000000000000000000000000000002 70000 pool/main/b/base-files/base-files_11.1+deb11u11_amd64.deb"
        );
        let got = lookup_index_line(&text, "base-files");
        assert_eq!(
            got.iter().map(|e| e.version.as_str()).collect::<Vec<_>>(),
            ["11.1+deb11u11", "12.0"]
        );
        let got = lookup_index_line(&text, "libfoo1");
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0],
            IndexEntry {
                name: "libfoo1".into(),
                version: "1:1.0-1".into(),
                architecture: "amd64".into(),
                sha256: pkgs[0].sha256.clone(),
                size: 1234,
                filename: pkgs[0].filename.clone(),
            }
        );
        assert!(lookup_index_line(&text, "libfoo").is_empty());
        assert!(lookup_index_line(&text, "ase-files").is_empty());
        assert!(lookup_index_line(&text, "").is_empty());
        assert!(lookup_index_line("", "a").is_empty());
    }

    /// A synthetic index the size of bullseye main amd64 (~59k stanzas, ~45 MB): parsing and
    /// looking up must stay fast. Timing is only asserted in release builds.
    #[test]
    fn large_index_is_fast() {
        let mut text = String::with_capacity(48 << 20);
        for i in 0..59_000 {
            text.push_str(&format!(
                "Package: pkg{i:05}\nSource: src{i}\nVersion: 1:{i}.0-1+deb11u1\nInstalled-Size: 100\nMaintainer: M <m@example.invalid>\nArchitecture: amd64\nReplaces: old{i} (<< 1.0)\nDepends: libc6 (>= 2.14), libfoo{i} | libbar (>= 1:2.0~rc1), debconf (>= 0.5) | debconf-2.0, perl:any\nPre-Depends: dpkg (>= 1.17)\nProvides: virt{i} (= 1.0)\nDescription: package number {i}\nMulti-Arch: foreign\nHomepage: https://example.invalid/{i}\nDescription-md5: 00000000000000000000000000000000\nTag: devel::lang, role::program\nSection: misc\nPriority: optional\nFilename: pool/main/p/pkg{i}/pkg{i}_1.0-1_amd64.deb\nSize: {i}\nMD5sum: 00000000000000000000000000000000\nSHA256: {:064x}\n\n",
                i
            ));
        }
        while text.len() < 45 << 20 {
            text.push_str(&format!("Package: filler{}\nVersion: 1\nArchitecture: all\nFilename: f\nSize: 1\nSHA256: {:064x}\nDescription: x\n{}\n", text.len(), 7, " long line of description text that pads the index to a realistic size\n".repeat(40)));
        }
        let t = std::time::Instant::now();
        let pkgs = parse_packages("Packages", &text).unwrap();
        let parse = t.elapsed();
        assert!(pkgs.len() >= 59_000);
        let idx = index_text(&pkgs);
        let t = std::time::Instant::now();
        let found = lookup_index_line(&idx, "pkg31337");
        let lookup = t.elapsed();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].size, 31337);
        eprintln!(
            "parse of {} MB / {} stanzas: {parse:?}; lookup in {} MB: {lookup:?}",
            text.len() >> 20,
            pkgs.len(),
            idx.len() >> 20
        );
        if !cfg!(debug_assertions) {
            assert!(parse < std::time::Duration::from_millis(1000), "{parse:?}");
            assert!(lookup < std::time::Duration::from_millis(50), "{lookup:?}");
        }
    }
}
