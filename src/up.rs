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
use crate::server::{Authority, AuthorityConfig};
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
}

/// The in-process issuer: the node daemon's signing requests go straight to the authority.
struct LocalIssuer {
    authority: Arc<Authority>,
    bundles: watch::Receiver<Arc<TrustBundles>>,
    /// Delegations per task and delegator, for `maxFanOut`.
    fan_out: FanOut,
}

impl LocalIssuer {
    fn new(authority: Arc<Authority>) -> Self {
        let td = authority.trust_domain().clone();
        let to_bundles = move |own| {
            Arc::new(TrustBundles {
                trust_domain: td.clone(),
                own,
                federated: Default::default(),
            })
        };
        let (tx, rx) = watch::channel(to_bundles(authority.bundle()));
        let mut changes = authority.subscribe();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let own = changes.borrow_and_update().clone();
                if tx.send(to_bundles(own)).is_err() {
                    return;
                }
            }
        });
        Self {
            authority,
            bundles: rx,
            fan_out: FanOut::new(),
        }
    }
}

#[async_trait::async_trait]
impl SvidIssuer for LocalIssuer {
    async fn sign_x509(&self, req: X509Request) -> Result<Vec<Vec<u8>>, IssueError> {
        self.authority
            .sign_x509_svid(&req.spiffe_id, &req.spki_der, req.ttl, &req.extensions)
            .map_err(|e| IssueError(e.to_string()))
    }

    async fn sign_jwt(&self, req: JwtRequest) -> Result<String, IssueError> {
        self.authority
            .sign_jwt_svid(&req.spiffe_id, &req.audience, req.ttl, req.claims)
            .map_err(|e| IssueError(e.to_string()))
    }

    fn bundles(&self) -> watch::Receiver<Arc<TrustBundles>> {
        self.bundles.clone()
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
    let authority = Arc::new(Authority::open(
        &config.state_dir.join("authority"),
        td.clone(),
        AuthorityConfig::default(),
    )?);
    let audit = AuditLog::open(
        &config.state_dir.join("audit.log"),
        format!("agentid://{td}/up"),
    )?;
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
