//! Throwaway signed archives for tests: OpenPGP test keys (a primary key with a signing subkey),
//! cleartext signatures shaped like a Debian `InRelease`, `Release` bodies with a `SHA256`
//! section, and `Packages` stanzas. Nothing here is for production use: keys are generated fresh,
//! unprotected, and the functions panic on the (programming) errors they cannot recover from.

use std::io::Write;
use std::time::{Duration, SystemTime};

use sequoia_openpgp as openpgp;

use openpgp::cert::CertBuilder;
use openpgp::crypto::KeyPair;
use openpgp::packet::signature::SignatureBuilder;
use openpgp::serialize::stream::{Message, Signer};
use openpgp::serialize::SerializeInto;
use openpgp::types::SignatureType;
use openpgp::Cert;
use sha2::{Digest, Sha256};

/// A generated OpenPGP key: a certification-only primary key and one signing subkey, with
/// secrets.
#[derive(Clone)]
pub struct TestKey {
    /// The certificate, including its secret key material.
    pub cert: Cert,
}

impl TestKey {
    /// The primary key's fingerprint: uppercase hex, no spaces (what a recipe pins).
    pub fn fingerprint(&self) -> String {
        self.cert.fingerprint().to_hex()
    }

    /// The public certificate, ASCII-armored (what a recipe's keyring file holds).
    pub fn public_armored(&self) -> Vec<u8> {
        self.cert
            .armored()
            .to_vec()
            .expect("serializing a freshly generated certificate")
    }

    /// The signing subkey's fingerprint, as a signature names its issuer.
    pub fn subkey_fingerprint(&self) -> String {
        self.cert
            .keys()
            .subkeys()
            .next()
            .expect("a test key has a signing subkey")
            .key()
            .fingerprint()
            .to_hex()
    }

    fn signing_keypair(&self) -> KeyPair {
        let ka = self
            .cert
            .keys()
            .subkeys()
            .secret()
            .next()
            .expect("a test key has a signing subkey");
        ka.key()
            .clone()
            .into_keypair()
            .expect("a test key's secret is unencrypted")
    }
}

/// Generate a key for `userid`, created a minute ago and never expiring.
pub fn generate_key(userid: &str) -> TestKey {
    generate_key_at(userid, SystemTime::now() - Duration::from_secs(60), None)
}

/// Generate a key for `userid` created at `created`, expiring `validity` after that (if given).
pub fn generate_key_at(userid: &str, created: SystemTime, validity: Option<Duration>) -> TestKey {
    let (cert, _revocation) = CertBuilder::new()
        .set_creation_time(created)
        .set_validity_period(validity)
        .add_userid(userid)
        .add_signing_subkey()
        .generate()
        .expect("generating a test key");
    TestKey { cert }
}

/// Cleartext-sign `text` with `key`'s signing subkey, now, as Debian signs an `InRelease`.
pub fn clearsign(key: &TestKey, text: &str) -> Vec<u8> {
    clearsign_many(&[key], text, SystemTime::now())
}

/// Like [`clearsign`], with the signature made at `time`. The key is used whether or not it is
/// valid at `time`, so tests can also make signatures a verifier must refuse.
pub fn clearsign_at(key: &TestKey, text: &str, time: SystemTime) -> Vec<u8> {
    clearsign_many(&[key], text, time)
}

/// Cleartext-sign `text` with several keys at `time` (one armored block of signatures, like a
/// real Debian `InRelease`).
///
/// # Panics
/// If `keys` is empty.
pub fn clearsign_many(keys: &[&TestKey], text: &str, time: SystemTime) -> Vec<u8> {
    let (first, rest) = keys.split_first().expect("at least one signing key");
    let mut sink = Vec::new();
    {
        let message = Message::new(&mut sink);
        let mut signer = Signer::with_template(
            message,
            first.signing_keypair(),
            SignatureBuilder::new(SignatureType::Text),
        )
        .expect("signer");
        for k in rest {
            signer = signer
                .add_signer(k.signing_keypair())
                .expect("adding a signer");
        }
        let mut w = signer
            .creation_time(time)
            .cleartext()
            .build()
            .expect("building the cleartext signer");
        w.write_all(text.as_bytes())
            .expect("writing the signed text");
        w.finalize().expect("finishing the signature");
    }
    sink
}

