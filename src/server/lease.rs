//! Leader election over a `coordination.k8s.io/v1` Lease: among the server replicas sharing a
//! `--store kubernetes`, the holder alone runs the key-rotation schedule and publishes the
//! bundle ConfigMap. Every other duty (signing, node API, emergency rotation) is every
//! replica's, and the key state's compare-and-swap keeps them consistent whoever writes.
//!
//! The rules, with D the lease duration:
//! - Every write is a compare-and-swap on the Lease's `resourceVersion`: of two replicas
//!   that both see an expired Lease, one takes it and the other gets a conflict.
//! - A Lease is expired when its record (its `resourceVersion`) has not changed for D as
//!   measured on the observer's own monotonic clock since it first saw that record. Remote
//!   timestamps are never compared with the local clock, so clock skew between replicas
//!   does not matter (client-go's rule).
//! - The holder renews every D/3 and steps down on its own when a renewal is not confirmed
//!   within 2D/3 of *sending* the last confirmed one: by then no other replica can have
//!   taken over (they wait D from when they saw that renewal, which was after it was sent).
//! - On shutdown the holder clears `holderIdentity`, and a released Lease is taken at once.
//!
//! `kube-leader-election` was not used: it acquires with an unconditional merge patch (two
//! replicas can both win) and judges expiry by the remote `renewTime` against the local clock.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The Lease the server replicas elect their leader with.
pub const LEASE_NAME: &str = "agentid-server";

/// Who is electing, on which Lease, with which duration.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    /// This replica's name in `holderIdentity` (its pod name).
    pub identity: String,
    /// D: how long a record must stay unchanged before another replica takes over.
    pub duration: Duration,
}

/// What one round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This replica holds the Lease (created, renewed or taken over).
    Leading,
    /// Another replica holds it (or won the race for it).
    Following(String),
}

/// The record of the Lease as this replica last saw it.
#[derive(Debug, Clone)]
struct Observed {
    version: String,
    since: Instant,
}

/// What to do about the Lease as it was read.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Create,
    Renew,
    TakeOver,
    Wait(String),
}

/// The pure part of a round: what to do about `lease` (None: it does not exist) at `now`.
fn decide(
    lease: Option<&Lease>,
    me: &str,
    observed: &mut Option<Observed>,
    now: Instant,
    duration: Duration,
) -> Step {
    let Some(lease) = lease else {
        return Step::Create;
    };
    let spec = lease.spec.as_ref();
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or("");
    if holder == me {
        return Step::Renew;
    }
    if holder.is_empty() {
        return Step::TakeOver;
    }
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    // The holder's own duration if it states one: it renews on that schedule.
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map_or(duration, Duration::from_secs);
    match observed {
        Some(o) if o.version == version => {
            if now.duration_since(o.since) >= duration {
                Step::TakeOver
            } else {
                Step::Wait(holder.to_owned())
            }
        }
        _ => {
            *observed = Some(Observed {
                version,
                since: now,
            });
            Step::Wait(holder.to_owned())
        }
    }
}

/// One replica's participation in the election.
pub struct Election {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
    leader: watch::Sender<bool>,
}

impl Election {
    /// An election on `config.name` through `api` (namespaced). Nobody leads until it runs.
    pub fn new(api: Api<Lease>, config: LeaseConfig) -> Self {
        Self {
            api,
            config,
            observed: None,
            leader: watch::Sender::new(false),
        }
    }

