//! The SPIFFE Workload API service (`/SpiffeWorkloadAPI/*`).
//!
//! Every call is attested from the kernel: the caller never presents anything but the
//! security header. Streams carry the complete current state in every message and are
//! re-evaluated whenever an SVID rotates, a bundle changes or the policies change.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures::{Stream, StreamExt};
use prometheus_client::metrics::gauge::Gauge;
use prost_types::value::Kind;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::answer::server::spiffe_workload_api_server::SpiffeWorkloadApi;
use super::answer::{AnswerBundles, AnswerSvid, X509Answer};
use super::attest::{WorkloadAttestor, resolve_user_name};
use super::cache::{Hold, IssueContext, JwtKey, SvidCache, SvidKeyRef};
use super::composite::{ComposeError, Composed, Composer};
use super::drift::{DriftWatch, Watching};
use super::issuer::{TrustBundles, WorkloadClaims};
use super::peer::PeerInfo;
use crate::api::workload as pb;
use crate::audit::{Action, Attestation, AuditEvent, AuditLog, Decision, Identity};
use crate::composite::CompositeIdentity;
use crate::crypto::jwt;
use crate::metrics::{MethodLabels, NodeMetrics};
use crate::policy::{
    Entitlement, EntitlementCache, Evaluation, FactNeeds, PolicySet, WorkloadFacts,
};
use crate::spiffe::{SpiffeId, TrustDomain};

/// The message clients (and the rust `spiffe` crate) recognise as "no identity".
pub const NO_IDENTITY: &str = "no identity issued";

/// The service: a handle to its state, cloned for every open stream (one reference count,
/// where a copy of the state would take one per part, on every call).
#[derive(Clone)]
pub struct WorkloadApi(Arc<WorkloadApiState>);

impl std::ops::Deref for WorkloadApi {
    type Target = WorkloadApiState;

    fn deref(&self) -> &WorkloadApiState {
        &self.0
    }
}

/// State of the service, shared by all its calls.
#[derive(Clone)]
pub struct WorkloadApiState {
    td: TrustDomain,
    attestor: Arc<dyn WorkloadAttestor>,
    policies: watch::Receiver<Arc<PolicySet>>,
    bundles: watch::Receiver<Arc<TrustBundles>>,
    cache: SvidCache,
    audit: AuditLog,
    metrics: NodeMetrics,
    composer: Arc<Composer>,
    drift: DriftWatch,
    /// What the policies in force grant recently seen callers.
    entitlements: Arc<EntitlementCache>,
    /// What wakes open FetchX509SVID streams (see [`WorkloadApi::changes`]), made on first use.
    changes: Arc<OnceLock<watch::Receiver<()>>>,
    /// Cancelled at shutdown: open streams end so the server can drain.
    shutdown: CancellationToken,
    answer_bundles: Arc<BundleMemo>,
}

/// [`AnswerBundles`] made once per set of bundles (keyed by its `Arc`, which the memo holds so
/// the address cannot be reused), rather than again for every answer.
#[derive(Default)]
struct BundleMemo(std::sync::Mutex<Option<(Arc<TrustBundles>, Arc<AnswerBundles>)>>);

impl BundleMemo {
    fn of(&self, bundles: &Arc<TrustBundles>) -> Arc<AnswerBundles> {
        let mut memo = self.0.lock().expect("bundle memo");
        match &*memo {
            Some((seen, made)) if Arc::ptr_eq(seen, bundles) => made.clone(),
            _ => {
                let made = Arc::new(AnswerBundles::new(bundles));
                *memo = Some((bundles.clone(), made.clone()));
                made
            }
        }
    }
}

/// Distinct callers whose entitlements are remembered (past that the cache starts over).
const ENTITLEMENT_CACHE_MAX: usize = 1024;

/// An attested caller and what it is entitled to.
struct Caller {
    peer: PeerInfo,
    facts: WorkloadFacts,
    /// Which facts were gathered.
    needs: FactNeeds,
    evaluation: Arc<Evaluation>,
}

/// An attested caller with the identities it can be issued, composite identities checked.
pub(super) struct Entitled {
    pub(super) peer: PeerInfo,
    /// What the decision was made on: the facts in `needs`, and those that come with the
    /// connection. [`Entitled::full_facts`] adds the rest for records.
    pub(super) facts: WorkloadFacts,
    needs: FactNeeds,
    pub(super) issuable: Vec<Issuable>,
}

/// One identity a caller can be issued, with the composite identity it states.
pub(super) struct Issuable {
    pub(super) e: Arc<Entitlement>,
    pub(super) composed: Option<Arc<Composed>>,
}

impl Entitled {
    /// Who asked, for the audit record of an issuance and the issuer (built only when an
    /// SVID is signed). It carries every fact, not only those the decision needed.
    async fn context(&self, api: &WorkloadApi, i: &Issuable) -> IssueContext {
        let facts = self.full_facts(api).await;
        IssueContext {
            pid: Some(self.peer.pid as u32),
            uid: Some(self.peer.uid),
            gid: Some(self.peer.gid),
            selectors: audit_selectors(&facts),
            policy: i.e.policy.to_string(),
            identity: i
                .composed
                .as_deref()
                .map(audit_identity)
                .unwrap_or_default(),
            workload: Self::claims_of(facts, i),
        }
    }

