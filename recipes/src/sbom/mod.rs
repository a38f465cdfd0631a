//! Software bills of materials of a Debian image: what it contains, package by package, from
//! the signed index's stanzas (name, version, architecture, source, maintainer, the `.deb`'s
//! sha256 as the index states it, dependencies) and the image's own copyright files (licences),
//! written as SPDX 2.3 ([`spdx`]) and CycloneDX 1.6 ([`cyclonedx`]) JSON. Nothing in them
//! varies between runs: times are `SOURCE_DATE_EPOCH`, identifiers are derived from content.

pub mod cyclonedx;
pub mod license;
pub mod spdx;

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::debian::packages;

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub source: String,
    pub source_version: String,
    /// The `Maintainer` field.
    pub maintainer: String,
    /// The `.deb`'s sha256, as the signed index states it.
    pub sha256: String,
    /// An SPDX licence expression, or `None` (NOASSERTION) where Debian gives nothing
    /// machine-readable.
    pub license: Option<String>,
    /// The installed packages its `Depends` and `Pre-Depends` are satisfied by.
    pub depends: Vec<String>,
    pub purl: String,
    /// The image layer that installed it (0: the bottom one).
    pub layer: usize,
}

/// One image layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Its history line.
    pub description: String,
    /// The layer blob's sha256 (hex).
    pub digest: String,
}

/// A file a layer copied in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedFile {
    /// Absolute path in the image.
    pub path: String,
    pub sha256: String,
    pub sha1: String,
    pub layer: usize,
}

/// The whole image.
#[derive(Debug, Clone)]
pub struct Sbom {
    /// The recipe's name.
    pub name: String,
    pub architecture: String,
    /// The image manifest's sha256 (hex).
    pub image_digest: String,
    /// `debian-11`, … (the purl `distro` qualifier).
    pub distro: String,
    pub source_date_epoch: i64,
    /// `rbuild builders-…`.
    pub tool_version: String,
    pub components: Vec<Component>,
    /// The image's layers, bottom first (empty: not known).
    pub layers: Vec<Layer>,
    pub files: Vec<CopiedFile>,
    /// The texts of every `LicenseRef-` used.
    pub license_refs: BTreeMap<String, String>,
}

/// What a package's stanza and copyright file say, before dependencies are resolved.
pub struct Installed<'a> {
    pub stanza: &'a str,
    pub copyright: Option<String>,
    /// The image layer that installed it.
    pub layer: usize,
}

impl Sbom {
    /// Build from each installed package's index stanza (verbatim, one per package) and
    /// copyright file text. `packages` are in the order to list them.
    pub fn new(
        name: &str,
        architecture: &str,
        image_digest: &str,
        distro: &str,
        source_date_epoch: i64,
        tool_version: &str,
        installed: &[Installed],
    ) -> Result<Sbom, crate::debian::DebianError> {
        let parsed: Vec<packages::Package> = installed
            .iter()
            .map(|i| {
                packages::parse_packages("available", i.stanza)
                    .map(|mut v| v.pop().expect("one stanza per package"))
            })
            .collect::<Result<_, _>>()?;
        let names: BTreeSet<&str> = parsed.iter().map(|p| p.name.as_str()).collect();
        let mut provided: BTreeMap<&str, &str> = BTreeMap::new();
        for p in &parsed {
            for v in &p.provides {
                provided.entry(v.as_str()).or_insert(p.name.as_str());
            }
        }
        let mut license_refs = BTreeMap::new();
        let mut components = Vec::new();
        for (i, p) in installed.iter().zip(&parsed) {
            let field = |name: &str| field(i.stanza, name);
            let (source, source_version) = match field("Source") {
                Some(s) => match s.split_once(' ') {
                    Some((n, v)) => (
                        n.to_owned(),
                        v.trim()
                            .trim_start_matches('(')
                            .trim_end_matches(')')
                            .to_owned(),
                    ),
                    None => (s.clone(), p.version.clone()),
                },
                None => (p.name.clone(), p.version.clone()),
            };
            let mut depends = Vec::new();
            for alts in p.pre_depends.iter().chain(&p.depends) {
                let hit = alts.iter().find_map(|d| {
                    names
                        .get(d.name.as_str())
                        .copied()
                        .or_else(|| provided.get(d.name.as_str()).copied())
                });
                if let Some(h) = hit.filter(|h| *h != p.name) {
                    if !depends.iter().any(|d: &String| d == h) {
                        depends.push(h.to_owned());
                    }
                }
            }
            let mut declared = i.copyright.as_deref().and_then(license::declared);
            if let Some(d) = &mut declared {
                for (k, v) in &d.refs {
                    // Debian short names such as `other` or `public-domain` stand for different
                    // texts in different packages: a text already known under another id, or
                    // a second text for the same id, gets an id of its own.
                    let id = match license_refs.get(k) {
                        Some(t) if t != v => {
                            let own = format!("{k}-{}", &hex::encode(Sha256::digest(v))[..8]);
                            d.expression = d
                                .expression
                                .split(' ')
                                .map(|t| {
                                    let bare = t.trim_matches(|c| c == '(' || c == ')');
                                    if bare == k {
                                        t.replace(k.as_str(), &own)
                                    } else {
                                        t.to_owned()
                                    }
                                })
                                .collect::<Vec<_>>()
                                .join(" ");
                            own
                        }
                        _ => k.clone(),
                    };
                    license_refs.entry(id).or_insert_with(|| v.clone());
                }
            }
            components.push(Component {
                purl: purl(&p.name, &p.version, &p.architecture, distro),
                name: p.name.clone(),
                version: p.version.clone(),
                architecture: p.architecture.clone(),
                source,
                source_version,
                maintainer: field("Maintainer").unwrap_or_default(),
                sha256: p.sha256.clone(),
                license: declared.map(|d| d.expression),
                depends,
                layer: i.layer,
            });
        }
        Ok(Sbom {
            name: name.to_owned(),
            architecture: architecture.to_owned(),
            image_digest: image_digest.to_owned(),
            distro: distro.to_owned(),
            source_date_epoch,
            tool_version: tool_version.to_owned(),
            components,
            layers: vec![],
            files: vec![],
            license_refs,
        })
    }

