//! The client side of the benchmark: Workload API clients in this process, each on its own
//! connection, doing what a workload does with each answer.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::oneshot;
use x509_parser::der_parser::parse_der;

use super::floor::AUDIENCE;
use super::stats::Summary;
use crate::api::workload as pb;
use crate::client::{self, Client};
use crate::crypto::x509::{CertInfo, split_der_chain};

/// Connections opened at once: enough to be quick, few enough not to overflow a backlog.
const CONNECT_PARALLELISM: usize = 64;

/// One Workload API call, as the benchmark makes it.
#[derive(Debug, Clone, Copy)]
pub enum Call {
    /// Open FetchX509SVID, read and decode the first message, cancel the stream.
    X509,
    /// FetchJWTSVID for one audience, decode the token.
    Jwt,
}

impl Call {
    async fn once(self, c: &mut Client) -> anyhow::Result<()> {
        match self {
            Call::X509 => fetch_x509(c).await,
            Call::Jwt => fetch_jwt(c).await,
        }
    }
}

/// Opens `n` clients to the socket at `path`, one connection each.
async fn connect(path: &Path, n: usize) -> anyhow::Result<Vec<Client>> {
    futures::stream::iter(0..n)
        .map(|_| client::connect(path))
        .buffer_unordered(CONNECT_PARALLELISM)
        .try_collect()
        .await
        .with_context(|| format!("connecting {n} clients to {}", path.display()))
}

/// What one measuring window produced, or several pooled (see [`Window::pool`]).
#[derive(Default)]
pub struct Window {
    /// Latency of every call that completed inside the window.
    pub latencies: Vec<Duration>,
    /// How many of those calls each client made.
    pub per_client: Vec<usize>,
    /// Server CPU time spent inside the window.
    pub server_cpu: Duration,
    /// The p50 and p99 of each window pooled into this one, in order.
    pub rounds: Vec<[Duration; 2]>,
}

impl Window {
    /// Adds the figures of `other`, a later window against the same server.
    pub fn pool(&mut self, mut other: Window) {
        other.latencies.sort_unstable();
        self.rounds
            .push([0.50, 0.99].map(|q| super::stats::percentile(&other.latencies, q)));
        self.latencies.extend(other.latencies);
        self.per_client.extend(other.per_client);
        self.server_cpu += other.server_cpu;
    }

    /// The figures of the pooled windows, `total` long together.
    pub fn summary(self, total: Duration) -> Summary {
        let ms = |i: usize| {
            self.rounds
                .iter()
                .map(|r| r[i].as_secs_f64() * 1e3)
                .collect()
        };
        Summary {
            round_p50_ms: ms(0),
            round_p99_ms: ms(1),
            ..Summary::of(self.latencies, total, self.server_cpu).with_clients(&self.per_client)
        }
    }
}

/// Opens `n` clients to the socket at `path` and runs `call` back to back on every one of
/// them for `window`, all at once. `server_cpu` reads the server's CPU time; it is read when
/// the window opens and when it closes. Any failed call fails the run.
///
/// The clients run on one single-threaded runtime per CPU, not on this process's
/// work-stealing runtime. That scheduler runs tasks woken together partly from a bounded
/// local queue and partly from a global queue it visits only every few dozen polls, so with
/// a thousand clients some were served many times before others once: the median then
/// measured the client's scheduler and moved threefold between runs against the same
/// server, while the mean held. A single-threaded runtime runs its tasks in the order they
/// were woken, as the kernel runs a thousand separate agent processes.
pub async fn run(
    path: &Path,
    n: usize,
    call: Call,
    window: Duration,
    server_cpu: impl Fn() -> anyhow::Result<Duration>,
) -> anyhow::Result<Window> {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = cpus.clamp(1, n.max(1));
    let mut spawned = Vec::with_capacity(threads);
    for i in 0..threads {
        // Shares differ by at most one client.
        let share = n / threads + usize::from(i < n % threads);
        spawned.push(ClientThread::spawn(i, path, share, call)?);
    }
    let mut ready = true;
    for t in &mut spawned {
        ready &= (&mut t.ready).await.is_ok();
    }
    if !ready {
        // A thread failed to connect or warm up. Dropping every start ends the others.
        let handles: Vec<_> = spawned.into_iter().map(|t| t.handle).collect();
        let mut first_error = None;
        for h in handles {
            if let Err(e) = join(h).await {
                first_error.get_or_insert(e);
            }
        }
        return Err(first_error.unwrap_or_else(|| anyhow::anyhow!("a client thread ended early")));
    }
    let cpu_start = server_cpu()?;
    let deadline = Instant::now() + window;
    let mut handles = Vec::with_capacity(threads);
    for t in spawned {
        // A thread that has already ended reports why when joined.
        let _ = t.start.send(deadline);
        handles.push(t.handle);
    }
    tokio::time::sleep_until(deadline.into()).await;
    let server_cpu = server_cpu()?.saturating_sub(cpu_start);
    let (mut latencies, mut per_client) = (Vec::new(), Vec::with_capacity(n));
    for h in handles {
        for client in join(h).await? {
            per_client.push(client.len());
            latencies.extend(client);
        }
    }
    Ok(Window {
        latencies,
        per_client,
        server_cpu,
        rounds: Vec::new(),
    })
}

