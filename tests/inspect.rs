//! `agentid x509 inspect` and `agentid jwt inspect`: the real binary on real SVIDs signed with
//! the crate's own CA and JWT signer, carrying a composite identity.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use agentid::composite::{
    Agent, CompositeIdentity, K8s, Model, Pod, Unix, sha256_digest, to_extensions, to_jwt_claim,
};
use agentid::crypto::PrivateKey;
use agentid::crypto::jwt::{JwtSigner, JwtSvidClaims};
use agentid::crypto::x509::{CaSigner, CertInfo, Extension, to_pem};
use agentid::spiffe::TrustDomain;
use serde_json::{Map, Value};

const ID: &str = "spiffe://example.org/ns/payments/sa/refund-agent/agent/refund";
const NOT_VERIFIED_JWT: &str = "signature not verified; use `agentid jwt validate`";

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `agentid args…`, feeding `stdin` if given.
fn agentid(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentid"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run agentid");
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = agentid(args, stdin);
    assert_eq!(out.code, 0, "agentid {args:?}: {}", out.stderr);
    out.stdout
}

fn json(args: &[&str], stdin: Option<&[u8]>) -> Value {
    let out = ok(args, stdin);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Runs a command that must fail with exit code 1; returns its stderr.
fn fails(args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = agentid(args, stdin);
    assert_eq!(
        out.code, 1,
        "agentid {args:?}: {}{}",
        out.stdout, out.stderr
    );
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", out.stdout);
    out.stderr
}

fn k8s_identity() -> CompositeIdentity {
    CompositeIdentity {
        agent: Some(Agent {
            name: "refund-agent".into(),
            version: Some("1.4.2".into()),
        }),
        model: Some(Model {
            provider: "anthropic".into(),
            id: "claude-sonnet-4-5".into(),
        }),
        config_digest: Some(sha256_digest(b"config")),
        tools_digest: Some(sha256_digest(b"tools")),
        image_digest: Some(sha256_digest(b"image")),
        k8s: Some(K8s {
            cluster: "prod-eu1".into(),
            namespace: "payments".into(),
            serviceaccount: "refund-agent".into(),
            pod: Pod {
                name: "refund-agent-7c9d".into(),
                uid: "0b9a4f2e-1c1d-4a5b-9e0f-2d3c4b5a6978".into(),
            },
            node: "node-a".into(),
            container: Some("agent".into()),
        }),
        ..CompositeIdentity::new()
    }
}

fn unix_identity() -> CompositeIdentity {
    CompositeIdentity {
        agent: Some(Agent {
            name: "local-agent".into(),
            version: None,
        }),
        config_digest: Some(sha256_digest(b"prompt")),
        unix: Some(Unix {
            uid: 1000,
            gid: 100,
            path: "/usr/local/bin/agent".into(),
            sha256: sha256_digest(b"exe"),
        }),
        ..CompositeIdentity::new()
    }
}

/// A top-level line of the text output.
fn line(name: &str, value: &str) -> String {
    format!("{name:<22}{value}\n")
}

/// A composite attribute line of the text output.
fn attr(name: &str, value: &str) -> String {
    format!("  {name:<20}{value}\n")
}

/// Every attribute of `id` as `name value` pairs, as the text output names them.
fn attributes(id: &CompositeIdentity) -> Vec<(&'static str, String)> {
    let v: Value = serde_json::to_value(id).unwrap();
    let mut out = vec![("version", "1".to_owned())];
    let mut flat = |name: &'static str, ptr: &str| {
        if let Some(x) = v.pointer(ptr) {
            out.push((
                name,
                x.as_str().map_or_else(|| x.to_string(), str::to_owned),
            ));
        }
    };
    for (name, ptr) in [
        ("agent.name", "/agent/name"),
        ("agent.version", "/agent/version"),
        ("model.provider", "/model/provider"),
        ("model.id", "/model/id"),
        ("config_digest", "/config_digest"),
        ("tools_digest", "/tools_digest"),
        ("image_digest", "/image_digest"),
        ("k8s.cluster", "/k8s/cluster"),
        ("k8s.namespace", "/k8s/namespace"),
        ("k8s.serviceaccount", "/k8s/serviceaccount"),
        ("k8s.pod.name", "/k8s/pod/name"),
        ("k8s.pod.uid", "/k8s/pod/uid"),
        ("k8s.node", "/k8s/node"),
        ("k8s.container", "/k8s/container"),
        ("unix.uid", "/unix/uid"),
        ("unix.gid", "/unix/gid"),
        ("unix.path", "/unix/path"),
        ("unix.sha256", "/unix/sha256"),
    ] {
        flat(name, ptr);
    }
    out
}

