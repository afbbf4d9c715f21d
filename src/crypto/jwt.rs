//! JWS compact tokens: signing JWT-SVIDs with ES256 and validating them against JWT bundles.
//!
//! Validation follows JS-20..JS-27: the `alg` is checked against the JWT-SVID list before
//! anything else, the key is looked up by `kid` in the bundle of the trust domain of `sub`
//! only, and `aud`, `exp` and `nbf` are enforced. A token without `kid` is refused, like SPIRE
//! does: every real client needs it, and trying every key would hide misconfiguration.

use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;
use serde_json::{Map, Value};

use super::keys::PrivateKey;
use crate::spiffe::{SpiffeBundle, SpiffeId, TrustDomain};

/// Algorithms the JWT-SVID standard allows (JS-03). Anything else is refused before parsing.
pub const ALLOWED_ALGS: [&str; 9] = [
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];

/// Clock leeway for `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// Why a token could not be signed or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("token is not in JWS compact form (three base64url parts)")]
    Malformed,
    #[error("token header is not valid JSON: {0}")]
    BadHeader(String),
    #[error("algorithm {0:?} is not allowed for JWT-SVIDs")]
    AlgNotAllowed(String),
    #[error("typ {0:?} is not allowed (only JWT or JOSE)")]
    BadTyp(String),
    #[error("token has no kid; agentid requires one to select the signing key")]
    MissingKid,
    #[error("sub is missing or not a SPIFFE ID: {0}")]
    BadSubject(String),
    #[error("no JWT bundle for trust domain {0}")]
    NoBundle(TrustDomain),
    #[error("key {kid:?} is not in the JWT bundle of {td}")]
    UnknownKid { kid: String, td: TrustDomain },
    #[error("key {kid:?} cannot verify {alg}")]
    KeyAlgMismatch { kid: String, alg: String },
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("audience {0:?} is not in the token's aud")]
    WrongAudience(String),
    #[error("required claim {0} is missing")]
    MissingClaim(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("token is invalid: {0}")]
    Invalid(String),
    #[error("signing: {0}")]
    Sign(String),
}

/// An ES256 signing key with its `kid`.
pub struct JwtSigner {
    key: PrivateKey,
    kid: String,
    encoding: EncodingKey,
}

impl JwtSigner {
    /// Wraps a P-256 key; the `kid` is derived from its public key.
    pub fn new(key: PrivateKey) -> Self {
        let encoding = EncodingKey::from_ec_der(&key.pkcs8_der());
        Self {
            kid: key.kid(),
            key,
            encoding,
        }
    }

    /// The key identifier published in the JWT bundle.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key (persisted by the authority).
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// Signs `claims` with header `{alg: ES256, kid, typ}` and nothing else (JS-02).
    pub fn sign<T: Serialize>(&self, typ: &str, claims: &T) -> Result<String, JwtError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some(typ.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| JwtError::Sign(e.to_string()))
    }
}

/// The claims of a JWT-SVID that agentid issues.
#[derive(Debug, Clone, Serialize)]
pub struct JwtSvidClaims {
    pub sub: String,
    /// Always an array of exactly the requested audiences (JS-07).
    pub aud: Vec<String>,
    /// Integer NumericDate (JS-09).
    pub exp: i64,
    pub iat: i64,
    pub iss: String,
    pub jti: String,
    /// Extra namespaced claims (the composite identity object).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A validated token: its subject and full claim set.
#[derive(Debug, Clone)]
pub struct Validated {
    pub spiffe_id: SpiffeId,
    pub claims: Map<String, Value>,
}

/// Validates a JWT-SVID for `audience`. `bundle_for` yields the bundle of a trust domain, if trusted.
pub fn validate_jwt_svid<'b>(
    token: &str,
    audience: &str,
    bundle_for: impl Fn(&TrustDomain) -> Option<&'b SpiffeBundle>,
) -> Result<Validated, JwtError> {
    validate(token, &["JWT", "JOSE"], audience, bundle_for)
}

