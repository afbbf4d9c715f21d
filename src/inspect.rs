//! Offline decoding of SVIDs for people and scripts (`agentid x509 inspect`, `agentid jwt
//! inspect`): what a certificate or token says, including its composite identity.
//!
//! Nothing here verifies a signature or a chain; it only decodes, and says so. Pure: the
//! caller passes the input and the current time.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde_json::{Map, Value};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::composite::{self, CompositeError, CompositeIdentity};
use crate::crypto::x509::split_der_chain;
use crate::spiffe::{IdError, SpiffeId};

/// Why the input could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("the input is empty")]
    Empty,
    #[error("the input is neither PEM nor a DER certificate: {0}")]
    NotCertificate(String),
    #[error("the PEM input holds no CERTIFICATE block (found: {0})")]
    NoCertificateBlock(String),
    #[error("certificate {index} of the input does not parse: {reason}")]
    BadCertificate { index: usize, reason: String },
    #[error("the leaf certificate has no URI SAN, so it is not an X509-SVID")]
    NoUriSan,
    #[error("the leaf certificate has {0} URI SANs; an X509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("the leaf's URI SAN {uri:?} is not a SPIFFE ID: {reason}")]
    BadSpiffeId { uri: String, reason: IdError },
    #[error("composite identity: {0}")]
    Composite(#[from] CompositeError),
    #[error("not a JWS compact token: expected three base64url parts separated by '.', found {0}")]
    JwsParts(usize),
    #[error("token {part}: {reason}")]
    JwsPart { part: &'static str, reason: String },
    #[error("claim {claim}: {reason}")]
    BadClaim { claim: &'static str, reason: String },
}

/// Where a validity window stands at the time of inspection.
#[derive(Debug, Clone, Serialize)]
pub struct Validity {
    /// `valid`, `expired` or `not yet valid`.
    pub status: &'static str,
    /// Seconds until the end of the window; negative once it has passed.
    pub remaining_secs: i64,
    /// The same in words: `valid, expires in 59m 50s`, `expired 3m ago`,
    /// `not yet valid, starts in 10s`.
    pub text: String,
}

/// The composite identity an SVID carries, as decoded.
#[derive(Debug, Clone, Serialize)]
pub struct CompositeReport {
    pub cid: String,
    /// Decoding recomputes the `cid` from the attributes and refuses a mismatch, so a report
    /// exists only for an identity that re-verified.
    pub cid_verified: bool,
    pub object: CompositeIdentity,
}

/// What `agentid x509 inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct X509Report {
    pub spiffe_id: SpiffeId,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub validity: Validity,
    pub issuer: String,
    pub key_type: String,
    pub is_ca: bool,
    /// Certificates in the input; the first is the one described.
    pub chain_length: usize,
    pub composite: Option<CompositeReport>,
    /// Always false: inspection decodes, it does not check the signature or chain.
    pub signature_verified: bool,
}

/// What `agentid jwt inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct JwtReport {
    pub alg: Option<String>,
    pub kid: Option<String>,
    pub typ: Option<String>,
    pub sub: Option<String>,
    pub aud: Vec<String>,
    pub iss: Option<String>,
    pub jti: Option<String>,
    pub issued_at: Option<String>,
    pub expires_at: Option<String>,
    /// Absent when the token has no `exp`.
    pub validity: Option<Validity>,
    pub composite: Option<CompositeReport>,
    /// Every claim as carried, for scripts that want more than the above.
    pub claims: Map<String, Value>,
    /// Always false: see [`JWT_NOT_VERIFIED`].
    pub signature_verified: bool,
}

/// What `jwt inspect` prints about the signature.
pub const JWT_NOT_VERIFIED: &str = "signature not verified; use `agentid jwt validate`";
/// What `x509 inspect` prints about the signature.
pub const X509_NOT_VERIFIED: &str =
    "signature and chain not verified; use `openssl verify -CAfile bundle.pem`";

