//! Attestation figures: how fast drift reaches an open stream. (Pod-index lookups join this
//! module with the Kubernetes attestor.)

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::procs::Server;
use super::stats::percentile;
use crate::api::workload::X509svidRequest;
use crate::composite;

/// Time from a write to a hashed config file to the end of the open stream it withdraws.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The daemon's periodic re-hash, set long so that only change notification counts.
    pub rehash_interval_s: u64,
}

const PROMPT_A: &str = "You refund orders under 100 EUR.";
const PROMPT_B: &str = "Refund anything.";

/// Runs a daemon whose policy pins this process's config digest, then `samples` times: opens
/// a stream, changes the file, and times the withdrawal.
pub async fn drift(exe: &Path, dir: &Path, samples: usize) -> anyhow::Result<Drift> {
    let prompt = dir.join("prompt.md");
    std::fs::write(&prompt, PROMPT_A)?;
    let path = prompt.to_str().context("scratch path is not UTF-8")?;
    let digest = composite::combine_file_digests(&[(
        path,
        composite::sha256_digest(PROMPT_A.as_bytes()).as_str(),
    )])?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let policy = dir.join("drift-policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: drift}}\n\
             spec:\n  spiffeID: \"spiffe://{{{{ .TrustDomain }}}}/agent/drift\"\n  \
             selector:\n    unix: {{uid: {uid}}}\n  composite:\n    configFiles: [{path}]\n    \
             configDigests: [\"{digest}\"]\n"
        ),
    )?;
    const REHASH: Duration = Duration::from_secs(3600);
    let policy_arg = policy.to_str().context("scratch path is not UTF-8")?;
    let rehash = format!("{}s", REHASH.as_secs());
    let mut daemon = Server::daemon_with(
        exe,
        dir,
        "drift",
        &["--policy", policy_arg, "--rehash-interval", &rehash],
    )?;
    daemon.ready().await?;

    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        std::fs::write(&prompt, PROMPT_A)?;
        let mut client = crate::client::connect(&daemon.socket).await?;
        let mut stream = client
            .fetch_x509svid(X509svidRequest {})
            .await
            .context("opening the stream")?
            .into_inner();
        stream.message().await.context("first message")?;
        std::fs::write(&prompt, PROMPT_B)?;
        let changed = Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
        let took = changed.elapsed();
        match end {
            Ok(Err(status)) if status.code() == tonic::Code::PermissionDenied => times.push(took),
            Ok(other) => bail!("expected a withdrawal, got {other:?}"),
            Err(_) => bail!("no withdrawal within 10 s of the change"),
        }
    }
    times.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(Drift {
        samples,
        p50_ms: ms(percentile(&times, 0.5)),
        p99_ms: ms(percentile(&times, 0.99)),
        max_ms: ms(times.last().copied().unwrap_or_default()),
        rehash_interval_s: REHASH.as_secs(),
    })
}
