//! Task-token figures: mint and delegate through the socket, next to FetchJWTSVID on the same
//! daemon and connection as the baseline (same attestation and policy work, the JWT-SVID
//! served from the cache), and offline verification against raw ES256 verification on one
//! thread.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;

use super::procs::Server;
use super::signing::{Count, count_for};
use super::stats::Summary;
use crate::api::delegation as dpb;
use crate::api::workload as wpb;
use crate::client::{self, Client, TokenClient};
use crate::spiffe::{SpiffeBundle, SpiffeId};
use crate::token;

const AUDIENCE: &str = "bench";
/// A root token is replaced before its fan-out (the policy's maximum) runs out.
const DELEGATIONS_PER_ROOT: usize = 900;

/// The task-token measurements of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Tokens {
    /// FetchJWTSVID, one client: the baseline the two below are divided by.
    pub fetch_jwt: Summary,
    pub mint: Summary,
    pub delegate: Summary,
    /// mint p50 / FetchJWTSVID p50.
    pub mint_ratio_p50: f64,
    /// delegate p50 / FetchJWTSVID p50.
    pub delegate_ratio_p50: f64,
    /// `token::verify` of a two-actor token, per second on one thread.
    pub verify_per_sec: f64,
    /// ES256 signature verification of the same token alone, per second on one thread.
    pub raw_verify_per_sec: f64,
    /// verify / raw.
    pub verify_ratio: f64,
}

/// Runs the call `$op` back to back for `$window`, pushing each latency onto `$out`.
macro_rules! timed {
    ($window:expr, $out:expr, $op:expr) => {{
        let start = Instant::now();
        while start.elapsed() < $window {
            let t = Instant::now();
            $op.await?;
            $out.push(t.elapsed());
        }
    }};
}

/// Starts a daemon whose policy lets this process mint and delegate to itself, and measures.
pub async fn measure(
    exe: &Path,
    dir: &Path,
    window: Duration,
    rounds: usize,
) -> anyhow::Result<Tokens> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let me = "spiffe://agentid.local/bench/agent";
    let policy = dir.join("tokens-policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: bench-agent}}\n\
             spec:\n  spiffeID: \"{me}\"\n  selector: {{unix: {{uid: {uid}}}}}\n\
             \x20 tokens: {{audiences: [{AUDIENCE}], scopes: [\"ledger:read\", \"ledger:write\"], maxTTL: 1h}}\n\
             \x20 delegation: {{allowedChildren: [\"{me}\"], maxDepth: 16, maxFanOut: 1000}}\n"
        ),
    )?;
    let policy = policy.to_str().context("scratch path is not UTF-8")?;
    let mut daemon = Server::daemon_with(exe, dir, "tokens", &["--policy", policy])?;
    daemon.ready().await?;
    let mut svids = client::connect(&daemon.socket).await?;
    let mut tokens = client::connect_tokens(&daemon.socket).await?;
    let mut delegating = client::connect_tokens(&daemon.socket).await?;
    let me: SpiffeId = me.parse()?;

    let mut roots = Roots::new(&mut delegating).await?;
    // Warm up: the JWT-SVID is issued and cached, the executable hashed.
    fetch_jwt(&mut svids).await?;
    let (mut jwt, mut mint, mut delegate) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu = [Duration::ZERO; 3];
    for _ in 0..rounds.max(1) {
        let start = daemon.cpu_time()?;
        timed!(window, jwt, fetch_jwt(&mut svids));
        let mid = daemon.cpu_time()?;
        timed!(window, mint, mint_one(&mut tokens));
        let late = daemon.cpu_time()?;
        timed!(window, delegate, roots.delegate(&me));
        let end = daemon.cpu_time()?;
        cpu[0] += mid - start;
        cpu[1] += late - mid;
        cpu[2] += end - late;
    }
    let total = window * rounds.max(1) as u32;
    let (fetch_jwt, mint, delegate) = (
        Summary::of(jwt, total, cpu[0]),
        Summary::of(mint, total, cpu[1]),
        Summary::of(delegate, total, cpu[2]),
    );

    let leaf = roots.delegate_token(&me).await?;
    let bundle = jwt_bundle(&mut svids).await?;
    drop(daemon);
    let (verify, raw) = verify_rates(&leaf, &bundle, &me, window, rounds)?;
    Ok(Tokens {
        mint_ratio_p50: mint.p50_ms / fetch_jwt.p50_ms,
        delegate_ratio_p50: delegate.p50_ms / fetch_jwt.p50_ms,
        fetch_jwt,
        mint,
        delegate,
        verify_per_sec: verify,
        raw_verify_per_sec: raw,
        verify_ratio: verify / raw,
    })
}

