//! `agentid up`: a whole trust domain on one machine. The authority and the node daemon run
//! in one process, callers are attested as Unix processes, and policies come from files.
//! This is the only module that links `server` and `node` together.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;

use crate::admin::{self, Readiness};
use crate::audit::AuditLog;
use crate::metrics::NodeMetrics;
use crate::node::daemon::{NodeDaemon, NodeOptions};
use crate::node::issuer::{
    IssueError, JwtRequest, SvidIssuer, TaskTokenError, TaskTokenOp, TaskTokenRequest,
    TrustBundles, X509Request,
};
use crate::node::k8s::{self as pods, K8sConfig};
use crate::policy::{PolicySet, load_paths};
use crate::policy_watch;
use crate::server::{Authority, AuthorityConfig, always_leading, spawn_rotation};
use crate::spiffe::TrustDomain;
use crate::token::{self, FanOut, Issued};

/// Configuration of `agentid up`, logged at start and served at `/config`.
#[derive(Debug, Clone, Serialize)]
pub struct UpConfig {
    pub trust_domain: TrustDomain,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub policy: Vec<PathBuf>,
    pub admin_addr: SocketAddr,
    pub admin_allow_remote: bool,
    /// Period of the re-hash of files behind live composite identities.
    #[serde(with = "humantime_serde")]
    pub rehash_interval: std::time::Duration,
    /// Kubernetes workload attestation; `None` attests local processes only.
    pub k8s: Option<K8sConfig>,
    /// Key lifetimes and rotation of the authority.
    pub authority: AuthorityConfig,
}

/// The in-process issuer: the node daemon's signing requests go straight to the authority.
struct LocalIssuer {
    authority: Arc<Authority>,
    bundles: Arc<BundleRelay>,
    /// Delegations per task and delegator, for `maxFanOut`.
    fan_out: FanOut,
}

/// The authority's bundle as the node daemon's trust bundles. Updated by a task on every
/// change and, before a signed credential is handed back, by the signing call itself: a
/// credential from a just-activated key never reaches a stream before the bundle with it.
struct BundleRelay {
    authority: Arc<Authority>,
    tx: watch::Sender<Arc<TrustBundles>>,
}

impl BundleRelay {
    fn new(authority: Arc<Authority>) -> Arc<Self> {
        let own = authority.bundle();
        let relay = Arc::new(Self {
            tx: watch::Sender::new(Arc::new(TrustBundles {
                trust_domain: authority.trust_domain().clone(),
                own,
                federated: Default::default(),
            })),
            authority,
        });
        let mut changes = relay.authority.subscribe();
        let weak = Arc::downgrade(&relay);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(relay) = weak.upgrade() else { return };
                relay.sync();
            }
        });
        relay
    }

    /// Publishes the authority's bundle if it is newer than the one out (by sequence, so the
    /// task and a signing call racing cannot put an older one back).
    fn sync(&self) {
        let own = self.authority.bundle();
        self.tx.send_if_modified(|b| {
            if own.sequence <= b.own.sequence {
                return false;
            }
            *b = Arc::new(TrustBundles {
                own,
                ..(**b).clone()
            });
            true
        });
    }
}

impl LocalIssuer {
    fn new(authority: Arc<Authority>) -> Self {
        Self {
            bundles: BundleRelay::new(authority.clone()),
            authority,
            fan_out: FanOut::new(),
        }
    }
}

#[async_trait::async_trait]
impl SvidIssuer for LocalIssuer {
    async fn sign_x509(&self, req: X509Request) -> Result<Vec<Vec<u8>>, IssueError> {
        let chain = self
            .authority
            .sign_x509_svid(&req.spiffe_id, &req.spki_der, req.ttl, &req.extensions)
            .map_err(|e| IssueError(e.to_string()));
        self.bundles.sync();
        chain
    }

    async fn sign_jwt(&self, req: JwtRequest) -> Result<String, IssueError> {
        let token = self
            .authority
            .sign_jwt_svid(&req.spiffe_id, &req.audience, req.ttl, req.claims)
            .map_err(|e| IssueError(e.to_string()));
        self.bundles.sync();
        token
    }

    fn bundles(&self) -> watch::Receiver<Arc<TrustBundles>> {
        self.bundles.tx.subscribe()
    }

    fn reissue(&self) -> watch::Receiver<u64> {
        self.authority.subscribe_reissue()
    }

    async fn task_token(&self, req: TaskTokenRequest) -> Result<Issued, TaskTokenError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let a = &self.authority;
        let td = a.trust_domain();
        let (caller, rules) = (&req.caller, &*req.rules);
        let issued = match req.op {
            TaskTokenOp::Mint(m) => {
                a.with_jwt_signer(|s| token::mint(m, caller, rules, s, td, now))
            }
            TaskTokenOp::Delegate { parent, req: d } => {
                let bundle = a.bundle();
                a.with_jwt_signer(|s| {
                    token::delegate(
                        &parent,
                        d,
                        caller,
                        rules,
                        s,
                        td,
                        &bundle,
                        &self.fan_out,
                        now,
                    )
                })
            }
        };
        self.bundles.sync();
        Ok(issued?)
    }
}

/// Everything `up` built, before it starts serving (tests drive this directly).
pub struct Up {
    pub config: UpConfig,
    pub policies: Arc<PolicySet>,
    pub admin_addr: SocketAddr,
    node: NodeDaemon,
    ready: Readiness,
    /// The authority's key rotation, stopped at shutdown.
    rotation: tokio::task::JoinHandle<()>,
    /// Held so open streams never see the policy channel close.
    _policy_tx: watch::Sender<Arc<PolicySet>>,
}

