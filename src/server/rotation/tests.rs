//! The key lifecycle under an injected clock: the authority is driven with `tick(now)` and
//! `rotate_now_at(kind, now)`; nothing sleeps. Signing uses the real clock, so the simulated
//! clock starts now and only moves forward.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Map;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use super::*;
use crate::crypto::x509::CaSigner;
use crate::crypto::{PrivateKey, sha256_hex};
use crate::server::keys::KeyChange;
use crate::server::state::KeyKind;
use crate::server::store::FileStore;
use crate::server::{
    AuthorityConfig, AuthorityConfigError, AuthorityError, KeySlot, MAX_JWT_LIFETIME,
};
use crate::spiffe::SpiffeBundle;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// Short lifetimes, different per kind so their steps interleave.
fn config() -> AuthorityConfig {
    AuthorityConfig {
        ca_ttl: Duration::from_secs(1200),
        jwt_key_ttl: Duration::from_secs(900),
        prepare_ahead: Duration::from_secs(100),
        refresh_hint: Duration::from_secs(30),
    }
}

fn open(dir: &Path, now: SystemTime) -> Authority {
    Authority::open_at(dir, td(), config(), now).unwrap()
}

fn extension(der: &[u8], pick: impl Fn(&ParsedExtension) -> Option<Vec<u8>>) -> Vec<u8> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.extensions()
        .iter()
        .find_map(|e| pick(e.parsed_extension()))
        .expect("key identifier extension")
}

/// Which CA of `bundle` signed `leaf` (by authority and subject key identifiers).
fn signer_in(bundle: &SpiffeBundle, leaf: &[u8]) -> Option<usize> {
    let aki = extension(leaf, |e| match e {
        ParsedExtension::AuthorityKeyIdentifier(a) => {
            a.key_identifier.as_ref().map(|k| k.0.to_vec())
        }
        _ => None,
    });
    bundle.x509_authorities.iter().position(|ca| {
        extension(ca, |e| match e {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        }) == aki
    })
}

/// An X509-SVID signed now, with the longest TTL a policy allows.
fn svid(a: &Authority) -> Vec<u8> {
    let k = PrivateKey::generate().unwrap();
    let id = td().id("/w").unwrap();
    a.sign_x509_svid(&id, &k.spki_der(), Duration::from_secs(30 * 24 * 3600), &[])
        .unwrap()
        .remove(0)
}

