//! `--store kubernetes`: the server's state in the cluster's API (etcd), shared by replicas.
//!
//! - Documents (the key state, the join tokens) are Secrets in the server's namespace, one
//!   data key each, replaced with a compare-and-swap on `resourceVersion`. A write either
//!   lands whole or not at all, so a crash never leaves half a key.
//! - The bundle is the ConfigMap [`BUNDLE_CONFIGMAP`] (`bundle.spiffe`, `bundle.pem`), for
//!   node daemons to bootstrap from and humans to read; the Lease holder writes it.
//! - Replicas that do not hold the Lease follow the key Secret with a watch and take up each
//!   change (see `Authority::reload`).
//!
//! RBAC (namespace): Secrets [`KEYS_SECRET`] and [`JOIN_SECRET`], ConfigMap
//! [`BUNDLE_CONFIGMAP`], Lease `agentid-server`: get, list, watch, create, update.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::authority::Authority;
use super::join;
use super::store::{DocStore, Revision, STATE_FILE, StoreError};
use crate::k8s::error_chain;

/// The Secret holding the CA and JWT keys ([`STATE_FILE`]).
pub const KEYS_SECRET: &str = "agentid-server-keys";
/// The Secret holding join-token digests ([`join::DOC`]).
pub const JOIN_SECRET: &str = "agentid-join-tokens";
/// The ConfigMap the bundle is published in.
pub const BUNDLE_CONFIGMAP: &str = "agentid-bundle";
/// Label on every object the server writes.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "agentid-server");

/// The Secret that holds document `doc`.
fn secret_for(doc: &str) -> String {
    match doc {
        STATE_FILE => KEYS_SECRET.to_owned(),
        join::DOC => JOIN_SECRET.to_owned(),
        other => format!(
            "agentid-{}",
            other.trim_end_matches(".json").replace('.', "-")
        ),
    }
}

fn labels() -> Option<BTreeMap<String, String>> {
    Some(BTreeMap::from([(
        MANAGED_BY.0.to_owned(),
        MANAGED_BY.1.to_owned(),
    )]))
}

/// Documents in Secrets. Calls block on the API: make them from blocking threads (never from
/// inside the async runtime, whose handle they use).
#[derive(Clone)]
pub struct SecretStore {
    api: Api<Secret>,
    namespace: String,
    handle: Handle,
}

impl SecretStore {
    /// Documents in Secrets of `namespace`, requests made on the current runtime.
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            handle: Handle::current(),
        }
    }

    fn api_error(&self, doc: &str, e: &kube::Error) -> StoreError {
        StoreError::Api {
            what: self.describe(doc),
            reason: describe(e),
        }
    }
}

impl DocStore for SecretStore {
    fn load_doc(&self, name: &str) -> Result<Option<(String, Revision)>, StoreError> {
        let secret_name = secret_for(name);
        let found = self
            .handle
            .block_on(self.api.get_opt(&secret_name))
            .map_err(|e| self.api_error(name, &e))?;
        let Some(secret) = found else {
            return Ok(None);
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            what: self.describe(name),
            reason,
        };
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(name))
            .ok_or_else(|| {
                corrupt(format!(
                    "the Secret has no key {name:?}; it was not written by agentid (delete it to start afresh)"
                ))
            })?;
        let text = String::from_utf8(bytes.0.clone()).map_err(|e| corrupt(e.to_string()))?;
        let version = secret
            .metadata
            .resource_version
            .ok_or_else(|| corrupt("no resourceVersion".into()))?;
        Ok(Some((text, Revision(version))))
    }

    fn save_doc(
        &self,
        name: &str,
        text: &str,
        expected: Option<&Revision>,
    ) -> Result<Revision, StoreError> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_for(name)),
                namespace: Some(self.namespace.clone()),
                labels: labels(),
                // The compare-and-swap: the API server refuses a replace of another version.
                resource_version: expected.map(|r| r.0.clone()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                name.to_owned(),
                ByteString(text.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        let pp = PostParams::default();
        let written = self.handle.block_on(async {
            match expected {
                None => self.api.create(&pp, &secret).await,
                Some(_) => self.api.replace(&secret_for(name), &pp, &secret).await,
            }
        });
        match written {
            Ok(s) => s
                .metadata
                .resource_version
                .map(Revision)
                .ok_or_else(|| StoreError::Corrupt {
                    what: self.describe(name),
                    reason: "the API server answered without a resourceVersion".into(),
                }),
            // 409: AlreadyExists (create) or Conflict (replace); 404: deleted meanwhile.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                Err(StoreError::Conflict(self.describe(name)))
            }
            Err(e) => Err(self.api_error(name, &e)),
        }
    }

    fn describe(&self, name: &str) -> String {
        format!("Secret {}/{} ({name})", self.namespace, secret_for(name))
    }
}

