//! Attestation figures: Kubernetes attestation against the size of the pod index (a real
//! process in a kubelet-style cgroup, attested with N pods indexed, next to unix attestation
//! of the same process as the baseline), memory per indexed pod, and how fast drift reaches
//! an open stream.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::pods;
use super::procs::Server;
use super::stats::percentile;
use crate::api::workload::X509svidRequest;
use crate::composite;
use crate::node::attest::cgroup::{self, Driver, Qos, Runtime};
use crate::node::attest::cgroup_fs::place_in_cgroup;
use crate::node::attest::k8s::K8sAttestor;
use crate::node::attest::{UnixAttestor, WorkloadAttestor};
use crate::node::peer::PeerInfo;
use crate::policy::FactNeeds;

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

/// Kubernetes attestation with a given number of pods indexed.
#[derive(Debug, Clone, Serialize)]
pub struct PodsLevel {
    pub pods: usize,
    /// `K8sAttestor::attest` of a real process in a pod container: cgroup read, index lookup
    /// and the unix facts.
    pub attest_p50_us: f64,
    pub attest_p99_us: f64,
    /// `UnixAttestor::attest` of the same process in the same run: the baseline.
    pub unix_p50_us: f64,
    /// attest p50 / unix p50.
    pub ratio_p50: f64,
    /// `PodIndex::lookup` alone.
    pub lookup_p50_ns: u128,
    pub lookup_p99_ns: u128,
    /// Estimated from what the index keeps per pod (3 containers, labels, annotations).
    pub approx_bytes_per_pod: usize,
    /// Heap bytes the filled index holds (glibc `mallinfo2`, allocated before and after), per pod.
    pub heap_bytes_per_pod: f64,
}

/// The Kubernetes attestation figures, or why they could not be taken (they need root and a
/// writable cgroup hierarchy).
#[derive(Debug, Clone, Serialize)]
pub struct Pods {
    pub levels: Vec<PodsLevel>,
    pub unavailable: Option<String>,
}

/// Measures attestation of a real `sleep` process placed in the cgroup of synthetic pod 0,
/// with each of `levels` pods indexed.
pub async fn pods(levels: &[usize], samples: usize) -> Pods {
    match pods_inner(levels, samples).await {
        Ok(levels) => Pods {
            levels,
            unavailable: None,
        },
        Err(e) => Pods {
            levels: Vec::new(),
            unavailable: Some(format!("{e:#}")),
        },
    }
}

async fn pods_inner(levels: &[usize], samples: usize) -> anyhow::Result<Vec<PodsLevel>> {
    let mut child = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .context("starting a process to attest")?;
    let result = async {
        let (uid, cid) = (pods::pod_uid(0), pods::container_id(0, 0));
        let rel = cgroup::kubelet_cgroup_path(
            Qos::Burstable,
            &uid,
            &cid,
            Driver::Cgroupfs,
            Runtime::Containerd,
        );
        let _cgroup = place_in_cgroup(child.id(), &rel)
            .with_context(|| format!("placing a process in {rel} (needs root and cgroups)"))?;
        let peer = PeerInfo::of_pid(child.id() as i32)?;
        let unix = UnixAttestor::new();
        let mut out = Vec::new();
        for &n in levels {
            let before = heap_in_use();
            let index = pods::filled_index(n.max(1));
            let grown = heap_in_use().saturating_sub(before);
            let approx = index.approx_bytes_per_pod();
            let lookup = pods::lookup_latency(n.max(1), samples);
            let attestor = K8sAttestor::new(Arc::new(index), Duration::from_secs(1));
            // Warm both (the executable's digest is cached after the first call).
            attestor.attest(&peer, FactNeeds::ALL).await?;
            unix.attest(&peer, FactNeeds::ALL).await?;
            let (mut k, mut u) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
            for _ in 0..samples {
                let t = Instant::now();
                let facts = attestor.attest(&peer, FactNeeds::ALL).await?;
                k.push(t.elapsed());
                if facts.k8s.is_none() {
                    bail!("the process was not attested as a pod container");
                }
                let t = Instant::now();
                unix.attest(&peer, FactNeeds::ALL).await?;
                u.push(t.elapsed());
            }
            k.sort_unstable();
            u.sort_unstable();
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            let (kp50, up50) = (us(percentile(&k, 0.5)), us(percentile(&u, 0.5)));
            out.push(PodsLevel {
                pods: n,
                attest_p50_us: kp50,
                attest_p99_us: us(percentile(&k, 0.99)),
                unix_p50_us: up50,
                ratio_p50: kp50 / up50.max(1e-9),
                lookup_p50_ns: lookup.p50_ns,
                lookup_p99_ns: lookup.p99_ns,
                approx_bytes_per_pod: approx,
                heap_bytes_per_pod: grown as f64 / n.max(1) as f64,
            });
        }
        Ok(out)
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Bytes allocated on the heap right now (all threads). Unlike RSS, it does not hide growth
/// behind memory freed earlier in the run.
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}
