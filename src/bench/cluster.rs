//! Cluster figures: a real `agentid server` signing for 1, 10 and 100 node connections at
//! once (each an attested node with its own node SVID and mTLS connection, driven from this
//! process), against raw ECDSA P-256 signing on one core of this machine in the same run;
//! the time from a policy change on the server to the new SVID on a stream of a real
//! `agentid node`; and both processes' memory.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use futures::future::join_all;
use serde::Serialize;

use super::procs::Server;
use super::signing::count_for;
use super::stats::percentile;
use crate::api::node as pb;
use crate::api::node::node_client::NodeClient;
use crate::api::node::server_admin_client::ServerAdminClient;
use crate::api::workload::X509svidRequest;
use crate::crypto::PrivateKey;
use crate::crypto::tls::{self, Accept, Identity, Trust};
use crate::node::remote::server_channel;
use crate::spiffe::SpiffeBundle;

const MIB: f64 = 1024.0 * 1024.0;

/// Server signing with a given number of node connections.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterLevel {
    pub nodes: usize,
    pub signs_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Server CPU per signed SVID (all its threads), microseconds.
    pub server_cpu_us: f64,
    /// signs_per_sec / raw ECDSA signs per second on one core.
    pub ratio_to_raw: f64,
    /// Raw ECDSA signing CPU / server CPU per SVID: the share of the server's work that is
    /// the signature itself.
    pub cpu_efficiency: f64,
}

/// The cluster measurements of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub levels: Vec<ClusterLevel>,
    /// `EcdsaKeyPair::sign` per second on one thread of this process.
    pub raw_signs_per_sec: f64,
    pub push_samples: usize,
    /// Policy file replaced on the server → the new SVID on a node's open stream.
    pub push_p50_ms: f64,
    pub push_p99_ms: f64,
    pub server_rss_mib: f64,
    pub node_rss_mib: f64,
}