/// A kube error on one line: an API refusal as its code and message.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("HTTP {} {}: {}", s.code, s.reason, s.message),
        other => error_chain(other),
    }
}

/// Writes the bundle ConfigMap whenever this replica leads and the bundle differs from what
/// the ConfigMap holds, until `cancel`. Failed writes are retried with backoff.
pub async fn publish_bundle(
    authority: Arc<Authority>,
    api: Api<ConfigMap>,
    mut leader: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    let mut bundles = authority.subscribe();
    let mut written: Option<Vec<u8>> = None;
    let mut backoff = Duration::from_millis(500);
    loop {
        if *leader.borrow_and_update() {
            let doc = authority.bundle_document();
            if written.as_ref() != Some(&doc) {
                match write_bundle(&api, &authority, &doc).await {
                    Ok(()) => {
                        tracing::info!(
                            configmap = BUNDLE_CONFIGMAP,
                            sequence = authority.bundle().sequence,
                            "bundle published"
                        );
                        written = Some(doc);
                        backoff = Duration::from_millis(500);
                    }
                    Err(e) => {
                        tracing::warn!(configmap = BUNDLE_CONFIGMAP, error = %describe(&e), retry_in = ?backoff, "publishing the bundle");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
        } else {
            // Another replica may write meanwhile: compare afresh on taking over.
            written = None;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            r = bundles.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
        }
    }
}

async fn write_bundle(
    api: &Api<ConfigMap>,
    authority: &Authority,
    doc: &[u8],
) -> Result<(), kube::Error> {
    let pem: String = authority
        .bundle()
        .x509_authorities
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
        .collect();
    let data = BTreeMap::from([
        (
            "bundle.spiffe".to_owned(),
            String::from_utf8_lossy(doc).into_owned(),
        ),
        ("bundle.pem".to_owned(), pem),
    ]);
    let existing = api.get_opt(BUNDLE_CONFIGMAP).await?;
    if existing.as_ref().and_then(|c| c.data.as_ref()) == Some(&data) {
        return Ok(());
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(BUNDLE_CONFIGMAP.into()),
            labels: labels(),
            resource_version: existing.and_then(|c| c.metadata.resource_version),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    };
    let pp = PostParams::default();
    match cm.metadata.resource_version {
        None => api.create(&pp, &cm).await.map(|_| ()),
        Some(_) => api.replace(BUNDLE_CONFIGMAP, &pp, &cm).await.map(|_| ()),
    }
}

/// How long a replica signs without confirming its keys are the stored ones: half the
/// retirement grace, so what it signed with a key another replica retired meanwhile is still
/// covered by that key's grace.
pub const CONFIRM_LIMIT: Duration = Duration::from_secs(150);
/// How often the stored keys are read even when the watch is quiet (it can fail silently).
const CONFIRM_EVERY: Duration = Duration::from_secs(30);

/// Follows the key Secret until `cancel`: every change another replica stores (a scheduled
/// rotation by the Lease holder, an emergency one through any replica) is taken up here, and
/// the keys are re-read every [`CONFIRM_EVERY`] besides (see `Authority::check_confirmed`).
pub async fn follow_keys(authority: Arc<Authority>, api: Api<Secret>, cancel: CancellationToken) {
    let config = watcher::Config::default().fields(&format!("metadata.name={KEYS_SECRET}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut confirm = tokio::time::interval(CONFIRM_EVERY);
    confirm.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return,
            _ = confirm.tick() => Some(Ok(Event::InitDone)),
            next = events.next() => next,
        };
        match next {
            Some(Ok(Event::Apply(_) | Event::InitDone)) => {
                let a = authority.clone();
                match tokio::task::spawn_blocking(move || a.reload()).await {
                    Ok(Ok(true)) => tracing::info!(
                        sequence = authority.bundle().sequence,
                        "took up keys another replica stored"
                    ),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "taking up the stored keys"),
                    Err(e) => tracing::error!(error = %e, "taking up the stored keys"),
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(secret = KEYS_SECRET, error = %e, "watching the key Secret")
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_map_to_the_charts_secret_names() {
        assert_eq!(secret_for(STATE_FILE), "agentid-server-keys");
        assert_eq!(secret_for(join::DOC), "agentid-join-tokens");
        assert_eq!(secret_for("x.y.json"), "agentid-x-y");
    }
}