    /// What was attested for `i`, every fact included, for an issuer that checks it again.
    pub(super) async fn claims(&self, api: &WorkloadApi, i: &Issuable) -> Arc<WorkloadClaims> {
        Self::claims_of(self.full_facts(api).await, i)
    }

    fn claims_of(facts: WorkloadFacts, i: &Issuable) -> Arc<WorkloadClaims> {
        Arc::new(WorkloadClaims {
            facts,
            composite: i.composed.as_ref().map(|c| c.identity.clone()),
        })
    }

    /// The caller's facts with those the policies did not need added (see
    /// [`WorkloadApi::full_facts`]).
    async fn full_facts(&self, api: &WorkloadApi) -> WorkloadFacts {
        api.full_facts(&self.peer, &self.facts, self.needs).await
    }

    /// Every file the caller's composite identities were hashed from.
    fn watched_files(&self) -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = self
            .issuable
            .iter()
            .filter_map(|i| i.composed.as_deref())
            .flat_map(|c| c.watched.iter().cloned())
            .collect();
        files.sort();
        files.dedup();
        files
    }
}

/// Whether `a` and `b` state the same composite identity under the same SPIFFE IDs.
fn same_identities(a: &[Issuable], b: &[Issuable]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| a.e.spiffe_id == b.e.spiffe_id && a.composed == b.composed)
}

/// The composite part of an audit record's identity.
pub(super) fn audit_identity(c: &Composed) -> Identity {
    let id = &c.identity;
    Identity {
        spiffe_id: None,
        cid: Some(c.cid.clone()),
        model: id
            .model
            .as_ref()
            .map(|m| format!("{}/{}", m.provider, m.id)),
        config_digest: id.config_digest.clone(),
        tools_digest: id.tools_digest.clone(),
        image_digest: id.image_digest.clone(),
    }
}

/// What changed between two composite identities, for the drift audit record.
fn drift_summary(old: &CompositeIdentity, new: &CompositeIdentity) -> String {
    let field = |name: &str, a: &Option<String>, b: &Option<String>| {
        (a != b).then(|| {
            let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
            format!("{name} {} -> {}", show(a), show(b))
        })
    };
    let model =
        |m: &CompositeIdentity| m.model.as_ref().map(|m| format!("{}/{}", m.provider, m.id));
    let mut changes: Vec<String> = [
        field("model", &model(old), &model(new)),
        field("config_digest", &old.config_digest, &new.config_digest),
        field("tools_digest", &old.tools_digest, &new.tools_digest),
        field("image_digest", &old.image_digest, &new.image_digest),
    ]
    .into_iter()
    .flatten()
    .collect();
    if changes.is_empty() {
        changes.push("placement changed".into());
    }
    changes.join("; ")
}

