//! What declares an agent (AGENT-IDENTITY.md §1): its pod's `agentid.dev/*` annotations, with
//! the policy filling what they leave out; outside Kubernetes, the policy alone. The node
//! daemon builds composite identities from this, and the server checks them against it, so
//! both read the declarations the same way.

use super::{AGENT_NAME_ANNOTATION, CompositeSpec, K8sFacts};
use crate::composite::{Agent, Model};

/// Pod annotations that declare an agent.
pub const ANNOTATION_MODEL: &str = "agentid.dev/model";
pub const ANNOTATION_AGENT_NAME: &str = AGENT_NAME_ANNOTATION;
pub const ANNOTATION_AGENT_VERSION: &str = "agentid.dev/agent-version";
pub const ANNOTATION_CONFIG_FILES: &str = "agentid.dev/config-files";
pub const ANNOTATION_TOOLS_FILES: &str = "agentid.dev/tools-files";

/// A malformed declaration, naming where it came from (an annotation, or the policy's key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {detail}")]
pub struct DeclaredError {
    pub source_name: &'static str,
    pub detail: String,
}

/// The agent's declared model, name, version and files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    pub model: Option<String>,
    pub agent_name: Option<String>,
    pub agent_version: Option<String>,
    /// Files whose combined digest is `config_digest`, as the workload sees them.
    pub config_files: Vec<String>,
    pub tools_files: Vec<String>,
}

impl Declared {
    /// What `spec` declares (a workload outside Kubernetes).
    pub fn by_policy(spec: &CompositeSpec) -> Self {
        Self {
            model: spec.model.clone(),
            agent_name: spec.agent_name.clone(),
            agent_version: spec.agent_version.clone(),
            config_files: spec.config_files.clone(),
            tools_files: spec.tools_files.clone(),
        }
    }

    /// What a pod's annotations declare, `spec` filling what they leave out.
    pub fn by_pod(k8s: &K8sFacts, spec: &CompositeSpec) -> Result<Self, DeclaredError> {
        let note = |key: &str| k8s.pod_annotations.get(key).map(|v| v.trim().to_owned());
        let files = |key: &'static str, fallback: &[String]| {
            let Some(list) = note(key) else {
                return Ok(fallback.to_vec());
            };
            let files: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect();
            if let Some(bad) = files.iter().find(|f| !f.starts_with('/')) {
                return Err(DeclaredError {
                    source_name: key,
                    detail: format!("{bad:?} is not an absolute path"),
                });
            }
            Ok(files)
        };
        Ok(Self {
            model: note(ANNOTATION_MODEL).or_else(|| spec.model.clone()),
            // The same reader `{{ .AgentName }}` uses, so the ID and the composite agree.
            agent_name: k8s
                .agent_name()
                .map(str::to_owned)
                .or_else(|| spec.agent_name.clone()),
            agent_version: note(ANNOTATION_AGENT_VERSION).or_else(|| spec.agent_version.clone()),
            config_files: files(ANNOTATION_CONFIG_FILES, &spec.config_files)?,
            tools_files: files(ANNOTATION_TOOLS_FILES, &spec.tools_files)?,
        })
    }

    /// The declared model, parsed.
    pub fn model(&self) -> Result<Option<Model>, DeclaredError> {
        self.model
            .as_deref()
            .map(|m| {
                Model::parse(m).ok_or_else(|| DeclaredError {
                    source_name: ANNOTATION_MODEL,
                    detail: format!("{m:?} is not <provider>/<model id>"),
                })
            })
            .transpose()
    }

    /// The declared agent: a name, and a version only with a name.
    pub fn agent(&self) -> Option<Agent> {
        self.agent_name.clone().map(|name| Agent {
            name,
            version: self.agent_version.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_first_then_the_policy() {
        let spec = CompositeSpec {
            model: Some("openai/gpt-5".into()),
            agent_name: Some("policy-name".into()),
            config_files: vec!["/etc/policy.md".into()],
            ..Default::default()
        };
        let mut k8s = K8sFacts::default();
        assert_eq!(
            Declared::by_pod(&k8s, &spec).unwrap(),
            Declared::by_policy(&spec)
        );
        for (k, v) in [
            (ANNOTATION_MODEL, " anthropic/claude "),
            (ANNOTATION_AGENT_NAME, "refund"),
            (ANNOTATION_TOOLS_FILES, " /etc/a.json , ,/etc/b.json"),
        ] {
            k8s.pod_annotations.insert(k.into(), v.into());
        }
        let d = Declared::by_pod(&k8s, &spec).unwrap();
        assert_eq!(d.model.as_deref(), Some("anthropic/claude"));
        assert_eq!(d.model().unwrap().unwrap().id, "claude");
        assert_eq!(d.agent().unwrap().name, "refund");
        assert_eq!(d.config_files, ["/etc/policy.md"]);
        assert_eq!(d.tools_files, ["/etc/a.json", "/etc/b.json"]);

        k8s.pod_annotations
            .insert(ANNOTATION_CONFIG_FILES.into(), "relative.md".into());
        let e = Declared::by_pod(&k8s, &spec).unwrap_err();
        assert!(e.to_string().contains(ANNOTATION_CONFIG_FILES), "{e}");
        let bad = Declared {
            model: Some("claude".into()),
            ..Default::default()
        };
        assert!(
            bad.model()
                .unwrap_err()
                .to_string()
                .contains("<provider>/<model id>")
        );
    }
}
