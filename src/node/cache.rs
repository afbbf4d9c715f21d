//! The SVID cache: the node daemon answers fetches from memory.
//!
//! One X509-SVID per (SPIFFE ID, TTL, extensions), issued on first use and shared by every
//! workload entitled to it. A background worker renews each one at about half its lifetime
//! (with jitter, so a fleet does not renew in lockstep), keeps the still-valid SVID when a
//! renewal fails and retries with backoff, and at refresh time forgets an SVID that no open
//! stream holds and nobody fetched since it was issued. Every change bumps a generation
//! counter that open streams watch.
//!
//! Timers use tokio's clock, so the rotation logic is tested under paused time.

use hashbrown::{Equivalent, HashMap};
use prost::bytes::Bytes;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::issuer::{IssueError, JwtRequest, SvidIssuer, X509Request};
use crate::audit::{
    Action, Attestation, AuditEvent, AuditLog, Credential, CredentialKind, Decision, Identity,
    Requester,
};
use crate::crypto::WorkloadKey;
use crate::crypto::x509::{CertInfo, Extension};
use crate::metrics::{IdLabels, KindLabels, NodeMetrics};
use crate::spiffe::SpiffeId;

/// What identifies one cached X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SvidKey {
    pub spiffe_id: SpiffeId,
    pub ttl: Duration,
    pub extensions: Vec<Extension>,
}

/// An [`SvidKey`] made of borrowed parts: a fetch looks its SVID up without building (and
/// allocating) a key. It hashes as the key it stands for (same fields, same order; a slice
/// hashes as the `Vec` holding it).
#[derive(Debug, Clone, Copy, Hash)]
pub struct SvidKeyRef<'a> {
    pub spiffe_id: &'a SpiffeId,
    pub ttl: Duration,
    pub extensions: &'a [Extension],
}

impl Equivalent<SvidKey> for SvidKeyRef<'_> {
    fn equivalent(&self, key: &SvidKey) -> bool {
        *self.spiffe_id == key.spiffe_id && self.ttl == key.ttl && self.extensions == key.extensions
    }
}

impl SvidKeyRef<'_> {
    fn to_key(self) -> SvidKey {
        SvidKey {
            spiffe_id: self.spiffe_id.clone(),
            ttl: self.ttl,
            extensions: self.extensions.to_vec(),
        }
    }
}

/// An X509-SVID with its private key, as handed to workloads.
pub struct X509Svid {
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first, concatenated as the Workload API sends them.
    pub chain_der: Bytes,
    /// Unencrypted PKCS#8 DER.
    pub key_pkcs8: Bytes,
    pub not_after: SystemTime,
    pub serial: String,
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// Who asked, for the audit trail.
#[derive(Debug, Clone, Default)]
pub struct IssueContext {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub selectors: Vec<String>,
    pub policy: String,
    /// The composite identity the credential states (cid, model, digests), if any.
    pub identity: Identity,
    /// What the node attested, for an issuer that checks it.
    pub workload: Arc<super::issuer::WorkloadClaims>,
}

struct Slot {
    current: Option<Arc<X509Svid>>,
    /// When the worker renews it.
    refresh_at: Instant,
    /// Someone fetched the current SVID after it was issued.
    used_since_issue: bool,
    /// Shared with every [`Hold`] on this SVID: it is renewed for as long as one is alive.
    held: Arc<()>,
    backoff: Duration,
    context: IssueContext,
}

impl Slot {
    fn hold(&self) -> Hold {
        Hold {
            _count: self.held.clone(),
        }
    }
}

/// What identifies one cached JWT-SVID. Its only extra claims are those of the composite
/// identity it states, which that identity's `cid` (a digest of all of it) stands for: the
/// key is built per fetch without serializing any claims.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JwtKey {
    pub spiffe_id: SpiffeId,
    pub audience: Vec<String>,
    pub ttl: Duration,
    /// The `cid` of the composite identity the token states, if any.
    pub cid: Option<String>,
}

struct JwtEntry {
    token: String,
    refresh_at: Instant,
}

/// Shortest wait between failed renewals, and the cap of the exponential backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const JWT_CACHE_MAX: usize = 10_000;

/// Looked up several times on every call. foldhash hashes the keys (SPIFFE IDs, audiences)
/// several times faster than SipHash. Its seed is random per map, so a caller choosing
/// audiences cannot aim for collisions, and the maps are bounded (JWTs at [`JWT_CACHE_MAX`]).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

