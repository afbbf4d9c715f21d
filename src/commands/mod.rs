//! The client subcommands: talk to the Workload API like any workload would.
pub mod cluster;
pub mod token;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, bail};
use serde_json::json;
use tonic::Code;

use crate::audit::{VerifyOptions, verify_file};
use crate::cli::ClientArgs;
use crate::client::{self, Client};
use crate::crypto::x509::{CertInfo, split_der_chain, to_pem};
use crate::inspect;

async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let path = client::socket_path(args.socket.as_deref())?;
    Ok(client::connect(&path).await?)
}

/// Turns a gRPC status into an error that says what to do next.
pub(super) fn explain(status: tonic::Status) -> anyhow::Error {
    let hint = match status.code() {
        Code::PermissionDenied => {
            // SAFETY: getuid cannot fail.
            let uid = unsafe { libc::getuid() };
            format!(
                " (no policy matches this process, uid {uid}: add an AgentIdentity policy whose selector matches it)"
            )
        }
        Code::Unavailable => {
            " (the daemon could not attest or sign right now; retry, and check its log)".into()
        }
        Code::InvalidArgument => String::new(),
        Code::Unimplemented => {
            " (is this socket an agentid or SPIFFE Workload API endpoint?)".into()
        }
        _ => String::new(),
    };
    anyhow::anyhow!("{}: {}{hint}", code_word(status.code()), status.message())
}

fn code_word(code: Code) -> &'static str {
    match code {
        Code::PermissionDenied => "permission denied",
        Code::Unavailable => "unavailable",
        Code::InvalidArgument => "invalid argument",
        _ => "error",
    }
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn remaining(t: SystemTime) -> String {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => format!(
            "in {}",
            humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
        ),
        Err(_) => "expired".into(),
    }
}

/// `agentid x509 fetch`.
pub async fn x509_fetch(args: ClientArgs, out: Option<&Path>) -> anyhow::Result<()> {
    let mut client = connect(&args).await?;
    let mut stream = client
        .fetch_x509svid(crate::api::workload::X509svidRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    let msg = stream
        .message()
        .await
        .map_err(explain)?
        .context("the server closed the stream without a response")?;
    let mut shown = Vec::new();
    let mut files = Vec::new();
    for (i, svid) in msg.svids.iter().enumerate() {
        let chain = split_der_chain(&svid.x509_svid)?;
        let info = CertInfo::parse(chain.first().context("empty certificate chain")?)?;
        if let Some(dir) = out {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let stem = if i == 0 {
                "svid".to_owned()
            } else {
                format!("svid.{i}")
            };
            let cert_path = dir.join(format!("{stem}.pem"));
            let key_path = dir.join(format!("{stem}.key"));
            std::fs::write(&cert_path, to_pem(&chain))?;
            write_private(
                &key_path,
                pem::encode(&pem::Pem::new("PRIVATE KEY", svid.x509_svid_key.clone())).as_bytes(),
            )?;
            files.push(cert_path.display().to_string());
            files.push(key_path.display().to_string());
            if i == 0 {
                let bundle_path = dir.join("bundle.pem");
                std::fs::write(&bundle_path, to_pem(&split_der_chain(&svid.bundle)?))?;
                files.push(bundle_path.display().to_string());
            }
        }
        shown.push((svid.spiffe_id.clone(), svid.hint.clone(), info));
    }
    if args.json {
        let svids: Vec<_> = shown
            .iter()
            .map(|(id, hint, info)| json!({"spiffe_id": id, "hint": hint, "not_after": rfc3339(info.not_after), "serial": info.serial_hex}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"svids": svids, "files": files}))?
        );
    } else {
        for (id, hint, info) in &shown {
            println!("SPIFFE ID  {id}");
            if !hint.is_empty() {
                println!("hint       {hint}");
            }
            println!(
                "expires    {} ({})",
                rfc3339(info.not_after),
                remaining(info.not_after)
            );
            println!("serial     {}", info.serial_hex);
        }
        if !files.is_empty() {
            println!("wrote      {}", files.join(", "));
        }
    }
    Ok(())
}

/// `agentid x509 watch`: one line per SVID per stream message, until the stream ends.
pub async fn x509_watch(args: ClientArgs) -> anyhow::Result<()> {
    let mut client = connect(&args).await?;
    let mut stream = client
        .fetch_x509svid(crate::api::workload::X509svidRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    loop {
        let msg = match stream.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                println!("stream closed by the server");
                return Ok(());
            }
            Err(status) => return Err(explain(status)),
        };
        let now = rfc3339(SystemTime::now());
        for svid in &msg.svids {
            let chain = split_der_chain(&svid.x509_svid)?;
            let info = CertInfo::parse(chain.first().context("empty certificate chain")?)?;
            if args.json {
                println!(
                    "{}",
                    json!({"time": now, "spiffe_id": svid.spiffe_id, "hint": svid.hint, "serial": info.serial_hex, "not_after": rfc3339(info.not_after)})
                );
            } else {
                println!(
                    "{now}  {}  serial {}  expires {}",
                    svid.spiffe_id,
                    info.serial_hex,
                    rfc3339(info.not_after)
                );
            }
        }
    }
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    // Remove first so an existing file's looser mode is not kept.
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// `agentid jwt fetch`.
pub async fn jwt_fetch(
    args: ClientArgs,
    audience: Vec<String>,
    spiffe_id: Option<String>,
) -> anyhow::Result<()> {
    let mut client = connect(&args).await?;
    let req = crate::api::workload::JwtsvidRequest {
        audience,
        spiffe_id: spiffe_id.unwrap_or_default(),
    };
    let resp = client
        .fetch_jwtsvid(req)
        .await
        .map_err(explain)?
        .into_inner();
    if args.json {
        let svids: Vec<_> = resp
            .svids
            .iter()
            .map(|s| json!({"spiffe_id": s.spiffe_id, "hint": s.hint, "token": s.svid}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"svids": svids}))?
        );
    } else {
        // The token alone on stdout for the default identity, so `$(agentid jwt fetch ...)` works.
        let first = resp
            .svids
            .first()
            .context("the server returned no JWT-SVID")?;
        println!("{}", first.svid);
        for s in &resp.svids {
            eprintln!(
                "{} {}",
                s.spiffe_id,
                if s.hint.is_empty() {
                    String::new()
                } else {
                    format!("(hint {})", s.hint)
                }
            );
        }
    }
    Ok(())
}

