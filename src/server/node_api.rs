//! The node API (`/agentid.v1.Node/*`): node attestation, and signing for node daemons.
//!
//! The server never signs what a node asks for on the node's word alone. Every signing
//! request names the workload's facts; the server evaluates its own policies for them, checks
//! the requested identity is one they give, checks the composite identity the node reports
//! against the policy (declared values, pins, placement) and encodes the composite claims
//! itself. A node attested by join token is a host: it can never claim a pod. A Kubernetes
//! node may claim only pods the server's own view of the cluster shows scheduled on it, and
//! the pod's facts (namespace, service account, labels, image, placement) come from that view;
//! the node's word counts only for the process's unix facts and the digests of files inside
//! the container.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::authority::Authority;
use super::cluster::{Cluster, PodCheckError};
use super::join::{JoinError, JoinTokens};
use super::listen::NodePeer;
use crate::api::convert;
use crate::api::node as pb;
use crate::audit::{
    Action, AuditEvent, AuditLog, Credential, CredentialKind, Decision, Delegation, Identity,
};
use crate::composite::{self, CompositeIdentity, K8s, Pod, Unix};
use crate::crypto::x509::{CertInfo, check_p256_spki};
use crate::policy::{Attested, CompositeSpec, Declared, Entitlement, PolicySet, WorkloadFacts};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::token::{self, FanOut};

/// Default lifetime of a node SVID; nodes renew at about half of it.
pub const DEFAULT_NODE_SVID_TTL: Duration = Duration::from_secs(3600);

/// How a node proved who it is, read back from its SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// `spiffe://<td>/agentid/host/<name>`: a join token; unix workloads only.
    Host { name: String },
    /// `spiffe://<td>/agentid/node/<cluster>/<name>`: Kubernetes node attestation.
    K8s { cluster: String, name: String },
}

impl NodeKind {
    /// The node's SPIFFE ID in `td`.
    pub fn spiffe_id(&self, td: &TrustDomain) -> Result<SpiffeId, Status> {
        let path = match self {
            Self::Host { name } => format!("/agentid/host/{name}"),
            Self::K8s { cluster, name } => format!("/agentid/node/{cluster}/{name}"),
        };
        format!("{}{path}", td.id_string())
            .parse()
            .map_err(|e| Status::invalid_argument(format!("node name: {e}")))
    }

    /// The kind a node SVID's ID names, if it is one.
    pub fn of(id: &SpiffeId, td: &TrustDomain) -> Option<Self> {
        if id.trust_domain() != td {
            return None;
        }
        let parts: Vec<&str> = id.path().trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["agentid", "host", name] => Some(Self::Host {
                name: (*name).to_owned(),
            }),
            ["agentid", "node", cluster, name] => Some(Self::K8s {
                cluster: (*cluster).to_owned(),
                name: (*name).to_owned(),
            }),
            _ => None,
        }
    }

    fn name(&self) -> &str {
        match self {
            Self::Host { name } | Self::K8s { name, .. } => name,
        }
    }
}

/// The node API's state.
#[derive(Clone)]
pub struct NodeApi {
    authority: Arc<Authority>,
    td: TrustDomain,
    policies: watch::Receiver<Arc<PolicySet>>,
    joins: Arc<JoinTokens>,
    audit: AuditLog,
    fan_out: Arc<FanOut>,
    node_ttl: Duration,
    /// The cluster's pods and node attestation; `None`: hosts only.
    cluster: Option<Arc<Cluster>>,
}

/// A workload the server has checked: its facts, the policy entitlement and composite.
struct Checked {
    entitlement: Entitlement,
    composite: Option<Arc<CompositeIdentity>>,
    facts: WorkloadFacts,
}

impl NodeApi {
    pub fn new(
        authority: Arc<Authority>,
        policies: watch::Receiver<Arc<PolicySet>>,
        joins: Arc<JoinTokens>,
        audit: AuditLog,
        node_ttl: Duration,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        Self {
            td: authority.trust_domain().clone(),
            authority,
            policies,
            joins,
            audit,
            fan_out: Arc::new(FanOut::new()),
            node_ttl,
            cluster,
        }
    }

