//! Helpers shared by the conformance tests (`tests/conformance_*.rs`): raw gRPC clients with
//! a chosen security header, X.509 and JWS inspection, the admin endpoint, and daemons started
//! with policy files. Row ids refer to ../shared/SPIFFE-CONFORMANCE.md.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentid::api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use x509_parser::prelude::*;

use crate::common::{self, Daemon};

/// The trust domain `agentid up` uses by default.
pub const TD: &str = "agentid.local";

/// How a raw client sends the `workload.spiffe.io` metadata.
#[derive(Clone, Copy, Debug)]
pub enum Header {
    /// Not at all.
    Absent,
    /// Once, with this value.
    Value(&'static str),
    /// Twice, both `true`.
    Twice,
}

impl Interceptor for Header {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        match *self {
            Header::Absent => {}
            Header::Value(v) => {
                md.insert("workload.spiffe.io", v.parse().unwrap());
            }
            Header::Twice => {
                md.append("workload.spiffe.io", "true".parse().unwrap());
                md.append("workload.spiffe.io", "true".parse().unwrap());
            }
        }
        Ok(req)
    }
}

/// The generated Workload API client with a chosen security header.
pub type RawClient = SpiffeWorkloadApiClient<InterceptedService<Channel, Header>>;

/// A plaintext HTTP/2 channel over the daemon's Unix socket (EP-05: no TLS).
pub async fn channel(socket: &Path) -> Channel {
    let path = socket.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
        .expect("connect to the Workload API socket")
}

/// A raw client sending `header`.
pub async fn raw_client(d: &Daemon, header: Header) -> RawClient {
    SpiffeWorkloadApiClient::with_interceptor(channel(&d.socket).await, header)
}

/// A raw client sending the correct header.
pub async fn client(d: &Daemon) -> RawClient {
    raw_client(d, Header::Value("true")).await
}

/// The rust `spiffe` crate's client on the daemon's socket.
pub async fn spiffe_client(d: &Daemon) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(d.endpoint())
        .await
        .expect("spiffe client connects")
}

/// Asserts `status` has `code` and, if given, exactly `message`.
#[track_caller]
pub fn assert_status(status: &tonic::Status, code: tonic::Code, message: Option<&str>, what: &str) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    if let Some(m) = message {
        assert_eq!(status.message(), m, "{what}: {status:?}");
    }
}

/// Unwraps an error result into its status.
#[track_caller]
pub fn expect_err<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) -> tonic::Status {
    match r {
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
        Err(s) => s,
    }
}

// ---------------------------------------------------------------------------------------------
// Daemons with policies

/// One policy document for `uid` with the given ID path and hint = name.
pub fn policy(name: &str, id_path: &str, uid: u32, extra: &str) -> String {
    common::policy_doc(name, id_path, uid, extra)
}

/// Writes `docs` as one policy file in `dir/policies/` (a directory of its own, so the file
/// watcher does not see the daemon's log) and returns its path.
pub fn write_policies(dir: &Path, docs: &[String]) -> PathBuf {
    let pdir = dir.join("policies");
    std::fs::create_dir_all(&pdir).unwrap();
    let path = pdir.join("agents.yaml");
    replace_file(&path, &docs.join("---\n"));
    path
}

/// Replaces `path` atomically (write + rename), the way editors and operators should.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Starts `agentid up` in `dir/daemon` with `docs` as its only policy file plus `extra` flags.
pub fn start_with(dir: &Path, docs: &[String], extra: &[&str]) -> Daemon {
    let file = write_policies(dir, docs);
    let file = file.to_str().unwrap().to_owned();
    let mut args = vec!["--policy", file.as_str()];
    args.extend_from_slice(extra);
    Daemon::start_in(&dir.join("daemon"), &args)
}

