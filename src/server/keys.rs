//! What the authority is made of, below the authority itself: its configuration and errors,
//! making and reading key slots, and the events a rotation step reports.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::state::{KeyKind, KeySlot, Lifecycle};
use super::store::StoreError;
use crate::audit::{Action, AuditEvent, Credential, CredentialKind, Decision};
use crate::crypto::jwt::JwtError;
use crate::crypto::x509::{CaSigner, X509Error};
use crate::crypto::{KeyError, PrivateKey};
use crate::policy::{JWT_TTL_RANGE, X509_TTL_RANGE};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Why the authority could not start, sign or rotate.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] AuthorityConfigError),
    #[error("{slot}: {source}")]
    Key { slot: String, source: KeyError },
    #[error("{slot}: {source}")]
    Cert { slot: String, source: X509Error },
    #[error(
        "state directory belongs to trust domain {found}, not {wanted}; use another --state-dir"
    )]
    TrustDomainMismatch { found: String, wanted: TrustDomain },
    #[error("signing X509-SVID: {0}")]
    SignX509(X509Error),
    #[error("signing JWT-SVID: {0}")]
    SignJwt(JwtError),
    #[error("refusing to sign for {0}: it is not in trust domain {1}")]
    ForeignId(SpiffeId, TrustDomain),
    #[error(
        "refusing to sign: the keys have not been confirmed with the store for {}s (limit {}s); another replica may have rotated them (is the API server reachable?)",
        .0.as_secs(),
        .1.as_secs()
    )]
    Unconfirmed(std::time::Duration, std::time::Duration),
}

/// A rotation setting that would let a key sign before peers can know it.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityConfigError {
    #[error("bundle refresh hint (--bundle-refresh-hint) must be at least 1s")]
    RefreshHint,
    #[error(
        "rotation prepare-ahead (--rotation-prepare-ahead) {prepare} is less than 3 bundle refresh intervals ({min}): peers could miss a new key before it signs"
    )]
    PrepareAhead { prepare: String, min: String },
    #[error(
        "{name} {ttl} is less than 3 × prepare-ahead ({min}): a key must be published for prepare-ahead, then sign at least as long"
    )]
    Lifetime {
        name: &'static str,
        ttl: String,
        min: String,
    },
}

/// Lifetimes and rotation timing of the authority's keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuthorityConfig {
    /// Lifetime of each CA certificate; a CA signs for about the first half of it.
    #[serde(with = "humantime_serde")]
    pub ca_ttl: Duration,
    /// Lifetime of each JWT signing key; it signs for about the first half of it.
    #[serde(with = "humantime_serde")]
    pub jwt_key_ttl: Duration,
    /// How long a new key is in the bundle before it signs.
    #[serde(with = "humantime_serde")]
    pub prepare_ahead: Duration,
    /// Suggested bundle refresh interval for federation peers.
    #[serde(with = "humantime_serde")]
    pub refresh_hint: Duration,
}

impl Default for AuthorityConfig {
    fn default() -> Self {
        Self {
            ca_ttl: Duration::from_secs(7 * 24 * 3600),
            jwt_key_ttl: Duration::from_secs(24 * 3600),
            // 12 refresh intervals: SPIFFE federation asks for at least 3 to 5.
            prepare_ahead: Duration::from_secs(3600),
            refresh_hint: Duration::from_secs(300),
        }
    }
}

/// Longest lifetime of anything a JWT key signs: JWT-SVIDs and task tokens.
pub const MAX_JWT_LIFETIME: Duration = JWT_TTL_RANGE.1;
const _: () = assert!(crate::token::MAX_TTL.as_secs() <= MAX_JWT_LIFETIME.as_secs());

impl AuthorityConfig {
    /// Checks that a new key is published for 3 refresh intervals before it signs, and that
    /// each lifetime leaves room for that notice and a signing period at least as long.
    pub fn validate(&self) -> Result<(), AuthorityConfigError> {
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        if self.refresh_hint < Duration::from_secs(1) {
            return Err(AuthorityConfigError::RefreshHint);
        }
        let min = self.refresh_hint * 3;
        if self.prepare_ahead < min {
            return Err(AuthorityConfigError::PrepareAhead {
                prepare: fmt(self.prepare_ahead),
                min: fmt(min),
            });
        }
        // A scheduled key signs for (ttl - prepare) / 2: at least prepare when ttl >= 3 x prepare,
        // so the next key can be prepared after the current one started signing.
        let min = self.prepare_ahead * 3;
        for (name, ttl) in [
            ("CA lifetime (--ca-ttl)", self.ca_ttl),
            ("JWT key lifetime (--jwt-key-ttl)", self.jwt_key_ttl),
        ] {
            if ttl < min {
                return Err(AuthorityConfigError::Lifetime {
                    name,
                    ttl: fmt(ttl),
                    min: fmt(min),
                });
            }
        }
        Ok(())
    }

    /// The lifecycle rules of `kind`.
    pub fn lifecycle(&self, kind: KeyKind) -> Lifecycle {
        match kind {
            KeyKind::X509Ca => Lifecycle {
                ttl: self.ca_ttl,
                prepare_ahead: self.prepare_ahead,
                max_credential_ttl: X509_TTL_RANGE.1,
                credentials_capped: true,
            },
            KeyKind::Jwt => Lifecycle {
                ttl: self.jwt_key_ttl,
                prepare_ahead: self.prepare_ahead,
                max_credential_ttl: MAX_JWT_LIFETIME,
                credentials_capped: false,
            },
        }
    }
}