/// Runs the server, the simulated node connections and one real node.
pub async fn measure(
    exe: &Path,
    dir: &Path,
    levels: &[usize],
    window: Duration,
    push_samples: usize,
) -> anyhow::Result<Cluster> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let policy = dir.join("cluster-policy.yaml");
    let write_policy = |path: &str| {
        let tmp = dir.join("cluster-policy.tmp");
        std::fs::write(
            &tmp,
            format!(
                "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: bench}}\n\
                 spec:\n  spiffeID: \"spiffe://{{{{ .TrustDomain }}}}{path}\"\n  selector: {{unix: {{uid: {uid}}}}}\n"
            ),
        )?;
        std::fs::rename(&tmp, &policy)
    };
    write_policy("/bench/a")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let admin_socket = dir.join("cluster-admin.sock");
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("server")
        .arg(format!(
            "--store=file:{}",
            dir.join("cluster-store").display()
        ))
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--admin-socket")
        .arg(&admin_socket)
        .args(["--admin-addr", "127.0.0.1:0", "--policy"])
        .arg(&policy);
    let mut server = Server::spawn("cluster-server", cmd, admin_socket.clone(), dir)?;
    server.ready().await?;
    let mut admin = admin_client(&admin_socket).await?;
    let bundle_doc = admin
        .get_bundle(pb::GetBundleRequest {})
        .await?
        .into_inner()
        .bundle;
    let bundle_file = dir.join("cluster-bundle.json");
    std::fs::write(&bundle_file, &bundle_doc)?;
    let bundle = SpiffeBundle::from_json(&bundle_doc)?;

    let most = levels.iter().copied().max().unwrap_or(1);
    let mut nodes = Vec::with_capacity(most);
    for i in 0..most {
        nodes.push(attest(&mut admin, &url, &bundle, &format!("bench-{i}")).await?);
    }
    let workload_key = PrivateKey::generate()?.spki_der();
    let request = pb::SignX509SvidRequest {
        spiffe_id: "spiffe://agentid.local/bench/a".into(),
        public_key: workload_key,
        workload: Some(pb::Workload {
            uid,
            gid: uid,
            ..Default::default()
        }),
    };
    // Warm-up: policy evaluation and connections.
    for n in nodes.iter_mut() {
        n.sign_x509_svid(request.clone()).await?;
    }
    let raw = raw_signs_per_sec(window)?;
    let mut out = Vec::new();
    for &n in levels {
        let cpu_before = server.cpu_time()?;
        let start = Instant::now();
        let runs = nodes[..n].iter().map(|c| {
            let (mut c, req) = (c.clone(), request.clone());
            async move {
                let mut lat = Vec::new();
                while start.elapsed() < window {
                    let t = Instant::now();
                    c.sign_x509_svid(req.clone()).await?;
                    lat.push(t.elapsed());
                }
                Ok::<_, tonic::Status>(lat)
            }
        });
        let mut lat: Vec<Duration> = Vec::new();
        for r in join_all(runs).await {
            lat.extend(r?);
        }
        let elapsed = start.elapsed();
        let cpu = server.cpu_time()? - cpu_before;
        lat.sort_unstable();
        let per_sec = lat.len() as f64 / elapsed.as_secs_f64();
        let cpu_us = cpu.as_secs_f64() * 1e6 / lat.len().max(1) as f64;
        out.push(ClusterLevel {
            nodes: n,
            signs_per_sec: per_sec,
            p50_ms: percentile(&lat, 0.5).as_secs_f64() * 1e3,
            p99_ms: percentile(&lat, 0.99).as_secs_f64() * 1e3,
            server_cpu_us: cpu_us,
            ratio_to_raw: per_sec / raw,
            cpu_efficiency: (1e6 / raw) / cpu_us,
        });
    }
    drop(nodes);

    // One real node daemon and a stream on its socket.
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: 600,
            node_name: String::new(),
        })
        .await?
        .into_inner()
        .token;
    let node_socket = dir.join("cluster-node.sock");
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("node")
        .args(["--server", &url, "--server-bundle"])
        .arg(&bundle_file)
        .args([
            "--join-token",
            &token,
            "--node-name",
            "bench-node",
            "--socket",
        ])
        .arg(&node_socket)
        .arg("--state-dir")
        .arg(dir.join("cluster-node-state"))
        .args(["--admin-addr", "127.0.0.1:0"]);
    let mut node = Server::spawn("cluster-node", cmd, node_socket.clone(), dir)?;
    node.ready().await?;
    let mut client = crate::client::connect(&node_socket).await?;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .context("opening the stream")?
        .into_inner();
    stream.message().await?.context("first message")?;
    let mut pushes = Vec::with_capacity(push_samples);
    for i in 0..push_samples {
        let path = if i % 2 == 0 { "/bench/b" } else { "/bench/a" };
        let want = format!("spiffe://agentid.local{path}");
        write_policy(path)?;
        let changed = Instant::now();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .context("no update within 10 s of the policy change")??
                .context("the stream ended")?;
            if msg.svids.iter().any(|s| s.spiffe_id == want) {
                break;
            }
        }
        pushes.push(changed.elapsed());
    }
    pushes.sort_unstable();
    let server_rss = server.rss_bytes()? as f64 / MIB;
    let node_rss = node.rss_bytes()? as f64 / MIB;
    if pushes.is_empty() {
        bail!("no policy change was measured");
    }
    Ok(Cluster {
        levels: out,
        raw_signs_per_sec: raw,
        push_samples,
        push_p50_ms: percentile(&pushes, 0.5).as_secs_f64() * 1e3,
        push_p99_ms: percentile(&pushes, 0.99).as_secs_f64() * 1e3,
        server_rss_mib: server_rss,
        node_rss_mib: node_rss,
    })
}

async fn admin_client(path: &Path) -> anyhow::Result<ServerAdminClient<tonic::transport::Channel>> {
    Ok(ServerAdminClient::new(
        crate::client::unix_channel(path).await?,
    ))
}

/// Joins one simulated node: a join token, `Attest`, then a client on its own mTLS connection.
async fn attest(
    admin: &mut ServerAdminClient<tonic::transport::Channel>,
    url: &str,
    bundle: &SpiffeBundle,
    name: &str,
) -> anyhow::Result<NodeClient<tonic::transport::Channel>> {
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: 600,
            node_name: String::new(),
        })
        .await?
        .into_inner()
        .token;
    let trust = Trust::new(bundle)?;
    let accept = Accept::new(|id| id.path() == "/agentid/server");
    let plain = tls::client_config(None, trust.clone(), accept.clone())?;
    let key = PrivateKey::generate()?;
    let svid = NodeClient::new(server_channel(url, plain)?)
        .attest(pb::AttestRequest {
            credential: Some(pb::attest_request::Credential::JoinToken(token)),
            public_key: key.spki_der(),
            node_name: name.to_owned(),
        })
        .await?
        .into_inner();
    let identity = Identity::new(&svid.cert_chain, &key.pkcs8_der())?;
    let mtls = tls::client_config(Some(identity), trust, accept)?;
    Ok(NodeClient::new(server_channel(url, mtls)?))
}

/// ECDSA P-256 signatures per second on one thread, over a message the size of a leaf's
/// to-be-signed part.
fn raw_signs_per_sec(window: Duration) -> anyhow::Result<f64> {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)?;
    let message = [0x5a_u8; 300];
    let count = count_for(window, || {
        std::hint::black_box(key.sign(&rng, &message)?);
        Ok(())
    })?;
    Ok(count.rate())
}