struct Svid {
    ca: CaSigner,
    leaf: Vec<u8>,
}

/// A real X509-SVID for [`ID`], valid for 10 minutes, carrying `extensions`.
fn svid(extensions: &[Extension]) -> Svid {
    let td = TrustDomain::new("example.org").unwrap();
    let ca = CaSigner::generate(&td, Duration::from_secs(3600)).unwrap();
    let key = PrivateKey::generate().unwrap();
    let leaf = ca
        .sign_leaf(
            &ID.parse().unwrap(),
            &key.spki_der(),
            Duration::from_secs(600),
            extensions,
        )
        .unwrap();
    Svid { ca, leaf }
}

fn write(dir: &Path, name: &str, data: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path.display().to_string()
}

/// A DER UTF8String (values here are short).
fn utf8(s: &str) -> Vec<u8> {
    let mut v = vec![0x0c, s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

#[test]
fn x509_inspect_shows_the_svid_and_every_composite_attribute() {
    let dir = tempfile::tempdir().unwrap();
    for id in [k8s_identity(), unix_identity()] {
        let s = svid(&to_extensions(&id));
        let info = CertInfo::parse(&s.leaf).unwrap();
        let file = write(
            dir.path(),
            "svid.pem",
            to_pem(std::slice::from_ref(&s.leaf)).as_bytes(),
        );

        let text = ok(&["x509", "inspect", &file], None);
        assert!(text.contains(&line("SPIFFE ID", ID)), "{text}");
        assert!(text.contains(&line("serial", &info.serial_hex)), "{text}");
        assert!(text.contains("(valid, expires in "), "{text}");
        assert!(text.contains("CN=agentid CA example.org"));
        assert!(text.contains(&line("key", "ECDSA P-256")), "{text}");
        assert!(text.contains("composite identity\n"), "{text}");
        assert!(
            text.contains(&attr(
                "cid",
                &format!("{} (re-verified: it hashes the attributes below)", id.cid())
            )),
            "{text}"
        );
        for (name, value) in attributes(&id) {
            assert!(text.contains(&attr(name, &value)), "{name} {value}: {text}");
        }
        assert!(text.contains("signature and chain not verified"), "{text}");

        let j = json(&["x509", "inspect", "--json", &file], None);
        assert_eq!(j["spiffe_id"], ID);
        assert_eq!(j["serial"], info.serial_hex);
        assert_eq!(j["validity"]["status"], "valid");
        let remaining = j["validity"]["remaining_secs"].as_i64().unwrap();
        assert!((540..=600).contains(&remaining), "{remaining}");
        let not_after = time::OffsetDateTime::from(info.not_after)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        assert_eq!(j["not_after"], not_after);
        assert_eq!(j["key_type"], "ECDSA P-256");
        assert_eq!(j["is_ca"], false);
        assert_eq!(j["chain_length"], 1);
        assert_eq!(j["signature_verified"], false);
        assert_eq!(j["composite"]["cid"], id.cid());
        assert_eq!(j["composite"]["cid_verified"], true);
        assert_eq!(j["composite"]["object"], serde_json::to_value(&id).unwrap());
    }
}

#[test]
fn x509_inspect_reads_der_chains_and_stdin() {
    let id = k8s_identity();
    let s = svid(&to_extensions(&id));
    let dir = tempfile::tempdir().unwrap();

    let der = write(dir.path(), "svid.der", &s.leaf);
    let j = json(&["x509", "inspect", "--json", &der], None);
    assert_eq!(j["spiffe_id"], ID);
    assert_eq!(j["composite"]["cid"], id.cid());

    // Leaf then CA, as PEM on stdin: the leaf is the one described.
    let chain = to_pem(&[s.leaf.clone(), s.ca.cert_der().to_vec()]);
    let j = json(&["x509", "inspect", "--json", "-"], Some(chain.as_bytes()));
    assert_eq!(j["spiffe_id"], ID);
    assert_eq!(j["chain_length"], 2);
    let text = ok(&["x509", "inspect", "-"], Some(chain.as_bytes()));
    assert!(
        text.contains("2 certificates (the first is shown)"),
        "{text}"
    );

    // Concatenated DER on stdin (the Workload API's encoding).
    let mut both = s.leaf.clone();
    both.extend_from_slice(s.ca.cert_der());
    let j = json(&["x509", "inspect", "--json", "-"], Some(&both));
    assert_eq!(j["chain_length"], 2);

    // The CA alone: its ID is the trust domain's, and it carries no composite identity.
    let j = json(&["x509", "inspect", "--json", "-"], Some(s.ca.cert_der()));
    assert_eq!(j["spiffe_id"], "spiffe://example.org");
    assert_eq!(j["is_ca"], true);
    assert!(j["composite"].is_null());
}

/// Runs `openssl req -x509` for a self-signed certificate with `san` (none if empty).
fn openssl_cert(dir: &Path, name: &str, san: &str) -> String {
    let out = dir.join(name);
    let mut cmd = Command::new("openssl");
    cmd.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ])
    .args(["-nodes", "-days", "1", "-subj", "/CN=plain"])
    .arg("-keyout")
    .arg(dir.join(format!("{name}.key")))
    .arg("-out")
    .arg(&out);
    if !san.is_empty() {
        cmd.args(["-addext", &format!("subjectAltName={san}")]);
    }
    let res = cmd.output().unwrap_or_else(|e| {
        panic!("this test needs the openssl CLI (apt-get install openssl): {e}")
    });
    assert!(
        res.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    out.display().to_string()
}

#[test]
fn x509_inspect_of_a_plain_certificate_says_none_and_checks_the_uri_san() {
    let dir = tempfile::tempdir().unwrap();
    let plain = openssl_cert(dir.path(), "plain.pem", "URI:spiffe://example.org/plain");
    let text = ok(&["x509", "inspect", &plain], None);
    assert!(
        text.contains(&line("SPIFFE ID", "spiffe://example.org/plain")),
        "{text}"
    );
    assert!(text.contains("composite identity: none\n"), "{text}");
    assert!(text.contains(&line("issuer", "CN=plain")), "{text}");
    let j = json(&["x509", "inspect", "--json", &plain], None);
    assert!(j["composite"].is_null());
    let remaining = j["validity"]["remaining_secs"].as_i64().unwrap();
    assert!((86_000..=86_400).contains(&remaining), "{remaining}");

    let no_uri = openssl_cert(dir.path(), "dns.pem", "DNS:example.org");
    let e = fails(&["x509", "inspect", &no_uri], None);
    assert!(
        e.contains("dns.pem: the leaf certificate has no URI SAN, so it is not an X509-SVID"),
        "{e}"
    );
    let none = openssl_cert(dir.path(), "none.pem", "");
    let e = fails(&["x509", "inspect", &none], None);
    assert!(e.contains("has no URI SAN"), "{e}");

    let two = openssl_cert(
        dir.path(),
        "two.pem",
        "URI:spiffe://example.org/a,URI:spiffe://example.org/b",
    );
    let e = fails(&["x509", "inspect", "--json", &two], None);
    assert!(
        e.contains("two.pem: the leaf certificate has 2 URI SANs; an X509-SVID has exactly one"),
        "{e}"
    );

    let https = openssl_cert(dir.path(), "https.pem", "URI:https://example.org/a");
    let e = fails(&["x509", "inspect", &https], None);
    assert!(
        e.contains("URI SAN \"https://example.org/a\" is not a SPIFFE ID"),
        "{e}"
    );
}

#[test]
fn x509_inspect_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let e = fails(&["x509", "inspect", "-"], Some(b"not a certificate\n"));
    assert!(
        e.starts_with("agentid: (stdin): the input is neither PEM nor a DER certificate"),
        "{e}"
    );
    let e = fails(&["x509", "inspect", "-"], Some(b""));
    assert!(e.contains("(stdin): the input is empty"), "{e}");
    let key = PrivateKey::generate().unwrap().pkcs8_pem();
    let file = write(dir.path(), "key.pem", key.as_bytes());
    let e = fails(&["x509", "inspect", &file], None);
    assert!(
        e.contains("key.pem: the PEM input holds no CERTIFICATE block (found: PRIVATE KEY)"),
        "{e}"
    );
    let e = fails(&["x509", "inspect", "/nonexistent/svid.pem"], None);
    assert!(e.contains("reading /nonexistent/svid.pem"), "{e}");

    // A composite attribute that is not a UTF8String: the message names the attribute.
    let mut exts = to_extensions(&k8s_identity());
    let pod_name = exts
        .iter_mut()
        .find(|e| e.value == utf8("refund-agent-7c9d"))
        .unwrap();
    pod_name.value = vec![0x13, 0x01, b'p']; // PrintableString
    let file = write(
        dir.path(),
        "bad.pem",
        to_pem(&[svid(&exts).leaf]).as_bytes(),
    );
    let e = fails(&["x509", "inspect", &file], None);
    assert!(
        e.contains(
            "bad.pem: composite identity: bad value in extension .10 (k8s.pod.name): wrong tag"
        ),
        "{e}"
    );

    // A well-formed attribute changed after the cid was computed: the cid does not re-verify.
    let mut exts = to_extensions(&k8s_identity());
    let model = exts
        .iter_mut()
        .find(|e| e.value == utf8("claude-sonnet-4-5"))
        .unwrap();
    model.value = utf8("other-model");
    let file = write(
        dir.path(),
        "tampered.pem",
        to_pem(&[svid(&exts).leaf]).as_bytes(),
    );
    let e = fails(&["x509", "inspect", "--json", &file], None);
    assert!(
        e.contains("tampered.pem: composite identity: cid mismatch: the encoding carries sha256:"),
        "{e}"
    );

    // A missing attribute.
    let mut exts = to_extensions(&k8s_identity());
    exts.retain(|e| e.value != utf8("node-a"));
    let file = write(
        dir.path(),
        "gap.pem",
        to_pem(&[svid(&exts).leaf]).as_bytes(),
    );
    let e = fails(&["x509", "inspect", &file], None);
    assert!(
        e.contains("composite identity: extension .12 (k8s.node) is missing"),
        "{e}"
    );
}

