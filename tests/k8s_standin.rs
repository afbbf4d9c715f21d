//! The stand-in API server's generic objects (secrets, configmaps, leases, AgentIdentities)
//! driven by the real `kube` client, built the way the project builds it: what a store on
//! Kubernetes relies on (conflicts, not-found, watches with selectors) must behave as on a real
//! API server (`tests/common/k8s.rs`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use agentid::k8s::api::client_for;
use common::k8s::StandIn;
use futures::{Stream, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::json;

const TOKEN: &str = "token-1";
const NS: &str = "agentid";

/// A stand-in and a client for it (CA and token file as the server would be configured).
async fn start() -> (StandIn, Client, tempfile::TempDir) {
    let standin = StandIn::start(TOKEN, "node-a").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, token) = standin.write_files(dir.path());
    let client = client_for(&standin.url, Some(standin.ca_pem.as_bytes()), Some(&token)).unwrap();
    (standin, client, dir)
}

fn secret(name: &str, key: &str, value: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("app".to_owned(), "agentid".to_owned())].into()),
            ..ObjectMeta::default()
        },
        data: Some([(key.to_owned(), ByteString(value.to_vec()))].into()),
        ..Secret::default()
    }
}

fn agent_identities() -> ApiResource {
    let gvk = GroupVersionKind::gvk("agentid.dev", "v1alpha1", "AgentIdentity");
    ApiResource::from_gvk_with_plural(&gvk, "agentidentities")
}

fn agent_identity(name: &str, spiffe_id: &str) -> DynamicObject {
    DynamicObject::new(name, &agent_identities()).data(json!({
        "spec": {"spiffeID": spiffe_id, "selector": {"unix": {"uid": 1000}}},
    }))
}

/// The `Status` of a refused request.
fn api_error<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// The next watcher event that is not a bookmark-free re-list marker, within 5 s.
async fn next<K, S>(stream: &mut S) -> Event<K>
where
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("no watch event within 5 s")
        .expect("watch stream ended")
        .expect("watch error")
}

#[tokio::test]
async fn secrets_round_trip_conflict_not_found_and_delete() {
    let (standin, client, _dir) = start().await;
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let pp = PostParams {
        field_manager: Some("agentid".into()),
        ..PostParams::default()
    };

    let created = secrets
        .create(&pp, &secret("keys", "key.pem", b"first"))
        .await
        .unwrap();
    assert_eq!(created.namespace().as_deref(), Some(NS));
    assert!(created.uid().is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    let got = secrets.get("keys").await.unwrap();
    assert_eq!(got, created);
    assert_eq!(got.data.unwrap()["key.pem"].0, b"first");
    // The stand-in keeps the base64 the client sent.
    assert_eq!(
        standin.get_object("secrets", NS, "keys").unwrap()["data"]["key.pem"],
        "Zmlyc3Q="
    );

    let again = api_error(
        secrets
            .create(&pp, &secret("keys", "key.pem", b"other"))
            .await,
    );
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(again.message, "secrets \"keys\" already exists");

    // Replace with the current resourceVersion: a new one.
    let mut next_version = created.clone();
    next_version.data = Some([("key.pem".into(), ByteString(b"second".to_vec()))].into());
    let replaced = secrets.replace("keys", &pp, &next_version).await.unwrap();
    assert_ne!(replaced.resource_version(), created.resource_version());
    assert_eq!(replaced.uid(), created.uid());

    // Replace with the stale one: 409 Conflict, nothing changed.
    let mut stale = created.clone();
    stale.data = Some([("key.pem".into(), ByteString(b"third".to_vec()))].into());
    let conflict = api_error(secrets.replace("keys", &pp, &stale).await);
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        conflict.message,
        "Operation cannot be fulfilled on secrets \"keys\": the object has been modified; \
         please apply your changes to the latest version and try again"
    );
    let current = secrets.get("keys").await.unwrap();
    assert_eq!(current.data.as_ref().unwrap()["key.pem"].0, b"second");

    // Without a resourceVersion: unconditional.
    let mut blind = secret("keys", "key.pem", b"fourth");
    blind.metadata.resource_version = None;
    let written = secrets.replace("keys", &pp, &blind).await.unwrap();
    assert_ne!(written.resource_version(), current.resource_version());

    // The same content again: no new resourceVersion.
    let same = secrets.replace("keys", &pp, &written).await.unwrap();
    assert_eq!(same.resource_version(), written.resource_version());

    let missing = api_error(secrets.get("nope").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "secrets \"nope\" not found");
    let details = missing.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("nope", "secrets")
    );
    assert_eq!(secrets.get_opt("nope").await.unwrap(), None);
    let absent = api_error(
        secrets
            .replace("nope", &pp, &secret("nope", "k", b"v"))
            .await,
    );
    assert_eq!(absent.code, 404);

    let deleted = secrets
        .delete("keys", &DeleteParams::default())
        .await
        .unwrap();
    let status = deleted.right().expect("a Status for a deleted secret");
    assert!(status.is_success());
    assert_eq!(secrets.get_opt("keys").await.unwrap(), None);
    let gone = api_error(secrets.delete("keys", &DeleteParams::default()).await);
    assert_eq!(gone.code, 404);

    assert_eq!(
        standin.writes(),
        [
            "POST secrets agentid/keys 201",
            "POST secrets agentid/keys 409",
            "PUT secrets agentid/keys 200",
            "PUT secrets agentid/keys 409",
            "PUT secrets agentid/keys 200",
            "PUT secrets agentid/keys 200",
            "PUT secrets agentid/nope 404",
            "DELETE secrets agentid/keys 200",
            "DELETE secrets agentid/keys 404",
        ]
    );
    assert!(
        standin.unknown_params().is_empty(),
        "{:?}",
        standin.unknown_params()
    );
}