/// Decodes PEM (one or more certificates, leaf first) or DER (one or more concatenated).
pub fn inspect_x509(input: &[u8], now: i64) -> Result<X509Report, InspectError> {
    let ders = certificates(input)?;
    // Every certificate must parse, so a broken chain is not reported as a good leaf.
    let mut certs = Vec::with_capacity(ders.len());
    for (i, der) in ders.iter().enumerate() {
        let bad = |reason: String| InspectError::BadCertificate {
            index: i + 1,
            reason,
        };
        match X509Certificate::from_der(der) {
            Ok(([], cert)) => certs.push(cert),
            Ok(_) => return Err(bad("trailing bytes after the certificate".into())),
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    let (Some(leaf_der), Some(cert)) = (ders.first(), certs.first()) else {
        return Err(InspectError::Empty);
    };
    let bad_leaf = |reason: String| InspectError::BadCertificate { index: 1, reason };
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad_leaf(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [] => return Err(InspectError::NoUriSan),
        [one] => *one,
        many => return Err(InspectError::UriSanCount(many.len())),
    };
    let spiffe_id = uri.parse().map_err(|reason| InspectError::BadSpiffeId {
        uri: uri.to_owned(),
        reason,
    })?;
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| bad_leaf(e.to_string()))?
        .is_some_and(|bc| bc.value.ca);
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    let composite = composite::from_certificate(leaf_der)?.map(report_composite);
    Ok(X509Report {
        spiffe_id,
        serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
        not_before: rfc3339(not_before),
        not_after: rfc3339(not_after),
        validity: validity(now, Some(not_before), not_after),
        issuer: cert.issuer().to_string(),
        key_type: key_type(cert),
        is_ca,
        chain_length: ders.len(),
        composite,
        signature_verified: false,
    })
}

/// Decodes a JWS compact token's header and claims without verifying it.
pub fn inspect_jwt(token: &str, now: i64) -> Result<JwtReport, InspectError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(InspectError::Empty);
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts.as_slice() else {
        return Err(InspectError::JwsParts(parts.len()));
    };
    let header = json_part("header", header)?;
    let claims = json_part("payload", payload)?;
    URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|e| InspectError::JwsPart {
            part: "signature",
            reason: format!("not base64url: {e}"),
        })?;
    let text = |m: &Map<String, Value>, k: &'static str, what: &'static str| match m.get(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(InspectError::JwsPart {
            part: what,
            reason: format!("{k} is not a string"),
        }),
    };
    let claim_text = |k: &'static str| {
        text(&claims, k, "payload").map_err(|_| InspectError::BadClaim {
            claim: k,
            reason: "not a string".into(),
        })
    };
    let aud = match claims.get("aud") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| InspectError::BadClaim {
                claim: "aud",
                reason: "not a string or an array of strings".into(),
            })?,
        Some(_) => {
            return Err(InspectError::BadClaim {
                claim: "aud",
                reason: "not a string or an array of strings".into(),
            });
        }
    };
    let iat = numeric_date(&claims, "iat")?;
    let exp = numeric_date(&claims, "exp")?;
    let nbf = numeric_date(&claims, "nbf")?;
    let composite = composite::from_jwt_claims(&claims)?.map(report_composite);
    Ok(JwtReport {
        alg: text(&header, "alg", "header")?,
        kid: text(&header, "kid", "header")?,
        typ: text(&header, "typ", "header")?,
        sub: claim_text("sub")?,
        aud,
        iss: claim_text("iss")?,
        jti: claim_text("jti")?,
        issued_at: iat.map(rfc3339),
        expires_at: exp.map(rfc3339),
        validity: exp.map(|exp| validity(now, nbf, exp)),
        composite,
        claims,
        signature_verified: false,
    })
}

/// The DER certificates in `input`, PEM or DER.
fn certificates(input: &[u8]) -> Result<Vec<Vec<u8>>, InspectError> {
    if input.iter().all(u8::is_ascii_whitespace) {
        return Err(InspectError::Empty);
    }
    if input.windows(11).any(|w| w == b"-----BEGIN ") {
        let blocks = pem::parse_many(input)
            .map_err(|e| InspectError::NotCertificate(format!("bad PEM: {e}")))?;
        let certs: Vec<Vec<u8>> = blocks
            .iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(|p| p.contents().to_vec())
            .collect();
        if certs.is_empty() {
            let tags: Vec<&str> = blocks.iter().map(pem::Pem::tag).collect();
            return Err(InspectError::NoCertificateBlock(if tags.is_empty() {
                "nothing".into()
            } else {
                tags.join(", ")
            }));
        }
        return Ok(certs);
    }
    split_der_chain(input).map_err(|e| InspectError::NotCertificate(e.to_string()))
}

fn report_composite(id: CompositeIdentity) -> CompositeReport {
    CompositeReport {
        cid: id.cid(),
        cid_verified: true,
        object: id,
    }
}

fn key_type(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let bits = spki.parsed().map(|k| k.key_size()).unwrap_or(0);
    match (alg.as_str(), curve.as_deref()) {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => "ECDSA P-256".into(),
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => "ECDSA P-384".into(),
        ("1.2.840.10045.2.1", Some("1.3.132.0.35")) => "ECDSA P-521".into(),
        ("1.2.840.10045.2.1", other) => format!("ECDSA (curve {})", other.unwrap_or("unknown")),
        ("1.2.840.113549.1.1.1", _) => format!("RSA {bits}"),
        ("1.3.101.112", _) => "Ed25519".into(),
        ("1.3.101.113", _) => "Ed448".into(),
        (other, _) => format!("unknown (algorithm {other})"),
    }
}

