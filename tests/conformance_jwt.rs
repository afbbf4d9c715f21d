//! Conformance, SPIFFE-CONFORMANCE.md section 3 (JWT-SVID) plus the FetchJWTSVID,
//! FetchJWTBundles and ValidateJWTSVID rows of section 4.5, against the real `agentid up`.
//!
//! Tokens the daemon must refuse for their claims (expired, not yet valid, no `aud`...) are
//! signed with the daemon's own JWT key, read from the state directory the test owns, so
//! they get past the signature check and are refused for the stated reason.

mod common;
mod conformance;

use agentid::api::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, ValidateJwtsvidResponse,
};
use common::{Daemon, my_uid};
use conformance::*;
use prost_types::value::Kind;
use serde_json::{Value, json};
use tonic::Code;

fn jwt_req(aud: &[&str], id: &str) -> JwtsvidRequest {
    JwtsvidRequest {
        audience: aud.iter().map(|s| s.to_string()).collect(),
        spiffe_id: id.into(),
    }
}

/// The own trust domain's JWKS from FetchJWTBundles.
async fn jwks(d: &Daemon) -> Value {
    let mut c = client(d).await;
    let m = c
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .expect("FetchJWTBundles")
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("first message");
    serde_json::from_slice(&m.bundles[&format!("spiffe://{TD}")]).expect("JWKS JSON")
}

/// The key id agentid publishes for a PKCS#8 key.
fn kid_of(pkcs8: &[u8]) -> String {
    agentid::crypto::PrivateKey::from_pkcs8_der(pkcs8)
        .unwrap()
        .kid()
}

/// ValidateJWTSVID over the raw client.
async fn validate(
    d: &Daemon,
    audience: &str,
    token: &str,
) -> Result<ValidateJwtsvidResponse, tonic::Status> {
    client(d)
        .await
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: audience.into(),
            svid: token.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// JS-01..JS-11: the shape of an issued JWT-SVID, checked field by field and verified offline
/// by the rust `spiffe` crate (a second, independent verifier) with the served JWT bundle.
#[tokio::test]
async fn jwt_svid_issued_js_01_to_js_11() {
    let tmp = tempfile::tempdir().unwrap();
    let id = format!("spiffe://{TD}/agent/jwt");
    let d = start_with(
        tmp.path(),
        &[policy("jwt", "/agent/jwt", my_uid(), "  jwtTTL: 2m\n")],
        &[],
    );
    let mut c = client(&d).await;
    let kids: Vec<String> = jwks(&d).await["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();

    for aud in [vec!["svc-a"], vec!["svc-a", "svc-b"]] {
        let before = now();
        let resp = c
            .fetch_jwtsvid(jwt_req(&aud, ""))
            .await
            .expect("FetchJWTSVID")
            .into_inner();
        let token = &resp.svids[0].svid;
        // JS-01: compact serialization (not JSON serialization).
        assert!(
            !token.trim_start().starts_with('{'),
            "JS-01: not JSON serialization"
        );
        let (header, claims) = jws_parts(token);
        // JS-02: no header other than alg, kid, typ.
        let mut names: Vec<&str> = header.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["alg", "kid", "typ"], "JS-02: {header:?}");
        // JS-03, JS-11: an allowed algorithm; agentid signs with ES256 (P-256).
        assert_eq!(header["alg"], "ES256", "JS-03");
        // JS-04: kid set and found in the JWT bundle.
        let kid = header["kid"].as_str().expect("JS-04: kid is a string");
        assert!(
            kids.iter().any(|k| k == kid),
            "JS-04: kid {kid} in the JWT bundle {kids:?}"
        );
        // JS-05: typ JWT.
        assert_eq!(header["typ"], "JWT", "JS-05");
        // JS-06: sub = the workload's ID.
        assert_eq!(claims["sub"], id.as_str(), "JS-06");
        // JS-07: aud is an array of exactly the requested audiences, even for one.
        assert_eq!(claims["aud"], json!(aud), "JS-07: aud = request");
        // JS-09: exp is an integer NumericDate in the future; the lifetime is jwtTTL (2 min).
        let exp = claims["exp"].as_i64().expect("JS-09: integer exp");
        assert!(
            claims["exp"].is_i64() && !claims["exp"].is_f64(),
            "JS-09: not a float"
        );
        let iat = claims["iat"].as_i64().expect("JS-10: integer iat");
        assert!(
            (before - 1..=now()).contains(&iat),
            "iat {iat} is issuance time"
        );
        assert_eq!(exp - iat, 120, "JS-09: exp = iat + jwtTTL");
        // JS-10: iss and jti, as SPIRE sets them.
        assert_eq!(claims["iss"], format!("spiffe://{TD}"), "iss");
        assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()), "jti");
        assert_eq!(resp.svids[0].spiffe_id, id);
    }

    // A second verifier: the rust crate validates the token offline with the served bundle,
    // for each requested audience, and refuses another audience.
    let sc = spiffe_client(&d).await;
    let bundles = sc.fetch_jwt_bundles().await.expect("JWT bundles");
    let token = sc.fetch_jwt_token(["svc-a", "svc-b"], None).await.unwrap();
    for aud in ["svc-a", "svc-b"] {
        let v = spiffe::JwtSvid::parse_and_validate(&token, &bundles, &[aud])
            .expect("offline validation");
        assert_eq!(v.spiffe_id().to_string(), id);
    }
    assert!(spiffe::JwtSvid::parse_and_validate(&token, &bundles, &["svc-c"]).is_err());

    // JwtSource, the crate's long-lived client, gets and verifies the same kind of token.
    let source = spiffe::JwtSource::builder()
        .endpoint(d.endpoint())
        .build()
        .await
        .expect("JwtSource");
    let svid = source
        .fetch_jwt_svid(["svc-x"])
        .await
        .expect("JwtSource fetch");
    let v = spiffe::JwtSvid::parse_and_validate(svid.token(), &source, &["svc-x"])
        .expect("validate with JwtSource bundles");
    assert_eq!(v.spiffe_id().to_string(), id);
    source.shutdown().await;
}