fn jwt(a: &Authority, ttl: Duration) -> String {
    let id = td().id("/w").unwrap();
    a.sign_jwt_svid(&id, &["aud".into()], ttl, Map::new())
        .unwrap()
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

/// The CA that signs now, as its position in the bundle.
fn signing_ca(a: &Authority) -> Vec<u8> {
    let bundle = a.bundle();
    let i = signer_in(&bundle, &svid(a)).expect("the signing CA is in the bundle");
    bundle.x509_authorities[i].clone()
}

fn ca_der(slot: &KeySlot) -> Vec<u8> {
    pem::parse(slot.cert.as_deref().unwrap())
        .unwrap()
        .into_contents()
}

fn changes(events: &[KeyEvent]) -> Vec<(KeyKind, KeyChange)> {
    events.iter().map(|e| (e.kind, e.change)).collect()
}

#[test]
fn scheduled_rotation_publishes_next_before_it_signs_and_keeps_previous() {
    let t0 = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), t0);
    let mut watch = a.subscribe();
    let first = a.bundle();
    assert_eq!(
        (
            first.sequence,
            first.x509_authorities.len(),
            first.jwt_authorities.len()
        ),
        (1, 1, 1)
    );
    let ca0 = first.x509_authorities[0].clone();
    let jwt0 = first.jwt_authorities[0].kid.clone();
    let secs = |s: u64| t0 + Duration::from_secs(s);

    // JWT key: 900 s, signs until 450 s, next prepared 100 s before.
    assert_eq!(a.rotation_due(), secs(350));
    assert!(a.tick(secs(349)).unwrap().is_empty(), "nothing early");
    assert!(!watch.has_changed().unwrap());
    let events = a.tick(secs(350)).unwrap();
    assert_eq!(changes(&events), [(KeyKind::Jwt, KeyChange::Prepared)]);
    let jwt1 = events[0].kid.clone().unwrap();
    assert!(
        events[0]
            .reason()
            .starts_with(&format!("prepared next JWT key {jwt1}"))
    );
    // Published at once (the watch fired), sequence bumped; the old key still signs.
    assert!(watch.has_changed().unwrap());
    let b = watch.borrow_and_update().clone();
    assert_eq!(b.sequence, 2);
    let kids: Vec<_> = b.jwt_authorities.iter().map(|k| k.kid.clone()).collect();
    assert_eq!(kids, [jwt0.clone(), jwt1.clone()]);
    assert_eq!(kid(&jwt(&a, Duration::from_secs(60))), jwt0);

    let events = a.tick(secs(450)).unwrap();
    assert_eq!(changes(&events), [(KeyKind::Jwt, KeyChange::Activated)]);
    assert_eq!(events[0].notice, Some(Duration::from_secs(100)));
    assert_eq!(kid(&jwt(&a, Duration::from_secs(60))), jwt1, "next signs");
    assert!(
        !watch.has_changed().unwrap(),
        "activation changes no bundle: the same keys, in the same order"
    );
    assert_eq!(a.bundle().sequence, 2);

    // CA: 1200 s (notAfter in whole seconds), prepared about 100 s before 600 s.
    let due = a.rotation_due();
    assert!(due > secs(498) && due <= secs(500), "{due:?}");
    let events = a.tick(due).unwrap();
    assert_eq!(changes(&events), [(KeyKind::X509Ca, KeyChange::Prepared)]);
    assert!(events[0].reason().starts_with("prepared next CA sha256:"));
    let b = watch.borrow_and_update().clone();
    assert_eq!(b.sequence, 3);
    assert_eq!(b.x509_authorities.len(), 2);
    assert_eq!(b.x509_authorities[0], ca0);
    let ca1 = b.x509_authorities[1].clone();
    assert_eq!(
        signing_ca(&a),
        ca0,
        "the published next CA does not sign yet"
    );
    let old_svid = svid(&a);

    let events = a.tick(due + Duration::from_secs(100)).unwrap();
    assert_eq!(changes(&events), [(KeyKind::X509Ca, KeyChange::Activated)]);
    assert_eq!(signing_ca(&a), ca1, "the next CA signs once activated");
    // The SVID the old CA signed still chains to the bundle.
    assert_eq!(signer_in(&a.bundle(), &old_svid), Some(0));

    // The old CA stays until its own notAfter (every SVID it signed is capped there)...
    let ca0_not_after = CaSigner::from_parts(
        PrivateKey::from_pkcs8_pem(&a.key_state().x509.previous[0].key).unwrap(),
        ca0.clone(),
    )
    .unwrap()
    .not_after();
    let leaf_not_after = crate::crypto::x509::CertInfo::parse(&old_svid)
        .unwrap()
        .not_after;
    assert!(leaf_not_after <= ca0_not_after);
    let mut log = Vec::new();
    let mut now = due + Duration::from_secs(100);
    while now < ca0_not_after {
        now = a.rotation_due().min(ca0_not_after);
        let before = a.bundle();
        let events = a.tick(now).unwrap();
        if now < ca0_not_after {
            assert!(
                before.x509_authorities.contains(&ca0),
                "old CA in the bundle at {now:?}"
            );
        }
        log.extend(events);
    }
    // ... and is retired exactly then, along with whatever else was due.
    assert!(!a.bundle().x509_authorities.contains(&ca0));
    let retired: Vec<_> = log
        .iter()
        .filter(|e| e.change == KeyChange::Retired)
        .map(|e| e.kind)
        .collect();
    assert_eq!(retired, [KeyKind::X509Ca], "the JWT key waits 1 h + grace");
    assert!(a.bundle().jwt_authorities.iter().any(|k| k.kid == jwt0));
}

