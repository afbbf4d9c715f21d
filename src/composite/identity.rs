//! The composite identity object (spec §1), its validation and its content address (`cid`).

use serde::{Deserialize, Serialize};

use super::CompositeError;
use super::digest::{sha256_digest, validate_digest};

/// The profile version this build writes and reads.
pub const VERSION: u32 = 1;

/// What an agent is, from facts gathered outside its process. Members other than `v` are
/// optional because not every placement knows every fact (a unix-mode agent may have no model).
///
/// Unknown members are rejected when deserializing: a member this build would drop would
/// change the `cid`, and a clear error beats a mismatch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeIdentity {
    /// Profile version, [`VERSION`].
    pub v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<Agent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Model>,
    /// Digest of the agent's configuration files (system prompt, settings), combined with
    /// [`combine_file_digests`](super::combine_file_digests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Digest of the tool / MCP manifest files, combined the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools_digest: Option<String>,
    /// Digest of the container image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// Kubernetes placement; exclusive with `unix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
    /// Standalone placement; exclusive with `k8s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<Unix>,
}

/// The agent's declared name and version (from the pod spec or policy, not the agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The model the agent is configured to call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub provider: String,
    pub id: String,
}

impl Model {
    /// `provider/id` as a model; `None` unless both parts are non-empty.
    pub fn parse(s: &str) -> Option<Self> {
        match s.split_once('/') {
            Some((provider, id)) if !provider.is_empty() && !id.is_empty() => Some(Self {
                provider: provider.to_owned(),
                id: id.to_owned(),
            }),
            _ => None,
        }
    }
}

/// Where the agent runs in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8s {
    pub cluster: String,
    pub namespace: String,
    pub serviceaccount: String,
    pub pod: Pod,
    pub node: String,
    /// The container within the pod, when the pod has more than one that could be the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// The agent's pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    pub name: String,
    pub uid: String,
}

/// Standalone (non-Kubernetes) placement: the process's owner and executable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unix {
    pub uid: u32,
    pub gid: u32,
    /// Executable path.
    pub path: String,
    /// Executable digest, `sha256:<hex>` like every other digest.
    pub sha256: String,
}

impl CompositeIdentity {
    /// An identity of the current version with no facts yet; fill members with struct update.
    pub fn new() -> Self {
        Self {
            v: VERSION,
            agent: None,
            model: None,
            config_digest: None,
            tools_digest: None,
            image_digest: None,
            k8s: None,
            unix: None,
        }
    }

    /// Checks the version, digest formats, non-empty names and that at most one placement is set.
    pub fn validate(&self) -> Result<(), CompositeError> {
        if self.v != VERSION {
            return Err(CompositeError::UnknownVersion(self.v.to_string()));
        }
        if let Some(a) = &self.agent {
            non_empty("agent.name", &a.name)?;
            if let Some(v) = &a.version {
                non_empty("agent.version", v)?;
            }
        }
        if let Some(m) = &self.model {
            non_empty("model.provider", &m.provider)?;
            non_empty("model.id", &m.id)?;
        }
        for (field, value) in [
            ("config_digest", &self.config_digest),
            ("tools_digest", &self.tools_digest),
            ("image_digest", &self.image_digest),
        ] {
            if let Some(value) = value {
                validate_digest(field, value)?;
            }
        }
        if let Some(k) = &self.k8s {
            non_empty("k8s.cluster", &k.cluster)?;
            non_empty("k8s.namespace", &k.namespace)?;
            non_empty("k8s.serviceaccount", &k.serviceaccount)?;
            non_empty("k8s.pod.name", &k.pod.name)?;
            non_empty("k8s.pod.uid", &k.pod.uid)?;
            non_empty("k8s.node", &k.node)?;
            if let Some(c) = &k.container {
                non_empty("k8s.container", c)?;
            }
        }
        if let Some(u) = &self.unix {
            non_empty("unix.path", &u.path)?;
            validate_digest("unix.sha256", &u.sha256)?;
        }
        if self.k8s.is_some() && self.unix.is_some() {
            return Err(CompositeError::BothPlacements);
        }
        Ok(())
    }

    /// RFC 8785 canonical JSON of the object, the bytes the `cid` hashes.
    pub fn canonical_json(&self) -> Vec<u8> {
        // Only strings, u32s and objects with fixed, distinct keys: none of the canonicalizer's
        // failure cases (non-finite floats, duplicate or non-string keys, raw values) can occur.
        serde_json_canonicalizer::to_vec(self).expect("a CompositeIdentity always canonicalizes")
    }

    /// `sha256:<hex>` of [`canonical_json`](Self::canonical_json): the value a relying party pins.
    pub fn cid(&self) -> String {
        sha256_digest(&self.canonical_json())
    }
}

impl Default for CompositeIdentity {
    fn default() -> Self {
        Self::new()
    }
}

