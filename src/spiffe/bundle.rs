//! SPIFFE bundle documents (JWK Sets) as the Trust Domain and Bundle standard defines them.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

/// One JSON Web Key as it appears in a SPIFFE bundle or a JWKS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x5c: Option<Vec<String>>,
}

/// A JWT signing key: its `kid` and P-256 public point (uncompressed SEC1: 0x04 || X || Y).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    pub kid: String,
    pub public_sec1: Vec<u8>,
}

impl JwtKey {
    /// The key as an EC P-256 JWK with the given `use` (None for a plain JWKS).
    pub fn to_jwk(&self, use_: Option<&str>) -> Option<Jwk> {
        let (x, y) = ec_p256_coordinates(&self.public_sec1)?;
        Some(Jwk {
            kty: "EC".into(),
            use_: use_.map(str::to_owned),
            kid: Some(self.kid.clone()),
            crv: Some("P-256".into()),
            x: Some(URL_SAFE_NO_PAD.encode(x)),
            y: Some(URL_SAFE_NO_PAD.encode(y)),
            x5c: None,
        })
    }
}

/// A JWK Set (RFC 7517), optionally with the SPIFFE bundle members.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JwkSet {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_refresh_hint: Option<u64>,
    pub keys: Vec<Jwk>,
}

/// The public trust material of one trust domain: X.509 CA certificates and JWT keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpiffeBundle {
    /// DER CA certificates, each self-signed.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT-SVID signing keys.
    pub jwt_authorities: Vec<JwtKey>,
    /// Monotonic counter, bumped on every content change.
    pub sequence: u64,
    /// Suggested polling interval for federation peers, in seconds.
    pub refresh_hint_secs: u64,
}

impl SpiffeBundle {
    /// Concatenated DER CA certificates, as the Workload API X.509 bundle fields carry them.
    pub fn x509_der(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The JWT bundle as a plain JWKS (no `use`), as `FetchJWTBundles` carries it (SPIRE parity).
    pub fn jwks_json(&self) -> Vec<u8> {
        let set = JwkSet {
            keys: self
                .jwt_authorities
                .iter()
                .filter_map(|k| k.to_jwk(None))
                .collect(),
            ..JwkSet::default()
        };
        serde_json::to_vec(&set).expect("JWK set serializes")
    }

    /// The full SPIFFE bundle document: `x509-svid` entries with `x5c`, `jwt-svid` entries with `kid`.
    pub fn to_spiffe_json(&self, x509_keys: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        // x509_keys pairs each CA certificate with its public key point, for the JWK members.
        let mut keys = Vec::new();
        for (der, point) in x509_keys {
            let Some((x, y)) = ec_p256_coordinates(point) else {
                continue;
            };
            keys.push(Jwk {
                kty: "EC".into(),
                use_: Some("x509-svid".into()),
                kid: None,
                crv: Some("P-256".into()),
                x: Some(URL_SAFE_NO_PAD.encode(x)),
                y: Some(URL_SAFE_NO_PAD.encode(y)),
                x5c: Some(vec![STANDARD.encode(der)]),
            });
        }
        keys.extend(
            self.jwt_authorities
                .iter()
                .filter_map(|k| k.to_jwk(Some("jwt-svid"))),
        );
        let set = JwkSet {
            spiffe_sequence: (self.sequence > 0).then_some(self.sequence),
            spiffe_refresh_hint: (self.refresh_hint_secs > 0).then_some(self.refresh_hint_secs),
            keys,
        };
        serde_json::to_vec_pretty(&set).expect("bundle serializes")
    }

    /// Finds the JWT key with this `kid`.
    pub fn jwt_key(&self, kid: &str) -> Option<&JwtKey> {
        self.jwt_authorities.iter().find(|k| k.kid == kid)
    }
}

/// Largest bundle document accepted, in bytes; a real one is a few KiB.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;

/// Why a bundle document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle document is {0} bytes, over the limit of {MAX_BUNDLE_BYTES}")]
    TooLarge(usize),
    #[error("bundle document is not a JWK Set: {0}")]
    Json(String),
    #[error("key {index}: {reason}")]
    Key { index: usize, reason: String },
}

impl SpiffeBundle {
    /// Reads a SPIFFE bundle document or a plain JWKS (as `FetchJWTBundles` carries it).
    ///
    /// `x509-svid` entries contribute their single `x5c` certificate; `jwt-svid` entries and
    /// entries without `use` are JWT keys and must be EC P-256 with a `kid`. Entries with
    /// another `use` are skipped, as the bundle standard asks; a malformed entry of a known
    /// use is an error naming it, so a broken document never half-loads.
    pub fn from_json(doc: &[u8]) -> Result<Self, BundleError> {
        if doc.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(doc.len()));
        }
        let set: JwkSet =
            serde_json::from_slice(doc).map_err(|e| BundleError::Json(e.to_string()))?;
        let mut bundle = SpiffeBundle {
            sequence: set.spiffe_sequence.unwrap_or(0),
            refresh_hint_secs: set.spiffe_refresh_hint.unwrap_or(0),
            ..Default::default()
        };
        for (index, k) in set.keys.into_iter().enumerate() {
            let bad = |reason: &str| BundleError::Key {
                index,
                reason: reason.to_owned(),
            };
            match k.use_.as_deref() {
                Some("x509-svid") => {
                    let [cert] = k.x5c.as_deref().unwrap_or_default() else {
                        return Err(bad("an x509-svid entry must have exactly one x5c"));
                    };
                    let der = STANDARD
                        .decode(cert)
                        .map_err(|_| bad("x5c is not standard base64"))?;
                    bundle.x509_authorities.push(der);
                }
                None | Some("jwt-svid") => {
                    let kid = k
                        .kid
                        .filter(|k| !k.is_empty())
                        .ok_or_else(|| bad("a JWT key must have a kid"))?;
                    if k.kty != "EC" || k.crv.as_deref() != Some("P-256") {
                        return Err(bad(
                            "a JWT key must be EC P-256 (the only JWT-SVID key type served here)",
                        ));
                    }
                    let coordinate = |c: Option<String>| {
                        c.and_then(|c| URL_SAFE_NO_PAD.decode(c).ok())
                            .filter(|c| c.len() == 32)
                            .ok_or_else(|| bad("x and y must be 32-byte base64url coordinates"))
                    };
                    let mut public_sec1 = vec![0x04];
                    public_sec1.extend(coordinate(k.x)?);
                    public_sec1.extend(coordinate(k.y)?);
                    bundle.jwt_authorities.push(JwtKey { kid, public_sec1 });
                }
                Some(_) => {}
            }
        }
        Ok(bundle)
    }
}

