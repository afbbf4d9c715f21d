//! Driving key rotation: what a rotation step reports, and the background task that runs the
//! authority's schedule and writes each step to the audit trail.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::authority::Authority;
use super::keys::KeyEvent;
use crate::audit::AuditLog;
use crate::spiffe::TrustDomain;

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

/// Runs `authority`'s rotation schedule while `leading` is true, until the runtime stops:
/// wakes when the next step is due (and at least every minute), performs it, and audits it.
/// It stops the moment `leading` turns false (a replica that lost the Lease); a step already
/// running finishes, and the store's compare-and-swap keeps a late one from doubling a step.
pub fn spawn_rotation(
    authority: Arc<Authority>,
    audit: AuditLog,
    mut leading: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // A closed channel keeps its last value: leadership is then fixed.
        let mut fixed = false;
        loop {
            if !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let a = authority.clone();
            // Generating keys and writing the store block.
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
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                r = leading.changed(), if !fixed => fixed = r.is_err(),
            }
        }
    })
}

/// Leadership for a server that is alone with its store: always leading.
pub fn always_leading() -> watch::Receiver<bool> {
    watch::channel(true).1
}

#[cfg(test)]
mod tests;
