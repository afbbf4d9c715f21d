//! The JWT encoding: one namespaced claim holding the object plus its `cid`.

use serde_json::{Map, Value};

use super::CompositeError;
use super::identity::{CompositeIdentity, VERSION};

/// The claim name; namespaced so it never collides with registered or SPIFFE claims.
pub const JWT_CLAIM: &str = "agentid.dev/agent";

/// The claim name and value (the object with `cid` added) to put in a JWT-SVID or task token.
/// Call [`CompositeIdentity::validate`] first: this encodes whatever it is given.
pub fn to_jwt_claim(id: &CompositeIdentity) -> (String, Value) {
    let mut object = match serde_json::to_value(id) {
        Ok(Value::Object(object)) => object,
        // A struct of strings and integers always serializes to an object.
        _ => unreachable!("CompositeIdentity serializes to a JSON object"),
    };
    object.insert("cid".into(), Value::String(id.cid()));
    (JWT_CLAIM.to_owned(), Value::Object(object))
}

/// Rebuilds the identity from a token's claims; `Ok(None)` when the claim is absent.
/// The embedded `cid` must match the object. The token's signature is not checked here.
pub fn from_jwt_claims(
    claims: &Map<String, Value>,
) -> Result<Option<CompositeIdentity>, CompositeError> {
    let Some(claim) = claims.get(JWT_CLAIM) else {
        return Ok(None);
    };
    let mut object = claim
        .as_object()
        .ok_or_else(|| CompositeError::BadClaim("not a JSON object".into()))?
        .clone();
    let cid = match object.remove("cid") {
        Some(Value::String(cid)) => cid,
        Some(_) => return Err(CompositeError::BadClaim("cid is not a string".into())),
        None => return Err(CompositeError::BadClaim("cid is missing".into())),
    };
    // Check the version before the shape, which a later version may change.
    match object.get("v") {
        Some(v) if v.as_u64() == Some(u64::from(VERSION)) => {}
        Some(v) => return Err(CompositeError::UnknownVersion(v.to_string())),
        None => return Err(CompositeError::BadClaim("v is missing".into())),
    }
    let id: CompositeIdentity = serde_json::from_value(Value::Object(object))
        .map_err(|e| CompositeError::BadClaim(e.to_string()))?;
    id.validate()?;
    let computed = id.cid();
    if computed != cid {
        return Err(CompositeError::CidMismatch {
            carried: cid,
            computed,
        });
    }
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::composite::identity::tests::{k8s_sample, unix_sample};

    fn claims(id: &CompositeIdentity) -> Map<String, Value> {
        let (name, value) = to_jwt_claim(id);
        let mut m = Map::new();
        m.insert("sub".into(), "spiffe://example.org/agent/x".into());
        m.insert(name, value);
        m
    }

    #[test]
    fn round_trips() {
        for id in [k8s_sample(), unix_sample(), CompositeIdentity::new()] {
            let (name, value) = to_jwt_claim(&id);
            assert_eq!(name, "agentid.dev/agent");
            assert_eq!(value["cid"], id.cid());
            assert_eq!(value["v"], 1);
            // Through text, as a relying party would see it.
            let text = serde_json::to_string(&claims(&id)).unwrap();
            let parsed: Map<String, Value> = serde_json::from_str(&text).unwrap();
            assert_eq!(from_jwt_claims(&parsed), Ok(Some(id)));
        }
        assert_eq!(from_jwt_claims(&Map::new()), Ok(None));
    }

    #[test]
    fn rejects_tampering_and_malformed_claims() {
        let mut c = claims(&k8s_sample());
        c[JWT_CLAIM]["model"]["id"] = "other-model".into();
        assert!(matches!(
            from_jwt_claims(&c),
            Err(CompositeError::CidMismatch { .. })
        ));

        let mut c = claims(&k8s_sample());
        c[JWT_CLAIM]["v"] = 2.into();
        assert_eq!(
            from_jwt_claims(&c),
            Err(CompositeError::UnknownVersion("2".into()))
        );

        let mut c = claims(&k8s_sample());
        c[JWT_CLAIM]["image_digest"] = "sha256:short".into();
        assert!(matches!(
            from_jwt_claims(&c),
            Err(CompositeError::BadDigest { field, .. }) if field == "image_digest"
        ));

        let mut c = claims(&k8s_sample());
        c[JWT_CLAIM]
            .as_object_mut()
            .unwrap()
            .insert("extra".into(), true.into());
        assert!(matches!(
            from_jwt_claims(&c),
            Err(CompositeError::BadClaim(_))
        ));

        let mut c = claims(&k8s_sample());
        c[JWT_CLAIM].as_object_mut().unwrap().remove("cid");
        assert_eq!(
            from_jwt_claims(&c),
            Err(CompositeError::BadClaim("cid is missing".into()))
        );

        let mut c = Map::new();
        c.insert(JWT_CLAIM.into(), "sha256:abc".into());
        assert!(matches!(
            from_jwt_claims(&c),
            Err(CompositeError::BadClaim(_))
        ));
    }
}