fn jwt(extra: Map<String, Value>, exp_in: i64) -> (JwtSigner, String) {
    let signer = JwtSigner::new(PrivateKey::generate().unwrap());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = JwtSvidClaims {
        sub: ID.into(),
        aud: vec!["payments".into(), "audit".into()],
        exp: now + exp_in,
        iat: now,
        iss: "spiffe://example.org".into(),
        jti: "jti-1".into(),
        extra,
    };
    let token = signer.sign("JWT", &claims).unwrap();
    (signer, token)
}

fn composite_claim(id: &CompositeIdentity) -> Map<String, Value> {
    let (name, value) = to_jwt_claim(id);
    Map::from_iter([(name, value)])
}

#[test]
fn jwt_inspect_shows_header_claims_and_composite() {
    for id in [k8s_identity(), unix_identity()] {
        let (signer, token) = jwt(composite_claim(&id), 300);
        let text = ok(&["jwt", "inspect", &token], None);
        assert!(text.contains(&line("alg", "ES256")), "{text}");
        assert!(text.contains(&line("kid", signer.kid())), "{text}");
        assert!(text.contains(&line("typ", "JWT")), "{text}");
        assert!(text.contains(&line("sub", ID)), "{text}");
        assert!(text.contains(&line("aud", "payments, audit")), "{text}");
        assert!(text.contains(&line("jti", "jti-1")), "{text}");
        assert!(text.contains("(valid, expires in "), "{text}");
        assert!(
            text.contains(attr("cid", &format!("{} (re-verified", id.cid())).trim_end()),
            "{text}"
        );
        for (name, value) in attributes(&id) {
            assert!(text.contains(&attr(name, &value)), "{name} {value}: {text}");
        }
        assert!(text.contains(NOT_VERIFIED_JWT), "{text}");

        // From stdin, as JSON.
        let j = json(
            &["jwt", "inspect", "--json", "-"],
            Some(format!("{token}\n").as_bytes()),
        );
        assert_eq!(j["alg"], "ES256");
        assert_eq!(j["kid"], signer.kid());
        assert_eq!(j["typ"], "JWT");
        assert_eq!(j["sub"], ID);
        assert_eq!(j["aud"], serde_json::json!(["payments", "audit"]));
        assert_eq!(j["validity"]["status"], "valid");
        let remaining = j["validity"]["remaining_secs"].as_i64().unwrap();
        assert!((240..=300).contains(&remaining), "{remaining}");
        assert_eq!(j["signature_verified"], false);
        assert_eq!(j["composite"]["cid"], id.cid());
        assert_eq!(j["composite"]["cid_verified"], true);
        assert_eq!(j["composite"]["object"], serde_json::to_value(&id).unwrap());
        assert_eq!(j["claims"]["agentid.dev/agent"]["cid"], id.cid());
    }
}

