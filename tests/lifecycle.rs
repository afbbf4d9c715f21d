//! Daemon lifecycle against the real binary: state survives a restart (same bundles, earlier
//! SVIDs and JWTs still validate), SIGTERM exits cleanly and removes the socket even with open
//! streams, open streams receive rotated SVIDs in real time with the complete state in every
//! message, and a process matched by several policies gets several identities in a stable order.

mod common;
mod lifecycle_support;

use std::time::SystemTime;

use agentid::api::workload as pb;
use common::{Daemon, my_uid, policy_doc, write_policy};
use lifecycle_support::*;

const TD_ID: &str = "spiffe://agentid.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_same_state_keeps_bundles_and_earlier_credentials_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut d = Daemon::start_in(dir, &[]);

    let (x509_bundle, jwt_bundle) = fetch_bundles(&d.socket, TD_ID).await;
    let before = fetch_x509(&d.socket)
        .await
        .expect("X509-SVID before restart");
    let old_svid = before.svids[0].clone();
    let token = fetch_jwt(&d.socket, "persist", "")
        .await
        .expect("JWT-SVID before restart")
        .svids[0]
        .svid
        .clone();

    assert!(
        d.stop(),
        "SIGTERM must end `agentid up` with exit 0; stderr:\n{}",
        d.stderr()
    );
    assert!(
        !d.socket.exists(),
        "socket file {} left behind after a clean stop",
        d.socket.display()
    );

    // State on disk: private directories, private key files.
    assert_eq!(
        mode(&d.state),
        0o700,
        "state directory {}",
        d.state.display()
    );
    let authority = d.state.join("authority");
    assert_eq!(mode(&authority), 0o700, "{}", authority.display());
    // The CA and JWT keys live in one state document; every file there is private.
    let state = std::fs::read_to_string(authority.join("keys.json")).unwrap();
    assert_eq!(
        state.matches("PRIVATE KEY-----").count(),
        2 * 2,
        "CA and JWT key"
    );
    for f in std::fs::read_dir(&authority).unwrap() {
        let f = f.unwrap().path();
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    assert_eq!(mode(&d.state.join("audit.log")), 0o600, "audit log");

    let d2 = Daemon::start_in(dir, &[]);
    let (x509_after, jwt_after) = fetch_bundles(&d2.socket, TD_ID).await;
    assert!(
        x509_after == x509_bundle,
        "X.509 bundle changed across a restart"
    );
    assert_eq!(jwt_after, jwt_bundle, "JWT bundle changed across a restart");

    // The SVID issued by the first process chains to the bundle served by the second.
    let svid_pem = dir.join("old-svid.pem");
    let bundle_pem = dir.join("new-bundle.pem");
    write_pem(&svid_pem, &old_svid.x509_svid);
    write_pem(&bundle_pem, &x509_after);
    let (ok, out) = openssl_verify(&bundle_pem, &svid_pem);
    assert!(
        ok,
        "SVID from before the restart does not verify against the bundle after it: {out}"
    );
    assert_eq!(
        old_svid.bundle, x509_after,
        "bundle inside the old X509-SVID response"
    );

    // The JWT-SVID from before the restart validates through the restarted daemon…
    let id = validate_jwt(&d2.socket, "persist", &token)
        .await
        .expect("JWT-SVID from before the restart must still validate");
    assert_eq!(id, old_svid.spiffe_id);
    // …and the check is real: a token with a changed signature does not.
    let mut forged = token.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let err = validate_jwt(&d2.socket, "persist", std::str::from_utf8(&forged).unwrap())
        .await
        .expect_err("a token with a changed signature must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_streams_exits_cleanly_and_removes_the_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_in(tmp.path(), &[]);
    // Real clients keep their streams open for as long as they run (WA §4.2).
    let (mut stream, _) = open_x509_stream(&d.socket).await;
    let mut bundles = connect(&d.socket)
        .await
        .fetch_jwt_bundles(pb::JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    bundles.message().await.unwrap().unwrap();
    // So does anyone watching gRPC health.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(uds_channel(&d.socket).await)
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("grpc.health.v1.Health/Watch")
            .into_inner();
    let status = health.message().await.unwrap().unwrap().status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let socket = d.socket.clone();
    let (clean, stderr) = tokio::task::spawn_blocking(move || (d.stop(), d.stderr()))
        .await
        .unwrap();
    assert!(
        clean,
        "SIGTERM with open streams must still exit 0 within 5 s; stderr:\n{stderr}"
    );
    assert!(!socket.exists(), "socket file left behind");
    // The client sees its stream end instead of hanging.
    match next_within(&mut stream, EVENT).await {
        Some(Ok(Some(m))) => panic!("unexpected message after shutdown: {:?}", ids(&m)),
        Some(_) => {}
        None => panic!("open stream still hanging 5 s after the daemon exited"),
    }
}

fn rotating_policies() -> String {
    let uid = my_uid();
    [
        policy_doc("rot-a", "/agent/rot-a", uid, "  x509TTL: 4s\n"),
        policy_doc("rot-b", "/agent/rot-b", uid, "  x509TTL: 4s\n"),
    ]
    .join("---\n")
}

/// Waits on `stream` until every SVID of `current` has been replaced, which must happen before
/// the earliest of them expires. Every message must carry the complete state (`want_ids`).
/// Returns the newest message.
async fn wait_for_rotation(
    d: &Daemon,
    stream: &mut tonic::Streaming<pb::X509svidResponse>,
    current: &pb::X509svidResponse,
    want_ids: &[String],
    cycle: usize,
) -> pb::X509svidResponse {
    let old_serials = serials(current);
    let expiry = current
        .svids
        .iter()
        .map(|s| leaf(s).not_after)
        .min()
        .unwrap();
    let mut rotated = vec![false; old_serials.len()];
    let mut messages = 0;
    loop {
        let left = expiry.duration_since(SystemTime::now()).unwrap_or_else(|_| {
            panic!(
                "cycle {cycle}: SVIDs expired after {messages} new message(s) without all rotating (rotated: {rotated:?}); stderr:\n{}",
                d.stderr()
            )
        });
        let msg = match next_within(stream, left).await {
            Some(Ok(Some(m))) => m,
            Some(other) => panic!("cycle {cycle}: stream ended or failed: {other:?}"),
            None => panic!(
                "cycle {cycle}: no rotated SVID before the previous ones expired ({messages} message(s), rotated: {rotated:?}); stderr:\n{}",
                d.stderr()
            ),
        };
        messages += 1;
        assert_eq!(
            ids(&msg),
            want_ids,
            "cycle {cycle} message {messages}: complete state"
        );
        for (i, s) in msg.svids.iter().enumerate() {
            assert!(
                !s.x509_svid_key.is_empty() && !s.bundle.is_empty(),
                "cycle {cycle} message {messages}: SVID {i} incomplete"
            );
            let info = leaf(s);
            if info.serial_hex != old_serials[i] {
                rotated[i] = true;
            }
        }
        if rotated.iter().all(|r| *r) {
            return msg;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_open_stream_receives_every_rotation_with_complete_state() {
    let tmp = tempfile::tempdir().unwrap();
    let pol = write_policy(
        &subdir(tmp.path(), "policies"),
        "rot.yaml",
        &rotating_policies(),
    );
    let d = Daemon::start_in(tmp.path(), &["--policy", pol.to_str().unwrap()]);
    let want_ids = vec![
        "spiffe://agentid.local/agent/rot-a".to_owned(),
        "spiffe://agentid.local/agent/rot-b".to_owned(),
    ];

    // The only client: nothing but the stream itself keeps the SVIDs in use.
    let (mut stream, first) = open_x509_stream(&d.socket).await;
    assert_eq!(ids(&first), want_ids);
    let lifetime = secs_until(leaf(&first.svids[0]).not_after);
    assert!(
        lifetime > 1.0 && lifetime <= 4.0,
        "x509TTL 4s gave {lifetime:.1} s"
    );

    // Two cycles: the first rotation, and the rotation of the rotated SVIDs.
    let second = wait_for_rotation(&d, &mut stream, &first, &want_ids, 1).await;
    wait_for_rotation(&d, &mut stream, &second, &want_ids, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_source_follows_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let pol = write_policy(
        &subdir(tmp.path(), "policies"),
        "rot.yaml",
        &rotating_policies(),
    );
    let d = Daemon::start_in(tmp.path(), &["--policy", pol.to_str().unwrap()]);
    let source = spiffe::X509Source::builder()
        .endpoint(d.endpoint())
        .build()
        .await
        .expect("X509Source");
    let current = |s: &spiffe::X509Source| {
        let svid = s.svid().expect("X509Source has an SVID");
        assert_eq!(
            svid.spiffe_id().to_string(),
            "spiffe://agentid.local/agent/rot-a"
        );
        agentid::crypto::x509::CertInfo::parse(svid.cert_chain()[0].as_bytes()).unwrap()
    };
    let mut svid = current(&source);
    for cycle in 1..=2 {
        let left = svid
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let next = eventually(left, || {
            let now = current(&source);
            (now.serial_hex != svid.serial_hex).then_some(now)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "cycle {cycle}: X509Source still holds serial {} at its expiry; stderr:\n{}",
                svid.serial_hex,
                d.stderr()
            )
        });
        svid = next;
    }
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_policies_give_several_identities_in_file_order() {
    let tmp = tempfile::tempdir().unwrap();
    let uid = my_uid();
    let pdir = subdir(tmp.path(), "policies");
    // Files are read in path order and documents in file order; names are deliberately
    // not in alphabetical order.
    write_policy(
        &pdir,
        "10-first.yaml",
        &[
            policy_doc("zeta-agent", "/agent/zeta", uid, ""),
            policy_doc("alpha-agent", "/agent/alpha", uid, ""),
        ]
        .join("---\n"),
    );
    write_policy(
        &pdir,
        "20-second.yaml",
        &[
            // Same hint as zeta-agent: dropped for this caller.
            policy_doc("dup-hint", "/agent/dup", uid, "")
                .replace("hint: dup-hint", "hint: zeta-agent"),
            policy_doc("someone-else", "/agent/else", 65534, ""),
        ]
        .join("---\n"),
    );
    let d = Daemon::start_in(tmp.path(), &["--policy", pdir.to_str().unwrap()]);
    let want = vec![
        "spiffe://agentid.local/agent/zeta".to_owned(),
        "spiffe://agentid.local/agent/alpha".to_owned(),
    ];

    for round in 0..3 {
        let msg = fetch_x509(&d.socket).await.unwrap();
        assert_eq!(ids(&msg), want, "round {round}: order must be stable");
        let hints: Vec<&str> = msg.svids.iter().map(|s| s.hint.as_str()).collect();
        assert_eq!(hints, ["zeta-agent", "alpha-agent"], "round {round}");
        for s in &msg.svids {
            assert_eq!(
                leaf(s).spiffe_id.map(|i| i.to_string()).as_deref(),
                Some(s.spiffe_id.as_str())
            );
        }
    }

    // JWT: every identity by default, only the named one with spiffe_id.
    let all = fetch_jwt(&d.socket, "a", "").await.unwrap();
    let all_ids: Vec<_> = all.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    assert_eq!(all_ids, want);
    let one = fetch_jwt(&d.socket, "a", &want[1]).await.unwrap();
    assert_eq!(one.svids.len(), 1, "spiffe_id set: exactly one JWT-SVID");
    assert_eq!(one.svids[0].spiffe_id, want[1]);
    assert_eq!(one.svids[0].hint, "alpha-agent");
    let sub = validate_jwt(&d.socket, "a", &one.svids[0].svid)
        .await
        .unwrap();
    assert_eq!(sub, want[1], "the token is for the requested identity");
    // An identity the caller is not entitled to (the dropped duplicate) is refused.
    let err = fetch_jwt(&d.socket, "a", "spiffe://agentid.local/agent/dup")
        .await
        .expect_err("not entitled");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("no identity issued"), "{err:?}");

    // The spiffe crate sees the same default identity.
    let client = spiffe::WorkloadApiClient::connect_to(d.endpoint())
        .await
        .unwrap();
    let default = client.fetch_x509_svid().await.unwrap();
    assert_eq!(default.spiffe_id().to_string(), want[0]);
}
