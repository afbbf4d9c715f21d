//! The README demo, end to end: `agentid up` with no configuration, then a real SPIFFE
//! client fetches an X509-SVID and a JWT-SVID over the socket.

mod common;

use common::Daemon;
use spiffe::WorkloadApiClient;

#[tokio::test]
async fn zero_config_up_serves_an_svid_to_a_spiffe_client() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);
    assert!(
        d.banner.contains("trust domain agentid.local"),
        "{}",
        d.banner
    );
    assert!(d.banner.contains("default-user"), "{}", d.banner);

    let client = WorkloadApiClient::connect_to(d.endpoint()).await.unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    let name = agentid::node::attest::user_name(common::my_uid()).unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://agentid.local/user/{name}")
    );

    let token = client.fetch_jwt_token(["svc"], None).await.unwrap();
    let validated = client.validate_jwt_token("svc", &token).await.unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        svid.spiffe_id().to_string()
    );
}
