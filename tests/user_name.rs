//! The caller's user name is looked up only when something uses it: a `{{ .UserName }}`
//! template, or an audit record (whose selectors always carry `unix:user:<name>`).

mod common;

use common::Daemon;
use spiffe::WorkloadApiClient;

fn issued_selectors(d: &Daemon) -> Vec<String> {
    let log = std::fs::read_to_string(d.state.join("audit.log")).unwrap();
    let issued: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| {
            r["type"] == "dev.agentid.issued" && r["data"]["credential"]["kind"] == "x509-svid"
        })
        .unwrap_or_else(|| panic!("no X509-SVID issuance in the audit log:\n{log}"));
    let selectors = issued
        .pointer("/data/attestation/selectors")
        .unwrap_or_else(|| panic!("no selectors in {issued}"));
    serde_json::from_value(selectors.clone()).unwrap()
}

#[tokio::test]
async fn user_name_template_and_audit_selectors() {
    let name = agentid::node::attest::user_name(common::my_uid()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let policy = common::write_policy(
        tmp.path(),
        "named.yaml",
        &common::policy_doc("named", "/u/{{ .UserName }}", common::my_uid(), ""),
    );
    let d = Daemon::start_in(
        &tmp.path().join("named"),
        &["--policy", policy.to_str().unwrap()],
    );
    let client = WorkloadApiClient::connect_to(d.endpoint()).await.unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://agentid.local/u/{name}")
    );
    assert!(issued_selectors(&d).contains(&format!("unix:user:{name}")));

    // The built-in policy does not render the name, and the audit record still carries it.
    let d = Daemon::start_in(&tmp.path().join("default"), &[]);
    let client = WorkloadApiClient::connect_to(d.endpoint()).await.unwrap();
    client.fetch_x509_svid().await.unwrap();
    assert!(issued_selectors(&d).contains(&format!("unix:user:{name}")));
}