/// Validates any agentid-signed JWS token whose `sub` is a SPIFFE ID and whose `typ` is one of `typs`.
pub fn validate<'b>(
    token: &str,
    typs: &[&str],
    audience: &str,
    bundle_for: impl Fn(&TrustDomain) -> Option<&'b SpiffeBundle>,
) -> Result<Validated, JwtError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, payload_b64, _sig] = parts.as_slice() else {
        return Err(JwtError::Malformed);
    };
    let header = decode_json(header_b64).map_err(JwtError::BadHeader)?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if !ALLOWED_ALGS.contains(&alg) {
        return Err(JwtError::AlgNotAllowed(alg.to_owned()));
    }
    if let Some(typ) = header.get("typ") {
        let typ = typ.as_str().unwrap_or("");
        if !typs.contains(&typ) {
            return Err(JwtError::BadTyp(typ.to_owned()));
        }
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingKid)?;
    // The signature is checked with the key of the trust domain named by `sub`, so `sub` is
    // read before the signature is verified; nothing else is trusted until it is.
    let unverified = decode_json(payload_b64).map_err(|_| JwtError::Malformed)?;
    let sub = unverified
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::BadSubject("missing".into()))?;
    let spiffe_id: SpiffeId = sub
        .parse()
        .map_err(|e| JwtError::BadSubject(format!("{sub}: {e}")))?;
    let td = spiffe_id.trust_domain();
    let bundle = bundle_for(td).ok_or_else(|| JwtError::NoBundle(td.clone()))?;
    let decoding = es256_key(bundle, kid, alg).map_err(|e| match e {
        KeyLookup::UnknownKid => JwtError::UnknownKid {
            kid: kid.into(),
            td: td.clone(),
        },
        KeyLookup::AlgMismatch => JwtError::KeyAlgMismatch {
            kid: kid.into(),
            alg: alg.into(),
        },
    })?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    validation.set_audience(&[audience]);
    validation.required_spec_claims =
        HashSet::from(["exp".to_owned(), "aud".to_owned(), "sub".to_owned()]);
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &decoding, &validation)
        .map_err(map_jwt_error(audience))?;
    Ok(Validated {
        spiffe_id,
        claims: data.claims,
    })
}

fn map_jwt_error(audience: &str) -> impl Fn(jsonwebtoken::errors::Error) -> JwtError + '_ {
    use jsonwebtoken::errors::ErrorKind;
    move |e| match e.kind() {
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidAudience => JwtError::WrongAudience(audience.to_owned()),
        ErrorKind::MissingRequiredClaim(c) => JwtError::MissingClaim(c.clone()),
        ErrorKind::InvalidSignature => JwtError::BadSignature,
        _ => JwtError::Invalid(e.to_string()),
    }
}

/// Why no verification key was found for a token's `kid` and `alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyLookup {
    UnknownKid,
    AlgMismatch,
}

/// The key `kid` names in `bundle`, for a token signed with `alg`. Our bundles hold P-256
/// keys only, so anything but ES256 is a mismatch.
pub(crate) fn es256_key(
    bundle: &SpiffeBundle,
    kid: &str,
    alg: &str,
) -> Result<DecodingKey, KeyLookup> {
    let key = bundle.jwt_key(kid).ok_or(KeyLookup::UnknownKid)?;
    if alg != "ES256" {
        return Err(KeyLookup::AlgMismatch);
    }
    let jwk = key.to_jwk(None).ok_or(KeyLookup::AlgMismatch)?;
    DecodingKey::from_ec_components(
        jwk.x.as_deref().unwrap_or(""),
        jwk.y.as_deref().unwrap_or(""),
    )
    .map_err(|_| KeyLookup::AlgMismatch)
}

