//! `agentid node`: the per-node daemon of a cluster. It joins its server, then serves the
//! Workload and Delegation APIs with the server signing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::daemon::{NodeDaemon, NodeOptions};
use super::k8s::K8sConfig;
use super::remote::{NodeCredential, RemoteConfig, RemoteIssuer, SyncStatus};
use crate::admin::{self, Readiness};
use crate::audit::AuditLog;
use crate::metrics::NodeMetrics;
use crate::spiffe::{SpiffeBundle, TrustDomain};

/// How long the sync stream may be down before `/readyz` reports the node stale.
const STALE_AFTER: Duration = Duration::from_secs(30);

/// Configuration of `agentid node`, logged at start and served at `/config`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeConfig {
    pub trust_domain: TrustDomain,
    pub server: String,
    pub server_bundle: PathBuf,
    pub node_name: String,
    /// `join-token` or the service-account token file (the token itself is never shown).
    pub credential: String,
    #[serde(skip)]
    pub credential_value: Option<NodeCredential>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub admin_addr: SocketAddr,
    pub admin_allow_remote: bool,
    #[serde(with = "humantime_serde")]
    pub rehash_interval: Duration,
    pub k8s: Option<K8sConfig>,
}

/// Exposes the link to the server: whether the sync stream is up, when the server last spoke,
/// and when the node SVID expires (so an alert can fire before the node loses its identity).
fn spawn_server_metrics(registry: &mut Registry, status: Arc<SyncStatus>) {
    let up: Gauge = Gauge::default();
    let last: Gauge = Gauge::default();
    let expiry: Gauge = Gauge::default();
    registry.register(
        "agentid_node_server_up",
        "1 while the sync stream from the server is connected, else 0",
        up.clone(),
    );
    registry.register(
        "agentid_node_server_last_sync_timestamp_seconds",
        "When the server last sent policies or bundles (Unix seconds)",
        last.clone(),
    );
    registry.register(
        "agentid_node_svid_expiry_timestamp_seconds",
        "Expiry of this node's own SVID (Unix seconds)",
        expiry.clone(),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            up.set(i64::from(status.down_since.load(Ordering::Relaxed) == 0));
            last.set(status.last_sync.load(Ordering::Relaxed));
            expiry.set(status.node_svid_expiry.load(Ordering::Relaxed));
        }
    });
}

/// A joined node daemon, ready to serve.
pub struct Node {
    pub config: NodeConfig,
    pub admin_addr: SocketAddr,
    daemon: NodeDaemon,
    ready: Readiness,
}

impl Node {
    /// Reads the bootstrap bundle, joins the server (or reuses the stored node SVID), waits
    /// for the first policies, and binds the socket.
    pub async fn build(config: NodeConfig) -> anyhow::Result<Self> {
        let bundle_doc = std::fs::read(&config.server_bundle).map_err(|e| {
            anyhow::anyhow!(
                "reading --server-bundle {}: {e}",
                config.server_bundle.display()
            )
        })?;
        let server_bundle = SpiffeBundle::from_json(&bundle_doc).map_err(|e| {
            anyhow::anyhow!(
                "--server-bundle {}: {e} (export it with `agentid bundle export`)",
                config.server_bundle.display()
            )
        })?;
        let credential = config
            .credential_value
            .clone()
            .ok_or_else(|| anyhow::anyhow!("give --join-token or --k8s-token-file"))?;
        let (issuer, policies) = RemoteIssuer::connect(RemoteConfig {
            server: config.server.clone(),
            trust_domain: config.trust_domain.clone(),
            server_bundle,
            credential,
            node_name: config.node_name.clone(),
            state_dir: config.state_dir.clone(),
        })
        .await?;
        let audit = AuditLog::open(
            &config.state_dir.join("audit.log"),
            format!(
                "agentid://{}/node/{}",
                config.trust_domain, config.node_name
            ),
        )?;
        let mut registry = Registry::default();
        let metrics = NodeMetrics::register(&mut registry);
        spawn_server_metrics(&mut registry, issuer.status.clone());
        let ready = Readiness::default();
        let status = issuer.status.clone();
        ready.add_check(Arc::new(move || {
            let down = status.down_since.load(Ordering::Relaxed);
            let last = status.last_sync.load(Ordering::Relaxed);
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if down == 0 {
                Ok(format!("server connected, last update {}s ago", now - last))
            } else if now - down < STALE_AFTER.as_secs() as i64 {
                Ok(format!("server unreachable for {}s, retrying", now - down))
            } else {
                Err(format!(
                    "server unreachable for {}s: serving cached SVIDs and the bundle of {}s ago",
                    now - down,
                    now - last
                ))
            }
        }));
        let options = NodeOptions {
            trust_domain: config.trust_domain.clone(),
            socket: config.socket.clone(),
            rehash_interval: config.rehash_interval,
            k8s: config.k8s.clone(),
        };
        let daemon =
            NodeDaemon::build(&options, Arc::new(issuer), policies, audit, metrics, &ready).await?;
        let admin_addr = admin::spawn(
            config.admin_addr,
            config.admin_allow_remote,
            registry,
            ready.clone(),
            serde_json::to_value(&config)?,
        )
        .await?;
        Ok(Self {
            config,
            admin_addr,
            daemon,
            ready,
        })
    }

    /// The human banner printed at start.
    pub fn banner(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "agentid node {}: trust domain {}, server {}\n",
            c.node_name, c.trust_domain, c.server
        );
        out += &format!("  state      {}\n", c.state_dir.display());
        out += &format!(
            "  admin      http://{}/ (healthz, readyz, metrics, config)\n",
            self.admin_addr
        );
        out += &format!("\nSPIFFE_ENDPOINT_SOCKET=unix://{}\n", c.socket.display());
        out
    }

    /// Serves until `shutdown`.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.ready.set(true);
        let r = self.daemon.serve(shutdown).await;
        self.ready.set(false);
        r
    }
}