    /// True while this replica holds the Lease; changes the moment it stops holding it.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// Runs until `cancel`, then releases the Lease if held.
    pub async fn run(mut self, cancel: CancellationToken) {
        let d = self.config.duration;
        let (retry, renew_within) = (d / 3, d * 2 / 3);
        let mut deadline: Option<Instant> = None;
        let mut next_round = Instant::now();
        loop {
            let lost_at = deadline.unwrap_or_else(|| Instant::now() + d * 1000);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep_until(lost_at), if deadline.is_some() => {
                    tracing::warn!(lease = %self.config.name, "renewal not confirmed in time; stepping down");
                    deadline = None;
                    self.set(false);
                }
                () = tokio::time::sleep_until(next_round) => {
                    let sent = Instant::now();
                    // Bounded, and never past the step-down deadline: a hung request must not
                    // keep a holder leading longer than its last confirmed renewal allows.
                    let limit = deadline.map_or(retry, |d| d.saturating_duration_since(sent).min(retry));
                    match tokio::time::timeout(limit, self.round(sent)).await {
                        Ok(Ok(Outcome::Leading)) => {
                            deadline = Some(sent + renew_within);
                            self.set(true);
                        }
                        Ok(Ok(Outcome::Following(holder))) => {
                            deadline = None;
                            if self.set(false) {
                                tracing::info!(lease = %self.config.name, %holder, "following");
                            }
                        }
                        Ok(Err(e)) => tracing::warn!(lease = %self.config.name, error = %e, "lease round failed"),
                        Err(_) => tracing::warn!(lease = %self.config.name, "lease round timed out"),
                    }
                    next_round = Instant::now() + retry;
                }
            }
        }
        if *self.leader.borrow() {
            self.set(false);
            match tokio::time::timeout(retry, self.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %self.config.name, "released"),
                Ok(Err(e)) => tracing::warn!(error = %e, "releasing the lease"),
                Err(_) => tracing::warn!("releasing the lease timed out"),
            }
        }
    }

    /// Sets leadership; true if it changed.
    fn set(&self, leading: bool) -> bool {
        let changed = self.leader.send_if_modified(|l| {
            let changed = *l != leading;
            *l = leading;
            changed
        });
        if changed && leading {
            tracing::info!(lease = %self.config.name, identity = %self.config.identity, "leading: this replica rotates keys and publishes the bundle");
        } else if changed {
            tracing::info!(lease = %self.config.name, "no longer leading");
        }
        changed
    }

    /// Reads the Lease and creates, renews or takes it over if the rules allow.
    async fn round(&mut self, now: Instant) -> Result<Outcome, kube::Error> {
        let lease = self.api.get_opt(&self.config.name).await?;
        let step = decide(
            lease.as_ref(),
            &self.config.identity,
            &mut self.observed,
            now,
            self.config.duration,
        );
        let stamp = Some(MicroTime(Timestamp::now()));
        let secs = i32::try_from(self.config.duration.as_secs()).unwrap_or(i32::MAX);
        let written = match (step, lease) {
            (Step::Wait(holder), _) => return Ok(Outcome::Following(holder)),
            (Step::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.config.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: stamp.clone(),
                        renew_time: stamp,
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (step, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if step == Step::TakeOver {
                    spec.holder_identity = Some(self.config.identity.clone());
                    spec.acquire_time = stamp.clone();
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.renew_time = stamp;
                spec.lease_duration_seconds = Some(secs);
                // The lease carries the resourceVersion it was read with: a compare-and-swap.
                self.api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
            }
            // `decide` renews or takes over only a Lease it was given.
            (_, None) => return Ok(Outcome::Following(String::new())),
        };
        match written {
            Ok(_) => Ok(Outcome::Leading),
            // Someone else wrote first (renewed, took over, or created it).
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.observed = None;
                Ok(Outcome::Following("(another replica)".into()))
            }
            Err(e) => Err(e),
        }
    }

    /// Clears `holderIdentity` if this replica still holds the Lease, so another takes over
    /// at once instead of after D.
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.config.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn lease(holder: Option<&str>, version: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_duration_seconds: Some(15),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn missing_is_created_own_is_renewed_released_is_taken() {
        let now = Instant::now();
        let mut seen = None;
        assert_eq!(decide(None, "a", &mut seen, now, D), Step::Create);
        assert_eq!(
            decide(Some(&lease(Some("a"), "1")), "a", &mut seen, now, D),
            Step::Renew
        );
        assert_eq!(
            decide(Some(&lease(None, "2")), "a", &mut seen, now, D),
            Step::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(Some(""), "2")), "a", &mut seen, now, D),
            Step::TakeOver
        );
    }

    #[test]
    fn another_holder_is_waited_for_until_its_record_is_unchanged_for_d() {
        let t0 = Instant::now();
        let mut seen = None;
        let held = lease(Some("b"), "7");
        assert_eq!(
            decide(Some(&held), "a", &mut seen, t0, D),
            Step::Wait("b".into())
        );
        assert_eq!(
            decide(
                Some(&held),
                "a",
                &mut seen,
                t0 + D - Duration::from_millis(1),
                D
            ),
            Step::Wait("b".into())
        );
        // A renewal (new resourceVersion) restarts the observer's clock ...
        let renewed = lease(Some("b"), "8");
        assert_eq!(
            decide(Some(&renewed), "a", &mut seen, t0 + D, D),
            Step::Wait("b".into())
        );
        assert_eq!(
            decide(Some(&renewed), "a", &mut seen, t0 + D + D / 2, D),
            Step::Wait("b".into())
        );
        // ... and D after it was first seen unchanged, the Lease is taken over.
        assert_eq!(
            decide(Some(&renewed), "a", &mut seen, t0 + D + D, D),
            Step::TakeOver
        );
    }

    #[test]
    fn the_holders_stated_duration_is_the_one_waited_for() {
        let t0 = Instant::now();
        let mut seen = None;
        let mut long = lease(Some("b"), "1");
        long.spec.as_mut().unwrap().lease_duration_seconds = Some(60);
        decide(Some(&long), "a", &mut seen, t0, D);
        assert_eq!(
            decide(Some(&long), "a", &mut seen, t0 + D, D),
            Step::Wait("b".into())
        );
        assert_eq!(
            decide(Some(&long), "a", &mut seen, t0 + Duration::from_secs(60), D),
            Step::TakeOver
        );
    }
}
