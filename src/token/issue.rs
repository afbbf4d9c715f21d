//! The issuer side: minting root task tokens and delegating them to children.
//!
//! Both functions are pure apart from the fan-out counter: the caller (a gRPC service) passes
//! the attested caller, its policy's rules, the signing key and the time.
//!
//! Decisions:
//! - A parent token's `aud` is not checked on delegation: it is presented to the issuer, which
//!   is not its audience, and the child inherits `aud` unchanged, so nothing widens.
//! - A requested TTL is clamped to the caller's `max_ttl`; a TTL that would still end after the
//!   parent's `exp` is refused (`ttl_beyond_parent`) rather than silently shortened, so the
//!   caller learns its child gets less time than it asked for. Without a TTL the child gets
//!   as long as allowed: `min(now + max_ttl, parent exp)`.
//! - The child's actor entry has no `cid`: the child has not been attested by the issuer yet,
//!   and a digest the delegator claims for it would be hearsay. The child's `cid` is known
//!   when it presents the token (to delegate further, or over mTLS to a relying party).
//! - A parent expires for delegation at its `exp`, without the verifiers' clock leeway: the
//!   issuer's own clock set that `exp`.

use std::time::Duration;

use super::claims::{Actor, Scopes, TYP, TaskClaims, TaskContext};
use super::fan_out::FanOut;
use super::rules::{MAX_DEPTH, TokenRules};
use super::verify::{VerifyError, verify_unscoped};
use crate::crypto::jwt::{JwtError, JwtSigner};
use crate::spiffe::{SpiffeBundle, SpiffeId, TrustDomain};

/// Longest `sub` or `purpose` accepted, in bytes.
pub const MAX_TEXT_LEN: usize = 256;

/// The attested caller: who asks for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// SPIFFE ID from the caller's attested SVID.
    pub id: SpiffeId,
    /// Its composite identity digest, when it has a composite identity.
    pub cid: Option<String>,
}

/// A request for a root task token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MintRequest {
    /// Target services (`aud`); at least one, each allowed by the rules.
    pub audience: Vec<String>,
    /// Requested scopes; at least one, each allowed by the rules.
    pub scopes: Vec<String>,
    /// Requested lifetime, clamped to `max_ttl`; `None` means `max_ttl`.
    pub ttl: Option<Duration>,
    /// Free-text purpose carried in `tctx`.
    pub purpose: Option<String>,
    /// The root principal, when the caller acts for someone else (needs `allow_subject`).
    pub subject: Option<String>,
}

/// A request to delegate a parent token to a child agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegateRequest {
    /// The agent that will hold the child token.
    pub child: SpiffeId,
    /// Scopes for the child; at least one, each in the parent token's scopes.
    pub scopes: Vec<String>,
    /// Requested lifetime, clamped to `max_ttl`, refused if it outlives the parent.
    pub ttl: Option<Duration>,
}

/// A signed task token and the claims it carries (for the issuance record and the reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The compact JWS.
    pub token: String,
    pub claims: TaskClaims,
}

/// Why a token was not issued. Each variant is one rule; `rule()` names it stably.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("caller trust domain: {caller} is not in trust domain {td}")]
    ForeignCaller { caller: SpiffeId, td: TrustDomain },
    #[error("audience required: the request names no audience")]
    AudienceRequired,
    #[error("audience not allowed: {0:?} is not in the caller's allowed audiences")]
    AudienceNotAllowed(String),
    #[error("scope required: the request names no scope")]
    ScopeRequired,
    #[error("scope not allowed: {0:?} is not in the caller's allowed scopes")]
    ScopeNotAllowed(String),
    #[error("subject not allowed: the caller may not assert a subject")]
    SubjectNotAllowed,
    #[error("parent invalid: {0}")]
    ParentInvalid(VerifyError),
    #[error("parent expired: the parent token is no longer valid")]
    ParentExpired,
    #[error("not outermost actor: the parent token is held by {actor}, not by the caller {caller}")]
    NotOutermostActor { caller: SpiffeId, actor: SpiffeId },
    #[error(
        "composite changed: the parent token was issued to composite {token}, the caller is now {caller}"
    )]
    CompositeChanged { token: String, caller: String },
    #[error("child not allowed: the caller's policy may not delegate to {0}")]
    ChildNotAllowed(SpiffeId),
    #[error("scope widening: {0:?} is not in the parent token's scopes")]
    ScopeWidening(String),
    #[error("max depth: the parent token allows no further delegation")]
    MaxDepth,
    #[error("max fan-out: the caller already delegated this task {0} times")]
    MaxFanOut(u32),
    #[error(
        "ttl beyond parent: the requested lifetime ends at {requested}, after the parent's exp {parent}"
    )]
    TtlBeyondParent { requested: i64, parent: i64 },
    #[error("signing: {0}")]
    Signing(JwtError),
}

