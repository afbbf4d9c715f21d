//! The client side of the benchmark: Workload API clients in this process, each on its own
//! connection, doing what a workload does with each answer.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::{StreamExt, TryStreamExt};
use x509_parser::der_parser::parse_der;

use super::floor::AUDIENCE;
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
pub async fn connect(path: &Path, n: usize) -> anyhow::Result<Vec<Client>> {
    futures::stream::iter(0..n)
        .map(|_| client::connect(path))
        .buffer_unordered(CONNECT_PARALLELISM)
        .try_collect()
        .await
        .with_context(|| format!("connecting {n} clients to {}", path.display()))
}

/// What one measuring window produced.
pub struct Window {
    /// Latency of every call that completed inside the window.
    pub latencies: Vec<Duration>,
    /// Server CPU time spent inside the window.
    pub server_cpu: Duration,
}

/// Runs `call` back to back on every client for `window`, all clients at once. `server_cpu`
/// reads the server's CPU time; it is read when the window opens and when it closes. Any
/// failed call fails the run.
pub async fn run(
    mut clients: Vec<Client>,
    call: Call,
    window: Duration,
    server_cpu: impl Fn() -> anyhow::Result<Duration>,
) -> anyhow::Result<Window> {
    // One call each first, so connection setup and first-call work stay out of the window.
    futures::future::try_join_all(clients.iter_mut().map(|c| call.once(c))).await?;
    let cpu_start = server_cpu()?;
    let deadline = Instant::now() + window;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
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
                anyhow::Ok(latencies)
            })
        })
        .collect();
    tokio::time::sleep_until(deadline.into()).await;
    let server_cpu = server_cpu()?.saturating_sub(cpu_start);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(Window {
        latencies,
        server_cpu,
    })
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
