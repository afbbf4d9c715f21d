//! Building a caller's composite identity on the node, from facts outside the agent process:
//! the policy's declarations (unix mode), the kernel's account of the process, and the digests
//! of the files the process sees, read through `/proc/<pid>/root` so that symlinks and `..`
//! cannot lead out of its root.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::attest::rootfs::{self, RootfsError};
use crate::composite::{self, Agent, CompositeError, CompositeIdentity, Model, Unix};
use crate::crypto::x509::Extension;
use crate::policy::{Attested, CompositeSpec, PinMismatch, WorkloadFacts};

/// Why no composite identity could be built for a caller.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// A declared file cannot be hashed: an attestation failure naming the file.
    #[error("hashing {0}")]
    File(#[from] RootfsError),
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

/// Builds and pin-checks the composite identity of a local (unix-mode) process.
///
/// Blocking: reads files. Call it off the async executor's core threads.
pub fn compose_unix(
    pid: i32,
    facts: &WorkloadFacts,
    spec: &CompositeSpec,
) -> Result<Composed, ComposeError> {
    compose_unix_in(Path::new("/proc"), pid, facts, spec)
}

fn compose_unix_in(
    proc_root: &Path,
    pid: i32,
    facts: &WorkloadFacts,
    spec: &CompositeSpec,
) -> Result<Composed, ComposeError> {
    let unix = facts.unix.as_ref().ok_or(ComposeError::NoFacts)?;
    let root = proc_root.join(pid.to_string()).join("root");
    let mut watched = Vec::new();
    let mut digest_of = |files: &[String]| -> Result<Option<String>, ComposeError> {
        if files.is_empty() {
            return Ok(None);
        }
        let mut entries = Vec::with_capacity(files.len());
        for f in files {
            entries.push((f.clone(), rootfs::digest_in_root(&root, Path::new(f))?));
            watched.push(root.join(f.trim_start_matches('/')));
        }
        Ok(Some(composite::combine_file_digests(&entries)?))
    };
    let config_digest = digest_of(&spec.config_files)?;
    let tools_digest = digest_of(&spec.tools_files)?;
    let model = spec
        .model
        .as_deref()
        .and_then(|m| m.split_once('/'))
        .map(|(provider, id)| Model {
            provider: provider.to_owned(),
            id: id.to_owned(),
        });
    let identity = CompositeIdentity {
        agent: spec.agent_name.clone().map(|name| Agent {
            name,
            version: spec.agent_version.clone(),
        }),
        model,
        config_digest,
        tools_digest,
        unix: Some(Unix {
            uid: unix.uid,
            gid: unix.gid,
            path: unix.path.clone().unwrap_or_default(),
            sha256: unix.sha256.clone().unwrap_or_default(),
        }),
        ..CompositeIdentity::new()
    };
    identity.validate()?;
    spec.check_pins(Attested {
        model: spec.model.as_deref(),
        config_digest: identity.config_digest.as_deref(),
        tools_digest: identity.tools_digest.as_deref(),
        image_digest: identity.image_digest.as_deref(),
    })?;
    Ok(finish(identity, watched))
}

fn finish(identity: CompositeIdentity, watched: Vec<PathBuf>) -> Composed {
    let (name, value) = composite::to_jwt_claim(&identity);
    let mut jwt_claims = Map::new();
    jwt_claims.insert(name, value);
    Composed {
        cid: identity.cid(),
        extensions: composite::to_extensions(&identity),
        jwt_claims,
        identity,
        watched,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::UnixFacts;

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
        let c = compose_unix_in(proc.path(), 42, &facts(), &spec()).unwrap();
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
        let drifted = compose_unix_in(proc.path(), 42, &facts(), &spec()).unwrap();
        assert_ne!(drifted.cid, c.cid, "a config change changes the cid");
    }

    #[test]
    fn pins_and_missing_files_refuse() {
        let (proc, _root) = proc_with_root();
        let mut pinned = spec();
        pinned.config_digests = vec![format!("sha256:{}", "0".repeat(64))];
        let e = compose_unix_in(proc.path(), 42, &facts(), &pinned).unwrap_err();
        assert!(
            matches!(&e, ComposeError::Pin(p) if p.field == "config_digest"),
            "{e}"
        );

        let mut missing = spec();
        missing.config_files.push("/etc/agent/missing.md".into());
        let e = compose_unix_in(proc.path(), 42, &facts(), &missing).unwrap_err();
        assert!(
            e.to_string().contains("/etc/agent/missing.md"),
            "names the file: {e}"
        );
    }
}