/// The facts as selectors for an audit record, user name included.
pub(super) fn audit_selectors(facts: &WorkloadFacts) -> Vec<String> {
    let mut facts = facts.clone();
    resolve_user_name(&mut facts);
    facts.selectors()
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl WorkloadApi {
    /// Builds the service.
    pub fn new(
        td: TrustDomain,
        attestor: Arc<dyn WorkloadAttestor>,
        policies: watch::Receiver<Arc<PolicySet>>,
        bundles: watch::Receiver<Arc<TrustBundles>>,
        cache: SvidCache,
        audit: AuditLog,
        metrics: NodeMetrics,
    ) -> Self {
        Self(Arc::new(WorkloadApiState {
            td,
            attestor,
            policies,
            bundles,
            cache,
            audit,
            metrics,
            composer: Arc::new(Composer::new()),
            drift: DriftWatch::new(),
            entitlements: Arc::new(EntitlementCache::new(ENTITLEMENT_CACHE_MAX)),
            changes: Arc::default(),
            shutdown: CancellationToken::new(),
            answer_bundles: Arc::default(),
        }))
    }

    /// Uses `composer` and `drift` (shared with the periodic re-hash) instead of private ones.
    pub fn with_composite(self, composer: Arc<Composer>, drift: DriftWatch) -> Self {
        Self(Arc::new(WorkloadApiState {
            composer,
            drift,
            changes: Arc::default(),
            ..Arc::unwrap_or_clone(self.0)
        }))
    }

    /// A channel that changes whenever anything a FetchX509SVID message is built from may
    /// have: a cached SVID renewed or forgotten, the policies, the bundles, or a file behind a
    /// composite identity. It closes at shutdown or when one of those sources closes. Open
    /// streams wait on it alone: one wake-up registration per stream instead of one per source.
    fn changes(&self) -> watch::Receiver<()> {
        self.changes
            .get_or_init(|| {
                let (tx, rx) = watch::channel(());
                // Subscribed now, before the first stream reads any of them.
                let mut generation = self.cache.subscribe();
                let mut drift = self.drift.subscribe();
                let mut policies = self.policies.clone();
                let mut bundles = self.bundles.clone();
                policies.mark_unchanged();
                bundles.mark_unchanged();
                let shutdown = self.shutdown.clone();
                tokio::spawn(async move {
                    loop {
                        let open = tokio::select! {
                            _ = shutdown.cancelled() => false,
                            r = generation.changed() => r.is_ok(),
                            r = policies.changed() => r.is_ok(),
                            r = bundles.changed() => r.is_ok(),
                            r = drift.changed() => r.is_ok(),
                        };
                        if !open {
                            // Dropping `tx` ends the streams.
                            return;
                        }
                        tx.send_replace(());
                    }
                });
                rx
            })
            .clone()
    }

    /// The audit log decisions are recorded in.
    pub(super) fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The trust bundles in force.
    pub(super) fn trust_bundles(&self) -> Arc<TrustBundles> {
        self.bundles.borrow().clone()
    }

    /// Cancelling this ends every open stream (used at shutdown).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Attests the caller and evaluates the policies. Attestation failure is `Unavailable`
    /// (clients retry); no entitlement is `PermissionDenied` with the standard message.
    /// Gathered are the facts some policy in force can use, and `extra`.
    async fn resolve(
        &self,
        peer: &PeerInfo,
        method: &'static str,
        extra: FactNeeds,
    ) -> Result<Caller, Status> {
        // The policies first: what they need is what attestation gathers, and they are what
        // the facts are evaluated against.
        let policies = self.policies.borrow().clone();
        let needs = policies.fact_needs().union(extra);
        let mut facts = match self.attestor.attest(peer, needs).await {
            Ok(f) => f,
            Err(e) if e.is_denial() => {
                self.deny(method, peer, &WorkloadFacts::default(), &e.to_string());
                return Err(Status::permission_denied(NO_IDENTITY));
            }
            Err(e) => {
                self.deny(
                    method,
                    peer,
                    &WorkloadFacts::default(),
                    &format!("attestation failed: {e}"),
                );
                return Err(Status::unavailable(format!(
                    "workload attestation failed: {e}"
                )));
            }
        };
        if policies.needs_user_name() {
            resolve_user_name(&mut facts);
        }
        let evaluation = self.entitlements.evaluate(&policies, &self.td, &facts);
        for (policy, e) in &evaluation.errors {
            tracing::warn!(%policy, pid = peer.pid, error = %e, "policy matched but its SPIFFE ID template failed for this caller");
        }
        Ok(Caller {
            peer: peer.clone(),
            facts,
            needs,
            evaluation,
        })
    }

    /// `facts`, gathered with `needs`, with the facts the policies did not need added: what
    /// audit records and issuers are given, so a record says what ran even where the policy
    /// only asked for a uid. Only where something was left out is the caller attested again;
    /// if that fails the record keeps what the decision was made on.
    pub(super) async fn full_facts(
        &self,
        peer: &PeerInfo,
        facts: &WorkloadFacts,
        needs: FactNeeds,
    ) -> WorkloadFacts {
        let mut full = facts.clone();
        if needs == FactNeeds::ALL {
            return full;
        }
        match self.attestor.attest(peer, FactNeeds::ALL).await {
            Ok(more) => {
                if let (Some(u), Some(m)) = (full.unix.as_mut(), more.unix) {
                    u.path = u.path.take().or(m.path);
                    u.sha256 = u.sha256.take().or(m.sha256);
                }
            }
            Err(e) => {
                tracing::debug!(pid = peer.pid, error = %e, "attesting the caller again for the record")
            }
        }
        full
    }

    /// Records a denial of a resolved caller, with its full facts. Boxed: denials are rare,
    /// and inline the room for this future would be part of every call's.
    fn deny_resolved<'a>(
        &'a self,
        method: &'static str,
        peer: &'a PeerInfo,
        facts: &'a WorkloadFacts,
        needs: FactNeeds,
        reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let facts = self.full_facts(peer, facts, needs).await;
            self.deny(method, peer, &facts, reason);
        })
    }

    /// Attests the caller, evaluates the policies and builds the composite identity each
    /// entitlement states, checking its pins. An entitlement whose composite is refused is
    /// dropped (and audited with the reason); none left is `PermissionDenied`, or
    /// `Unavailable` when a declared file could not be hashed.
    ///
    /// The facts gathered are those some policy in force can use, and `extra`; the rest are
    /// added for records of denials and issuances (see [`WorkloadApi::full_facts`]).
    pub(super) async fn resolve_entitled(
        &self,
        peer: &PeerInfo,
        method: &'static str,
        extra: FactNeeds,
    ) -> Result<Entitled, Status> {
        let caller = self.resolve(peer, method, extra).await?;
        let (facts, needs) = (&caller.facts, caller.needs);
        let entitlements = &caller.evaluation.entitlements;
        if entitlements.is_empty() {
            let reason = "no policy matches the caller";
            self.deny_resolved(method, peer, facts, needs, reason).await;
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        if facts.k8s.is_none() && entitlements.iter().all(|e| e.composite.is_none()) {
            // No composite identity to build: every entitlement is issuable as it is.
            let issuable = entitlements
                .iter()
                .map(|e| Issuable {
                    e: e.clone(),
                    composed: None,
                })
                .collect();
            return Ok(Entitled {
                peer: caller.peer,
                facts: caller.facts,
                needs,
                issuable,
            });
        }
        // Boxed, like the denials: what every call awaits stays small.
        let composed = Box::pin(self.compose(&caller)).await?;
        let mut issuable = Vec::with_capacity(entitlements.len());
        let mut unavailable = None;
        for (e, result) in entitlements.iter().zip(composed) {
            match result {
                Ok(composed) => issuable.push(Issuable {
                    e: e.clone(),
                    composed: composed.map(Arc::new),
                }),
                Err(ComposeError::Pin(pin)) => {
                    let reason = format!("policy {}: {pin}", e.policy);
                    self.deny_resolved(method, peer, facts, needs, &reason)
                        .await;
                }
                Err(err) => {
                    let reason = format!("attestation failed: policy {}: {err}", e.policy);
                    self.deny_resolved(method, peer, facts, needs, &reason)
                        .await;
                    unavailable.get_or_insert(err.to_string());
                }
            }
        }
        if issuable.is_empty() {
            return Err(match unavailable {
                Some(err) => Status::unavailable(format!("workload attestation failed: {err}")),
                None => Status::permission_denied(NO_IDENTITY),
            });
        }
        Ok(Entitled {
            peer: caller.peer,
            facts: caller.facts,
            needs,
            issuable,
        })
    }

    /// The composite identity for each of the caller's entitlements (in order), off the
    /// async threads since it may hash files.
    async fn compose(
        &self,
        caller: &Caller,
    ) -> Result<Vec<Result<Option<Composed>, ComposeError>>, Status> {
        let specs: Vec<_> = caller
            .evaluation
            .entitlements
            .iter()
            .map(|e| e.composite.clone())
            .collect();
        let (composer, facts, pid) = (self.composer.clone(), caller.facts.clone(), caller.peer.pid);
        let results = tokio::task::spawn_blocking(move || {
            specs
                .iter()
                .map(|s| composer.compose(pid, &facts, s.as_deref()))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::unavailable(format!("workload attestation failed: {e}")))?;
        // The files were read through /proc/<pid>/root: they are the caller's only if the
        // caller is still the process that pid names.
        if !caller.peer.is_alive() {
            return Err(Status::unavailable(format!(
                "workload attestation failed: process {pid} exited"
            )));
        }
        Ok(results)
    }

    pub(super) fn deny(
        &self,
        method: &'static str,
        peer: &PeerInfo,
        facts: &WorkloadFacts,
        reason: &str,
    ) {
        self.metrics
            .denials
            .get_or_create(&MethodLabels { method })
            .inc();
        tracing::info!(
            method,
            pid = peer.pid,
            uid = peer.uid,
            reason,
            "identity denied"
        );
        let event = AuditEvent::new(Action::Denied, format!("pid:{}", peer.pid))
            .decision(Decision::deny(format!("{method}: {reason}")))
            .attestation(Attestation {
                selectors: audit_selectors(facts),
                node: None,
            })
            .requester(peer.requester());
        if let Err(e) = self.audit.record(event) {
            tracing::error!(error = %e, "writing audit record");
        }
    }

    pub(super) fn observe<T>(
        &self,
        method: &'static str,
        start: Instant,
        result: &Result<T, Status>,
    ) {
        let code = match result {
            Ok(_) => "OK",
            Err(s) => code_name(s.code()),
        };
        self.metrics
            .record_call(method, code, start.elapsed().as_secs_f64());
    }

    /// The full-state X509-SVID message for `caller`, and the cache keys it is built from.
    async fn x509_response(&self, caller: &Entitled) -> Result<(X509Answer, Vec<Hold>), Status> {
        let mut svids = Vec::with_capacity(caller.issuable.len());
        let mut holds = Vec::with_capacity(caller.issuable.len());
        let mut last_error = None;
        for i in &caller.issuable {
            let e = &i.e;
            let key = SvidKeyRef {
                spiffe_id: &e.spiffe_id,
                ttl: e.x509_ttl,
                extensions: i.composed.as_ref().map_or(&[], |c| &c.extensions),
            };
            match self.cache.x509(key, caller.context(self, i)).await {
                Ok((svid, hold)) => {
                    svids.push(AnswerSvid {
                        svid,
                        granted_by: e.clone(),
                    });
                    holds.push(hold);
                }
                Err(err) => {
                    // Serve the identities that can be issued; report the rest.
                    tracing::error!(spiffe_id = %e.spiffe_id, error = %err, "X509-SVID issuance failed");
                    last_error = Some(err);
                }
            }
        }
        if svids.is_empty() {
            let reason = last_error.map(|e| e.to_string()).unwrap_or_default();
            return Err(Status::unavailable(format!(
                "X509-SVID issuance failed: {reason}"
            )));
        }
        // Read after the SVIDs: the issuer publishes a new CA before it hands back anything it
        // signed, so this bundle holds the CA of every SVID above (after an emergency rotation
        // too, when the CA is published the moment it starts signing).
        let bundles = self.answer_bundles.of(&self.bundles.borrow());
        Ok((X509Answer::new(svids, bundles), holds))
    }
}

pub(super) fn peer_of<T>(req: &Request<T>) -> Result<PeerInfo, Status> {
    req.extensions().get::<PeerInfo>().cloned().ok_or_else(|| {
        Status::unavailable("workload attestation failed: no peer credentials on this connection")
    })
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        InvalidArgument => "INVALID_ARGUMENT",
        PermissionDenied => "PERMISSION_DENIED",
        Unavailable => "UNAVAILABLE",
        Unimplemented => "UNIMPLEMENTED",
        _ => "OTHER",
    }
}

