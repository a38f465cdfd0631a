//! The signed `Release`: verifying a cleartext-signed `InRelease` against pinned OpenPGP keys,
//! parsing its fields, and checking index files against the sha256 and size it lists.
//!
//! Verification fails closed: the [`VerificationHelper`] accepts the message only if at least
//! one signature in it is a good signature by a certificate whose primary fingerprint is pinned
//! (made by the primary key or by one of its signing subkeys); every other outcome, including no
//! signature at all, is an error, and only the content sequoia has authenticated is parsed.
//! A key is judged at the signature's creation time, so an archive key that has expired since
//! (an old release's) still verifies the signatures it made while it was valid.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use sequoia_openpgp as openpgp;

use openpgp::cert::CertParser;
use openpgp::parse::stream::{
    MessageLayer, MessageStructure, VerificationError, VerificationHelper, VerifierBuilder,
};
use openpgp::parse::Parse;
use openpgp::policy::StandardPolicy;
use openpgp::{Cert, KeyHandle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::DebianError;

/// One file the signed Release lists in its `SHA256` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Lowercase hex sha256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The fields of a (signed) `Release` file rbuild uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// `Origin`, e.g. `Debian`.
    pub origin: Option<String>,
    /// `Label`, e.g. `Debian`.
    pub label: Option<String>,
    /// `Suite`, e.g. `oldoldstable`.
    pub suite: String,
    /// `Codename`, e.g. `bullseye`.
    pub codename: String,
    /// `Version`, e.g. `11.11`.
    pub version: Option<String>,
    /// `Date` as written, e.g. `Sat, 09 Aug 2025 09:16:30 UTC`.
    pub date: String,
    /// `Date` in seconds since the epoch: the `SOURCE_DATE_EPOCH` of everything built from it.
    pub source_date_epoch: i64,
    /// `Architectures`.
    pub architectures: Vec<String>,
    /// `Components`.
    pub components: Vec<String>,
    /// The `SHA256` field: path relative to `dists/<suite>/` → hash and size.
    pub sha256: BTreeMap<String, FileEntry>,
    /// Uppercase primary fingerprints of the pinned keys whose signature verified (empty when
    /// the text was parsed with [`parse_release`] alone).
    pub signed_by: Vec<String>,
}

/// Normalize a fingerprint as written by a person: no spaces, no `0x`, uppercase.
fn normalize_fingerprint(s: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(&s);
    s.to_ascii_uppercase()
}

/// What the verification helper saw; read after the verifier is done (or has failed).
#[derive(Default)]
struct Report {
    /// `check` ran.
    checked: bool,
    /// Primary fingerprints of pinned certs with a good signature.
    good: BTreeSet<String>,
    /// One description per signature that did not count.
    other: Vec<String>,
}

struct Helper<'r> {
    certs: Vec<Cert>,
    pinned: &'r BTreeSet<String>,
    report: &'r mut Report,
}

fn issuer_of(sig: &openpgp::packet::Signature) -> String {
    let issuers = sig.get_issuers();
    issuers
        .iter()
        .find(|h| matches!(h, KeyHandle::Fingerprint(_)))
        .or_else(|| issuers.first())
        .map(KeyHandle::to_hex)
        .unwrap_or_else(|| "an unknown key (no issuer subpacket)".to_owned())
}

impl VerificationHelper for Helper<'_> {
    fn get_certs(&mut self, _ids: &[KeyHandle]) -> openpgp::Result<Vec<Cert>> {
        // Only pinned certificates are ever offered: a signature by any other key is a
        // "missing key" to sequoia.
        Ok(self.certs.clone())
    }

    fn check(&mut self, structure: MessageStructure) -> openpgp::Result<()> {
        self.report.checked = true;
        for layer in structure.into_iter() {
            match layer {
                MessageLayer::SignatureGroup { results } => {
                    for r in results {
                        match r {
                            Ok(good) => {
                                let fpr = good.ka.cert().fingerprint().to_hex();
                                if self.pinned.contains(&fpr) {
                                    self.report.good.insert(fpr);
                                } else {
                                    self.report.other.push(format!(
                                        "{fpr} (good signature, but the key is not pinned)"
                                    ));
                                }
                            }
                            Err(e) => self.report.other.push(describe_failure(&e)),
                        }
                    }
                }
                MessageLayer::Compression { .. } => {}
                MessageLayer::Encryption { .. } => {
                    self.report
                        .other
                        .push("an encryption layer (an InRelease is never encrypted)".to_owned());
                    return Err(anyhow_error("unexpected encryption layer").into());
                }
            }
        }
        if self.report.good.is_empty() {
            return Err(anyhow_error("no valid signature by a pinned key").into());
        }
        Ok(())
    }
}

