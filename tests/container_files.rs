//! Declared files are read as the caller's container sees them: a child process with its own
//! mount namespace (its own `/etc`) gets the digest of its file, not the node's, and a symlink
//! in its root pointing at `/etc/shadow` does not lead to the node's `/etc/shadow`.

mod common;
mod k8s_support;

use std::time::Duration;

use agentid::composite;
use common::Daemon;
use k8s_support::{Container, ContainerFs};

#[tokio::test]
#[ignore = "child process entry point, run by the tests in this file"]
async fn child_entry() {
    k8s_support::child_main().await;
}

fn policy(config_file: &str) -> String {
    // The test runs as root, and so does the child.
    let doc = common::policy_doc("agent", "/agent", common::my_uid(), "");
    format!("{doc}  composite:\n    agentName: refund\n    configFiles: [{config_file}]\n")
}

#[test]
fn the_digest_is_of_the_containers_file_and_symlinks_stay_inside() {
    assert!(
        !std::path::Path::new("/etc/agent/prompt.md").exists(),
        "this test needs the node to have no /etc/agent/prompt.md"
    );
    let tmp = tempfile::tempdir().unwrap();
    let policy_file = common::write_policy(tmp.path(), "p.yaml", &policy("/etc/agent/prompt.md"));
    let d = Daemon::start_in(
        &tmp.path().join("d"),
        &["--policy", policy_file.to_str().unwrap()],
    );
    let etc = ContainerFs::new();
    etc.write("agent/prompt.md", "You are the container's agent.");
    etc.symlink("agent/evil.md", "/etc/shadow");
    let (pod, cid) = k8s_support::new_ids();

    let mut c = Container::start("child_entry", "fetch", &d.socket, &etc, &pod, &cid);
    c.go();
    let got = c.next(Duration::from_secs(20));
    let leaf = hex::decode(got["leaf"].as_str().unwrap_or_else(|| panic!("{got}"))).unwrap();
    let identity = composite::from_certificate(&leaf).unwrap().unwrap();
    let file_digest = composite::sha256_digest(b"You are the container's agent.");
    let expected =
        composite::combine_file_digests(&[("/etc/agent/prompt.md", file_digest.as_str())]).unwrap();
    assert_eq!(identity.config_digest, Some(expected));
    drop(c);

    // The symlink resolves inside the container's root, where there is no /etc/shadow.
    std::fs::write(&policy_file, policy("/etc/agent/evil.md")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Container::start("child_entry", "fetch", &d.socket, &etc, &pod, &cid);
        c.go();
        let got = c.next(Duration::from_secs(20));
        let err = got["error"].as_str().unwrap_or_default().to_owned();
        if err.contains("evil.md") {
            assert!(err.contains("Unavailable"), "{err}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected an attestation failure naming evil.md, got {got}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(d.state.join("audit.log")).unwrap();
    assert!(log.contains("evil.md"), "{log}");
}