/// One base64url part of a JWS, as a JSON object.
pub(crate) fn decode_json(part: &str) -> Result<Map<String, Value>, String> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::JwtKey;

    struct Fixture {
        signer: JwtSigner,
        bundle: SpiffeBundle,
        td: TrustDomain,
    }

    fn fixture() -> Fixture {
        let signer = JwtSigner::new(PrivateKey::generate().unwrap());
        let bundle = SpiffeBundle {
            jwt_authorities: vec![JwtKey {
                kid: signer.kid().into(),
                public_sec1: signer.key().public_sec1(),
            }],
            ..Default::default()
        };
        Fixture {
            signer,
            bundle,
            td: TrustDomain::new("example.org").unwrap(),
        }
    }

    fn claims(exp_offset: i64) -> JwtSvidClaims {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        JwtSvidClaims {
            sub: "spiffe://example.org/w".into(),
            aud: vec!["a".into()],
            exp: now + exp_offset,
            iat: now,
            iss: "spiffe://example.org".into(),
            jti: "j".into(),
            extra: Map::new(),
        }
    }

    fn check(f: &Fixture, token: &str, aud: &str) -> Result<Validated, JwtError> {
        validate_jwt_svid(token, aud, |td| (td == &f.td).then_some(&f.bundle))
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn round_trip_and_header_shape() {
        let f = fixture();
        let t = f.signer.sign("JWT", &claims(300)).unwrap();
        let header = decode_json(t.split('.').next().unwrap()).unwrap();
        let keys: Vec<&str> = header.keys().map(String::as_str).collect();
        assert_eq!(keys, ["alg", "kid", "typ"], "JS-02");
        let v = check(&f, &t, "a").unwrap();
        assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/w");
        assert!(v.claims["exp"].is_i64(), "JS-09 integer exp");
    }

    #[test]
    fn refusals() {
        let f = fixture();
        let good = f.signer.sign("JWT", &claims(300)).unwrap();
        assert!(matches!(
            check(&f, &good, "b"),
            Err(JwtError::WrongAudience(_))
        ));
        let expired = f.signer.sign("JWT", &claims(-120)).unwrap();
        assert!(matches!(check(&f, &expired, "a"), Err(JwtError::Expired)));
        let bad_typ = f.signer.sign("at+jwt", &claims(300)).unwrap();
        assert!(matches!(check(&f, &bad_typ, "a"), Err(JwtError::BadTyp(_))));

        let parts: Vec<&str> = good.split('.').collect();
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "kid": f.signer.kid()})),
            parts[1]
        );
        assert!(matches!(check(&f, &none, "a"), Err(JwtError::AlgNotAllowed(a)) if a == "none"));
        let hs = format!(
            "{}.{}.{}",
            b64(&serde_json::json!({"alg": "HS256", "kid": f.signer.kid()})),
            parts[1],
            parts[2]
        );
        assert!(matches!(check(&f, &hs, "a"), Err(JwtError::AlgNotAllowed(a)) if a == "HS256"));
        let no_kid = format!(
            "{}.{}.{}",
            b64(&serde_json::json!({"alg": "ES256"})),
            parts[1],
            parts[2]
        );
        assert!(matches!(check(&f, &no_kid, "a"), Err(JwtError::MissingKid)));

        // Edited payload: the signature no longer covers it.
        let mut c = claims(300);
        c.sub = "spiffe://example.org/other".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(&serde_json::to_value(&c).unwrap()),
            parts[2]
        );
        assert!(matches!(
            check(&f, &forged, "a"),
            Err(JwtError::BadSignature)
        ));

        // Signed by a key that is not in the bundle.
        let stranger = JwtSigner::new(PrivateKey::generate().unwrap());
        let t = stranger.sign("JWT", &claims(300)).unwrap();
        assert!(matches!(
            check(&f, &t, "a"),
            Err(JwtError::UnknownKid { .. })
        ));

        // A subject in a trust domain with no bundle is untrusted (JS-21).
        let mut c = claims(300);
        c.sub = "spiffe://other.org/w".into();
        let t = f.signer.sign("JWT", &c).unwrap();
        assert!(matches!(check(&f, &t, "a"), Err(JwtError::NoBundle(_))));

        assert!(matches!(check(&f, "a.b", "a"), Err(JwtError::Malformed)));
    }
}