fn anyhow_error(msg: &str) -> openpgp::Error {
    openpgp::Error::InvalidOperation(msg.to_owned())
}

fn describe_failure(e: &VerificationError<'_>) -> String {
    match e {
        VerificationError::MissingKey { sig } => format!(
            "{} (not a key of a pinned certificate in the keyring)",
            issuer_of(sig)
        ),
        VerificationError::UnboundKey { sig, cert, error } => {
            format!(
                "{} (a subkey of {} not bound at signature time: {error})",
                issuer_of(sig),
                cert.fingerprint().to_hex()
            )
        }
        VerificationError::BadKey { sig, ka, error } => {
            format!(
                "{} (key of {} not usable at signature time: {error})",
                issuer_of(sig),
                ka.cert().fingerprint().to_hex()
            )
        }
        VerificationError::BadSignature { sig, ka, error } => {
            format!(
                "{} (BAD signature by a key of {}: {error})",
                issuer_of(sig),
                ka.cert().fingerprint().to_hex()
            )
        }
        VerificationError::MalformedSignature { sig, error } => {
            format!("{} (malformed signature: {error})", issuer_of(sig))
        }
        VerificationError::UnknownSignature { sig } => {
            format!("an unparseable signature ({})", sig.error())
        }
        // VerificationError is non-exhaustive.
        _ => format!("a signature that did not verify ({e})"),
    }
}

