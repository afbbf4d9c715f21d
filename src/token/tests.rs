//! Task tokens end to end: minting, delegation chains, every refusal, tampering, and a
//! seeded random walk over delegation requests.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::*;
use crate::crypto::PrivateKey;
use crate::crypto::jwt::JwtSigner;
use crate::spiffe::{JwtKey, SpiffeBundle, SpiffeId, TrustDomain};

const NOW: i64 = 1_700_000_000;

struct Fixture {
    signer: JwtSigner,
    bundle: SpiffeBundle,
    td: TrustDomain,
    fan_out: FanOut,
}

impl Fixture {
    fn new() -> Self {
        let signer = JwtSigner::new(PrivateKey::generate().unwrap());
        let bundle = bundle_of(&signer);
        Self {
            signer,
            bundle,
            td: TrustDomain::new("example.org").unwrap(),
            fan_out: FanOut::new(),
        }
    }

    fn mint(
        &self,
        req: MintRequest,
        caller: &Caller,
        rules: &TokenRules,
    ) -> Result<String, Refusal> {
        mint(req, caller, rules, &self.signer, &self.td, NOW).map(|i| i.token)
    }

    fn delegate_at(
        &self,
        parent: &str,
        req: DelegateRequest,
        caller: &Caller,
        rules: &TokenRules,
        now: i64,
    ) -> Result<String, Refusal> {
        delegate(
            parent,
            req,
            caller,
            rules,
            &self.signer,
            &self.td,
            &self.bundle,
            &self.fan_out,
            now,
        )
        .map(|i| i.token)
    }

    fn delegate(
        &self,
        parent: &str,
        req: DelegateRequest,
        caller: &Caller,
        rules: &TokenRules,
    ) -> Result<String, Refusal> {
        self.delegate_at(parent, req, caller, rules, NOW)
    }

    fn verify_at(
        &self,
        token: &str,
        aud: &str,
        presenter: Option<&SpiffeId>,
        now: i64,
    ) -> Result<TaskClaims, VerifyError> {
        verify(
            token,
            aud,
            presenter,
            |t| (t == &self.td).then_some(&self.bundle),
            now,
        )
    }

    fn verify(&self, token: &str, presenter: &SpiffeId) -> Result<TaskClaims, VerifyError> {
        self.verify_at(token, "ledger", Some(presenter), NOW)
    }
}

fn bundle_of(signer: &JwtSigner) -> SpiffeBundle {
    SpiffeBundle {
        jwt_authorities: vec![JwtKey {
            kid: signer.kid().into(),
            public_sec1: signer.key().public_sec1(),
        }],
        ..Default::default()
    }
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn caller(path: &str) -> Caller {
    Caller {
        id: id(&format!("spiffe://example.org{path}")),
        cid: Some(format!("cid{}", path.replace('/', "-"))),
    }
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| (*s).to_owned()).collect()
}

/// The orchestrator's policy: mint for the ledger, delegate to sub-agents.
fn orchestrator_rules() -> TokenRules {
    TokenRules {
        audiences: strings(&["ledger", "search"]),
        scopes: strings(&["ledger:read", "ledger:write", "search:query"]),
        allowed_children: vec!["spiffe://example.org/agents/*".parse().unwrap()],
        max_depth: 2,
        max_fan_out: 2,
        ..Default::default()
    }
}

/// A sub-agent's policy: may delegate to sub-sub-agents only.
fn sub_rules() -> TokenRules {
    TokenRules {
        allowed_children: vec!["spiffe://example.org/agents/sub/*".parse().unwrap()],
        max_depth: 5,
        max_fan_out: 1,
        ..Default::default()
    }
}

fn root_request() -> MintRequest {
    MintRequest {
        audience: strings(&["ledger"]),
        scopes: strings(&["ledger:read", "ledger:write", "search:query"]),
        purpose: Some("reconcile March invoices".into()),
        subject: None,
        ttl: None,
    }
}

fn child(path: &str, scopes: &[&str], ttl: Option<u64>) -> DelegateRequest {
    DelegateRequest {
        child: id(&format!("spiffe://example.org{path}")),
        scopes: strings(scopes),
        ttl: ttl.map(Duration::from_secs),
    }
}

