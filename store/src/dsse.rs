//! DSSE envelopes, the signature wrapper of in-toto attestations: a payload and its type,
//! signed over DSSE's pre-authentication encoding (PAE) with the ed25519 keys binary caches use
//! (`rbuild key generate`). A signature is not reproducible content, so it never enters an
//! output: it is made by `rbuild attest` from one.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::cache::{PublicKey, SecretKey};

/// The payload type of an in-toto statement.
pub const IN_TOTO: &str = "application/vnd.in-toto+json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub payload_type: String,
    /// Base64 (standard, padded) of the payload.
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// The signing key's name.
    pub keyid: String,
    /// Base64 of the ed25519 signature of the PAE.
    pub sig: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DsseError {
    #[error("the payload is not valid base64: {0}")]
    Payload(base64::DecodeError),
    #[error("no signature by a trusted key verifies (signed by: {signed_by}; trusted: {trusted})")]
    Untrusted { signed_by: String, trusted: String },
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// DSSE's pre-authentication encoding: `DSSEv1 LEN(type) type LEN(body) body`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// `payload` of `payload_type`, signed by `key`.
pub fn sign(payload_type: &str, payload: &[u8], key: &SecretKey) -> Envelope {
    let sig = key.sign_bytes(&pae(payload_type, payload));
    Envelope {
        payload_type: payload_type.to_owned(),
        payload: b64().encode(payload),
        signatures: vec![EnvelopeSignature {
            keyid: key.name.clone(),
            sig: b64().encode(sig),
        }],
    }
}

/// The payload, if a signature by one of `trusted` (matched by name) verifies over the PAE of
/// the envelope's type and payload.
pub fn verify(envelope: &Envelope, trusted: &[PublicKey]) -> Result<Vec<u8>, DsseError> {
    let payload = b64()
        .decode(&envelope.payload)
        .map_err(DsseError::Payload)?;
    let message = pae(&envelope.payload_type, &payload);
    for s in &envelope.signatures {
        let Ok(sig) = b64().decode(&s.sig) else {
            continue;
        };
        if trusted
            .iter()
            .any(|k| k.name == s.keyid && k.verifies(&message, &sig))
        {
            return Ok(payload);
        }
    }
    Err(DsseError::Untrusted {
        signed_by: envelope
            .signatures
            .iter()
            .map(|s| s.keyid.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        trusted: trusted
            .iter()
            .map(|k| k.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_is_dsse_v1() {
        // The example of the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn signed_envelopes_verify_and_altered_ones_do_not() {
        let key = SecretKey::generate("alice-1").unwrap();
        let other = SecretKey::generate("alice-1").unwrap();
        let env = sign(IN_TOTO, b"{\"a\":1}", &key);
        assert_eq!(verify(&env, &[key.public()]).unwrap(), b"{\"a\":1}");
        // Another key of the same name, a changed payload, a changed type: refused.
        assert!(verify(&env, &[other.public()]).is_err());
        let mut changed = env.clone();
        changed.payload = b64().encode(b"{\"a\":2}");
        assert!(verify(&changed, &[key.public()]).is_err());
        let mut retyped = env.clone();
        retyped.payload_type = "text/plain".into();
        assert!(verify(&retyped, &[key.public()]).is_err());
    }
}