/// Verify a cleartext-signed `InRelease` and parse the `Release` it signs.
///
/// `keyring` holds one or more OpenPGP certificates, armored or binary. Only certificates whose
/// primary fingerprint is in `pinned` (compared case-insensitively, spaces ignored) are used; at
/// least one signature must be good and made by one of them (or by a signing subkey of one).
/// Keys are judged at each signature's creation time. `file` names the InRelease in messages.
pub fn verify_inrelease(
    file: &str,
    inrelease: &[u8],
    keyring: &[u8],
    pinned: &[String],
) -> Result<Release, DebianError> {
    let pinned_set: BTreeSet<String> = pinned
        .iter()
        .map(|p| normalize_fingerprint(p))
        .filter(|p| !p.is_empty())
        .collect();
    if pinned_set.is_empty() {
        return Err(DebianError::Keyring {
            file: file.to_owned(),
            reason: "expected at least one pinned fingerprint, got none (nothing could be trusted)"
                .to_owned(),
        });
    }
    let parser = CertParser::from_bytes(keyring).map_err(|e| DebianError::Keyring {
        file: file.to_owned(),
        reason: format!("expected OpenPGP certificates in the keyring, got unreadable data: {e}"),
    })?;
    let mut all_certs = Vec::new();
    let mut parse_errors = Vec::new();
    for c in parser {
        match c {
            Ok(c) => all_certs.push(c),
            Err(e) => parse_errors.push(e.to_string()),
        }
    }
    let certs: Vec<Cert> = all_certs
        .iter()
        .filter(|c| pinned_set.contains(&c.fingerprint().to_hex()))
        .cloned()
        .collect();

    let mut report = Report::default();
    let policy = StandardPolicy::new();
    let outcome = (|| -> openpgp::Result<Vec<u8>> {
        let helper = Helper {
            certs,
            pinned: &pinned_set,
            report: &mut report,
        };
        let mut verifier =
            VerifierBuilder::from_bytes(inrelease)?.with_policy(&policy, None, helper)?;
        let mut content = Vec::new();
        verifier.read_to_end(&mut content)?;
        if !verifier.message_processed() {
            return Err(anyhow_error("the message was not completely processed").into());
        }
        Ok(content)
    })();

    let no_valid_signature = |report: &Report| {
        let pinned = pinned_set
            .iter()
            .map(|p| {
                if all_certs.iter().any(|c| &c.fingerprint().to_hex() == p) {
                    p.clone()
                } else if let Some(c) = all_certs.iter().find(|c| {
                    c.keys()
                        .subkeys()
                        .any(|k| &k.key().fingerprint().to_hex() == p)
                }) {
                    format!(
                        "{p} (a subkey of {}: pin the primary key's fingerprint)",
                        c.fingerprint().to_hex()
                    )
                } else {
                    format!("{p} (not in the keyring)")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut found = report.other.join(", ");
        if found.is_empty() {
            found = "none (the message carries no signature)".to_owned();
        }
        if all_certs.is_empty() {
            found.push_str(&format!(
                "; the keyring holds no readable certificate{}",
                if parse_errors.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", parse_errors.join("; "))
                }
            ));
        }
        DebianError::NoValidSignature {
            file: file.to_owned(),
            pinned,
            found,
        }
    };

    let content = match outcome {
        Ok(content) => content,
        Err(e) => {
            if report.checked && report.good.is_empty() {
                return Err(no_valid_signature(&report));
            }
            let head = String::from_utf8_lossy(&inrelease[..inrelease.len().min(64)]);
            let reason = if head
                .trim_start()
                .starts_with("-----BEGIN PGP SIGNED MESSAGE-----")
            {
                format!("{e:#}")
            } else {
                format!("it does not start with `-----BEGIN PGP SIGNED MESSAGE-----` (OpenPGP parser: {e:#})")
            };
            return Err(DebianError::NotSigned {
                file: file.to_owned(),
                reason,
            });
        }
    };
    // Belt and braces: the helper must have run and accepted a pinned signature.
    if !report.checked || report.good.is_empty() {
        return Err(no_valid_signature(&report));
    }
    let text = String::from_utf8(content).map_err(|e| DebianError::Invalid {
        file: file.to_owned(),
        check: "encoding of the signed text".to_owned(),
        expected: "UTF-8".to_owned(),
        actual: format!("invalid UTF-8 ({e})"),
    })?;
    let mut release = parse_release(file, &text)?;
    release.signed_by = report.good.into_iter().collect();
    Ok(release)
}

fn invalid(
    file: &str,
    check: impl Into<String>,
    expected: impl Into<String>,
    actual: impl Into<String>,
) -> DebianError {
    DebianError::Invalid {
        file: file.to_owned(),
        check: check.into(),
        expected: expected.into(),
        actual: actual.into(),
    }
}

/// Parse the text of a `Release` file (the signed part of an `InRelease`).
///
/// `Suite`, `Codename`, `Date` and `SHA256` are required; `Date` must be an RFC 2822 date such as
/// `Sat, 09 Aug 2025 09:16:30 UTC`. `signed_by` is left empty.
pub fn parse_release(file: &str, text: &str) -> Result<Release, DebianError> {
    let mut paragraphs = deb822_fast::borrowed::iter_paragraphs_borrowed(text);
    let para = match paragraphs.next() {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            return Err(invalid(
                file,
                "Release syntax",
                "a deb822 paragraph",
                format!("a parse error: {e}"),
            ))
        }
        None => {
            return Err(invalid(
                file,
                "Release syntax",
                "a deb822 paragraph",
                "an empty file",
            ))
        }
    };
    let single = |name: &str| -> Result<Option<String>, DebianError> {
        match para.get_field(name) {
            None => Ok(None),
            Some(f) => match f.as_single_line() {
                Some(v) => Ok(Some(v.trim().to_owned())),
                None => Err(invalid(
                    file,
                    format!("Release field {name}"),
                    "a single-line value",
                    format!("{} lines", f.lines().len()),
                )),
            },
        }
    };
    let required = |name: &str| -> Result<String, DebianError> {
        single(name)?.filter(|v| !v.is_empty()).ok_or_else(|| {
            invalid(
                file,
                format!("Release field {name}"),
                "the field to be present",
                "no such field",
            )
        })
    };
    let words = |name: &str| -> Result<Vec<String>, DebianError> {
        Ok(single(name)?
            .map(|v| v.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default())
    };
    let date = required("Date")?;
    let source_date_epoch = parse_rfc2822(&date).ok_or_else(|| {
        invalid(
            file,
            "Release field Date",
            "an RFC 2822 date like `Sat, 09 Aug 2025 09:16:30 UTC`",
            format!("{date:?}"),
        )
    })?;
    let sha_field = para.get_field("SHA256").ok_or_else(|| {
        invalid(
            file,
            "Release field SHA256",
            "the field to be present",
            "no such field",
        )
    })?;
    let mut sha256 = BTreeMap::new();
    for (i, line) in sha_field.lines().iter().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [hash, size, path] = parts[..] else {
            return Err(invalid(
                file,
                format!("Release field SHA256, line {}", i + 1),
                "`<sha256> <size> <path>`",
                format!("{line:?}"),
            ));
        };
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                file,
                format!("Release field SHA256, entry {path}"),
                "64 hex digits",
                format!("{hash:?}"),
            ));
        }
        let size: u64 = size.parse().map_err(|_| {
            invalid(
                file,
                format!("Release field SHA256, entry {path}"),
                "a decimal size",
                format!("{size:?}"),
            )
        })?;
        sha256.insert(
            path.to_owned(),
            FileEntry {
                sha256: hash.to_ascii_lowercase(),
                size,
            },
        );
    }
    Ok(Release {
        origin: single("Origin")?,
        label: single("Label")?,
        suite: required("Suite")?,
        codename: required("Codename")?,
        version: single("Version")?,
        date,
        source_date_epoch,
        architectures: words("Architectures")?,
        components: words("Components")?,
        sha256,
        signed_by: Vec::new(),
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Parse an RFC 2822 date (`[Day, ]DD Mon YYYY HH:MM[:SS] ZONE`) into seconds since the epoch.
/// Zones: `UTC`, `GMT`, `UT`, `Z` or `±hhmm`.
pub fn parse_rfc2822(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = match s.split_once(',') {
        Some((wd, rest)) => {
            const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
            if !DAYS.iter().any(|d| d.eq_ignore_ascii_case(wd.trim())) {
                return None;
            }
            rest
        }
        None => s,
    };
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [day, mon, year, time, zone] = parts[..] else {
        return None;
    };
    let num = |t: &str, max_len: usize| -> Option<i64> {
        if t.is_empty() || t.len() > max_len || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let day = num(day, 2)?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mon = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(mon))? as i64 + 1;
    let year = num(year, 4)?;
    let t: Vec<&str> = time.split(':').collect();
    let (h, mi, sec) = match t[..] {
        [h, m] => (num(h, 2)?, num(m, 2)?, 0),
        [h, m, s] => (num(h, 2)?, num(m, 2)?, num(s, 2)?),
        _ => return None,
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let mdays = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day < 1 || day > mdays[(mon - 1) as usize] || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let offset = match zone {
        z if ["UTC", "GMT", "UT", "Z"]
            .iter()
            .any(|u| u.eq_ignore_ascii_case(z)) =>
        {
            0
        }
        z if z.len() == 5 && (z.starts_with('+') || z.starts_with('-')) => {
            let oh = num(&z[1..3], 2)?;
            let om = num(&z[3..5], 2)?;
            let o = oh * 3600 + om * 60;
            if z.starts_with('-') {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    Some(days_from_civil(year, mon, day) * 86400 + h * 3600 + mi * 60 + sec - offset)
}

/// Check an index file against the sha256 and size the signed Release lists for it. `file` is
/// the path as the Release lists it (relative to `dists/<suite>/`, e.g.
/// `main/binary-amd64/Packages.xz`); a leading `dists/<suite>/` is tolerated.
pub fn check_file(file: &str, bytes: &[u8], release: &Release) -> Result<(), DebianError> {
    let entry = release.sha256.get(file).or_else(|| {
        let rest = file.strip_prefix("dists/")?;
        let (_, rel) = rest.split_once('/')?;
        release.sha256.get(rel)
    });
    let Some(entry) = entry else {
        return Err(DebianError::NotInRelease {
            file: file.to_owned(),
            listed: release.sha256.len(),
        });
    };
    let actual_size = bytes.len() as u64;
    let actual = hex::encode(Sha256::digest(bytes));
    if actual != entry.sha256 {
        return Err(DebianError::HashMismatch {
            file: file.to_owned(),
            expected: entry.sha256.clone(),
            expected_size: entry.size,
            actual,
            actual_size,
        });
    }
    if actual_size != entry.size {
        return Err(DebianError::SizeMismatch {
            file: file.to_owned(),
            expected: entry.size,
            actual: actual_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::debian::testkit::{self, clearsign, generate_key, release_text};
    use std::time::{Duration, SystemTime};

    const DATE: &str = "Sat, 09 Aug 2025 09:16:30 UTC";

    /// [`verify_inrelease`] with `key` as the keyring and the only pinned fingerprint.
    fn verify_by(key: &testkit::TestKey, name: &str, bytes: &[u8]) -> Result<Release, DebianError> {
        verify_inrelease(name, bytes, &key.public_armored(), &[key.fingerprint()])
    }

    fn sample() -> (testkit::TestKey, String, Vec<u8>) {
        let key = generate_key("rbuild test <t@example.invalid>");
        let text = release_text(
            "testsuite",
            "testcode",
            DATE,
            &[("main/binary-amd64/Packages", b"Package: a\n")],
        );
        let signed = clearsign(&key, &text);
        (key, text, signed)
    }

    #[test]
    fn good_signature_is_accepted() {
        let (key, _, signed) = sample();
        let pinned = vec![key.fingerprint()];
        let r = verify_inrelease(
            "dists/testsuite/InRelease",
            &signed,
            &key.public_armored(),
            &pinned,
        )
        .unwrap();
        assert_eq!(r.suite, "testsuite");
        assert_eq!(r.codename, "testcode");
        assert_eq!(r.signed_by, vec![key.fingerprint()]);
        assert_eq!(r.source_date_epoch, 1754730990);
        let e = &r.sha256["main/binary-amd64/Packages"];
        assert_eq!(e.size, 11);
        assert_eq!(e.sha256, hex::encode(Sha256::digest(b"Package: a\n")));
    }

    #[test]
    fn pinned_fingerprint_is_normalized() {
        let (key, _, signed) = sample();
        let fpr = key.fingerprint();
        let spaced: String = fpr
            .to_lowercase()
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        let r = verify_inrelease("InRelease", &signed, &key.public_armored(), &[spaced]).unwrap();
        assert_eq!(r.signed_by, vec![fpr]);
    }

    #[test]
    fn signature_by_unpinned_key_is_refused() {
        let (key, _, signed) = sample();
        let other = generate_key("other <o@example.invalid>");
        // The keyring has both; only `other` is pinned.
        let mut ring = key.public_armored();
        ring.extend(other.public_armored());
        let err = verify_inrelease(
            "dists/testsuite/InRelease",
            &signed,
            &ring,
            &[other.fingerprint()],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DebianError::NoValidSignature { .. }), "{msg}");
        assert!(
            msg.starts_with("dists/testsuite/InRelease: no valid signature by a pinned key"),
            "{msg}"
        );
        assert!(msg.contains(&other.fingerprint()), "{msg}");
        // The signer is named (by its signing subkey's fingerprint).
        let signer_subkey = key.subkey_fingerprint();
        assert!(msg.contains(&signer_subkey), "{msg}");
    }

    #[test]
    fn tampered_text_is_refused() {
        let (key, _, signed) = sample();
        let s = String::from_utf8(signed).unwrap();
        let tampered = s.replace("Suite: testsuite", "Suite: evilsuite");
        assert_ne!(s, tampered);
        let err = verify_by(&key, "InRelease", tampered.as_bytes()).unwrap_err();
        assert!(matches!(err, DebianError::NoValidSignature { .. }), "{err}");
        assert!(err.to_string().contains("BAD signature"), "{err}");
        // A changed hash line is refused too.
        let tampered = s.replacen("Packages", "Packagez", 1);
        assert!(verify_by(&key, "InRelease", tampered.as_bytes()).is_err());
    }

    #[test]
    fn unsigned_release_is_refused() {
        let (key, text, _) = sample();
        let err = verify_by(&key, "dists/x/InRelease", text.as_bytes()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("dists/x/InRelease: "), "{msg}");
        assert!(
            matches!(
                err,
                DebianError::NotSigned { .. } | DebianError::NoValidSignature { .. }
            ),
            "{msg}"
        );
        // An empty file, too.
        assert!(verify_by(&key, "dists/x/InRelease", b"").is_err());
    }

    #[test]
    fn signed_message_with_signature_block_removed_is_refused() {
        let (key, _, signed) = sample();
        let s = String::from_utf8(signed).unwrap();
        let cut = &s[..s.find("-----BEGIN PGP SIGNATURE-----").unwrap()];
        assert!(verify_by(&key, "InRelease", cut.as_bytes()).is_err());
    }

    #[test]
    fn unsigned_text_around_the_signed_message_is_ignored() {
        let (key, _, signed) = sample();
        let other = generate_key("other <o@example.invalid>");
        let ring = key.public_armored();
        let pinned = [key.fingerprint()];
        let mut prefixed = b"Suite: evil\nCodename: evil\n\n".to_vec();
        prefixed.extend(&signed);
        let mut suffixed = signed.clone();
        suffixed.extend(b"\nSuite: evil\n");
        // A second signed message (by an unpinned key) after the first one.
        let mut doubled = signed.clone();
        doubled.extend(clearsign(&other, &release_text("evil", "evil", DATE, &[])));
        for bytes in [prefixed, suffixed, doubled] {
            if let Ok(r) = verify_inrelease("InRelease", &bytes, &ring, &pinned) {
                assert_eq!(
                    (r.suite.as_str(), r.codename.as_str()),
                    ("testsuite", "testcode")
                );
            }
        }
    }

    #[test]
    fn pinned_key_missing_from_keyring_is_refused() {
        let (key, _, signed) = sample();
        let other = generate_key("other <o@example.invalid>");
        let err = verify_inrelease(
            "InRelease",
            &signed,
            &other.public_armored(),
            &[key.fingerprint()],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{} (not in the keyring)", key.fingerprint())),
            "{msg}"
        );
    }

    #[test]
    fn no_pinned_keys_is_refused() {
        let (key, _, signed) = sample();
        let err = verify_inrelease("InRelease", &signed, &key.public_armored(), &[]).unwrap_err();
        assert!(matches!(err, DebianError::Keyring { .. }), "{err}");
    }

    #[test]
    fn garbage_keyring_is_refused() {
        let (key, _, signed) = sample();
        assert!(
            verify_inrelease("InRelease", &signed, b"not a key", &[key.fingerprint()]).is_err()
        );
        assert!(verify_inrelease("InRelease", &signed, b"", &[key.fingerprint()]).is_err());
    }

    #[test]
    fn pinning_a_subkey_fingerprint_is_explained() {
        let (key, _, signed) = sample();
        let sub = key.subkey_fingerprint();
        let err = verify_inrelease(
            "InRelease",
            &signed,
            &key.public_armored(),
            std::slice::from_ref(&sub),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("{sub} (a subkey of {}", key.fingerprint())),
            "{err}"
        );
    }

    #[test]
    fn one_good_pinned_signature_among_several_is_enough() {
        let a = generate_key("a <a@example.invalid>");
        let b = generate_key("b <b@example.invalid>");
        let text = release_text("s", "c", DATE, &[]);
        let signed = testkit::clearsign_many(&[&a, &b], &text, SystemTime::now());
        // Only b's certificate is in the keyring (a's signature is by a "missing key").
        let r = verify_inrelease(
            "InRelease",
            &signed,
            &b.public_armored(),
            &[b.fingerprint(), a.fingerprint()],
        )
        .unwrap();
        assert_eq!(r.signed_by, vec![b.fingerprint()]);
        // Both present and pinned: both listed.
        let mut ring = a.public_armored();
        ring.extend(b.public_armored());
        let r = verify_inrelease(
            "InRelease",
            &signed,
            &ring,
            &[b.fingerprint(), a.fingerprint()],
        )
        .unwrap();
        let mut want = vec![a.fingerprint(), b.fingerprint()];
        want.sort();
        assert_eq!(r.signed_by, want);
    }

    #[test]
    fn key_expired_now_but_valid_at_signature_time_is_accepted() {
        let now = SystemTime::now();
        let day = Duration::from_secs(86400);
        // Created 10 days ago, valid for 5 days: expired 5 days ago.
        let key =
            testkit::generate_key_at("old <old@example.invalid>", now - 10 * day, Some(5 * day));
        let text = release_text("s", "c", DATE, &[]);
        // Signed 8 days ago, while the key was valid.
        let signed = testkit::clearsign_at(&key, &text, now - 8 * day);
        let r = verify_by(&key, "InRelease", &signed).unwrap();
        assert_eq!(r.signed_by, vec![key.fingerprint()]);
        // A signature made after the key expired is refused.
        let late = testkit::clearsign_at(&key, &text, now - 2 * day);
        let err = verify_by(&key, "InRelease", &late).unwrap_err();
        assert!(matches!(err, DebianError::NoValidSignature { .. }), "{err}");
        assert!(
            err.to_string().contains("not usable at signature time"),
            "{err}"
        );
    }

    #[test]
    fn parses_release_fields() {
        let text = "Origin: Debian\nLabel: Debian\nSuite: oldoldstable\nVersion: 11.11\nCodename: bullseye\nDate: Sat, 09 Aug 2025 09:16:30 UTC\nArchitectures: all amd64 arm64\nComponents: main contrib\nDescription: Debian 11.11\nMD5Sum:\n 7fdf4db15250af5368cc52a91e8edbce   738242 contrib/Contents-all\nSHA256:\n 3F00000000000000000000000000000000000000000000000000000000000001   738242 contrib/Contents-all\n 3f00000000000000000000000000000000000000000000000000000000000002       20 main/binary-amd64/Packages.xz\n";
        let r = parse_release("Release", text).unwrap();
        assert_eq!(r.origin.as_deref(), Some("Debian"));
        assert_eq!(r.version.as_deref(), Some("11.11"));
        assert_eq!(r.codename, "bullseye");
        assert_eq!(r.suite, "oldoldstable");
        assert_eq!(r.architectures, ["all", "amd64", "arm64"]);
        assert_eq!(r.components, ["main", "contrib"]);
        assert_eq!(r.source_date_epoch, 1754730990);
        assert_eq!(r.sha256.len(), 2);
        assert_eq!(
            r.sha256["contrib/Contents-all"].sha256,
            format!("3f{}1", "0".repeat(61))
        );
        assert_eq!(r.sha256["main/binary-amd64/Packages.xz"].size, 20);
    }

    #[test]
    fn release_errors_name_the_field() {
        let no_date = "Suite: s\nCodename: c\nSHA256:\n";
        let e = parse_release("dists/s/Release", no_date)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("dists/s/Release: Release field Date"), "{e}");
        let bad_date = "Suite: s\nCodename: c\nDate: yesterday\nSHA256:\n";
        let e = parse_release("dists/s/Release", bad_date)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"yesterday\""), "{e}");
        let bad_line = format!(
            "Suite: s\nCodename: c\nDate: {DATE}\nSHA256:\n {} 12\n",
            "a".repeat(64)
        );
        let e = parse_release("R", &bad_line).unwrap_err().to_string();
        assert!(e.contains("SHA256, line 2"), "{e}");
        let bad_hash = format!(
            "Suite: s\nCodename: c\nDate: {DATE}\nSHA256:\n {} 12 x\n",
            "g".repeat(64)
        );
        assert!(parse_release("R", &bad_hash).is_err());
        let no_sha = format!("Suite: s\nCodename: c\nDate: {DATE}\n");
        assert!(parse_release("R", &no_sha)
            .unwrap_err()
            .to_string()
            .contains("SHA256"));
    }

    #[test]
    fn rfc2822_dates() {
        assert_eq!(parse_rfc2822("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(
            parse_rfc2822("Sat, 09 Aug 2025 09:16:30 UTC"),
            Some(1754730990)
        );
        assert_eq!(parse_rfc2822("9 Aug 2025 09:16:30 GMT"), Some(1754730990));
        assert_eq!(
            parse_rfc2822("Sat, 09 Aug 2025 11:16:30 +0200"),
            Some(1754730990)
        );
        assert_eq!(
            parse_rfc2822("Sat, 14 Aug 2021 07:48:29 UTC"),
            Some(1628927309)
        );
        assert_eq!(parse_rfc2822("Tue, 29 Feb 2000 12:00 UTC"), Some(951825600));
        assert_eq!(parse_rfc2822("Tue, 30 Feb 2000 12:00:00 UTC"), None);
        assert_eq!(parse_rfc2822("Sat, 09 Foo 2025 09:16:30 UTC"), None);
        assert_eq!(parse_rfc2822("Sat, 09 Aug 2025 09:16:30 CEST"), None);
        assert_eq!(parse_rfc2822("2025-08-09T09:16:30Z"), None);
        assert_eq!(parse_rfc2822(""), None);
    }

    fn release_with(files: &[(&str, &[u8])]) -> Release {
        parse_release("R", &release_text("s", "c", DATE, files)).unwrap()
    }

    #[test]
    fn check_file_accepts_matching_bytes() {
        let r = release_with(&[("main/binary-amd64/Packages.xz", b"abc")]);
        check_file("main/binary-amd64/Packages.xz", b"abc", &r).unwrap();
        check_file("dists/s/main/binary-amd64/Packages.xz", b"abc", &r).unwrap();
    }

    #[test]
    fn check_file_refuses_hash_mismatch() {
        let r = release_with(&[("main/binary-amd64/Packages.xz", b"abc")]);
        let err = check_file("main/binary-amd64/Packages.xz", b"abd", &r).unwrap_err();
        let expected = hex::encode(Sha256::digest(b"abc"));
        let actual = hex::encode(Sha256::digest(b"abd"));
        assert_eq!(
            err.to_string(),
            format!(
                "main/binary-amd64/Packages.xz: sha256 mismatch against the signed Release: \
                 expected {expected} (3 bytes), got {actual} (3 bytes)"
            )
        );
        // Different content of another size: still named by both hashes.
        let err = check_file("main/binary-amd64/Packages.xz", b"abcd", &r).unwrap_err();
        let actual = hex::encode(Sha256::digest(b"abcd"));
        assert_eq!(
            err.to_string(),
            format!(
                "main/binary-amd64/Packages.xz: sha256 mismatch against the signed Release: \
                 expected {expected} (3 bytes), got {actual} (4 bytes)"
            )
        );
    }

    #[test]
    fn check_file_refuses_size_mismatch() {
        let mut r = release_with(&[("main/binary-amd64/Packages.xz", b"abc")]);
        r.sha256
            .get_mut("main/binary-amd64/Packages.xz")
            .unwrap()
            .size = 4;
        let err = check_file("main/binary-amd64/Packages.xz", b"abc", &r).unwrap_err();
        assert_eq!(
            err.to_string(),
            "main/binary-amd64/Packages.xz: size mismatch against the signed Release: \
             expected 4 bytes, got 3 bytes"
        );
    }

    #[test]
    fn check_file_refuses_unlisted_file() {
        let r = release_with(&[("main/binary-amd64/Packages.xz", b"abc")]);
        let err = check_file("main/binary-amd64/Packages.gz", b"abc", &r).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DebianError::NotInRelease { .. }));
        assert!(
            msg.starts_with("main/binary-amd64/Packages.gz: not listed in the signed Release"),
            "{msg}"
        );
    }

    /// The real bullseye InRelease (`RBUILD_REAL_INRELEASE`, else downloaded from the host's
    /// mirror), verified against the host's Debian archive keyring and against the keys
    /// committed under `recipes/keys/`. Without a mirror or the keyring: a skip, which fails
    /// under CI.
    #[test]
    fn real_bullseye_inrelease() {
        let host_ring = std::path::Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        if !host_ring.exists() {
            crate::skip::skip(
                "real_bullseye_inrelease",
                &format!("{} is absent", host_ring.display()),
                "install the Debian archive keyring (`apt install debian-archive-keyring`)",
            );
            return;
        }
        let Some((_, bytes)) = crate::mirror::real_archive_file(
            "real_bullseye_inrelease",
            "RBUILD_REAL_INRELEASE",
            "dists/bullseye/InRelease",
        ) else {
            return;
        };
        let pinned: Vec<String> = [
            "1F89983E0081FDE018F3CC9673A4F27B8DD47936", // Debian Archive Automatic Signing Key (11/bullseye)
            "AC530D520F2F3269F5E98313A48449044AAD5C5D", // Debian Security Archive Automatic Signing Key (11/bullseye)
            "A4285295FC7B1A81600062A9605C66F00D6C9793", // Debian Stable Release Key (11/bullseye)
        ]
        .map(str::to_owned)
        .to_vec();
        let ring = std::fs::read(host_ring).unwrap();
        let r = verify_inrelease("dists/bullseye/InRelease", &bytes, &ring, &pinned)
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(r.version.as_deref(), Some("11.11"));
        assert_eq!(r.codename, "bullseye");
        assert_eq!(r.date, "Sat, 09 Aug 2025 09:16:30 UTC");
        assert_eq!(r.source_date_epoch, 1754730990);
        assert!(r.sha256.contains_key("main/binary-amd64/Packages.xz"));
        // The archive key and the stable release key both signed it.
        assert!(
            r.signed_by.contains(&pinned[0]) && r.signed_by.contains(&pinned[2]),
            "{:?}",
            r.signed_by
        );

        // The committed key file and fingerprint list verify it too.
        let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("keys");
        if let (Ok(asc), Ok(fprs)) = (
            std::fs::read(keys.join("debian-bullseye-archive.asc")),
            std::fs::read_to_string(keys.join("debian-bullseye-archive.fingerprints")),
        ) {
            let committed: Vec<String> = fprs
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            assert_eq!(committed, pinned);
            let r2 = verify_inrelease("dists/bullseye/InRelease", &bytes, &asc, &committed)
                .map_err(|e| e.to_string())
                .unwrap();
            assert_eq!(r2, r);
        }

        // Pinned only to a key that did not sign it (trixie's archive key), it is refused; the
        // message names the signers (the bullseye archive signing subkey among them).
        let trixie = vec!["04B54C3CDCA79751B16BC6B5225629DF75B188BD".to_owned()];
        match verify_inrelease("dists/bullseye/InRelease", &bytes, &ring, &trixie) {
            Ok(r) => panic!(
                "accepted with an unrelated pinned key: signed_by {:?}",
                r.signed_by
            ),
            Err(e) => assert!(
                e.to_string()
                    .contains("A7236886F3CCCAAD148A27F80E98404D386FA1D9"),
                "{e}"
            ),
        }
        // The bookworm archive key also signed bullseye's InRelease: pinned alone, it verifies.
        let bookworm = vec!["B8B80B5B623EAB6AD8775C45B7C5D7D6350947F8".to_owned()];
        let r3 = verify_inrelease("dists/bullseye/InRelease", &bytes, &ring, &bookworm)
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(r3.signed_by, bookworm);
        // A one-byte change in the signed text is refused.
        let mut t = bytes.clone();
        let pos = t.windows(5).position(|w| w == b"11.11").unwrap();
        t[pos + 4] = b'2';
        assert!(
            verify_inrelease("dists/bullseye/InRelease", &t, &ring, &pinned).is_err(),
            "a tampered InRelease was accepted"
        );
    }
}
