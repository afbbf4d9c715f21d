//! SPIFFE ID templates: `spiffe://{{ .TrustDomain }}/user/{{ .UserName }}`.
//!
//! Only the documented placeholders exist; anything else is an error when the policy loads,
//! not when a workload first matches it.
//!
//! Every value must be one whole SPIFFE ID path segment (`a-z A-Z 0-9 . - _`, not `.` or
//! `..`): values such as a user name, a namespace or a pod annotation come from outside the
//! policy, and a `/` or `%2F` in one must fail the render rather than name another identity.

use std::collections::BTreeMap;

use super::facts::{K8sFacts, UnixFacts, WorkloadFacts};
use crate::spiffe::{IdError, SpiffeId, TrustDomain};

/// The placeholders a template may use, with what they stand for.
pub const PLACEHOLDERS: [(&str, &str); 13] = [
    ("TrustDomain", "the trust domain name"),
    ("PolicyName", "metadata.name of the policy"),
    ("UID", "the caller's user id"),
    ("GID", "the caller's primary group id"),
    ("UserName", "the caller's user name"),
    ("Namespace", "the caller's pod namespace"),
    ("ServiceAccount", "the caller's pod service account"),
    ("PodName", "the caller's pod name"),
    ("PodUID", "the caller's pod UID"),
    ("NodeName", "the node the caller's pod runs on"),
    ("ContainerName", "the caller's container name"),
    ("ClusterName", "the node daemon's --cluster-name"),
    (
        "AgentName",
        "a pod's agentid.dev/agent-name annotation; outside pods, spec.composite.agentName",
    ),
];

/// `TrustDomain, PolicyName, …`, for messages.
fn known_placeholders() -> String {
    PLACEHOLDERS.map(|(name, _)| name).join(", ")
}

/// Why a template is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unterminated placeholder (missing \"}}}}\")")]
    Unterminated,
    #[error("unknown placeholder {{{{ .{0} }}}}; known: {known}", known = known_placeholders())]
    Unknown(String),
    #[error("placeholder must look like {{{{ .Name }}}}, found {{{{{0}}}}}")]
    Syntax(String),
    #[error("placeholder {0} has no value for this workload")]
    NoValue(&'static str),
    #[error("placeholder {name} value {value:?} is not one SPIFFE ID path segment: {reason}")]
    BadValue {
        name: &'static str,
        value: String,
        reason: IdError,
    },
    #[error("result is not a valid SPIFFE ID: {0}")]
    InvalidId(IdError),
    #[error("result {0} is in another trust domain")]
    ForeignTrustDomain(String),
    #[error("result {0} is the trust domain itself; a workload ID needs a path")]
    RootId(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var(&'static str),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `source`, checking every placeholder is known.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                pieces.push(Piece::Lit(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or(TemplateError::Unterminated)?;
            let inner = after[..end].trim();
            let name = inner
                .strip_prefix('.')
                .ok_or_else(|| TemplateError::Syntax(inner.to_owned()))?;
            let known = PLACEHOLDERS
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| TemplateError::Unknown(name.to_owned()))?;
            pieces.push(Piece::Var(known.0));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Lit(rest.to_owned()));
        }
        Ok(Self {
            source: source.to_owned(),
            pieces,
        })
    }

    /// Whether the template contains the placeholder `{{ .<name> }}`.
    pub fn uses(&self, name: &str) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Var(v) if *v == name))
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders for a caller with `facts`, matched by the policy named `policy` whose
    /// `spec.composite.agentName` is `agent_name`, and checks the result is a workload ID in `td`.
    pub fn render_id(
        &self,
        td: &TrustDomain,
        policy: &str,
        agent_name: Option<&str>,
        facts: &WorkloadFacts,
    ) -> Result<SpiffeId, TemplateError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(name) => {
                    let v = value(name, td, policy, agent_name, facts)
                        .filter(|v| !v.is_empty())
                        .ok_or(TemplateError::NoValue(name))?;
                    if let Some(reason) = segment_error(&v) {
                        return Err(TemplateError::BadValue {
                            name,
                            value: v,
                            reason,
                        });
                    }
                    out.push_str(&v);
                }
            }
        }
        let id: SpiffeId = out.parse().map_err(TemplateError::InvalidId)?;
        if id.trust_domain() != td {
            return Err(TemplateError::ForeignTrustDomain(out));
        }
        if id.is_root() {
            return Err(TemplateError::RootId(out));
        }
        Ok(id)
    }

    /// Renders with sample values for every placeholder (a pod caller with unix facts too), to
    /// catch templates that can never yield a valid ID.
    pub fn check(&self, td: &TrustDomain, policy: &str) -> Result<SpiffeId, TemplateError> {
        self.render_id(td, policy, None, &sample_facts())
    }
}

