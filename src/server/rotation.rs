//! Driving key rotation: what a rotation step reports, and the background task that runs the
//! authority's schedule and writes each step to the audit trail.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::authority::Authority;
use super::state::KeyKind;
use crate::audit::{Action, AuditEvent, AuditLog, Credential, CredentialKind, Decision};
use crate::spiffe::TrustDomain;

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

/// Logs `event` and writes it to `audit`.
pub fn record(audit: &AuditLog, td: &TrustDomain, event: &KeyEvent) {
    tracing::info!(
        kind = %event.kind,
        change = ?event.change,
        fingerprint = %event.fingerprint,
        sequence = event.sequence,
        emergency = event.emergency,
        "{}",
        event.reason()
    );
    if let Err(e) = audit.record(event.audit_event(td)) {
        tracing::error!(error = %e, "writing audit record");
    }
}

/// Longest sleep between checks: a wall-clock jump is noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Wait before trying again after a failed step (the store may be briefly unavailable).
const RETRY: Duration = Duration::from_secs(5);
/// Shortest sleep, so a timer that fires a hair early does not spin.
const MIN_SLEEP: Duration = Duration::from_millis(20);

/// Runs `authority`'s rotation schedule until the runtime stops: wakes when the next step is
/// due (and at least every minute), performs it, and audits it.
pub fn spawn_rotation(authority: Arc<Authority>, audit: AuditLog) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let a = authority.clone();
            // Generating keys and fsyncing the store block.
            let outcome = tokio::task::spawn_blocking(move || a.tick(SystemTime::now())).await;
            let failed = match outcome {
                Ok(Ok(events)) => {
                    for e in &events {
                        record(&audit, authority.trust_domain(), e);
                    }
                    false
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "key rotation failed; retrying");
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "key rotation task failed; retrying");
                    true
                }
            };
            let wait = if failed {
                RETRY
            } else {
                let until_due = authority.rotation_due().duration_since(SystemTime::now());
                until_due.unwrap_or_default().clamp(MIN_SLEEP, MAX_SLEEP)
            };
            tokio::time::sleep(wait).await;
        }
    })
}

#[cfg(test)]
mod tests;
