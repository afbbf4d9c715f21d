//! The state layout before key rotation: one PEM file per key and slot (`current`, `next`).
//! Read once into a [`KeyState`]; the files are removed after the document is stored.

use std::time::SystemTime;

use super::keys::{AuthorityConfig, AuthorityError, generate, parse_ca, parse_key};
use super::state::{KeyKind, KeyRing, KeySlot, KeyState, STATE_VERSION};
use super::store::FileStore;
use crate::crypto::x509::NOT_BEFORE_CUSHION;
use crate::spiffe::TrustDomain;

const CA_CERT: [&str; 2] = ["x509-ca.current.crt", "x509-ca.next.crt"];
const CA_KEY: [&str; 2] = ["x509-ca.current.key", "x509-ca.next.key"];
const JWT_KEY: [&str; 2] = ["jwt.current.key", "jwt.next.key"];

/// The state the old files describe, or None if there are none. A current key the old code
/// had not written yet (it crashed first) is made now, as the old code would have.
pub fn read(
    files: &FileStore,
    td: &TrustDomain,
    config: &AuthorityConfig,
    now: SystemTime,
) -> Result<Option<KeyState>, AuthorityError> {
    let ca = [read_ca(files, 0)?, read_ca(files, 1)?];
    let jwt = [read_jwt(files, 0, config)?, read_jwt(files, 1, config)?];
    if ca.iter().chain(&jwt).all(Option::is_none) {
        return Ok(None);
    }
    let ring = |[current, next]: [Option<KeySlot>; 2], kind| {
        let current = match current {
            Some(c) => c,
            None => generate(td, config, kind, now)?,
        };
        let since = current.published_at;
        Ok::<_, AuthorityError>(KeyRing {
            next,
            ..KeyRing::starting(current, since)
        })
    };
    Ok(Some(KeyState {
        version: STATE_VERSION,
        trust_domain: td.as_str().into(),
        // The old code published every bundle as sequence 1.
        sequence: 1,
        x509: ring(ca, KeyKind::X509Ca)?,
        jwt: ring(jwt, KeyKind::Jwt)?,
        reissue_epoch: 0,
    }))
}

/// Removes the old files (and temp files a crash may have left).
pub fn remove(files: &FileStore) -> Result<(), AuthorityError> {
    for name in CA_CERT.iter().chain(&CA_KEY).chain(&JWT_KEY) {
        files.remove(name)?;
        files.remove(&format!(".{name}.tmp"))?;
    }
    Ok(())
}

/// A CA slot with both files; the old code wrote the key first, so a key alone is a CA it
/// never finished making (and would have made again).
fn read_ca(files: &FileStore, slot: usize) -> Result<Option<KeySlot>, AuthorityError> {
    let (Some(cert), Some(key)) = (files.read(CA_CERT[slot])?, files.read(CA_KEY[slot])?) else {
        return Ok(None);
    };
    let s = KeySlot {
        key,
        cert: Some(cert),
        published_at: SystemTime::UNIX_EPOCH,
        not_after: SystemTime::UNIX_EPOCH,
        activated_at: None,
        deactivated_at: None,
    };
    let ca = parse_ca(&s, CA_CERT[slot])?;
    let info = crate::crypto::x509::CertInfo::parse(ca.cert_der()).map_err(|source| {
        AuthorityError::Cert {
            slot: CA_CERT[slot].into(),
            source,
        }
    })?;
    Ok(Some(KeySlot {
        // The old code backdated notBefore by the cushion; it was made (and published) then.
        published_at: info.not_before + NOT_BEFORE_CUSHION,
        not_after: info.not_after,
        ..s
    }))
}

/// A JWT key slot; its file's modification time is when it was made.
fn read_jwt(
    files: &FileStore,
    slot: usize,
    config: &AuthorityConfig,
) -> Result<Option<KeySlot>, AuthorityError> {
    let Some(key) = files.read(JWT_KEY[slot])? else {
        return Ok(None);
    };
    parse_key(&key, JWT_KEY[slot])?;
    let made = files
        .modified(JWT_KEY[slot])?
        .unwrap_or_else(SystemTime::now);
    Ok(Some(KeySlot {
        key,
        cert: None,
        published_at: made,
        not_after: made + config.jwt_key_ttl,
        activated_at: None,
        deactivated_at: None,
    }))
}