    fn record(&self, event: AuditEvent) {
        if let Err(e) = self.audit.record(event) {
            tracing::error!(error = %e, "writing audit record");
        }
    }

    /// Audits and returns a refusal of `what` for `subject`.
    fn refuse(&self, subject: &str, what: &str, status: Status) -> Status {
        tracing::info!(subject, what, reason = status.message(), "node API refused");
        self.record(
            AuditEvent::new(Action::Denied, subject)
                .decision(Decision::deny(format!("{what}: {}", status.message()))),
        );
        status
    }

    /// The calling node, from its verified client certificate.
    #[allow(clippy::result_large_err)]
    fn node<T>(&self, req: &Request<T>) -> Result<(SpiffeId, NodeKind), Status> {
        let peer = req
            .extensions()
            .get::<NodePeer>()
            .cloned()
            .unwrap_or_default();
        let Some(id) = peer.id else {
            return Err(Status::unauthenticated(
                "this call needs the node SVID as the TLS client certificate (Attest first)",
            ));
        };
        match NodeKind::of(&id, &self.td) {
            Some(kind) => Ok((id, kind)),
            None => Err(Status::permission_denied(format!(
                "{id} is not a node of trust domain {}",
                self.td
            ))),
        }
    }

    fn node_svid(&self, id: &SpiffeId, public_key: &[u8]) -> Result<pb::NodeSvid, Status> {
        check_p256_spki(public_key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let chain = self
            .authority
            .sign_x509_svid(id, public_key, self.node_ttl, &[])
            .map_err(|e| Status::unavailable(format!("signing the node SVID: {e}")))?;
        Ok(pb::NodeSvid {
            spiffe_id: id.to_string(),
            cert_chain: chain,
            bundle: self.authority.bundle_document(),
        })
    }

    /// Checks a signing request's workload and requested identity against the policies.
    async fn check(
        &self,
        node: &NodeKind,
        spiffe_id: &str,
        workload: Option<&pb::Workload>,
    ) -> Result<Checked, Status> {
        let w = workload.ok_or_else(|| Status::invalid_argument("workload must be given"))?;
        let id: SpiffeId = spiffe_id.parse().map_err(|e| {
            Status::invalid_argument(format!("invalid spiffe_id {spiffe_id:?}: {e}"))
        })?;
        let claims_pod = !w.pod_uid.is_empty() || !w.container_id.is_empty();
        let unix = Some(convert::unix_facts(w));
        let facts = match (node, claims_pod) {
            // A process outside any pod, on a host or a Kubernetes node: its unix facts are
            // all there is, and only unix selectors can match them.
            (_, false) => WorkloadFacts { unix, k8s: None },
            (NodeKind::Host { .. }, true) => {
                return Err(Status::permission_denied(
                    "a host node (attested by join token) cannot claim Kubernetes pods",
                ));
            }
            (NodeKind::K8s { cluster, name }, true) => {
                let k8s = self.pod_facts(cluster, name, w).await?;
                WorkloadFacts {
                    unix,
                    k8s: Some(Box::new(k8s)),
                }
            }
        };
        let policies = self.policies.borrow().clone();
        let (entitlements, _) = policies.entitlements(&self.td, &facts);
        let Some(entitlement) = entitlements.into_iter().find(|e| e.spiffe_id == id) else {
            return Err(Status::permission_denied(format!(
                "no identity issued: no policy gives {id} to this workload"
            )));
        };
        let composite = convert::composite(w)?;
        check_composite(&entitlement, &facts, composite.as_deref())?;
        Ok(Checked {
            entitlement,
            composite,
            facts,
        })
    }

    /// The facts of the pod a Kubernetes node claims, from the server's own view: the pod must
    /// exist, be scheduled on that node, and list that container.
    async fn pod_facts(
        &self,
        cluster: &str,
        node: &str,
        w: &pb::Workload,
    ) -> Result<crate::policy::K8sFacts, Status> {
        let Some(view) = &self.cluster else {
            return Err(Status::failed_precondition(
                "this server has no view of a Kubernetes cluster (start it with --cluster-name), \
                 so it cannot verify pods",
            ));
        };
        if cluster != view.name() {
            return Err(Status::permission_denied(format!(
                "the node belongs to cluster {cluster:?}; this server verifies pods of {:?}",
                view.name()
            )));
        }
        if w.pod_uid.is_empty() || w.container_id.is_empty() {
            return Err(Status::invalid_argument(
                "pod_uid and container_id must be given together",
            ));
        }
        view.verify_pod(node, &w.pod_uid, &w.container_id)
            .await
            .map_err(|e| match e {
                PodCheckError::Unavailable { .. } => Status::unavailable(e.to_string()),
                _ => Status::permission_denied(e.to_string()),
            })
    }

    fn audit_signed(&self, node: &SpiffeId, c: &Checked, credential: Credential, policy: &str) {
        let identity = Identity {
            spiffe_id: Some(c.entitlement.spiffe_id.to_string()),
            cid: c.composite.as_ref().map(|i| i.cid()),
            model: c
                .composite
                .as_ref()
                .and_then(|i| i.model.as_ref())
                .map(|m| format!("{}/{}", m.provider, m.id)),
            config_digest: c.composite.as_ref().and_then(|i| i.config_digest.clone()),
            tools_digest: c.composite.as_ref().and_then(|i| i.tools_digest.clone()),
            image_digest: c.composite.as_ref().and_then(|i| i.image_digest.clone()),
        };
        self.record(
            AuditEvent::new(Action::Issued, c.entitlement.spiffe_id.to_string())
                .decision(Decision::allow().policy(policy))
                .credential(credential)
                .identity(identity)
                .attestation(crate::audit::Attestation {
                    selectors: c.facts.selectors(),
                    node: Some(node.to_string()),
                }),
        );
    }
}

/// The composite identity a node reports must be exactly what the server derives from the
/// facts it checked and the declarations (pod annotations, then the policy): placement, image
/// digest, model and agent. Digests of files only the node can see are taken as reported, must
/// be present exactly when files are declared, and must satisfy the pins.
#[allow(clippy::result_large_err)]
fn check_composite(
    e: &Entitlement,
    facts: &WorkloadFacts,
    reported: Option<&CompositeIdentity>,
) -> Result<(), Status> {
    let denied = |m: String| Status::permission_denied(format!("composite identity: {m}"));
    let empty = CompositeSpec::default();
    // What the server itself knows of the workload: placement, image, declarations.
    let (declared, base) = match (&facts.k8s, e.composite.as_deref()) {
        // A pod always has one: its image and placement at least.
        (Some(k8s), spec) => {
            let declared =
                Declared::by_pod(k8s, spec.unwrap_or(&empty)).map_err(|d| denied(d.to_string()))?;
            let placement = K8s {
                cluster: k8s.cluster.clone(),
                namespace: k8s.namespace.clone(),
                serviceaccount: k8s.service_account.clone(),
                pod: Pod {
                    name: k8s.pod_name.clone(),
                    uid: k8s.pod_uid.clone(),
                },
                node: k8s.node_name.clone(),
                container: Some(k8s.container_name.clone()).filter(|c| !c.is_empty()),
            };
            let base = CompositeIdentity {
                image_digest: k8s.image_digest.clone(),
                k8s: Some(placement),
                ..CompositeIdentity::new()
            };
            (declared, base)
        }
        (None, None) => {
            if reported.is_some() {
                return Err(denied(format!("policy {} declares none", e.policy)));
            }
            return Ok(());
        }
        (None, Some(spec)) => {
            let unix = facts.unix.clone().unwrap_or_default();
            let base = CompositeIdentity {
                unix: Some(Unix {
                    uid: unix.uid,
                    gid: unix.gid,
                    path: unix.path.unwrap_or_default(),
                    sha256: unix.sha256.unwrap_or_default(),
                }),
                ..CompositeIdentity::new()
            };
            (Declared::by_policy(spec), base)
        }
    };
    let Some(id) = reported else {
        return Err(denied(format!(
            "policy {} declares one and none was reported",
            e.policy
        )));
    };
    let hashed = |digest: &Option<String>, files: &[String]| digest.is_some() != files.is_empty();
    if !hashed(&id.config_digest, &declared.config_files)
        || !hashed(&id.tools_digest, &declared.tools_files)
    {
        return Err(denied(format!(
            "digests differ from the declared files (policy {}, and pod annotations)",
            e.policy
        )));
    }
    let expected = CompositeIdentity {
        agent: declared.agent(),
        model: declared.model().map_err(|d| denied(d.to_string()))?,
        config_digest: id.config_digest.clone(),
        tools_digest: id.tools_digest.clone(),
        ..base
    };
    if *id != expected {
        let differ = [
            (
                "placement",
                id.k8s != expected.k8s || id.unix != expected.unix,
            ),
            ("image digest", id.image_digest != expected.image_digest),
            ("model", id.model != expected.model),
            ("agent", id.agent != expected.agent),
            ("version", id.v != expected.v),
        ];
        let names: Vec<&str> = differ.iter().filter(|d| d.1).map(|d| d.0).collect();
        let show =
            |c: &CompositeIdentity| String::from_utf8_lossy(&c.canonical_json()).into_owned();
        return Err(denied(format!(
            "the node's report differs from the server's view in {} (reported {}, expected {})",
            names.join(", "),
            show(id),
            show(&expected)
        )));
    }
    let spec = e.composite.as_deref().unwrap_or(&empty);
    let model = id
        .model
        .as_ref()
        .map(|m| format!("{}/{}", m.provider, m.id));
    spec.check_pins(Attested {
        model: model.as_deref(),
        config_digest: id.config_digest.as_deref(),
        tools_digest: id.tools_digest.as_deref(),
        image_digest: id.image_digest.as_deref(),
    })
    .map_err(|p| denied(p.to_string()))
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    async fn attest(
        &self,
        req: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::NodeSvid>, Status> {
        let peer = req
            .extensions()
            .get::<NodePeer>()
            .cloned()
            .unwrap_or_default();
        let body = req.into_inner();
        let mut who = format!(
            "node {:?} from {}",
            body.node_name,
            peer.addr.map(|a| a.to_string()).unwrap_or_default()
        );
        let kind = match &body.credential {
            Some(pb::attest_request::Credential::JoinToken(token)) => {
                let kind = NodeKind::Host {
                    name: body.node_name.clone(),
                };
                // The name becomes one path segment of the node's SPIFFE ID.
                let id = kind.spiffe_id(&self.td)?;
                if NodeKind::of(&id, &self.td).as_ref() != Some(&kind) {
                    return Err(self.refuse(
                        &who,
                        "attest",
                        Status::invalid_argument(
                            "node_name must be one SPIFFE ID path segment (letters, digits, . - _)",
                        ),
                    ));
                }
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                // The store may block on the API server.
                let (joins, token, name) =
                    (self.joins.clone(), token.clone(), body.node_name.clone());
                let redeemed =
                    tokio::task::spawn_blocking(move || joins.redeem(&token, &name, now))
                        .await
                        .unwrap_or_else(|e| Err(JoinError::Store(e.to_string())));
                if let Err(e) = redeemed {
                    let status = match e {
                        JoinError::Store(_) => Status::unavailable(e.to_string()),
                        _ => Status::permission_denied(format!("node attestation refused: {e}")),
                    };
                    return Err(self.refuse(&who, "attest", status));
                }
                kind
            }
            Some(pb::attest_request::Credential::K8sServiceAccountToken(token)) => {
                let Some(view) = &self.cluster else {
                    return Err(self.refuse(
                        &who,
                        "attest",
                        Status::failed_precondition(
                            "Kubernetes node attestation is not configured on this server: start \
                             it with --cluster-name (and --kube-api-url, or in the cluster)",
                        ),
                    ));
                };
                let node = view.attest_node(token).await.map_err(|e| {
                    let status = if e.is_unavailable() {
                        Status::unavailable(format!("node attestation: {e}"))
                    } else {
                        Status::permission_denied(format!("node attestation refused: {e}"))
                    };
                    self.refuse(&who, "attest", status)
                })?;
                // The name comes from the token's pod; a daemon that calls itself otherwise is
                // misconfigured, and would index another node's pods than it may claim.
                if !body.node_name.is_empty() && body.node_name != node.node_name {
                    return Err(self.refuse(
                        &who,
                        "attest",
                        Status::permission_denied(format!(
                            "node attestation refused: the token is bound to pod {} on node \
                             {:?}, but the node daemon calls itself {:?}",
                            node.pod, node.node_name, body.node_name
                        )),
                    ));
                }
                who = format!("{who}, token of pod {}", node.pod);
                NodeKind::K8s {
                    cluster: view.name().to_owned(),
                    name: node.node_name,
                }
            }
            None => {
                return Err(self.refuse(
                    &who,
                    "attest",
                    Status::invalid_argument("a join token or service-account token is required"),
                ));
            }
        };
        let id = kind.spiffe_id(&self.td)?;
        let svid = self
            .node_svid(&id, &body.public_key)
            .map_err(|s| self.refuse(&who, "attest", s))?;
        tracing::info!(node = %id, "node attested");
        self.record(
            AuditEvent::new(Action::Issued, id.to_string())
                .decision(Decision::allow().reason(format!("node attested ({who})")))
                .credential(node_credential(&svid)),
        );
        Ok(Response::new(svid))
    }

    async fn renew_node_svid(
        &self,
        req: Request<pb::RenewNodeSvidRequest>,
    ) -> Result<Response<pb::NodeSvid>, Status> {
        let (id, kind) = self.node(&req)?;
        if let NodeKind::K8s { .. } = kind {
            // A node SVID alone would outlive the pod it was issued to: a Kubernetes node
            // proves itself afresh with its pod-bound token, which dies with the pod.
            return Err(self.refuse(
                &id.to_string(),
                "renew",
                Status::failed_precondition(
                    "Kubernetes nodes renew by attesting with a fresh service-account token",
                ),
            ));
        }
        let svid = self
            .node_svid(&id, &req.get_ref().public_key)
            .map_err(|s| self.refuse(&id.to_string(), "renew", s))?;
        self.record(
            AuditEvent::new(Action::Renewed, id.to_string())
                .decision(Decision::allow())
                .credential(node_credential(&svid)),
        );
        Ok(Response::new(svid))
    }

    async fn sign_x509_svid(
        &self,
        req: Request<pb::SignX509SvidRequest>,
    ) -> Result<Response<pb::SignX509SvidResponse>, Status> {
        let (node, kind) = self.node(&req)?;
        let body = req.into_inner();
        let what = format!("X509-SVID {} for node {}", body.spiffe_id, kind.name());
        let checked = self
            .check(&kind, &body.spiffe_id, body.workload.as_ref())
            .await
            .map_err(|s| self.refuse(&body.spiffe_id, &what, s))?;
        check_p256_spki(&body.public_key).map_err(|e| {
            self.refuse(
                &body.spiffe_id,
                &what,
                Status::invalid_argument(e.to_string()),
            )
        })?;
        let extensions = checked
            .composite
            .as_deref()
            .map(composite::to_extensions)
            .unwrap_or_default();
        let e = &checked.entitlement;
        let chain = self
            .authority
            .sign_x509_svid(&e.spiffe_id, &body.public_key, e.x509_ttl, &extensions)
            .map_err(|err| {
                self.refuse(
                    &body.spiffe_id,
                    &what,
                    Status::unavailable(format!("signing: {err}")),
                )
            })?;
        let mut credential = Credential::new(CredentialKind::X509Svid);
        if let Ok(info) = CertInfo::parse(&chain[0]) {
            credential = credential
                .serial(info.serial_hex)
                .fingerprint_of(&chain[0])
                .not_after(info.not_after.into());
        }
        self.audit_signed(&node, &checked, credential, &e.policy);
        Ok(Response::new(pb::SignX509SvidResponse {
            cert_chain: chain,
            bundle_sequence: self.authority.bundle().sequence,
        }))
    }

    async fn sign_jwt_svid(
        &self,
        req: Request<pb::SignJwtSvidRequest>,
    ) -> Result<Response<pb::SignJwtSvidResponse>, Status> {
        let (node, kind) = self.node(&req)?;
        let body = req.into_inner();
        let what = format!("JWT-SVID {} for node {}", body.spiffe_id, kind.name());
        if body.audience.is_empty() || body.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let checked = self
            .check(&kind, &body.spiffe_id, body.workload.as_ref())
            .await
            .map_err(|s| self.refuse(&body.spiffe_id, &what, s))?;
        let mut claims = Map::new();
        if let Some(c) = &checked.composite {
            let (name, value): (String, Value) = composite::to_jwt_claim(c);
            claims.insert(name, value);
        }
        let e = &checked.entitlement;
        let token = self
            .authority
            .sign_jwt_svid(&e.spiffe_id, &body.audience, e.jwt_ttl, claims)
            .map_err(|err| {
                self.refuse(
                    &body.spiffe_id,
                    &what,
                    Status::unavailable(format!("signing: {err}")),
                )
            })?;
        let credential = Credential::new(CredentialKind::JwtSvid)
            .aud(body.audience.clone())
            .fingerprint_of(token.as_bytes());
        self.audit_signed(&node, &checked, credential, &e.policy);
        Ok(Response::new(pb::SignJwtSvidResponse {
            token,
            bundle_sequence: self.authority.bundle().sequence,
        }))
    }

    async fn sign_task_token(
        &self,
        req: Request<pb::SignTaskTokenRequest>,
    ) -> Result<Response<pb::SignTaskTokenResponse>, Status> {
        let (node, kind) = self.node(&req)?;
        let body = req.into_inner();
        let what = format!("task token for {} via node {}", body.spiffe_id, kind.name());
        let checked = self
            .check(&kind, &body.spiffe_id, body.workload.as_ref())
            .await
            .map_err(|s| self.refuse(&body.spiffe_id, &what, s))?;
        let caller = token::Caller {
            id: checked.entitlement.spiffe_id.clone(),
            cid: checked.composite.as_ref().map(|c| c.cid()),
        };
        // The rules come from the server's own evaluation, never from the node.
        let rules = checked.entitlement.token_rules.clone();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let a = &self.authority;
        a.check_confirmed().map_err(|e| {
            self.refuse(
                &body.spiffe_id,
                "task token",
                Status::unavailable(e.to_string()),
            )
        })?;
        let (issued, action) = match &body.op {
            Some(pb::sign_task_token_request::Op::Mint(m)) => {
                let m = convert::mint_request(m)?;
                let r = a.with_jwt_signer(|s| token::mint(m, &caller, &rules, s, &self.td, now));
                (r, Action::Issued)
            }
            Some(pb::sign_task_token_request::Op::Delegate(d)) => {
                let (parent, d) = convert::delegate_request(d)?;
                let bundle = a.bundle();
                let r = a.with_jwt_signer(|s| {
                    token::delegate(
                        &parent,
                        d,
                        &caller,
                        &rules,
                        s,
                        &self.td,
                        &bundle,
                        &self.fan_out,
                        now,
                    )
                });
                (r, Action::Delegated)
            }
            None => return Err(Status::invalid_argument("op must be mint or delegate")),
        };
        let issued = issued.map_err(|r| {
            let status = convert::refusal_status(&r);
            self.refuse(&body.spiffe_id, &what, status)
        })?;
        let c = &issued.claims;
        self.record(
            AuditEvent::new(action, c.act.sub.to_string())
                .decision(Decision::allow().policy(checked.entitlement.policy.to_string()))
                .credential(
                    Credential::new(CredentialKind::TaskToken)
                        .jti(c.jti.clone())
                        .fingerprint_of(issued.token.as_bytes())
                        .aud(c.aud.iter().cloned()),
                )
                .attestation(crate::audit::Attestation {
                    selectors: checked.facts.selectors(),
                    node: Some(node.to_string()),
                })
                .delegation(Delegation {
                    txn: Some(c.txn.clone()),
                    actors: c.act.chain().map(|a| a.sub.to_string()).collect(),
                    scope: Some(c.scope.to_string()),
                }),
        );
        Ok(Response::new(pb::SignTaskTokenResponse {
            expires_at: c.exp,
            token: issued.token,
            bundle_sequence: self.authority.bundle().sequence,
        }))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let (node, _) = self.node(&req)?;
        tracing::debug!(%node, "node synchronising");
        let mut policies = self.policies.clone();
        let mut bundles = self.authority.subscribe();
        let mut reissue = self.authority.subscribe_reissue();
        let authority = self.authority.clone();
        let state = move |p: &PolicySet, epoch: u64| pb::SyncResponse {
            reissue_epoch: epoch,
            bundle: authority.bundle_document(),
            policies: p
                .sources()
                .iter()
                .map(|s| pb::PolicySource {
                    origin: s.origin.clone(),
                    text: s.text.clone(),
                })
                .collect(),
        };
        let stream = async_stream(move |tx| async move {
            let mut last = None;
            loop {
                let epoch = *reissue.borrow_and_update();
                let msg = state(&policies.borrow_and_update().clone(), epoch);
                bundles.borrow_and_update();
                if last.as_ref() != Some(&msg) {
                    if tx.send(Ok(msg.clone())).await.is_err() {
                        return;
                    }
                    last = Some(msg);
                }
                tokio::select! {
                    r = policies.changed() => if r.is_err() { return },
                    r = bundles.changed() => if r.is_err() { return },
                    r = reissue.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task that owns `tx`; the task ends when the receiver is dropped.
fn async_stream<F, Fut>(f: F) -> SyncStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::SyncResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn node_credential(svid: &pb::NodeSvid) -> Credential {
    let mut c = Credential::new(CredentialKind::X509Svid);
    if let Some(leaf) = svid.cert_chain.first()
        && let Ok(info) = CertInfo::parse(leaf)
    {
        c = c
            .serial(info.serial_hex)
            .fingerprint_of(leaf)
            .not_after(info.not_after.into());
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{K8sFacts, UnixFacts};

    const DIGEST: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn entitlement(spec: Option<CompositeSpec>) -> Entitlement {
        Entitlement {
            policy: "p".into(),
            composite: spec.map(Arc::new),
            spiffe_id: "spiffe://td/agent".parse().unwrap(),
            hint: String::new(),
            x509_ttl: Duration::from_secs(60),
            jwt_ttl: Duration::from_secs(60),
            token_rules: Arc::new(crate::token::TokenRules::default()),
        }
    }

    fn pod_facts() -> WorkloadFacts {
        WorkloadFacts {
            unix: Some(UnixFacts::default()),
            k8s: Some(Box::new(K8sFacts {
                cluster: "prod".into(),
                node_name: "node-a".into(),
                namespace: "payments".into(),
                service_account: "agent".into(),
                pod_name: "refund".into(),
                pod_uid: "u-1".into(),
                container_name: "agent".into(),
                image_digest: Some(DIGEST.into()),
                pod_annotations: [
                    (
                        "agentid.dev/model".to_owned(),
                        "anthropic/claude".to_owned(),
                    ),
                    (
                        "agentid.dev/config-files".to_owned(),
                        "/etc/prompt.md".to_owned(),
                    ),
                ]
                .into(),
                ..Default::default()
            })),
        }
    }

    /// What the node computes for `pod_facts`.
    fn pod_composite() -> CompositeIdentity {
        CompositeIdentity {
            model: composite::Model::parse("anthropic/claude"),
            config_digest: Some(DIGEST.into()),
            image_digest: Some(DIGEST.into()),
            k8s: Some(K8s {
                cluster: "prod".into(),
                namespace: "payments".into(),
                serviceaccount: "agent".into(),
                pod: Pod {
                    name: "refund".into(),
                    uid: "u-1".into(),
                },
                node: "node-a".into(),
                container: Some("agent".into()),
            }),
            ..CompositeIdentity::new()
        }
    }

    #[track_caller]
    fn refused(r: Result<(), Status>, why: &str) {
        let s = r.expect_err(why);
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert!(s.message().contains(why), "{:?} lacks {why:?}", s.message());
    }

    #[test]
    fn a_pod_composite_must_be_the_servers_view_but_for_file_digests() {
        let (e, facts) = (entitlement(None), pod_facts());
        check_composite(&e, &facts, Some(&pod_composite())).unwrap();
        // The config digest is the node's word: any well-formed value passes without pins.
        let mut other_config = pod_composite();
        other_config.config_digest = Some(composite::sha256_digest(b"other"));
        check_composite(&e, &facts, Some(&other_config)).unwrap();

        refused(check_composite(&e, &facts, None), "none was reported");
        type Edit = fn(&mut CompositeIdentity);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |c| c.k8s.as_mut().unwrap().node = "node-b".into(),
                "in placement",
            ),
            (
                |c| c.k8s.as_mut().unwrap().pod.uid = "u-2".into(),
                "in placement",
            ),
            (|c| c.image_digest = None, "in image digest"),
            (
                |c| c.model = composite::Model::parse("openai/gpt-5"),
                "in model",
            ),
            (
                |c| {
                    c.agent = Some(composite::Agent {
                        name: "admin".into(),
                        version: None,
                    })
                },
                "in agent",
            ),
            (|c| c.config_digest = None, "digests differ"),
            (|c| c.tools_digest = Some(DIGEST.into()), "digests differ"),
            (
                |c| {
                    let k = c.k8s.take().unwrap();
                    c.unix = Some(Unix {
                        uid: 0,
                        gid: 0,
                        path: k.node,
                        sha256: DIGEST.into(),
                    });
                },
                "in placement",
            ),
        ];
        for (edit, why) in cases {
            let mut c = pod_composite();
            edit(&mut c);
            refused(check_composite(&e, &facts, Some(&c)), why);
        }
        // Pins apply to what was checked.
        let pinned = entitlement(Some(CompositeSpec {
            image_digests: vec![composite::sha256_digest(b"another image")],
            ..Default::default()
        }));
        refused(
            check_composite(&pinned, &facts, Some(&pod_composite())),
            "image_digest",
        );
    }

    #[test]
    fn a_unix_composite_is_declared_by_the_policy_and_placed_by_the_facts() {
        let spec = CompositeSpec {
            model: Some("anthropic/claude".into()),
            agent_name: Some("refund".into()),
            ..Default::default()
        };
        let facts = WorkloadFacts {
            unix: Some(UnixFacts {
                uid: 1000,
                gid: 1000,
                path: Some("/usr/bin/agent".into()),
                sha256: Some(DIGEST.into()),
                ..Default::default()
            }),
            k8s: None,
        };
        let good = CompositeIdentity {
            agent: Some(composite::Agent {
                name: "refund".into(),
                version: None,
            }),
            model: composite::Model::parse("anthropic/claude"),
            unix: Some(Unix {
                uid: 1000,
                gid: 1000,
                path: "/usr/bin/agent".into(),
                sha256: DIGEST.into(),
            }),
            ..CompositeIdentity::new()
        };
        let e = entitlement(Some(spec));
        check_composite(&e, &facts, Some(&good)).unwrap();
        let mut other_uid = good.clone();
        other_uid.unix.as_mut().unwrap().uid = 0;
        refused(
            check_composite(&e, &facts, Some(&other_uid)),
            "in placement",
        );
        refused(
            check_composite(&entitlement(None), &facts, Some(&good)),
            "declares none",
        );
        check_composite(&entitlement(None), &facts, None).unwrap();
    }
}
