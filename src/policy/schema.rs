//! The `AgentIdentity` document, as written in YAML files (and later as a Kubernetes CRD).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::facts::WorkloadFacts;

/// One policy document.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentIdentity {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

/// Object metadata: only the name is used.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
}

/// What the policy grants.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    /// SPIFFE ID template, e.g. `spiffe://{{ .TrustDomain }}/svc`.
    #[serde(rename = "spiffeID")]
    pub spiffe_id: String,
    #[serde(default)]
    pub hint: Option<String>,
    pub selector: Selector,
    #[serde(default, rename = "x509TTL", with = "humantime_serde")]
    pub x509_ttl: Option<Duration>,
    #[serde(default, rename = "jwtTTL", with = "humantime_serde")]
    pub jwt_ttl: Option<Duration>,
    /// What the agent is (declared, in unix mode) and must be (pins).
    #[serde(default)]
    pub composite: Option<CompositeSpec>,
}

/// The composite identity part of a policy.
///
/// In unix mode the policy declares what the pod annotations declare in Kubernetes: the model,
/// the agent's name and version, and which files hold its configuration and tool manifest
/// (absolute paths as the process sees them). The pins say what the attested values must be:
/// when a list is given, the attested value must be in it or no SVID is issued.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CompositeSpec {
    /// `provider/id`, e.g. `anthropic/claude-sonnet-4-5`.
    pub model: Option<String>,
    pub agent_name: Option<String>,
    pub agent_version: Option<String>,
    /// Files whose combined digest is `config_digest` (system prompt, agent settings).
    #[serde(default)]
    pub config_files: Vec<String>,
    /// Files whose combined digest is `tools_digest` (tool / MCP manifest).
    #[serde(default)]
    pub tools_files: Vec<String>,
    /// Allowed models (`provider/id`).
    #[serde(default)]
    pub models: Vec<String>,
    /// Allowed config digests (`sha256:<hex>`).
    #[serde(default)]
    pub config_digests: Vec<String>,
    /// Allowed tools digests.
    #[serde(default)]
    pub tools_digests: Vec<String>,
    /// Allowed image digests.
    #[serde(default)]
    pub image_digests: Vec<String>,
}

/// An attested value that a policy pin does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value} is not pinned by the policy (allowed: {allowed})")]
pub struct PinMismatch {
    pub field: &'static str,
    pub value: String,
    pub allowed: String,
}

/// The attested values a pin check looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attested<'a> {
    pub model: Option<&'a str>,
    pub config_digest: Option<&'a str>,
    pub tools_digest: Option<&'a str>,
    pub image_digest: Option<&'a str>,
}

impl CompositeSpec {
    /// Checks every pin against the attested values; an absent value never satisfies a pin.
    pub fn check_pins(&self, a: Attested<'_>) -> Result<(), PinMismatch> {
        let check = |field, pins: &[String], value: Option<&str>| {
            if pins.is_empty() || value.is_some_and(|v| pins.iter().any(|p| p == v)) {
                return Ok(());
            }
            Err(PinMismatch {
                field,
                value: value.unwrap_or("(none attested)").to_owned(),
                allowed: pins.join(", "),
            })
        };
        check("model", &self.models, a.model)?;
        check("config_digest", &self.config_digests, a.config_digest)?;
        check("tools_digest", &self.tools_digests, a.tools_digest)?;
        check("image_digest", &self.image_digests, a.image_digest)
    }

    /// True when the policy asks for config or tools files to be hashed.
    pub fn hashes_files(&self) -> bool {
        !self.config_files.is_empty() || !self.tools_files.is_empty()
    }
}

/// Which workloads the policy applies to: every attribute given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub unix: Option<UnixSelector>,
}

/// Unix process attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UnixSelector {
    pub uid: Option<u32>,
    /// Primary group.
    pub gid: Option<u32>,
    /// Any supplementary group of the process.
    pub supplementary_gid: Option<u32>,
    /// Executable path as the kernel reports it.
    pub path: Option<String>,
    /// `sha256:<hex>` (or bare hex) of the executable.
    pub sha256: Option<String>,
}

impl Selector {
    /// True when no attribute is given (such a selector is refused at load: it would match everyone).
    pub fn is_empty(&self) -> bool {
        self.unix.as_ref().is_none_or(UnixSelector::is_empty)
    }

    /// True when every attribute given matches `facts`.
    pub fn matches(&self, facts: &WorkloadFacts) -> bool {
        if self.is_empty() {
            return false;
        }
        match (&self.unix, &facts.unix) {
            (Some(sel), Some(f)) => {
                sel.uid.is_none_or(|v| v == f.uid)
                    && sel.gid.is_none_or(|v| v == f.gid)
                    && sel
                        .supplementary_gid
                        .is_none_or(|v| f.supplementary_gids.contains(&v))
                    && sel.path.as_ref().is_none_or(|v| f.path.as_ref() == Some(v))
                    && sel
                        .sha256
                        .as_ref()
                        .is_none_or(|v| f.sha256.as_deref() == Some(normalize_sha256(v).as_str()))
            }
            (Some(_), None) => false,
            (None, _) => true,
        }
    }
}

impl UnixSelector {
    fn is_empty(&self) -> bool {
        self == &UnixSelector::default()
    }
}

/// `sha256:<lowercase hex>` from either that form or bare hex.
pub(crate) fn normalize_sha256(v: &str) -> String {
    let hex = match v.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &v[7..],
        _ => v,
    };
    format!("sha256:{}", hex.to_ascii_lowercase())
}