#[test]
fn previous_jwt_key_stays_until_its_longest_token_has_expired() {
    let t0 = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), t0);
    let jwt0 = a.bundle().jwt_authorities[0].kid.clone();
    a.tick(t0 + Duration::from_secs(350)).unwrap();
    // Asking for more than the maximum gets the maximum (1 h): retirement relies on it.
    let token = jwt(&a, Duration::from_secs(24 * 3600));
    let payload = token.split('.').nth(1).unwrap();
    use base64::Engine;
    let payload: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    let (iat, exp) = (
        payload["iat"].as_i64().unwrap(),
        payload["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, MAX_JWT_LIFETIME.as_secs() as i64);
    let deactivated = t0 + Duration::from_secs(450);
    assert_eq!(
        changes(&a.tick(deactivated).unwrap()),
        [(KeyKind::Jwt, KeyChange::Activated)]
    );
    let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(exp as u64);
    let retire = deactivated + MAX_JWT_LIFETIME + crate::server::state::RETIRE_GRACE;
    assert!(
        retire > expires,
        "retired only after every token it signed expired"
    );
    let mut now = deactivated;
    while now < retire {
        assert!(a.bundle().jwt_authorities.iter().any(|k| k.kid == jwt0));
        now = a.rotation_due().min(retire);
        a.tick(now).unwrap();
    }
    assert!(!a.bundle().jwt_authorities.iter().any(|k| k.kid == jwt0));
}

/// Runs the schedule of `config` for `span` and checks every step: keys go through prepare,
/// activate, retire in order; each signs only after `prepare_ahead` in the bundle; what signs
/// is always published; the sequence bumps exactly on content changes. Returns the most keys
/// of each kind the bundle held at once.
fn run_schedule(config: AuthorityConfig, span: Duration) -> (usize, usize) {
    let t0 = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let a = Authority::open_at(dir.path(), td(), config.clone(), t0).unwrap();
    // Per key: the steps it went through; the first keys start out signing.
    let mut seen: HashMap<String, Vec<KeyChange>> = HashMap::new();
    let mut bundle = a.bundle();
    let state = a.key_state();
    let first_jwt = PrivateKey::from_pkcs8_pem(&state.jwt.current.key).unwrap();
    for first in [
        sha256_hex(&bundle.x509_authorities[0]),
        sha256_hex(&first_jwt.spki_der()),
    ] {
        seen.insert(first, vec![KeyChange::Prepared, KeyChange::Activated]);
    }
    let mut most = (1, 1);
    let mut now = t0;
    let mut rotations = 0;
    while now < t0 + span {
        now = a.rotation_due();
        let events = a.tick(now).unwrap();
        assert!(
            !events.is_empty(),
            "rotation_due said something was due at {now:?}"
        );
        let after = a.bundle();
        let changed = after.x509_authorities != bundle.x509_authorities
            || after.jwt_authorities != bundle.jwt_authorities;
        let want = bundle.sequence + u64::from(changed);
        assert_eq!(
            after.sequence, want,
            "sequence bumps on every content change"
        );
        for e in &events {
            seen.entry(e.fingerprint.clone())
                .or_default()
                .push(e.change);
            if e.change == KeyChange::Activated {
                rotations += 1;
                assert!(
                    e.notice.unwrap() >= config.prepare_ahead,
                    "{e:?} signs before it was announced for prepare_ahead"
                );
            }
        }
        // Keys signing now are published.
        assert!(signer_in(&after, &svid(&a)).is_some());
        let k = kid(&jwt(&a, Duration::from_secs(60)));
        assert!(after.jwt_authorities.iter().any(|j| j.kid == k));
        most.0 = most.0.max(after.x509_authorities.len());
        most.1 = most.1.max(after.jwt_authorities.len());
        bundle = after;
    }
    assert!(rotations > 10, "{rotations}");
    for (key, steps) in seen {
        let full = [
            KeyChange::Prepared,
            KeyChange::Activated,
            KeyChange::Retired,
        ];
        assert!(
            full.starts_with(&steps),
            "{key} went through {steps:?}, not a prefix of prepare, activate, retire"
        );
    }
    most
}

#[test]
fn every_step_is_ordered_announced_and_counted_over_many_rotations() {
    // Defaults, a month: at most one previous CA at a time (it overlaps the next one), and
    // a previous JWT key is gone before the next one is prepared.
    let month = Duration::from_secs(30 * 24 * 3600);
    assert_eq!(run_schedule(AuthorityConfig::default(), month), (3, 2));
    // Short lifetimes: a JWT key rotated every 400 s stays 1 h + grace after, so several
    // previous keys overlap; CAs never outlive their certificate.
    let (cas, jwts) = run_schedule(config(), Duration::from_secs(10 * 3600));
    assert_eq!(cas, 3);
    let kept = (MAX_JWT_LIFETIME + crate::server::state::RETIRE_GRACE).as_secs() / 400;
    assert!(jwts <= kept as usize + 3, "{jwts}");
}

#[test]
fn rotate_now_activates_the_published_next_or_an_unannounced_new_key() {
    let t0 = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), t0);
    let mut watch = a.subscribe();
    let ca0 = a.bundle().x509_authorities[0].clone();

    // No next CA yet: one is made and signs at once, in the same bundle change.
    let events = a
        .rotate_now_at(KeyKind::X509Ca, t0 + Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        changes(&events),
        [
            (KeyKind::X509Ca, KeyChange::Prepared),
            (KeyKind::X509Ca, KeyChange::Activated)
        ]
    );
    assert!(events.iter().all(|e| e.emergency));
    assert_eq!(events[1].notice, Some(Duration::ZERO));
    assert!(
        events[1].reason().contains("unannounced"),
        "{}",
        events[1].reason()
    );
    assert!(watch.has_changed().unwrap());
    let b = watch.borrow_and_update().clone();
    assert_eq!(b.sequence, 2);
    assert_eq!(b.x509_authorities[0], ca0, "the old CA stays trusted");
    assert_eq!(signing_ca(&a), b.x509_authorities[1]);

    // A published next JWT key is activated early, with the notice it had.
    a.tick(t0 + Duration::from_secs(350)).unwrap();
    let next = a.key_state().jwt.next.unwrap();
    let events = a
        .rotate_now_at(KeyKind::Jwt, t0 + Duration::from_secs(360))
        .unwrap();
    assert_eq!(changes(&events), [(KeyKind::Jwt, KeyChange::Activated)]);
    assert_eq!(events[0].notice, Some(Duration::from_secs(10)));
    let k = PrivateKey::from_pkcs8_pem(&next.key).unwrap().kid();
    assert_eq!(kid(&jwt(&a, Duration::from_secs(60))), k);

    // Twice in a row: both earlier keys stay until their own retirement.
    a.rotate_now_at(KeyKind::X509Ca, t0 + Duration::from_secs(370))
        .unwrap();
    let state = a.key_state();
    assert_eq!(state.x509.previous.len(), 2);
    assert_eq!(ca_der(&state.x509.previous[0]), ca0);
    assert_eq!(a.bundle().x509_authorities.len(), 3);

    // The audit record says what happened.
    let record = events[0].audit_event(&td());
    assert_eq!(record.action, crate::audit::Action::BundleUpdated);
    let decision = record.decision.unwrap();
    assert_eq!(decision.policy.as_deref(), Some("emergency rotation"));
    assert!(decision.reason.unwrap().contains(&k));
}

