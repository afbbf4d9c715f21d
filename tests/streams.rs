//! An open FetchX509SVID stream follows the policies: a new identity is pushed at once, a
//! withdrawn one ends the stream with PermissionDenied, and the open-streams gauge counts
//! streams however they end.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use agentid::api::workload::X509svidRequest;
use common::Daemon;

fn ids(msg: &agentid::api::workload::X509svidResponse) -> Vec<String> {
    msg.svids.iter().map(|s| s.spiffe_id.clone()).collect()
}

fn open_streams(d: &Daemon) -> u64 {
    let addr = d.admin.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("agentid_node_open_streams "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no open_streams gauge in\n{body}"))
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn stream_follows_policy_changes_and_is_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let me = common::my_uid();
    let doc_a = common::policy_doc("a", "/a", me, "");
    let policy = common::write_policy(tmp.path(), "p.yaml", &doc_a);
    let d = Daemon::start_in(
        &tmp.path().join("d"),
        &["--policy", policy.to_str().unwrap()],
    );

    let mut client = agentid::client::connect(&d.socket).await.unwrap();
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(ids(&first), ["spiffe://agentid.local/a"]);
    assert_eq!(open_streams(&d), 1);

    // A second identity appears in the same stream.
    let doc_b = common::policy_doc("b", "/b", me, "");
    std::fs::write(&policy, format!("{doc_a}---\n{doc_b}")).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no update after the policy change")
        .unwrap()
        .unwrap();
    assert_eq!(
        ids(&next),
        ["spiffe://agentid.local/a", "spiffe://agentid.local/b"]
    );

    // No policy matches any more: the stream ends with PermissionDenied.
    std::fs::write(&policy, common::policy_doc("a", "/a", me + 1, "")).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("stream not ended after the withdrawal");
    assert_eq!(end.unwrap_err().code(), tonic::Code::PermissionDenied);
    eventually("the ended stream to be uncounted", || open_streams(&d) == 0).await;
    let log = std::fs::read_to_string(d.state.join("audit.log")).unwrap();
    assert!(log.contains("dev.agentid.withdrawn"), "{log}");

    // A stream the client drops is uncounted too.
    std::fs::write(&policy, &doc_a).unwrap();
    let stream = loop {
        // Until the reload happens, the call itself is refused.
        if let Ok(resp) = client.fetch_x509svid(X509svidRequest {}).await {
            let mut s = resp.into_inner();
            if let Ok(Some(_)) = s.message().await {
                break s;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(open_streams(&d), 1);
    drop(stream);
    eventually("the dropped stream to be uncounted", || {
        open_streams(&d) == 0
    })
    .await;
}