fn x509_bundles(b: &TrustBundles) -> HashMap<String, Vec<u8>> {
    std::iter::once((b.trust_domain.id_string(), b.own.x509_der()))
        .filter(|(_, der)| !der.is_empty())
        .chain(b.federated_x509_ders())
        .collect()
}

fn jwt_bundles(b: &TrustBundles) -> HashMap<String, Vec<u8>> {
    std::iter::once((b.trust_domain.id_string(), b.own.jwks_json()))
        .chain(
            b.federated
                .iter()
                .map(|(td, f)| (td.id_string(), f.jwks_json())),
        )
        .collect()
}

/// Keeps the open-streams gauge right however a stream ends.
struct StreamGuard(Gauge);

impl StreamGuard {
    fn new(m: &NodeMetrics) -> Self {
        m.open_streams.inc();
        Self(m.open_streams.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = StreamOf<X509Answer>;
    type FetchX509BundlesStream = StreamOf<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = StreamOf<pb::JwtBundlesResponse>;
    type FetchWITSVIDStream = StreamOf<pb::WitsvidResponse>;
    type FetchWITBundlesStream = StreamOf<pb::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        const METHOD: &str = "FetchX509SVID";
        let start = Instant::now();
        // Watch for changes before reading the state the first message is built from, so a
        // change that lands while it is being built still wakes the stream.
        let mut changes = self.changes();
        changes.mark_unchanged();
        let result = async {
            let peer = peer_of(&req)?;
            let caller = self
                .resolve_entitled(&peer, METHOD, FactNeeds::NONE)
                .await?;
            let (first, holds) = self.x509_response(&caller).await?;
            Ok((caller, first, holds))
        }
        .await;
        self.observe(METHOD, start, &result);
        let (caller, first, holds) = result?;

        // The stream is polled by the connection that carries it, like any response body: no
        // task or channel per stream. It ends when the client goes away (the body is dropped),
        // at shutdown, or with the status that withdrew the identity.
        let watch = X509Watch {
            _guard: StreamGuard::new(&self.metrics),
            _holds: holds,
            // Files behind its composite identities are watched for drift while it is open.
            watching: self.drift.watch(&caller.watched_files()),
            changes,
            api: self.clone(),
            peer: caller.peer,
            issued: caller.issuable,
            last: first.clone(),
        };
        let updates = futures::stream::unfold(Some(watch), |watch| async move {
            let mut w = watch?;
            loop {
                // Every wake-up re-attests and re-evaluates: rotation, bundle and policy
                // changes all lead to a full-state message if anything differs.
                w.changes.changed().await.ok()?;
                // Boxed: inline, its room would be part of every stream, from the first call.
                let next = Box::pin(async {
                    let caller = w
                        .api
                        .resolve_entitled(&w.peer, METHOD, FactNeeds::NONE)
                        .await?;
                    let (msg, holds) = w.api.x509_response(&caller).await?;
                    Ok::<_, Status>((caller, msg, holds))
                })
                .await;
                match next {
                    Ok((caller, msg, holds)) => {
                        w._holds = holds;
                        if !same_identities(&caller.issuable, &w.issued) {
                            w.api.audit_drift(&w.peer, &w.issued, &caller.issuable);
                            w.watching = w.api.drift.watch(&caller.watched_files());
                        }
                        w.issued = caller.issuable;
                        if msg != w.last {
                            w.last = msg.clone();
                            return Some((Ok(msg), Some(w)));
                        }
                    }
                    Err(status) => {
                        // Withdrawn (no identity left) or unattestable: end the stream with
                        // the reason; clients reconnect and are told again.
                        if status.code() == tonic::Code::PermissionDenied {
                            w.api.audit_drift(&w.peer, &w.issued, &[]);
                        }
                        return Some((Err(status), None));
                    }
                }
            }
        });
        let first = futures::stream::once(async move { Ok(first) });
        Ok(Response::new(Box::pin(first.chain(updates))))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.open_bundle_stream(&req, "FetchX509Bundles", |b| pb::X509BundlesResponse {
            crl: Vec::new(),
            bundles: x509_bundles(b),
        })
        .await
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        const METHOD: &str = "FetchJWTSVID";
        let start = Instant::now();
        let result = self.fetch_jwt(&req, METHOD).await;
        self.observe(METHOD, start, &result);
        result.map(Response::new)
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.open_bundle_stream(&req, "FetchJWTBundles", |b| pb::JwtBundlesResponse {
            bundles: jwt_bundles(b),
        })
        .await
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        const METHOD: &str = "ValidateJWTSVID";
        let start = Instant::now();
        let result = self.validate(req.get_ref());
        self.observe(METHOD, start, &result);
        result.map(Response::new)
    }

    async fn fetch_witsvid(
        &self,
        _: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }

    async fn fetch_wit_bundles(
        &self,
        _: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }
}

impl WorkloadApi {
    /// The bundle RPCs: an entitled caller gets a stream of `build(bundles)` messages.
    async fn open_bundle_stream<R, T>(
        &self,
        req: &Request<R>,
        method: &'static str,
        build: fn(&TrustBundles) -> T,
    ) -> Result<Response<StreamOf<T>>, Status>
    where
        T: PartialEq + Clone + Send + 'static,
    {
        let start = Instant::now();
        let result = async {
            let peer = peer_of(req)?;
            self.resolve_entitled(&peer, method, FactNeeds::NONE)
                .await?;
            Ok(peer)
        }
        .await;
        self.observe(method, start, &result);
        Ok(Response::new(bundle_stream(self, result?, method, build)))
    }