/// Splits an uncompressed P-256 point into its coordinates.
fn ec_p256_coordinates(sec1: &[u8]) -> Option<(&[u8], &[u8])> {
    match sec1 {
        [0x04, rest @ ..] if rest.len() == 64 => Some(rest.split_at(32)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> JwtKey {
        let mut point = vec![0x04];
        point.extend([1u8; 32]);
        point.extend([2u8; 32]);
        JwtKey {
            kid: "k1".into(),
            public_sec1: point,
        }
    }

    #[test]
    fn jwks_has_kid_and_no_x509_entries() {
        let b = SpiffeBundle {
            jwt_authorities: vec![key()],
            x509_authorities: vec![vec![1, 2]],
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_slice(&b.jwks_json()).unwrap();
        let keys = v["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["kid"], "k1");
        assert_eq!(keys[0]["crv"], "P-256");
        assert!(keys[0].get("x5c").is_none());
        assert!(keys[0].get("use").is_none());
    }

    #[test]
    fn spiffe_bundle_document_rules() {
        let mut point = vec![0x04];
        point.extend([3u8; 64]);
        let b = SpiffeBundle {
            jwt_authorities: vec![key()],
            sequence: 3,
            refresh_hint_secs: 300,
            ..Default::default()
        };
        let v: serde_json::Value =
            serde_json::from_slice(&b.to_spiffe_json(&[(vec![9, 9, 9], point)])).unwrap();
        assert_eq!(v["spiffe_sequence"], 3);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        let keys = v["keys"].as_array().unwrap();
        let x509 = &keys[0];
        assert_eq!(x509["use"], "x509-svid");
        assert!(
            x509.get("kid").is_none(),
            "X5-41: no kid on x509-svid entries"
        );
        assert_eq!(
            x509["x5c"].as_array().unwrap().len(),
            1,
            "X5-42: exactly one x5c"
        );
        assert_eq!(x509["x5c"][0], "CQkJ", "standard base64");
        assert_eq!(keys[1]["use"], "jwt-svid");
        assert_eq!(keys[1]["kid"], "k1");
    }

    #[test]
    fn documents_read_back_and_garbage_is_refused() {
        let mut point = vec![0x04];
        point.extend([3u8; 64]);
        let b = SpiffeBundle {
            jwt_authorities: vec![key()],
            sequence: 3,
            refresh_hint_secs: 300,
            ..Default::default()
        };
        let doc = b.to_spiffe_json(&[(vec![9, 9, 9], point)]);
        let back = SpiffeBundle::from_json(&doc).unwrap();
        assert_eq!(back.jwt_authorities, b.jwt_authorities);
        assert_eq!(back.x509_authorities, vec![vec![9, 9, 9]]);
        assert_eq!((back.sequence, back.refresh_hint_secs), (3, 300));
        let jwks = SpiffeBundle::from_json(&b.jwks_json()).unwrap();
        assert_eq!(jwks.jwt_authorities, b.jwt_authorities);

        let refused = |doc: &str| {
            SpiffeBundle::from_json(doc.as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert!(refused("[1]").starts_with("bundle document is not a JWK Set"));
        assert!(
            refused(r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#)
                .contains("key 0: a JWT key must have a kid")
        );
        assert!(refused(r#"{"keys":[{"kty":"RSA","kid":"k"}]}"#).contains("EC P-256"));
        assert!(
            refused(r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k","x":"AA","y":"AA"}]}"#)
                .contains("32-byte")
        );
        assert!(
            refused(r#"{"keys":[{"kty":"EC","use":"x509-svid"}]}"#).contains("exactly one x5c")
        );
        // Keys of another use are skipped, not refused.
        let other =
            SpiffeBundle::from_json(br#"{"keys":[{"kty":"EC","use":"wit-svid"}]}"#).unwrap();
        assert!(other.jwt_authorities.is_empty());
        let big = vec![b' '; MAX_BUNDLE_BYTES + 1];
        assert!(matches!(
            SpiffeBundle::from_json(&big),
            Err(BundleError::TooLarge(_))
        ));
    }

    #[test]
    fn malformed_point_is_skipped() {
        let b = SpiffeBundle {
            jwt_authorities: vec![JwtKey {
                kid: "bad".into(),
                public_sec1: vec![4, 1, 2],
            }],
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_slice(&b.jwks_json()).unwrap();
        assert!(v["keys"].as_array().unwrap().is_empty());
    }
}
