//! The task-token service (`/agentid.v1.Delegation/*`), served next to the Workload API.
//!
//! Callers are attested exactly as for an SVID fetch (same header, same kernel attestation,
//! same composite identity and pins); the issuer enforces the rules. Every issuance and every
//! refusal is audited, and a refusal's gRPC status names the rule that refused it, also in
//! the `agentid-refusal-rule` metadata for programs.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::issuer::{SvidIssuer, TaskTokenError, TaskTokenOp, TaskTokenRequest};
use super::peer::PeerInfo;
use super::workload_api::{
    Entitled, Issuable, WorkloadApi, audit_identity, audit_selectors, peer_of, to_struct,
};
use crate::api::convert::{self, refusal_status};
use crate::api::delegation as pb;
use crate::audit::{
    Action, Attestation, AuditEvent, Credential, CredentialKind, Decision, Delegation, Identity,
};
use crate::policy::FactNeeds;
use crate::spiffe::SpiffeId;
use crate::token::{self, Issued};

/// The Delegation service: the Workload API's attestation, and an issuer that signs.
#[derive(Clone)]
pub struct DelegationApi {
    api: WorkloadApi,
    issuer: Arc<dyn SvidIssuer>,
}

impl DelegationApi {
    /// Builds the service over the Workload API's attestation and policies.
    pub fn new(api: WorkloadApi, issuer: Arc<dyn SvidIssuer>) -> Self {
        Self { api, issuer }
    }