/// Loads state, keys and policies and binds the socket and admin listener.
pub async fn build(config: UpConfig) -> anyhow::Result<Up> {
    let td = config.trust_domain.clone();
    let policies = if config.policy.is_empty() {
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let name = crate::node::attest::user_name(uid).unwrap_or_default();
        PolicySet::default_for_user(uid, &name)
    } else {
        load_paths(&config.policy, &td)?
    };
    // The state directory holds the CA and JWT keys and the audit log: private (0700), like
    // the directories inside it. Created here, before anything inside it, or `create_dir_all`
    // below would create it with the umask's mode (usually 0755).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .map_err(|e| {
            anyhow::anyhow!(
                "creating state directory {}: {e}",
                config.state_dir.display()
            )
        })?;
    config.authority.validate()?;
    let authority = Arc::new(Authority::open(
        &config.state_dir.join("authority"),
        td.clone(),
        config.authority.clone(),
    )?);
    let audit = AuditLog::open(
        &config.state_dir.join("audit.log"),
        format!("agentid://{td}/up"),
    )?;
    let rotation = spawn_rotation(authority.clone(), audit.clone(), always_leading());
    let mut registry = Registry::default();
    let metrics = NodeMetrics::register(&mut registry);
    let issuer: Arc<dyn SvidIssuer> = Arc::new(LocalIssuer::new(authority));
    let (policy_tx, policy_rx) = watch::channel(Arc::new(policies.clone()));
    if !config.policy.is_empty() {
        policy_watch::spawn(
            config.policy.clone(),
            td.clone(),
            policy_tx.clone(),
            audit.clone(),
            metrics.policy_reload_failures.clone(),
        )?;
    }
    let ready = Readiness::default();
    let options = NodeOptions {
        trust_domain: td,
        socket: config.socket.clone(),
        rehash_interval: config.rehash_interval,
        k8s: config.k8s.clone(),
    };
    let node = NodeDaemon::build(&options, issuer, policy_rx, audit, metrics, &ready).await?;
    let admin_addr = admin::spawn(
        config.admin_addr,
        config.admin_allow_remote,
        registry,
        ready.clone(),
        serde_json::to_value(&config)?,
    )
    .await?;
    Ok(Up {
        policies: Arc::new(policies),
        admin_addr,
        node,
        ready,
        rotation,
        config,
        _policy_tx: policy_tx,
    })
}

impl Up {
    /// Serves until `shutdown` resolves; the socket file is removed on the way out.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.ready.set(true);
        let result = self.node.serve(shutdown).await;
        self.ready.set(false);
        self.rotation.abort();
        result
    }

    /// The human banner printed at start.
    pub fn banner(&self) -> String {
        let td = &self.config.trust_domain;
        let mut out = format!("agentid up: trust domain {td}\n");
        out += &format!("  state      {}\n", self.config.state_dir.display());
        out += &format!(
            "  admin      http://{}/ (healthz, readyz, metrics, config)\n",
            self.admin_addr
        );
        out += &match &self.config.k8s {
            None => "  attestor   unix (local processes)\n".to_owned(),
            Some(k) => format!(
                "  attestor   k8s: cluster {}, node {}, pods from the {}\n",
                k.cluster_name,
                k.node_name,
                match k.pod_source {
                    pods::PodSource::Api => "API server (watch)",
                    pods::PodSource::Kubelet => "kubelet (poll)",
                }
            ),
        };
        out += "  policies\n";
        for p in self.policies.policies() {
            out += &format!(
                "    {:<20} {} ({})\n",
                p.name,
                p.spiffe_id
                    .source()
                    .replace("{{ .TrustDomain }}", td.as_str()),
                p.origin
            );
        }
        out += &format!(
            "\nSPIFFE_ENDPOINT_SOCKET=unix://{}\n",
            self.config.socket.display()
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::KeyKind;

    // On a single-threaded runtime the relay task cannot run between the rotation and the
    // signing call: only the signing call's own sync can put the new CA in the bundle.
    #[tokio::test(flavor = "current_thread")]
    async fn a_credential_from_a_new_key_is_returned_after_the_bundle_that_carries_it() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let authority =
            Arc::new(Authority::open(dir.path(), td.clone(), AuthorityConfig::default()).unwrap());
        let issuer = LocalIssuer::new(authority.clone());
        let bundles = issuer.bundles();
        authority.rotate_now(KeyKind::X509Ca).unwrap();
        authority.rotate_now(KeyKind::Jwt).unwrap();
        let key = crate::crypto::PrivateKey::generate().unwrap();
        let req = X509Request {
            spiffe_id: td.id("/w").unwrap(),
            spki_der: key.spki_der(),
            ttl: std::time::Duration::from_secs(60),
            extensions: vec![],
            workload: Default::default(),
        };
        issuer.sign_x509(req).await.unwrap();
        assert_eq!(bundles.borrow().own.x509_authorities.len(), 2);
        assert_eq!(*bundles.borrow().own, *authority.bundle());
        let token = issuer
            .sign_jwt(JwtRequest {
                spiffe_id: td.id("/w").unwrap(),
                audience: vec!["a".into()],
                ttl: std::time::Duration::from_secs(60),
                claims: Default::default(),
                workload: Default::default(),
            })
            .await
            .unwrap();
        let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
        assert!(bundles.borrow().own.jwt_key(&kid).is_some());
    }
}