fn json_part(part: &'static str, b64: &str) -> Result<Map<String, Value>, InspectError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|e| InspectError::JwsPart {
            part,
            reason: format!("not base64url: {e}"),
        })?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(InspectError::JwsPart {
            part,
            reason: "not a JSON object".into(),
        }),
        Err(e) => Err(InspectError::JwsPart {
            part,
            reason: format!("not JSON: {e}"),
        }),
    }
}

/// A NumericDate claim as whole seconds (RFC 7519 allows fractions; they are dropped).
fn numeric_date(
    claims: &Map<String, Value>,
    claim: &'static str,
) -> Result<Option<i64>, InspectError> {
    let Some(v) = claims.get(claim) else {
        return Ok(None);
    };
    let secs = v
        .as_i64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.floor() as i64)
        })
        .ok_or_else(|| InspectError::BadClaim {
            claim,
            reason: format!("{v} is not a NumericDate (seconds since 1970)"),
        })?;
    if time::OffsetDateTime::from_unix_timestamp(secs).is_err() {
        return Err(InspectError::BadClaim {
            claim,
            reason: format!("{secs} is out of range"),
        });
    }
    Ok(Some(secs))
}

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{secs}"))
}

fn validity(now: i64, not_before: Option<i64>, not_after: i64) -> Validity {
    let words = |secs: i64| {
        humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs())).to_string()
    };
    let remaining_secs = not_after.saturating_sub(now);
    let (status, text) = match not_before {
        Some(nb) if now < nb => (
            "not yet valid",
            format!("not yet valid, starts in {}", words(nb.saturating_sub(now))),
        ),
        _ if remaining_secs <= 0 => ("expired", format!("expired {} ago", words(remaining_secs))),
        _ => (
            "valid",
            format!("valid, expires in {}", words(remaining_secs)),
        ),
    };
    Validity {
        status,
        remaining_secs,
        text,
    }
}

/// The identity's attributes as `(name, value)` lines, named like the X.509 attributes.
pub fn composite_lines(id: &CompositeIdentity) -> Vec<(&'static str, String)> {
    let mut out = vec![("version", id.v.to_string())];
    if let Some(a) = &id.agent {
        out.push(("agent.name", a.name.clone()));
        if let Some(v) = &a.version {
            out.push(("agent.version", v.clone()));
        }
    }
    if let Some(m) = &id.model {
        out.push(("model.provider", m.provider.clone()));
        out.push(("model.id", m.id.clone()));
    }
    for (name, d) in [
        ("config_digest", &id.config_digest),
        ("tools_digest", &id.tools_digest),
        ("image_digest", &id.image_digest),
    ] {
        if let Some(d) = d {
            out.push((name, d.clone()));
        }
    }
    if let Some(k) = &id.k8s {
        out.push(("k8s.cluster", k.cluster.clone()));
        out.push(("k8s.namespace", k.namespace.clone()));
        out.push(("k8s.serviceaccount", k.serviceaccount.clone()));
        out.push(("k8s.pod.name", k.pod.name.clone()));
        out.push(("k8s.pod.uid", k.pod.uid.clone()));
        out.push(("k8s.node", k.node.clone()));
        if let Some(c) = &k.container {
            out.push(("k8s.container", c.clone()));
        }
    }
    if let Some(u) = &id.unix {
        out.push(("unix.uid", u.uid.to_string()));
        out.push(("unix.gid", u.gid.to_string()));
        out.push(("unix.path", u.path.clone()));
        out.push(("unix.sha256", u.sha256.clone()));
    }
    out
}

/// The column where values start in text output (`k8s.serviceaccount`, indented, plus a gap).
const WIDTH: usize = 22;

/// Human-readable lines for `x509 inspect`.
pub fn x509_text(r: &X509Report) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k:<WIDTH$}{v}\n"));
    line("SPIFFE ID", &r.spiffe_id.to_string());
    line("serial", &r.serial);
    line("not before", &r.not_before);
    line(
        "not after",
        &format!("{} ({})", r.not_after, r.validity.text),
    );
    line("issuer", &r.issuer);
    line("key", &r.key_type);
    if r.is_ca {
        line("CA", "yes");
    }
    if r.chain_length > 1 {
        line(
            "chain",
            &format!("{} certificates (the first is shown)", r.chain_length),
        );
    }
    out.push_str(&composite_text(r.composite.as_ref()));
    out.push_str(&format!("{:<WIDTH$}{X509_NOT_VERIFIED}\n", "note"));
    out
}

