//! The authority's key state: for the CA and for the JWT key, a `current` key that signs, an
//! optional `next` key already published in the bundle, and `previous` keys that no longer
//! sign but stay in the bundle until everything they signed has expired. One serializable
//! document, written as a whole, so a store replaces it atomically (a file here, a Kubernetes
//! Secret later) and a crash never leaves half a rotation behind.
//!
//! The schedule is a pure function of this document, the configuration and the time, so an
//! authority that restarts mid-rotation resumes where it stopped.
//!
//! # Lifecycle of one key (L = its kind's lifetime, P = prepare-ahead)
//!
//! - **prepare**: `next` is generated, stored and published `P` before the current key's
//!   signing period ends. Its validity (the CA certificate's, or the JWT key's recorded one)
//!   starts then and lasts `L`.
//! - **activate**: at `max(end of current's signing period, next published + P)` next becomes
//!   current and the old current becomes previous. A key signs for half of what is left of
//!   its validity when it is activated (at most `L/2`), so the second half covers what it
//!   signed. A CA that has expired (after downtime) is replaced at once, without notice.
//! - **retire**: a previous key leaves the bundle when nothing it signed can still be valid:
//!   CA at `min(deactivated + max X509-SVID TTL, its notAfter)` (SVIDs never outlive their CA);
//!   JWT key at `deactivated + max JWT lifetime` (JWT-SVIDs and task tokens: 1 h), each plus a
//!   clock-skew grace.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The two kinds of signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// The X.509 CA that signs X509-SVIDs.
    X509Ca,
    /// The key that signs JWT-SVIDs and task tokens.
    Jwt,
}

impl KeyKind {
    /// Both kinds, CA first.
    pub const ALL: [KeyKind; 2] = [KeyKind::X509Ca, KeyKind::Jwt];
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyKind::X509Ca => "CA",
            KeyKind::Jwt => "JWT key",
        })
    }
}

/// Version of the document layout; a document of another version is refused, not rewritten.
pub const STATE_VERSION: u32 = 1;

/// Everything the authority keeps: its keys and the bundle sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyState {
    pub version: u32,
    pub trust_domain: String,
    /// Sequence number of the bundle these keys make; bumped whenever the published set changes.
    pub sequence: u64,
    pub x509: KeyRing,
    pub jwt: KeyRing,
    /// Bumped by every emergency rotation: node daemons then re-sign every SVID they hold,
    /// instead of serving ones from the replaced key until their half-life.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reissue_epoch: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The keys of one kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRing {
    pub current: KeySlot,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<KeySlot>,
    /// Oldest first. Usually at most one; an emergency rotation can add another before the
    /// last one is retired, and a key never leaves the bundle early for lack of a slot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<KeySlot>,
}

/// One key with its schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySlot {
    /// PKCS#8 PEM private key.
    pub key: String,
    /// PEM certificate (CA only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// When it entered the bundle.
    #[serde(with = "humantime_serde")]
    pub published_at: SystemTime,
    /// End of its validity: the CA certificate's notAfter; for a JWT key, published + lifetime.
    #[serde(with = "humantime_serde")]
    pub not_after: SystemTime,
    /// When it started signing.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub activated_at: Option<SystemTime>,
    /// When it stopped signing.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub deactivated_at: Option<SystemTime>,
}

impl KeyState {
    /// Parses a stored document; the error says why it is not one.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let state: KeyState = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if state.version != STATE_VERSION {
            return Err(format!(
                "version {} (this agentid reads version {STATE_VERSION})",
                state.version
            ));
        }
        Ok(state)
    }

    /// The document as stored.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("key state serializes")
    }

    /// The keys of `kind`.
    pub fn ring(&self, kind: KeyKind) -> &KeyRing {
        match kind {
            KeyKind::X509Ca => &self.x509,
            KeyKind::Jwt => &self.jwt,
        }
    }

    /// The keys of `kind`, to change.
    pub fn ring_mut(&mut self, kind: KeyKind) -> &mut KeyRing {
        match kind {
            KeyKind::X509Ca => &mut self.x509,
            KeyKind::Jwt => &mut self.jwt,
        }
    }

    /// The private keys in the bundle, in bundle order: what decides whether it changed.
    pub fn published_keys(&self) -> Vec<&str> {
        KeyKind::ALL
            .iter()
            .flat_map(|k| self.ring(*k).published())
            .map(|s| s.key.as_str())
            .collect()
    }
}

