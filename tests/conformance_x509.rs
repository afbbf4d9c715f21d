//! Conformance, SPIFFE-CONFORMANCE.md section 1 (SPIFFE ID) and section 2 (X509-SVID), plus
//! the FetchX509SVID / FetchX509Bundles rows of section 4.5. Everything runs against the real
//! `agentid up` binary; issued certificates are checked field by field with x509-parser and
//! verified by two independent verifiers, `openssl verify` and rustls/webpki in a real mTLS
//! handshake between two workloads.

mod common;
mod conformance;

use std::process::Command;
use std::time::Duration;

use agentid::api::workload::{
    JwtsvidRequest, X509BundlesRequest, X509svidRequest, X509svidResponse,
};
use common::{Daemon, my_uid};
use conformance::*;
use tonic::Code;

/// The first message of FetchX509SVID, over the raw client.
async fn x509_response(d: &Daemon) -> X509svidResponse {
    let mut c = client(d).await;
    c.fetch_x509svid(X509svidRequest {})
        .await
        .expect("FetchX509SVID")
        .into_inner()
        .message()
        .await
        .expect("first message")
        .expect("stream not empty")
}

/// ID-01..ID-17: what the daemon accepts and refuses as a SPIFFE ID or trust domain, on every
/// surface that takes one (FetchJWTSVID.spiffe_id, policy templates, --trust-domain), and that
/// the ID is inside the signed part of the SVID.
#[tokio::test]
async fn spiffe_id_rules_id_01_to_id_17() {
    let tmp = tempfile::tempdir().unwrap();
    let uid = my_uid();
    // ID-12: a 2048-byte ID must be supported end to end.
    let long_path = format!(
        "/long/{}",
        "a".repeat(2048 - format!("spiffe://{TD}/long/").len())
    );
    let long_id = format!("spiffe://{TD}{long_path}");
    assert_eq!(long_id.len(), 2048);
    let d = start_with(
        &tmp.path().join("a"),
        &[
            policy("short", "/agent/a", uid, ""),
            policy("long", &long_path, uid, ""),
        ],
        &[],
    );
    let mut c = client(&d).await;
    let jwt_for = |id: &str| JwtsvidRequest {
        audience: vec!["aud".into()],
        spiffe_id: id.into(),
    };

    // Malformed IDs are refused as InvalidArgument (J-02), whatever rule they break.
    let too_long = format!("{long_id}b"); // ID-13: 2049 bytes
    let long_td = format!("spiffe://{}/a", "a".repeat(256)); // ID-14
    let bad: Vec<(&str, &str)> = vec![
        ("ID-01 scheme", "http://agentid.local/a"),
        ("ID-01 no scheme", "agentid.local/a"),
        ("ID-01/03 no trust domain", "spiffe:///a"),
        ("ID-03 empty", "spiffe://"),
        ("ID-02 query", "spiffe://agentid.local/a?x=1"),
        ("ID-02 fragment", "spiffe://agentid.local/a#f"),
        ("ID-04 userinfo", "spiffe://u@agentid.local/a"),
        ("ID-04 port", "spiffe://agentid.local:8080/a"),
        ("ID-05 upper-case TD", "spiffe://Agentid.local/a"),
        ("ID-05 bad TD char", "spiffe://t$d/a"),
        ("ID-06 percent in TD", "spiffe://t%41d/a"),
        ("ID-07 IPv6 TD", "spiffe://[::1]/a"),
        ("ID-08 percent in path", "spiffe://agentid.local/a%41"),
        ("ID-09 empty segment", "spiffe://agentid.local/a//b"),
        ("ID-09 dot segment", "spiffe://agentid.local/a/./b"),
        ("ID-09 dot-dot segment", "spiffe://agentid.local/a/../b"),
        ("ID-10 trailing slash", "spiffe://agentid.local/a/"),
        ("ID-10 root with slash", "spiffe://agentid.local/"),
        ("ID-11 bad path char", "spiffe://agentid.local/a!b"),
        ("ID-13 2049 bytes", &too_long),
        ("ID-14 256-byte TD", &long_td),
        ("ID-15/G-1 upper-case scheme", "SPIFFE://agentid.local/a"),
    ];
    for (rule, id) in &bad {
        let s = expect_err(c.fetch_jwtsvid(jwt_for(id)).await, rule);
        assert_status(&s, Code::InvalidArgument, None, rule);
        assert!(s.message().contains("invalid spiffe_id"), "{rule}: {s:?}");
    }

    // Well-formed IDs the caller is not entitled to parse fine and are refused as
    // PermissionDenied, not InvalidArgument.
    let other_long = format!(
        "spiffe://{TD}/b{}",
        "b".repeat(2048 - format!("spiffe://{TD}/b").len())
    );
    let fine: Vec<(&str, &str)> = vec![
        ("ID-07 dotted-quad TD", "spiffe://10.0.0.1/a"),
        (
            "ID-11 all path characters",
            "spiffe://agentid.local/Ab-1_.x",
        ),
        (
            "ID-15 path is case-sensitive",
            "spiffe://agentid.local/agent/A",
        ),
        ("ID-12 2048 bytes", &other_long),
        ("root ID", "spiffe://agentid.local"),
    ];
    for (rule, id) in &fine {
        let s = expect_err(c.fetch_jwtsvid(jwt_for(id)).await, rule);
        assert_status(&s, Code::PermissionDenied, Some("no identity issued"), rule);
    }

    // ID-12: the 2048-byte identity is issued as an X509-SVID and a JWT-SVID, and a real
    // client parses both.
    let sc = spiffe_client(&d).await;
    let svids = sc
        .fetch_all_x509_svids()
        .await
        .expect("fetch all X509-SVIDs");
    let long = svids
        .iter()
        .find(|s| s.spiffe_id().to_string() == long_id)
        .expect("ID-12: the 2048-byte identity is issued");
    let bundle = sc.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let ca = bundle.get(&td).expect("own bundle").authorities()[0]
        .as_bytes()
        .to_vec();
    check_leaf(
        long.leaf().as_bytes(),
        long.private_key().as_bytes(),
        &ca,
        &long_id,
    );
    let long_sid = spiffe::SpiffeId::new(&long_id).unwrap();
    let jwt = sc
        .fetch_jwt_svid(["aud"], Some(&long_sid))
        .await
        .expect("ID-12 JWT-SVID");
    assert_eq!(jwt.spiffe_id().to_string(), long_id);

    // ID-16: the signing authority's own ID is the trust domain's root ID.
    check_ca(&ca, TD);

    // ID-17: the ID is inside the signed part: change one byte of it and the CA's signature
    // no longer verifies.
    let short = svids
        .iter()
        .find(|s| s.spiffe_id().path() == "/agent/a")
        .unwrap();
    let mut der = short.leaf().as_bytes().to_vec();
    let needle = b"/agent/a";
    let at = der
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("ID bytes in the DER");
    der[at + needle.len() - 1] = b'b';
    let edited = parse_cert(&der);
    assert_eq!(uri_sans(&edited).0, [format!("spiffe://{TD}/agent/b")]);
    assert!(signed_by(
        &parse_cert(short.leaf().as_bytes()),
        &parse_cert(&ca)
    ));
    assert!(
        !signed_by(&edited, &parse_cert(&ca)),
        "ID-17: an edited ID breaks the signature"
    );

    // ID-13: a policy that would generate a 2049-byte ID is refused when it loads.
    let refused_dir = tmp.path().join("too-long");
    let file = write_policies(
        &refused_dir,
        &[policy("toolong", &format!("{long_path}b"), uid, "")],
    );
    let (code, err) = start_fails(&refused_dir, &["--policy", file.to_str().unwrap()]);
    assert_eq!(code, Some(64), "ID-13: configuration error: {err}");
    assert!(
        err.contains("spec.spiffeID") && err.contains("2048"),
        "ID-13: {err}"
    );

    // ID-05, ID-06, ID-14: invalid trust domain names are refused by `agentid up`.
    let long_name = "a".repeat(256);
    for td in [
        "Example.org",
        "t$d",
        "t%41d",
        "td:8080",
        "u@td",
        "[::1]",
        long_name.as_str(),
    ] {
        let (_, err) = start_fails(&tmp.path().join("bad-td"), &["--trust-domain", td]);
        assert!(err.contains("--trust-domain"), "trust domain {td:?}: {err}");
    }

    // ID-07: a dotted-quad IPv4 trust domain is an ordinary trust domain.
    let ip = Daemon::start_in(&tmp.path().join("ip"), &["--trust-domain", "10.0.0.1"]);
    let svid = spiffe_client(&ip)
        .await
        .fetch_x509_svid()
        .await
        .expect("ID-07: SVID in 10.0.0.1");
    assert_eq!(svid.spiffe_id().trust_domain().to_string(), "10.0.0.1");
    let ip_bundle = x509_response(&ip).await.svids[0].bundle.clone();
    check_ca(&ip_bundle, "10.0.0.1");
}

