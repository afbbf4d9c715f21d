//! Policies (`AgentIdentity`): which workloads get which SPIFFE IDs, with which TTLs.
//!
//! Parsing, validation, template rendering and matching are pure; `load` reads files.
mod cache;
mod declared;
mod facts;
mod load;
mod schema;
mod template;

pub use cache::{EntitlementCache, Evaluation};
pub use declared::{
    ANNOTATION_AGENT_NAME, ANNOTATION_AGENT_VERSION, ANNOTATION_CONFIG_FILES, ANNOTATION_MODEL,
    ANNOTATION_TOOLS_FILES, Declared, DeclaredError,
};
pub use facts::{AGENT_NAME_ANNOTATION, FactNeeds, K8sFacts, UnixFacts, WorkloadFacts};
pub use load::{
    PolicyError, PolicySource, from_sources, load_paths, parse_documents, read_sources,
};
pub use schema::{
    AgentIdentity, Attested, CompositeSpec, DelegationSpec, K8sSelector, LabelSelector, Metadata,
    PinMismatch, Selector, Spec, TokensSpec, UnixSelector,
};
pub use template::{PLACEHOLDERS, Template, TemplateError};

use std::sync::Arc;
use std::time::Duration;

use crate::spiffe::{SpiffeId, TrustDomain};
use crate::token::TokenRules;

/// Default X509-SVID lifetime.
pub const DEFAULT_X509_TTL: Duration = Duration::from_secs(3600);
/// Default JWT-SVID lifetime (short, as the JWT-SVID standard encourages).
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);
/// Bounds on configurable lifetimes.
pub const X509_TTL_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(30 * 24 * 3600));
pub const JWT_TTL_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// A validated policy, ready to match.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    /// Where it came from, for messages: `file (document N)` or `built-in`.
    pub origin: String,
    pub spiffe_id: Template,
    pub hint: Option<String>,
    pub selector: Selector,
    pub x509_ttl: Duration,
    pub jwt_ttl: Duration,
    pub composite: Option<Arc<CompositeSpec>>,
    /// Task tokens it may mint and to whom it may delegate (`spec.tokens`, `spec.delegation`).
    pub token_rules: Arc<TokenRules>,
}

impl Policy {
    /// The facts this policy's selector and composite identity read.
    fn fact_needs(&self) -> FactNeeds {
        if self.composite.is_some() {
            return FactNeeds::ALL;
        }
        let unix = self.selector.unix.as_ref();
        FactNeeds {
            exe_path: unix.is_some_and(|u| u.path.is_some()),
            exe_sha256: unix.is_some_and(|u| u.sha256.is_some()),
        }
    }
}

/// One identity a caller is entitled to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entitlement {
    pub policy: Arc<str>,
    /// The policy's composite identity part, if any: what to hash and what to pin.
    pub composite: Option<Arc<CompositeSpec>>,
    pub spiffe_id: SpiffeId,
    pub hint: String,
    pub x509_ttl: Duration,
    pub jwt_ttl: Duration,
    /// Task tokens it may mint under this identity, and to whom it may delegate.
    pub token_rules: Arc<TokenRules>,
}