impl Refusal {
    /// The rule that refused, as a stable snake_case name (for metrics, audit and API errors).
    pub fn rule(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::ForeignCaller { .. } => "caller_trust_domain",
            Self::AudienceRequired => "audience_required",
            Self::AudienceNotAllowed(_) => "audience_not_allowed",
            Self::ScopeRequired => "scope_required",
            Self::ScopeNotAllowed(_) => "scope_not_allowed",
            Self::SubjectNotAllowed => "subject_not_allowed",
            Self::ParentInvalid(_) => "parent_invalid",
            Self::ParentExpired => "parent_expired",
            Self::NotOutermostActor { .. } => "not_outermost_actor",
            Self::CompositeChanged { .. } => "composite_changed",
            Self::ChildNotAllowed(_) => "child_not_allowed",
            Self::ScopeWidening(_) => "scope_widening",
            Self::MaxDepth => "max_depth",
            Self::MaxFanOut(_) => "max_fan_out",
            Self::TtlBeyondParent { .. } => "ttl_beyond_parent",
            Self::Signing(_) => "signing",
        }
    }
}

/// Mints a root task token for `caller` in trust domain `td` at `now` (Unix seconds).
pub fn mint(
    req: MintRequest,
    caller: &Caller,
    rules: &TokenRules,
    signer: &JwtSigner,
    td: &TrustDomain,
    now: i64,
) -> Result<Issued, Refusal> {
    check_caller(caller, td)?;
    if req.audience.is_empty() {
        return Err(Refusal::AudienceRequired);
    }
    let mut aud: Vec<String> = Vec::with_capacity(req.audience.len());
    for a in req.audience {
        if !rules.audiences.contains(&a) {
            return Err(Refusal::AudienceNotAllowed(a));
        }
        if !aud.contains(&a) {
            aud.push(a);
        }
    }
    let scope = requested_scopes(req.scopes)?;
    if let Some(s) = scope.iter().find(|s| !rules.scopes.iter().any(|r| r == s)) {
        return Err(Refusal::ScopeNotAllowed(s.to_owned()));
    }
    let sub = match req.subject {
        Some(_) if !rules.allow_subject => return Err(Refusal::SubjectNotAllowed),
        Some(s) => check_text("subject", s)?,
        None => caller.id.to_string(),
    };
    let purpose = req.purpose.map(|p| check_text("purpose", p)).transpose()?;
    let ttl = clamp_ttl(req.ttl, rules)?;
    let depth = rules.max_depth.min(MAX_DEPTH);
    let claims = TaskClaims {
        iss: td.id_string(),
        sub,
        aud,
        iat: now,
        nbf: now,
        exp: now.saturating_add(ttl),
        jti: uuid::Uuid::new_v4().to_string(),
        txn: uuid::Uuid::new_v4().to_string(),
        scope,
        act: Actor {
            sub: caller.id.clone(),
            cid: caller.cid.clone(),
            act: None,
        },
        tctx: TaskContext {
            purpose,
            depth,
            max_depth: depth,
        },
    };
    let token = signer.sign(TYP, &claims).map_err(Refusal::Signing)?;
    Ok(Issued { token, claims })
}