struct Inner {
    issuer: Arc<dyn SvidIssuer>,
    slots: Mutex<Map<SvidKey, Slot>>,
    issuing: tokio::sync::Mutex<()>,
    jwts: Mutex<Map<JwtKey, JwtEntry>>,
    generation: watch::Sender<u64>,
    wake: Arc<Notify>,
    audit: AuditLog,
    metrics: NodeMetrics,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the worker notice that the cache is gone and exit.
        self.wake.notify_one();
    }
}

/// Keeps one cached X509-SVID renewed while it is alive, even if nothing fetches it: an
/// open stream keeps the holds of the SVIDs it serves. A count shared with the slot, so
/// taking and releasing one touches no lock.
#[derive(Debug)]
pub struct Hold {
    _count: Arc<()>,
}

/// Cheap cloneable handle to the cache and its renewal worker.
#[derive(Clone)]
pub struct SvidCache {
    inner: Arc<Inner>,
}

impl SvidCache {
    /// Creates the cache and starts its renewal worker on the current runtime.
    pub fn new(issuer: Arc<dyn SvidIssuer>, audit: AuditLog, metrics: NodeMetrics) -> Self {
        let wake = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            issuer,
            slots: Mutex::default(),
            issuing: tokio::sync::Mutex::new(()),
            jwts: Mutex::default(),
            generation: watch::Sender::new(0),
            wake: wake.clone(),
            audit,
            metrics,
        });
        let reissue = inner.issuer.reissue();
        tokio::spawn(worker(Arc::downgrade(&inner), wake, reissue));
        Self { inner }
    }

    /// Changes whenever a cached SVID is renewed or forgotten.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// The SVID for `key`, issuing it if there is none or the cached one has expired, and a
    /// hold on it. `ctx` (who asked, for the audit record) is awaited only when an SVID is
    /// issued.
    pub async fn x509(
        &self,
        key: SvidKeyRef<'_>,
        ctx: impl Future<Output = IssueContext>,
    ) -> Result<(Arc<X509Svid>, Hold), IssueError> {
        if let Some(found) = self.cached(key) {
            return Ok(found);
        }
        // Boxed: a future keeps room for its largest branch, and this one is rare next to
        // hits; inline, every fetch would carry it.
        Box::pin(self.issue_x509(key, ctx)).await
    }

    async fn issue_x509(
        &self,
        key: SvidKeyRef<'_>,
        ctx: impl Future<Output = IssueContext>,
    ) -> Result<(Arc<X509Svid>, Hold), IssueError> {
        // One issuance at a time: concurrent first fetches of one identity share the result.
        let _guard = self.inner.issuing.lock().await;
        if let Some(found) = self.cached(key) {
            return Ok(found);
        }
        let ctx = ctx.await;
        let key = key.to_key();
        let svid = self.inner.issue(&key, &ctx, Action::Issued).await?;
        let mut slots = self.inner.slots.lock().expect("slots");
        // An expired slot being replaced keeps its holds.
        let held = slots.get(&key).map(|s| s.held.clone()).unwrap_or_default();
        let slot = Slot {
            refresh_at: refresh_time(Instant::now(), &svid),
            current: Some(svid.clone()),
            used_since_issue: false,
            held,
            backoff: BACKOFF_MIN,
            context: ctx,
        };
        let hold = slot.hold();
        slots.insert(key, slot);
        drop(slots);
        self.inner.wake.notify_one();
        Ok((svid, hold))
    }

    fn cached(&self, key: SvidKeyRef<'_>) -> Option<(Arc<X509Svid>, Hold)> {
        let mut slots = self.inner.slots.lock().expect("slots");
        let slot = slots.get_mut(&key)?;
        let svid = slot
            .current
            .clone()
            .filter(|s| s.not_after > SystemTime::now())?;
        slot.used_since_issue = true;
        Some((svid, slot.hold()))
    }

    /// A JWT-SVID for `key`, reused until half its lifetime has passed. `claims` (the extra
    /// claims of the composite identity `key.cid` names) and `ctx` are used only when a
    /// token is signed.
    pub async fn jwt(
        &self,
        key: JwtKey,
        claims: impl FnOnce() -> serde_json::Map<String, serde_json::Value>,
        ctx: impl Future<Output = IssueContext>,
    ) -> Result<String, IssueError> {
        let now = Instant::now();
        if let Some(e) = self
            .inner
            .jwts
            .lock()
            .expect("jwts")
            .get(&key)
            .filter(|e| e.refresh_at > now)
        {
            return Ok(e.token.clone());
        }
        // Boxed, as in `x509`.
        Box::pin(self.sign_jwt(key, claims, ctx, now)).await
    }

    async fn sign_jwt(
        &self,
        key: JwtKey,
        claims: impl FnOnce() -> serde_json::Map<String, serde_json::Value>,
        ctx: impl Future<Output = IssueContext>,
        now: Instant,
    ) -> Result<String, IssueError> {
        let ctx = ctx.await;
        let req = JwtRequest {
            spiffe_id: key.spiffe_id.clone(),
            audience: key.audience.clone(),
            ttl: key.ttl,
            claims: claims(),
            workload: Some(ctx.workload.clone()),
        };
        let token = self.inner.issuer.sign_jwt(req).await?;
        self.inner
            .metrics
            .issuances
            .get_or_create(&KindLabels { kind: "jwt-svid" })
            .inc();
        self.inner.audit_issue(
            Action::Issued,
            &key.spiffe_id,
            Credential::new(CredentialKind::JwtSvid)
                .aud(&key.audience)
                .not_after((SystemTime::now() + key.ttl).into()),
            &ctx,
        );
        let mut jwts = self.inner.jwts.lock().expect("jwts");
        if jwts.len() >= JWT_CACHE_MAX {
            jwts.retain(|_, e| e.refresh_at > now);
            if jwts.len() >= JWT_CACHE_MAX {
                jwts.clear();
            }
        }
        let refresh_at = now + key.ttl / 2;
        jwts.insert(
            key,
            JwtEntry {
                token: token.clone(),
                refresh_at,
            },
        );
        Ok(token)
    }

    /// Number of X509-SVIDs held.
    pub fn len(&self) -> usize {
        self.inner.slots.lock().expect("slots").len()
    }

    /// True when no X509-SVID is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    async fn issue(
        &self,
        key: &SvidKey,
        ctx: &IssueContext,
        action: Action,
    ) -> Result<Arc<X509Svid>, IssueError> {
        // Workload keys are generated here, on the node, and never leave it except to the workload.
        let private = WorkloadKey::generate().map_err(|e| IssueError(e.to_string()))?;
        let req = X509Request {
            spiffe_id: key.spiffe_id.clone(),
            spki_der: private.spki_der().to_vec(),
            ttl: key.ttl,
            extensions: key.extensions.clone(),
            workload: ctx.workload.clone(),
        };
        let chain = self.issuer.sign_x509(req).await?;
        let leaf = chain
            .first()
            .cloned()
            .ok_or_else(|| IssueError("issuer returned an empty chain".into()))?;
        let info = CertInfo::parse(&leaf)
            .map_err(|e| IssueError(format!("issuer returned a bad certificate: {e}")))?;
        if info.spiffe_id.as_ref() != Some(&key.spiffe_id) || info.spki_der != private.spki_der() {
            // Never hand out a certificate that is not for this identity and this key.
            return Err(IssueError(
                "issuer returned a certificate for another identity or key".into(),
            ));
        }
        let svid = Arc::new(X509Svid {
            spiffe_id: key.spiffe_id.clone(),
            key_pkcs8: private.into_pkcs8_der().into(),
            not_after: info.not_after,
            serial: info.serial_hex.clone(),
            chain_der: chain.concat().into(),
        });
        self.metrics
            .issuances
            .get_or_create(&KindLabels { kind: "x509-svid" })
            .inc();
        self.metrics
            .svid_expiry
            .get_or_create(&IdLabels {
                spiffe_id: key.spiffe_id.to_string(),
            })
            .set(unix_secs(info.not_after));
        self.audit_issue(
            action,
            &key.spiffe_id,
            Credential::new(CredentialKind::X509Svid)
                .serial(info.serial_hex)
                .fingerprint_of(&leaf)
                .not_after(info.not_after.into()),
            ctx,
        );
        Ok(svid)
    }

    fn audit_issue(
        &self,
        action: Action,
        id: &SpiffeId,
        credential: Credential,
        ctx: &IssueContext,
    ) {
        let event = AuditEvent::new(action, id.to_string())
            .decision(
                Decision::allow()
                    .policy(&ctx.policy)
                    .reason("policy matched"),
            )
            .credential(credential)
            .identity(Identity {
                spiffe_id: Some(id.to_string()),
                ..ctx.identity.clone()
            })
            .attestation(Attestation {
                selectors: ctx.selectors.clone(),
                node: None,
            })
            .requester(Requester {
                pid: ctx.pid,
                uid: ctx.uid,
                gid: ctx.gid,
            });
        if let Err(e) = self.audit.record(event) {
            tracing::error!(error = %e, "writing audit record");
        }
    }

    /// Renews every slot that is due; forgets the ones nobody holds or used since issuance.
    async fn renew_due(&self) -> bool {
        let now = Instant::now();
        let due: Vec<(SvidKey, IssueContext)> = {
            let mut slots = self.slots.lock().expect("slots");
            slots.retain(|key, s| {
                let unheld = Arc::strong_count(&s.held) == 1;
                let idle = s.refresh_at <= now && unheld && !s.used_since_issue;
                if idle {
                    self.metrics.svid_expiry.remove(&IdLabels {
                        spiffe_id: key.spiffe_id.to_string(),
                    });
                }
                !idle
            });
            slots
                .iter()
                .filter(|(_, s)| s.refresh_at <= now)
                .map(|(k, s)| (k.clone(), s.context.clone()))
                .collect()
        };
        let mut changed = false;
        for (key, ctx) in due {
            let result = {
                let _guard = self.issuing.lock().await;
                self.issue(&key, &ctx, Action::Renewed).await
            };
            let mut slots = self.slots.lock().expect("slots");
            let Some(slot) = slots.get_mut(&key) else {
                continue;
            };
            match result {
                Ok(svid) => {
                    slot.refresh_at = refresh_time(Instant::now(), &svid);
                    slot.current = Some(svid);
                    slot.used_since_issue = false;
                    slot.backoff = BACKOFF_MIN;
                    changed = true;
                }
                Err(e) => {
                    // Keep serving the still-valid SVID; retry sooner than it expires.
                    self.metrics.renewal_failures.inc();
                    tracing::warn!(spiffe_id = %key.spiffe_id, error = %e, retry_in = ?slot.backoff, "SVID renewal failed");
                    slot.refresh_at = Instant::now() + slot.backoff;
                    slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        changed
    }

    /// Makes every held X509-SVID due for renewal now and forgets cached JWT-SVIDs: the key
    /// that signed them was replaced in an emergency.
    fn renew_all_now(&self) {
        let now = Instant::now();
        for slot in self.slots.lock().expect("slots").values_mut() {
            slot.refresh_at = now;
            slot.backoff = BACKOFF_MIN;
        }
        self.jwts.lock().expect("jwts").clear();
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .lock()
            .expect("slots")
            .values()
            .map(|s| s.refresh_at)
            .min()
    }
}

async fn worker(inner: Weak<Inner>, wake: Arc<Notify>, mut reissue: watch::Receiver<u64>) {
    // A closed channel (an issuer that never asks) stops being watched.
    let mut watching = true;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let deadline = strong.next_deadline();
        drop(strong);
        let far = Instant::now() + Duration::from_secs(24 * 3600);
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)) => {}
            _ = wake.notified() => continue,
            r = reissue.changed(), if watching => {
                watching = r.is_ok();
                if watching && let Some(strong) = inner.upgrade() {
                    strong.renew_all_now();
                }
            }
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.renew_due().await {
            strong.generation.send_modify(|g| *g += 1);
        }
    }
}