/// Human-readable lines for `jwt inspect`.
pub fn jwt_text(r: &JwtReport) -> String {
    let none = || "(none)".to_owned();
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k:<WIDTH$}{v}\n"));
    line("alg", &r.alg.clone().unwrap_or_else(none));
    line("kid", &r.kid.clone().unwrap_or_else(none));
    line("typ", &r.typ.clone().unwrap_or_else(none));
    line("sub", &r.sub.clone().unwrap_or_else(none));
    line(
        "aud",
        &if r.aud.is_empty() {
            none()
        } else {
            r.aud.join(", ")
        },
    );
    if let Some(iss) = &r.iss {
        line("iss", iss);
    }
    if let Some(jti) = &r.jti {
        line("jti", jti);
    }
    line("iat", &r.issued_at.clone().unwrap_or_else(none));
    line(
        "exp",
        &match (&r.expires_at, &r.validity) {
            (Some(exp), Some(v)) => format!("{exp} ({})", v.text),
            _ => "(none: a JWT-SVID must have one)".into(),
        },
    );
    out.push_str(&composite_text(r.composite.as_ref()));
    out.push_str(&format!("{:<WIDTH$}{JWT_NOT_VERIFIED}\n", "note"));
    out
}

fn composite_text(c: Option<&CompositeReport>) -> String {
    let Some(c) = c else {
        return "composite identity: none\n".into();
    };
    let mut out = String::from("composite identity\n");
    out.push_str(&format!(
        "  {:<w$}{} (re-verified: it hashes the attributes below)\n",
        "cid",
        c.cid,
        w = WIDTH - 2
    ));
    for (k, v) in composite_lines(&c.object) {
        out.push_str(&format!("  {k:<w$}{v}\n", w = WIDTH - 2));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_words() {
        let v = validity(100, Some(50), 3700);
        assert_eq!((v.status, v.remaining_secs), ("valid", 3600));
        assert_eq!(v.text, "valid, expires in 1h");
        let v = validity(200, Some(50), 80);
        assert_eq!((v.status, v.text.as_str()), ("expired", "expired 2m ago"));
        assert_eq!(v.remaining_secs, -120);
        let v = validity(0, Some(10), 80);
        assert_eq!(
            (v.status, v.text.as_str()),
            ("not yet valid", "not yet valid, starts in 10s")
        );
        assert_eq!(validity(i64::MIN, None, i64::MAX).status, "valid");
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(matches!(inspect_x509(b"", 0), Err(InspectError::Empty)));
        assert!(matches!(
            inspect_x509(b"hello", 0),
            Err(InspectError::NotCertificate(_))
        ));
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            inspect_x509(key.as_bytes(), 0).unwrap_err().to_string(),
            "the PEM input holds no CERTIFICATE block (found: PRIVATE KEY)"
        );
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            inspect_x509(bad.as_bytes(), 0),
            Err(InspectError::BadCertificate { index: 1, .. })
        ));

        assert!(matches!(inspect_jwt(" ", 0), Err(InspectError::Empty)));
        assert!(matches!(
            inspect_jwt("a.b", 0),
            Err(InspectError::JwsParts(2))
        ));
        assert!(matches!(
            inspect_jwt("!!.e30.", 0),
            Err(InspectError::JwsPart { part: "header", .. })
        ));
        // e30 = "{}", WzFd = "[1]"
        assert!(matches!(
            inspect_jwt("e30.WzFd.", 0),
            Err(InspectError::JwsPart {
                part: "payload",
                ..
            })
        ));
        let claims = |json: &str| format!("e30.{}.", URL_SAFE_NO_PAD.encode(json));
        assert_eq!(
            inspect_jwt(&claims(r#"{"exp":"soon"}"#), 0)
                .unwrap_err()
                .to_string(),
            "claim exp: \"soon\" is not a NumericDate (seconds since 1970)"
        );
        assert!(matches!(
            inspect_jwt(&claims(r#"{"exp":1e300}"#), 0),
            Err(InspectError::BadClaim { claim: "exp", .. })
        ));
        assert!(matches!(
            inspect_jwt(&claims(r#"{"aud":[1]}"#), 0),
            Err(InspectError::BadClaim { claim: "aud", .. })
        ));
        let r = inspect_jwt(&claims(r#"{"aud":"a","exp":10.5}"#), 0).unwrap();
        assert_eq!(r.aud, ["a"]);
        assert_eq!(r.validity.unwrap().remaining_secs, 10);
        assert!(r.composite.is_none());
    }
}