fn non_empty(field: &'static str, value: &str) -> Result<(), CompositeError> {
    if value.is_empty() {
        Err(CompositeError::EmptyField(field))
    } else {
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A full Kubernetes-placed identity used across the module's tests.
    pub(in crate::composite) fn k8s_sample() -> CompositeIdentity {
        CompositeIdentity {
            agent: Some(Agent {
                name: "refund-agent".into(),
                version: Some("1.4.2".into()),
            }),
            model: Some(Model {
                provider: "anthropic".into(),
                id: "claude-sonnet-4-5".into(),
            }),
            config_digest: Some(sha256_digest(b"config")),
            tools_digest: Some(sha256_digest(b"tools")),
            image_digest: Some(sha256_digest(b"image")),
            k8s: Some(K8s {
                cluster: "prod-eu1".into(),
                namespace: "payments".into(),
                serviceaccount: "refund-agent".into(),
                pod: Pod {
                    name: "refund-agent-7c9d".into(),
                    uid: "0f3c2a9e-5b7d-4c1a-9e8f-2d6b4a1c3e5f".into(),
                },
                node: "node-a".into(),
                container: Some("agent".into()),
            }),
            ..CompositeIdentity::new()
        }
    }

    /// A standalone identity with no model.
    pub(in crate::composite) fn unix_sample() -> CompositeIdentity {
        CompositeIdentity {
            agent: Some(Agent {
                name: "batch-agent".into(),
                version: None,
            }),
            config_digest: Some(sha256_digest(b"cfg")),
            unix: Some(Unix {
                uid: 1000,
                gid: 100,
                path: "/usr/local/bin/batch-agent".into(),
                sha256: sha256_digest(b"exe"),
            }),
            ..CompositeIdentity::new()
        }
    }

    #[test]
    fn canonical_json_is_sorted_compact_and_omits_absent_members() {
        let id = CompositeIdentity {
            model: Some(Model {
                provider: "anthropic".into(),
                id: "claude-sonnet-4-5".into(),
            }),
            unix: Some(Unix {
                uid: 0,
                gid: 4_294_967_295,
                path: "/bin/a\u{e9}\"\n".into(),
                sha256: sha256_digest(b""),
            }),
            ..CompositeIdentity::new()
        };
        let text = String::from_utf8(id.canonical_json()).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"model":{"id":"claude-sonnet-4-5","provider":"anthropic"},"#,
                r#""unix":{"gid":4294967295,"path":"/bin/a"#,
                "\u{e9}",
                r#"\"\n","sha256":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","uid":0},"v":1}"#
            )
        );
    }

    #[test]
    fn cid_is_pinned() {
        // Pinned so that a change of canonical form is a visible, deliberate break; recompute
        // independently with `printf %s '<canonical json>' | sha256sum`.
        let id = CompositeIdentity {
            agent: Some(Agent {
                name: "refund-agent".into(),
                version: Some("1.4.2".into()),
            }),
            model: Some(Model {
                provider: "anthropic".into(),
                id: "claude-sonnet-4-5".into(),
            }),
            ..CompositeIdentity::new()
        };
        let canonical = r#"{"agent":{"name":"refund-agent","version":"1.4.2"},"model":{"id":"claude-sonnet-4-5","provider":"anthropic"},"v":1}"#;
        assert_eq!(id.canonical_json(), canonical.as_bytes());
        assert_eq!(id.cid(), sha256_digest(canonical.as_bytes()));
        assert_eq!(
            id.cid(),
            "sha256:8b35fe55ac7759736999b3cd736c17bfa4bd69c33f7b069f8afdf3dff8468da3"
        );
        assert_ne!(k8s_sample().cid(), unix_sample().cid());
    }

    // RFC 8785 §3.2.2 and §3.2.3, checked against the chosen crate.
    #[test]
    fn jcs_crate_matches_rfc_8785_examples() {
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        let want = "{\"literals\":[null,true,false],\"numbers\":[333333333.3333333,1e+30,4.5,0.002,1e-27],\"string\":\"\u{20ac}$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}";
        assert_eq!(serde_json_canonicalizer::pipe(input).unwrap(), want);

        let input = r#"{
          "\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One", "\ud83d\ude00": "Emoji: Grinning Face", "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let want = concat!(
            "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",",
            "\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",",
            "\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
        );
        assert_eq!(serde_json_canonicalizer::pipe(input).unwrap(), want);
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(k8s_sample().validate(), Ok(()));
        assert_eq!(unix_sample().validate(), Ok(()));
        assert_eq!(CompositeIdentity::new().validate(), Ok(()));

        let mut id = k8s_sample();
        id.tools_digest = Some("sha256:ABC".into());
        assert_eq!(
            id.validate(),
            Err(CompositeError::BadDigest {
                field: "tools_digest".into(),
                value: "sha256:ABC".into()
            })
        );
        let mut id = unix_sample();
        id.unix.as_mut().unwrap().sha256 = "md5:00".into();
        assert!(
            matches!(id.validate(), Err(CompositeError::BadDigest { field, .. }) if field == "unix.sha256")
        );
        let mut id = k8s_sample();
        id.k8s.as_mut().unwrap().pod.uid.clear();
        assert_eq!(
            id.validate(),
            Err(CompositeError::EmptyField("k8s.pod.uid"))
        );
        let mut id = k8s_sample();
        id.unix = unix_sample().unix;
        assert_eq!(id.validate(), Err(CompositeError::BothPlacements));
        let id = CompositeIdentity {
            v: 2,
            ..CompositeIdentity::new()
        };
        assert_eq!(
            id.validate(),
            Err(CompositeError::UnknownVersion("2".into()))
        );
    }

    #[test]
    fn json_shape_matches_the_spec() {
        let v = serde_json::to_value(k8s_sample()).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["k8s"]["pod"]["name"], "refund-agent-7c9d");
        assert_eq!(v["k8s"]["serviceaccount"], "refund-agent");
        assert!(v.get("unix").is_none());
        let u = serde_json::to_value(unix_sample()).unwrap();
        assert_eq!(u["unix"]["uid"], 1000);
        assert!(u.get("model").is_none());
        assert!(u["agent"].get("version").is_none());
        let back: CompositeIdentity = serde_json::from_value(v).unwrap();
        assert_eq!(back, k8s_sample());
        assert!(serde_json::from_str::<CompositeIdentity>(r#"{"v":1,"extra":true}"#).is_err());
    }
}