/// `agentid jwt validate`.
pub async fn jwt_validate(args: ClientArgs, audience: String, token: String) -> anyhow::Result<()> {
    let token = read_token(&token)?;
    let mut client = connect(&args).await?;
    let resp = client
        .validate_jwtsvid(crate::api::workload::ValidateJwtsvidRequest {
            audience,
            svid: token,
        })
        .await
        .map_err(|s| anyhow::anyhow!("token rejected: {}", s.message()))?
        .into_inner();
    let claims = resp.claims.map(struct_to_json).unwrap_or_default();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"spiffe_id": resp.spiffe_id, "claims": claims}))?
        );
    } else {
        println!("valid: {}", resp.spiffe_id);
        println!("{}", serde_json::to_string_pretty(&claims)?);
    }
    Ok(())
}

/// The token argument, or stdin for `-`.
pub(super) fn read_token(arg: &str) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(arg.to_owned());
    }
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the token from stdin")?;
    Ok(s.trim().to_owned())
}

pub(super) fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `agentid x509 inspect`: decodes a certificate offline.
pub fn x509_inspect(input: &str, json: bool) -> anyhow::Result<()> {
    let (name, data) = if input == "-" {
        let mut data = Vec::new();
        std::io::stdin()
            .read_to_end(&mut data)
            .context("reading stdin")?;
        ("(stdin)".to_owned(), data)
    } else {
        let data = std::fs::read(input).with_context(|| format!("reading {input}"))?;
        (input.to_owned(), data)
    };
    let report = inspect::inspect_x509(&data, unix_now()).context(name)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", inspect::x509_text(&report));
    }
    Ok(())
}

/// `agentid jwt inspect`: decodes a token offline, without verifying it.
pub fn jwt_inspect(token: &str, json: bool) -> anyhow::Result<()> {
    let token = read_token(token)?;
    let report = inspect::inspect_jwt(&token, unix_now())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", inspect::jwt_text(&report));
    }
    Ok(())
}

/// `agentid bundle show`.
pub async fn bundle_show(args: ClientArgs) -> anyhow::Result<()> {
    let mut client = connect(&args).await?;
    let x509 = client
        .fetch_x509_bundles(crate::api::workload::X509BundlesRequest {})
        .await
        .map_err(explain)?
        .into_inner()
        .message()
        .await
        .map_err(explain)?
        .context("no X.509 bundle response")?;
    let jwt = client
        .fetch_jwt_bundles(crate::api::workload::JwtBundlesRequest {})
        .await
        .map_err(explain)?
        .into_inner()
        .message()
        .await
        .map_err(explain)?
        .context("no JWT bundle response")?;
    let mut tds: Vec<&String> = x509.bundles.keys().chain(jwt.bundles.keys()).collect();
    tds.sort();
    tds.dedup();
    let mut out = serde_json::Map::new();
    for td in tds {
        let certs = x509
            .bundles
            .get(td)
            .map(|d| split_der_chain(d))
            .transpose()?
            .unwrap_or_default();
        let jwks: serde_json::Value = jwt
            .bundles
            .get(td)
            .map(|j| serde_json::from_slice(j))
            .transpose()?
            .unwrap_or_default();
        if args.json {
            out.insert(
                td.clone(),
                json!({"x509_authorities_pem": to_pem(&certs), "jwt_authorities": jwks}),
            );
        } else {
            println!("trust domain {td}");
            for c in &certs {
                let info = CertInfo::parse(c)?;
                println!(
                    "  x509 CA   {}  expires {}",
                    info.fingerprint,
                    rfc3339(info.not_after)
                );
            }
            for k in jwks["keys"].as_array().into_iter().flatten() {
                println!(
                    "  jwt key   kid {}  {} {}",
                    k["kid"].as_str().unwrap_or("?"),
                    k["kty"].as_str().unwrap_or(""),
                    k["crv"].as_str().unwrap_or("")
                );
            }
            print!("{}", to_pem(&certs));
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// `agentid audit verify`.
pub fn audit_verify(file: &Path, any_start: bool) -> anyhow::Result<()> {
    let opts = VerifyOptions {
        any_start,
        ..Default::default()
    };
    match verify_file(file, &opts) {
        Ok(r) => {
            println!(
                "ok: {} records, seq {}..{}, head {}",
                r.records, r.first_seq, r.last_seq, r.last_hash
            );
            Ok(())
        }
        Err(e) => bail!("{}: {e}", file.display()),
    }
}

pub(super) fn struct_to_json(s: prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => json!(n as i64),
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.into_iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
    }
}