fn assert_rule<T: std::fmt::Debug>(r: Result<T, Refusal>, rule: &str) -> Refusal {
    let e = r.expect_err(rule);
    assert_eq!(e.rule(), rule, "{e}");
    let words = rule.replace('_', " ").replace("fan out", "fan-out");
    assert!(
        e.to_string().starts_with(&words),
        "message names the rule: {e}"
    );
    e
}

fn decode_part(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn encode_part(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[test]
fn orchestrator_to_sub_agent_to_sub_sub_agent() {
    let f = Fixture::new();
    let orch = caller("/orchestrator");
    let root = f
        .mint(root_request(), &orch, &orchestrator_rules())
        .unwrap();

    let header = decode_part(root.split('.').next().unwrap());
    assert_eq!(header["typ"], TYP);
    assert_eq!(header["alg"], "ES256");
    let payload = decode_part(root.split('.').nth(1).unwrap());
    assert_eq!(payload["scope"], "ledger:read ledger:write search:query");
    assert!(payload["aud"].is_array() && payload["exp"].is_i64());

    let r = f.verify(&root, &orch.id).unwrap();
    assert_eq!(r.iss, "spiffe://example.org");
    assert_eq!(
        r.sub, "spiffe://example.org/orchestrator",
        "acting on its own"
    );
    assert_eq!(r.exp, NOW + 300, "default max_ttl");
    assert_eq!(r.act.cid, orch.cid, "the attested caller's composite");
    assert_eq!((r.tctx.depth, r.tctx.max_depth), (2, 2));

    let sub = caller("/agents/sub");
    let t1 = f
        .delegate(
            &root,
            child("/agents/sub", &["ledger:read", "search:query"], Some(120)),
            &orch,
            &orchestrator_rules(),
        )
        .unwrap();
    let c1 = f.verify(&t1, &sub.id).unwrap();
    assert_eq!((&c1.txn, &c1.sub, &c1.aud), (&r.txn, &r.sub, &r.aud));
    assert_ne!(c1.jti, r.jti);
    assert_eq!(c1.tctx.purpose, r.tctx.purpose);
    assert_eq!(c1.act.sub, sub.id);
    assert_eq!(c1.act.cid, None, "child not attested yet");
    assert_eq!(c1.act.act.as_deref(), Some(&r.act));
    assert_eq!(c1.scope.to_string(), "ledger:read search:query");
    assert_eq!(c1.exp, NOW + 120);
    assert_eq!(c1.tctx.depth, 1);

    let later = NOW + 10;
    let subsub = caller("/agents/sub/leaf");
    let t2 = f
        .delegate_at(
            &t1,
            child("/agents/sub/leaf", &["ledger:read"], None),
            &sub,
            &sub_rules(),
            later,
        )
        .unwrap();
    let c2 = f.verify_at(&t2, "ledger", Some(&subsub.id), later).unwrap();
    assert_eq!((&c2.txn, &c2.sub, &c2.aud), (&r.txn, &r.sub, &r.aud));
    assert_eq!(c2.scope.to_string(), "ledger:read");
    assert_eq!(c2.exp, c1.exp, "no ttl: as long as the parent allows");
    assert_eq!(c2.tctx.depth, 0);
    let chain: Vec<String> = c2.act.chain().map(|a| a.sub.to_string()).collect();
    assert_eq!(
        chain,
        [
            "spiffe://example.org/agents/sub/leaf",
            "spiffe://example.org/agents/sub",
            "spiffe://example.org/orchestrator"
        ]
    );

    // The relying party authorizes the presenter: only the outermost actor may use it.
    assert!(matches!(
        f.verify_at(&t2, "ledger", Some(&sub.id), later),
        Err(VerifyError::WrongPresenter { .. })
    ));
    assert_eq!(f.verify_at(&t2, "ledger", None, later).unwrap(), c2);

    // The leaf has depth 0: it cannot delegate further, whatever its policy says.
    let leaf_rules = TokenRules {
        allowed_children: vec!["spiffe://example.org/*".parse().unwrap()],
        max_depth: 9,
        max_fan_out: 9,
        ..Default::default()
    };
    assert_rule(
        f.delegate_at(
            &t2,
            child("/agents/x", &["ledger:read"], None),
            &subsub,
            &leaf_rules,
            later,
        ),
        "max_depth",
    );
}

#[test]
fn mint_refusals_name_their_rule() {
    let f = Fixture::new();
    let orch = caller("/orchestrator");
    let rules = orchestrator_rules();
    let with = |edit: fn(&mut MintRequest)| {
        let mut r = root_request();
        edit(&mut r);
        f.mint(r, &orch, &rules)
    };
    assert_rule(with(|r| r.audience.clear()), "audience_required");
    let e = assert_rule(
        with(|r| r.audience.push("payroll".into())),
        "audience_not_allowed",
    );
    assert_eq!(
        e.to_string(),
        "audience not allowed: \"payroll\" is not in the caller's allowed audiences"
    );
    assert_rule(with(|r| r.scopes.clear()), "scope_required");
    assert_rule(
        with(|r| r.scopes.push("payroll:write".into())),
        "scope_not_allowed",
    );
    assert_rule(
        with(|r| r.subject = Some("user:alice".into())),
        "subject_not_allowed",
    );
    assert_rule(with(|r| r.ttl = Some(Duration::ZERO)), "invalid_request");
    assert_rule(
        with(|r| r.scopes.push("two words".into())),
        "invalid_request",
    );
    assert_rule(with(|r| r.purpose = Some("a\nb".into())), "invalid_request");
    let foreign = Caller {
        id: id("spiffe://other.org/orchestrator"),
        cid: None,
    };
    assert_rule(
        f.mint(root_request(), &foreign, &rules),
        "caller_trust_domain",
    );
    // Empty rules allow nothing.
    assert_rule(
        f.mint(root_request(), &orch, &TokenRules::default()),
        "audience_not_allowed",
    );
}

#[test]
fn mint_asserts_subject_only_when_allowed_and_clamps_ttl() {
    let f = Fixture::new();
    let orch = caller("/orchestrator");
    let rules = TokenRules {
        allow_subject: true,
        max_ttl: Duration::from_secs(60),
        max_depth: 99,
        ..orchestrator_rules()
    };
    let req = MintRequest {
        subject: Some("user:alice@example.com".into()),
        ttl: Some(Duration::from_secs(3600)),
        audience: strings(&["ledger", "search", "ledger"]),
        ..root_request()
    };
    let c = f
        .verify(&f.mint(req, &orch, &rules).unwrap(), &orch.id)
        .unwrap();
    assert_eq!(c.sub, "user:alice@example.com");
    assert_eq!(c.act.sub, orch.id);
    assert_eq!(c.exp, NOW + 60, "clamped to max_ttl");
    assert_eq!(c.aud, ["ledger", "search"], "deduplicated");
    assert_eq!(c.tctx.depth, MAX_DEPTH, "depth capped at the global limit");
}

#[test]
fn delegate_refusals_name_their_rule() {
    let f = Fixture::new();
    let orch = caller("/orchestrator");
    let rules = orchestrator_rules();
    let root = f.mint(root_request(), &orch, &rules).unwrap();
    let ok = || child("/agents/sub", &["ledger:read"], Some(60));

    assert_rule(
        f.delegate(
            &root,
            child("/tools/x", &["ledger:read"], None),
            &orch,
            &rules,
        ),
        "child_not_allowed",
    );
    let e = assert_rule(
        f.delegate(
            &root,
            child("/agents/sub", &["ledger:read", "ledger:admin"], None),
            &orch,
            &rules,
        ),
        "scope_widening",
    );
    assert_eq!(
        e.to_string(),
        "scope widening: \"ledger:admin\" is not in the parent token's scopes"
    );
    assert_rule(
        f.delegate(&root, child("/agents/sub", &[], None), &orch, &rules),
        "scope_required",
    );
    assert_rule(
        f.delegate(
            &root,
            child("/agents/sub", &["ledger:read"], Some(0)),
            &orch,
            &rules,
        ),
        "invalid_request",
    );

    // The parent is held by the orchestrator; nobody else may delegate it.
    let thief = caller("/agents/thief");
    assert_rule(
        f.delegate(&root, ok(), &thief, &rules),
        "not_outermost_actor",
    );
    let drifted = Caller {
        cid: Some("cid-other".into()),
        ..orch.clone()
    };
    assert_rule(
        f.delegate(&root, ok(), &drifted, &rules),
        "composite_changed",
    );

    // TTL: clamped to max_ttl, but never past the parent.
    let short = f
        .delegate(
            &root,
            child("/agents/sub", &["ledger:read"], Some(30)),
            &orch,
            &rules,
        )
        .unwrap();
    let sub = caller("/agents/sub");
    let sub_all = TokenRules {
        max_ttl: Duration::from_secs(3600),
        ..sub_rules()
    };
    let e = assert_rule(
        f.delegate(
            &short,
            child("/agents/sub/leaf", &["ledger:read"], Some(31)),
            &sub,
            &sub_all,
        ),
        "ttl_beyond_parent",
    );
    assert!(e.to_string().contains(&(NOW + 30).to_string()), "{e}");

    // Fan-out: two children per task for the orchestrator; `short` was the first.
    f.delegate(&root, ok(), &orch, &rules).unwrap();
    let e = assert_rule(f.delegate(&root, ok(), &orch, &rules), "max_fan_out");
    assert_eq!(
        e.to_string(),
        "max fan-out: the caller already delegated this task 2 times"
    );
    // Another task has its own count.
    let root2 = f.mint(root_request(), &orch, &rules).unwrap();
    f.delegate(&root2, ok(), &orch, &rules).unwrap();

    // Depth: a root minted with depth 0 cannot be delegated.
    let flat = TokenRules {
        max_depth: 0,
        ..orchestrator_rules()
    };
    let root0 = f.mint(root_request(), &orch, &flat).unwrap();
    assert_rule(f.delegate(&root0, ok(), &orch, &flat), "max_depth");

    // The parent must be a valid, live task token of this trust domain.
    assert_rule(
        f.delegate_at(&root, ok(), &orch, &rules, NOW + 300),
        "parent_expired",
    );
    assert_rule(
        f.delegate_at(&root, ok(), &orch, &rules, NOW + 1000),
        "parent_expired",
    );
    assert_rule(f.delegate("x.y.z", ok(), &orch, &rules), "parent_invalid");
    let stranger = JwtSigner::new(PrivateKey::generate().unwrap());
    let forged = mint(root_request(), &orch, &rules, &stranger, &f.td, NOW)
        .unwrap()
        .token;
    let e = assert_rule(f.delegate(&forged, ok(), &orch, &rules), "parent_invalid");
    assert!(matches!(
        e,
        Refusal::ParentInvalid(VerifyError::UnknownKid { .. })
    ));
    let svid = f
        .signer
        .sign(
            "JWT",
            &json!({"sub": orch.id.to_string(), "aud": ["x"], "exp": NOW + 60}),
        )
        .unwrap();
    let e = assert_rule(f.delegate(&svid, ok(), &orch, &rules), "parent_invalid");
    assert!(matches!(e, Refusal::ParentInvalid(VerifyError::BadTyp(_))));
}

#[test]
fn a_delegating_sub_agent_is_capped_by_its_own_policy() {
    let f = Fixture::new();
    let orch = caller("/orchestrator");
    let rules = TokenRules {
        max_depth: 4,
        ..orchestrator_rules()
    };
    let root = f.mint(root_request(), &orch, &rules).unwrap();
    let capped = TokenRules {
        max_depth: 1,
        ..rules.clone()
    };
    let t = f
        .delegate(
            &root,
            child("/agents/sub", &["ledger:read"], None),
            &orch,
            &capped,
        )
        .unwrap();
    let c = f
        .verify(&t, &id("spiffe://example.org/agents/sub"))
        .unwrap();
    assert_eq!((c.tctx.depth, c.tctx.max_depth), (1, 4));
}

#[test]
fn verify_checks_audience_time_and_trust() {
    let f = Fixture::new();
    let orch = caller("/orchestrator");
    let t = f
        .mint(root_request(), &orch, &orchestrator_rules())
        .unwrap();
    assert!(matches!(
        f.verify_at(&t, "search", None, NOW),
        Err(VerifyError::WrongAudience(a)) if a == "search"
    ));
    let leeway = crate::crypto::jwt::LEEWAY_SECS as i64;
    assert!(f.verify_at(&t, "ledger", None, NOW + 300 + leeway).is_ok());
    assert_eq!(
        f.verify_at(&t, "ledger", None, NOW + 301 + leeway),
        Err(VerifyError::Expired)
    );
    assert!(f.verify_at(&t, "ledger", None, NOW - leeway).is_ok());
    assert_eq!(
        f.verify_at(&t, "ledger", None, NOW - leeway - 1),
        Err(VerifyError::NotYetValid)
    );
    assert_eq!(
        verify(&t, "ledger", None, |_| None, NOW),
        Err(VerifyError::NoBundle(f.td.clone()))
    );
    // A bundle without the signing key (rotated out) refuses.
    let other = bundle_of(&JwtSigner::new(PrivateKey::generate().unwrap()));
    assert!(matches!(
        verify(&t, "ledger", None, |_| Some(&other), NOW),
        Err(VerifyError::UnknownKid { .. })
    ));
}

/// Re-signs arbitrary claims with the trust domain's real key: what a buggy issuer could emit.
fn signed(f: &Fixture, edit: impl FnOnce(&mut Value)) -> String {
    let orch = caller("/orchestrator");
    let t = f
        .mint(root_request(), &orch, &orchestrator_rules())
        .unwrap();
    let mut claims = decode_part(t.split('.').nth(1).unwrap());
    edit(&mut claims);
    f.signer.sign(TYP, &claims).unwrap()
}

#[test]
fn verify_refuses_malformed_claims_and_chains() {
    let f = Fixture::new();
    let check = |t: String| f.verify_at(&t, "ledger", None, NOW);
    assert!(check(signed(&f, |_| {})).is_ok());
    for (what, edit) in [
        (
            "unknown claim",
            Box::new(|c: &mut Value| c["role"] = "admin".into()) as Box<dyn Fn(&mut Value)>,
        ),
        (
            "no act",
            Box::new(|c: &mut Value| {
                c.as_object_mut().unwrap().remove("act");
            }),
        ),
        (
            "actor not a SPIFFE ID",
            Box::new(|c: &mut Value| c["act"]["sub"] = "alice".into()),
        ),
        (
            "string aud",
            Box::new(|c: &mut Value| c["aud"] = "ledger".into()),
        ),
        (
            "float exp",
            Box::new(|c: &mut Value| c["exp"] = json!(NOW as f64 + 0.5)),
        ),
        (
            "doubled scope space",
            Box::new(|c: &mut Value| c["scope"] = "a  b".into()),
        ),
    ] {
        assert!(
            matches!(check(signed(&f, edit)), Err(VerifyError::BadClaims(_))),
            "{what}"
        );
    }
    for (what, edit) in [
        (
            "empty scope",
            Box::new(|c: &mut Value| c["scope"] = "".into()) as Box<dyn Fn(&mut Value)>,
        ),
        ("empty sub", Box::new(|c: &mut Value| c["sub"] = "".into())),
        (
            "exp before nbf",
            Box::new(|c: &mut Value| c["exp"] = c["nbf"].clone()),
        ),
    ] {
        assert!(
            matches!(check(signed(&f, edit)), Err(VerifyError::BadClaims(_))),
            "{what}"
        );
    }
    for (what, edit) in [
        (
            "depth above root depth",
            Box::new(|c: &mut Value| c["tctx"]["depth"] = 3.into()) as Box<dyn Fn(&mut Value)>,
        ),
        (
            "chain longer than depth spent",
            Box::new(|c: &mut Value| {
                let inner = c["act"].clone();
                c["act"] = json!({"sub": "spiffe://example.org/agents/a", "act": inner});
                c["tctx"]["depth"] = 2.into();
            }),
        ),
        (
            "root actor in another trust domain",
            Box::new(|c: &mut Value| c["act"]["sub"] = "spiffe://other.org/x".into()),
        ),
        (
            "empty cid",
            Box::new(|c: &mut Value| c["act"]["cid"] = "".into()),
        ),
        (
            "root depth above the limit",
            Box::new(|c: &mut Value| c["tctx"]["max_depth"] = 1000.into()),
        ),
    ] {
        assert!(
            matches!(check(signed(&f, edit)), Err(VerifyError::BadChain(_))),
            "{what}"
        );
    }
    assert!(matches!(
        check(signed(&f, |c| c["iss"] =
            "spiffe://example.org/orchestrator".into())),
        Err(VerifyError::BadIssuer(_))
    ));
}

#[test]
fn tampering_fails() {
    let f = Fixture::new();
    let orch = caller("/orchestrator");
    let t = f
        .mint(root_request(), &orch, &orchestrator_rules())
        .unwrap();
    let parts: Vec<&str> = t.split('.').collect();
    let check = |t: &str| f.verify_at(t, "ledger", None, NOW);
    assert!(check(&t).is_ok());

    // Any claim edited, signature kept.
    let claims = decode_part(parts[1]);
    for key in claims.as_object().unwrap().keys() {
        let mut c = claims.clone();
        c[key] = match &c[key] {
            Value::String(s) if key == "iss" => Value::String(s.clone()),
            Value::String(s) => Value::String(format!("{s}x")),
            Value::Number(n) => json!(n.as_i64().unwrap() + 1),
            Value::Array(_) => json!(["ledger", "payroll"]),
            Value::Object(_) if key == "act" => json!({"sub": "spiffe://example.org/agents/evil"}),
            Value::Object(_) => json!({"depth": 2, "max_depth": 2, "purpose": "other"}),
            v => panic!("unexpected claim {key}: {v}"),
        };
        if key == "iss" {
            continue;
        }
        let forged = format!("{}.{}.{}", parts[0], encode_part(&c), parts[2]);
        assert_eq!(
            check(&forged),
            Err(VerifyError::BadSignature),
            "edited {key}"
        );
    }
    // Header edited (kid kept): the signature covers it too.
    let mut h = decode_part(parts[0]);
    h["cty"] = "x".into();
    let forged = format!("{}.{}.{}", encode_part(&h), parts[1], parts[2]);
    assert_eq!(check(&forged), Err(VerifyError::BadSignature));

    // Every single bit of the signature matters.
    let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    for i in [0, sig.len() / 2, sig.len() - 1] {
        let mut s = sig.clone();
        s[i] ^= 0x01;
        let forged = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&s));
        assert_eq!(check(&forged), Err(VerifyError::BadSignature), "byte {i}");
    }
    let forged = format!("{}.{}.", parts[0], parts[1]);
    assert_eq!(check(&forged), Err(VerifyError::BadSignature));

    // alg: none.
    let none = json!({"alg": "none", "kid": f.signer.kid(), "typ": TYP});
    let forged = format!("{}.{}.", encode_part(&none), parts[1]);
    assert_eq!(
        check(&forged),
        Err(VerifyError::AlgNotAllowed("none".into()))
    );

    // HS256 keyed with the public key: the classic algorithm confusion.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(f.signer.kid().into());
    header.typ = Some(TYP.into());
    let secret = jsonwebtoken::EncodingKey::from_secret(&f.signer.key().public_sec1());
    let hs = jsonwebtoken::encode(&header, &claims, &secret).unwrap();
    assert_eq!(check(&hs), Err(VerifyError::AlgNotAllowed("HS256".into())));

    // An allowed alg the key cannot verify.
    let mut es384 = decode_part(parts[0]);
    es384["alg"] = "ES384".into();
    let forged = format!("{}.{}.{}", encode_part(&es384), parts[1], parts[2]);
    assert!(matches!(
        check(&forged),
        Err(VerifyError::KeyAlgMismatch { .. })
    ));

    // kid and typ are required.
    for (field, want) in [
        ("kid", VerifyError::MissingKid),
        ("typ", VerifyError::BadTyp(String::new())),
    ] {
        let mut h = decode_part(parts[0]);
        h.as_object_mut().unwrap().remove(field);
        let forged = format!("{}.{}.{}", encode_part(&h), parts[1], parts[2]);
        assert_eq!(check(&forged), Err(want), "no {field}");
    }
    assert_eq!(check("a.b"), Err(VerifyError::Malformed));
}

