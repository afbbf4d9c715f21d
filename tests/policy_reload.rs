//! Policy files against the real binary: a broken file at start is a configuration error
//! (exit 64, message naming file, document and field); while running, a broken edit is refused
//! without disturbing anyone, a valid edit reaches open streams at once, SIGHUP with unchanged
//! files sends nothing, and removing the matching policy withdraws the identity.

mod common;
mod lifecycle_support;

use std::time::Duration;

use agentid::api::workload as pb;
use common::{Daemon, my_uid, policy_doc, write_policy};
use lifecycle_support::*;

/// Bound on a policy edit reaching an open stream (the daemon debounces file events 100 ms).
const PUSH: Duration = Duration::from_secs(2);
/// How long a stream is watched to show that nothing is sent.
const QUIET: Duration = Duration::from_millis(800);

struct BadCase {
    what: &'static str,
    /// (file name, contents); the daemon is given the directory.
    files: Vec<(&'static str, String)>,
    /// Expected `<file>: document <n>: <field>` parts of the message.
    file: &'static str,
    doc: usize,
    field: &'static str,
    detail: &'static str,
}

#[test]
fn a_broken_policy_at_start_exits_64_naming_file_document_and_field() {
    let uid = my_uid();
    let good = policy_doc("good", "/agent/good", uid, "");
    let cases = vec![
        BadCase {
            what: "unknown field",
            files: vec![(
                "p.yaml",
                format!(
                    "{good}---\n{}",
                    policy_doc("bad", "/agent/bad", uid, "").replace("unix: {uid:", "unix: {uidd:")
                ),
            )],
            file: "p.yaml",
            doc: 2,
            field: "spec.selector.unix.uidd",
            detail: "unknown field",
        },
        BadCase {
            what: "bad template placeholder",
            files: vec![(
                "p.yaml",
                format!(
                    "{good}---\n{}",
                    policy_doc("bad", "/agent/{{ .Hostname }}", uid, "")
                ),
            )],
            file: "p.yaml",
            doc: 2,
            field: "spec.spiffeID",
            detail: "unknown placeholder",
        },
        BadCase {
            what: "invalid SPIFFE ID",
            files: vec![(
                "p.yaml",
                format!("{good}---\n{}", policy_doc("bad", "/agent/a%20b", uid, "")),
            )],
            file: "p.yaml",
            doc: 2,
            field: "spec.spiffeID",
            detail: "not a valid SPIFFE ID",
        },
        BadCase {
            what: "duplicate name across two files",
            files: vec![
                ("a.yaml", policy_doc("twice", "/agent/one", uid, "")),
                (
                    "b.yaml",
                    format!("{good}---\n{}", policy_doc("twice", "/agent/two", uid, "")),
                ),
            ],
            file: "b.yaml",
            doc: 2,
            field: "metadata.name",
            detail: "duplicate policy name \"twice\"",
        },
    ];
    for case in cases {
        let tmp = tempfile::tempdir().unwrap();
        let pdir = subdir(tmp.path(), "policies");
        for (name, text) in &case.files {
            write_policy(&pdir, name, text);
        }
        let err = match Daemon::try_start_in(tmp.path(), &["--policy", pdir.to_str().unwrap()]) {
            Ok(d) => panic!(
                "{}: agentid up started anyway; banner:\n{}",
                case.what, d.banner
            ),
            Err(e) => e,
        };
        assert!(
            err.contains("exit status: 64"),
            "{}: expected exit code 64: {err}",
            case.what
        );
        let want = format!(
            "{}: document {}: {}: ",
            pdir.join(case.file).display(),
            case.doc,
            case.field
        );
        assert!(
            err.contains(&want),
            "{}: stderr must contain {want:?}: {err}",
            case.what
        );
        assert!(
            err.contains(case.detail),
            "{}: stderr must say {:?}: {err}",
            case.what,
            case.detail
        );
        assert!(
            !tmp.path().join("workload.sock").exists(),
            "{}: socket created",
            case.what
        );
    }
}

fn reload_failures(d: &Daemon) -> f64 {
    let (code, body) = http_get(&d.admin, "/metrics");
    assert_eq!(code, 200);
    metric(&body, "agentid_node_policy_reload_failures_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reload_refuses_broken_edits_pushes_changes_and_withdraws() {
    let tmp = tempfile::tempdir().unwrap();
    let uid = my_uid();
    // Policies live in their own directory: the daemon watches the directory of the file.
    let pdir = subdir(tmp.path(), "policies");
    let nobody = policy_doc("nobody", "/agent/nobody", 65534, "");
    let one = policy_doc("one", "/agent/one", uid, "");
    let two = policy_doc("two", "/agent/two", uid, "");
    let file = write_policy(
        &pdir,
        "agents.yaml",
        &[one.clone(), nobody.clone()].join("---\n"),
    );
    let d = Daemon::start_in(tmp.path(), &["--policy", file.to_str().unwrap()]);
    let (id_one, id_two) = (
        "spiffe://agentid.local/agent/one",
        "spiffe://agentid.local/agent/two",
    );

    let (mut stream, first) = open_x509_stream(&d.socket).await;
    assert_eq!(ids(&first), [id_one]);
    let serial_one = serials(&first)[0].clone();
    assert_eq!(reload_failures(&d), 0.0);

    // (b) A syntax error: refused, logged, counted, audited; nothing changes for anyone.
    replace_file(&file, &format!("{one}---\nspec: [unclosed\n"));
    let counted = eventually(EVENT, || (reload_failures(&d) >= 1.0).then_some(())).await;
    assert!(
        counted.is_some(),
        "reload failure not counted; stderr:\n{}",
        d.stderr()
    );
    let log = d.stderr();
    assert!(
        log.contains("policy reload refused"),
        "refusal not logged:\n{log}"
    );
    assert!(
        log.contains(&format!("{}: document 2", file.display())),
        "refusal must name file and document:\n{log}"
    );
    let rejected: Vec<_> = audit_records(&d.state)
        .into_iter()
        .filter(|r| r["data"]["decision"]["action"] == "policy_rejected")
        .collect();
    assert_eq!(rejected.len(), 1, "one policy_rejected audit record");
    assert!(
        rejected[0]["data"]["decision"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("document 2"),
        "{:?}",
        rejected[0]
    );
    if let Some(item) = next_within(&mut stream, QUIET).await {
        panic!("a refused reload must not reach the open stream: {item:?}");
    }
    let fresh = fetch_x509(&d.socket)
        .await
        .expect("the old identity is still served");
    assert_eq!(ids(&fresh), [id_one]);
    assert_eq!(serials(&fresh), [serial_one.as_str()], "same cached SVID");
    assert_eq!(reload_failures(&d), 1.0, "one failure per refused edit");

    // (c) A valid edit adding a second matching policy reaches the open stream at once.
    replace_file(
        &file,
        &[one.clone(), two.clone(), nobody.clone()].join("---\n"),
    );
    let msg = match next_within(&mut stream, PUSH).await {
        Some(Ok(Some(m))) => m,
        other => panic!(
            "no message with both SVIDs within {PUSH:?}: {other:?}; stderr:\n{}",
            d.stderr()
        ),
    };
    assert_eq!(ids(&msg), [id_one, id_two], "complete state, in file order");
    assert_eq!(
        serials(&msg)[0],
        serial_one,
        "the unchanged identity keeps its SVID"
    );
    assert!(audit_actions(&d.state).iter().any(|a| a == "policy_loaded"));

    // (d) SIGHUP with unchanged files reloads but sends nothing.
    d.signal(libc::SIGHUP);
    let hup = eventually(EVENT, || {
        d.stderr()
            .contains("SIGHUP: reloading policies")
            .then_some(())
    })
    .await;
    assert!(
        hup.is_some(),
        "SIGHUP not acted on; stderr:\n{}",
        d.stderr()
    );
    if let Some(item) = next_within(&mut stream, QUIET).await {
        panic!("SIGHUP with unchanged files must not send a message: {item:?}");
    }

    // (e) Removing the matching policies withdraws the identities: the stream ends with
    // PERMISSION_DENIED (the very next item, so a spurious message from (d) would show here).
    replace_file(&file, &nobody);
    let status = match next_within(&mut stream, PUSH).await {
        Some(Err(status)) => status,
        other => panic!(
            "expected the stream to end with PERMISSION_DENIED within {PUSH:?}, got {other:?}"
        ),
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "no identity issued");
    assert!(
        matches!(
            next_within(&mut stream, EVENT).await,
            Some(Ok(None)) | Some(Err(_))
        ),
        "the stream is over after the withdrawal"
    );
    let withdrawn: Vec<String> = audit_records(&d.state)
        .into_iter()
        .filter(|r| r["data"]["decision"]["action"] == "withdrawn")
        .map(|r| r["subject"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        withdrawn,
        [id_one, id_two],
        "one withdrawn record per identity the stream held"
    );
    let err = fetch_x509(&d.socket)
        .await
        .expect_err("no identity any more");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(reload_failures(&d), 1.0);
}

/// XB-02 / JB-04 on open streams: a caller whose last identity is withdrawn stops receiving
/// bundles, the way FetchX509SVID ends.
#[tokio::test]
async fn withdrawal_ends_open_bundle_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let pdir = subdir(tmp.path(), "policies");
    let file = write_policy(
        &pdir,
        "a.yaml",
        &policy_doc("one", "/agent/one", my_uid(), ""),
    );
    let d = Daemon::start_in(tmp.path(), &["--policy", file.to_str().unwrap()]);
    let mut client = connect(&d.socket).await;
    let mut x509 = client
        .fetch_x509_bundles(pb::X509BundlesRequest {})
        .await
        .expect("FetchX509Bundles")
        .into_inner();
    let mut jwt = client
        .fetch_jwt_bundles(pb::JwtBundlesRequest {})
        .await
        .expect("FetchJWTBundles")
        .into_inner();
    assert!(matches!(
        next_within(&mut x509, EVENT).await,
        Some(Ok(Some(_)))
    ));
    assert!(matches!(
        next_within(&mut jwt, EVENT).await,
        Some(Ok(Some(_)))
    ));

    // Another caller's policy only: this process is entitled to nothing any more.
    replace_file(&file, &policy_doc("nobody", "/agent/nobody", 65534, ""));
    for (name, next) in [
        (
            "FetchX509Bundles",
            next_within(&mut x509, PUSH).await.map(|r| r.map(|_| ())),
        ),
        (
            "FetchJWTBundles",
            next_within(&mut jwt, PUSH).await.map(|r| r.map(|_| ())),
        ),
    ] {
        match next {
            Some(Err(status)) => {
                assert_eq!(status.code(), tonic::Code::PermissionDenied, "{name}");
                assert_eq!(status.message(), "no identity issued", "{name}");
            }
            other => panic!("{name}: expected PermissionDenied, got {other:?}"),
        }
    }
}
