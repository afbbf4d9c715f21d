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
    let hex = v.strip_prefix("sha256:").unwrap_or(v);
    format!("sha256:{}", hex.to_ascii_lowercase())
}