/// Starts `agentid up` in `dir` with the given flags and returns its exit code and stderr,
/// expecting it to refuse to start.
pub fn start_fails(dir: &Path, extra: &[&str]) -> (Option<i32>, String) {
    std::fs::create_dir_all(dir).unwrap();
    let out = std::process::Command::new(common::bin())
        .arg("up")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("workload.sock"))
        .arg("--admin-addr")
        .arg("127.0.0.1:0")
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run agentid up");
    assert!(
        !out.status.success(),
        "agentid up {extra:?} should have refused to start; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The daemon's own JWT signing key (PKCS#8 DER), read from the state directory the test owns.
pub fn daemon_jwt_key(d: &Daemon) -> Vec<u8> {
    read_current_key(d, "jwt")
}

/// The daemon's own X.509 CA key (PKCS#8 DER).
pub fn daemon_ca_key(d: &Daemon) -> Vec<u8> {
    read_current_key(d, "x509")
}

/// The current key of `kind` (`x509`, `jwt`) in the authority's key state document.
fn read_current_key(d: &Daemon, kind: &str) -> Vec<u8> {
    let path = d.state.join("authority/keys.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let state: Value = serde_json::from_str(&text).unwrap();
    let pem = state[kind]["current"]["key"].as_str().expect("current key");
    let p = ::pem::parse(pem).unwrap();
    assert_eq!(p.tag(), "PRIVATE KEY", "{kind} key is PKCS#8");
    p.into_contents()
}

// ---------------------------------------------------------------------------------------------
// Admin endpoint

/// `GET path` on the admin listener (`Daemon::admin` is `http://host:port/`); returns the body.
pub fn http_get(admin: &str, path: &str) -> String {
    let hostport = admin
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut s = std::net::TcpStream::connect(&hostport)
        .unwrap_or_else(|e| panic!("connect admin {hostport}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "GET {path}: {head}"
    );
    body.to_owned()
}

/// The value of an unlabelled metric on `/metrics`.
pub fn metric(admin: &str, name: &str) -> f64 {
    let body = http_get(admin, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{body}"))
}

// ---------------------------------------------------------------------------------------------
// X.509

/// Splits concatenated DER certificates, asserting each parses and nothing is left over.
pub fn split_der(mut data: &[u8]) -> Vec<Vec<u8>> {
    assert!(!data.is_empty(), "empty DER certificate list");
    let mut out = Vec::new();
    while !data.is_empty() {
        let (rest, _) = X509Certificate::from_der(data)
            .unwrap_or_else(|e| panic!("not concatenated DER certificates: {e}"));
        out.push(data[..data.len() - rest.len()].to_vec());
        data = rest;
    }
    out
}

/// Parses one DER certificate, asserting there are no trailing bytes.
pub fn parse_cert(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).expect("DER certificate");
    assert!(rest.is_empty(), "trailing bytes after certificate");
    cert
}

/// The URI SANs of a certificate and whether the SAN extension is critical.
pub fn uri_sans(cert: &X509Certificate<'_>) -> (Vec<String>, bool) {
    let san = cert
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("SAN extension present");
    let uris = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    (uris, san.critical)
}

fn ski(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn aki(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

/// Verifies `cert`'s ECDSA P-256 signature with `issuer`'s public key.
pub fn signed_by(cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    let key = &issuer.public_key().subject_public_key.data;
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .is_ok()
}

fn secs(t: ASN1Time) -> i64 {
    t.timestamp()
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Every check X5-01..X5-15 makes of an issued leaf, against its CA and private key.
/// Returns (notBefore, notAfter) in Unix seconds.
#[track_caller]
pub fn check_leaf(leaf_der: &[u8], key_pkcs8: &[u8], ca_der: &[u8], id: &str) -> (i64, i64) {
    let leaf = parse_cert(leaf_der);
    let ca = parse_cert(ca_der);

    // X5-01: exactly one URI SAN, equal to the SPIFFE ID.
    let (uris, san_critical) = uri_sans(&leaf);
    assert_eq!(uris, [id], "X5-01: exactly one URI SAN equal to the ID");
    let sans = leaf
        .extensions()
        .iter()
        .filter(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME)
        .count();
    assert_eq!(sans, 1, "one SAN extension");
    // X5-04: empty subject => SAN critical.
    if leaf.subject().iter().next().is_none() {
        assert!(
            san_critical,
            "X5-04: SAN must be critical when the subject is empty"
        );
    }

    // X5-05, X5-12: Basic Constraints present, critical, cA = false.
    let bc = leaf
        .basic_constraints()
        .expect("BC parses")
        .expect("X5-12: BC present");
    assert!(bc.critical, "X5-12: BC critical");
    assert!(!bc.value.ca, "X5-05: leaf cA=false");

    // X5-06, X5-07, X5-09: KU present, critical, digitalSignature, no keyCertSign / cRLSign.
    let ku = leaf
        .key_usage()
        .expect("KU parses")
        .expect("X5-06: KU present");
    assert!(ku.critical, "X5-06: KU critical");
    assert!(ku.value.digital_signature(), "X5-07: digitalSignature");
    assert!(!ku.value.key_cert_sign(), "X5-09: no keyCertSign");
    assert!(!ku.value.crl_sign(), "X5-09: no cRLSign");

    // X5-10, X5-11: EKU present with serverAuth and clientAuth.
    let eku = leaf
        .extended_key_usage()
        .expect("EKU parses")
        .expect("X5-10: EKU present");
    assert!(
        eku.value.server_auth && eku.value.client_auth,
        "X5-11: serverAuth + clientAuth"
    );

    // X5-13: SKI and AKI, AKI = the CA's SKI.
    let ca_ski = ski(&ca).expect("X5-13: CA has a SKI");
    assert!(ski(&leaf).is_some_and(|k| !k.is_empty()), "X5-13: leaf SKI");
    assert_eq!(
        aki(&leaf),
        Some(ca_ski),
        "X5-13: leaf AKI names the CA's key"
    );

    // Signed by the CA (and issued under its name).
    assert_eq!(
        leaf.issuer().as_raw(),
        ca.subject().as_raw(),
        "issuer = CA subject"
    );
    assert!(
        signed_by(&leaf, &ca),
        "leaf signature verifies with the CA key"
    );

    // X5-14: notBefore back-dated, notAfter within the CA's validity.
    let nb = secs(leaf.validity().not_before);
    let na = secs(leaf.validity().not_after);
    assert!(
        nb <= now() - 5,
        "X5-14: notBefore back-dated (notBefore {nb}, now {})",
        now()
    );
    assert!(
        na <= secs(ca.validity().not_after),
        "X5-14: notAfter <= CA notAfter"
    );
    assert!(nb >= secs(ca.validity().not_before), "within the CA window");

    // X5-15: unencrypted PKCS#8, and the key matches the certificate.
    check_key_matches(key_pkcs8, &leaf);
    (nb, na)
}

/// X5-15: `key_pkcs8` is an unencrypted PKCS#8 P-256 key whose public half is the cert's, and
/// a signature made with it verifies with the cert's public key.
#[track_caller]
pub fn check_key_matches(key_pkcs8: &[u8], cert: &X509Certificate<'_>) {
    // `from_pkcs8` accepts PKCS#8 only (not SEC1, not encrypted).
    let kp = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, key_pkcs8)
        .expect("X5-15: x509_svid_key is an unencrypted PKCS#8 P-256 key");
    let cert_point = &cert.public_key().subject_public_key.data;
    assert_eq!(
        kp.public_key().as_ref(),
        &cert_point[..],
        "X5-15: key matches certificate"
    );
    let msg = b"conformance";
    let sig = kp.sign(&SystemRandom::new(), msg).unwrap();
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, cert_point)
        .verify(msg, sig.as_ref())
        .expect("X5-15: signature with the key verifies with the certificate");
}

/// Every check X5-20..X5-22 (and ID-16) makes of a CA certificate of trust domain `td`.
#[track_caller]
pub fn check_ca(der: &[u8], td: &str) {
    let ca = parse_cert(der);
    let bc = ca
        .basic_constraints()
        .expect("BC parses")
        .expect("CA has BC");
    assert!(bc.value.ca, "X5-20: cA=true");
    assert!(bc.critical, "CA BC critical");
    let ku = ca
        .key_usage()
        .expect("KU parses")
        .expect("X5-06: CA has KU");
    assert!(ku.critical, "X5-06: CA KU critical");
    assert!(ku.value.key_cert_sign(), "X5-21: keyCertSign");
    let (uris, _) = uri_sans(&ca);
    assert_eq!(
        uris,
        [format!("spiffe://{td}")],
        "X5-22 / ID-16: CA URI SAN is the TD ID, no path"
    );
    assert_eq!(
        ca.subject().as_raw(),
        ca.issuer().as_raw(),
        "X5-42: self-signed (issuer = subject)"
    );
    assert!(signed_by(&ca, &ca), "X5-42: self-signature verifies");
    assert!(ski(&ca).is_some(), "CA SKI");
    let now = now();
    assert!(
        secs(ca.validity().not_before) <= now && now < secs(ca.validity().not_after),
        "CA currently valid"
    );
}

/// PEM `CERTIFICATE` blocks.
pub fn pem_certs(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| ::pem::encode(&::pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// JWS

/// Decodes one base64url (no padding) JSON part of a compact JWS.
pub fn jws_json(part: &str) -> Map<String, Value> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url part (no padding)");
    serde_json::from_slice(&bytes).expect("JSON object part")
}

/// (header, payload) of a compact JWS, asserting it has exactly three parts (JS-01).
#[track_caller]
pub fn jws_parts(token: &str) -> (Map<String, Value>, Map<String, Value>) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(
        parts.len(),
        3,
        "JS-01: compact serialization has three parts: {token}"
    );
    assert!(parts.iter().all(|p| !p.is_empty()), "JS-01: no empty part");
    (jws_json(parts[0]), jws_json(parts[1]))
}

/// base64url (no padding) of `v` serialized as JSON.
pub fn b64_json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// A compact ES256 JWS over exactly `header` and `payload`, signed with `key_pkcs8`.
pub fn sign_es256(key_pkcs8: &[u8], header: &Value, payload: &Value) -> String {
    let kp = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, key_pkcs8)
        .expect("P-256 PKCS#8 key");
    let input = format!("{}.{}", b64_json(header), b64_json(payload));
    let sig = kp.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// A fresh P-256 PKCS#8 key that is in no bundle.
pub fn stranger_key() -> Vec<u8> {
    EcdsaKeyPair::generate_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &SystemRandom::new(),
    )
    .unwrap()
    .as_ref()
    .to_vec()
}

/// Waits for `f` to become true, polling every 50 ms for at most `limit`.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
