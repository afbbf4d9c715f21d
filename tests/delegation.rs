//! Task tokens and delegation chains end to end (AGENT-IDENTITY.md §3): three agents, each a
//! real process of its own uid attested by the kernel, mint and delegate through the CLI over
//! the Delegation API on the Workload API socket; a relying party checks the presenter over a
//! real mTLS connection; every refusal names its rule, on stderr and in the audit trail.
//!
//! Needs root (to run processes as other uids): fails, never skips, without it.

mod common;
mod conformance;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agentid::spiffe::{SpiffeBundle, SpiffeId, TrustDomain};
use agentid::token::{self, TaskClaims};
use common::{Daemon, cli_as, my_uid};
use conformance::{TD, policy, start_with};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const ORCHESTRATOR: u32 = 41001;
const ANALYST: u32 = 41002;
const READER: u32 = 41003;
const NOBODY: u32 = 41004;

fn id(path: &str) -> SpiffeId {
    format!("spiffe://{TD}{path}").parse().unwrap()
}

fn require_root() {
    assert_eq!(
        my_uid(),
        0,
        "this test needs root to run agents as other uids"
    );
}

/// The three agents' policies. `orchestrator_limits` goes under `spec.delegation`.
fn agents(orchestrator_limits: &str) -> Vec<String> {
    vec![
        policy(
            "orchestrator",
            "/agent/orchestrator",
            ORCHESTRATOR,
            &format!(
                "  tokens:\n    audiences: [ledger]\n    scopes: [\"ledger:read\", \"ledger:write\"]\n    maxTTL: 5m\n  delegation:\n    allowedChildren: [\"spiffe://{TD}/agent/*\"]\n{orchestrator_limits}"
            ),
        ),
        policy(
            "analyst",
            "/agent/analyst",
            ANALYST,
            &format!("  delegation:\n    allowedChildren: [\"spiffe://{TD}/agent/reader\"]\n"),
        ),
        policy("reader", "/agent/reader", READER, ""),
        policy("ledger", "/svc/ledger", my_uid(), ""),
    ]
}

/// A daemon whose socket other uids can reach.
fn start(dir: &Path, orchestrator_limits: &str) -> Daemon {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    start_with(dir, &agents(orchestrator_limits), &[])
}

/// `token mint --audience ledger --scope SCOPE EXTRA…` as `uid`.
fn mint_as(uid: u32, d: &Daemon, scope: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["token", "mint", "--audience", "ledger", "--scope", scope];
    args.extend_from_slice(extra);
    cli_as(uid, d, &args)
}

/// `token delegate --parent PARENT --to TO --scope SCOPE EXTRA…` as `uid`.
fn delegate_as(
    uid: u32,
    d: &Daemon,
    parent: &str,
    to: &str,
    scope: &str,
    extra: &[&str],
) -> (bool, String, String) {
    let mut args = vec![
        "token", "delegate", "--parent", parent, "--to", to, "--scope", scope,
    ];
    args.extend_from_slice(extra);
    cli_as(uid, d, &args)
}

/// A token the CLI printed, or a panic with its stderr.
#[track_caller]
fn ok_token(r: (bool, String, String)) -> String {
    assert!(r.0, "expected a token, got: {}", r.2);
    r.1.trim().to_owned()
}

/// Asserts the CLI refused with `rule`, on stderr, with a non-zero exit.
#[track_caller]
fn refused(r: (bool, String, String), rule: &str) -> String {
    assert!(!r.0, "expected refusal {rule}, got token {}", r.1);
    assert!(r.1.is_empty(), "nothing on stdout on refusal: {}", r.1);
    assert!(
        r.2.contains(&format!("refused by rule {rule}")),
        "expected rule {rule} on stderr: {}",
        r.2
    );
    r.2
}

/// Claims of a token, read without verification (the assertions verify separately).
fn claims(token: &str) -> TaskClaims {
    let report = agentid::inspect::inspect_jwt(token, 0).unwrap();
    serde_json::from_value(Value::Object(report.claims)).unwrap()
}