/// JS-20..JS-27, V-02, FB-02: ValidateJWTSVID refuses, as InvalidArgument with the reason,
/// every token the JWT-SVID standard says a validator must refuse.
#[tokio::test]
async fn jwt_validation_js_20_to_js_27() {
    let tmp = tempfile::tempdir().unwrap();
    let id = format!("spiffe://{TD}/agent/v");
    let a = start_with(
        &tmp.path().join("a"),
        &[policy("v", "/agent/v", my_uid(), "")],
        &[],
    );
    let b = Daemon::start_in(&tmp.path().join("b"), &["--trust-domain", "other.test"]);
    let key = daemon_jwt_key(&a);
    let kid = kid_of(&key);
    assert!(
        jwks(&a).await["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == kid.as_str()),
        "the daemon's key is in its JWT bundle"
    );
    let t = now();
    let claims = json!({"sub": id, "aud": ["svc"], "exp": t + 300, "iat": t});
    let hdr = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    let with = |mut v: Value, k: &str, x: Value| {
        v[k] = x;
        v
    };
    let without = |mut v: Value, k: &str| {
        v.as_object_mut().unwrap().remove(k);
        v
    };

    // The forging works: a token signed with the daemon's key and well-formed claims is valid,
    // so each refusal below is for the reason stated.
    let good = sign_es256(&key, &hdr, &claims);
    let ok = validate(&a, "svc", &good)
        .await
        .expect("well-formed token signed by the daemon's key");
    assert_eq!(ok.spiffe_id, id);
    let issued = client(&a)
        .await
        .fetch_jwtsvid(jwt_req(&["svc"], ""))
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();
    validate(&a, "svc", &issued)
        .await
        .expect("an issued token validates");

    let parts: Vec<&str> = good.split('.').collect();
    let mut cases: Vec<(&str, String, &str)> = vec![
        // JS-20: alg checked first; none, HMAC and non-JWT-SVID algorithms are refused.
        (
            "JS-20 alg none",
            format!(
                "{}.{}.",
                b64_json(&with(hdr.clone(), "alg", json!("none"))),
                parts[1]
            ),
            "not allowed",
        ),
        (
            "JS-20 alg HS256",
            format!(
                "{}.{}.{}",
                b64_json(&with(hdr.clone(), "alg", json!("HS256"))),
                parts[1],
                parts[2]
            ),
            "not allowed",
        ),
        (
            "JS-20 alg EdDSA",
            format!(
                "{}.{}.{}",
                b64_json(&with(hdr.clone(), "alg", json!("EdDSA"))),
                parts[1],
                parts[2]
            ),
            "not allowed",
        ),
        (
            "JS-20 alg missing",
            format!(
                "{}.{}.{}",
                b64_json(&without(hdr.clone(), "alg")),
                parts[1],
                parts[2]
            ),
            "not allowed",
        ),
        // An allowed alg the key cannot produce (RSA header over an EC key).
        (
            "JS-21 RS256 with an EC key",
            sign_es256(&key, &with(hdr.clone(), "alg", json!("RS256")), &claims),
            "cannot verify",
        ),
        // JS-21: signature checked with the bundle of the TD of sub.
        (
            "JS-21 stranger's key, daemon's kid",
            sign_es256(&stranger_key(), &hdr, &claims),
            "signature",
        ),
        (
            "JS-21 edited payload",
            format!(
                "{}.{}.{}",
                parts[0],
                b64_json(&with(
                    claims.clone(),
                    "sub",
                    json!(format!("spiffe://{TD}/agent/admin"))
                )),
                parts[2]
            ),
            "signature",
        ),
        (
            "JS-21 edited signature",
            {
                let mut sig = parts[2].to_owned().into_bytes();
                sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
                format!(
                    "{}.{}.{}",
                    parts[0],
                    parts[1],
                    String::from_utf8(sig).unwrap()
                )
            },
            "signature",
        ),
        (
            "JS-21 unknown kid",
            sign_es256(&key, &with(hdr.clone(), "kid", json!("nope")), &claims),
            "not in the JWT bundle",
        ),
        (
            "G-2 no kid",
            sign_es256(&key, &without(hdr.clone(), "kid"), &claims),
            "kid",
        ),
        // FB-02: the daemon's own key cannot vouch for an identity of another trust domain.
        (
            "JS-21/FB-02 sub in a TD without bundle",
            sign_es256(
                &key,
                &hdr,
                &with(claims.clone(), "sub", json!("spiffe://other.test/agent/v")),
            ),
            "no JWT bundle for trust domain other.test",
        ),
        (
            "sub missing",
            sign_es256(&key, &hdr, &without(claims.clone(), "sub")),
            "sub",
        ),
        (
            "sub not a SPIFFE ID",
            sign_es256(
                &key,
                &hdr,
                &with(claims.clone(), "sub", json!("https://x/y")),
            ),
            "sub",
        ),
        // JS-22: aud missing, or the audience not in it.
        (
            "JS-22 aud missing",
            sign_es256(&key, &hdr, &without(claims.clone(), "aud")),
            "aud",
        ),
        (
            "JS-22 wrong audience",
            sign_es256(&key, &hdr, &with(claims.clone(), "aud", json!(["other"]))),
            "audience",
        ),
        (
            "JS-22 wrong audience (string)",
            sign_es256(&key, &hdr, &with(claims.clone(), "aud", json!("other"))),
            "audience",
        ),
        // JS-23: exp missing or in the past (beyond the leeway).
        (
            "JS-23 exp missing",
            sign_es256(&key, &hdr, &without(claims.clone(), "exp")),
            "exp",
        ),
        (
            "JS-23 expired",
            sign_es256(&key, &hdr, &with(claims.clone(), "exp", json!(t - 120))),
            "expired",
        ),
        // JS-24: typ other than JWT / JOSE.
        (
            "JS-24 typ at+jwt",
            sign_es256(&key, &with(hdr.clone(), "typ", json!("at+jwt")), &claims),
            "typ",
        ),
        // JS-25: nbf in the future.
        (
            "JS-25 nbf in the future",
            sign_es256(&key, &hdr, &with(claims.clone(), "nbf", json!(t + 600))),
            "not valid yet",
        ),
        // JS-01: only compact serialization.
        (
            "JS-01 two parts",
            format!("{}.{}", parts[0], parts[1]),
            "compact",
        ),
        (
            "JS-01 JSON serialization",
            json!({"payload": parts[1], "protected": parts[0], "signature": parts[2]}).to_string(),
            "compact",
        ),
    ];

    // JS-27: the X.509 CA key (bundle use x509-svid) cannot sign JWT-SVIDs, neither under
    // the JWT key's kid nor under its own key id.
    let ca_key = daemon_ca_key(&a);
    let ca_kid = agentid::crypto::PrivateKey::from_pkcs8_der(&ca_key)
        .unwrap()
        .kid();
    cases.push((
        "JS-27 CA key, JWT kid",
        sign_es256(&ca_key, &hdr, &claims),
        "signature",
    ));
    cases.push((
        "JS-27 CA key, own kid",
        sign_es256(&ca_key, &with(hdr.clone(), "kid", json!(ca_kid)), &claims),
        "not in the JWT bundle",
    ));

    // JS-21, FB-02: a token really issued in other.test is not trusted here (no bundle for
    // it), and other.test's key cannot vouch for an agentid.local identity.
    let foreign = client(&b)
        .await
        .fetch_jwtsvid(jwt_req(&["svc"], ""))
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();
    cases.push((
        "JS-21 token of other.test",
        foreign,
        "no JWT bundle for trust domain other.test",
    ));
    let b_key = daemon_jwt_key(&b);
    let b_kid = kid_of(&b_key);
    assert!(
        jwks_of(&b, "other.test").await["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == b_kid.as_str())
    );
    cases.push((
        "FB-02 other.test's key for an agentid.local ID",
        sign_es256(&b_key, &with(hdr.clone(), "kid", json!(b_kid)), &claims),
        "not in the JWT bundle",
    ));

    for (what, token, reason) in &cases {
        let s = expect_err(validate(&a, "svc", token).await, what);
        assert_status(&s, Code::InvalidArgument, None, what);
        assert!(
            s.message().contains(reason),
            "{what}: expected reason containing {reason:?}, got {:?}",
            s.message()
        );
    }

    // Accepted variants the standard allows: aud as a single string (RFC 7519) or with
    // several values, typ JOSE or absent, nbf in the past.
    for (what, token) in [
        (
            "aud as a string",
            sign_es256(&key, &hdr, &with(claims.clone(), "aud", json!("svc"))),
        ),
        (
            "aud with several values",
            sign_es256(
                &key,
                &hdr,
                &with(claims.clone(), "aud", json!(["x", "svc"])),
            ),
        ),
        (
            "typ JOSE",
            sign_es256(&key, &with(hdr.clone(), "typ", json!("JOSE")), &claims),
        ),
        (
            "typ absent",
            sign_es256(&key, &without(hdr.clone(), "typ"), &claims),
        ),
        (
            "nbf in the past",
            sign_es256(&key, &hdr, &with(claims.clone(), "nbf", json!(t - 10))),
        ),
    ] {
        let r = validate(&a, "svc", &token)
            .await
            .unwrap_or_else(|s| panic!("{what} must be accepted: {s:?}"));
        assert_eq!(r.spiffe_id, id, "{what}");
    }
}

/// `FetchJWTBundles` JWKS for trust domain `td`.
async fn jwks_of(d: &Daemon, td: &str) -> Value {
    let mut c = client(d).await;
    let m = c
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    serde_json::from_slice(&m.bundles[&format!("spiffe://{td}")]).unwrap()
}

/// JS-30, JS-31: the JWT signing keys in the trust domain's bundle: one JWK per key with a
/// kid, public material only, matching the key the daemon signs with; `use` is `jwt-svid` in
/// the SPIFFE bundle document and absent or `jwt-svid` in the Workload API's JWKS.
#[tokio::test]
async fn jwt_keys_in_bundle_js_30_js_31() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);
    let signing = agentid::crypto::PrivateKey::from_pkcs8_der(&daemon_jwt_key(&d)).unwrap();
    let point = signing.public_sec1();

    let set = jwks(&d).await;
    let keys = set["keys"].as_array().expect("keys array");
    assert!(
        !keys.is_empty(),
        "JS-31: the trust domain supports JWT-SVIDs"
    );
    for k in keys {
        assert_eq!(k["kty"], "EC", "JB-03: kty");
        assert_eq!(k["crv"], "P-256", "JB-03: crv");
        assert!(
            k["kid"].as_str().is_some_and(|s| !s.is_empty()),
            "JS-30: kid set"
        );
        for c in ["x", "y"] {
            let v = URL_SAFE_NO_PAD
                .decode(k[c].as_str().expect("coordinate"))
                .expect("base64url");
            assert_eq!(v.len(), 32, "P-256 coordinate {c}");
        }
        assert!(k.get("x5c").is_none(), "JB-02: no x5c in a JWT bundle");
        assert!(k.get("d").is_none(), "no private key material");
        assert!(
            k.get("use").is_none_or(|u| u == "jwt-svid"),
            "JB-03: use absent or jwt-svid: {k}"
        );
    }
    let mine = keys
        .iter()
        .find(|k| k["kid"] == signing.kid())
        .expect("the signing key is published");
    assert_eq!(
        URL_SAFE_NO_PAD.decode(mine["x"].as_str().unwrap()).unwrap(),
        point[1..33]
    );
    assert_eq!(
        URL_SAFE_NO_PAD.decode(mine["y"].as_str().unwrap()).unwrap(),
        point[33..65]
    );

    // The SPIFFE bundle document: jwt-svid entries with use and kid (JS-30).
    let authority = agentid::server::Authority::open(
        &d.state.join("authority"),
        agentid::spiffe::TrustDomain::new(TD).unwrap(),
        Default::default(),
    )
    .unwrap();
    let doc: Value = serde_json::from_slice(&authority.bundle_document()).unwrap();
    let jwt: Vec<&Value> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .collect();
    assert_eq!(
        jwt.len(),
        keys.len(),
        "JS-30: one jwt-svid JWK per signing key"
    );
    for k in &jwt {
        assert!(
            keys.iter()
                .any(|w| w["kid"] == k["kid"] && w["x"] == k["x"] && w["y"] == k["y"]),
            "same keys: {k}"
        );
        assert!(k.get("x5c").is_none());
    }

    // JS-31 (consumer): the rust crate extracts the key by kid.
    let set = spiffe_client(&d).await.fetch_jwt_bundles().await.unwrap();
    let b = set.get(&spiffe::TrustDomain::new(TD).unwrap()).unwrap();
    assert!(
        b.find_jwt_authority(&signing.kid()).is_some(),
        "JS-31: key found by kid"
    );
}