/// The body of a `Release` file for `suite`/`codename` dated `date` (RFC 2822, e.g.
/// `Sat, 09 Aug 2025 09:16:30 UTC`), with a `SHA256` entry for each `(path, bytes)`.
pub fn release_text(suite: &str, codename: &str, date: &str, files: &[(&str, &[u8])]) -> String {
    let mut s = format!(
        "Origin: rbuild-test\nLabel: rbuild-test\nSuite: {suite}\nVersion: 1.0\nCodename: {codename}\nDate: {date}\n\
         Architectures: amd64\nComponents: main\nDescription: rbuild test archive\nSHA256:\n"
    );
    for (path, bytes) in files {
        s.push_str(&format!(
            " {} {:>16} {path}\n",
            hex::encode(Sha256::digest(bytes)),
            bytes.len()
        ));
    }
    s
}

/// One `Packages` stanza (ending in a newline; separate stanzas with an empty line). An empty
/// `priority` or `depends` leaves that field out.
#[allow(clippy::too_many_arguments)]
pub fn packages_stanza(
    name: &str,
    version: &str,
    arch: &str,
    priority: &str,
    essential: bool,
    depends: &str,
    filename: &str,
    deb_bytes: &[u8],
) -> String {
    let mut s = format!("Package: {name}\nVersion: {version}\nArchitecture: {arch}\n");
    if essential {
        s.push_str("Essential: yes\n");
    }
    s.push_str("Maintainer: rbuild tests <test@example.invalid>\n");
    if !depends.is_empty() {
        s.push_str(&format!("Depends: {depends}\n"));
    }
    s.push_str(&format!(
        "Description: rbuild test package {name}\n A package made by rbuild's tests.\n .\n It has a multi-line description.\n"
    ));
    if !priority.is_empty() {
        s.push_str(&format!("Priority: {priority}\n"));
    }
    s.push_str("Section: misc\n");
    s.push_str(&format!(
        "Filename: {filename}\nSize: {}\nSHA256: {}\n",
        deb_bytes.len(),
        hex::encode(Sha256::digest(deb_bytes))
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::debian::{packages, release};

    #[test]
    fn key_shape() {
        let k = generate_key("t <t@example.invalid>");
        let fpr = k.fingerprint();
        assert!(
            fpr.len() == 40
                && fpr
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()),
            "{fpr}"
        );
        assert_eq!(k.cert.keys().subkeys().count(), 1);
        let armored = String::from_utf8(k.public_armored()).unwrap();
        assert!(
            armored.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"),
            "{armored}"
        );
        // No secrets in the public export.
        let back = Cert::from_bytes(armored.as_bytes()).unwrap();
        assert!(!back.is_tsk());
        assert_eq!(back.fingerprint().to_hex(), fpr);
    }

    use openpgp::parse::Parse;

    #[test]
    fn clearsign_shape() {
        let k = generate_key("t <t@example.invalid>");
        let s = String::from_utf8(clearsign(&k, "Suite: x\n-dash line\n")).unwrap();
        assert!(
            s.starts_with("-----BEGIN PGP SIGNED MESSAGE-----\nHash: "),
            "{s}"
        );
        assert!(s.contains("\n- -dash line\n"), "dash-escaped: {s}");
        assert!(s.contains("-----BEGIN PGP SIGNATURE-----"), "{s}");
    }

    #[test]
    fn release_and_stanza_parse_back() {
        let deb = b"!<arch>\nfake";
        let stanza = packages_stanza(
            "hello",
            "1:2.0-1",
            "amd64",
            "required",
            true,
            "libc6 (>= 2.31) | libc7",
            "pool/main/h/hello.deb",
            deb,
        );
        let pkgs = packages::parse_packages("Packages", &stanza).unwrap();
        assert_eq!(pkgs.len(), 1);
        let p = &pkgs[0];
        assert_eq!(
            (p.name.as_str(), p.version.as_str(), p.architecture.as_str()),
            ("hello", "1:2.0-1", "amd64")
        );
        assert!(p.essential);
        assert_eq!(p.priority.as_deref(), Some("required"));
        assert_eq!(p.depends.len(), 1);
        assert_eq!(p.depends[0].len(), 2);
        assert_eq!(p.size, deb.len() as u64);
        assert_eq!(p.sha256, hex::encode(Sha256::digest(deb)));

        let text = release_text(
            "s",
            "c",
            "Sat, 09 Aug 2025 09:16:30 UTC",
            &[("main/binary-amd64/Packages", stanza.as_bytes())],
        );
        let r = release::parse_release("Release", &text).unwrap();
        release::check_file("main/binary-amd64/Packages", stanza.as_bytes(), &r).unwrap();
        assert_eq!(r.source_date_epoch, 1754730990);
    }
}