fn own_bundle(d: &Daemon) -> (SpiffeBundle, PathBuf) {
    let (code, out, err) = common::cli(&d.socket, &["bundle", "show", "--json"]);
    assert_eq!(code, 0, "{err}");
    let file = d.dir.join("bundles.json");
    std::fs::write(&file, &out).unwrap();
    let doc: Value = serde_json::from_str(&out).unwrap();
    let jwks = &doc[format!("spiffe://{TD}")]["jwt_authorities"];
    let bundle = SpiffeBundle::from_json(&serde_json::to_vec(jwks).unwrap()).unwrap();
    (bundle, file)
}

/// Fetches the X509-SVID of the agent running as `uid` into a directory it owns.
fn fetch_svid_as(uid: u32, d: &Daemon, name: &str) -> PathBuf {
    let dir = d.dir.join(format!("svid-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
    let r = cli_as(uid, d, &["x509", "fetch", "--out", dir.to_str().unwrap()]);
    assert!(r.0, "x509 fetch as {name}: {}", r.2);
    dir
}

/// The chain of the spec: orchestrator mints `ledger:read ledger:write`, delegates
/// `ledger:read` to the analyst, which delegates it to the reader. Each step keeps `txn` and
/// `sub`, extends `act`, narrows scope, never outlives its parent and spends one depth. The
/// ledger (relying party) accepts the reader's token over mTLS from the reader only.
#[tokio::test]
async fn delegation_chain_and_presenter_binding_over_mtls() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let d = start(tmp.path(), "    maxDepth: 2\n    maxFanOut: 3\n");

    let (analyst_id, reader_id) = (
        id("/agent/analyst").to_string(),
        id("/agent/reader").to_string(),
    );
    let root = ok_token(mint_as(
        ORCHESTRATOR,
        &d,
        "ledger:read ledger:write",
        &["--purpose", "reconcile march", "--ttl", "4m"],
    ));
    let analyst = ok_token(delegate_as(
        ORCHESTRATOR,
        &d,
        &root,
        &analyst_id,
        "ledger:read",
        &["--ttl", "2m"],
    ));
    let reader = ok_token(delegate_as(
        ANALYST,
        &d,
        &analyst,
        &reader_id,
        "ledger:read",
        &[],
    ));

    let (c0, c1, c2) = (claims(&root), claims(&analyst), claims(&reader));
    assert_eq!(
        c0.sub,
        id("/agent/orchestrator").to_string(),
        "sub: the agent itself"
    );
    assert_eq!(c0.scope.to_string(), "ledger:read ledger:write");
    assert_eq!(c0.aud, ["ledger"]);
    assert_eq!(c0.tctx.purpose.as_deref(), Some("reconcile march"));
    assert!(
        (235..=240).contains(&(c0.exp - c0.iat)),
        "4m ttl: {}",
        c0.exp - c0.iat
    );
    for c in [&c1, &c2] {
        assert_eq!(c.txn, c0.txn, "one txn for the task");
        assert_eq!(c.sub, c0.sub, "sub is the principal throughout");
        assert_eq!(c.aud, c0.aud);
        assert_eq!(c.scope.to_string(), "ledger:read");
        assert_eq!(c.tctx.purpose, c0.tctx.purpose);
    }
    assert!(
        c1.exp <= c0.exp && c2.exp <= c1.exp,
        "never outlives its parent"
    );
    assert!((115..=120).contains(&(c1.exp - c1.iat)), "2m ttl");
    assert_eq!(
        [c0.tctx.depth, c1.tctx.depth, c2.tctx.depth],
        [2, 1, 0],
        "each hop spends one depth"
    );
    let chain: Vec<String> = c2.act.chain().map(|a| a.sub.to_string()).collect();
    assert_eq!(
        chain,
        [
            id("/agent/reader").to_string(),
            id("/agent/analyst").to_string(),
            id("/agent/orchestrator").to_string()
        ],
        "outermost actor first"
    );
    assert_ne!(c0.jti, c1.jti);

    // The reader cannot go further: its policy names no children.
    refused(
        delegate_as(
            READER,
            &d,
            &reader,
            &id("/agent/x").to_string(),
            "ledger:read",
            &[],
        ),
        "child_not_allowed",
    );

    // The relying party: the ledger service, with its own SVID, over real mTLS on TCP.
    let (bundle, bundle_file) = own_bundle(&d);
    let ledger = Ledger::start(&d, bundle.clone()).await;
    let reader_svid = fetch_svid_as(READER, &d, "reader");
    let analyst_svid = fetch_svid_as(ANALYST, &d, "analyst");
    let reply = ledger.present(&reader_svid, &reader).await;
    assert_eq!(reply, format!("ok {} ledger:read", id("/agent/reader")));
    let reply = ledger.present(&analyst_svid, &reader).await;
    assert!(
        reply.starts_with("denied") && reply.contains("is not the token's outermost actor"),
        "another workload presenting the reader's token: {reply}"
    );
    // The analyst's own token is good from the analyst.
    let reply = ledger.present(&analyst_svid, &analyst).await;
    assert_eq!(reply, format!("ok {} ledger:read", id("/agent/analyst")));

    // The same checks from the command line: through the socket and offline with a bundle.
    let reader_id = id("/agent/reader").to_string();
    for extra in [&[][..], &["--bundle", bundle_file.to_str().unwrap()][..]] {
        let mut args = vec![
            "token",
            "verify",
            "--audience",
            "ledger",
            "--presenter",
            &reader_id,
        ];
        args.extend_from_slice(extra);
        args.push(&reader);
        let (code, out, err) = common::cli(&d.socket, &args);
        assert_eq!(code, 0, "verify {extra:?}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["act"]["act"]["sub"], id("/agent/analyst").to_string());
        assert_eq!(v["txn"], c0.txn);

        let analyst_id = id("/agent/analyst").to_string();
        let mut wrong = vec![
            "token",
            "verify",
            "--audience",
            "ledger",
            "--presenter",
            &analyst_id,
        ];
        wrong.extend_from_slice(extra);
        wrong.push(&reader);
        let (code, _, err) = common::cli(&d.socket, &wrong);
        assert_ne!(code, 0);
        assert!(err.contains("is not the token's outermost actor"), "{err}");
        let mut aud = vec!["token", "verify", "--audience", "payroll"];
        aud.extend_from_slice(extra);
        aud.push(&reader);
        let (code, _, err) = common::cli(&d.socket, &aud);
        assert_ne!(code, 0);
        assert!(err.contains("audience \"payroll\""), "{err}");
    }

    // Every issuance is in the audit trail with its task and chain; no token is.
    let log = std::fs::read_to_string(d.state.join("audit.log")).unwrap();
    let records: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let delegated: Vec<&Value> = records
        .iter()
        .filter(|r| r["data"]["decision"]["action"] == "delegated")
        .collect();
    assert_eq!(delegated.len(), 2, "two delegations audited");
    assert_eq!(delegated[1]["data"]["delegation"]["txn"], c0.txn);
    assert_eq!(delegated[1]["data"]["delegation"]["actors"][0], reader_id);
    assert_eq!(delegated[1]["data"]["credential"]["jti"], c2.jti);
    assert_eq!(
        delegated[1]["data"]["identity"]["spiffe_id"],
        id("/agent/analyst").to_string()
    );
    assert!(
        records
            .iter()
            .any(|r| r["data"]["decision"]["action"] == "issued"
                && r["data"]["credential"]["kind"] == "task-token"
                && r["data"]["credential"]["jti"] == c0.jti)
    );
    for t in [&root, &analyst, &reader] {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!log.contains(sig), "the audit log holds no token");
    }
}

/// Every rule of the issuer refuses through the socket with its name, and is audited.
#[tokio::test]
async fn refusals_name_their_rule() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let d = start(tmp.path(), "    maxDepth: 1\n    maxFanOut: 1\n");
    let analyst_id = id("/agent/analyst").to_string();
    let reader_id = id("/agent/reader").to_string();
    let mint = |extra: &[&str]| mint_as(ORCHESTRATOR, &d, "ledger:read", extra);
    let delegate = |uid, parent: &str, to: &str, scope: &str, extra: &[&str]| {
        delegate_as(uid, &d, parent, to, scope, extra)
    };

    // Policy on minting.
    refused(mint(&["--audience", "payroll"]), "audience_not_allowed");
    refused(mint(&["--scope", "ledger:admin"]), "scope_not_allowed");
    refused(mint(&["--subject", "user:alice"]), "subject_not_allowed");
    let e = refused(
        mint_as(ANALYST, &d, "ledger:read", &[]),
        "audience_not_allowed",
    );
    assert!(e.contains("ledger"), "{e}");

    let root = ok_token(mint(&["--scope", "ledger:write", "--ttl", "60s"]));
    // Widening, a child the policy does not allow, a TTL past the parent.
    refused(
        delegate(
            ORCHESTRATOR,
            &root,
            &analyst_id,
            "ledger:read ledger:delete",
            &[],
        ),
        "scope_widening",
    );
    refused(
        delegate(
            ORCHESTRATOR,
            &root,
            &id("/svc/ledger").to_string(),
            "ledger:read",
            &[],
        ),
        "child_not_allowed",
    );
    refused(
        delegate(
            ORCHESTRATOR,
            &root,
            &analyst_id,
            "ledger:read",
            &["--ttl", "5m"],
        ),
        "ttl_beyond_parent",
    );
    // A parent held by someone else, and a forged one.
    refused(
        delegate(ANALYST, &root, &reader_id, "ledger:read", &[]),
        "not_outermost_actor",
    );
    let mut forged = root.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    refused(
        delegate(ORCHESTRATOR, &forged, &analyst_id, "ledger:read", &[]),
        "parent_invalid",
    );
    let mut edited: Vec<&str> = root.split('.').collect();
    let widened = {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut c: Value = serde_json::from_slice(&e.decode(edited[1]).unwrap()).unwrap();
        c["scope"] = "ledger:read ledger:write ledger:admin".into();
        e.encode(serde_json::to_vec(&c).unwrap())
    };
    edited[1] = &widened;
    refused(
        delegate(
            ORCHESTRATOR,
            &edited.join("."),
            &analyst_id,
            "ledger:admin",
            &[],
        ),
        "parent_invalid",
    );

    // Fan-out 1, depth 1: one child, and that child can delegate no further.
    let child = ok_token(delegate(
        ORCHESTRATOR,
        &root,
        &analyst_id,
        "ledger:read",
        &[],
    ));
    refused(
        delegate(
            ORCHESTRATOR,
            &root,
            &id("/agent/other").to_string(),
            "ledger:read",
            &[],
        ),
        "max_fan_out",
    );
    refused(
        delegate(ANALYST, &child, &reader_id, "ledger:read", &[]),
        "max_depth",
    );

    // An expired parent.
    let short = ok_token(mint(&["--ttl", "1s"]));
    std::thread::sleep(Duration::from_millis(2100));
    refused(
        delegate(ORCHESTRATOR, &short, &analyst_id, "ledger:read", &[]),
        "parent_expired",
    );

    // A caller with no identity gets no token, and the usual Workload API answer.
    let (ok, out, err) = mint_as(NOBODY, &d, "ledger:read", &[]);
    assert!(!ok && out.is_empty());
    assert!(
        err.contains("permission denied: no identity issued"),
        "{err}"
    );

    // Bad requests are refused before anything is signed.
    let (ok, _, err) = delegate(ORCHESTRATOR, &root, "not-an-id", "ledger:read", &[]);
    assert!(!ok && err.contains("invalid child_spiffe_id"), "{err}");
    refused(mint(&["--scope", "a\"b"]), "invalid_request");

    // Each refusal is in the audit trail with its rule.
    let log = std::fs::read_to_string(d.state.join("audit.log")).unwrap();
    for rule in [
        "audience_not_allowed",
        "scope_not_allowed",
        "subject_not_allowed",
        "scope_widening",
        "child_not_allowed",
        "ttl_beyond_parent",
        "not_outermost_actor",
        "parent_invalid",
        "max_fan_out",
        "max_depth",
        "parent_expired",
    ] {
        assert!(
            log.lines().any(|l| l.contains("\"denied\"") && l.contains(&format!("refused by rule {rule}"))),
            "no audit record for {rule}"
        );
    }
}