#[tokio::test]
async fn configmaps_and_leases_round_trip() {
    let (standin, client, _dir) = start().await;
    let pp = PostParams::default();

    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let map = ConfigMap {
        metadata: ObjectMeta {
            name: Some("trust-bundle".into()),
            ..ObjectMeta::default()
        },
        data: Some([("bundle.pem".to_owned(), "PEM".to_owned())].into()),
        ..ConfigMap::default()
    };
    let created = maps.create(&pp, &map).await.unwrap();
    assert_eq!(maps.get("trust-bundle").await.unwrap(), created);

    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("agentid-server".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("server-0".into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
    };
    let held = leases.create(&pp, &lease).await.unwrap();
    assert_eq!(leases.get("agentid-server").await.unwrap(), held);

    // Two contenders read the same version; the first to write wins, the second gets 409.
    let mut first = held.clone();
    first.spec.as_mut().unwrap().holder_identity = Some("server-1".into());
    let mut second = held.clone();
    second.spec.as_mut().unwrap().holder_identity = Some("server-2".into());
    leases.replace("agentid-server", &pp, &first).await.unwrap();
    let lost = api_error(leases.replace("agentid-server", &pp, &second).await);
    assert_eq!((lost.code, lost.reason.as_str()), (409, "Conflict"));
    assert!(
        lost.message
            .starts_with("Operation cannot be fulfilled on leases.coordination.k8s.io"),
        "{}",
        lost.message
    );
    let missing = api_error(leases.get("other").await);
    assert_eq!(missing.details.unwrap().group, "coordination.k8s.io");

    // A delete that names an old resourceVersion is refused.
    let stale = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version: held.resource_version(),
            uid: None,
        }),
        ..DeleteParams::default()
    };
    let refused = api_error(leases.delete("agentid-server", &stale).await);
    assert_eq!((refused.code, refused.reason.as_str()), (409, "Conflict"));
    leases
        .delete("agentid-server", &DeleteParams::default())
        .await
        .unwrap();
    assert!(standin.get_object("leases", NS, "agentid-server").is_none());
    assert!(
        standin.unknown_params().is_empty(),
        "{:?}",
        standin.unknown_params()
    );
}