#[test]
fn after_downtime_an_expired_ca_is_replaced_at_once_and_a_jwt_key_with_notice() {
    let t0 = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let ca0 = open(dir.path(), t0).bundle().x509_authorities[0].clone();
    // Back after 2000 s: the 1200 s CA has expired, the JWT key is overdue.
    let later = t0 + Duration::from_secs(2000);
    let a = open(dir.path(), later);
    let events = a.tick(later).unwrap();
    assert_eq!(
        changes(&events),
        [
            (KeyKind::X509Ca, KeyChange::Prepared),
            (KeyKind::X509Ca, KeyChange::Activated),
            (KeyKind::X509Ca, KeyChange::Retired),
            (KeyKind::Jwt, KeyChange::Prepared),
        ]
    );
    assert_eq!(events[1].notice, Some(Duration::ZERO));
    assert!(
        events[1].reason().contains("unannounced"),
        "{}",
        events[1].reason()
    );
    assert_eq!(ca_der(&a.key_state().x509.current), signing_ca(&a));
    assert!(!a.bundle().x509_authorities.contains(&ca0));
    // The JWT key still signs until its successor has been announced.
    assert_eq!(a.rotation_due(), later + Duration::from_secs(100));
}

#[test]
fn a_restart_in_any_state_resumes_the_schedule() {
    let t0 = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let mut a = Arc::new(open(dir.path(), t0));
    let mut now = t0;
    let mut steps = 0;
    while now < t0 + Duration::from_secs(3 * 3600) {
        now = a.rotation_due();
        a.tick(now).unwrap();
        if steps % 5 == 4 {
            a.rotate_now_at(KeyKind::ALL[steps % 2], now).unwrap();
        }
        steps += 1;
        // Reopen from the store: the same keys, bundle, schedule and signers.
        let b = Arc::new(open(dir.path(), now));
        assert_eq!(b.key_state(), a.key_state());
        assert_eq!(*b.bundle(), *a.bundle());
        assert_eq!(b.rotation_due(), a.rotation_due());
        assert_eq!(signing_ca(&b), signing_ca(&a));
        let short = Duration::from_secs(60);
        assert_eq!(kid(&jwt(&b, short)), kid(&jwt(&a, short)));
        assert!(
            b.tick(now).unwrap().is_empty(),
            "nothing left due after a restart"
        );
        // Carry on with the reopened one.
        a = b;
    }
    assert!(steps > 20, "{steps}");
}

