//! Offline verification of task tokens, for relying parties and for the issuer's parent check.
//!
//! Order as in `crypto::jwt::validate`: `alg` against the JWT-SVID list before anything else,
//! `typ` and `kid` required, the key looked up by `kid` in the bundle of the trust domain named
//! by `iss` only (a task token's `sub` is a principal, not necessarily a SPIFFE ID). The claims
//! are parsed strictly only after the signature verifies.

use jsonwebtoken::Algorithm;
use serde_json::Value;

use super::claims::{TYP, TaskClaims};
use super::rules::MAX_DEPTH;
use crate::crypto::jwt::{ALLOWED_ALGS, KeyLookup, LEEWAY_SECS, decode_json, es256_key};
use crate::spiffe::{SpiffeBundle, SpiffeId, TrustDomain};

/// Why a task token is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("token is not in JWS compact form (three base64url parts)")]
    Malformed,
    #[error("token header is not valid JSON: {0}")]
    BadHeader(String),
    #[error("algorithm {0:?} is not allowed")]
    AlgNotAllowed(String),
    #[error("typ {0:?} is not {TYP:?}")]
    BadTyp(String),
    #[error("token has no kid; it is required to select the signing key")]
    MissingKid,
    #[error("iss {0:?} is not a trust domain ID (spiffe://<trust domain>)")]
    BadIssuer(String),
    #[error("no JWT bundle for trust domain {0}")]
    NoBundle(TrustDomain),
    #[error("key {kid:?} is not in the JWT bundle of {td}")]
    UnknownKid { kid: String, td: TrustDomain },
    #[error("key {kid:?} cannot verify {alg}")]
    KeyAlgMismatch { kid: String, alg: String },
    #[error("signature does not verify")]
    BadSignature,
    #[error("claims are not a valid task token: {0}")]
    BadClaims(String),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("audience {0:?} is not in the token's aud")]
    WrongAudience(String),
    #[error("actor chain: {0}")]
    BadChain(String),
    #[error("presenter {presenter} is not the token's outermost actor {actor}")]
    WrongPresenter {
        presenter: SpiffeId,
        actor: SpiffeId,
    },
}

/// Verifies a task token presented by `presenter` (the mTLS peer or JWT-SVID subject) to
/// `audience` at `now` (Unix seconds). `bundle_for` yields the bundle of a trusted trust domain.
pub fn verify<'b>(
    token: &str,
    audience: &str,
    presenter: Option<&SpiffeId>,
    bundle_for: impl Fn(&TrustDomain) -> Option<&'b SpiffeBundle>,
    now: i64,
) -> Result<TaskClaims, VerifyError> {
    let claims = verify_unscoped(token, bundle_for, now)?;
    if !claims.aud.iter().any(|a| a == audience) {
        return Err(VerifyError::WrongAudience(audience.to_owned()));
    }
    if let Some(presenter) = presenter
        && presenter != &claims.act.sub
    {
        return Err(VerifyError::WrongPresenter {
            presenter: presenter.clone(),
            actor: claims.act.sub.clone(),
        });
    }
    Ok(claims)
}

/// The outermost actor a token names, read without checking anything. Only for choosing which
/// of a caller's identities a request is about; the issuer verifies the token afterwards.
pub fn unverified_holder(token: &str) -> Option<SpiffeId> {
    let payload = token.split('.').nth(1)?;
    let claims = decode_json(payload).ok()?;
    claims.get("act")?.get("sub")?.as_str()?.parse().ok()
}