/// J-01..J-04, ST-06 (FetchJWTSVID): audiences, spiffe_id selection, every identity when
/// none is named, InvalidArgument for defaulted/malformed fields, PermissionDenied when not
/// entitled.
#[tokio::test]
async fn fetch_jwt_svid_rpc_j_01_to_j_04() {
    let tmp = tempfile::tempdir().unwrap();
    let uid = my_uid();
    let first = format!("spiffe://{TD}/agent/first");
    let second = format!("spiffe://{TD}/agent/second");
    let d = start_with(
        tmp.path(),
        &[
            policy("first", "/agent/first", uid, ""),
            policy("second", "/agent/second", uid, ""),
        ],
        &[],
    );
    let mut c = client(&d).await;

    // J-01, ST-06: a defaulted audience is InvalidArgument, and so is an empty value in it.
    for (what, aud) in [
        ("no audience", vec![]),
        ("empty audience value", vec![""]),
        ("one empty among others", vec!["a", ""]),
    ] {
        let s = expect_err(c.fetch_jwtsvid(jwt_req(&aud, "")).await, what);
        assert_status(
            &s,
            Code::InvalidArgument,
            Some("audience must be specified"),
            what,
        );
    }

    // J-02, J-03: no spiffe_id => one JWT-SVID per identity, in policy order, fields set,
    // hints unique; each token's aud is the request (J-01).
    let resp = c
        .fetch_jwtsvid(jwt_req(&["a", "b"], ""))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = resp.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        [first.as_str(), second.as_str()],
        "J-02: every identity, in order"
    );
    assert_eq!(
        resp.svids
            .iter()
            .map(|s| s.hint.as_str())
            .collect::<Vec<_>>(),
        ["first", "second"],
        "J-03: unique hints"
    );
    for s in &resp.svids {
        let (_, claims) = jws_parts(&s.svid);
        assert_eq!(claims["sub"], s.spiffe_id.as_str(), "J-03: spiffe_id = sub");
        assert_eq!(claims["aud"], json!(["a", "b"]), "J-01");
    }
    // J-02: spiffe_id set => only that identity.
    let only = c
        .fetch_jwtsvid(jwt_req(&["a"], &second))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only.svids.len(), 1);
    assert_eq!(only.svids[0].spiffe_id, second);
    assert_eq!(jws_parts(&only.svids[0].svid).1["sub"], second.as_str());
    // J-02: malformed spiffe_id => InvalidArgument.
    let s = expect_err(
        c.fetch_jwtsvid(jwt_req(&["a"], "spiffe://agentid.local/a/../b"))
            .await,
        "malformed",
    );
    assert_status(&s, Code::InvalidArgument, None, "J-02 malformed spiffe_id");
    // J-04: a well-formed ID the caller is not entitled to => PermissionDenied.
    let s = expect_err(
        c.fetch_jwtsvid(jwt_req(&["a"], &format!("spiffe://{TD}/agent/third")))
            .await,
        "J-04",
    );
    assert_status(
        &s,
        Code::PermissionDenied,
        Some("no identity issued"),
        "J-04 not entitled",
    );

    // The rust client agrees.
    let sc = spiffe_client(&d).await;
    assert_eq!(
        sc.fetch_jwt_svid(["a"], None)
            .await
            .unwrap()
            .spiffe_id()
            .to_string(),
        first
    );
    let all = sc.fetch_all_jwt_svids(["a"], None).await.unwrap();
    assert_eq!(all.len(), 2);
    let by_hint = sc
        .fetch_jwt_svid_by_hint(["a"], None, "second")
        .await
        .unwrap();
    assert_eq!(by_hint.spiffe_id().to_string(), second);
    let third = spiffe::SpiffeId::new(format!("spiffe://{TD}/agent/third")).unwrap();
    let e = sc.fetch_jwt_svid(["a"], Some(&third)).await.unwrap_err();
    assert!(
        matches!(e, spiffe::WorkloadApiError::NoIdentityIssued),
        "J-04 via rust client: {e:?}"
    );
    let e = sc
        .fetch_jwt_svid(Vec::<String>::new(), None)
        .await
        .unwrap_err();
    assert!(e.is_invalid_argument(), "J-01 via rust client: {e:?}");

    // J-04: a caller with no identity at all.
    let none = start_with(
        &tmp.path().join("none"),
        &[policy("others", "/agent/x", uid + 4242, "")],
        &[],
    );
    let s = expect_err(
        client(&none).await.fetch_jwtsvid(jwt_req(&["a"], "")).await,
        "J-04 no identity",
    );
    assert_status(
        &s,
        Code::PermissionDenied,
        Some("no identity issued"),
        "J-04 no identity",
    );
    // Request validation comes before attestation, as in SPIRE: the same caller sending no
    // audience or a malformed spiffe_id is told InvalidArgument.
    let s = expect_err(
        client(&none).await.fetch_jwtsvid(jwt_req(&[], "")).await,
        "J-01 no identity",
    );
    assert_status(
        &s,
        Code::InvalidArgument,
        Some("audience must be specified"),
        "J-01 before attestation",
    );
    let s = expect_err(
        client(&none)
            .await
            .fetch_jwtsvid(jwt_req(&["a"], "spiffe://x/"))
            .await,
        "J-02 no identity",
    );
    assert_status(&s, Code::InvalidArgument, None, "J-02 before attestation");
}

