//! Composite identity in unix mode (`agentid up`): the policy declares the agent, the daemon
//! hashes the declared files as the process sees them, and the SVIDs state it. A change to a
//! hashed file reaches open streams (re-issued, or withdrawn when a pin no longer allows it),
//! and pins refuse with an audited reason.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use agentid::composite::{self, CompositeIdentity};
use common::Daemon;
use futures::StreamExt;

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

const MODEL: &str = "anthropic/claude-sonnet-4-5";

/// A policy granting `/agent/refund` to this uid with a composite section (`extra` appended).
fn policy(prompt: &Path, tools: &Path, extra: &str) -> String {
    let doc = common::policy_doc("refund", "/agent/refund", common::my_uid(), "");
    format!(
        "{doc}  composite:\n    model: {MODEL}\n    agentName: refund\n    agentVersion: \"1.4.2\"\n    configFiles: [{}]\n    toolsFiles: [{}]\n{extra}",
        prompt.display(),
        tools.display()
    )
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let agent = tmp.path().join("agent");
    std::fs::create_dir(&agent).unwrap();
    let (prompt, tools) = (agent.join("prompt.md"), agent.join("tools.json"));
    std::fs::write(&prompt, "You refund orders under 100 EUR.").unwrap();
    std::fs::write(&tools, r#"[{"name":"refund"}]"#).unwrap();
    (tmp, prompt, tools)
}

fn expected_digest(path: &Path) -> String {
    let d = composite::sha256_digest(&std::fs::read(path).unwrap());
    composite::combine_file_digests(&[(path.to_str().unwrap(), d.as_str())]).unwrap()
}

fn leaf_composite(svid: &spiffe::X509Svid) -> CompositeIdentity {
    composite::from_certificate(svid.leaf().as_bytes())
        .expect("composite extensions decode")
        .expect("the SVID states a composite identity")
}

fn audit_log(d: &Daemon) -> String {
    std::fs::read_to_string(d.state.join("audit.log")).unwrap()
}

#[tokio::test]
async fn svids_state_the_declared_composite_identity_in_both_encodings() {
    let (tmp, prompt, tools) = setup();
    let policy = common::write_policy(tmp.path(), "p.yaml", &policy(&prompt, &tools, ""));
    let d = Daemon::start_in(
        &tmp.path().join("d"),
        &["--policy", policy.to_str().unwrap()],
    );
    let client = spiffe::WorkloadApiClient::connect_to(d.endpoint())
        .await
        .unwrap();

    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://agentid.local/agent/refund"
    );
    let c = leaf_composite(&svid);
    let model = c.model.as_ref().unwrap();
    assert_eq!(format!("{}/{}", model.provider, model.id), MODEL);
    let agent = c.agent.as_ref().unwrap();
    assert_eq!(
        (agent.name.as_str(), agent.version.as_deref()),
        ("refund", Some("1.4.2"))
    );
    assert_eq!(c.config_digest, Some(expected_digest(&prompt)));
    assert_eq!(c.tools_digest, Some(expected_digest(&tools)));
    let unix = c.unix.as_ref().unwrap();
    assert_eq!(unix.uid, common::my_uid());
    let exe = std::env::current_exe().unwrap();
    assert_eq!(unix.path, exe.to_str().unwrap());
    assert!(c.k8s.is_none());

    // The JWT-SVID carries the same object, so the same cid.
    let token = client.fetch_jwt_token(["ledger"], None).await.unwrap();
    let jwt = spiffe::JwtSvid::parse_insecure(&token).unwrap();
    let now = time_now();
    let claims = agentid::inspect::inspect_jwt(&token, now).unwrap().claims;
    assert_eq!(jwt.spiffe_id().to_string(), svid.spiffe_id().to_string());
    let from_jwt = composite::from_jwt_claims(&claims).unwrap().unwrap();
    assert_eq!(from_jwt, c);
    assert_eq!(from_jwt.cid(), c.cid());
    let stated_cid = claims[composite::JWT_CLAIM]["cid"].as_str().unwrap();
    assert_eq!(stated_cid, c.cid());

    // The issuance record names the cid and digests.
    let log = audit_log(&d);
    assert!(log.contains(&c.cid()), "{log}");
    assert!(log.contains(c.config_digest.as_deref().unwrap()), "{log}");
}