/// Random delegation requests from a fixed seed: whatever is issued never has more scope,
/// more depth or a later expiry than its parent, and keeps txn, sub and aud.
#[test]
fn random_delegations_never_widen() {
    const SCOPES: [&str; 6] = ["a:r", "a:w", "b:r", "b:w", "c:r", "c:x"];
    let f = Fixture::new();
    let mut rng = fastrand::Rng::with_seed(0x7a5c);
    let agents: Vec<Caller> = (0..6).map(|i| caller(&format!("/agents/{i}"))).collect();
    let pick_scopes = |rng: &mut fastrand::Rng| -> Vec<String> {
        SCOPES
            .iter()
            .filter(|_| rng.u8(..4) == 0)
            .map(|s| (*s).to_owned())
            .collect()
    };
    let mut now = NOW;
    // (token, its claims, holder)
    let mut pool: Vec<(String, TaskClaims, Caller)> = Vec::new();
    let (mut issued, mut refused) = (0, std::collections::BTreeMap::<&str, u32>::new());
    for step in 0..600 {
        if pool.is_empty() || rng.u8(..20) == 0 {
            let holder = agents[rng.usize(..agents.len())].clone();
            let rules = TokenRules {
                audiences: strings(&["ledger"]),
                scopes: strings(&SCOPES),
                max_ttl: Duration::from_secs(rng.u64(30..600)),
                max_depth: rng.u32(1..6),
                ..Default::default()
            };
            let req = MintRequest {
                scopes: {
                    let mut s = pick_scopes(&mut rng);
                    s.push(SCOPES[rng.usize(..SCOPES.len())].into());
                    s.dedup();
                    s.sort();
                    s.dedup();
                    s
                },
                audience: strings(&["ledger"]),
                ..Default::default()
            };
            let t = mint(req, &holder, &rules, &f.signer, &f.td, now)
                .unwrap()
                .token;
            let c = f.verify_at(&t, "ledger", Some(&holder.id), now).unwrap();
            pool.push((t, c, holder));
        }
        now += i64::from(rng.u8(..8));
        // Keep tokens that just expired, to exercise `parent_expired`, but not the long dead.
        pool.retain(|(_, c, _)| c.exp + 10 > now);
        if pool.is_empty() {
            continue;
        }
        let (parent, pc, holder) = pool[rng.usize(..pool.len())].clone();
        let rules = TokenRules {
            allowed_children: vec!["spiffe://example.org/agents/*".parse().unwrap()],
            max_ttl: Duration::from_secs(rng.u64(1..400)),
            max_depth: rng.u32(0..6),
            max_fan_out: rng.u32(0..6),
            ..Default::default()
        };
        // Mostly a non-empty subset of the parent's scopes, so that delegation can succeed;
        // otherwise anything, widening or empty included.
        let scopes: Vec<String> = if rng.u8(..3) > 0 {
            let have: Vec<&str> = pc.scope.iter().collect();
            let keep = have[rng.usize(..have.len())];
            have.iter()
                .filter(|s| **s == keep || rng.bool())
                .map(|s| (*s).to_owned())
                .collect()
        } else {
            pick_scopes(&mut rng)
        };
        let ttl = match rng.u8(..3) {
            0 => None,
            _ => Some(Duration::from_secs(rng.u64(0..500))),
        };
        let child_holder = agents[rng.usize(..agents.len())].clone();
        let req = DelegateRequest {
            child: child_holder.id.clone(),
            scopes,
            ttl,
        };
        let child_holder = Caller {
            cid: None,
            ..child_holder
        };
        match f.delegate_at(&parent, req, &holder, &rules, now) {
            Err(e) => *refused.entry(e.rule()).or_default() += 1,
            Ok(t) => {
                issued += 1;
                let c = f
                    .verify_at(&t, "ledger", Some(&child_holder.id), now)
                    .unwrap_or_else(|e| panic!("step {step}: issued token does not verify: {e}"));
                assert!(c.scope.is_subset(&pc.scope), "step {step}: scope widened");
                assert!(!c.scope.is_empty());
                assert!(c.tctx.depth < pc.tctx.depth, "step {step}: depth not spent");
                assert_eq!(c.tctx.max_depth, pc.tctx.max_depth);
                assert!(c.exp <= pc.exp, "step {step}: outlives its parent");
                assert!(c.exp > now);
                assert_eq!(
                    (&c.txn, &c.sub, &c.aud, &c.iss),
                    (&pc.txn, &pc.sub, &pc.aud, &pc.iss)
                );
                assert_eq!(c.act.act.as_deref(), Some(&pc.act));
                pool.push((t, c, child_holder));
            }
        }
    }
    // The walk is only meaningful if it both issues and refuses, for several rules.
    assert!(issued > 50, "issued {issued}, refused {refused:?}");
    for rule in [
        "scope_widening",
        "max_depth",
        "max_fan_out",
        "ttl_beyond_parent",
        "parent_expired",
        "scope_required",
    ] {
        assert!(refused.contains_key(rule), "{rule} never hit: {refused:?}");
    }
}