/// The ledger service: a TLS server that requires an X509-SVID of the trust domain, and
/// authorizes a task token only when its outermost actor is the mTLS peer.
struct Ledger {
    addr: std::net::SocketAddr,
    roots: Arc<rustls::RootCertStore>,
}

impl Ledger {
    async fn start(d: &Daemon, bundle: SpiffeBundle) -> Ledger {
        let svid = conformance::spiffe_client(d)
            .await
            .fetch_x509_svid()
            .await
            .unwrap();
        assert_eq!(svid.spiffe_id().to_string(), id("/svc/ledger").to_string());
        let mut roots = rustls::RootCertStore::empty();
        for ca in svid_bundle_cas(d) {
            roots.add(ca.into()).unwrap();
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let chain = svid
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec().into())
            .collect();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(svid.private_key().as_bytes().to_vec().into());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let td = TrustDomain::new(TD).unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                // The presenter is whoever the handshake authenticated, never what it says.
                let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
                let presenter = agentid::crypto::x509::CertInfo::parse(&peer)
                    .unwrap()
                    .spiffe_id
                    .unwrap();
                let mut line = String::new();
                BufReader::new(&mut tls).read_line(&mut line).await.unwrap();
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let verdict = match token::verify(
                    line.trim(),
                    "ledger",
                    Some(&presenter),
                    |t| (t == &td).then_some(&bundle),
                    now,
                ) {
                    Ok(c) => format!("ok {} {}\n", c.act.sub, c.scope),
                    Err(e) => format!("denied: {e}\n"),
                };
                tls.write_all(verdict.as_bytes()).await.unwrap();
                tls.shutdown().await.ok();
            }
        });
        Ledger { addr, roots }
    }

    /// Connects with the SVID in `dir` (as written by `x509 fetch --out`), sends `token`,
    /// returns the ledger's answer.
    async fn present(&self, dir: &Path, token: &str) -> String {
        let pem = |f: &str| std::fs::read(dir.join(f)).unwrap();
        let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
            rustls_pemfile_certs(&pem("svid.pem"));
        let key = rustls_pemfile_key(&pem("svid.key"));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServer(
                server_verifier,
                id("/svc/ledger"),
            )))
            .with_client_auth_cert(chain, key)
            .unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("ledger.invalid").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(format!("{token}\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        BufReader::new(tls).read_line(&mut reply).await.unwrap();
        reply.trim().to_owned()
    }
}