/// Half the remaining lifetime, plus or minus up to a tenth of it.
fn refresh_time(now: Instant, svid: &X509Svid) -> Instant {
    let lifetime = svid
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let tenth = lifetime / 10;
    let jitter = tenth.mul_f64(fastrand::f64() * 2.0);
    now + (lifetime / 2).saturating_sub(tenth) + jitter
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::node::issuer::TrustBundles;
    use crate::server::{Authority, AuthorityConfig};
    use crate::spiffe::TrustDomain;

    /// The real authority, with a switch to make signing fail and a call counter.
    struct Flaky {
        authority: Authority,
        fail: AtomicBool,
        calls: AtomicUsize,
        bundles: watch::Sender<Arc<TrustBundles>>,
        reissue: watch::Sender<u64>,
    }

    #[async_trait::async_trait]
    impl SvidIssuer for Flaky {
        async fn sign_x509(&self, req: X509Request) -> Result<Vec<Vec<u8>>, IssueError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(IssueError("authority unreachable".into()));
            }
            self.authority
                .sign_x509_svid(&req.spiffe_id, &req.spki_der, req.ttl, &req.extensions)
                .map_err(|e| IssueError(e.to_string()))
        }
        async fn sign_jwt(&self, req: JwtRequest) -> Result<String, IssueError> {
            self.authority
                .sign_jwt_svid(&req.spiffe_id, &req.audience, req.ttl, req.claims)
                .map_err(|e| IssueError(e.to_string()))
        }
        fn bundles(&self) -> watch::Receiver<Arc<TrustBundles>> {
            self.bundles.subscribe()
        }
        fn reissue(&self) -> watch::Receiver<u64> {
            self.reissue.subscribe()
        }
    }

    fn setup(dir: &std::path::Path) -> (Arc<Flaky>, SvidCache, SvidKey, NodeMetrics) {
        let td = TrustDomain::new("example.org").unwrap();
        let authority = Authority::open(dir, td.clone(), AuthorityConfig::default()).unwrap();
        let own = authority.bundle();
        let issuer = Arc::new(Flaky {
            authority,
            fail: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            bundles: watch::Sender::new(Arc::new(TrustBundles {
                trust_domain: td.clone(),
                own,
                federated: Default::default(),
            })),
            reissue: watch::Sender::new(0),
        });
        let metrics = NodeMetrics::unregistered();
        let cache = SvidCache::new(issuer.clone(), AuditLog::memory("test"), metrics.clone());
        let key = SvidKey {
            spiffe_id: td.id("/w").unwrap(),
            ttl: Duration::from_secs(100),
            extensions: vec![],
        };
        (issuer, cache, key, metrics)
    }

    /// Fetches `key`'s SVID and keeps a hold on it.
    async fn fetch_held(cache: &SvidCache, key: &SvidKey) -> (Arc<X509Svid>, Hold) {
        let key = SvidKeyRef {
            spiffe_id: &key.spiffe_id,
            ttl: key.ttl,
            extensions: &key.extensions,
        };
        cache
            .x509(key, async { IssueContext::default() })
            .await
            .unwrap()
    }

    /// Fetches `key`'s SVID without holding it.
    async fn fetch(cache: &SvidCache, key: &SvidKey) -> Arc<X509Svid> {
        fetch_held(cache, key).await.0
    }

    /// Lets the renewal worker run after the clock moved.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_emergency_reissue_renews_held_svids_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (issuer, cache, key, _) = setup(dir.path());
        let (first, _hold) = fetch_held(&cache, &key).await;
        let mut generation = cache.subscribe();
        generation.borrow_and_update();
        settle().await;
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 1);
        // No time passes: the half-life is far away.
        issuer.reissue.send_modify(|e| *e += 1);
        settle().await;
        assert_eq!(
            issuer.calls.load(Ordering::SeqCst),
            2,
            "signed again at once"
        );
        assert!(generation.has_changed().unwrap(), "streams are told");
        let now = fetch(&cache, &key).await;
        assert_ne!(now.serial, first.serial);
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life_then_forgets_unused_svids() {
        let dir = tempfile::tempdir().unwrap();
        let (issuer, cache, key, _) = setup(dir.path());
        let mut generation = cache.subscribe();

        let first = fetch(&cache, &key).await;
        assert_eq!(
            fetch(&cache, &key).await.serial,
            first.serial,
            "served from memory"
        );
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 1);

        // Refresh lands between 40% and 60% of the 100 s lifetime (whole seconds in the
        // certificate, so a little less than 100 s remain when it is issued).
        tokio::time::advance(Duration::from_secs(35)).await;
        settle().await;
        assert!(
            !generation.has_changed().unwrap(),
            "no renewal before 40% of the lifetime"
        );

        tokio::time::advance(Duration::from_secs(26)).await;
        settle().await;
        assert!(
            generation.has_changed().unwrap(),
            "renewed by 60% of the lifetime"
        );
        generation.mark_unchanged();
        let second = fetch(&cache, &key).await;
        assert_ne!(second.serial, first.serial);
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 2);

        // Used since its renewal, so the next refresh renews it again ...
        tokio::time::advance(Duration::from_secs(61)).await;
        settle().await;
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 3);
        assert_eq!(cache.len(), 1);
        // ... but nobody fetched the third one, so at its refresh time it is forgotten.
        tokio::time::advance(Duration::from_secs(61)).await;
        settle().await;
        assert_eq!(cache.len(), 0, "unused SVID forgotten");
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 3, "and not renewed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_svid_is_renewed_without_fetches() {
        let dir = tempfile::tempdir().unwrap();
        let (issuer, cache, key, _) = setup(dir.path());
        let (first, hold) = fetch_held(&cache, &key).await;
        for round in 2..=4 {
            tokio::time::advance(Duration::from_secs(61)).await;
            settle().await;
            assert_eq!(
                issuer.calls.load(Ordering::SeqCst),
                round,
                "renewed while held"
            );
        }
        assert_ne!(fetch(&cache, &key).await.serial, first.serial);
        drop(hold);
        // The fetch above marked it used once more: one more renewal, then it is forgotten.
        tokio::time::advance(Duration::from_secs(61)).await;
        settle().await;
        tokio::time::advance(Duration::from_secs(61)).await;
        settle().await;
        assert_eq!(cache.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_renewal_keeps_the_valid_svid_and_retries_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let (issuer, cache, key, metrics) = setup(dir.path());
        let (first, _hold) = fetch_held(&cache, &key).await;

        issuer.fail.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(61)).await;
        settle().await;
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 2, "renewal attempted");
        assert_eq!(metrics.renewal_failures.get(), 1);
        assert_eq!(
            fetch(&cache, &key).await.serial,
            first.serial,
            "still-valid SVID kept"
        );

        // Backoff doubles: retries at +250 ms, then +500 ms.
        tokio::time::advance(Duration::from_millis(260)).await;
        settle().await;
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 3);
        tokio::time::advance(Duration::from_millis(260)).await;
        settle().await;
        assert_eq!(
            issuer.calls.load(Ordering::SeqCst),
            3,
            "second retry waits 500 ms"
        );

        issuer.fail.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_millis(260)).await;
        settle().await;
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 4);
        assert_ne!(
            fetch(&cache, &key).await.serial,
            first.serial,
            "renewed once the issuer is back"
        );
    }

    #[test]
    fn a_key_made_of_borrowed_parts_finds_its_slot() {
        let id: SpiffeId = "spiffe://example.org/w".parse().unwrap();
        let extensions = vec![Extension {
            oid_der: vec![0x06, 0x01, 0x2a],
            value: vec![0x05, 0x00],
        }];
        let key = |ttl: u64, extensions: &[Extension]| SvidKey {
            spiffe_id: id.clone(),
            ttl: Duration::from_secs(ttl),
            extensions: extensions.to_vec(),
        };
        let mut map: Map<SvidKey, u8> = Map::default();
        map.insert(key(60, &extensions), 1);
        map.insert(key(60, &[]), 2);
        map.insert(key(120, &extensions), 3);
        for (ttl, extensions, want) in [
            (60, &extensions[..], 1),
            (60, &[], 2),
            (120, &extensions, 3),
        ] {
            let borrowed = SvidKeyRef {
                spiffe_id: &id,
                ttl: Duration::from_secs(ttl),
                extensions,
            };
            assert_eq!(map.get(&borrowed), Some(&want), "{borrowed:?}");
            assert_eq!(borrowed.to_key(), key(ttl, extensions));
        }
        let other: SpiffeId = "spiffe://example.org/x".parse().unwrap();
        let borrowed = SvidKeyRef {
            spiffe_id: &other,
            ttl: Duration::from_secs(60),
            extensions: &[],
        };
        assert_eq!(map.get(&borrowed), None);
    }

    #[tokio::test]
    async fn refuses_a_certificate_for_another_key() {
        struct Liar(Authority);
        #[async_trait::async_trait]
        impl SvidIssuer for Liar {
            async fn sign_x509(&self, req: X509Request) -> Result<Vec<Vec<u8>>, IssueError> {
                // Signs the right ID over a different key.
                let other = crate::crypto::PrivateKey::generate().unwrap();
                self.0
                    .sign_x509_svid(&req.spiffe_id, &other.spki_der(), req.ttl, &[])
                    .map_err(|e| IssueError(e.to_string()))
            }
            async fn sign_jwt(&self, _: JwtRequest) -> Result<String, IssueError> {
                Err(IssueError("unused".into()))
            }
            fn bundles(&self) -> watch::Receiver<Arc<TrustBundles>> {
                unreachable!()
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let authority =
            Authority::open(dir.path(), td.clone(), AuthorityConfig::default()).unwrap();
        let cache = SvidCache::new(
            Arc::new(Liar(authority)),
            AuditLog::memory("t"),
            NodeMetrics::unregistered(),
        );
        let id = td.id("/w").unwrap();
        let key = SvidKeyRef {
            spiffe_id: &id,
            ttl: Duration::from_secs(60),
            extensions: &[],
        };
        let err = cache
            .x509(key, async { IssueContext::default() })
            .await
            .unwrap_err();
        assert!(err.0.contains("another identity or key"), "{err}");
    }
}
