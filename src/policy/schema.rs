//! The `AgentIdentity` document, as written in YAML files (and later as a Kubernetes CRD).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::facts::{K8sFacts, UnixFacts, WorkloadFacts};

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
    /// Task tokens the agent may mint (absent: none).
    #[serde(default)]
    pub tokens: Option<TokensSpec>,
    /// Sub-agents the agent may delegate task tokens to (absent: none).
    #[serde(default)]
    pub delegation: Option<DelegationSpec>,
}

/// Which task tokens an agent may mint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokensSpec {
    /// Audiences (target services) a token may name.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Scopes a token may carry.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Longest lifetime of a token (default 5m, at most 1h).
    #[serde(default, rename = "maxTTL", with = "humantime_serde")]
    pub max_ttl: Option<Duration>,
    /// May the agent name the principal (`sub`) it acts for? Otherwise `sub` is the agent.
    #[serde(default)]
    pub allow_subject: bool,
}

/// To whom, and how far, an agent may delegate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DelegationSpec {
    /// SPIFFE IDs of allowed sub-agents: exact, or a prefix ending in `/*`.
    #[serde(default)]
    pub allowed_children: Vec<String>,
    /// How many delegation hops a token minted by this agent allows (default 2).
    #[serde(default)]
    pub max_depth: Option<u32>,
    /// Tokens this agent may delegate per task (`txn`) (default 10).
    #[serde(default)]
    pub max_fan_out: Option<u32>,
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
    /// Pod attributes; never matches a caller that is not in a known pod.
    #[serde(default)]
    pub k8s: Option<K8sSelector>,
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

/// Kubernetes pod and container attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct K8sSelector {
    pub namespace: Option<String>,
    /// Labels the pod's namespace must carry (all of them).
    pub namespace_selector: Option<LabelSelector>,
    pub service_account: Option<String>,
    /// Labels the pod must carry (all of them; the pod may have more).
    pub pod_labels: Option<BTreeMap<String, String>>,
    pub container_name: Option<String>,
    /// `sha256:<hex>` of the container's image, as its status `imageID` reports it.
    pub image_digest: Option<String>,
}

/// The `matchLabels` form of a Kubernetes label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    /// True when no attribute is given (such a selector is refused at load: it would match everyone).
    pub fn is_empty(&self) -> bool {
        self.unix.as_ref().is_none_or(UnixSelector::is_empty)
            && self.k8s.as_ref().is_none_or(K8sSelector::is_empty)
    }

    /// True when every attribute given matches `facts`.
    pub fn matches(&self, facts: &WorkloadFacts) -> bool {
        if self.is_empty() {
            return false;
        }
        // An empty part constrains nothing, so it must not demand facts of its kind either.
        let unix_ok = match (self.unix.as_ref().filter(|s| !s.is_empty()), &facts.unix) {
            (Some(sel), Some(f)) => sel.matches(f),
            (Some(_), None) => false,
            (None, _) => true,
        };
        let k8s_ok = match (self.k8s.as_ref().filter(|s| !s.is_empty()), &facts.k8s) {
            (Some(sel), Some(f)) => sel.matches(f),
            (Some(_), None) => false,
            (None, _) => true,
        };
        unix_ok && k8s_ok
    }
}

impl UnixSelector {
    fn is_empty(&self) -> bool {
        self == &UnixSelector::default()
    }

    fn matches(&self, f: &UnixFacts) -> bool {
        self.uid.is_none_or(|v| v == f.uid)
            && self.gid.is_none_or(|v| v == f.gid)
            && self
                .supplementary_gid
                .is_none_or(|v| f.supplementary_gids.contains(&v))
            && self
                .path
                .as_ref()
                .is_none_or(|v| f.path.as_ref() == Some(v))
            && self
                .sha256
                .as_ref()
                .is_none_or(|v| f.sha256.as_deref() == Some(normalize_sha256(v).as_str()))
    }
}

impl K8sSelector {
    /// True when nothing is constrained. Empty label maps are refused at load, so they only
    /// reach here from code that builds selectors by hand.
    fn is_empty(&self) -> bool {
        self.namespace.is_none()
            && self
                .namespace_selector
                .as_ref()
                .is_none_or(|s| s.match_labels.is_empty())
            && self.service_account.is_none()
            && self.pod_labels.as_ref().is_none_or(BTreeMap::is_empty)
            && self.container_name.is_none()
            && self.image_digest.is_none()
    }