    /// A UUID made from the document's content and `salt` (version 8, from SHA-256): the same
    /// for every build of the same image by the same builders.
    pub fn uuid(&self, salt: &str) -> String {
        let mut h = Sha256::new();
        h.update(salt.as_bytes());
        h.update(self.tool_version.as_bytes());
        h.update(self.image_digest.as_bytes());
        for c in &self.components {
            h.update(c.purl.as_bytes());
            h.update(c.sha256.as_bytes());
        }
        let mut b: [u8; 16] = h.finalize()[..16].try_into().expect("16 bytes");
        b[6] = (b[6] & 0x0f) | 0x80;
        b[8] = (b[8] & 0x3f) | 0x80;
        let x = hex::encode(b);
        format!(
            "{}-{}-{}-{}-{}",
            &x[0..8],
            &x[8..12],
            &x[12..16],
            &x[16..20],
            &x[20..32]
        )
    }

    /// `SOURCE_DATE_EPOCH` as `YYYY-MM-DDThh:mm:ssZ`.
    pub fn timestamp(&self) -> String {
        rbuild_engine::archive::oci::rfc3339(self.source_date_epoch)
    }
}

/// The first line of a stanza's field.
pub fn field(stanza: &str, name: &str) -> Option<String> {
    let value = crate::debian::packages::field(stanza, name)?;
    Some(value.lines().next().unwrap_or_default().trim().to_owned())
}

/// `pkg:deb/debian/NAME@VERSION?arch=ARCH&distro=DISTRO`, name and version percent-encoded.
pub fn purl(name: &str, version: &str, arch: &str, distro: &str) -> String {
    format!(
        "pkg:deb/debian/{}@{}?arch={arch}&distro={distro}",
        percent(name),
        percent(version)
    )
}

/// Everything but `[A-Za-z0-9._~-]` as `%XX`.
fn percent(s: &str) -> String {
    let mut v = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => {
                v.push(b as char)
            }
            _ => v.push_str(&format!("%{b:02X}")),
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purls_encode_epochs_and_plus() {
        assert_eq!(
            purl("libc6", "2.31-13+deb11u11", "amd64", "debian-11"),
            "pkg:deb/debian/libc6@2.31-13%2Bdeb11u11?arch=amd64&distro=debian-11"
        );
        assert_eq!(
            purl("libcrypt1", "1:4.4.18-4", "amd64", "debian-11"),
            "pkg:deb/debian/libcrypt1@1%3A4.4.18-4?arch=amd64&distro=debian-11"
        );
        assert_eq!(
            purl("libstdc++6", "10.2.1-6", "amd64", "debian-11"),
            "pkg:deb/debian/libstdc%2B%2B6@10.2.1-6?arch=amd64&distro=debian-11"
        );
    }
}

#[cfg(test)]
mod collision_tests {
    use super::*;

    fn stanza(name: &str) -> String {
        format!(
            "Package: {name}\nVersion: 1\nArchitecture: all\nMaintainer: M <m@example.org>\nFilename: pool/{name}_1_all.deb\nSize: 1\nSHA256: {}\n",
            "0".repeat(64)
        )
    }

    /// Two packages whose `public-domain` mean different texts get two references.
    #[test]
    fn one_short_name_with_two_texts_gets_two_references() {
        let copyright = |text: &str| {
            format!("Format: x\n\nFiles: *\nCopyright: A\nLicense: public-domain\n {text}\n")
        };
        let (a, b) = (stanza("a"), stanza("b"));
        let installed = [
            Installed {
                stanza: &a,
                copyright: Some(copyright("first text")),
                layer: 0,
            },
            Installed {
                stanza: &b,
                copyright: Some(copyright("second text")),
                layer: 0,
            },
        ];
        let s = Sbom::new("x", "amd64", "00", "debian-13", 0, "t", &installed).unwrap();
        let (la, lb) = (
            s.components[0].license.clone().unwrap(),
            s.components[1].license.clone().unwrap(),
        );
        assert_eq!(la, "LicenseRef-public-domain");
        assert!(
            lb.starts_with("LicenseRef-public-domain-") && lb != la,
            "{lb}"
        );
        assert_eq!(s.license_refs[&la], "first text");
        assert_eq!(s.license_refs[&lb], "second text");
    }
}
