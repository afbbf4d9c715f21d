//! Facts that cost a lookup are gathered only when something uses them. The user name: a
//! `{{ .UserName }}` template, or an audit record (whose selectors always carry
//! `unix:user:<name>`). The executable's path and digest: a policy that selects on them or
//! states a composite identity, or an audit record of an issuance or a denial.

mod common;

use common::Daemon;
use spiffe::WorkloadApiClient;

fn issued_selectors(d: &Daemon) -> Vec<String> {
    selectors_of(d, "X509-SVID issuance", |r| {
        r["type"] == "dev.agentid.issued" && r["data"]["credential"]["kind"] == "x509-svid"
    })
}

fn selectors_of(d: &Daemon, what: &str, pick: impl Fn(&serde_json::Value) -> bool) -> Vec<String> {
    let log = std::fs::read_to_string(d.state.join("audit.log")).unwrap();
    let record: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(pick)
        .unwrap_or_else(|| panic!("no {what} in the audit log:\n{log}"));
    let selectors = record
        .pointer("/data/attestation/selectors")
        .unwrap_or_else(|| panic!("no selectors in {record}"));
    serde_json::from_value(selectors.clone()).unwrap()
}

/// `unix:path:` and `unix:sha256:` of this test executable.
fn my_executable_selectors() -> [String; 2] {
    let exe = std::env::current_exe().unwrap();
    let digest = agentid::crypto::keys::sha256_hex(&std::fs::read(&exe).unwrap());
    [
        format!("unix:path:{}", exe.display()),
        format!("unix:sha256:{digest}"),
    ]
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

/// The built-in policy selects on the uid alone, so the executable is not looked at to serve
/// a fetch; the records of the issuance and of a denial still name it.
#[tokio::test]
async fn records_name_the_executable_the_policy_did_not_select_on() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(&tmp.path().join("default"), &[]);
    let client = WorkloadApiClient::connect_to(d.endpoint()).await.unwrap();
    client.fetch_x509_svid().await.unwrap();
    let selectors = issued_selectors(&d);
    for s in my_executable_selectors() {
        assert!(selectors.contains(&s), "{s} not in {selectors:?}");
    }

    // A policy for another uid: the denial record names the executable too.
    let policy = common::write_policy(
        tmp.path(),
        "other.yaml",
        &common::policy_doc("other", "/other", common::my_uid() + 1, ""),
    );
    let d = Daemon::start_in(
        &tmp.path().join("other"),
        &["--policy", policy.to_str().unwrap()],
    );
    let client = WorkloadApiClient::connect_to(d.endpoint()).await.unwrap();
    client.fetch_x509_svid().await.unwrap_err();
    let selectors = selectors_of(&d, "denial", |r| r["type"] == "dev.agentid.denied");
    for s in my_executable_selectors() {
        assert!(selectors.contains(&s), "{s} not in {selectors:?}");
    }
}