impl KeyRing {
    /// A ring of one key that signs from `now`.
    pub fn starting(mut current: KeySlot, now: SystemTime) -> Self {
        current.activated_at = Some(now);
        Self {
            current,
            next: None,
            previous: Vec::new(),
        }
    }

    /// The keys in the bundle, oldest first: previous, current, next. Activation does not
    /// change this order, so it does not change the bundle.
    pub fn published(&self) -> impl Iterator<Item = &KeySlot> {
        self.previous
            .iter()
            .chain(std::iter::once(&self.current))
            .chain(self.next.as_ref())
    }

    /// Makes `next` current at `now`; the old current becomes the newest previous key.
    /// Returns false (and changes nothing) when there is no next key.
    pub fn activate(&mut self, now: SystemTime) -> bool {
        let Some(mut next) = self.next.take() else {
            return false;
        };
        next.activated_at = Some(now);
        let mut old = std::mem::replace(&mut self.current, next);
        old.deactivated_at = Some(now);
        self.previous.push(old);
        true
    }

    /// Removes and returns the previous keys whose retirement time has come.
    pub fn retire_due(&mut self, rules: &Lifecycle, now: SystemTime) -> Vec<KeySlot> {
        let (gone, kept) = std::mem::take(&mut self.previous)
            .into_iter()
            .partition(|p| rules.retire_at(p) <= now);
        self.previous = kept;
        gone
    }

    /// When the current key stops signing (if a next key is ready by then).
    pub fn signing_ends(&self, rules: &Lifecycle) -> SystemTime {
        let cur = &self.current;
        let active = cur.activated_at.unwrap_or(cur.published_at);
        let left = cur.not_after.duration_since(active).unwrap_or_default();
        active + left.min(rules.ttl) / 2
    }

    /// When the next key should be prepared, if there is none.
    pub fn prepare_at(&self, rules: &Lifecycle) -> Option<SystemTime> {
        if self.next.is_some() {
            return None;
        }
        let end = self.signing_ends(rules);
        Some(end.checked_sub(rules.prepare_ahead).unwrap_or(end))
    }

    /// When the next key, if there is one, becomes current: not before it has been published
    /// for `prepare_ahead`, unless the current key cannot sign any more (a CA past its
    /// notAfter, after downtime). A JWT key has no such limit and keeps signing meanwhile.
    pub fn activate_at(&self, rules: &Lifecycle) -> Option<SystemTime> {
        let next = self.next.as_ref()?;
        let announced = next.published_at + rules.prepare_ahead;
        let at = self.signing_ends(rules).max(announced);
        Some(if rules.credentials_capped {
            at.min(self.current.not_after)
        } else {
            at
        })
    }

    /// The earliest time at which something is due for this ring.
    pub fn next_due(&self, rules: &Lifecycle) -> SystemTime {
        let step = self
            .activate_at(rules)
            .or_else(|| self.prepare_at(rules))
            .expect("either a next key to activate or one to prepare");
        self.previous
            .iter()
            .map(|p| rules.retire_at(p))
            .fold(step, SystemTime::min)
    }
}

/// How long after the last credential a key signed could expire it stays trusted: covers
/// clock skew between the authority and verifiers (JWT validation allows 30 s of leeway).
pub const RETIRE_GRACE: Duration = Duration::from_secs(5 * 60);

/// The rules of one key kind.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    /// Configured lifetime of a new key.
    pub ttl: Duration,
    /// How long a key is published before it signs.
    pub prepare_ahead: Duration,
    /// Longest lifetime of anything the key signs.
    pub max_credential_ttl: Duration,
    /// Whether what the key signs never outlives the key (X.509: SVIDs are capped at the
    /// CA's notAfter), so it can be retired at its own expiry at the latest.
    pub credentials_capped: bool,
}