/// Delegates `parent` (held by `caller`) to `req.child` at `now` (Unix seconds).
/// `bundle` is the JWT bundle of `td`, the only trust domain whose parent tokens are accepted.
#[allow(clippy::too_many_arguments)]
pub fn delegate(
    parent: &str,
    req: DelegateRequest,
    caller: &Caller,
    rules: &TokenRules,
    signer: &JwtSigner,
    td: &TrustDomain,
    bundle: &SpiffeBundle,
    fan_out: &FanOut,
    now: i64,
) -> Result<Issued, Refusal> {
    check_caller(caller, td)?;
    let parent =
        verify_unscoped(parent, |t| (t == td).then_some(bundle), now).map_err(|e| match e {
            VerifyError::Expired => Refusal::ParentExpired,
            e => Refusal::ParentInvalid(e),
        })?;
    if parent.exp <= now {
        return Err(Refusal::ParentExpired);
    }
    if parent.act.sub != caller.id {
        return Err(Refusal::NotOutermostActor {
            caller: caller.id.clone(),
            actor: parent.act.sub.clone(),
        });
    }
    if let (Some(token), Some(current)) = (&parent.act.cid, &caller.cid)
        && token != current
    {
        return Err(Refusal::CompositeChanged {
            token: token.clone(),
            caller: current.clone(),
        });
    }
    if !rules.may_delegate_to(&req.child) {
        return Err(Refusal::ChildNotAllowed(req.child));
    }
    let scope = requested_scopes(req.scopes)?;
    if let Some(s) = scope.iter().find(|s| !parent.scope.contains(s)) {
        return Err(Refusal::ScopeWidening(s.to_owned()));
    }
    if parent.tctx.depth == 0 {
        return Err(Refusal::MaxDepth);
    }
    // The delegator's own policy may cap the depth further; it never raises it.
    let depth = (parent.tctx.depth - 1).min(rules.max_depth);
    let exp = match req.ttl {
        None => now.saturating_add(clamp_ttl(None, rules)?).min(parent.exp),
        Some(_) => {
            let requested = now.saturating_add(clamp_ttl(req.ttl, rules)?);
            if requested > parent.exp {
                return Err(Refusal::TtlBeyondParent {
                    requested,
                    parent: parent.exp,
                });
            }
            requested
        }
    };
    fan_out
        .acquire(&parent.txn, &caller.id, rules.max_fan_out, parent.exp, now)
        .map_err(Refusal::MaxFanOut)?;
    let txn = parent.txn.clone();
    let claims = TaskClaims {
        iss: parent.iss,
        sub: parent.sub,
        aud: parent.aud,
        iat: now,
        nbf: now,
        exp,
        jti: uuid::Uuid::new_v4().to_string(),
        txn: parent.txn,
        scope,
        act: Actor {
            sub: req.child,
            cid: None,
            act: Some(Box::new(parent.act)),
        },
        tctx: TaskContext {
            purpose: parent.tctx.purpose,
            depth,
            max_depth: parent.tctx.max_depth,
        },
    };
    match signer.sign(TYP, &claims) {
        Ok(token) => Ok(Issued { token, claims }),
        Err(e) => {
            fan_out.release(&txn, &caller.id);
            Err(Refusal::Signing(e))
        }
    }
}

fn check_caller(caller: &Caller, td: &TrustDomain) -> Result<(), Refusal> {
    if caller.id.trust_domain() != td {
        return Err(Refusal::ForeignCaller {
            caller: caller.id.clone(),
            td: td.clone(),
        });
    }
    Ok(())
}

fn requested_scopes(scopes: Vec<String>) -> Result<Scopes, Refusal> {
    let scope = Scopes::new(scopes).map_err(|e| Refusal::InvalidRequest(e.to_string()))?;
    if scope.is_empty() {
        return Err(Refusal::ScopeRequired);
    }
    Ok(scope)
}

fn check_text(what: &str, s: String) -> Result<String, Refusal> {
    if s.is_empty() || s.len() > MAX_TEXT_LEN || s.chars().any(char::is_control) {
        return Err(Refusal::InvalidRequest(format!(
            "{what} must be 1 to {MAX_TEXT_LEN} bytes without control characters"
        )));
    }
    Ok(s)
}

/// The lifetime in whole seconds: requested (at least one second) or `max_ttl`, whichever is
/// shorter, and never more than [`MAX_TTL`](super::MAX_TTL).
fn clamp_ttl(ttl: Option<Duration>, rules: &TokenRules) -> Result<i64, Refusal> {
    let max = rules.max_ttl.min(super::MAX_TTL);
    let ttl = match ttl {
        Some(t) if t < Duration::from_secs(1) => {
            return Err(Refusal::InvalidRequest(
                "ttl must be at least one second".into(),
            ));
        }
        Some(t) => t.min(max),
        None => max,
    };
    Ok(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1))
}
