//! P-256 private keys: generation, PKCS#8 round trips, key identifiers.

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};

/// Why a key could not be generated or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("generating a P-256 key: {0}")]
    Generate(rcgen::Error),
    #[error("not a P-256 PKCS#8 private key: {0}")]
    Parse(rcgen::Error),
    #[error("PEM: {0}")]
    Pem(#[from] pem::PemError),
}

/// An ECDSA P-256 private key. It lives in memory; only the authority persists its own keys.
pub struct PrivateKey {
    pair: KeyPair,
}

impl PrivateKey {
    /// A fresh random P-256 key.
    pub fn generate() -> Result<Self, KeyError> {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map(|pair| Self { pair })
            .map_err(KeyError::Generate)
    }

    /// Loads an unencrypted PKCS#8 DER key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.to_vec());
        KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ECDSA_P256_SHA256)
            .map(|pair| Self { pair })
            .map_err(KeyError::Parse)
    }

    /// Loads a PEM `PRIVATE KEY` block.
    pub fn from_pkcs8_pem(text: &str) -> Result<Self, KeyError> {
        Self::from_pkcs8_der(pem::parse(text)?.contents())
    }

    /// Unencrypted PKCS#8 DER, the form the Workload API hands to workloads.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        self.pair.serialize_der()
    }

    /// PEM `PRIVATE KEY`.
    pub fn pkcs8_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    /// SubjectPublicKeyInfo DER of the public half.
    pub fn spki_der(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    /// Uncompressed SEC1 public point (0x04 || X || Y).
    pub fn public_sec1(&self) -> Vec<u8> {
        self.pair.der_bytes().to_vec()
    }

    /// A stable key identifier: base64url of the first 16 bytes of SHA-256 over the SPKI.
    pub fn kid(&self) -> String {
        let d = digest::digest(&digest::SHA256, &self.spki_der());
        URL_SAFE_NO_PAD.encode(&d.as_ref()[..16])
    }

    pub(crate) fn rcgen(&self) -> &KeyPair {
        &self.pair
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("PrivateKey")
            .field("kid", &self.kid())
            .finish()
    }
}

/// `sha256:<lowercase hex>` of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(digest::digest(&digest::SHA256, data))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs8_round_trip_keeps_the_key() {
        let k = PrivateKey::generate().unwrap();
        let back = PrivateKey::from_pkcs8_pem(&k.pkcs8_pem()).unwrap();
        assert_eq!(k.spki_der(), back.spki_der());
        assert_eq!(k.kid(), back.kid());
        assert_eq!(k.public_sec1().len(), 65);
        assert_ne!(k.kid(), PrivateKey::generate().unwrap().kid());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            PrivateKey::from_pkcs8_der(b"nope"),
            Err(KeyError::Parse(_))
        ));
        assert!(PrivateKey::from_pkcs8_pem("-----BEGIN X-----\n").is_err());
    }
}