#[test]
fn jwt_inspect_without_composite_and_expired() {
    let (_, token) = jwt(Map::new(), -120);
    let text = ok(&["jwt", "inspect", &token], None);
    assert!(text.contains("composite identity: none\n"), "{text}");
    assert!(text.contains("(expired 2m"), "{text}");
    let j = json(&["jwt", "inspect", "--json", &token], None);
    assert_eq!(j["validity"]["status"], "expired");
    assert!(j["composite"].is_null());
}

#[test]
fn jwt_inspect_errors_say_what_is_wrong() {
    let e = fails(&["jwt", "inspect", "abc"], None);
    assert!(
        e.contains(
            "not a JWS compact token: expected three base64url parts separated by '.', found 1"
        ),
        "{e}"
    );
    let e = fails(&["jwt", "inspect", "-"], Some(b"\n"));
    assert!(e.contains("the input is empty"), "{e}");
    let e = fails(&["jwt", "inspect", "a.b.c.d.e"], None);
    assert!(e.contains("found 5"), "{e}");
    let e = fails(&["jwt", "inspect", "%%%.e30.sig"], None);
    assert!(e.contains("token header: not base64url"), "{e}");
    let e = fails(&["jwt", "inspect", "e30.bm90IGpzb24.sig"], None);
    assert!(e.contains("token payload: not JSON"), "{e}");

    // A composite claim edited after signing: the cid does not re-verify.
    let mut claim = composite_claim(&k8s_identity());
    claim["agentid.dev/agent"]["model"]["id"] = "other-model".into();
    let (_, token) = jwt(claim, 300);
    let e = fails(&["jwt", "inspect", &token], None);
    assert!(
        e.contains("composite identity: cid mismatch: the encoding carries sha256:"),
        "{e}"
    );
    let mut claim = composite_claim(&k8s_identity());
    claim["agentid.dev/agent"]["image_digest"] = "sha256:short".into();
    let (_, token) = jwt(claim, 300);
    let e = fails(&["jwt", "inspect", "--json", &token], None);
    assert!(
        e.contains("composite identity: bad digest in image_digest"),
        "{e}"
    );
}