/// A new key of `kind`, published at `now`.
pub(super) fn generate(
    td: &TrustDomain,
    config: &AuthorityConfig,
    kind: KeyKind,
    now: SystemTime,
) -> Result<KeySlot, AuthorityError> {
    let (key, cert, not_after) = match kind {
        KeyKind::X509Ca => {
            let ca = CaSigner::generate_at(td, now, config.ca_ttl).map_err(|source| {
                AuthorityError::Cert {
                    slot: "new CA".into(),
                    source,
                }
            })?;
            let cert = crate::crypto::x509::to_pem(&[ca.cert_der().to_vec()]);
            (ca.key().pkcs8_pem(), Some(cert), ca.not_after())
        }
        KeyKind::Jwt => {
            let key = PrivateKey::generate().map_err(|source| AuthorityError::Key {
                slot: "new JWT key".into(),
                source,
            })?;
            (key.pkcs8_pem(), None, now + config.jwt_key_ttl)
        }
    };
    Ok(KeySlot {
        key,
        cert,
        published_at: now,
        not_after,
        activated_at: None,
        deactivated_at: None,
    })
}

pub(super) fn parse_key(pem: &str, slot: &str) -> Result<PrivateKey, AuthorityError> {
    PrivateKey::from_pkcs8_pem(pem).map_err(|source| AuthorityError::Key {
        slot: slot.into(),
        source,
    })
}

pub(super) fn parse_ca(s: &KeySlot, slot: &str) -> Result<CaSigner, AuthorityError> {
    let cert_err = |source| AuthorityError::Cert {
        slot: slot.into(),
        source,
    };
    let key = parse_key(&s.key, slot)?;
    let cert = s
        .cert
        .as_deref()
        .ok_or_else(|| cert_err(X509Error::Parse("no certificate".into())))?;
    let der = pem::parse(cert)
        .map_err(|e| cert_err(X509Error::Parse(e.to_string())))?
        .into_contents();
    CaSigner::from_parts(key, der).map_err(cert_err)
}

/// One step of a key's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChange {
    /// Made and published in the bundle; not signing yet.
    Prepared,
    /// Signs from now on; the key it replaced stays in the bundle.
    Activated,
    /// Removed from the bundle: nothing it signed is still valid.
    Retired,
}

/// A change to the authority's keys, for logs and the audit trail.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEvent {
    pub kind: KeyKind,
    pub change: KeyChange,
    /// `sha256:<hex>` of the CA certificate (DER) or of the JWT key's SubjectPublicKeyInfo.
    pub fingerprint: String,
    /// The JWT key's `kid`.
    pub kid: Option<String>,
    /// End of the key's validity.
    pub not_after: SystemTime,
    /// For an activation: how long the key had been in the bundle. Zero means peers could
    /// not know it before it signed.
    pub notice: Option<Duration>,
    /// Part of an emergency rotation (`Authority::rotate_now`), not the schedule.
    pub emergency: bool,
    /// Bundle sequence number once the change was made.
    pub sequence: u64,
}

impl KeyEvent {
    /// The key as people read it: CA fingerprint, or JWT `kid`.
    pub fn key_name(&self) -> String {
        match &self.kid {
            Some(kid) => format!("{} {kid}", self.kind),
            None => format!("{} {}", self.kind, self.fingerprint),
        }
    }

    /// The audit reason, e.g. `prepared next CA sha256:…`.
    pub fn reason(&self) -> String {
        let key = self.key_name();
        let seq = self.sequence;
        match self.change {
            KeyChange::Prepared if self.emergency => {
                format!("emergency rotation: prepared {key} (bundle sequence {seq})")
            }
            KeyChange::Prepared => format!("prepared next {key} (bundle sequence {seq})"),
            KeyChange::Activated => {
                let notice = self.notice.unwrap_or_default();
                let notice = humantime::format_duration(Duration::from_secs(notice.as_secs()));
                match (self.emergency, self.notice.unwrap_or_default().is_zero()) {
                    (true, true) => format!(
                        "emergency rotation: activated {key}, unannounced: it entered the bundle as it started signing"
                    ),
                    (true, false) => {
                        format!("emergency rotation: activated {key}, published {notice} before")
                    }
                    (false, true) => {
                        format!("activated {key}, unannounced: the key it replaces had expired")
                    }
                    (false, false) => format!("activated {key}, published {notice} before"),
                }
            }
            KeyChange::Retired => {
                format!("retired {key}: nothing it signed is still valid (bundle sequence {seq})")
            }
        }
    }

    /// The `bundle_updated` audit record of this change.
    pub fn audit_event(&self, td: &TrustDomain) -> AuditEvent {
        let mut credential =
            Credential::new(CredentialKind::Bundle).not_after(self.not_after.into());
        credential.fingerprint = Some(self.fingerprint.clone());
        let rule = if self.emergency {
            "emergency rotation"
        } else {
            "scheduled rotation"
        };
        AuditEvent::new(Action::BundleUpdated, td.id_string())
            .decision(Decision::allow().reason(self.reason()).policy(rule))
            .credential(credential)
    }
}
