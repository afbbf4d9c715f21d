//! What callers build ([`AuditEvent`] and its sections) and the fixed-order wire form.
//!
//! No type here has room for a private key or a whole token: credentials are named by
//! serial, `jti` or SHA-256 fingerprint only.

use serde::{Serialize, Serializer};
use time::{OffsetDateTime, UtcOffset};

/// The security decision being recorded; the CloudEvents `type` is `dev.agentid.<action>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// A credential (X.509-SVID, JWT-SVID, task token) was issued.
    Issued,
    /// A credential was renewed before expiry.
    Renewed,
    /// A credential request was refused.
    Denied,
    /// A credential was withdrawn (revoked, or its workload went away).
    Withdrawn,
    /// A token was delegated to another actor.
    Delegated,
    /// The trust bundle changed.
    BundleUpdated,
    /// A policy document was accepted.
    PolicyLoaded,
    /// A policy document was refused.
    PolicyRejected,
}

impl Action {
    /// The snake_case name used in `data.decision.action` and the event type.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Issued => "issued",
            Action::Renewed => "renewed",
            Action::Denied => "denied",
            Action::Withdrawn => "withdrawn",
            Action::Delegated => "delegated",
            Action::BundleUpdated => "bundle_updated",
            Action::PolicyLoaded => "policy_loaded",
            Action::PolicyRejected => "policy_rejected",
        }
    }

    /// The CloudEvents `type`, e.g. `dev.agentid.issued`.
    pub fn event_type(self) -> String {
        format!("dev.agentid.{}", self.as_str())
    }

    /// The verdict recorded when the caller gives no [`Decision`]: refusals deny, the rest allow.
    pub fn default_verdict(self) -> Verdict {
        match self {
            Action::Denied | Action::PolicyRejected => Verdict::Deny,
            _ => Verdict::Allow,
        }
    }
}

// Hand-written so `as_str` is the single source of the name.
impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The request was granted.
    Allow,
    /// The request was refused.
    Deny,
}

/// Verdict, reason and deciding policy; the action comes from the event.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Human-readable reason, e.g. which selector was missing.
    pub reason: Option<String>,
    /// Name of the policy (or rule) that decided.
    pub policy: Option<String>,
}

impl Decision {
    /// An allow decision with no reason or policy yet.
    pub fn allow() -> Self {
        Decision {
            verdict: Verdict::Allow,
            reason: None,
            policy: None,
        }
    }

    /// A deny decision with its reason.
    pub fn deny(reason: impl Into<String>) -> Self {
        Decision {
            verdict: Verdict::Deny,
            reason: Some(reason.into()),
            policy: None,
        }
    }

    /// Sets the reason.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Sets the deciding policy's name.
    pub fn policy(mut self, policy: impl Into<String>) -> Self {
        self.policy = Some(policy.into());
        self
    }
}

/// Kind of credential a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum CredentialKind {
    /// An X.509-SVID.
    #[serde(rename = "x509-svid")]
    X509Svid,
    /// A JWT-SVID.
    #[serde(rename = "jwt-svid")]
    JwtSvid,
    /// A task token (minted or delegated).
    #[serde(rename = "task-token")]
    TaskToken,
    /// A trust bundle.
    #[serde(rename = "bundle")]
    Bundle,
}

/// Names a credential without containing it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Credential {
    /// What kind of credential.
    pub kind: CredentialKind,
    /// X.509 serial number, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// JWT ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// `sha256:<hex>` of the DER certificate, compact JWT or bundle document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Expiry, written as RFC 3339 UTC.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_rfc3339"
    )]
    pub not_after: Option<OffsetDateTime>,
    /// Audiences (JWT-SVIDs, task tokens).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aud: Vec<String>,
}

impl Credential {
    /// A credential of `kind` with nothing else set.
    pub fn new(kind: CredentialKind) -> Self {
        Credential {
            kind,
            serial: None,
            jti: None,
            fingerprint: None,
            not_after: None,
            aud: Vec::new(),
        }
    }

    /// Sets the hex serial number.
    pub fn serial(mut self, serial_hex: impl Into<String>) -> Self {
        self.serial = Some(serial_hex.into());
        self
    }

    /// Sets the JWT ID.
    pub fn jti(mut self, jti: impl Into<String>) -> Self {
        self.jti = Some(jti.into());
        self
    }

    /// Sets the fingerprint to `sha256:<hex>` of `bytes`; the bytes themselves are not kept.
    pub fn fingerprint_of(mut self, bytes: &[u8]) -> Self {
        self.fingerprint = Some(sha256_fingerprint(bytes));
        self
    }

    /// Sets the expiry.
    pub fn not_after(mut self, not_after: OffsetDateTime) -> Self {
        self.not_after = Some(not_after);
        self
    }

    /// Sets the audiences.
    pub fn aud<I, S>(mut self, aud: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.aud = aud.into_iter().map(Into::into).collect();
        self
    }
}

/// `sha256:<lowercase hex>` of `bytes`, the fingerprint form used in records.
pub fn sha256_fingerprint(bytes: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    format!("sha256:{}", hex::encode(d.as_ref()))
}

/// Who the workload is (its SPIFFE ID and agent composition digests).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Identity {
    /// The SPIFFE ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Composite agent identity digest, `sha256:<hex>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    /// Model name or digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Digest of the agent configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Digest of the tool set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools_digest: Option<String>,
    /// Container image digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
}

/// Evidence the decision rested on.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Attestation {
    /// Selectors such as `unix:uid:1000`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
    /// The attesting node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Kernel-reported credentials of the calling process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Requester {
    /// Process ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// User ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