/// The X.509 CAs of the trust domain, as `x509 fetch` wrote them.
fn svid_bundle_cas(d: &Daemon) -> Vec<Vec<u8>> {
    let (code, out, err) = common::cli(&d.socket, &["bundle", "show", "--json"]);
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    let pem = doc[format!("spiffe://{TD}")]["x509_authorities_pem"]
        .as_str()
        .unwrap()
        .to_owned();
    rustls_pemfile_certs(pem.as_bytes())
        .into_iter()
        .map(|c| c.to_vec())
        .collect()
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .map(Result::unwrap)
        .collect()
}

fn rustls_pemfile_key(pem: &[u8]) -> rustls::pki_types::PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(pem).unwrap()
}

/// Checks the server's chain with webpki, then its SPIFFE ID instead of a DNS name.
#[derive(Debug)]
struct SpiffeServer(Arc<rustls::client::WebPkiServerVerifier>, SpiffeId);

impl rustls::client::danger::ServerCertVerifier for SpiffeServer {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        // webpki checks the chain; the name it would check is replaced by the SPIFFE ID.
        let id = agentid::crypto::x509::CertInfo::parse(end_entity)
            .ok()
            .and_then(|c| c.spiffe_id);
        if id.as_ref() != Some(&self.1) {
            return Err(rustls::Error::General(format!(
                "server is {id:?}, not {}",
                self.1
            )));
        }
        let name = rustls::pki_types::ServerName::try_from("ledger.invalid").unwrap();
        match self
            .0
            .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
        {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The documented Python relying party (examples/python/verify_task_token.py, PyJWT) accepts
/// a delegated token from its holder and refuses it from anyone else, edited, unsigned, or
/// when it is a JWT-SVID rather than a task token. Fails, never skips, without PyJWT.
#[test]
fn python_relying_party_verifies_with_pyjwt() {
    require_root();
    let probe = Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .output()
        .expect("python3 runs");
    assert!(
        probe.status.success(),
        "python3 cannot import PyJWT: run `pip install -r tests/requirements.txt` (.ci/run does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let d = start(tmp.path(), "");
    let analyst_id = id("/agent/analyst").to_string();
    let root = ok_token(mint_as(ORCHESTRATOR, &d, "ledger:read ledger:write", &[]));
    let token = ok_token(delegate_as(
        ORCHESTRATOR,
        &d,
        &root,
        &analyst_id,
        "ledger:read",
        &[],
    ));
    let (_, bundles) = own_bundle(&d);
    let doc: Value = serde_json::from_slice(&std::fs::read(bundles).unwrap()).unwrap();
    let jwks = d.dir.join("jwks.json");
    std::fs::write(
        &jwks,
        doc[format!("spiffe://{TD}")]["jwt_authorities"].to_string(),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/verify_task_token.py");
    let run = |token: &str, audience: &str, presenter: &str| {
        let out = Command::new("python3")
            .arg(&script)
            .args(["--jwks", jwks.to_str().unwrap(), "--trust-domain", TD])
            .args(["--audience", audience, "--presenter", presenter, token])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, out, err) = run(&token, "ledger", &analyst_id);
    assert_eq!(code, Some(0), "{err}");
    let claims: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(claims["act"]["sub"], analyst_id);
    assert_eq!(claims["scope"], "ledger:read");

    let refused = |(code, _, err): (Option<i32>, String, String), why: &str| {
        assert_eq!(code, Some(1), "expected a refusal ({why}): {err}");
        assert!(err.contains(why), "expected {why:?}: {err}");
    };
    refused(
        run(&token, "ledger", &id("/agent/orchestrator").to_string()),
        "is not the token's holder",
    );
    refused(
        run(&token, "payroll", &analyst_id),
        "Audience doesn't match",
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims_json: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims_json["scope"] = "ledger:read ledger:write".into();
    let edited = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(claims_json.to_string()),
        parts[2]
    );
    refused(
        run(&edited, "ledger", &analyst_id),
        "Signature verification failed",
    );
    let mut header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    header["alg"] = "none".into();
    let unsigned = format!("{}.{}.", b64.encode(header.to_string()), parts[1]);
    refused(
        run(&unsigned, "ledger", &analyst_id),
        "alg 'none' is not ES256",
    );
    let (ok, svid, err) = cli_as(ANALYST, &d, &["jwt", "fetch", "--audience", "ledger"]);
    assert!(ok, "{err}");
    refused(
        run(svid.trim(), "ledger", &analyst_id),
        "typ 'JWT' is not txntoken+jwt",
    );
}