/// Everything `verify` checks but the audience and the presenter: signature, header, time
/// window and claim shape. The issuer uses it for parent tokens, which are not presented to
/// an audience.
pub(crate) fn verify_unscoped<'b>(
    token: &str,
    bundle_for: impl Fn(&TrustDomain) -> Option<&'b SpiffeBundle>,
    now: i64,
) -> Result<TaskClaims, VerifyError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, payload_b64, sig_b64] = parts.as_slice() else {
        return Err(VerifyError::Malformed);
    };
    let header = decode_json(header_b64).map_err(VerifyError::BadHeader)?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if !ALLOWED_ALGS.contains(&alg) {
        return Err(VerifyError::AlgNotAllowed(alg.to_owned()));
    }
    let typ = header.get("typ").and_then(Value::as_str).unwrap_or("");
    if typ != TYP {
        return Err(VerifyError::BadTyp(typ.to_owned()));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(VerifyError::MissingKid)?;
    // `iss` selects the key, so it is read before the signature is checked; nothing else is.
    let unverified = decode_json(payload_b64).map_err(|_| VerifyError::Malformed)?;
    let iss = unverified.get("iss").and_then(Value::as_str).unwrap_or("");
    let td = issuer_trust_domain(iss)?;
    let bundle = bundle_for(&td).ok_or_else(|| VerifyError::NoBundle(td.clone()))?;
    let decoding = es256_key(bundle, kid, alg).map_err(|e| match e {
        KeyLookup::UnknownKid => VerifyError::UnknownKid {
            kid: kid.into(),
            td: td.clone(),
        },
        KeyLookup::AlgMismatch => VerifyError::KeyAlgMismatch {
            kid: kid.into(),
            alg: alg.into(),
        },
    })?;
    let signed = &token[..header_b64.len() + 1 + payload_b64.len()];
    let ok = jsonwebtoken::crypto::verify(sig_b64, signed.as_bytes(), &decoding, Algorithm::ES256)
        .map_err(|_| VerifyError::BadSignature)?;
    if !ok {
        return Err(VerifyError::BadSignature);
    }

    let claims: TaskClaims = serde_json::from_value(Value::Object(unverified))
        .map_err(|e| VerifyError::BadClaims(e.to_string()))?;
    check_claims(&claims, &td, now)?;
    Ok(claims)
}

fn check_claims(c: &TaskClaims, td: &TrustDomain, now: i64) -> Result<(), VerifyError> {
    let bad = |m: &str| Err(VerifyError::BadClaims(m.to_owned()));
    if c.sub.is_empty() {
        return bad("sub is empty");
    }
    if c.aud.is_empty() || c.aud.iter().any(String::is_empty) {
        return bad("aud is empty or has an empty entry");
    }
    if c.scope.is_empty() {
        return bad("scope is empty");
    }
    if c.jti.is_empty() || c.txn.is_empty() {
        return bad("jti and txn must not be empty");
    }
    if c.exp <= c.nbf || c.iat > c.exp {
        return bad("exp must be after nbf and iat");
    }
    let leeway = LEEWAY_SECS as i64;
    if now > c.exp.saturating_add(leeway) {
        return Err(VerifyError::Expired);
    }
    if now.saturating_add(leeway) < c.nbf {
        return Err(VerifyError::NotYetValid);
    }
    check_chain(c, td)
}

fn check_chain(c: &TaskClaims, td: &TrustDomain) -> Result<(), VerifyError> {
    let bad = |m: String| Err(VerifyError::BadChain(m));
    if c.tctx.max_depth > MAX_DEPTH {
        return bad(format!(
            "root depth {} is above {MAX_DEPTH}",
            c.tctx.max_depth
        ));
    }
    let len = c.act.len();
    if c.act.chain().any(|a| a.cid.as_deref() == Some("")) {
        return bad("an actor has an empty cid".into());
    }
    // The root actor was attested by the issuer itself when the token was minted.
    let root = &c.act.root().sub;
    if root.trust_domain() != td {
        return bad(format!(
            "root actor {root} is not in the issuing trust domain {td}"
        ));
    }
    if c.tctx.depth > c.tctx.max_depth {
        return bad("remaining depth is above the root token's depth".into());
    }
    // Each delegation spends at least one level of depth.
    let delegations = (len - 1) as u64;
    if delegations + u64::from(c.tctx.depth) > u64::from(c.tctx.max_depth) {
        return bad(format!(
            "{delegations} delegations with {} remaining exceed the root depth {}",
            c.tctx.depth, c.tctx.max_depth
        ));
    }
    Ok(())
}

fn issuer_trust_domain(iss: &str) -> Result<TrustDomain, VerifyError> {
    let bad = || VerifyError::BadIssuer(iss.to_owned());
    let id: SpiffeId = iss.parse().map_err(|_| bad())?;
    if !id.is_root() {
        return Err(bad());
    }
    Ok(id.trust_domain().clone())
}