/// X5-01..X5-15: every field of an issued leaf X509-SVID, and X5-03 (no root-ID leaf).
#[tokio::test]
async fn leaf_svid_fields_x5_01_to_x5_15() {
    let tmp = tempfile::tempdir().unwrap();
    let id = format!("spiffe://{TD}/agent/leaf");
    let d = start_with(
        tmp.path(),
        &[policy("leaf", "/agent/leaf", my_uid(), "  x509TTL: 10m\n")],
        &[],
    );
    let before = now();
    let resp = x509_response(&d).await;
    let after = now();
    assert_eq!(resp.svids.len(), 1);
    let s = &resp.svids[0];
    let chain = split_der(&s.x509_svid);
    let cas = split_der(&s.bundle);
    let (not_before, not_after) = check_leaf(&chain[0], &s.x509_svid_key, &cas[0], &id);

    // X5-14: the lifetime is the policy's x509TTL (10 min), counted from issuance, and the
    // start is back-dated by a few seconds for clock skew.
    assert!(
        (before + 600 - 1..=after + 600).contains(&not_after),
        "X5-14: notAfter {not_after} is issuance + 10m ({before}..{after})"
    );
    assert!(
        (before - 120..=before - 5).contains(&not_before),
        "X5-14: notBefore {not_before} back-dated a little before {before}"
    );

    // X5-12 (INTEROP): the rust client validates the leaf (BC, KU, one URI SAN, non-root
    // path) and the key, and sees the same certificate.
    let svid = spiffe_client(&d)
        .await
        .fetch_x509_svid()
        .await
        .expect("rust client accepts the SVID");
    assert_eq!(svid.spiffe_id().to_string(), id);
    assert_eq!(svid.leaf().as_bytes(), chain[0].as_slice());
    assert_eq!(svid.private_key().as_bytes(), &s.x509_svid_key[..]);

    // X5-03: a policy whose ID is the trust domain's root ID is refused: no leaf may carry it.
    let root_dir = tmp.path().join("root-id");
    let file = write_policies(&root_dir, &[policy("root", "", my_uid(), "")]);
    let (code, err) = start_fails(&root_dir, &["--policy", file.to_str().unwrap()]);
    assert_eq!(code, Some(64), "X5-03: {err}");
    assert!(
        err.contains("spec.spiffeID"),
        "X5-03: names the field: {err}"
    );
}