    /// Chooses which of the caller's identities acts: `wanted` if given, else `fallback`'s
    /// pick. A named identity the caller does not hold is refused like any missing identity.
    fn choose<'a>(
        &self,
        method: &'static str,
        caller: &'a Entitled,
        wanted: &str,
        fallback: impl FnOnce(&'a [Issuable]) -> Result<&'a Issuable, Status>,
    ) -> Result<&'a Issuable, Status> {
        if wanted.is_empty() {
            return fallback(&caller.issuable);
        }
        let id: SpiffeId = wanted
            .parse()
            .map_err(|e| Status::invalid_argument(format!("invalid spiffe_id {wanted:?}: {e}")))?;
        caller
            .issuable
            .iter()
            .find(|i| i.e.spiffe_id == id)
            .ok_or_else(|| {
                let reason = format!("not entitled to {id}");
                self.api.deny(method, &caller.peer, &caller.facts, &reason);
                Status::permission_denied(format!("no identity issued: {reason}"))
            })
    }

    /// Asks the issuer, then audits the outcome and turns it into the reply.
    async fn issue(
        &self,
        method: &'static str,
        caller: &Entitled,
        acting: &Issuable,
        op: TaskTokenOp,
    ) -> Result<pb::TaskTokenResponse, Status> {
        let id = acting.e.spiffe_id.clone();
        let req = TaskTokenRequest {
            caller: token::Caller {
                id: id.clone(),
                cid: acting.composed.as_ref().map(|c| c.cid.clone()),
            },
            rules: acting.e.token_rules.clone(),
            op,
            workload: caller.claims(&self.api, acting).await,
        };
        let delegating = matches!(req.op, TaskTokenOp::Delegate { .. });
        match self.issuer.task_token(req).await {
            Ok(issued) => {
                self.audit_issued(caller, acting, &issued, delegating);
                Ok(pb::TaskTokenResponse {
                    expires_at: issued.claims.exp,
                    token: issued.token,
                })
            }
            Err(TaskTokenError::Refused(r)) => {
                let reason = format!("{id}: refused by rule {}: {r}", r.rule());
                self.api.deny(method, &caller.peer, &caller.facts, &reason);
                Err(refusal_status(&r))
            }
            Err(TaskTokenError::RefusedRemotely {
                rule,
                detail,
                invalid_request,
            }) => {
                let reason = format!("{id}: refused by rule {rule}: {detail}");
                self.api.deny(method, &caller.peer, &caller.facts, &reason);
                Err(convert::refused(&rule, &detail, invalid_request))
            }
            Err(TaskTokenError::Unavailable(e)) => {
                tracing::error!(%id, error = %e, "task token issuance failed");
                Err(Status::unavailable(format!(
                    "task token issuance failed: {e}"
                )))
            }
        }
    }

    fn audit_issued(&self, caller: &Entitled, acting: &Issuable, issued: &Issued, delegated: bool) {
        let c = &issued.claims;
        let action = if delegated {
            Action::Delegated
        } else {
            Action::Issued
        };
        let not_after = time::OffsetDateTime::from_unix_timestamp(c.exp).ok();
        let mut credential = Credential::new(CredentialKind::TaskToken)
            .jti(c.jti.clone())
            .fingerprint_of(issued.token.as_bytes())
            .aud(c.aud.iter().cloned());
        if let Some(t) = not_after {
            credential = credential.not_after(t);
        }
        let identity = Identity {
            spiffe_id: Some(acting.e.spiffe_id.to_string()),
            ..acting
                .composed
                .as_deref()
                .map(audit_identity)
                .unwrap_or_default()
        };
        let event = AuditEvent::new(action, c.act.sub.to_string())
            .decision(Decision::allow().policy(acting.e.policy.to_string()))
            .credential(credential)
            .identity(identity)
            .attestation(Attestation {
                selectors: audit_selectors(&caller.facts),
                node: None,
            })
            .requester(caller.peer.requester())
            .delegation(Delegation {
                txn: Some(c.txn.clone()),
                actors: c.act.chain().map(|a| a.sub.to_string()).collect(),
                scope: Some(c.scope.to_string()),
            });
        if let Err(e) = self.api.audit().record(event) {
            tracing::error!(error = %e, "writing audit record");
        }
    }

    async fn mint(
        &self,
        req: &Request<pb::MintTaskTokenRequest>,
    ) -> Result<pb::TaskTokenResponse, Status> {
        const METHOD: &str = "MintTaskToken";
        let body = req.get_ref();
        let mint = convert::mint_request(body)?;
        let caller = self.entitled(req, METHOD).await?;
        let acting = self.choose(METHOD, &caller, &body.spiffe_id, |all| {
            // Without a name, the one identity whose policy allows minting at all; with none,
            // the first, so the refusal names the rule (no audience allowed).
            let minting: Vec<&Issuable> = all
                .iter()
                .filter(|i| !i.e.token_rules.audiences.is_empty())
                .collect();
            match minting.as_slice() {
                [] => Ok(&all[0]),
                [one] => Ok(one),
                many => Err(Status::invalid_argument(format!(
                    "the caller holds several identities that may mint task tokens ({}); name one with spiffe_id",
                    many.iter()
                        .map(|i| i.e.spiffe_id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        })?;
        self.issue(METHOD, &caller, acting, TaskTokenOp::Mint(mint))
            .await
    }

    async fn delegate(
        &self,
        req: &Request<pb::DelegateRequest>,
    ) -> Result<pb::TaskTokenResponse, Status> {
        const METHOD: &str = "Delegate";
        let body = req.get_ref();
        let (parent, delegate) = convert::delegate_request(body)?;
        let caller = self.entitled(req, METHOD).await?;
        let holder = token::unverified_holder(&body.parent_token);
        let acting = self.choose(METHOD, &caller, &body.spiffe_id, |all| {
            // The identity the parent names as its holder; if none, the first, and the issuer
            // refuses (`not_outermost_actor`) after checking the parent.
            Ok(all
                .iter()
                .find(|i| Some(&i.e.spiffe_id) == holder.as_ref())
                .unwrap_or(&all[0]))
        })?;
        let op = TaskTokenOp::Delegate {
            parent,
            req: delegate,
        };
        self.issue(METHOD, &caller, acting, op).await
    }

    fn verify(
        &self,
        body: &pb::VerifyTaskTokenRequest,
    ) -> Result<pb::VerifyTaskTokenResponse, Status> {
        if body.token.is_empty() {
            return Err(Status::invalid_argument("token must be specified"));
        }
        if body.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let presenter: Option<SpiffeId> = Some(&body.presenter_spiffe_id)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse().map_err(|e| {
                    Status::invalid_argument(format!("invalid presenter_spiffe_id {p:?}: {e}"))
                })
            })
            .transpose()?;
        let bundles = self.api.trust_bundles();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = token::verify(
            &body.token,
            &body.audience,
            presenter.as_ref(),
            |td| bundles.get(td),
            now,
        )
        .map_err(|e| Status::invalid_argument(format!("task token invalid: {e}")))?;
        let serde_json::Value::Object(map) = serde_json::to_value(&claims)
            .map_err(|e| Status::internal(format!("encoding claims: {e}")))?
        else {
            return Err(Status::internal("claims did not encode as an object"));
        };
        Ok(pb::VerifyTaskTokenResponse {
            claims: Some(to_struct(map)),
        })
    }

    async fn entitled<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
    ) -> Result<Entitled, Status> {
        let peer: PeerInfo = peer_of(req)?;
        // Every fact: task tokens and their records are rare next to SVID fetches, and the
        // issuer and the records take the full facts.
        self.api
            .resolve_entitled(&peer, method, FactNeeds::ALL)
            .await
    }

    fn observed<T>(
        &self,
        method: &'static str,
        start: Instant,
        r: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        self.api.observe(method, start, &r);
        r.map(Response::new)
    }
}

#[tonic::async_trait]
impl pb::delegation_server::Delegation for DelegationApi {
    async fn mint_task_token(
        &self,
        req: Request<pb::MintTaskTokenRequest>,
    ) -> Result<Response<pb::TaskTokenResponse>, Status> {
        let start = Instant::now();
        let r = self.mint(&req).await;
        self.observed("MintTaskToken", start, r)
    }

    async fn delegate(
        &self,
        req: Request<pb::DelegateRequest>,
    ) -> Result<Response<pb::TaskTokenResponse>, Status> {
        let start = Instant::now();
        let r = DelegationApi::delegate(self, &req).await;
        self.observed("Delegate", start, r)
    }

    async fn verify_task_token(
        &self,
        req: Request<pb::VerifyTaskTokenRequest>,
    ) -> Result<Response<pb::VerifyTaskTokenResponse>, Status> {
        let start = Instant::now();
        let r = self.verify(req.get_ref());
        self.observed("VerifyTaskToken", start, r)
    }
}