#[test]
fn a_half_written_temp_file_does_not_break_loading() {
    let t0 = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), t0);
    let bundle = a.bundle();
    let text = std::fs::read_to_string(dir.path().join("keys.json")).unwrap();
    // A crash mid-write of the next state: the temp file holds half a document.
    std::fs::write(dir.path().join(".keys.json.tmp"), &text[..text.len() / 2]).unwrap();
    drop(a);
    let a = open(dir.path(), t0);
    assert_eq!(*a.bundle(), *bundle);
    let due = a.rotation_due();
    assert!(!a.tick(due).unwrap().is_empty());
    assert!(!dir.path().join(".keys.json.tmp").exists());
    assert_eq!(*open(dir.path(), due).bundle(), *a.bundle());
}

#[test]
fn key_state_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("authority");
    let a = open(&state, SystemTime::now());
    a.tick(a.rotation_due()).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    let mut files: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, [".keys.lock", "keys.json", "trust-domain"]);
    for f in files {
        assert_eq!(mode(&state.join(&f)), 0o600, "{f}");
    }
}

#[test]
fn a_concurrent_writer_is_noticed_and_its_state_adopted() {
    let t0 = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), t0);
    let b = open(dir.path(), t0);
    let due = a.rotation_due();
    assert_eq!(a.tick(due).unwrap().len(), 1);
    // b still holds the old revision: its save is refused, it reloads a's state, and the
    // step is no longer due there.
    assert!(b.tick(due).unwrap().is_empty());
    assert_eq!(*b.bundle(), *a.bundle());
    assert_eq!(b.key_state(), a.key_state());
}

#[test]
fn the_layout_before_rotation_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileStore::open(dir.path()).unwrap();
    // What the previous version wrote: one PEM file per key, a CA valid for a year.
    let ca = CaSigner::generate(&td(), Duration::from_secs(365 * 24 * 3600)).unwrap();
    let jwt_key = PrivateKey::generate().unwrap();
    files.write("trust-domain", b"example.org").unwrap();
    files
        .write("x509-ca.current.key", ca.key().pkcs8_pem().as_bytes())
        .unwrap();
    files
        .write(
            "x509-ca.current.crt",
            crate::crypto::x509::to_pem(&[ca.cert_der().to_vec()]).as_bytes(),
        )
        .unwrap();
    files
        .write("jwt.current.key", jwt_key.pkcs8_pem().as_bytes())
        .unwrap();

    let now = SystemTime::now();
    let a = Authority::open_at(dir.path(), td(), AuthorityConfig::default(), now).unwrap();
    let b = a.bundle();
    assert_eq!(b.x509_authorities, [ca.cert_der().to_vec()]);
    assert_eq!(b.jwt_authorities[0].kid, jwt_key.kid());
    assert_eq!(b.sequence, 1, "the same bundle as before");
    for old in [
        "x509-ca.current.key",
        "x509-ca.current.crt",
        "jwt.current.key",
    ] {
        assert!(!dir.path().join(old).exists(), "{old} removed");
    }
    // The year-long CA now follows the configured lifetime: it stops signing after half of
    // 7 days, and a next CA is announced an hour before.
    let rules = AuthorityConfig::default().lifecycle(KeyKind::X509Ca);
    let state = a.key_state();
    assert_eq!(
        state.x509.prepare_at(&rules).unwrap(),
        state.x509.current.published_at + Duration::from_secs(7 * 24 * 3600 / 2 - 3600)
    );
    assert!(a.tick(now).unwrap().is_empty());
    // Reopening reads the new document.
    drop(a);
    let a = Authority::open_at(dir.path(), td(), AuthorityConfig::default(), now).unwrap();
    assert_eq!(*a.bundle(), *b);
}

#[test]
fn configs_that_would_sign_with_unannounced_keys_are_refused() {
    assert!(AuthorityConfig::default().validate().is_ok());
    assert!(config().validate().is_ok());
    let short_notice = AuthorityConfig {
        prepare_ahead: Duration::from_secs(89),
        ..config()
    };
    assert!(matches!(
        short_notice.validate(),
        Err(AuthorityConfigError::PrepareAhead { .. })
    ));
    let short_life = AuthorityConfig {
        jwt_key_ttl: Duration::from_secs(299),
        ..config()
    };
    let err = short_life.validate().unwrap_err();
    assert!(err.to_string().contains("--jwt-key-ttl"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Authority::open(dir.path(), td(), short_life),
        Err(AuthorityError::Config(_))
    ));
}