    async fn fetch_jwt(
        &self,
        req: &Request<pb::JwtsvidRequest>,
        method: &'static str,
    ) -> Result<pb::JwtsvidResponse, Status> {
        let body = req.get_ref();
        // Request validation comes before attestation, as SPIRE does.
        if body.audience.is_empty() || body.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let wanted: Option<SpiffeId> =
            match body.spiffe_id.as_str() {
                "" => None,
                s => Some(s.parse().map_err(|e| {
                    Status::invalid_argument(format!("invalid spiffe_id {s:?}: {e}"))
                })?),
            };
        let peer = peer_of(req)?;
        let caller = self
            .resolve_entitled(&peer, method, FactNeeds::NONE)
            .await?;
        let chosen = |i: &&Issuable| wanted.as_ref().is_none_or(|w| w == &i.e.spiffe_id);
        if !caller.issuable.iter().any(|i| chosen(&i)) {
            let reason = format!("not entitled to {}", body.spiffe_id);
            self.deny_resolved(method, &peer, &caller.facts, caller.needs, &reason)
                .await;
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        let mut svids = Vec::with_capacity(1);
        for i in caller.issuable.iter().filter(chosen) {
            let e = &i.e;
            let key = JwtKey {
                spiffe_id: e.spiffe_id.clone(),
                audience: body.audience.clone(),
                ttl: e.jwt_ttl,
                cid: i.composed.as_ref().map(|c| c.cid.clone()),
            };
            let claims = || {
                i.composed
                    .as_ref()
                    .map(|c| c.jwt_claims.clone())
                    .unwrap_or_default()
            };
            let token = self
                .cache
                .jwt(key, claims, caller.context(self, i))
                .await
                .map_err(|err| Status::unavailable(format!("JWT-SVID issuance failed: {err}")))?;
            svids.push(pb::Jwtsvid {
                spiffe_id: String::from(&e.spiffe_id),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        Ok(pb::JwtsvidResponse { svids })
    }

    fn validate(
        &self,
        body: &pb::ValidateJwtsvidRequest,
    ) -> Result<pb::ValidateJwtsvidResponse, Status> {
        if body.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if body.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let bundles = self.bundles.borrow().clone();
        let v = jwt::validate_jwt_svid(&body.svid, &body.audience, |td| bundles.get(td))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut claims = v.claims;
        // `aud` is always a list in the response, even for a single audience (V-05).
        if let Some(serde_json::Value::String(a)) = claims.get("aud").cloned() {
            claims.insert(
                "aud".into(),
                serde_json::Value::Array(vec![serde_json::Value::String(a)]),
            );
        }
        Ok(pb::ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(to_struct(claims)),
        })
    }

    /// Records what an open stream stopped serving: each identity withdrawn, and each whose
    /// composite identity changed (drift), with the old and new digests.
    fn audit_drift(&self, peer: &PeerInfo, before: &[Issuable], after: &[Issuable]) {
        for Issuable { e, composed: old } in before {
            let id = &e.spiffe_id;
            let now = after
                .iter()
                .find(|a| a.e.spiffe_id == *id)
                .map(|a| &a.composed);
            let reason = match (old, now) {
                (_, None) => "no longer entitled (the denial record says why)".to_owned(),
                (Some(old), Some(Some(new))) if old.cid != new.cid => {
                    self.metrics.composite_drifts.inc();
                    format!(
                        "composite identity drifted: {}; re-issued as {}",
                        drift_summary(&old.identity, &new.identity),
                        new.cid
                    )
                }
                _ => continue,
            };
            tracing::info!(spiffe_id = %id, pid = peer.pid, %reason, "identity withdrawn from an open stream");
            let mut event = AuditEvent::new(Action::Withdrawn, id.to_string())
                .decision(Decision::deny(reason))
                .requester(peer.requester());
            if let Some(old) = old {
                event = event.identity(Identity {
                    spiffe_id: Some(id.to_string()),
                    ..audit_identity(old)
                });
            }
            if let Err(e) = self.audit.record(event) {
                tracing::error!(error = %e, "writing audit record");
            }
        }
    }
}

/// A bundle stream: the current bundles at once, then again on every change that alters the
/// message (byte-identical re-sends are suppressed, as SPIRE does).
fn bundle_stream<T>(
    api: &WorkloadApi,
    peer: PeerInfo,
    method: &'static str,
    build: fn(&TrustBundles) -> T,
) -> StreamOf<T>
where
    T: PartialEq + Clone + Send + 'static,
{
    let mut bundles = api.bundles.clone();
    let mut policies = api.policies.clone();
    policies.mark_unchanged();
    let first = build(&bundles.borrow_and_update());
    let watch = BundleWatch {
        _guard: StreamGuard::new(&api.metrics),
        api: api.clone(),
        peer,
        bundles,
        policies,
        last: first.clone(),
    };
    let updates = futures::stream::unfold(Some(watch), move |watch| async move {
        let mut w = watch?;
        loop {
            tokio::select! {
                _ = w.api.shutdown.cancelled() => return None,
                r = w.bundles.changed() => r.ok()?,
                r = w.policies.changed() => {
                    r.ok()?;
                    w.policies.mark_unchanged();
                    // Bundles are for callers with an identity (XB-02, JB-04): a caller whose
                    // last identity was withdrawn is told so, as on FetchX509SVID.
                    if let Err(status) = w.api.resolve_entitled(&w.peer, method, FactNeeds::NONE).await {
                        return Some((Err(status), None));
                    }
                    continue;
                }
            }
            let msg = build(&w.bundles.borrow_and_update());
            if msg != w.last {
                w.last = msg.clone();
                return Some((Ok(msg), Some(w)));
            }
        }
    });
    let first = futures::stream::once(async move { Ok(first) });
    Box::pin(first.chain(updates))
}

/// What an open FetchX509SVID stream keeps between messages.
struct X509Watch {
    _guard: StreamGuard,
    /// While the stream is open its SVIDs are renewed even if nothing else fetches them.
    _holds: Vec<Hold>,
    watching: Watching,
    /// What the last message was built from: the SPIFFE IDs and the composite identities
    /// they state, for drift records.
    issued: Vec<Issuable>,
    changes: watch::Receiver<()>,
    api: WorkloadApi,
    peer: PeerInfo,
    last: X509Answer,
}

/// What an open bundle stream keeps between messages.
struct BundleWatch<T> {
    _guard: StreamGuard,
    api: WorkloadApi,
    peer: PeerInfo,
    bundles: watch::Receiver<Arc<TrustBundles>>,
    policies: watch::Receiver<Arc<PolicySet>>,
    last: T,
}

pub(super) fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::sync::Notify;

    use super::*;
    use crate::node::attest::AttestError;
    use crate::node::issuer::{IssueError, JwtRequest, SvidIssuer, X509Request};
    use crate::policy::{UnixFacts, parse_documents};
    use crate::server::{Authority, AuthorityConfig};
    use prost::Message;

    /// An answer as a client reads it.
    fn decoded(answer: X509Answer) -> pb::X509svidResponse {
        pb::X509svidResponse::decode(answer.encode_to_vec().as_slice()).expect("decodes")
    }

    /// Attests every caller as uid 1000.
    struct Uid1000;

    #[async_trait::async_trait]
    impl WorkloadAttestor for Uid1000 {
        async fn attest(&self, _: &PeerInfo, _: FactNeeds) -> Result<WorkloadFacts, AttestError> {
            Ok(WorkloadFacts {
                unix: Some(UnixFacts {
                    uid: 1000,
                    gid: 1000,
                    ..Default::default()
                }),
                k8s: None,
            })
        }
    }

    /// The real authority; the first X.509 signing waits until the test opens the gate.
    struct Gated {
        authority: Authority,
        gate: AtomicBool,
        entered: Notify,
        open: Notify,
        bundles: watch::Sender<Arc<TrustBundles>>,
    }

    #[async_trait::async_trait]
    impl SvidIssuer for Gated {
        async fn sign_x509(&self, req: X509Request) -> Result<Vec<Vec<u8>>, IssueError> {
            if self.gate.swap(false, Ordering::SeqCst) {
                self.entered.notify_one();
                self.open.notified().await;
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
    }

    fn policies(td: &TrustDomain, names: &[&str]) -> Arc<PolicySet> {
        let yaml: Vec<String> = names
            .iter()
            .map(|n| {
                format!(
                    "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: {n}}}\nspec:\n  spiffeID: \"spiffe://{{{{ .TrustDomain }}}}/{n}\"\n  selector: {{unix: {{uid: 1000}}}}\n"
                )
            })
            .collect();
        Arc::new(PolicySet::new(
            parse_documents("p.yaml", &yaml.join("---\n"), td).unwrap(),
        ))
    }

    // ST-03: a policy change that lands while the first response of a stream is being built
    // (after the policies were read) must still reach that stream.
    #[tokio::test]
    async fn change_during_first_response_reaches_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let authority =
            Authority::open(dir.path(), td.clone(), AuthorityConfig::default()).unwrap();
        let bundles = watch::Sender::new(Arc::new(TrustBundles {
            trust_domain: td.clone(),
            own: authority.bundle(),
            federated: Default::default(),
        }));
        let issuer = Arc::new(Gated {
            authority,
            gate: AtomicBool::new(true),
            entered: Notify::new(),
            open: Notify::new(),
            bundles,
        });
        let metrics = NodeMetrics::unregistered();
        let audit = AuditLog::memory("test");
        let cache = SvidCache::new(issuer.clone(), audit.clone(), metrics.clone());
        let (policy_tx, policy_rx) = watch::channel(policies(&td, &["a"]));
        let api = WorkloadApi::new(
            td.clone(),
            Arc::new(Uid1000),
            policy_rx,
            issuer.bundles(),
            cache,
            audit,
            metrics,
        );

        let mut req = Request::new(pb::X509svidRequest {});
        req.extensions_mut().insert(PeerInfo::current_process());
        let call = tokio::spawn(async move { api.fetch_x509svid(req).await });
        issuer.entered.notified().await;
        policy_tx.send(policies(&td, &["a", "b"])).unwrap();
        issuer.open.notify_one();

        let mut stream = call.await.unwrap().expect("stream opens").into_inner();
        let first = decoded(stream.next().await.unwrap().unwrap());
        assert_eq!(first.svids.len(), 1, "built from the policies read first");
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the change made while the first response was built is pushed")
            .unwrap()
            .unwrap();
        let next = decoded(next);
        let ids: Vec<&str> = next.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
        assert_eq!(ids, ["spiffe://example.org/a", "spiffe://example.org/b"]);
    }

    #[test]
    fn the_answer_bundles_are_made_once_per_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let authority =
            Authority::open(dir.path(), td.clone(), AuthorityConfig::default()).unwrap();
        let peer_td = TrustDomain::new("peer.example").unwrap();
        let peer = Authority::open(
            &dir.path().join("peer"),
            peer_td.clone(),
            AuthorityConfig::default(),
        )
        .unwrap();
        let bundles_now = |authority: &Authority| {
            Arc::new(TrustBundles {
                trust_domain: td.clone(),
                own: authority.bundle(),
                federated: [(peer_td.clone(), peer.bundle())].into(),
            })
        };
        let memo = BundleMemo::default();
        let first = bundles_now(&authority);
        let made = memo.of(&first);
        assert_eq!(*made, AnswerBundles::new(&first));
        assert!(Arc::ptr_eq(&memo.of(&first), &made), "made once");
        // An equal set of bundles in a new `Arc` (what a bundle update sends) is made again.
        let equal = bundles_now(&authority);
        assert!(!Arc::ptr_eq(&memo.of(&equal), &made));

        authority
            .rotate_now(crate::server::KeyKind::X509Ca)
            .unwrap();
        let rotated = bundles_now(&authority);
        let new = memo.of(&rotated);
        assert_eq!(
            *new,
            AnswerBundles::new(&rotated),
            "a new bundle, new parts"
        );
        assert_ne!(*new, *made);
    }

    /// Rotates the CA in an emergency (no published next CA) inside the signing call: the new
    /// CA enters the bundle as it starts signing, after the stream began building its message.
    struct RotatesWhileSigning {
        authority: Authority,
        bundles: watch::Sender<Arc<TrustBundles>>,
    }

    #[async_trait::async_trait]
    impl SvidIssuer for RotatesWhileSigning {
        async fn sign_x509(&self, req: X509Request) -> Result<Vec<Vec<u8>>, IssueError> {
            self.authority
                .rotate_now(crate::server::KeyKind::X509Ca)
                .unwrap();
            let chain = self
                .authority
                .sign_x509_svid(&req.spiffe_id, &req.spki_der, req.ttl, &req.extensions)
                .map_err(|e| IssueError(e.to_string()));
            // The issuer's contract: the bundle with the new CA is out before the SVID returns.
            let own = self.authority.bundle();
            self.bundles.send_modify(|b| {
                *b = Arc::new(TrustBundles {
                    own,
                    ..(**b).clone()
                })
            });
            chain
        }
        async fn sign_jwt(&self, _: JwtRequest) -> Result<String, IssueError> {
            Err(IssueError("unused".into()))
        }
        fn bundles(&self) -> watch::Receiver<Arc<TrustBundles>> {
            self.bundles.subscribe()
        }
    }

    #[tokio::test]
    async fn a_message_carries_the_ca_of_its_svids_even_one_activated_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let authority =
            Authority::open(dir.path(), td.clone(), AuthorityConfig::default()).unwrap();
        let bundles = watch::Sender::new(Arc::new(TrustBundles {
            trust_domain: td.clone(),
            own: authority.bundle(),
            federated: Default::default(),
        }));
        let issuer = Arc::new(RotatesWhileSigning { authority, bundles });
        let metrics = NodeMetrics::unregistered();
        let audit = AuditLog::memory("test");
        let cache = SvidCache::new(issuer.clone(), audit.clone(), metrics.clone());
        let (_policy_tx, policy_rx) = watch::channel(policies(&td, &["a"]));
        let api = WorkloadApi::new(
            td.clone(),
            Arc::new(Uid1000),
            policy_rx,
            issuer.bundles(),
            cache,
            audit,
            metrics,
        );
        let mut req = Request::new(pb::X509svidRequest {});
        req.extensions_mut().insert(PeerInfo::current_process());
        let mut stream = api.fetch_x509svid(req).await.unwrap().into_inner();
        let first = decoded(stream.next().await.unwrap().unwrap());
        let cas = crate::crypto::x509::split_der_chain(&first.svids[0].bundle).unwrap();
        let now = issuer.authority.bundle();
        assert_eq!(cas, now.x509_authorities, "old and new CA");
        assert_eq!(cas.len(), 2);
        // The SVID is the new CA's (the last in bundle order: previous, then current).
        use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
        let key_id = |der: &[u8], authority: bool| {
            let (_, c) = X509Certificate::from_der(der).unwrap();
            c.extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(a) if authority => {
                        a.key_identifier.as_ref().map(|k| k.0.to_vec())
                    }
                    ParsedExtension::SubjectKeyIdentifier(k) if !authority => Some(k.0.to_vec()),
                    _ => None,
                })
        };
        assert_eq!(
            key_id(&first.svids[0].x509_svid, true),
            key_id(&cas[1], false)
        );
    }
}