#[tokio::test]
async fn watcher_with_a_name_selector_sees_only_that_secret() {
    let (standin, client, _dir) = start().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let pp = PostParams::default();
    // One that exists before the watch starts, in the initial list.
    secrets
        .create(&pp, &secret("other", "k", b"v"))
        .await
        .unwrap();

    let config = watcher::Config::default().fields("metadata.name=keys");
    let mut stream = watcher::watcher(secrets.clone(), config).boxed();
    assert!(matches!(next(&mut stream).await, Event::Init));
    assert!(matches!(next(&mut stream).await, Event::InitDone));

    // Changes to other objects (and other namespaces) are not sent.
    secrets
        .create(&pp, &secret("other-2", "k", b"v"))
        .await
        .unwrap();
    Api::<Secret>::namespaced(client.clone(), "elsewhere")
        .create(&pp, &secret("keys", "k", b"v"))
        .await
        .unwrap();
    let created = secrets
        .create(&pp, &secret("keys", "k", b"1"))
        .await
        .unwrap();
    match next(&mut stream).await {
        Event::Apply(s) => {
            assert_eq!(s.name_any(), "keys");
            assert_eq!(s.namespace().as_deref(), Some(NS));
            assert_eq!(s.resource_version(), created.resource_version());
        }
        other => panic!("expected Apply, got {other:?}"),
    }
    secrets
        .delete("other", &DeleteParams::default())
        .await
        .unwrap();
    let mut changed = created.clone();
    changed.data = Some([("k".into(), ByteString(b"2".to_vec()))].into());
    secrets.replace("keys", &pp, &changed).await.unwrap();
    match next(&mut stream).await {
        Event::Apply(s) => assert_eq!(s.data.unwrap()["k"].0, b"2"),
        other => panic!("expected Apply, got {other:?}"),
    }
    // A write by another client, through the test's helper, is seen the same way.
    standin.delete_object("secrets", NS, "keys").unwrap();
    match next(&mut stream).await {
        Event::Delete(s) => assert_eq!(s.name_any(), "keys"),
        other => panic!("expected Delete, got {other:?}"),
    }
    assert!(
        standin.unknown_params().is_empty(),
        "{:?}",
        standin.unknown_params()
    );
}