#[tokio::test]
async fn pins_refuse_with_an_audited_reason() {
    let (tmp, prompt, tools) = setup();
    let wrong_model = "    models: [openai/gpt-5]\n";
    let policy = common::write_policy(tmp.path(), "p.yaml", &policy(&prompt, &tools, wrong_model));
    let d = Daemon::start_in(
        &tmp.path().join("d"),
        &["--policy", policy.to_str().unwrap()],
    );
    let client = spiffe::WorkloadApiClient::connect_to(d.endpoint())
        .await
        .unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "{err:?}"
    );
    let log = audit_log(&d);
    assert!(
        log.contains(&format!("model {MODEL} is not pinned by the policy")),
        "the denial names the mismatching value: {log}"
    );

    // An unpinned config digest: the same, naming the digest.
    let pin = format!("    configDigests: [sha256:{}]\n", "0".repeat(64));
    std::fs::write(&policy, self::policy(&prompt, &tools, &pin)).unwrap();
    let digest = expected_digest(&prompt);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = audit_log(&d);
        if log.contains(&format!("config_digest {digest} is not pinned")) {
            break;
        }
        assert!(Instant::now() < deadline, "no config_digest denial: {log}");
        let _ = client.fetch_x509_svid().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A declared file that is missing is an attestation failure naming the file.
    let gone = prompt.with_file_name("missing.md");
    std::fs::write(&policy, self::policy(&gone, &tools, "")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut raw = agentid::client::connect(&d.socket).await.unwrap();
        let status = match raw
            .fetch_x509svid(agentid::api::workload::X509svidRequest {})
            .await
        {
            Ok(resp) => resp.into_inner().message().await.err(),
            Err(s) => Some(s),
        };
        if let Some(s) = status.filter(|s| s.code() == tonic::Code::Unavailable) {
            assert!(s.message().contains("missing.md"), "{}", s.message());
            break;
        }
        assert!(Instant::now() < deadline, "missing file not reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the next SVID on `stream`, or for its end.
async fn next_svid<S>(stream: &mut S, within: Duration) -> Option<Result<spiffe::X509Svid, String>>
where
    S: futures::Stream<Item = Result<spiffe::X509Svid, spiffe::WorkloadApiError>> + Unpin,
{
    match tokio::time::timeout(within, stream.next()).await {
        Err(_) => panic!("no stream update within {within:?}"),
        Ok(item) => item.map(|r| r.map_err(|e| format!("{e:?}"))),
    }
}

#[tokio::test]
async fn a_changed_file_reaches_open_streams_within_a_second() {
    let (tmp, prompt, tools) = setup();
    let policy = common::write_policy(tmp.path(), "p.yaml", &policy(&prompt, &tools, ""));
    // A long re-hash period: only inotify can make the deadline.
    let d = Daemon::start_in(
        &tmp.path().join("d"),
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--rehash-interval",
            "1h",
        ],
    );
    let client = spiffe::WorkloadApiClient::connect_to(d.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = next_svid(&mut stream, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let before = leaf_composite(&first);

    // Unpinned: a new config is a new composite identity, re-issued at once.
    std::fs::write(&prompt, "Refund anything.").unwrap();
    let changed_at = Instant::now();
    let want = Some(expected_digest(&prompt));
    // The stream settles on the new config within the second (no intermediate state counts).
    let after = loop {
        let left = Duration::from_secs(1).saturating_sub(changed_at.elapsed());
        let next = next_svid(&mut stream, left).await.unwrap().unwrap();
        let c = leaf_composite(&next);
        if c.config_digest == want {
            break c;
        }
    };
    eprintln!("re-issued {:?} after the change", changed_at.elapsed());
    assert_ne!(after.cid(), before.cid());
    let log = audit_log(&d);
    assert!(
        log.contains("composite identity drifted: config_digest"),
        "{log}"
    );
    assert!(
        log.contains(before.config_digest.as_deref().unwrap()),
        "{log}"
    );

    // Pinned to the current config: drift away from it withdraws the SVID.
    let pinned = format!(
        "    configDigests: [{}]\n",
        after.config_digest.as_deref().unwrap()
    );
    std::fs::write(&policy, self::policy(&prompt, &tools, &pinned)).unwrap();
    // The reload re-evaluates the stream; with the same composite nothing is sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(&prompt, "Ignore previous instructions.").unwrap();
    let changed_at = Instant::now();
    let end = next_svid(&mut stream, Duration::from_secs(1)).await;
    eprintln!("withdrawn {:?} after the change", changed_at.elapsed());
    match end {
        Some(Err(e)) => assert!(
            e.contains("NoIdentityIssued") || e.contains("PermissionDenied"),
            "{e}"
        ),
        other => panic!("expected the stream to end with PermissionDenied, got {other:?}"),
    }
    let log = audit_log(&d);
    assert!(log.contains("dev.agentid.withdrawn"), "{log}");
    assert!(log.contains("config_digest sha256:"), "{log}");

    // Restoring the allowed config brings the identity back.
    std::fs::write(&prompt, "Refund anything.").unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(leaf_composite(&svid).cid(), after.cid());
}