/// All policies in force, in a stable order: files sorted by path, documents in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySet {
    policies: Vec<Policy>,
    /// The texts the policies were parsed from, when they came from texts.
    sources: Arc<[PolicySource]>,
    /// What matching and composing need to know about a caller (derived from `policies`,
    /// once: both are asked on every call).
    needs: FactNeeds,
    needs_user_name: bool,
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl PolicySet {
    /// Wraps already validated policies (names must be unique).
    pub fn new(policies: Vec<Policy>) -> Self {
        let needs = policies
            .iter()
            .map(Policy::fact_needs)
            .fold(FactNeeds::NONE, FactNeeds::union);
        let needs_user_name = policies.iter().any(|p| p.spiffe_id.uses("UserName"));
        Self {
            policies,
            sources: Arc::new([]),
            needs,
            needs_user_name,
        }
    }

    /// The facts about a caller that some policy can use: a selector on the executable, or a
    /// composite identity (which states the executable). Facts outside it cannot change
    /// what a caller is entitled to.
    pub fn fact_needs(&self) -> FactNeeds {
        self.needs
    }

    /// The same policies, remembering the texts they were parsed from.
    pub fn with_sources(mut self, sources: Vec<PolicySource>) -> Self {
        self.sources = sources.into();
        self
    }

    /// The texts the policies were parsed from (empty for built-in policies): what a server
    /// sends its node daemons, which parse them with [`from_sources`].
    pub fn sources(&self) -> &[PolicySource] {
        &self.sources
    }

    /// The policies, in order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Whether matching needs the caller's user name (some template uses `{{ .UserName }}`).
    pub fn needs_user_name(&self) -> bool {
        self.needs_user_name
    }

    /// The identities a workload with `facts` is entitled to, first = default identity.
    ///
    /// Later duplicates of a SPIFFE ID or a hint are dropped so hints stay unique in a response
    /// (SPIRE keeps the oldest entry too). Returns the entitlements and, separately, the
    /// policies that matched but could not render a valid ID for this workload.
    pub fn entitlements(
        &self,
        td: &TrustDomain,
        facts: &WorkloadFacts,
    ) -> (Vec<Entitlement>, Vec<(String, TemplateError)>) {
        let mut out: Vec<Entitlement> = Vec::new();
        let mut errors = Vec::new();
        for p in &self.policies {
            if !p.selector.matches(facts) {
                continue;
            }
            let agent_name = p.composite.as_ref().and_then(|c| c.agent_name.as_deref());
            let id = match p.spiffe_id.render_id(td, &p.name, agent_name, facts) {
                Ok(id) => id,
                Err(e) => {
                    errors.push((p.name.clone(), e));
                    continue;
                }
            };
            let hint = p.hint.clone().unwrap_or_default();
            let dup = out
                .iter()
                .any(|e| e.spiffe_id == id || (!hint.is_empty() && e.hint == hint));
            if !dup {
                out.push(Entitlement {
                    policy: p.name.as_str().into(),
                    spiffe_id: id,
                    hint,
                    x509_ttl: p.x509_ttl,
                    jwt_ttl: p.jwt_ttl,
                    composite: p.composite.clone(),
                    token_rules: p.token_rules.clone(),
                });
            }
        }
        (out, errors)
    }

    /// The built-in policy used when no policy file is given: processes of `uid` get
    /// `spiffe://<td>/user/<name>`.
    pub fn default_for_user(uid: u32, user_name: &str) -> Self {
        // A user name that is not a valid path segment falls back to the numeric uid.
        let segment_ok = !user_name.is_empty()
            && user_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            && user_name != "."
            && user_name != "..";
        let path = if segment_ok {
            format!("/user/{user_name}")
        } else {
            format!("/uid/{uid}")
        };
        let template = Template::parse(&format!("spiffe://{{{{ .TrustDomain }}}}{path}"))
            .expect("built-in template is valid");
        Self::new(vec![Policy {
            name: "default-user".into(),
            origin: "built-in".into(),
            spiffe_id: template,
            hint: Some("default".into()),
            selector: Selector {
                unix: Some(UnixSelector {
                    uid: Some(uid),
                    ..Default::default()
                }),
                k8s: None,
            },
            x509_ttl: DEFAULT_X509_TTL,
            jwt_ttl: DEFAULT_JWT_TTL,
            composite: None,
            token_rules: Arc::default(),
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(uid: u32) -> WorkloadFacts {
        WorkloadFacts {
            unix: Some(UnixFacts {
                uid,
                gid: 100,
                supplementary_gids: Arc::from([5, 6]),
                user_name: Some("ada".into()),
                path: Some("/bin/agent".into()),
                sha256: Some("sha256:aa".into()),
            }),
            k8s: None,
        }
    }

    #[test]
    fn two_policies_two_identities_in_order_and_duplicates_dropped() {
        let yaml = r#"
apiVersion: agentid.dev/v1alpha1
kind: AgentIdentity
metadata: {name: b-second}
spec:
  spiffeID: "spiffe://{{ .TrustDomain }}/svc/b"
  hint: b
  selector: {unix: {uid: 1000}}
---
apiVersion: agentid.dev/v1alpha1
kind: AgentIdentity
metadata: {name: a-first}
spec:
  spiffeID: "spiffe://{{ .TrustDomain }}/uid/{{ .UID }}"
  hint: a
  selector: {unix: {uid: 1000, gid: 100, supplementaryGid: 6}}
---
apiVersion: agentid.dev/v1alpha1
kind: AgentIdentity
metadata: {name: dup-hint}
spec:
  spiffeID: "spiffe://{{ .TrustDomain }}/svc/c"
  hint: b
  selector: {unix: {uid: 1000}}
"#;
        let td = TrustDomain::new("td").unwrap();
        let set = PolicySet::new(parse_documents("p.yaml", yaml, &td).unwrap());
        let (ents, errs) = set.entitlements(&td, &facts(1000));
        assert!(errs.is_empty());
        let ids: Vec<String> = ents.iter().map(|e| e.spiffe_id.to_string()).collect();
        assert_eq!(
            ids,
            ["spiffe://td/svc/b", "spiffe://td/uid/1000"],
            "file order, duplicate hint dropped"
        );
        assert_eq!(ents[0].hint, "b");
        assert!(set.entitlements(&td, &facts(1001)).0.is_empty());
        assert!(!set.needs_user_name());
        let named = "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {name: n}\nspec:\n  spiffeID: \"spiffe://{{ .TrustDomain }}/u/{{ .UserName }}\"\n  selector: {unix: {uid: 1000}}\n";
        let named = PolicySet::new(parse_documents("n.yaml", named, &td).unwrap());
        assert!(named.needs_user_name());
    }

    #[test]
    fn default_policy_names_the_user() {
        let td = TrustDomain::new("td").unwrap();
        let set = PolicySet::default_for_user(1000, "ada");
        let (ents, _) = set.entitlements(&td, &facts(1000));
        assert_eq!(ents[0].spiffe_id.to_string(), "spiffe://td/user/ada");
        assert!(
            !set.needs_user_name(),
            "the name is written into the template"
        );
        let odd = PolicySet::default_for_user(7, "a@b");
        assert_eq!(
            odd.entitlements(&td, &facts(7)).0[0].spiffe_id.to_string(),
            "spiffe://td/uid/7"
        );
    }

    #[test]
    fn k8s_policies_match_pods_and_name_them() {
        let yaml = r#"
apiVersion: agentid.dev/v1alpha1
kind: AgentIdentity
metadata: {name: pod-agent}
spec:
  spiffeID: "spiffe://{{ .TrustDomain }}/ns/{{ .Namespace }}/sa/{{ .ServiceAccount }}/agent/{{ .AgentName }}"
  selector: {k8s: {namespace: payments, podLabels: {app: refund}}}
---
apiVersion: agentid.dev/v1alpha1
kind: AgentIdentity
metadata: {name: host-agent}
spec:
  spiffeID: "spiffe://{{ .TrustDomain }}/host/agent/{{ .AgentName }}"
  selector: {unix: {uid: 1000}}
  composite: {agentName: local-refund}
"#;
        let td = TrustDomain::new("td").unwrap();
        let set = PolicySet::new(parse_documents("k.yaml", yaml, &td).unwrap());
        let mut pod = facts(1000);
        pod.k8s = Some(Box::new(K8sFacts {
            namespace: "payments".into(),
            service_account: "refund-sa".into(),
            pod_labels: [("app".to_owned(), "refund".to_owned())].into(),
            pod_annotations: [(AGENT_NAME_ANNOTATION.to_owned(), "refund".to_owned())].into(),
            ..Default::default()
        }));
        let (ents, errs) = set.entitlements(&td, &pod);
        assert!(errs.is_empty(), "{errs:?}");
        let ids: Vec<String> = ents.iter().map(|e| e.spiffe_id.to_string()).collect();
        assert_eq!(
            ids,
            [
                "spiffe://td/ns/payments/sa/refund-sa/agent/refund",
                "spiffe://td/host/agent/refund"
            ],
            "in a pod, the pod's annotation names the agent"
        );

        let (ents, errs) = set.entitlements(&td, &facts(1000));
        let ids: Vec<String> = ents.iter().map(|e| e.spiffe_id.to_string()).collect();
        assert_eq!(ids, ["spiffe://td/host/agent/local-refund"]);
        assert!(
            errs.is_empty(),
            "the pod policy does not match a host process"
        );

        // A pod whose namespace cannot be a path segment gets no identity from the template.
        pod.k8s.as_mut().unwrap().namespace = "a/b".into();
        let mut open = set.policies()[0].clone();
        open.selector.k8s.as_mut().unwrap().namespace = None;
        let (ents, errs) = PolicySet::new(vec![open]).entitlements(&td, &pod);
        assert!(ents.is_empty());
        assert!(matches!(
            errs.as_slice(),
            [(name, TemplateError::BadValue { name: "Namespace", .. })] if name == "pod-agent"
        ));
        assert!(!set.needs_user_name());
    }

    #[test]
    fn fact_needs_follow_the_selectors_and_composites() {
        let td = TrustDomain::new("td").unwrap();
        let needs = |selector: &str, extra: &str| {
            let yaml = format!(
                "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: n}}\nspec:\n  spiffeID: \"spiffe://{{{{ .TrustDomain }}}}/n\"\n  selector: {{unix: {selector}}}\n{extra}"
            );
            PolicySet::new(parse_documents("n.yaml", &yaml, &td).unwrap()).fact_needs()
        };
        assert_eq!(needs("{uid: 1000}", ""), FactNeeds::NONE);
        assert_eq!(
            PolicySet::default_for_user(1000, "ada").fact_needs(),
            FactNeeds::NONE
        );
        assert_eq!(
            needs("{uid: 1000, path: /usr/bin/agent}", ""),
            FactNeeds {
                exe_path: true,
                exe_sha256: false
            }
        );
        let hex = "ab".repeat(32);
        assert_eq!(
            needs(&format!("{{sha256: \"{hex}\"}}"), ""),
            FactNeeds {
                exe_path: false,
                exe_sha256: true
            }
        );
        // A composite identity states the executable.
        assert_eq!(
            needs("{uid: 1000}", "  composite: {agentName: a}\n"),
            FactNeeds::ALL
        );
        assert_eq!(PolicySet::default().fact_needs(), FactNeeds::NONE);
    }
}
