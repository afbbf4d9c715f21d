//! `agentid token mint|delegate|verify`: task tokens through the Delegation API, and offline
//! verification with a bundle file.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use super::{explain, read_token, struct_to_json, unix_now};
use crate::api::REFUSAL_RULE;
use crate::api::delegation as pb;
use crate::cli::{ClientArgs, TokenDelegateArgs, TokenMintArgs};
use crate::client;
use crate::spiffe::{MAX_BUNDLE_BYTES, SpiffeBundle, SpiffeId, TrustDomain};
use crate::token;

async fn connect(args: &ClientArgs) -> anyhow::Result<client::TokenClient> {
    let path = client::socket_path(args.socket.as_deref())?;
    Ok(client::connect_tokens(&path).await?)
}

/// A refusal already names its rule; anything else gets the usual next-step hint.
fn refused(status: tonic::Status) -> anyhow::Error {
    if status.metadata().get(REFUSAL_RULE).is_some() {
        anyhow::anyhow!("{}", status.message())
    } else {
        explain(status)
    }
}

/// `--scope "a b" --scope c` → `[a, b, c]`.
fn scopes(args: &[String]) -> Vec<String> {
    args.iter()
        .flat_map(|s| s.split_whitespace())
        .map(str::to_owned)
        .collect()
}

fn ttl_seconds(ttl: Option<Duration>) -> anyhow::Result<i64> {
    match ttl {
        None => Ok(0),
        Some(t) if t < Duration::from_secs(1) => bail!("--ttl must be at least 1s"),
        Some(t) => Ok(i64::try_from(t.as_secs()).unwrap_or(i64::MAX)),
    }
}

fn print_token(args: &ClientArgs, resp: pb::TaskTokenResponse) -> anyhow::Result<()> {
    if args.json {
        let out = json!({"token": resp.token, "expires_at": resp.expires_at});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", resp.token);
    }
    Ok(())
}

/// `agentid token mint`.
pub async fn mint(m: TokenMintArgs) -> anyhow::Result<()> {
    let req = pb::MintTaskTokenRequest {
        audience: m.audience,
        scopes: scopes(&m.scope),
        ttl_seconds: ttl_seconds(m.ttl)?,
        purpose: m.purpose.unwrap_or_default(),
        subject: m.subject.unwrap_or_default(),
        spiffe_id: m.spiffe_id.unwrap_or_default(),
    };
    let resp = connect(&m.client)
        .await?
        .mint_task_token(req)
        .await
        .map_err(refused)?
        .into_inner();
    print_token(&m.client, resp)
}

/// `agentid token delegate`.
pub async fn delegate(d: TokenDelegateArgs) -> anyhow::Result<()> {
    let req = pb::DelegateRequest {
        parent_token: read_token(&d.parent)?,
        child_spiffe_id: d.to,
        scopes: scopes(&d.scope),
        ttl_seconds: ttl_seconds(d.ttl)?,
        spiffe_id: String::new(),
    };
    let resp = connect(&d.client)
        .await?
        .delegate(req)
        .await
        .map_err(refused)?
        .into_inner();
    print_token(&d.client, resp)
}

/// `agentid token verify`: the verified claims as JSON on stdout.
pub async fn verify(
    args: ClientArgs,
    audience: String,
    presenter: Option<String>,
    bundle: Option<&Path>,
    token: String,
) -> anyhow::Result<()> {
    let token = read_token(&token)?;
    let claims = match bundle {
        Some(file) => {
            let presenter: Option<SpiffeId> = presenter
                .map(|p| p.parse().with_context(|| format!("--presenter {p:?}")))
                .transpose()?;
            let bundles = BundleFile::read(file)?;
            let claims = token::verify(
                &token,
                &audience,
                presenter.as_ref(),
                |td| bundles.get(td),
                unix_now(),
            )
            .context("task token rejected")?;
            serde_json::to_value(claims)?
        }
        None => {
            let req = pb::VerifyTaskTokenRequest {
                token,
                audience,
                presenter_spiffe_id: presenter.unwrap_or_default(),
            };
            let resp = connect(&args)
                .await?
                .verify_task_token(req)
                .await
                .map_err(|s| anyhow::anyhow!("task token rejected: {}", s.message()))?
                .into_inner();
            resp.claims.map(struct_to_json).unwrap_or_default()
        }
    };
    println!("{}", serde_json::to_string_pretty(&claims)?);
    Ok(())
}

/// JWT bundles read from a file for offline verification.
enum BundleFile {
    /// A SPIFFE bundle or JWKS: trusted for whichever trust domain the token names, since the
    /// file says nothing about its own (its keys must still verify the signature).
    Any(SpiffeBundle),
    /// `agentid bundle show --json`: bundles by trust domain.
    ByTrustDomain(BTreeMap<TrustDomain, SpiffeBundle>),
}

impl BundleFile {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let what = || format!("bundle file {}", path.display());
        let len = std::fs::metadata(path).with_context(what)?.len();
        if len > MAX_BUNDLE_BYTES as u64 {
            bail!("{}: {len} bytes is not a bundle", what());
        }
        let data = std::fs::read(path).with_context(what)?;
        let doc: serde_json::Value =
            serde_json::from_slice(&data).with_context(|| format!("{}: not JSON", what()))?;
        if doc.get("keys").is_some() {
            return Ok(Self::Any(
                SpiffeBundle::from_json(&data).with_context(what)?,
            ));
        }
        let serde_json::Value::Object(map) = doc else {
            bail!(
                "{}: expected a JWK Set or `agentid bundle show --json` output",
                what()
            );
        };
        let mut out = BTreeMap::new();
        for (td, entry) in map {
            let parsed = TrustDomain::new(&td)
                .with_context(|| format!("{}: {td:?} is not a trust domain", what()))?;
            let jwks = entry
                .get("jwt_authorities")
                .with_context(|| format!("{}: {td} has no jwt_authorities", what()))?;
            let bundle = SpiffeBundle::from_json(&serde_json::to_vec(jwks)?)
                .with_context(|| format!("{}: {td}", what()))?;
            out.insert(parsed, bundle);
        }
        Ok(Self::ByTrustDomain(out))
    }

    fn get(&self, td: &TrustDomain) -> Option<&SpiffeBundle> {
        match self {
            Self::Any(b) => Some(b),
            Self::ByTrustDomain(m) => m.get(td),
        }
    }
}
