//! Conversions between the `agentid.v1` messages and domain types, shared by the services
//! that speak them (the node's Delegation API, the server's node API, the node's client).

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;
use tonic::metadata::MetadataValue;

use super::REFUSAL_RULE;
use super::v1 as pb;
use crate::composite::CompositeIdentity;
use crate::policy::{UnixFacts, WorkloadFacts};
use crate::spiffe::SpiffeId;
use crate::token::{self, Refusal};

/// A requested lifetime in seconds: 0 means "as long as allowed"; negative is an error.
#[allow(clippy::result_large_err)]
pub fn ttl(seconds: i64) -> Result<Option<Duration>, Status> {
    match u64::try_from(seconds) {
        Ok(0) => Ok(None),
        Ok(s) => Ok(Some(Duration::from_secs(s))),
        Err(_) => Err(Status::invalid_argument(format!(
            "ttl_seconds must not be negative (got {seconds})"
        ))),
    }
}

/// The wire form of a requested lifetime.
pub fn ttl_seconds(ttl: Option<Duration>) -> i64 {
    ttl.map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// A mint request as the issuer takes it.
#[allow(clippy::result_large_err)]
pub fn mint_request(m: &pb::MintTaskTokenRequest) -> Result<token::MintRequest, Status> {
    Ok(token::MintRequest {
        audience: m.audience.clone(),
        scopes: m.scopes.clone(),
        ttl: ttl(m.ttl_seconds)?,
        purpose: non_empty(&m.purpose),
        subject: non_empty(&m.subject),
    })
}

/// The wire form of a mint request.
pub fn mint_message(m: &token::MintRequest) -> pb::MintTaskTokenRequest {
    pb::MintTaskTokenRequest {
        audience: m.audience.clone(),
        scopes: m.scopes.clone(),
        ttl_seconds: ttl_seconds(m.ttl),
        purpose: m.purpose.clone().unwrap_or_default(),
        subject: m.subject.clone().unwrap_or_default(),
        spiffe_id: String::new(),
    }
}

/// A delegate request as the issuer takes it: (parent token, request).
#[allow(clippy::result_large_err)]
pub fn delegate_request(
    d: &pb::DelegateRequest,
) -> Result<(String, token::DelegateRequest), Status> {
    if d.parent_token.is_empty() {
        return Err(Status::invalid_argument("parent_token must be specified"));
    }
    let child: SpiffeId = d.child_spiffe_id.parse().map_err(|e| {
        Status::invalid_argument(format!(
            "invalid child_spiffe_id {:?}: {e}",
            d.child_spiffe_id
        ))
    })?;
    Ok((
        d.parent_token.clone(),
        token::DelegateRequest {
            child,
            scopes: d.scopes.clone(),
            ttl: ttl(d.ttl_seconds)?,
        },
    ))
}

/// The wire form of a delegate request.
pub fn delegate_message(parent: &str, d: &token::DelegateRequest) -> pb::DelegateRequest {
    pb::DelegateRequest {
        parent_token: parent.to_owned(),
        child_spiffe_id: d.child.to_string(),
        scopes: d.scopes.clone(),
        ttl_seconds: ttl_seconds(d.ttl),
        spiffe_id: String::new(),
    }
}

/// The status a refusal travels as: the rule in the message and in `agentid-refusal-rule`.
pub fn refusal_status(r: &Refusal) -> Status {
    refused(
        r.rule(),
        &r.to_string(),
        matches!(r, Refusal::InvalidRequest(_)),
    )
}

/// A refusal by `rule` with `detail`, as a status (`InvalidArgument` for malformed requests).
pub fn refused(rule: &str, detail: &str, invalid_request: bool) -> Status {
    let message = format!("refused by rule {rule}: {detail}");
    let mut status = if invalid_request {
        Status::invalid_argument(message)
    } else if rule == "signing" {
        Status::unavailable(message)
    } else {
        Status::permission_denied(message)
    };
    if let Ok(v) = MetadataValue::try_from(rule) {
        status.metadata_mut().insert(REFUSAL_RULE, v);
    }
    status
}

/// The refusing rule a status carries, if it is a refusal.
pub fn refusal_rule(status: &Status) -> Option<&str> {
    status.metadata().get(REFUSAL_RULE)?.to_str().ok()
}

/// What a node reports about a workload.
pub fn workload_message(
    facts: &WorkloadFacts,
    composite: Option<&CompositeIdentity>,
) -> pb::Workload {
    let unix = facts.unix.clone().unwrap_or_default();
    let (pod_uid, container_id) = facts
        .k8s
        .as_ref()
        .map(|k| (k.pod_uid.clone(), k.container_id.clone()))
        .unwrap_or_default();
    pb::Workload {
        uid: unix.uid,
        gid: unix.gid,
        supplementary_gids: unix.supplementary_gids.to_vec(),
        user_name: unix.user_name.unwrap_or_default(),
        exe_path: unix.path.unwrap_or_default(),
        exe_sha256: unix.sha256.unwrap_or_default(),
        pod_uid,
        container_id,
        composite: composite
            .map(|c| String::from_utf8_lossy(&c.canonical_json()).into_owned())
            .unwrap_or_default(),
    }
}

/// The unix facts a node reports; the pod and composite parts are the server's to check.
pub fn unix_facts(w: &pb::Workload) -> UnixFacts {
    UnixFacts {
        uid: w.uid,
        gid: w.gid,
        supplementary_gids: w.supplementary_gids.as_slice().into(),
        user_name: non_empty(&w.user_name),
        path: non_empty(&w.exe_path),
        sha256: non_empty(&w.exe_sha256),
    }
}

/// The composite identity a node reports, parsed and validated; `None` when it sent none.
#[allow(clippy::result_large_err)]
pub fn composite(w: &pb::Workload) -> Result<Option<Arc<CompositeIdentity>>, Status> {
    if w.composite.is_empty() {
        return Ok(None);
    }
    let id: CompositeIdentity = serde_json::from_str(&w.composite)
        .map_err(|e| Status::invalid_argument(format!("composite identity: {e}")))?;
    id.validate()
        .map_err(|e| Status::invalid_argument(format!("composite identity: {e}")))?;
    Ok(Some(Arc::new(id)))
}