/// The latencies of each client's calls, as a client thread ends.
type PerClient = anyhow::Result<Vec<Vec<Duration>>>;

/// One OS thread of benchmark clients with its own single-threaded runtime.
struct ClientThread {
    /// Fires once its clients are connected and have made one call each.
    ready: oneshot::Receiver<()>,
    /// The end of the window; sending it starts the clients.
    start: oneshot::Sender<Instant>,
    handle: std::thread::JoinHandle<PerClient>,
}

impl ClientThread {
    fn spawn(index: usize, path: &Path, clients: usize, call: Call) -> anyhow::Result<Self> {
        let (ready_tx, ready) = oneshot::channel();
        let (start, start_rx) = oneshot::channel::<Instant>();
        let path = path.to_owned();
        let handle = std::thread::Builder::new()
            .name(format!("bench-client-{index}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting a client runtime")?;
                runtime.block_on(async move {
                    let mut conns = connect(&path, clients).await?;
                    // One call each first, so connection setup and first-call work stay out
                    // of the window.
                    futures::future::try_join_all(conns.iter_mut().map(|c| call.once(c))).await?;
                    let _ = ready_tx.send(());
                    let Ok(deadline) = start_rx.await else {
                        return Ok(Vec::new());
                    };
                    let tasks: Vec<_> = conns
                        .into_iter()
                        .map(|c| tokio::spawn(calls_until(c, call, deadline)))
                        .collect();
                    let mut latencies = Vec::with_capacity(tasks.len());
                    for t in tasks {
                        latencies.push(t.await??);
                    }
                    Ok(latencies)
                })
            })
            .context("starting a client thread")?;
        Ok(Self {
            ready,
            start,
            handle,
        })
    }
}

/// Makes `call` on `c` back to back until `deadline`; the latency of every call that ended
/// before it.
async fn calls_until(
    mut c: Client,
    call: Call,
    deadline: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    loop {
        let start = Instant::now();
        if start >= deadline {
            break;
        }
        call.once(&mut c).await?;
        let end = Instant::now();
        if end > deadline {
            break;
        }
        latencies.push(end - start);
    }
    Ok(latencies)
}

/// Waits for a client thread without blocking this runtime.
async fn join(handle: std::thread::JoinHandle<PerClient>) -> PerClient {
    tokio::task::spawn_blocking(move || handle.join())
        .await?
        .map_err(|_| anyhow::anyhow!("a benchmark client thread panicked"))?
}

/// An open FetchX509SVID stream whose first message has been read.
pub type OpenStream = (Client, tonic::Streaming<pb::X509svidResponse>);

/// Opens `n` connections with one FetchX509SVID stream each and reads the first message.
/// The streams stay open until the result is dropped.
pub async fn open_streams(path: &Path, n: usize) -> anyhow::Result<Vec<OpenStream>> {
    let clients = connect(path, n).await?;
    futures::stream::iter(clients)
        .map(|mut c| async move {
            let mut stream = c.fetch_x509svid(pb::X509svidRequest {}).await?.into_inner();
            let msg = stream
                .message()
                .await?
                .context("stream ended without a message")?;
            check_x509(&msg)?;
            Ok((c, stream))
        })
        .buffer_unordered(CONNECT_PARALLELISM)
        .try_collect()
        .await
}

