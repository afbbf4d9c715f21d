//! Policies as `AgentIdentity` custom resources (`agentid.dev/v1alpha1`, the schema of the
//! policy files): with `--store kubernetes` the server watches them in every namespace and
//! serves them, with any `--policy` files, as one policy set.
//!
//! A resource `NAME` in namespace `NS` is the policy `NAME.NS`, so two namespaces cannot
//! collide. One resource that does not validate (or whose name a policy file already uses)
//! is left out, logged and audited once per version; the others stay in force.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::audit::{Action, AuditEvent, AuditLog, Decision};
use crate::policy::{PolicySet, PolicySource, from_sources, parse_documents};
use crate::spiffe::TrustDomain;

/// The `AgentIdentity` resource.
pub fn resource() -> ApiResource {
    ApiResource {
        group: "agentid.dev".into(),
        version: "v1alpha1".into(),
        api_version: "agentid.dev/v1alpha1".into(),
        kind: "AgentIdentity".into(),
        plural: "agentidentities".into(),
    }
}

/// (namespace, name) of a resource.
type Key = (String, String);

fn key_of(obj: &DynamicObject) -> Key {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// Where a resource's policy text comes from, for messages.
fn origin_of(obj: &DynamicObject) -> String {
    let (ns, name) = key_of(obj);
    format!("AgentIdentity {ns}/{name}")
}

/// The policy text of one resource: its spec under the name `NAME.NS`, as JSON (which the
/// YAML policy parser reads), so node daemons load it exactly as the server does.
///
/// A resource selects pods of its own namespace only: whoever may create one in a namespace
/// must not grant identities to another namespace's pods or to host processes. So
/// `spec.selector.k8s` is required and its `namespace` is set to the resource's (refused if
/// it names another). Which SPIFFE IDs a namespace may claim is left to RBAC on the resource.
fn source_of(obj: &DynamicObject) -> Result<PolicySource, String> {
    let (ns, name) = key_of(obj);
    let mut spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
    let k8s = spec
        .get_mut("selector")
        .and_then(|s| s.get_mut("k8s"))
        .and_then(Value::as_object_mut)
        .ok_or("spec.selector.k8s is required: a resource selects pods of its own namespace")?;
    match k8s.get("namespace") {
        None | Some(Value::Null) => {
            k8s.insert("namespace".into(), Value::String(ns.clone()));
        }
        Some(Value::String(n)) if *n == ns => {}
        Some(other) => {
            return Err(format!(
                "spec.selector.k8s.namespace: {other} is not the resource's namespace {ns:?}"
            ));
        }
    }
    let doc = json!({
        "apiVersion": "agentid.dev/v1alpha1",
        "kind": "AgentIdentity",
        "metadata": {"name": format!("{name}.{ns}")},
        "spec": spec,
    });
    Ok(PolicySource {
        origin: origin_of(obj),
        text: serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?,
    })
}

/// The policy set of `files` and `crs`, and the resources left out with the reason.
fn combine(
    files: &PolicySet,
    crs: &BTreeMap<Key, DynamicObject>,
    td: &TrustDomain,
) -> (PolicySet, Vec<(String, String)>) {
    let mut sources = files.sources().to_vec();
    let mut names: HashSet<String> = files.policies().iter().map(|p| p.name.clone()).collect();
    let mut refused = Vec::new();
    for obj in crs.values() {
        let source = match source_of(obj) {
            Ok(s) => s,
            Err(e) => {
                refused.push((origin_of(obj), e));
                continue;
            }
        };
        match parse_documents(&source.origin, &source.text, td) {
            Ok(policies) => {
                if let Some(p) = policies.iter().find(|p| names.contains(&p.name)) {
                    refused.push((
                        source.origin.clone(),
                        format!("policy name {:?} is already in use", p.name),
                    ));
                    continue;
                }
                names.extend(policies.into_iter().map(|p| p.name));
                sources.push(source);
            }
            Err(e) => refused.push((source.origin.clone(), e.to_string())),
        }
    }
    match from_sources(sources, td) {
        Ok(set) => (set, refused),
        Err(e) => {
            // Not expected: each source was checked on its own and names are unique.
            tracing::error!(error = %e, "combining policies; serving the policy files alone");
            (files.clone(), refused)
        }
    }
}

/// The custom-resource half of the server's policies.
pub struct CrPolicies {
    api: Api<DynamicObject>,
    td: TrustDomain,
    audit: AuditLog,
    files: watch::Receiver<Arc<PolicySet>>,
    out: watch::Sender<Arc<PolicySet>>,
    crs: BTreeMap<Key, DynamicObject>,
    /// (resource, resourceVersion) already reported as refused.
    reported: HashSet<(Key, String)>,
}

impl CrPolicies {
    /// Lists the resources once (an error here is a start-up error: serving without them would
    /// withdraw identities), and returns the combined set and the follower to run.
    pub async fn start(
        client: kube::Client,
        td: TrustDomain,
        audit: AuditLog,
        files: watch::Receiver<Arc<PolicySet>>,
    ) -> Result<(Self, PolicySet), kube::Error> {
        let api: Api<DynamicObject> = Api::all_with(client, &resource());
        let listed = api.list(&ListParams::default()).await?;
        let crs = listed.items.into_iter().map(|o| (key_of(&o), o)).collect();
        let mut this = Self {
            api,
            td,
            audit,
            files,
            out: watch::Sender::new(Arc::new(PolicySet::default())),
            crs,
            reported: HashSet::new(),
        };
        let set = this.recombine();
        this.out.send_replace(Arc::new(set.clone()));
        Ok((this, set))
    }

    /// The combined policies, kept current while [`CrPolicies::run`] runs.
    pub fn subscribe(&self) -> watch::Receiver<Arc<PolicySet>> {
        self.out.subscribe()
    }

    /// Follows the resources and the policy files until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut events = watcher::watcher(self.api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listing: Option<BTreeMap<Key, DynamicObject>> = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                r = self.files.changed() => if r.is_err() { return },
                next = events.next() => match next {
                    Some(Ok(Event::Init)) => { listing = Some(BTreeMap::new()); continue }
                    Some(Ok(Event::InitApply(o))) => {
                        listing.get_or_insert_with(BTreeMap::new).insert(key_of(&o), o);
                        continue;
                    }
                    // A relist is applied whole, so policies never come and go half-way.
                    Some(Ok(Event::InitDone)) => self.crs = listing.take().unwrap_or_default(),
                    Some(Ok(Event::Apply(o))) => { self.crs.insert(key_of(&o), o); }
                    Some(Ok(Event::Delete(o))) => { self.crs.remove(&key_of(&o)); }
                    Some(Err(e)) => {
                        // The last known resources stay in force.
                        tracing::warn!(error = %e, "watching AgentIdentity resources");
                        continue;
                    }
                    None => return,
                },
            }
            let set = self.recombine();
            self.out.send_if_modified(|cur| {
                let changed = cur.sources() != set.sources();
                if changed {
                    tracing::info!(
                        policies = set.policies().len(),
                        "policies changed (AgentIdentity resources or files)"
                    );
                    *cur = Arc::new(set);
                }
                changed
            });
        }
    }

    fn recombine(&mut self) -> PolicySet {
        let files = self.files.borrow_and_update().clone();
        let (set, refused) = combine(&files, &self.crs, &self.td);
        for (origin, reason) in refused {
            let key = self
                .crs
                .iter()
                .find(|(_, o)| origin_of(o) == origin)
                .map(|(k, o)| {
                    (
                        k.clone(),
                        o.metadata.resource_version.clone().unwrap_or_default(),
                    )
                });
            if let Some(key) = key
                && !self.reported.insert(key)
            {
                continue;
            }
            tracing::error!(resource = %origin, error = %reason, "AgentIdentity left out; the other policies stay in force");
            let event = AuditEvent::new(Action::PolicyRejected, "policies")
                .decision(Decision::deny(format!("{origin}: {reason}")));
            if let Err(e) = self.audit.record(event) {
                tracing::error!(error = %e, "writing audit record");
            }
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cr(ns: &str, name: &str, spec: Value) -> DynamicObject {
        let mut o = DynamicObject::new(name, &resource()).within(ns);
        o.data = json!({ "spec": spec });
        o
    }

    fn spec(path: &str) -> Value {
        json!({
            "spiffeID": format!("spiffe://{{{{ .TrustDomain }}}}/{path}"),
            "selector": {"k8s": {"serviceAccount": "agent"}},
        })
    }

    #[test]
    fn resources_become_namespaced_policies_and_bad_ones_are_left_out() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut crs = BTreeMap::new();
        for o in [
            cr("team-a", "agent", spec("a")),
            cr("team-b", "agent", spec("b")),
            cr(
                "team-b",
                "broken",
                json!({"spiffeID": "not an id", "selector": {"k8s": {}}}),
            ),
            cr(
                "team-c",
                "typo",
                json!({"spifeID": "x", "selector": {"k8s": {}}}),
            ),
            cr(
                "team-d",
                "host",
                json!({"spiffeID": "spiffe://example.org/h", "selector": {"unix": {"uid": 0}}}),
            ),
            cr(
                "team-e",
                "reach",
                json!({"spiffeID": "spiffe://example.org/r", "selector": {"k8s": {"namespace": "kube-system"}}}),
            ),
        ] {
            crs.insert(key_of(&o), o);
        }
        let (set, refused) = combine(&PolicySet::default(), &crs, &td);
        let names: Vec<&str> = set.policies().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["agent.team-a", "agent.team-b"]);
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert_eq!(refused[0].0, "AgentIdentity team-b/broken");
        assert!(refused[1].1.contains("spifeID"), "{refused:?}");
        assert!(
            refused[2].1.contains("spec.selector.k8s is required"),
            "{refused:?}"
        );
        assert!(
            refused[3]
                .1
                .contains("\"kube-system\" is not the resource's namespace"),
            "{refused:?}"
        );
        // Each policy selects its own namespace's pods.
        for p in set.policies() {
            let ns = p.name.rsplit('.').next().unwrap();
            let k8s = p.selector.k8s.as_ref().unwrap();
            assert_eq!(k8s.namespace.as_deref(), Some(ns), "{}", p.name);
        }
        // What nodes receive parses back to the same policies.
        let again = from_sources(set.sources().to_vec(), &td).unwrap();
        assert_eq!(again.policies().len(), 2);
    }
}