#[tokio::test]
async fn agent_identities_across_namespaces() {
    let (standin, client, _dir) = start().await;
    let ar = agent_identities();
    let pp = PostParams::default();
    let team_a: Api<DynamicObject> = Api::namespaced_with(client.clone(), "team-a", &ar);
    let team_b: Api<DynamicObject> = Api::namespaced_with(client.clone(), "team-b", &ar);
    let created = team_a
        .create(
            &pp,
            &agent_identity("planner", "spiffe://example.org/planner"),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    team_b
        .create(&pp, &agent_identity("coder", "spiffe://example.org/coder"))
        .await
        .unwrap();
    // A test can plant one as another client would.
    standin.put_object(
        "agentidentities",
        "team-b",
        json!({"metadata": {"name": "reviewer", "labels": {"tier": "gold"}}, "spec": {}}),
    );

    let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let listed = all.list(&ListParams::default()).await.unwrap();
    let names: Vec<(String, String)> = listed
        .items
        .iter()
        .map(|o| (o.namespace().unwrap(), o.name_any()))
        .collect();
    assert_eq!(
        names,
        [
            ("team-a".into(), "planner".into()),
            ("team-b".into(), "coder".into()),
            ("team-b".into(), "reviewer".into()),
        ]
    );
    assert!(listed.metadata.resource_version.is_some());
    assert_eq!(
        team_b
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    let gold = all
        .list(&ListParams::default().labels("tier=gold"))
        .await
        .unwrap();
    assert_eq!(gold.items.len(), 1);
    let in_b = all
        .list(&ListParams::default().fields("metadata.namespace=team-b,metadata.name!=coder"))
        .await
        .unwrap();
    assert_eq!(in_b.items[0].name_any(), "reviewer");
    assert_eq!(in_b.items.len(), 1);
    // Paging: one at a time, with continue tokens.
    let mut paged = Vec::new();
    let mut lp = ListParams::default().limit(1);
    loop {
        let page = all.list(&lp).await.unwrap();
        paged.extend(page.items.iter().map(ResourceExt::name_any));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => lp = lp.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(paged, ["planner", "coder", "reviewer"]);

    // A changed spec bumps the generation; the custom resource's DELETE answers the object.
    let mut changed = created.clone();
    changed.data["spec"]["spiffeID"] = json!("spiffe://example.org/planner-2");
    let replaced = team_a.replace("planner", &pp, &changed).await.unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    let deleted = team_a
        .delete("planner", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        deleted.left().expect("the deleted object").name_any(),
        "planner"
    );
    let missing = api_error(team_a.get("planner").await);
    assert_eq!(
        missing.message,
        "agentidentities.agentid.dev \"planner\" not found"
    );
    assert!(
        standin.unknown_params().is_empty(),
        "{:?}",
        standin.unknown_params()
    );
}

#[tokio::test]
async fn bad_requests_are_answered_with_a_status() {
    let (standin, client, _dir) = start().await;
    let path = format!("/api/v1/namespaces/{NS}/secrets");
    let send = |method: &str, uri: String, body: &str| {
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(body.as_bytes().to_vec())
            .unwrap();
        let client = client.clone();
        async move { api_error(client.request_text(request).await) }
    };
    let cases = [
        ("POST", path.clone(), "not json", 400, "BadRequest"),
        ("POST", path.clone(), "[1, 2]", 400, "BadRequest"),
        (
            "POST",
            path.clone(),
            r#"{"kind": "ConfigMap", "metadata": {"name": "a"}}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            path.clone(),
            r#"{"metadata": {"name": "a", "namespace": "other"}}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            path.clone(),
            r#"{"metadata": {"name": "a"}, "data": {"k": "%%%"}}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            path.clone(),
            r#"{"metadata": {"name": 7}}"#,
            400,
            "BadRequest",
        ),
        ("POST", path.clone(), r#"{"metadata": {}}"#, 422, "Invalid"),
        (
            "POST",
            path.clone(),
            r#"{"metadata": {"name": "Not_A_Name"}}"#,
            422,
            "Invalid",
        ),
        (
            "POST",
            path.clone(),
            r#"{"metadata": {"name": "a", "resourceVersion": "3"}}"#,
            500,
            "InternalError",
        ),
        (
            "POST",
            format!("{path}?dryRun=Some"),
            r#"{"metadata": {"name": "a"}}"#,
            400,
            "BadRequest",
        ),
        (
            "PUT",
            format!("{path}/a"),
            r#"{"metadata": {"name": "b"}}"#,
            400,
            "BadRequest",
        ),
        ("PATCH", format!("{path}/a"), "{}", 405, "MethodNotAllowed"),
        ("DELETE", format!("{path}/a"), "[]", 400, "BadRequest"),
        (
            "POST",
            "/api/v1/secrets".into(),
            r#"{"metadata": {"name": "a"}}"#,
            405,
            "MethodNotAllowed",
        ),
        (
            "GET",
            format!("{path}?fieldSelector=data.k%3Dv"),
            "",
            400,
            "BadRequest",
        ),
        (
            "GET",
            format!("{path}?labelSelector=a+in+(b)"),
            "",
            400,
            "BadRequest",
        ),
    ];
    for (method, uri, body, code, reason) in cases {
        let status = send(method, uri.clone(), body).await;
        assert_eq!(
            (status.code, status.reason.as_str()),
            (code, reason),
            "{method} {uri} {body}: {status:?}"
        );
    }
    assert!(standin.objects("secrets").is_empty());

    // stringData is folded into data; dryRun=All stores nothing.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let mut s = secret("a", "k", b"v");
    s.string_data = Some(BTreeMap::from([("s".into(), "text".into())]));
    let answered = secrets.create(&dry, &s).await.unwrap();
    assert_eq!(answered.data.unwrap()["s"].0, b"text");
    assert!(standin.get_object("secrets", NS, "a").is_none());
    // generateName.
    let mut generated = secret("x", "k", b"v");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let made = secrets
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    assert!(made.name_any().starts_with("gen-") && made.name_any().len() == 9);
}

#[tokio::test]
async fn refused_and_failing_writes_are_recorded() {
    let (standin, client, dir) = start().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let pp = PostParams::default();

    standin.fail_writes("secrets", "keys", Some(500));
    let failed = api_error(secrets.create(&pp, &secret("keys", "k", b"v")).await);
    assert_eq!(
        (failed.code, failed.reason.as_str()),
        (500, "InternalError")
    );
    standin.fail_writes("secrets", "keys", Some(409));
    let failed = api_error(secrets.create(&pp, &secret("keys", "k", b"v")).await);
    assert_eq!((failed.code, failed.reason.as_str()), (409, "Conflict"));
    standin.fail_writes("secrets", "keys", None);
    secrets
        .create(&pp, &secret("keys", "k", b"v"))
        .await
        .unwrap();

    // A client with a token the server no longer accepts.
    standin.set_token("token-2");
    let refused = api_error(secrets.delete("keys", &DeleteParams::default()).await);
    assert_eq!(refused.code, 401);
    standin.set_token(TOKEN);

    standin.set_garbage(true);
    assert!(matches!(
        secrets.get("keys").await,
        Err(kube::Error::SerdeError(_))
    ));
    assert!(
        secrets
            .delete("keys", &DeleteParams::default())
            .await
            .is_err()
    );
    standin.set_garbage(false);

    standin.set_down(true);
    assert!(
        secrets
            .delete("keys", &DeleteParams::default())
            .await
            .is_err()
    );
    standin.set_down(false);
    // A fresh client: the old one's pooled connection may have been closed under it.
    let (_, token) = standin.write_files(dir.path());
    let client = client_for(&standin.url, Some(standin.ca_pem.as_bytes()), Some(&token)).unwrap();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    secrets.get("keys").await.unwrap();

    // While down, a write on a pooled connection gets 503; a new connection is refused.
    let writes = standin.writes();
    assert!(
        writes[5..]
            .iter()
            .all(|w| w == "DELETE secrets agentid/keys 503"),
        "{writes:?}"
    );
    assert_eq!(
        writes[..5],
        [
            "POST secrets agentid/keys 500",
            "POST secrets agentid/keys 409",
            "POST secrets agentid/keys 201",
            "DELETE secrets agentid/keys 401",
            "DELETE secrets agentid/keys garbage",
        ]
    );
}

#[tokio::test]
async fn a_watch_from_before_a_compaction_is_expired() {
    let (standin, client, _dir) = start().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let created = secrets
        .create(&PostParams::default(), &secret("keys", "k", b"v"))
        .await
        .unwrap();
    let old = created.resource_version().unwrap();
    standin.put_object(
        "secrets",
        NS,
        json!({"metadata": {"name": "keys"}, "data": {"k": "dg=="}}),
    );
    // Before compaction, a watch from the old version gets what happened since.
    let mut events = secrets
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    let first = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first, WatchEvent::Modified(_)), "{first:?}");

    standin.compact();
    let mut events = secrets
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    let expired = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match expired {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected an Expired error, got {other:?}"),
    }

    // kube's watcher lists again and carries on.
    let mut stream = watcher::watcher(secrets.clone(), watcher::Config::default()).boxed();
    assert!(matches!(next(&mut stream).await, Event::Init));
    assert!(matches!(next(&mut stream).await, Event::InitApply(_)));
    assert!(matches!(next(&mut stream).await, Event::InitDone));
    standin.compact();
    standin.put_object(
        "secrets",
        NS,
        json!({"metadata": {"name": "more"}, "type": "Opaque"}),
    );
    let mut seen = Vec::new();
    while !seen.iter().any(|n: &String| n == "more") {
        match next(&mut stream).await {
            Event::Apply(s) | Event::InitApply(s) => seen.push(s.name_any()),
            Event::Init | Event::InitDone => {}
            Event::Delete(s) => panic!("unexpected delete of {}", s.name_any()),
        }
    }
}