/// X5-14: notAfter is capped at the issuing CA's notAfter. The state directory is seeded (in
/// the layout before key rotation, which the daemon takes over) with a CA that expires in 5
/// minutes; the policy asks for 1 hour.
#[tokio::test]
async fn leaf_not_after_capped_at_ca_x5_14() {
    use agentid::crypto::x509::{CaSigner, to_pem};
    use std::os::unix::fs::PermissionsExt;

    let tmp = tempfile::tempdir().unwrap();
    let td = agentid::spiffe::TrustDomain::new(TD).unwrap();
    let ca = CaSigner::generate(&td, Duration::from_secs(300)).unwrap();
    let auth = tmp.path().join("daemon/state/authority");
    std::fs::create_dir_all(&auth).unwrap();
    for dir in [auth.parent().unwrap(), auth.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    std::fs::write(auth.join("trust-domain"), TD).unwrap();
    std::fs::write(auth.join("x509-ca.current.key"), ca.key().pkcs8_pem()).unwrap();
    std::fs::write(
        auth.join("x509-ca.current.crt"),
        to_pem(&[ca.cert_der().to_vec()]),
    )
    .unwrap();

    let d = start_with(
        tmp.path(),
        &[policy(
            "capped",
            "/agent/capped",
            my_uid(),
            "  x509TTL: 1h\n",
        )],
        &[],
    );
    let resp = x509_response(&d).await;
    let s = &resp.svids[0];
    // The seeded CA signs until it expires; its successor may already be announced next to it.
    assert!(
        split_der(&s.bundle).contains(&ca.cert_der().to_vec()),
        "the seeded CA is in force"
    );
    let (_, not_after) = check_leaf(
        &split_der(&s.x509_svid)[0],
        &s.x509_svid_key,
        ca.cert_der(),
        &s.spiffe_id,
    );
    let ca_not_after = parse_cert(ca.cert_der()).validity().not_after.timestamp();
    assert_eq!(
        not_after, ca_not_after,
        "X5-14: notAfter = min(now + 1h, CA notAfter)"
    );
}

/// X5-20..X5-27: the signing (CA) certificates in the bundle, and the intermediates (if any)
/// in every chain.
#[tokio::test]
async fn signing_certs_x5_20_to_x5_27() {
    let tmp = tempfile::tempdir().unwrap();
    let uid = my_uid();
    let d = start_with(
        tmp.path(),
        &[
            policy("one", "/agent/one", uid, ""),
            policy("two", "/agent/two", uid, ""),
        ],
        &[],
    );
    let resp = x509_response(&d).await;
    let mut c = client(&d).await;
    let bundles = c
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let cas = split_der(&bundles.bundles[&format!("spiffe://{TD}")]);
    assert!(!cas.is_empty());
    for ca in &cas {
        // X5-20, X5-21, X5-06, X5-22, X5-42 (self-signed).
        check_ca(ca, TD);
    }
    assert_eq!(resp.svids.len(), 2);
    for s in &resp.svids {
        assert_eq!(
            split_der(&s.bundle),
            cas,
            "every SVID carries the same own-TD bundle"
        );
        let chain = split_der(&s.x509_svid);
        // X5-26: a signing certificate is never handed out as an SVID.
        let leaf = parse_cert(&chain[0]);
        assert!(
            !leaf.basic_constraints().unwrap().unwrap().value.ca,
            "X5-26: the leaf is not a CA"
        );
        assert!(!cas.contains(&chain[0]), "X5-26");
        // X5-27: every intermediate after the leaf is a CA with keyCertSign, and the chain
        // ends at a bundle CA.
        for der in &chain[1..] {
            let cert = parse_cert(der);
            assert!(
                cert.basic_constraints().unwrap().unwrap().value.ca,
                "X5-27: intermediate cA"
            );
            assert!(
                cert.key_usage().unwrap().unwrap().value.key_cert_sign(),
                "X5-27: keyCertSign"
            );
        }
        let top = parse_cert(chain.last().unwrap());
        assert!(
            cas.iter().any(|ca| signed_by(&top, &parse_cert(ca))),
            "the chain's last certificate is signed by a bundle CA"
        );
        check_leaf(&chain[0], &s.x509_svid_key, &cas[0], &s.spiffe_id);
    }
    // The rust client's bundle parser accepts the CAs (X5-27 validation of signing certs is
    // applied to intermediates by the same client when it parses the SVIDs).
    let sc = spiffe_client(&d).await;
    let all = sc
        .fetch_all_x509_svids()
        .await
        .expect("rust client validates chains");
    assert_eq!(all.len(), 2);
}

/// X5-40..X5-44: the X.509 CAs in the SPIFFE bundle document (JWK form) of the trust domain.
/// The daemon's authority is opened read-only from its state directory and its document is
/// compared with what the Workload API serves.
#[tokio::test]
async fn x509_cas_in_spiffe_bundle_x5_40_to_x5_44() {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);
    let served = split_der(&x509_response(&d).await.svids[0].bundle);
    let authority = agentid::server::Authority::open(
        &d.state.join("authority"),
        agentid::spiffe::TrustDomain::new(TD).unwrap(),
        Default::default(),
    )
    .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&authority.bundle_document()).unwrap();
    let keys = doc["keys"].as_array().expect("BU-01: keys array");
    let x509: Vec<&serde_json::Value> = keys.iter().filter(|k| k["use"] == "x509-svid").collect();
    // X5-40: one JWK per CA certificate; X5-44: there is at least one, so X509-SVIDs are
    // supported.
    assert_eq!(
        x509.len(),
        served.len(),
        "X5-40: one x509-svid JWK per CA: {doc}"
    );
    for (k, der) in x509.iter().zip(&served) {
        assert!(
            k.get("kid").is_none(),
            "X5-41: no kid on x509-svid entries: {k}"
        );
        let x5c = k["x5c"].as_array().expect("X5-42: x5c present");
        assert_eq!(x5c.len(), 1, "X5-42/43: exactly one x5c value");
        let b64 = x5c[0].as_str().unwrap();
        assert!(
            !b64.contains('-') && !b64.contains('_'),
            "X5-42: standard base64, not URL-safe"
        );
        assert_eq!(
            &STANDARD.decode(b64).expect("X5-42: standard base64"),
            der,
            "x5c is the served CA"
        );
        check_ca(der, TD); // self-signed (X5-42 SHOULD)
        // The JWK's public key is the certificate's.
        let cert = parse_cert(der);
        let point = &cert.public_key().subject_public_key.data;
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert_eq!(
            URL_SAFE_NO_PAD.decode(k["x"].as_str().unwrap()).unwrap(),
            point[1..33]
        );
        assert_eq!(
            URL_SAFE_NO_PAD.decode(k["y"].as_str().unwrap()).unwrap(),
            point[33..65]
        );
    }
}