/// A caller for which every placeholder has a value.
fn sample_facts() -> WorkloadFacts {
    WorkloadFacts {
        unix: Some(UnixFacts {
            uid: 1000,
            gid: 1000,
            user_name: Some("user".into()),
            ..Default::default()
        }),
        k8s: Some(Box::new(K8sFacts {
            cluster: "cluster".into(),
            node_name: "node".into(),
            namespace: "namespace".into(),
            service_account: "serviceaccount".into(),
            pod_name: "pod".into(),
            pod_uid: "00000000-0000-0000-0000-000000000000".into(),
            pod_annotations: BTreeMap::from([(
                super::facts::AGENT_NAME_ANNOTATION.to_owned(),
                "agent".to_owned(),
            )]),
            container_name: "container".into(),
            ..Default::default()
        })),
    }
}

fn value(
    name: &str,
    td: &TrustDomain,
    policy: &str,
    agent_name: Option<&str>,
    facts: &WorkloadFacts,
) -> Option<String> {
    let unix = facts.unix.as_ref();
    let k8s = facts.k8s.as_ref();
    let pod = |f: fn(&K8sFacts) -> &String| k8s.map(|k| f(k).clone());
    match name {
        "TrustDomain" => Some(td.to_string()),
        "PolicyName" => Some(policy.to_owned()),
        "UID" => unix.map(|u| u.uid.to_string()),
        "GID" => unix.map(|u| u.gid.to_string()),
        "UserName" => unix.and_then(|u| u.user_name.clone()),
        "Namespace" => pod(|k| &k.namespace),
        "ServiceAccount" => pod(|k| &k.service_account),
        "PodName" => pod(|k| &k.pod_name),
        "PodUID" => pod(|k| &k.pod_uid),
        "NodeName" => pod(|k| &k.node_name),
        "ContainerName" => pod(|k| &k.container_name),
        "ClusterName" => pod(|k| &k.cluster),
        // A pod declares its own agent name, as it declares the rest of its composite identity;
        // the policy's declaration fills in what the pod leaves out, as in the composite.
        "AgentName" => k8s
            .and_then(|k| k.agent_name())
            .or(agent_name)
            .map(str::to_owned),
        _ => None,
    }
}