async fn fetch_x509(c: &mut Client) -> anyhow::Result<()> {
    let mut stream = c.fetch_x509svid(pb::X509svidRequest {}).await?.into_inner();
    let msg = stream
        .message()
        .await?
        .context("FetchX509SVID stream ended without a message")?;
    // Dropping the stream cancels it (RST_STREAM), as a one-shot client does.
    drop(stream);
    check_x509(&msg)
}

/// Decodes an X509-SVID response the way a client must before using it: the chain (with the
/// leaf's SPIFFE ID), the private key and the bundle.
pub fn check_x509(msg: &pb::X509svidResponse) -> anyhow::Result<()> {
    let svid = msg.svids.first().context("no X509-SVID in the response")?;
    let chain = split_der_chain(&svid.x509_svid)?;
    let leaf = CertInfo::parse(chain.first().context("empty certificate chain")?)?;
    ensure!(
        leaf.spiffe_id
            .is_some_and(|id| id.to_string() == svid.spiffe_id),
        "leaf certificate is not for {}",
        svid.spiffe_id
    );
    decode_p256_pkcs8(&svid.x509_svid_key)?;
    ensure!(!split_der_chain(&svid.bundle)?.is_empty(), "empty bundle");
    Ok(())
}

/// Decodes a PKCS#8 P-256 private key down to its 32-byte scalar.
fn decode_p256_pkcs8(der: &[u8]) -> anyhow::Result<()> {
    const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
    const P256: &str = "1.2.840.10045.3.1.7";
    let (rest, outer) = parse_der(der)?;
    ensure!(rest.is_empty(), "trailing bytes after the private key");
    let outer = outer.as_sequence()?;
    let alg = outer.get(1).context("no algorithm")?.as_sequence()?;
    let (kind, curve) = (
        alg.first().context("no key type")?.as_oid()?,
        alg.get(1).context("no curve")?.as_oid()?,
    );
    ensure!(
        kind.to_id_string() == EC_PUBLIC_KEY && curve.to_id_string() == P256,
        "not a P-256 key"
    );
    let (_, ec) = parse_der(outer.get(2).context("no key")?.as_slice()?)?;
    let scalar = ec.as_sequence()?.get(1).context("no scalar")?.as_slice()?;
    ensure!(scalar.len() == 32, "P-256 scalar is {} bytes", scalar.len());
    Ok(())
}

async fn fetch_jwt(c: &mut Client) -> anyhow::Result<()> {
    let resp = c
        .fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec![AUDIENCE.into()],
            spiffe_id: String::new(),
        })
        .await?
        .into_inner();
    check_jwt(&resp)
}

/// Decodes a JWT-SVID response: header and claims as JSON, the subject checked.
pub fn check_jwt(resp: &pb::JwtsvidResponse) -> anyhow::Result<()> {
    let svid = resp.svids.first().context("no JWT-SVID in the response")?;
    let parts: Vec<&str> = svid.svid.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        anyhow::bail!("token is not three base64url parts");
    };
    let _: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header)?)?;
    let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims)?)?;
    ensure!(
        claims["sub"] == svid.spiffe_id.as_str(),
        "token is not for {}",
        svid.spiffe_id
    );
    ensure!(
        URL_SAFE_NO_PAD.decode(signature)?.len() == 64,
        "not an ES256 signature"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::floor::Floor;

    #[test]
    fn floor_responses_decode() {
        let id: crate::spiffe::SpiffeId = "spiffe://agentid.local/user/ada".parse().unwrap();
        let floor = Floor::new(&id, "default").unwrap();
        check_x509(floor.x509()).unwrap();
        check_jwt(floor.jwt()).unwrap();
        let mut bad = floor.x509().clone();
        bad.svids[0].x509_svid_key.truncate(20);
        assert!(check_x509(&bad).is_err());
    }
}