impl Lifecycle {
    /// When a previous key leaves the bundle.
    pub fn retire_at(&self, slot: &KeySlot) -> SystemTime {
        let stopped = slot
            .deactivated_at
            .or(slot.activated_at)
            .unwrap_or(slot.published_at);
        let last_expiry = stopped + self.max_credential_ttl + RETIRE_GRACE;
        if self.credentials_capped {
            last_expiry.min(slot.not_after)
        } else {
            last_expiry
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(published: u64, life: u64) -> KeySlot {
        KeySlot {
            key: format!("k{published}"),
            cert: None,
            published_at: at(published),
            not_after: at(published + life),
            activated_at: None,
            deactivated_at: None,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    const RULES: Lifecycle = Lifecycle {
        ttl: Duration::from_secs(1000),
        prepare_ahead: Duration::from_secs(100),
        max_credential_ttl: Duration::from_secs(3600),
        credentials_capped: true,
    };

    #[test]
    fn a_scheduled_key_signs_half_its_remaining_life_after_notice() {
        let mut ring = KeyRing::starting(slot(0, 1000), at(0));
        assert_eq!(ring.signing_ends(&RULES), at(500));
        assert_eq!(ring.prepare_at(&RULES), Some(at(400)));
        ring.next = Some(slot(400, 1000));
        assert_eq!(ring.activate_at(&RULES), Some(at(500)));
        assert!(ring.activate(at(500)));
        // Published at 400, valid until 1400, active from 500: signs until 950.
        assert_eq!(ring.signing_ends(&RULES), at(950));
        assert_eq!(ring.prepare_at(&RULES), Some(at(850)));
        // Capped credentials: the old CA goes at its own notAfter.
        assert_eq!(RULES.retire_at(&ring.previous[0]), at(1000));
        assert_eq!(ring.next_due(&RULES), at(850));
    }

    #[test]
    fn activation_waits_for_notice_unless_the_current_key_expires() {
        let mut ring = KeyRing::starting(slot(0, 1000), at(0));
        // Prepared late (the authority was down): it still gets its notice ...
        ring.next = Some(slot(700, 1000));
        assert_eq!(ring.activate_at(&RULES), Some(at(800)));
        // ... but not past the current CA's expiry ...
        ring.next = Some(slot(950, 1000));
        assert_eq!(ring.activate_at(&RULES), Some(at(1000)));
        // ... while a JWT key, which signs as well after its nominal end, waits for the notice.
        let jwt = Lifecycle {
            credentials_capped: false,
            ..RULES
        };
        assert_eq!(ring.activate_at(&jwt), Some(at(1050)));
    }

    #[test]
    fn uncapped_keys_stay_for_the_longest_credential_plus_grace() {
        let rules = Lifecycle {
            credentials_capped: false,
            ..RULES
        };
        let mut s = slot(0, 1000);
        s.deactivated_at = Some(at(500));
        assert_eq!(rules.retire_at(&s), at(500 + 3600) + RETIRE_GRACE);
    }

    #[test]
    fn document_round_trips_with_sub_second_times() {
        let mut s = slot(0, 1000);
        s.published_at += Duration::from_nanos(123_456_789);
        let state = KeyState {
            version: STATE_VERSION,
            trust_domain: "example.org".into(),
            sequence: 3,
            x509: KeyRing::starting(s.clone(), s.published_at),
            jwt: KeyRing {
                current: s.clone(),
                next: Some(s.clone()),
                previous: vec![s],
            },
            reissue_epoch: 2,
        };
        assert_eq!(KeyState::from_json(&state.to_json()).unwrap(), state);
        let other = state.to_json().replace("\"version\": 1", "\"version\": 2");
        assert!(
            KeyState::from_json(&other)
                .unwrap_err()
                .contains("version 2")
        );
    }
}