/// Why `v` is not one whole path segment, if it is not.
pub(super) fn segment_error(v: &str) -> Option<IdError> {
    if v == "." || v == ".." {
        return Some(IdError::DotSegment);
    }
    v.chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        .map(IdError::BadPathChar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_render() {
        let td = TrustDomain::new("td").unwrap();
        let t =
            Template::parse("spiffe://{{ .TrustDomain }}/p/{{.PolicyName}}/u/{{ .UID }}").unwrap();
        assert_eq!(
            t.check(&td, "web").unwrap().to_string(),
            "spiffe://td/p/web/u/1000"
        );
        assert!(t.uses("UID") && !t.uses("UserName"));
    }

    #[test]
    fn errors() {
        let td = TrustDomain::new("td").unwrap();
        assert_eq!(
            Template::parse("spiffe://{{ .Nope }}/x").unwrap_err(),
            TemplateError::Unknown("Nope".into())
        );
        assert_eq!(
            Template::parse("spiffe://{{ .TrustDomain /x").unwrap_err(),
            TemplateError::Unterminated
        );
        assert!(matches!(
            Template::parse("spiffe://{{ TrustDomain }}/x").unwrap_err(),
            TemplateError::Syntax(_)
        ));
        let foreign = Template::parse("spiffe://other/x").unwrap();
        assert!(matches!(
            foreign.check(&td, "p"),
            Err(TemplateError::ForeignTrustDomain(_))
        ));
        let root = Template::parse("spiffe://{{ .TrustDomain }}").unwrap();
        assert!(matches!(
            root.check(&td, "p"),
            Err(TemplateError::RootId(_))
        ));
        let bad = Template::parse("spiffe://{{ .TrustDomain }}/a b").unwrap();
        assert!(matches!(
            bad.check(&td, "p"),
            Err(TemplateError::InvalidId(_))
        ));
    }

    fn td() -> TrustDomain {
        TrustDomain::new("td").unwrap()
    }

    fn pod_caller() -> WorkloadFacts {
        let mut f = sample_facts();
        let k = f.k8s.as_mut().unwrap();
        k.cluster = "prod-eu1".into();
        k.node_name = "node-a".into();
        k.namespace = "payments".into();
        k.service_account = "refund-sa".into();
        k.pod_name = "refund-7c9d".into();
        k.pod_uid = "0b9a4f2e-1c1d-4a5b-9e0f-2d3c4b5a6978".into();
        k.container_name = "agent".into();
        k.pod_annotations.insert(
            super::super::facts::AGENT_NAME_ANNOTATION.into(),
            "refund".into(),
        );
        f
    }

    fn host_caller() -> WorkloadFacts {
        WorkloadFacts {
            k8s: None,
            ..sample_facts()
        }
    }

    fn render(t: &str, agent: Option<&str>, f: &WorkloadFacts) -> Result<String, TemplateError> {
        Template::parse(t)
            .unwrap()
            .render_id(&td(), "pol", agent, f)
            .map(|id| id.to_string())
    }

    #[test]
    fn every_k8s_placeholder_renders() {
        for (name, want) in [
            ("Namespace", "payments"),
            ("ServiceAccount", "refund-sa"),
            ("PodName", "refund-7c9d"),
            ("PodUID", "0b9a4f2e-1c1d-4a5b-9e0f-2d3c4b5a6978"),
            ("NodeName", "node-a"),
            ("ContainerName", "agent"),
            ("ClusterName", "prod-eu1"),
            ("AgentName", "refund"),
        ] {
            let t = format!("spiffe://{{{{ .TrustDomain }}}}/x/{{{{ .{name} }}}}");
            assert_eq!(
                render(&t, None, &pod_caller()).as_deref(),
                Ok(format!("spiffe://td/x/{want}").as_str()),
                "{name}"
            );
            assert!(Template::parse(&t).unwrap().uses(name));
        }
        assert_eq!(
            render(
                "spiffe://{{ .TrustDomain }}/ns/{{ .Namespace }}/sa/{{ .ServiceAccount }}/agent/{{ .AgentName }}",
                None,
                &pod_caller()
            )
            .as_deref(),
            Ok("spiffe://td/ns/payments/sa/refund-sa/agent/refund")
        );
    }

    #[test]
    fn agent_name_comes_from_the_pod_then_from_the_policy() {
        let t = "spiffe://{{ .TrustDomain }}/agent/{{ .AgentName }}";
        assert_eq!(
            render(t, Some("from-policy"), &pod_caller()).as_deref(),
            Ok("spiffe://td/agent/refund"),
            "the pod's annotation wins"
        );
        assert_eq!(
            render(t, Some("from-policy"), &host_caller()).as_deref(),
            Ok("spiffe://td/agent/from-policy")
        );
        assert_eq!(
            render(t, None, &host_caller()),
            Err(TemplateError::NoValue("AgentName"))
        );
        let mut unannotated = pod_caller();
        unannotated.k8s.as_mut().unwrap().pod_annotations.clear();
        assert_eq!(
            render(t, Some("from-policy"), &unannotated).as_deref(),
            Ok("spiffe://td/agent/from-policy"),
            "a pod that declares no name gets the policy's, as its composite does"
        );
        assert_eq!(
            render(t, None, &unannotated),
            Err(TemplateError::NoValue("AgentName"))
        );
    }

    #[test]
    fn k8s_placeholders_have_no_value_outside_a_pod() {
        for name in [
            "Namespace",
            "ServiceAccount",
            "PodName",
            "PodUID",
            "NodeName",
            "ContainerName",
            "ClusterName",
        ] {
            let t = format!("spiffe://{{{{ .TrustDomain }}}}/x/{{{{ .{name} }}}}");
            assert_eq!(
                render(&t, None, &host_caller()),
                Err(TemplateError::NoValue(name)),
                "{name}"
            );
        }
    }

    #[test]
    fn values_cannot_inject_path_segments() {
        let t = "spiffe://{{ .TrustDomain }}/ns/{{ .Namespace }}/sa/x";
        for evil in [
            "a/b", "..", ".", "%2F", "a%2Fb", "a b", "a\nb", "ns/../x", "é", "a?b", "a#b", "/",
        ] {
            let mut f = pod_caller();
            f.k8s.as_mut().unwrap().namespace = evil.into();
            let got = render(t, None, &f);
            assert!(
                matches!(got, Err(TemplateError::BadValue { name: "Namespace", ref value, .. }) if value == evil),
                "{evil:?}: {got:?}"
            );
        }
        let mut empty = pod_caller();
        empty.k8s.as_mut().unwrap().namespace = String::new();
        assert_eq!(
            render(t, None, &empty),
            Err(TemplateError::NoValue("Namespace"))
        );
        // The same holds for the other outside-controlled values.
        let mut f = pod_caller();
        f.k8s.as_mut().unwrap().pod_annotations.insert(
            super::super::facts::AGENT_NAME_ANNOTATION.into(),
            "a/admin".into(),
        );
        assert!(matches!(
            render(
                "spiffe://{{ .TrustDomain }}/agent/{{ .AgentName }}",
                None,
                &f
            ),
            Err(TemplateError::BadValue {
                name: "AgentName",
                ..
            })
        ));
        let mut f = host_caller();
        f.unix.as_mut().unwrap().user_name = Some("../root".into());
        assert!(matches!(
            render("spiffe://{{ .TrustDomain }}/u/{{ .UserName }}", None, &f),
            Err(TemplateError::BadValue {
                name: "UserName",
                ..
            })
        ));
        assert!(matches!(
            render(
                "spiffe://{{ .TrustDomain }}/a/{{ .AgentName }}",
                Some(".."),
                &host_caller()
            ),
            Err(TemplateError::BadValue {
                reason: IdError::DotSegment,
                ..
            })
        ));
    }

    #[test]
    fn unknown_placeholder_lists_every_known_one() {
        let msg = Template::parse("spiffe://{{ .Nope }}/x")
            .unwrap_err()
            .to_string();
        for (name, _) in PLACEHOLDERS {
            assert!(msg.contains(name), "{msg} lacks {name}");
        }
        assert!(msg.starts_with("unknown placeholder {{ .Nope }}; known: TrustDomain, PolicyName"));
    }

    #[test]
    fn check_has_sample_values_for_every_placeholder() {
        let all: String = PLACEHOLDERS
            .iter()
            .map(|(n, _)| format!("/{{{{ .{n} }}}}"))
            .collect();
        let t = Template::parse(&format!("spiffe://{{{{ .TrustDomain }}}}{all}")).unwrap();
        assert!(t.check(&td(), "pol").is_ok());
    }
}
