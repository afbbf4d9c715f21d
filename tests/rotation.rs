//! Key rotation end to end: `agentid up` with keys that live 20 seconds and are announced 6
//! seconds ahead, watched through the `spiffe` crate's client. An open X.509 stream gets the
//! new CA in its bundle before any SVID the new CA signed; SVIDs from the old CA keep verifying
//! (openssl) against every later bundle until they expire, and the old CA leaves the bundle
//! only then; a JWT-SVID signed before a JWT key rotation still validates after it; every step
//! is in the audit log.

mod common;
mod conformance;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Daemon;
use conformance::{TD, jws_json, parse_cert, pem_certs, signed_by};
use futures::StreamExt;

/// CA and JWT key: 20 s each, so a key signs for about 10 s and the old CA stays about 10 s
/// more; each new key is in the bundle 6 s (3 refresh hints) before it signs.
const FLAGS: &[&str] = &[
    "--ca-ttl",
    "20s",
    "--jwt-key-ttl",
    "20s",
    "--rotation-prepare-ahead",
    "6s",
    "--bundle-refresh-hint",
    "2s",
];

/// Fails the test (never skips) when the openssl CLI is missing.
fn require_openssl() {
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test needs the openssl CLI (apt-get install openssl)"
    );
}

/// `openssl verify -x509_strict` of `leaf` against the CAs in `bundle`.
fn openssl_verifies(dir: &std::path::Path, bundle: &[Vec<u8>], leaf: &[u8]) -> (bool, String) {
    let (b, l) = (dir.join("bundle.pem"), dir.join("leaf.pem"));
    std::fs::write(&b, pem_certs(bundle)).unwrap();
    std::fs::write(&l, pem_certs(&[leaf.to_vec()])).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(&b)
        .arg(&l)
        .output()
        .expect("run openssl");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn kid(token: &str) -> String {
    jws_json(token.split('.').next().unwrap())["kid"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// An SVID seen on the stream: its leaf, expiry and the CA (index into `cas`) that signed it.
struct Leaf {
    der: Vec<u8>,
    not_after: i64,
    ca: usize,
}

/// Fetches a JWT-SVID, then new ones (fresh audiences, so the node's cache does not answer)
/// until one carries another `kid`; checks that the first still validates after that.
/// Returns the first token.
async fn jwt_key_rotation(endpoint: String) -> String {
    let c = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let before = c.fetch_jwt_token(["before"], None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    let (after, aud) = loop {
        assert!(Instant::now() < deadline, "no JWT key rotation within 30 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
        n += 1;
        let aud = format!("after-{n}");
        let token = c.fetch_jwt_token([aud.as_str()], None).await.unwrap();
        if kid(&token) != kid(&before) {
            break (token, aud);
        }
    };
    c.validate_jwt_token("before", &before)
        .await
        .expect("a JWT-SVID signed before the rotation validates after it");
    c.validate_jwt_token(&aud, &after)
        .await
        .expect("the new key's JWT-SVID validates");
    before
}

#[tokio::test]
async fn cas_and_jwt_keys_rotate_under_an_open_stream() {
    require_openssl();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(&tmp.path().join("d"), FLAGS);
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(d.endpoint())
        .await
        .unwrap();
    let jwt = tokio::spawn(jwt_key_rotation(d.endpoint()));
    let mut stream = client.stream_x509_contexts().await.unwrap();

    // Every CA seen, in order of first appearance; per message the bundle (as indexes) and
    // the CA that signed its SVID.
    let mut cas: Vec<Vec<u8>> = Vec::new();
    let mut leaves: Vec<Leaf> = Vec::new();
    let mut messages: Vec<(Vec<usize>, usize)> = Vec::new();
    let mut old_checked_after_switch = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    let retired_at = loop {
        let ctx = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .unwrap_or_else(|_| panic!("the first CA was not retired within 40 s"))
            .expect("stream open")
            .expect("X.509 context");
        let bundle: Vec<Vec<u8>> = ctx
            .bundle_set()
            .get(&td)
            .expect("own bundle")
            .authorities()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        for ca in &bundle {
            if !cas.contains(ca) {
                cas.push(ca.clone());
            }
        }
        let index = |der: &Vec<u8>| cas.iter().position(|c| c == der).unwrap();
        let leaf = ctx.default_svid().unwrap().leaf().as_bytes().to_vec();
        let cert = parse_cert(&leaf);
        // Every message's SVID is signed by a CA in that message's bundle.
        let signer = bundle
            .iter()
            .find(|ca| signed_by(&cert, &parse_cert(ca)))
            .unwrap_or_else(|| panic!("message {}: SVID not signed by its bundle", messages.len()));
        let signer = index(signer);
        if !leaves.iter().any(|l| l.der == leaf) {
            leaves.push(Leaf {
                not_after: cert.validity().not_after.timestamp(),
                der: leaf.clone(),
                ca: signer,
            });
        }
        // Every SVID seen so far that is still valid verifies against this bundle.
        for l in leaves.iter().filter(|l| l.not_after > unix_now() + 2) {
            let (ok, out) = openssl_verifies(tmp.path(), &bundle, &l.der);
            assert!(
                ok,
                "message {}: an SVID from CA {} fails against the bundle: {out}",
                messages.len(),
                l.ca
            );
            if l.ca < signer {
                old_checked_after_switch += 1;
            }
        }
        messages.push((bundle.iter().map(index).collect(), signer));
        if !bundle.contains(&cas[0]) {
            break unix_now();
        }
    };

    // In order: the next CA in the bundle while the SVID is still the old CA's, then (in a
    // later message) an SVID signed by the next CA.
    assert!(cas.len() >= 2, "{} CAs seen", cas.len());
    let announced = messages
        .iter()
        .position(|(b, _)| b.contains(&1))
        .expect("a bundle with the second CA");
    assert_eq!(messages[announced].1, 0, "announced while the old CA signs");
    let switched = messages
        .iter()
        .position(|(_, s)| *s == 1)
        .expect("an SVID signed by the second CA");
    assert!(announced < switched, "{messages:?}");
    assert!(
        old_checked_after_switch > 0,
        "old SVIDs were checked against bundles sent after the switch: {messages:?}"
    );
    // The first CA left the bundle only once everything it signed had expired.
    for l in leaves.iter().filter(|l| l.ca == 0) {
        assert!(
            l.not_after <= retired_at,
            "retired before an SVID of it expired"
        );
    }

    let before = jwt.await.unwrap();
    client
        .validate_jwt_token("before", &before)
        .await
        .expect("the old JWT key stays trusted for as long as its tokens can live");

    // The audit trail has each step, as bundle_updated records.
    let wanted = [
        "prepared next CA sha256:",
        "activated CA sha256:",
        "retired CA sha256:",
        "prepared next JWT key ",
        "activated JWT key ",
    ];
    let audit = d.state.join("audit.log");
    let mut missing = Vec::new();
    for _ in 0..40 {
        let log = std::fs::read_to_string(&audit).unwrap();
        let updates: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("\"dev.agentid.bundle_updated\""))
            .collect();
        missing = wanted
            .iter()
            .filter(|w| !updates.iter().any(|l| l.contains(*w)))
            .collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(missing.is_empty(), "no audit record for {missing:?}");
    let (code, out, err) = common::cli(&d.socket, &["audit", "verify", audit.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A prepare-ahead shorter than 3 refresh hints is a configuration error (exit 64).
#[test]
fn a_key_announced_too_briefly_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, err) = conformance::start_fails(
        tmp.path(),
        &[
            "--rotation-prepare-ahead",
            "5s",
            "--bundle-refresh-hint",
            "2s",
        ],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--rotation-prepare-ahead"), "{err}");
}