/// JB-01..JB-05 (FetchJWTBundles): own trust domain keyed `spiffe://<td>`, value a UTF-8
/// JWKS, never an empty map; PermissionDenied when not entitled.
#[tokio::test]
async fn fetch_jwt_bundles_rpc_jb_01_to_jb_05() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(&tmp.path().join("a"), &[]);
    let mut c = client(&d).await;
    let m = c
        .fetch_jwt_bundles(JwtBundlesRequest {})
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
        "JB-01/JB-05: exactly the own TD"
    );
    let raw = &m.bundles[&format!("spiffe://{TD}")];
    let text = std::str::from_utf8(raw).expect("JB-01: UTF-8 JSON, not base64 or binary");
    let set: Value = serde_json::from_str(text).expect("JB-01: a JWK Set");
    let ks = set["keys"].as_array().expect("keys");
    assert!(!ks.is_empty());
    for k in ks {
        assert!(
            k.get("x5c").is_none() && k["use"] != "x509-svid",
            "JB-02: no x509-svid keys: {k}"
        );
        for f in ["kty", "kid", "crv", "x", "y"] {
            assert!(
                k[f].as_str().is_some_and(|v| !v.is_empty()),
                "JB-03: {f} in {k}"
            );
        }
    }
    // The rust client parses it.
    let set = spiffe_client(&d)
        .await
        .fetch_jwt_bundles()
        .await
        .expect("JB-05: rust client accepts");
    assert_eq!(set.len(), 1);

    // JB-04: not entitled => PermissionDenied.
    let none = start_with(
        &tmp.path().join("none"),
        &[policy("others", "/agent/x", my_uid() + 4242, "")],
        &[],
    );
    let s = expect_err(
        client(&none)
            .await
            .fetch_jwt_bundles(JwtBundlesRequest {})
            .await
            .map(|_| ()),
        "JB-04",
    );
    assert_status(
        &s,
        Code::PermissionDenied,
        Some("no identity issued"),
        "JB-04",
    );
}

