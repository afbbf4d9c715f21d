//! The authority of one trust domain: an X.509 CA and a JWT signing key, each rotated on a
//! schedule (the lifecycle is in `state`), persisted so a restart keeps the bundle (and every
//! credential issued before) valid and resumes a rotation where it stopped.
//!
//! Every change is stored before it is used, and published before anything is signed with
//! a new key: the signing lock is held while the new bundle is sent.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use tokio::sync::watch;

use super::keys::{
    AuthorityConfig, AuthorityError, KeyChange, KeyEvent, MAX_JWT_LIFETIME, generate, parse_ca,
    parse_key,
};
use super::legacy;
use super::state::{KeyKind, KeyRing, KeySlot, KeyState, STATE_VERSION};
use super::store::{FileStore, Revision, StateStore, StoreError};
use crate::crypto::jwt::{JwtSigner, JwtSvidClaims};
use crate::crypto::x509::{CaSigner, Extension};
use crate::crypto::{PrivateKey, sha256_hex};
use crate::policy::X509_TTL_RANGE;
use crate::spiffe::{JwtKey, SpiffeBundle, SpiffeId, TrustDomain};

/// Signers parsed from one [`KeyRing`], in the same places.
struct Ring<T> {
    current: T,
    next: Option<T>,
    previous: Vec<T>,
}

impl<T> Ring<T> {
    fn parse(
        ring: &KeyRing,
        name: &str,
        parse: impl Fn(&KeySlot, &str) -> Result<T, AuthorityError>,
    ) -> Result<Self, AuthorityError> {
        Ok(Self {
            current: parse(&ring.current, &format!("{name}.current"))?,
            next: ring
                .next
                .as_ref()
                .map(|s| parse(s, &format!("{name}.next")))
                .transpose()?,
            previous: ring
                .previous
                .iter()
                .enumerate()
                .map(|(i, s)| parse(s, &format!("{name}.previous[{i}]")))
                .collect::<Result<_, _>>()?,
        })
    }

    /// In bundle order, as [`KeyRing::published`].
    fn published(&self) -> impl Iterator<Item = &T> {
        self.previous
            .iter()
            .chain(std::iter::once(&self.current))
            .chain(self.next.as_ref())
    }
}

/// The state in force and the signers made from it.
struct Live {
    state: KeyState,
    revision: Revision,
    ca: Ring<CaSigner>,
    jwt: Ring<JwtSigner>,
}

impl Live {
    fn new(state: KeyState, revision: Revision) -> Result<Self, AuthorityError> {
        Ok(Self {
            ca: Ring::parse(&state.x509, "x509", parse_ca)?,
            jwt: Ring::parse(&state.jwt, "jwt", |s, slot| {
                parse_key(&s.key, slot).map(JwtSigner::new)
            })?,
            state,
            revision,
        })
    }

    fn bundle(&self, config: &AuthorityConfig) -> SpiffeBundle {
        SpiffeBundle {
            x509_authorities: self.ca.published().map(|c| c.cert_der().to_vec()).collect(),
            jwt_authorities: self
                .jwt
                .published()
                .map(|j| JwtKey {
                    kid: j.kid().into(),
                    public_sec1: j.key().public_sec1(),
                })
                .collect(),
            sequence: self.state.sequence,
            refresh_hint_secs: config.refresh_hint.as_secs(),
        }
    }
}

/// A change made to the state, reported once it is stored.
struct Pending {
    kind: KeyKind,
    change: KeyChange,
    slot: KeySlot,
    notice: Option<Duration>,
    emergency: bool,
}

type Changes<'a> = dyn FnMut(&mut KeyState, &mut Vec<Pending>) -> Result<(), AuthorityError> + 'a;

/// The trust-domain authority.
pub struct Authority {
    td: TrustDomain,
    store: Box<dyn StateStore>,
    live: RwLock<Live>,
    /// Serializes state changes: each is a read-modify-write of the stored document.
    changing: Mutex<()>,
    bundle: watch::Sender<Arc<SpiffeBundle>>,
    /// The state's `reissue_epoch`, for node daemons (see [`Authority::subscribe_reissue`]).
    reissue: watch::Sender<u64>,
    config: AuthorityConfig,
    /// When the state in force was last read from or written to the store.
    confirmed: Mutex<Instant>,
    /// With a store other replicas write: how long signing may go on without confirming the
    /// state is still the stored one. `None`: this process is the store's only writer.
    max_unconfirmed: Option<Duration>,
}