impl Requester {
    /// A requester with all three peer credentials known.
    pub fn peer(pid: u32, uid: u32, gid: u32) -> Self {
        Requester {
            pid: Some(pid),
            uid: Some(uid),
            gid: Some(gid),
        }
    }
}

/// Token-delegation context.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Delegation {
    /// Transaction ID tying a delegation chain together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
    /// Actor chain, outermost first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actors: Vec<String>,
    /// Granted scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// Risk assessment attached to a decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Risk {
    /// Score; non-finite values are written as `null`.
    pub score: f64,
}

/// One security decision to record; chain fields are added by [`super::AuditLog::record`].
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// What happened.
    pub action: Action,
    /// CloudEvents `subject` (usually a SPIFFE ID); omitted when empty.
    pub subject: String,
    /// Verdict and reason; `None` records [`Action::default_verdict`].
    pub decision: Option<Decision>,
    /// The credential concerned.
    pub credential: Option<Credential>,
    /// The workload's identity.
    pub identity: Option<Identity>,
    /// Attestation evidence.
    pub attestation: Option<Attestation>,
    /// The calling process.
    pub requester: Option<Requester>,
    /// Delegation context.
    pub delegation: Option<Delegation>,
    /// Risk score.
    pub risk: Option<Risk>,
}

impl AuditEvent {
    /// An event for `action` about `subject`, with no optional sections.
    pub fn new(action: Action, subject: impl Into<String>) -> Self {
        AuditEvent {
            action,
            subject: subject.into(),
            decision: None,
            credential: None,
            identity: None,
            attestation: None,
            requester: None,
            delegation: None,
            risk: None,
        }
    }

    /// Sets the decision.
    pub fn decision(mut self, decision: Decision) -> Self {
        self.decision = Some(decision);
        self
    }

    /// Sets the credential.
    pub fn credential(mut self, credential: Credential) -> Self {
        self.credential = Some(credential);
        self
    }

    /// Sets the identity.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Sets the attestation evidence.
    pub fn attestation(mut self, attestation: Attestation) -> Self {
        self.attestation = Some(attestation);
        self
    }

    /// Sets the requester.
    pub fn requester(mut self, requester: Requester) -> Self {
        self.requester = Some(requester);
        self
    }

    /// Sets the delegation context.
    pub fn delegation(mut self, delegation: Delegation) -> Self {
        self.delegation = Some(delegation);
        self
    }

    /// Sets the risk score.
    pub fn risk(mut self, score: f64) -> Self {
        self.risk = Some(Risk { score });
        self
    }
}

// ---- wire form ----
//
// Structs, not maps, so member order is fixed by declaration. `integrity` is the last member of
// `data` and `data` the last of the envelope: the line therefore always ends with
// `"hash":"…"}}}`, which is what the chain code seals and checks.

#[derive(Serialize)]
struct Envelope<'a> {
    specversion: &'static str,
    id: String,
    source: &'a str,
    #[serde(rename = "type")]
    kind: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    subject: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: Data<'a>,
}

#[derive(Serialize)]
struct Data<'a> {
    decision: WireDecision<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credential: Option<&'a Credential>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<&'a Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attestation: Option<&'a Attestation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requester: Option<&'a Requester>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delegation: Option<&'a Delegation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    risk: Option<&'a Risk>,
    integrity: WireIntegrity<'a>,
}

#[derive(Serialize)]
struct WireDecision<'a> {
    verdict: Verdict,
    action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a str>,
}

#[derive(Serialize)]
struct WireIntegrity<'a> {
    seq: u64,
    prev_hash: &'a str,
    // Always "" here: the chain code replaces it after hashing.
    hash: &'static str,
}

/// Chain position and envelope metadata assigned by the log.
pub(super) struct Stamp<'a> {
    pub source: &'a str,
    pub id: String,
    pub time: String,
    pub seq: u64,
    pub prev_hash: &'a str,
}

/// Appends the unsealed line (integrity.hash = "") for `event` to `out`.
pub(super) fn encode(
    event: &AuditEvent,
    stamp: Stamp<'_>,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    let decision = event.decision.as_ref();
    let envelope = Envelope {
        specversion: "1.0",
        id: stamp.id,
        source: stamp.source,
        kind: event.action.event_type(),
        subject: &event.subject,
        time: stamp.time,
        datacontenttype: "application/json",
        data: Data {
            decision: WireDecision {
                verdict: decision.map_or(event.action.default_verdict(), |d| d.verdict),
                action: event.action,
                reason: decision.and_then(|d| d.reason.as_deref()),
                policy: decision.and_then(|d| d.policy.as_deref()),
            },
            credential: event.credential.as_ref(),
            identity: event.identity.as_ref(),
            attestation: event.attestation.as_ref(),
            requester: event.requester.as_ref(),
            delegation: event.delegation.as_ref(),
            risk: event.risk.as_ref(),
            integrity: WireIntegrity {
                seq: stamp.seq,
                prev_hash: stamp.prev_hash,
                hash: "",
            },
        },
    };
    serde_json::to_writer(out, &envelope)
}

/// RFC 3339 in UTC: `2026-05-01T12:34:56Z`, or with `.mmm` milliseconds when `millis`.
pub(super) fn rfc3339(t: OffsetDateTime, millis: bool) -> String {
    // Formatted by hand: the well-known Rfc3339 formatter varies the fraction width.
    let t = t.checked_to_offset(UtcOffset::UTC).unwrap_or(t);
    let date = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if millis {
        format!("{date}.{:03}Z", t.millisecond())
    } else {
        format!("{date}Z")
    }
}

fn ser_opt_rfc3339<S: Serializer>(t: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t, false)),
        None => s.serialize_none(),
    }
}