async fn fetch_jwt(c: &mut Client) -> anyhow::Result<()> {
    let req = wpb::JwtsvidRequest {
        audience: vec![AUDIENCE.into()],
        spiffe_id: String::new(),
    };
    let resp = c.fetch_jwtsvid(req).await?.into_inner();
    anyhow::ensure!(!resp.svids.is_empty(), "no JWT-SVID");
    Ok(())
}

fn mint_request() -> dpb::MintTaskTokenRequest {
    dpb::MintTaskTokenRequest {
        audience: vec![AUDIENCE.into()],
        scopes: vec!["ledger:read".into(), "ledger:write".into()],
        ttl_seconds: 600,
        purpose: "bench".into(),
        ..Default::default()
    }
}

async fn mint_one(c: &mut TokenClient) -> anyhow::Result<()> {
    let resp = c.mint_task_token(mint_request()).await?.into_inner();
    anyhow::ensure!(!resp.token.is_empty(), "empty task token");
    Ok(())
}

/// Root tokens to delegate from, renewed before the fan-out limit refuses.
struct Roots<'c> {
    client: &'c mut TokenClient,
    root: String,
    used: usize,
}

impl<'c> Roots<'c> {
    async fn new(client: &'c mut TokenClient) -> anyhow::Result<Self> {
        let root = client
            .mint_task_token(mint_request())
            .await?
            .into_inner()
            .token;
        Ok(Self {
            client,
            root,
            used: 0,
        })
    }

    async fn delegate_token(&mut self, child: &SpiffeId) -> anyhow::Result<String> {
        if self.used == DELEGATIONS_PER_ROOT {
            // Outside the timing's intent but inside its window: one mint per 900 delegations.
            self.root = self
                .client
                .mint_task_token(mint_request())
                .await?
                .into_inner()
                .token;
            self.used = 0;
        }
        self.used += 1;
        let req = dpb::DelegateRequest {
            parent_token: self.root.clone(),
            child_spiffe_id: child.to_string(),
            scopes: vec!["ledger:read".into()],
            ..Default::default()
        };
        Ok(self.client.delegate(req).await?.into_inner().token)
    }

    async fn delegate(&mut self, child: &SpiffeId) -> anyhow::Result<()> {
        self.delegate_token(child).await.map(drop)
    }
}

async fn jwt_bundle(c: &mut Client) -> anyhow::Result<SpiffeBundle> {
    let msg = c
        .fetch_jwt_bundles(wpb::JwtBundlesRequest {})
        .await?
        .into_inner()
        .message()
        .await?
        .context("no JWT bundle message")?;
    let doc = msg
        .bundles
        .get("spiffe://agentid.local")
        .context("no bundle for agentid.local")?;
    Ok(SpiffeBundle::from_json(doc)?)
}

/// (token::verify per second, raw ES256 verification per second), alternating windows.
fn verify_rates(
    token: &str,
    bundle: &SpiffeBundle,
    presenter: &SpiffeId,
    window: Duration,
    rounds: usize,
) -> anyhow::Result<(f64, f64)> {
    let (signed, sig) = token.rsplit_once('.').context("token has no signature")?;
    let sig = URL_SAFE_NO_PAD.decode(sig)?;
    let key = bundle
        .jwt_authorities
        .first()
        .context("bundle has no JWT key")?;
    let raw_key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_sec1.clone());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let td = presenter.trust_domain();
    let (mut full, mut raw) = (Count::default(), Count::default());
    for _ in 0..rounds.max(1) {
        full += count_for(window, || {
            let claims = token::verify(
                token,
                AUDIENCE,
                Some(presenter),
                |t| (t == td).then_some(bundle),
                now,
            )?;
            std::hint::black_box(claims);
            Ok(())
        })?;
        raw += count_for(window, || {
            raw_key
                .verify(signed.as_bytes(), &sig)
                .map_err(|_| anyhow::anyhow!("raw verification failed"))?;
            Ok(())
        })?;
    }
    Ok((full.rate(), raw.rate()))
}