const TD_FILE: &str = "trust-domain";

impl Authority {
    /// Loads the authority from `dir`, creating keys on first start and taking over the
    /// layout of earlier versions (one file per key).
    pub fn open(
        dir: &Path,
        td: TrustDomain,
        config: AuthorityConfig,
    ) -> Result<Self, AuthorityError> {
        Self::open_at(dir, td, config, SystemTime::now())
    }

    /// [`Authority::open`] at `now`.
    pub fn open_at(
        dir: &Path,
        td: TrustDomain,
        config: AuthorityConfig,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        config.validate()?;
        let files = FileStore::open(dir)?;
        match files.read(TD_FILE)? {
            Some(found) if found.trim() != td.as_str() => {
                return Err(AuthorityError::TrustDomainMismatch {
                    found: found.trim().into(),
                    wanted: td,
                });
            }
            Some(_) => {}
            None => files.write(TD_FILE, td.as_str().as_bytes())?,
        }
        if files.load()?.is_none()
            && let Some(state) = legacy::read(&files, &td, &config, now)?
        {
            files.save(&state, None)?;
        }
        // Only once the state document is stored: a crash before leaves them to migrate again.
        legacy::remove(&files)?;
        Self::open_with(Box::new(files), td, config, now)
    }

    /// Loads the authority from `store`, creating keys at `now` if it holds none.
    pub fn open_with(
        store: Box<dyn StateStore>,
        td: TrustDomain,
        config: AuthorityConfig,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        config.validate()?;
        let (state, revision) = match store.load()? {
            Some(stored) => stored,
            None => {
                let state = KeyState {
                    version: STATE_VERSION,
                    trust_domain: td.as_str().into(),
                    sequence: 1,
                    x509: KeyRing::starting(generate(&td, &config, KeyKind::X509Ca, now)?, now),
                    jwt: KeyRing::starting(generate(&td, &config, KeyKind::Jwt, now)?, now),
                    reissue_epoch: 0,
                };
                let revision = store.save(&state, None)?;
                (state, revision)
            }
        };
        if state.trust_domain != td.as_str() {
            return Err(AuthorityError::TrustDomainMismatch {
                found: state.trust_domain,
                wanted: td,
            });
        }
        let live = Live::new(state, revision)?;
        let bundle = Arc::new(live.bundle(&config));
        let reissue = watch::Sender::new(live.state.reissue_epoch);
        Ok(Self {
            td,
            store,
            live: RwLock::new(live),
            changing: Mutex::new(()),
            bundle: watch::Sender::new(bundle),
            reissue,
            config,
            confirmed: Mutex::new(Instant::now()),
            max_unconfirmed: None,
        })
    }

    /// Refuses to sign once the state in force has not been confirmed with the store (by a
    /// read or write, e.g. [`Authority::reload`]) for `limit`: with replicas sharing the
    /// store, a replica cut off from it could otherwise sign with a key the others have
    /// retired. `limit` must stay below the retirement grace ([`super::state::RETIRE_GRACE`]), which
    /// covers what such a replica signed before it stopped.
    pub fn require_confirmation(mut self, limit: Duration) -> Self {
        self.max_unconfirmed = Some(limit);
        self
    }

    fn confirm(&self) {
        *self.confirmed.lock().expect("confirmed lock") = Instant::now();
    }

    /// Whether signing is allowed: the state in force was confirmed recently enough.
    pub fn check_confirmed(&self) -> Result<(), AuthorityError> {
        let Some(limit) = self.max_unconfirmed else {
            return Ok(());
        };
        let age = self.confirmed.lock().expect("confirmed lock").elapsed();
        if age > limit {
            return Err(AuthorityError::Unconfirmed(age, limit));
        }
        Ok(())
    }

    /// The trust domain this authority signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The current bundle.
    pub fn bundle(&self) -> Arc<SpiffeBundle> {
        self.bundle.borrow().clone()
    }