    fn matches(&self, f: &K8sFacts) -> bool {
        let subset = |want: &BTreeMap<String, String>, have: &BTreeMap<String, String>| {
            want.iter().all(|(k, v)| have.get(k) == Some(v))
        };
        self.namespace.as_ref().is_none_or(|v| *v == f.namespace)
            && self
                .namespace_selector
                .as_ref()
                .is_none_or(|s| subset(&s.match_labels, &f.namespace_labels))
            && self
                .service_account
                .as_ref()
                .is_none_or(|v| *v == f.service_account)
            && self
                .pod_labels
                .as_ref()
                .is_none_or(|want| subset(want, &f.pod_labels))
            && self
                .container_name
                .as_ref()
                .is_none_or(|v| *v == f.container_name)
            && self.image_digest.as_ref().is_none_or(|v| {
                f.image_digest
                    .as_deref()
                    .is_some_and(|d| d.eq_ignore_ascii_case(v))
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod() -> K8sFacts {
        K8sFacts {
            cluster: "prod".into(),
            node_name: "node-a".into(),
            namespace: "payments".into(),
            namespace_labels: labels(&[("team", "pay"), ("env", "prod")]),
            service_account: "refund".into(),
            pod_name: "refund-7c9d".into(),
            pod_uid: "uid-1".into(),
            pod_labels: labels(&[("app", "refund"), ("tier", "agent")]),
            container_name: "agent".into(),
            image_digest: Some(format!("sha256:{}", "ab".repeat(32))),
            ..Default::default()
        }
    }

    fn in_pod() -> WorkloadFacts {
        WorkloadFacts {
            unix: Some(UnixFacts {
                uid: 1000,
                gid: 1000,
                ..Default::default()
            }),
            k8s: Some(Box::new(pod())),
        }
    }

    fn k8s(sel: K8sSelector) -> Selector {
        Selector {
            unix: None,
            k8s: Some(sel),
        }
    }

    #[test]
    fn every_k8s_field_matches_and_mismatches() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        /// A change to the facts that makes the selector stop matching.
        type Breaks = fn(&mut K8sFacts);
        // (attribute, selector that matches `in_pod()`, what breaks it)
        let cases: Vec<(&str, K8sSelector, Breaks)> = vec![
            (
                "namespace",
                K8sSelector {
                    namespace: Some("payments".into()),
                    ..Default::default()
                },
                |f| f.namespace = "other".into(),
            ),
            (
                "namespaceSelector",
                K8sSelector {
                    namespace_selector: Some(LabelSelector {
                        match_labels: labels(&[("team", "pay")]),
                    }),
                    ..Default::default()
                },
                |f| f.namespace_labels = labels(&[("team", "other")]),
            ),
            (
                "serviceAccount",
                K8sSelector {
                    service_account: Some("refund".into()),
                    ..Default::default()
                },
                |f| f.service_account = "default".into(),
            ),
            (
                "podLabels",
                K8sSelector {
                    pod_labels: Some(labels(&[("app", "refund")])),
                    ..Default::default()
                },
                |f| f.pod_labels = labels(&[("app", "billing")]),
            ),
            (
                "containerName",
                K8sSelector {
                    container_name: Some("agent".into()),
                    ..Default::default()
                },
                |f| f.container_name = "sidecar".into(),
            ),
            (
                "imageDigest",
                K8sSelector {
                    image_digest: Some(digest.clone()),
                    ..Default::default()
                },
                |f| f.image_digest = Some(format!("sha256:{}", "cd".repeat(32))),
            ),
            (
                "imageDigest (none reported)",
                K8sSelector {
                    image_digest: Some(digest.clone()),
                    ..Default::default()
                },
                |f| f.image_digest = None,
            ),
        ];
        for (what, sel, breaks) in cases {
            let sel = k8s(sel);
            assert!(!sel.is_empty(), "{what}");
            assert!(sel.matches(&in_pod()), "{what} should match");
            let mut facts = in_pod();
            breaks(facts.k8s.as_mut().unwrap());
            assert!(!sel.matches(&facts), "{what} should not match");
        }
    }

    #[test]
    fn image_digest_compares_hex_case_insensitively() {
        let sel = k8s(K8sSelector {
            image_digest: Some(format!("sha256:{}", "ab".repeat(32))),
            ..Default::default()
        });
        let mut facts = in_pod();
        facts.k8s.as_mut().unwrap().image_digest = Some(format!("sha256:{}", "AB".repeat(32)));
        assert!(sel.matches(&facts));
    }

    #[test]
    fn namespace_and_namespace_selector_must_both_match() {
        let sel = k8s(K8sSelector {
            namespace: Some("payments".into()),
            namespace_selector: Some(LabelSelector {
                match_labels: labels(&[("team", "pay"), ("env", "prod")]),
            }),
            ..Default::default()
        });
        assert!(sel.matches(&in_pod()));

        let mut other_ns = in_pod();
        other_ns.k8s.as_mut().unwrap().namespace = "billing".into();
        assert!(!sel.matches(&other_ns), "labels match, name does not");

        let mut one_label = in_pod();
        one_label.k8s.as_mut().unwrap().namespace_labels = labels(&[("team", "pay")]);
        assert!(
            !sel.matches(&one_label),
            "every matchLabels entry is needed"
        );

        let mut unknown = in_pod();
        unknown.k8s.as_mut().unwrap().namespace_labels.clear();
        assert!(
            !sel.matches(&unknown),
            "unknown namespace labels fail closed"
        );
    }

    #[test]
    fn pod_labels_are_a_subset_match() {
        let sel = |pairs: &[(&str, &str)]| {
            k8s(K8sSelector {
                pod_labels: Some(labels(pairs)),
                ..Default::default()
            })
        };
        assert!(sel(&[("app", "refund")]).matches(&in_pod()), "pod has more");
        assert!(sel(&[("app", "refund"), ("tier", "agent")]).matches(&in_pod()));
        assert!(
            !sel(&[("app", "refund"), ("tier", "web")]).matches(&in_pod()),
            "a wrong value"
        );
        assert!(
            !sel(&[("app", "refund"), ("canary", "true")]).matches(&in_pod()),
            "a label the pod lacks"
        );
        assert!(
            !sel(&[("app", "")]).matches(&in_pod()),
            "an empty value is a value, not a wildcard"
        );
    }

    #[test]
    fn unix_and_k8s_parts_must_both_match() {
        let sel = Selector {
            unix: Some(UnixSelector {
                uid: Some(1000),
                ..Default::default()
            }),
            k8s: Some(K8sSelector {
                namespace: Some("payments".into()),
                ..Default::default()
            }),
        };
        assert!(sel.matches(&in_pod()));
        let mut wrong_uid = in_pod();
        wrong_uid.unix.as_mut().unwrap().uid = 0;
        assert!(!sel.matches(&wrong_uid));
        let mut wrong_ns = in_pod();
        wrong_ns.k8s.as_mut().unwrap().namespace = "default".into();
        assert!(!sel.matches(&wrong_ns));
        let no_unix = WorkloadFacts {
            unix: None,
            k8s: Some(Box::new(pod())),
        };
        assert!(!sel.matches(&no_unix));
    }

    #[test]
    fn k8s_selector_never_matches_a_caller_outside_a_pod() {
        let sel = k8s(K8sSelector {
            namespace: Some("payments".into()),
            ..Default::default()
        });
        let host_process = WorkloadFacts {
            unix: Some(UnixFacts {
                uid: 1000,
                ..Default::default()
            }),
            k8s: None,
        };
        assert!(!sel.matches(&host_process));
        assert!(!sel.matches(&WorkloadFacts::default()));
    }

    #[test]
    fn empty_parts_count_as_empty() {
        assert!(Selector::default().is_empty());
        assert!(k8s(K8sSelector::default()).is_empty());
        assert!(
            k8s(K8sSelector {
                pod_labels: Some(BTreeMap::new()),
                namespace_selector: Some(LabelSelector::default()),
                ..Default::default()
            })
            .is_empty()
        );
        assert!(!k8s(K8sSelector::default()).matches(&in_pod()));
        // An empty k8s part beside a unix part does not demand pod facts.
        let sel = Selector {
            unix: Some(UnixSelector {
                uid: Some(1000),
                ..Default::default()
            }),
            k8s: Some(K8sSelector::default()),
        };
        let host_process = WorkloadFacts {
            unix: in_pod().unix,
            k8s: None,
        };
        assert!(sel.matches(&host_process));
    }
}