/// Fails the test (never skips) when the openssl CLI is missing.
fn require_openssl() {
    match Command::new("openssl").arg("version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`openssl version` failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "this test needs the openssl CLI as a second verifier (apt-get install openssl): {e}"
        ),
    }
}

/// `openssl verify` with `args`; returns (success, stdout + stderr).
fn openssl_verify(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .arg("verify")
        .args(args)
        .output()
        .expect("run openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// X5-30..X5-35, second verifier: `openssl verify` accepts the issued chain against the
/// bundle in strict mode for both TLS purposes, and rejects it against another trust
/// domain's bundle (X5-35) and when tampered with (X5-30).
#[tokio::test]
async fn openssl_verifies_svids_x5_30_to_x5_35() {
    require_openssl();
    let tmp = tempfile::tempdir().unwrap();
    let a = Daemon::start_in(&tmp.path().join("a"), &[]);
    let b = Daemon::start_in(&tmp.path().join("b"), &["--trust-domain", "other.test"]);
    let sa = x509_response(&a).await;
    let sb = x509_response(&b).await;
    let dir = tmp.path();
    let write = |name: &str, ders: &[Vec<u8>]| {
        let p = dir.join(name);
        std::fs::write(&p, pem_certs(ders)).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let svid = write("svid.pem", &split_der(&sa.svids[0].x509_svid));
    let bundle = write("bundle.pem", &split_der(&sa.svids[0].bundle));
    let other = write("other.pem", &split_der(&sb.svids[0].bundle));
    let other_svid = write("other-svid.pem", &split_der(&sb.svids[0].x509_svid));

    // The chain verifies, strictly, for client and server use.
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = openssl_verify(&[
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            &bundle,
            &svid,
        ]);
        assert!(
            ok && out.contains(": OK"),
            "openssl verify -purpose {purpose}: {out}"
        );
    }
    // The CA is a valid self-signed root.
    let (ok, out) = openssl_verify(&["-x509_strict", "-CAfile", &bundle, &bundle]);
    assert!(ok, "CA verifies as a root: {out}");

    // X5-35 / FB-02: the bundle of another trust domain does not vouch for it, and vice versa.
    let (ok, out) = openssl_verify(&["-CAfile", &other, &svid]);
    assert!(!ok, "X5-35: must fail against other.test's bundle: {out}");
    assert!(
        out.contains("unable to get local issuer certificate"),
        "{out}"
    );
    let (ok, out) = openssl_verify(&["-CAfile", &bundle, &other_svid]);
    assert!(
        !ok,
        "X5-35: other.test's SVID must fail against agentid.local's bundle: {out}"
    );

    // X5-30: a tampered certificate fails signature verification.
    let mut der = split_der(&sa.svids[0].x509_svid)[0].clone();
    let n = der.len();
    der[n - 5] ^= 0x01; // inside the signature value
    let tampered = write("tampered.pem", &[der]);
    let (ok, out) = openssl_verify(&["-CAfile", &bundle, &tampered]);
    assert!(!ok, "X5-30: tampered certificate must fail: {out}");

    // The README demo: the CLI's files verify the same way.
    let out_dir = dir.join("cli");
    let (code, stdout, stderr) = common::cli(
        &a.socket,
        &["x509", "fetch", "--out", out_dir.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (ok, out) = openssl_verify(&[
        "-x509_strict",
        "-CAfile",
        out_dir.join("bundle.pem").to_str().unwrap(),
        out_dir.join("svid.pem").to_str().unwrap(),
    ]);
    assert!(ok, "CLI output verifies: {out}");
}

// ---------------------------------------------------------------------------------------------
// mTLS between two workloads (rustls + webpki)

mod tls {
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
    };
    use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
    use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
    use rustls::{
        CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    pub fn roots(cas: &[Vec<u8>]) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(CertificateDer::from(ca.clone())).unwrap();
        }
        Arc::new(roots)
    }

    /// X5-34 and authorization: the peer's single URI SAN must be `expected`.
    fn check_peer_id(cert: &CertificateDer<'_>, expected: &str) -> Result<(), rustls::Error> {
        let (uris, _) = super::uri_sans(&super::parse_cert(cert));
        if uris.len() == 1 && uris[0] == expected {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    /// Validates a server's X509-SVID: webpki path validation against the trust domain's
    /// bundle (serverAuth), then the SPIFFE ID instead of a DNS name.
    #[derive(Debug)]
    pub struct SpiffeServerVerifier {
        roots: Arc<RootCertStore>,
        expected: String,
        provider: Arc<CryptoProvider>,
    }

    impl SpiffeServerVerifier {
        pub fn new(roots: Arc<RootCertStore>, expected: &str) -> Arc<Self> {
            // Building the stock verifier checks the roots are usable.
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .unwrap();
            Arc::new(Self {
                roots,
                expected: expected.into(),
                provider: provider(),
            })
        }
    }

    impl ServerCertVerifier for SpiffeServerVerifier {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                &self.roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
            check_peer_id(end_entity, &self.expected)?;
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// Validates a client's X509-SVID: rustls' webpki client verifier (clientAuth), then the
    /// SPIFFE ID.
    #[derive(Debug)]
    pub struct SpiffeClientVerifier {
        inner: Arc<dyn ClientCertVerifier>,
        expected: String,
    }

    impl SpiffeClientVerifier {
        pub fn new(roots: Arc<RootCertStore>, expected: &str) -> Arc<Self> {
            let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .unwrap();
            Arc::new(Self {
                inner,
                expected: expected.into(),
            })
        }
    }

    impl ClientCertVerifier for SpiffeClientVerifier {
        fn root_hint_subjects(&self) -> &[DistinguishedName] {
            self.inner.root_hint_subjects()
        }
        fn verify_client_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            now: UnixTime,
        ) -> Result<ClientCertVerified, rustls::Error> {
            self.inner
                .verify_client_cert(end_entity, intermediates, now)?;
            check_peer_id(end_entity, &self.expected)?;
            Ok(ClientCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    /// A workload's X509-SVID as rustls wants it.
    pub struct Identity {
        pub chain: Vec<CertificateDer<'static>>,
        pub key: Vec<u8>,
    }

    impl Identity {
        pub fn new(chain: &[Vec<u8>], key: &[u8]) -> Self {
            Self {
                chain: chain
                    .iter()
                    .map(|c| CertificateDer::from(c.clone()))
                    .collect(),
                key: key.to_vec(),
            }
        }
        fn key(&self) -> PrivateKeyDer<'static> {
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
        }
    }

    /// One TLS 1.3 handshake over an in-memory pipe, then a ping/pong. The server trusts
    /// `server_roots` and expects client ID `client_id`; the client trusts `client_roots` and
    /// expects server ID `server_id`. Returns (server result, client result).
    pub async fn handshake(
        server: &Identity,
        server_roots: Arc<RootCertStore>,
        client_id: &str,
        client: &Identity,
        client_roots: Arc<RootCertStore>,
        server_id: &str,
    ) -> (Result<(), String>, Result<(), String>) {
        let server_cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(SpiffeClientVerifier::new(server_roots, client_id))
            .with_single_cert(server.chain.clone(), server.key())
            .expect("server SVID and key belong together");
        let client_cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(SpiffeServerVerifier::new(client_roots, server_id))
            .with_client_auth_cert(client.chain.clone(), client.key())
            .expect("client SVID and key belong together");
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        let srv = async move {
            let mut s = acceptor
                .accept(a)
                .await
                .map_err(|e| format!("server: {e}"))?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)
                .await
                .map_err(|e| format!("server read: {e}"))?;
            assert_eq!(&buf, b"ping");
            s.write_all(b"pong")
                .await
                .map_err(|e| format!("server write: {e}"))?;
            s.flush().await.map_err(|e| e.to_string())?;
            s.shutdown().await.ok();
            Ok(())
        };
        let cli = async move {
            // The name is not checked: the verifier checks the SPIFFE ID instead.
            let name = ServerName::try_from("workload.invalid").unwrap();
            let mut c = connector
                .connect(name, b)
                .await
                .map_err(|e| format!("client: {e}"))?;
            c.write_all(b"ping")
                .await
                .map_err(|e| format!("client write: {e}"))?;
            c.flush().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf)
                .await
                .map_err(|e| format!("client read: {e}"))?;
            assert_eq!(&buf, b"pong");
            Ok(())
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(srv, cli)
        })
        .await
        .expect("handshake finished")
    }
}

/// Asserts a handshake side failed for `reason`.
#[track_caller]
fn assert_rejected(r: &Result<(), String>, reason: &str, what: &str) {
    match r {
        Err(e) => assert!(e.contains(reason), "{what}: expected {reason}, got {e}"),
        Ok(()) => panic!("{what}: the handshake succeeded"),
    }
}

/// X5-30..X5-35, FB-02: two workloads authenticate each other with their X509-SVIDs in a
/// real mTLS handshake (rustls/webpki), and the handshake fails with another trust domain's
/// bundle, with another trust domain's SVID, and when the peer has a different SPIFFE ID.
#[tokio::test]
async fn mtls_between_two_workloads_x5_30_to_x5_35() {
    let tmp = tempfile::tempdir().unwrap();
    let uid = my_uid();
    let a = start_with(
        &tmp.path().join("a"),
        &[
            policy("server", "/svc/server", uid, ""),
            policy("client", "/svc/client", uid, ""),
        ],
        &[],
    );
    let b = Daemon::start_in(&tmp.path().join("b"), &["--trust-domain", "other.test"]);
    let server_id = format!("spiffe://{TD}/svc/server");
    let client_id = format!("spiffe://{TD}/svc/client");

    let sc = spiffe_client(&a).await;
    let svids = sc.fetch_all_x509_svids().await.unwrap();
    let ident = |id: &str| {
        let s = svids
            .iter()
            .find(|s| s.spiffe_id().to_string() == id)
            .expect("SVID issued");
        let chain: Vec<Vec<u8>> = s
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        tls::Identity::new(&chain, s.private_key().as_bytes())
    };
    let (server, client) = (ident(&server_id), ident(&client_id));
    let td_a = spiffe::TrustDomain::new(TD).unwrap();
    let bundle_a = sc.fetch_x509_bundles().await.unwrap();
    let cas_a: Vec<Vec<u8>> = bundle_a
        .get(&td_a)
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let rb = x509_response(&b).await;
    let cas_b = split_der(&rb.svids[0].bundle);
    let foreign = tls::Identity::new(
        &split_der(&rb.svids[0].x509_svid),
        &rb.svids[0].x509_svid_key,
    );
    let foreign_id = rb.svids[0].spiffe_id.clone();
    let (ra, rb_roots) = (tls::roots(&cas_a), tls::roots(&cas_b));

    // Both sides verify the peer against the trust domain's bundle and check its ID.
    let (s, c) = tls::handshake(
        &server,
        ra.clone(),
        &client_id,
        &client,
        ra.clone(),
        &server_id,
    )
    .await;
    assert_eq!(
        (s.clone(), c.clone()),
        (Ok(()), Ok(())),
        "mTLS with the right bundle: {s:?} {c:?}"
    );

    // The client trusts only other.test's bundle: the server's SVID is rejected.
    let (_, c) = tls::handshake(
        &server,
        ra.clone(),
        &client_id,
        &client,
        rb_roots.clone(),
        &server_id,
    )
    .await;
    assert_rejected(
        &c,
        "UnknownIssuer",
        "client with other.test's bundle must reject the server",
    );

    // The server trusts only other.test's bundle: the client's SVID is rejected.
    let (s, _) = tls::handshake(
        &server,
        rb_roots.clone(),
        &client_id,
        &client,
        ra.clone(),
        &server_id,
    )
    .await;
    assert_rejected(
        &s,
        "UnknownIssuer",
        "server with other.test's bundle must reject the client",
    );

    // X5-35: an SVID of other.test, valid in its own trust domain, is not trusted by a peer
    // that holds only agentid.local's bundle, even when the expected ID is its own.
    let (_, c) = tls::handshake(
        &foreign,
        rb_roots.clone(),
        &client_id,
        &client,
        ra.clone(),
        &foreign_id,
    )
    .await;
    assert_rejected(
        &c,
        "UnknownIssuer",
        "X5-35: a foreign-TD server SVID must be rejected",
    );

    // Authorization on the SPIFFE ID: the right chain with the wrong ID is refused.
    let (_, c) = tls::handshake(
        &client,
        ra.clone(),
        &client_id,
        &client,
        ra.clone(),
        &server_id,
    )
    .await;
    assert_rejected(
        &c,
        "ApplicationVerificationFailure",
        "a server with the wrong SPIFFE ID must be rejected",
    );
    let (s, _) = tls::handshake(
        &server,
        ra.clone(),
        &server_id,
        &client,
        ra.clone(),
        &server_id,
    )
    .await;
    assert_rejected(
        &s,
        "ApplicationVerificationFailure",
        "a client with the wrong SPIFFE ID must be rejected",
    );
}

/// X-01..X-09 (FetchX509SVID): one SVID per entitled identity in policy order, every field
/// set, unique hints, no CRL, no own trust domain among federated bundles; PermissionDenied
/// "no identity issued" for a caller entitled to nothing.
#[tokio::test]
async fn fetch_x509_svid_rpc_x_01_to_x_09() {
    let tmp = tempfile::tempdir().unwrap();
    let uid = my_uid();
    let doc = |name: &str, path: &str, hint: &str| {
        format!(
            "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: {name}}}\nspec:\n  spiffeID: \"spiffe://{{{{ .TrustDomain }}}}{path}\"\n  hint: {hint}\n  selector:\n    unix: {{uid: {uid}}}\n"
        )
    };
    let d = start_with(
        tmp.path(),
        &[
            doc("beta", "/agent/beta", "beta"),
            doc("alpha", "/agent/alpha", "alpha"),
            // a later policy with an already used hint is dropped for this caller, and
            // so is one with an already issued ID.
            doc("dup-hint", "/agent/gamma", "beta"),
            doc("dup-id", "/agent/alpha", "delta"),
        ],
        &[],
    );
    let resp = x509_response(&d).await;
    let ids: Vec<&str> = resp.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    // one per identity, policy (file) order; the first is the default.
    assert_eq!(
        ids,
        [
            format!("spiffe://{TD}/agent/beta"),
            format!("spiffe://{TD}/agent/alpha")
        ]
    );
    let hints: Vec<&str> = resp.svids.iter().map(|s| s.hint.as_str()).collect();
    assert_eq!(hints, ["beta", "alpha"], "X-03: hints unique");
    let own_bundle = {
        let mut c = client(&d).await;
        let m = c
            .fetch_x509_bundles(X509BundlesRequest {})
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        m.bundles[&format!("spiffe://{TD}")].clone()
    };
    for s in &resp.svids {
        // every field set; x509_svid is DER (not PEM), leaf first; the key is PKCS#8;
        // the bundle is the SVID's own trust domain's.
        assert!(!s.x509_svid.starts_with(b"-----"), "X-02: DER, not PEM");
        let chain = split_der(&s.x509_svid);
        assert_eq!(
            uri_sans(&parse_cert(&chain[0])).0,
            std::slice::from_ref(&s.spiffe_id),
            "X-02: spiffe_id = leaf URI SAN"
        );
        assert!(!s.bundle.is_empty(), "X-09: bundle never empty");
        assert_eq!(
            s.bundle, own_bundle,
            "X-02: bundle of the SVID's trust domain"
        );
        check_leaf(
            &chain[0],
            &s.x509_svid_key,
            &split_der(&s.bundle)[0],
            &s.spiffe_id,
        );
    }
    assert!(resp.crl.is_empty(), "X-07: no CRLs");
    assert!(
        resp.federated_bundles.is_empty(),
        "X-08/G-4: no own TD (and no federation) in federated_bundles"
    );
    // the order is stable across calls.
    let again = x509_response(&d).await;
    assert_eq!(
        again.svids.iter().map(|s| &s.spiffe_id).collect::<Vec<_>>(),
        ids
    );

    // The rust client agrees: default = first, all = both, with hints.
    let sc = spiffe_client(&d).await;
    assert_eq!(
        sc.fetch_x509_svid().await.unwrap().spiffe_id().to_string(),
        ids[0]
    );
    let all = sc.fetch_all_x509_svids().await.unwrap();
    assert_eq!(
        all.iter()
            .map(|s| s.hint().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["beta", "alpha"]
    );
    let ctx = sc.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.svids().len(), 2);

    // X-03, G-6: hints longer than 1024 bytes are refused when the policy loads.
    let long_hint_dir = tmp.path().join("long-hint");
    let file = write_policies(
        &long_hint_dir,
        &[doc("hinted", "/agent/h", &"h".repeat(1025))],
    );
    let (code, err) = start_fails(&long_hint_dir, &["--policy", file.to_str().unwrap()]);
    assert_eq!(code, Some(64), "X-03: {err}");
    assert!(err.contains("spec.hint"), "X-03: names the field: {err}");

    // a caller entitled to nothing gets PermissionDenied "no identity issued".
    let none = start_with(
        &tmp.path().join("none"),
        &[policy("others", "/agent/x", uid + 4242, "")],
        &[],
    );
    let mut c = client(&none).await;
    let s = expect_err(
        c.fetch_x509svid(X509svidRequest {}).await.map(|_| ()),
        "X-05",
    );
    assert_status(
        &s,
        Code::PermissionDenied,
        Some("no identity issued"),
        "X-05",
    );
    let e = spiffe_client(&none)
        .await
        .fetch_x509_svid()
        .await
        .unwrap_err();
    assert!(
        matches!(e, spiffe::WorkloadApiError::NoIdentityIssued),
        "rust client: {e:?}"
    );
}

/// XB-01..XB-03 (FetchX509Bundles): the own trust domain's CAs keyed `spiffe://<td>`, never
/// an empty map; PermissionDenied for a caller entitled to nothing.
#[tokio::test]
async fn fetch_x509_bundles_rpc_xb_01_to_xb_03() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(&tmp.path().join("a"), &[]);
    let mut c = client(&d).await;
    let m = c
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let keys: Vec<&String> = m.bundles.keys().collect();
    assert_eq!(
        keys,
        [&format!("spiffe://{TD}")],
        "XB-01/XB-03: exactly the own TD, keyed by its ID"
    );
    let cas = split_der(&m.bundles[&format!("spiffe://{TD}")]);
    for ca in &cas {
        check_ca(ca, TD);
    }
    assert!(m.crl.is_empty());
    let svid = x509_response(&d).await;
    assert_eq!(
        m.bundles[&format!("spiffe://{TD}")],
        svid.svids[0].bundle,
        "same CAs as in the SVID response"
    );
    let set = spiffe_client(&d)
        .await
        .fetch_x509_bundles()
        .await
        .expect("rust client accepts");
    let b = set.get(&spiffe::TrustDomain::new(TD).unwrap()).unwrap();
    assert_eq!(b.authorities().len(), cas.len());

    // XB-02: not entitled => PermissionDenied.
    let none = start_with(
        &tmp.path().join("none"),
        &[policy("others", "/agent/x", my_uid() + 4242, "")],
        &[],
    );
    let mut c = client(&none).await;
    let s = expect_err(
        c.fetch_x509_bundles(X509BundlesRequest {})
            .await
            .map(|_| ()),
        "XB-02",
    );
    assert_status(
        &s,
        Code::PermissionDenied,
        Some("no identity issued"),
        "XB-02",
    );
}