/// V-01..V-05 (ValidateJWTSVID): mandatory fields, the response's spiffe_id and claims, `aud`
/// always a list and `exp` a number.
#[tokio::test]
async fn validate_jwt_svid_rpc_v_01_to_v_05() {
    let tmp = tempfile::tempdir().unwrap();
    let id = format!("spiffe://{TD}/agent/val");
    let d = start_with(
        tmp.path(),
        &[policy("val", "/agent/val", my_uid(), "")],
        &[],
    );
    let token = client(&d)
        .await
        .fetch_jwtsvid(jwt_req(&["svc"], ""))
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();

    // V-01: both fields are mandatory.
    let s = expect_err(validate(&d, "", &token).await, "V-01 no audience");
    assert_status(
        &s,
        Code::InvalidArgument,
        Some("audience must be specified"),
        "V-01 no audience",
    );
    let s = expect_err(validate(&d, "svc", "").await, "V-01 no svid");
    assert_status(
        &s,
        Code::InvalidArgument,
        Some("svid must be specified"),
        "V-01 no svid",
    );
    // V-02: an invalid token is InvalidArgument with the reason.
    let s = expect_err(validate(&d, "other", &token).await, "V-02");
    assert_status(&s, Code::InvalidArgument, None, "V-02");
    assert!(s.message().contains("audience"), "{s:?}");

    // V-03..V-05.
    let (_, claims) = jws_parts(&token);
    let r = validate(&d, "svc", &token).await.expect("valid token");
    assert_eq!(r.spiffe_id, id, "V-03: spiffe_id = sub");
    let fields = r.claims.expect("V-04: claims").fields;
    assert!(
        matches!(&fields["sub"].kind, Some(Kind::StringValue(s)) if *s == id),
        "V-04: sub"
    );
    match &fields["aud"].kind {
        Some(Kind::ListValue(l)) => {
            let v: Vec<_> = l.values.iter().map(|v| v.kind.clone()).collect();
            assert_eq!(
                v,
                [Some(Kind::StringValue("svc".into()))],
                "V-05: aud list of strings"
            );
        }
        other => panic!("V-05: aud must be a list, got {other:?}"),
    }
    assert!(
        matches!(fields["exp"].kind, Some(Kind::NumberValue(n)) if n == claims["exp"].as_i64().unwrap() as f64),
        "V-05: exp is the token's, as a number"
    );

    // V-05 for a token whose aud is a plain string: still a list in the response.
    let key = daemon_jwt_key(&d);
    let (hdr, _) = jws_parts(&token);
    let mut c2 = serde_json::Value::Object(claims.clone());
    c2["aud"] = json!("svc");
    let string_aud = sign_es256(&key, &Value::Object(hdr), &c2);
    let r = validate(&d, "svc", &string_aud)
        .await
        .expect("string aud accepted");
    assert!(
        matches!(&r.claims.unwrap().fields["aud"].kind, Some(Kind::ListValue(l)) if l.values.len() == 1),
        "V-05: aud is a list even when the token has a string"
    );

    // The rust client validates through the API (it checks the response shape, V-05).
    let v = spiffe_client(&d)
        .await
        .validate_jwt_token("svc", &token)
        .await
        .expect("rust client");
    assert_eq!(v.spiffe_id().to_string(), id);
    // And the CLI.
    let (code, out, err) =
        common::cli(&d.socket, &["jwt", "validate", "--audience", "svc", &token]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("valid: {id}")), "{out}");
}
