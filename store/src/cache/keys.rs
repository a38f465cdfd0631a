//! The ed25519 keys entries are signed with (`NAME:BASE64` files, as nix-store's).

use std::fs;
use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use ed25519_dalek::{Signer, Verifier};

use super::{io, CacheError, EntryBody, Signature};

/// A key pair's secret half, `NAME:BASE64(seed)` on disk (like nix-store's key files).
pub struct SecretKey {
    pub name: String,
    pub(crate) key: ed25519_dalek::SigningKey,
}

/// A trusted public key, `NAME:BASE64(key)`.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub name: String,
    pub(crate) key: ed25519_dalek::VerifyingKey,
}

pub(crate) fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

pub(crate) fn split_key<'a>(path: &str, text: &'a str) -> Result<(&'a str, Vec<u8>), CacheError> {
    let (name, data) = text.trim().split_once(':').ok_or_else(|| CacheError::Key {
        path: path.to_owned(),
        msg: "expected NAME:BASE64".into(),
    })?;
    let bytes = b64().decode(data).map_err(|source| CacheError::KeyBase64 {
        path: path.to_owned(),
        source,
    })?;
    Ok((name, bytes))
}

impl SecretKey {
    /// A new random key named `name`.
    pub fn generate(name: &str) -> Result<SecretKey, CacheError> {
        let mut seed = [0u8; 32];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(io("/dev/urandom"))?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    pub fn parse(path: &str, text: &str) -> Result<SecretKey, CacheError> {
        let (name, bytes) = split_key(path, text)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| CacheError::Key {
            path: path.to_owned(),
            msg: "a secret key is 32 bytes".into(),
        })?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    pub fn read(path: &Path) -> Result<SecretKey, CacheError> {
        let text = fs::read_to_string(path).map_err(io(path.display()))?;
        SecretKey::parse(&path.display().to_string(), &text)
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, b64().encode(self.key.to_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// An ed25519 signature of `message`.
    pub fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).to_bytes().to_vec()
    }

    pub fn sign(&self, body: &EntryBody) -> Signature {
        Signature {
            key: self.name.clone(),
            sig: b64().encode(self.key.sign(&body.signed_bytes()).to_bytes()),
        }
    }
}

impl PublicKey {
    pub fn parse(path: &str, text: &str) -> Result<PublicKey, CacheError> {
        let (name, bytes) = split_key(path, text)?;
        let raw: [u8; 32] = bytes.try_into().map_err(|_| CacheError::Key {
            path: path.to_owned(),
            msg: "a public key is 32 bytes".into(),
        })?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|source| {
            CacheError::KeyInvalid {
                path: path.to_owned(),
                source,
            }
        })?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    /// A key given as a file holding `NAME:BASE64`, or as that text itself.
    pub fn load(arg: &str) -> Result<PublicKey, CacheError> {
        match fs::read_to_string(arg) {
            Ok(text) => PublicKey::parse(arg, &text),
            Err(_) => PublicKey::parse("trusted key", arg),
        }
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, b64().encode(self.key.to_bytes()))
    }

    /// Whether `sig` is this key's ed25519 signature of `message`.
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        ed25519_dalek::Signature::from_slice(sig)
            .is_ok_and(|s| self.key.verify(message, &s).is_ok())
    }

    /// The raw 32-byte public key.
    pub fn raw(&self) -> [u8; 32] {
        self.key.to_bytes()
    }
}
