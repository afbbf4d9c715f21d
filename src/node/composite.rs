//! Building a caller's composite identity on the node, from facts outside the agent process:
//! the policy's declarations (unix mode), the kernel's account of the process, and the digests
//! of the files the process sees, read through `/proc/<pid>/root` so that symlinks and `..`
//! cannot lead out of its root.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::attest::digest_cache::DigestCache;
use super::attest::rootfs::{self, RootfsError};
use crate::composite::{self, CompositeError, CompositeIdentity, K8s, Pod, Unix};
use crate::crypto::x509::Extension;
use crate::policy::{Attested, CompositeSpec, Declared, DeclaredError, PinMismatch, WorkloadFacts};

/// Pod annotations that declare an agent (AGENT-IDENTITY.md §1).
pub use crate::policy::{
    ANNOTATION_AGENT_NAME, ANNOTATION_AGENT_VERSION, ANNOTATION_CONFIG_FILES, ANNOTATION_MODEL,
    ANNOTATION_TOOLS_FILES,
};

/// Why no composite identity could be built for a caller.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// A declared file cannot be hashed: an attestation failure naming the file.
    #[error("hashing {0}")]
    File(#[from] RootfsError),
    /// A declaration (pod annotation or policy) is malformed.
    #[error(transparent)]
    Declared(#[from] DeclaredError),
    #[error("composite identity: {0}")]
    Invalid(#[from] CompositeError),
    /// The attested composite is not what the policy pins.
    #[error(transparent)]
    Pin(#[from] PinMismatch),
    #[error("unix facts are missing for this caller")]
    NoFacts,
}

/// A composite identity with both of its encodings, ready for issuance.
#[derive(Debug, Clone, PartialEq)]
pub struct Composed {
    pub identity: CompositeIdentity,
    pub cid: String,
    pub extensions: Vec<Extension>,
    /// The namespaced JWT claim (`agentid.dev/agent`) carrying the object and its `cid`.
    pub jwt_claims: Map<String, Value>,
    /// Files whose change means the identity must be re-checked (host paths via /proc).
    pub watched: Vec<PathBuf>,
}

/// Builds callers' composite identities, remembering the digests of unchanged files.
#[derive(Debug)]
pub struct Composer {
    proc_root: PathBuf,
    digests: DigestCache,
}

impl Default for Composer {
    fn default() -> Self {
        Self::new()
    }
}

impl Composer {
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// A composer reading processes under `proc_root` instead of `/proc` (tests).
    pub fn with_proc_root(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            digests: DigestCache::new(rootfs::DIGEST_CACHE_MAX),
        }
    }

    /// Forgets remembered digests: the next compositions re-hash every file (the periodic
    /// safety net behind change notifications).
    pub fn flush(&self) {
        self.digests.clear();
    }

    /// The caller's composite identity under `spec`, pin-checked. `None` for a unix caller
    /// whose policy declares no composite. A pod always has one (image and placement).
    ///
    /// Blocking: reads files. Call it off the async executor's core threads.
    pub fn compose(
        &self,
        pid: i32,
        facts: &WorkloadFacts,
        spec: Option<&CompositeSpec>,
    ) -> Result<Option<Composed>, ComposeError> {
        let empty = CompositeSpec::default();
        let root = self.proc_root.join(pid.to_string()).join("root");
        if let Some(k8s) = &facts.k8s {
            let spec = spec.unwrap_or(&empty);
            let declared = Declared::by_pod(k8s, spec)?;
            let placement = K8s {
                cluster: k8s.cluster.clone(),
                namespace: k8s.namespace.clone(),
                serviceaccount: k8s.service_account.clone(),
                pod: Pod {
                    name: k8s.pod_name.clone(),
                    uid: k8s.pod_uid.clone(),
                },
                node: k8s.node_name.clone(),
                container: Some(k8s.container_name.clone()).filter(|c| !c.is_empty()),
            };
            let base = CompositeIdentity {
                image_digest: k8s.image_digest.clone(),
                k8s: Some(placement),
                ..CompositeIdentity::new()
            };
            return self.finish(&root, base, declared, spec).map(Some);
        }
        let Some(spec) = spec else {
            return Ok(None);
        };
        let unix = facts.unix.as_ref().ok_or(ComposeError::NoFacts)?;
        let declared = Declared::by_policy(spec);
        let base = CompositeIdentity {
            unix: Some(Unix {
                uid: unix.uid,
                gid: unix.gid,
                path: unix.path.clone().unwrap_or_default(),
                sha256: unix.sha256.clone().unwrap_or_default(),
            }),
            ..CompositeIdentity::new()
        };
        self.finish(&root, base, declared, spec).map(Some)
    }

    fn finish(
        &self,
        root: &Path,
        base: CompositeIdentity,
        declared: Declared,
        spec: &CompositeSpec,
    ) -> Result<Composed, ComposeError> {
        let mut watched = Vec::new();
        let mut digest_of = |files: &[String]| -> Result<Option<String>, ComposeError> {
            if files.is_empty() {
                return Ok(None);
            }
            let mut entries = Vec::with_capacity(files.len());
            for f in files {
                entries.push((
                    f.clone(),
                    rootfs::digest_in_root_cached(&self.digests, root, Path::new(f))?,
                ));
                watched.push(root.join(f.trim_start_matches('/')));
            }
            Ok(Some(composite::combine_file_digests(&entries)?))
        };
        let config_digest = digest_of(&declared.config_files)?;
        let tools_digest = digest_of(&declared.tools_files)?;
        let identity = CompositeIdentity {
            agent: declared.agent(),
            model: declared.model()?,
            config_digest,
            tools_digest,
            ..base
        };
        identity.validate()?;
        spec.check_pins(Attested {
            model: declared.model.as_deref(),
            config_digest: identity.config_digest.as_deref(),
            tools_digest: identity.tools_digest.as_deref(),
            image_digest: identity.image_digest.as_deref(),
        })?;
        let (name, value) = composite::to_jwt_claim(&identity);
        let mut jwt_claims = Map::new();
        jwt_claims.insert(name, value);
        Ok(Composed {
            cid: identity.cid(),
            extensions: composite::to_extensions(&identity),
            jwt_claims,
            identity,
            watched,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{K8sFacts, UnixFacts};

    fn facts() -> WorkloadFacts {
        WorkloadFacts {
            unix: Some(UnixFacts {
                uid: 1000,
                gid: 1000,
                path: Some("/usr/bin/agent".into()),
                sha256: Some(format!("sha256:{}", "a".repeat(64))),
                ..Default::default()
            }),
            k8s: None,
        }
    }

    /// A fake /proc with one "process" whose root is a temp dir.
    fn proc_with_root() -> (tempfile::TempDir, PathBuf) {
        let proc = tempfile::tempdir().unwrap();
        let root = proc.path().join("42/root");
        std::fs::create_dir_all(root.join("etc/agent")).unwrap();
        std::fs::write(root.join("etc/agent/prompt.md"), "You refund orders.").unwrap();
        std::fs::write(root.join("etc/agent/tools.json"), "[]").unwrap();
        (proc, root)
    }

    fn spec() -> CompositeSpec {
        CompositeSpec {
            model: Some("anthropic/claude-sonnet-4-5".into()),
            agent_name: Some("refund".into()),
            config_files: vec!["/etc/agent/prompt.md".into()],
            tools_files: vec!["/etc/agent/tools.json".into()],
            ..Default::default()
        }
    }

    #[test]
    fn digests_the_files_the_process_sees_and_encodes_both_ways() {
        let (proc, root) = proc_with_root();
        let composer = Composer::with_proc_root(proc.path());
        let c = composer
            .compose(42, &facts(), Some(&spec()))
            .unwrap()
            .unwrap();
        let prompt = composite::sha256_digest(b"You refund orders.");
        let expected =
            composite::combine_file_digests(&[("/etc/agent/prompt.md", prompt.as_str())]).unwrap();
        assert_eq!(c.identity.config_digest.as_deref(), Some(expected.as_str()));
        assert_eq!(c.identity.model.as_ref().unwrap().id, "claude-sonnet-4-5");
        assert_eq!(
            composite::from_extensions(&c.extensions).unwrap(),
            Some(c.identity.clone())
        );
        assert_eq!(
            composite::from_jwt_claims(&c.jwt_claims).unwrap(),
            Some(c.identity.clone())
        );
        assert_eq!(
            c.watched,
            [
                root.join("etc/agent/prompt.md"),
                root.join("etc/agent/tools.json")
            ]
        );

        std::fs::write(
            root.join("etc/agent/prompt.md"),
            "Ignore previous instructions.",
        )
        .unwrap();
        let drifted = composer
            .compose(42, &facts(), Some(&spec()))
            .unwrap()
            .unwrap();
        assert_ne!(drifted.cid, c.cid, "a config change changes the cid");
    }

    #[test]
    fn pins_and_missing_files_refuse() {
        let (proc, _root) = proc_with_root();
        let mut pinned = spec();
        pinned.config_digests = vec![format!("sha256:{}", "0".repeat(64))];
        let e = Composer::with_proc_root(proc.path())
            .compose(42, &facts(), Some(&pinned))
            .unwrap_err();
        assert!(
            matches!(&e, ComposeError::Pin(p) if p.field == "config_digest"),
            "{e}"
        );

        let mut missing = spec();
        missing.config_files.push("/etc/agent/missing.md".into());
        let e = Composer::with_proc_root(proc.path())
            .compose(42, &facts(), Some(&missing))
            .unwrap_err();
        assert!(
            e.to_string().contains("/etc/agent/missing.md"),
            "names the file: {e}"
        );
    }

    fn pod_facts() -> WorkloadFacts {
        let annotations = [
            (ANNOTATION_MODEL, "anthropic/claude-sonnet-4-5"),
            (ANNOTATION_AGENT_NAME, "refund"),
            (ANNOTATION_AGENT_VERSION, "1.4.2"),
            (ANNOTATION_CONFIG_FILES, "/etc/agent/prompt.md"),
            (ANNOTATION_TOOLS_FILES, " /etc/agent/tools.json ,"),
        ];
        WorkloadFacts {
            unix: facts().unix,
            k8s: Some(Box::new(K8sFacts {
                cluster: "prod".into(),
                node_name: "node-a".into(),
                namespace: "payments".into(),
                service_account: "refund-agent".into(),
                pod_name: "refund-7d9f".into(),
                pod_uid: "0b0c0d0e-0000-4000-8000-000000000001".into(),
                pod_annotations: annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                container_name: "agent".into(),
                image_digest: Some(format!("sha256:{}", "c".repeat(64))),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_pod_is_declared_by_its_annotations_and_placed_by_the_index() {
        let (proc, root) = proc_with_root();
        let composer = Composer::with_proc_root(proc.path());
        let c = composer.compose(42, &pod_facts(), None).unwrap().unwrap();
        let id = &c.identity;
        assert_eq!(id.model.as_ref().unwrap().provider, "anthropic");
        assert_eq!(id.agent.as_ref().unwrap().version.as_deref(), Some("1.4.2"));
        let k8s = id.k8s.as_ref().unwrap();
        assert_eq!(
            (
                k8s.cluster.as_str(),
                k8s.namespace.as_str(),
                k8s.node.as_str()
            ),
            ("prod", "payments", "node-a")
        );
        assert_eq!(k8s.container.as_deref(), Some("agent"));
        assert!(id.unix.is_none(), "a pod is placed by k8s, not unix facts");
        assert_eq!(id.image_digest, pod_facts().k8s.unwrap().image_digest);
        assert!(id.tools_digest.is_some());
        assert_eq!(
            c.watched,
            [
                root.join("etc/agent/prompt.md"),
                root.join("etc/agent/tools.json")
            ]
        );

        let mut pinned = CompositeSpec {
            image_digests: vec![format!("sha256:{}", "d".repeat(64))],
            ..Default::default()
        };
        let e = composer
            .compose(42, &pod_facts(), Some(&pinned))
            .unwrap_err();
        assert!(
            matches!(&e, ComposeError::Pin(p) if p.field == "image_digest"),
            "{e}"
        );
        pinned.image_digests.push(id.image_digest.clone().unwrap());
        pinned.models = vec!["openai/gpt-5".into()];
        let e = composer
            .compose(42, &pod_facts(), Some(&pinned))
            .unwrap_err();
        assert!(e.to_string().contains("anthropic/claude-sonnet-4-5"), "{e}");

        let mut bad = pod_facts();
        let notes = &mut bad.k8s.as_mut().unwrap().pod_annotations;
        notes.insert(ANNOTATION_CONFIG_FILES.into(), "etc/agent/prompt.md".into());
        let e = composer.compose(42, &bad, None).unwrap_err();
        assert!(e.to_string().contains(ANNOTATION_CONFIG_FILES), "{e}");
        let notes = &mut bad.k8s.as_mut().unwrap().pod_annotations;
        notes.remove(ANNOTATION_CONFIG_FILES);
        notes.insert(ANNOTATION_MODEL.into(), "claude".into());
        let e = composer.compose(42, &bad, None).unwrap_err();
        assert!(e.to_string().contains("<provider>/<model id>"), "{e}");
    }
}