    /// A receiver that sees every bundle change, always before anything is signed with a key
    /// the change added.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SpiffeBundle>> {
        self.bundle.subscribe()
    }

    /// Changes after every emergency rotation (its value only grows), once the bundle with
    /// the new key is out: holders of SVIDs should have them signed again.
    pub fn subscribe_reissue(&self) -> watch::Receiver<u64> {
        self.reissue.subscribe()
    }

    /// The SPIFFE bundle document (JWK Set with `x509-svid` and `jwt-svid` keys).
    pub fn bundle_document(&self) -> Vec<u8> {
        let live = self.live.read().expect("keys lock");
        let x509: Vec<(Vec<u8>, Vec<u8>)> = live
            .ca
            .published()
            .map(|ca| (ca.cert_der().to_vec(), ca.key().public_sec1()))
            .collect();
        self.bundle().to_spiffe_json(&x509)
    }

    /// Signs an X509-SVID for `id` over `spki_der`; returns the chain, leaf first. The TTL is
    /// capped at the policy maximum and at the CA's notAfter: retirement relies on both.
    pub fn sign_x509_svid(
        &self,
        id: &SpiffeId,
        spki_der: &[u8],
        ttl: Duration,
        extensions: &[Extension],
    ) -> Result<Vec<Vec<u8>>, AuthorityError> {
        self.check_td(id)?;
        self.check_confirmed()?;
        let ttl = ttl.min(X509_TTL_RANGE.1);
        let live = self.live.read().expect("keys lock");
        let leaf = live
            .ca
            .current
            .sign_leaf(id, spki_der, ttl, extensions)
            .map_err(AuthorityError::SignX509)?;
        // The CA signs leaves directly, so the chain is the leaf alone (SPIRE's default).
        Ok(vec![leaf])
    }

    /// Signs a JWT-SVID for `id` and `audience`, valid for `ttl` (at most
    /// [`MAX_JWT_LIFETIME`], which retirement relies on), carrying `extra` claims.
    pub fn sign_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        extra: Map<String, Value>,
    ) -> Result<String, AuthorityError> {
        self.check_td(id)?;
        self.check_confirmed()?;
        let ttl = ttl.min(MAX_JWT_LIFETIME);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = JwtSvidClaims {
            sub: id.to_string(),
            aud: audience.to_vec(),
            exp: now + ttl.as_secs().max(1) as i64,
            iat: now,
            iss: self.td.id_string(),
            jti: uuid::Uuid::new_v4().to_string(),
            extra,
        };
        let live = self.live.read().expect("keys lock");
        live.jwt
            .current
            .sign("JWT", &claims)
            .map_err(AuthorityError::SignJwt)
    }

    /// Runs `f` with the JWT key that signs now, for credentials whose claims another module
    /// builds and checks (task tokens: `token::mint`, `token::delegate`, which cap lifetimes
    /// at `token::MAX_TTL`). The key stays here.
    pub fn with_jwt_signer<R>(&self, f: impl FnOnce(&JwtSigner) -> R) -> R {
        let live = self.live.read().expect("keys lock");
        f(&live.jwt.current)
    }

    fn check_td(&self, id: &SpiffeId) -> Result<(), AuthorityError> {
        if id.trust_domain() != &self.td {
            return Err(AuthorityError::ForeignId(id.clone(), self.td.clone()));
        }
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &AuthorityConfig {
        &self.config
    }

    /// A copy of the key state in force.
    #[cfg(test)]
    pub(super) fn key_state(&self) -> KeyState {
        self.live.read().expect("keys lock").state.clone()
    }

    /// The earliest time at which [`Authority::tick`] has something to do (may be past).
    pub fn rotation_due(&self) -> SystemTime {
        let live = self.live.read().expect("keys lock");
        KeyKind::ALL
            .iter()
            .map(|k| live.state.ring(*k).next_due(&self.config.lifecycle(*k)))
            .min()
            .expect("two key kinds")
    }

    /// Does whatever the schedule says is due at `now`: retire previous keys, activate next
    /// keys, prepare next keys. Returns what changed, for the audit trail.
    pub fn tick(&self, now: SystemTime) -> Result<Vec<KeyEvent>, AuthorityError> {
        self.change(&mut |state, out| {
            for kind in KeyKind::ALL {
                self.advance(state, kind, now, out)?;
            }
            Ok(())
        })
    }

    /// Emergency rotation of `kind`: the published next key signs from now on. Without one, a
    /// new key is made and is in the bundle only from the moment it signs, so peers reject
    /// what it signs until they refresh their bundle; the events say so (`notice` is zero).
    /// The old key stays trusted as previous, as in a scheduled rotation.
    pub fn rotate_now(&self, kind: KeyKind) -> Result<Vec<KeyEvent>, AuthorityError> {
        self.rotate_now_at(kind, SystemTime::now())
    }

    /// [`Authority::rotate_now`] at `now`.
    pub fn rotate_now_at(
        &self,
        kind: KeyKind,
        now: SystemTime,
    ) -> Result<Vec<KeyEvent>, AuthorityError> {
        self.change(&mut |state, out| {
            let ring = state.ring_mut(kind);
            if ring.next.is_none() {
                let slot = generate(&self.td, &self.config, kind, now)?;
                out.push(Pending {
                    kind,
                    change: KeyChange::Prepared,
                    slot: slot.clone(),
                    notice: None,
                    emergency: true,
                });
                ring.next = Some(slot);
            }
            let notice = notice_of(ring, now);
            ring.activate(now);
            out.push(Pending {
                kind,
                change: KeyChange::Activated,
                slot: ring.current.clone(),
                notice: Some(notice),
                emergency: true,
            });
            state.reissue_epoch += 1;
            Ok(())
        })
    }

    /// The scheduled steps of one kind that are due at `now`.
    fn advance(
        &self,
        state: &mut KeyState,
        kind: KeyKind,
        now: SystemTime,
        out: &mut Vec<Pending>,
    ) -> Result<(), AuthorityError> {
        let rules = self.config.lifecycle(kind);
        let ring = state.ring_mut(kind);
        // Activation can make a preparation due at once (after downtime); a few rounds settle.
        for _ in 0..4 {
            if ring.activate_at(&rules).is_some_and(|t| t <= now) {
                let notice = notice_of(ring, now);
                ring.activate(now);
                out.push(Pending {
                    kind,
                    change: KeyChange::Activated,
                    slot: ring.current.clone(),
                    notice: Some(notice),
                    emergency: false,
                });
            } else if ring.prepare_at(&rules).is_some_and(|t| t <= now) {
                let slot = generate(&self.td, &self.config, kind, now)?;
                ring.next = Some(slot.clone());
                out.push(Pending {
                    kind,
                    change: KeyChange::Prepared,
                    slot,
                    notice: None,
                    emergency: false,
                });
            } else {
                break;
            }
        }
        // Last, so a CA that expired while the authority was down goes in the same step.
        for slot in ring.retire_due(&rules, now) {
            out.push(Pending {
                kind,
                change: KeyChange::Retired,
                slot,
                notice: None,
                emergency: false,
            });
        }
        Ok(())
    }

    /// Applies `changes` to a copy of the state, stores it (compare-and-swap), then makes it
    /// live and publishes its bundle while holding the signing lock. If another writer changed
    /// the stored state since it was read, starts again from theirs once.
    fn change(&self, changes: &mut Changes<'_>) -> Result<Vec<KeyEvent>, AuthorityError> {
        let _changing = self.changing.lock().expect("changing lock");
        let mut reloaded = false;
        loop {
            let (mut state, revision) = {
                let live = self.live.read().expect("keys lock");
                (live.state.clone(), live.revision.clone())
            };
            let before: Vec<String> = state
                .published_keys()
                .into_iter()
                .map(str::to_owned)
                .collect();
            let mut pending = Vec::new();
            changes(&mut state, &mut pending)?;
            if pending.is_empty() {
                return Ok(Vec::new());
            }
            if state.published_keys() != before {
                state.sequence += 1;
            }
            match self.store.save(&state, Some(&revision)) {
                Ok(revision) => {
                    let sequence = state.sequence;
                    self.install(Live::new(state, revision)?);
                    self.confirm();
                    return Ok(pending.into_iter().map(|p| event(p, sequence)).collect());
                }
                Err(StoreError::Conflict(what)) if !reloaded => {
                    reloaded = true;
                    let Some((state, revision)) = self.store.load()? else {
                        return Err(StoreError::Conflict(what).into());
                    };
                    self.install(Live::new(state, revision)?);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Takes up the stored state if another replica changed it (a rotation by the Lease
    /// holder, an emergency rotation through another replica's admin socket). Returns whether
    /// the state in force changed; its bundle is published as for a change made here.
    pub fn reload(&self) -> Result<bool, AuthorityError> {
        let _changing = self.changing.lock().expect("changing lock");
        let Some((state, revision)) = self.store.load()? else {
            return Ok(false);
        };
        if revision == self.live.read().expect("keys lock").revision {
            self.confirm();
            return Ok(false);
        }
        if state.trust_domain != self.td.as_str() {
            return Err(AuthorityError::TrustDomainMismatch {
                found: state.trust_domain,
                wanted: self.td.clone(),
            });
        }
        self.install(Live::new(state, revision)?);
        self.confirm();
        Ok(true)
    }

    /// Makes `live` the state in force. The bundle is sent while the signing lock is held, so
    /// nothing is signed with a key before the bundle that carries it is out.
    fn install(&self, live: Live) {
        let bundle = Arc::new(live.bundle(&self.config));
        let epoch = live.state.reissue_epoch;
        let mut guard = self.live.write().expect("keys lock");
        *guard = live;
        self.bundle.send_if_modified(|b| {
            let changed = **b != *bundle;
            if changed {
                *b = bundle;
            }
            changed
        });
        // After the bundle: what is re-signed now verifies against what holders have.
        self.reissue.send_if_modified(|e| {
            let changed = *e != epoch;
            *e = epoch;
            changed
        });
    }
}

/// How long the next key of `ring` has been published at `now`.
fn notice_of(ring: &KeyRing, now: SystemTime) -> Duration {
    ring.next
        .as_ref()
        .and_then(|n| now.duration_since(n.published_at).ok())
        .unwrap_or_default()
}

fn event(p: Pending, sequence: u64) -> KeyEvent {
    let (fingerprint, kid) = match p.kind {
        KeyKind::X509Ca => {
            let der = p
                .slot
                .cert
                .as_deref()
                .and_then(|c| pem::parse(c).ok())
                .map(|c| c.into_contents())
                .unwrap_or_default();
            (sha256_hex(&der), None)
        }
        KeyKind::Jwt => match PrivateKey::from_pkcs8_pem(&p.slot.key) {
            Ok(k) => (sha256_hex(&k.spki_der()), Some(k.kid())),
            Err(_) => (sha256_hex(p.slot.key.as_bytes()), None),
        },
    };
    KeyEvent {
        kind: p.kind,
        change: p.change,
        fingerprint,
        kid,
        not_after: p.slot.not_after,
        notice: p.notice,
        emergency: p.emergency,
        sequence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::x509::CertInfo;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn task_tokens_signed_with_the_authority_key_verify_against_its_bundle() {
        use crate::token::{self, Caller, MintRequest, TokenRules};
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(dir.path(), td(), AuthorityConfig::default()).unwrap();
        let caller = Caller {
            id: "spiffe://example.org/agent/orchestrator".parse().unwrap(),
            cid: None,
        };
        let rules = TokenRules {
            audiences: vec!["ledger".into()],
            scopes: vec!["ledger:read".into()],
            ..TokenRules::default()
        };
        let req = MintRequest {
            audience: vec!["ledger".into()],
            scopes: vec!["ledger:read".into()],
            ..MintRequest::default()
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let jwt = a
            .with_jwt_signer(|s| token::mint(req, &caller, &rules, s, &td(), now))
            .unwrap()
            .token;
        let bundle = a.bundle();
        let claims = token::verify(
            &jwt,
            "ledger",
            Some(&caller.id),
            |t| (t == &td()).then_some(&*bundle),
            now,
        )
        .unwrap();
        assert_eq!(claims.act.sub, caller.id);
        // Another authority's bundle does not verify it.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Authority::open(other_dir.path(), td(), AuthorityConfig::default()).unwrap();
        let other_bundle = other.bundle();
        assert!(token::verify(&jwt, "ledger", None, |_| Some(&*other_bundle), now).is_err());
    }

    #[test]
    fn restart_keeps_bundle_and_mismatched_td_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(dir.path(), td(), AuthorityConfig::default()).unwrap();
        let b1 = a.bundle();
        drop(a);
        let a = Authority::open(dir.path(), td(), AuthorityConfig::default()).unwrap();
        assert_eq!(*a.bundle(), *b1);
        let err = Authority::open(
            dir.path(),
            TrustDomain::new("other.org").unwrap(),
            AuthorityConfig::default(),
        )
        .err()
        .unwrap();
        assert!(
            matches!(err, AuthorityError::TrustDomainMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn corrupt_state_is_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(Authority::open(dir.path(), td(), AuthorityConfig::default()).unwrap());
        let path = dir.path().join("keys.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let state = KeyState::from_json(&text).unwrap();
        // A key that does not parse names its slot ...
        let quoted = serde_json::to_string(&state.jwt.current.key).unwrap();
        let broken = text.replace(&quoted, "\"garbage\"");
        std::fs::write(&path, broken).unwrap();
        let err = Authority::open(dir.path(), td(), AuthorityConfig::default())
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("jwt.current:"), "{err}");
        // ... and a document that does not parse names the file.
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        let err = Authority::open(dir.path(), td(), AuthorityConfig::default())
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("keys.json: not a valid document"),
            "{err}"
        );
    }

    #[test]
    fn a_replica_that_cannot_confirm_its_keys_stops_signing_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let a = Authority::open_with(
            Box::new(store.clone()),
            td(),
            AuthorityConfig::default(),
            SystemTime::now(),
        )
        .unwrap()
        .require_confirmation(Duration::from_millis(50));
        let k = PrivateKey::generate().unwrap();
        let id = td().id("/w").unwrap();
        let sign =
            |a: &Authority| a.sign_x509_svid(&id, &k.spki_der(), Duration::from_secs(60), &[]);
        sign(&a).unwrap();
        std::thread::sleep(Duration::from_millis(80));
        let err = sign(&a).unwrap_err();
        assert!(matches!(err, AuthorityError::Unconfirmed(..)), "{err}");
        assert!(
            err.to_string()
                .contains("not been confirmed with the store"),
            "{err}"
        );
        assert!(
            a.sign_jwt_svid(&id, &["x".into()], Duration::from_secs(60), Map::new())
                .is_err()
        );
        // Reading the store, unchanged, confirms it again.
        assert!(!a.reload().unwrap());
        sign(&a).unwrap();
        // Another writer's change is taken up (and confirms as well).
        let b = Authority::open_with(
            Box::new(store),
            td(),
            AuthorityConfig::default(),
            SystemTime::now(),
        )
        .unwrap();
        b.rotate_now(KeyKind::X509Ca).unwrap();
        assert!(a.reload().unwrap());
        assert_eq!(a.bundle().x509_authorities, b.bundle().x509_authorities);
        assert_eq!(a.bundle().sequence, b.bundle().sequence);
    }

    #[test]
    fn signs_only_its_own_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(dir.path(), td(), AuthorityConfig::default()).unwrap();
        let k = PrivateKey::generate().unwrap();
        let id = td().id("/w").unwrap();
        let chain = a
            .sign_x509_svid(&id, &k.spki_der(), Duration::from_secs(60), &[])
            .unwrap();
        assert_eq!(CertInfo::parse(&chain[0]).unwrap().spiffe_id, Some(id));
        let foreign: SpiffeId = "spiffe://other.org/w".parse().unwrap();
        assert!(matches!(
            a.sign_x509_svid(&foreign, &k.spki_der(), Duration::from_secs(60), &[]),
            Err(AuthorityError::ForeignId(..))
        ));
        assert!(
            a.sign_jwt_svid(&foreign, &["a".into()], Duration::from_secs(60), Map::new())
                .is_err()
        );
    }
}
