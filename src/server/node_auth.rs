//! Kubernetes node attestation. A node daemon presents a projected service-account token with
//! the server's audience; the API server (TokenReview) says whether it is genuine, for which
//! audience, whose it is and which pod it is bound to. The node's name comes from that pod
//! (the token's `node-name` extra, or the pod's `spec.nodeName`), never from the request.
//!
//! RBAC: `create` on `tokenreviews`, `get` on `pods`.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use crate::k8s::{error_chain, is_node_name};

/// Extras the API server adds to a bound service-account token's user (Kubernetes ≥ 1.30 adds
/// the node's; earlier ones only the pod's).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// A service account, `NAMESPACE/NAME` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccountRef {
    /// The user name its tokens authenticate as.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for ServiceAccountRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
        }
    }
}

impl std::fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a node's token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeAuthError {
    /// The API server could not be asked; nothing is known about the token.
    #[error("TokenReview failed: {0}")]
    Review(String),
    #[error("the API server did not authenticate the token: {0}")]
    NotAuthenticated(String),
    #[error("the token is not for audience {want:?} (the API server confirmed {got:?})")]
    Audience { want: String, got: Vec<String> },
    #[error("the token belongs to {got:?}, not to the node daemon's service account {want}")]
    ServiceAccount { want: String, got: String },
    #[error(
        "the token is not bound to a pod (the node daemon needs a projected service-account token of its own pod)"
    )]
    NotBound,
    #[error("bound pod {pod}: {reason}")]
    Pod { pod: String, reason: String },
    /// The bound pod could not be read; nothing is known about its node.
    #[error("reading bound pod {pod}: {reason}")]
    PodLookup { pod: String, reason: String },
    #[error("the token names node {0:?}, which is not a Kubernetes node name")]
    BadNodeName(String),
}

impl NodeAuthError {
    /// The API server could not be reached or asked: try again later, not the node's fault.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Review(_) | Self::PodLookup { .. })
    }
}

/// What a reviewed token proved: the pod it is bound to and, when the API server said so,
/// that pod's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub node_name: Option<String>,
}

impl Bound {
    /// `namespace/name`, for messages.
    pub fn pod(&self) -> String {
        format!("{}/{}", self.namespace, self.pod_name)
    }
}

/// Checks a TokenReview's answer: authenticated, for `audience`, the node daemon's service
/// account `account`, and bound to a pod. Pure, so each refusal is tested without a cluster.
pub fn check_review(
    status: Option<&TokenReviewStatus>,
    audience: &str,
    account: &ServiceAccountRef,
) -> Result<Bound, NodeAuthError> {
    let empty = TokenReviewStatus::default();
    let status = status.unwrap_or(&empty);
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "no reason given".to_owned());
        return Err(NodeAuthError::NotAuthenticated(why));
    }
    // An empty list means "valid for the API server's own audience": not ours.
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(NodeAuthError::Audience {
            want: audience.to_owned(),
            got: audiences,
        });
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if username != account.username() {
        return Err(NodeAuthError::ServiceAccount {
            want: account.to_string(),
            got: username,
        });
    }
    let extra = user.extra.unwrap_or_default();
    let one = |key: &str| single(&extra, key);
    let (Some(pod_name), Some(pod_uid)) = (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) else {
        return Err(NodeAuthError::NotBound);
    };
    Ok(Bound {
        namespace: account.namespace.clone(),
        pod_name,
        pod_uid,
        node_name: one(EXTRA_NODE_NAME),
    })
}

/// The extra's value when it has exactly one non-empty value.
fn single(extra: &BTreeMap<String, Vec<String>>, key: &str) -> Option<String> {
    match extra.get(key).map(Vec::as_slice) {
        Some([v]) if !v.is_empty() => Some(v.clone()),
        _ => None,
    }
}

/// Attests node daemons with the API server.
#[derive(Clone)]
pub struct NodeAuthenticator {
    client: Client,
    audience: String,
    account: ServiceAccountRef,
}

/// A node that proved itself: its name, and the pod its token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    pub node_name: String,
    pub pod: String,
}

impl NodeAuthenticator {
    pub fn new(client: Client, audience: String, account: ServiceAccountRef) -> Self {
        Self {
            client,
            audience,
            account,
        }
    }

    /// Reviews `token` and finds the node of the pod it is bound to.
    pub async fn attest(&self, token: &str) -> Result<AttestedNode, NodeAuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| NodeAuthError::Review(describe(&e)))?;
        let bound = check_review(answer.status.as_ref(), &self.audience, &self.account)?;
        let node_name = match bound.node_name.clone() {
            Some(node) => node,
            None => self.node_of(&bound).await?,
        };
        if !is_node_name(&node_name) {
            return Err(NodeAuthError::BadNodeName(node_name));
        }
        Ok(AttestedNode {
            node_name,
            pod: bound.pod(),
        })
    }

    /// The node the bound pod is scheduled on, read from the API server; the pod must still be
    /// the one the token was issued for (same UID).
    async fn node_of(&self, bound: &Bound) -> Result<String, NodeAuthError> {
        let pod = bound.pod();
        let found = Api::<Pod>::namespaced(self.client.clone(), &bound.namespace)
            .get_opt(&bound.pod_name)
            .await
            .map_err(|e| NodeAuthError::PodLookup {
                pod: pod.clone(),
                reason: describe(&e),
            })?;
        let refuse = |reason: String| NodeAuthError::Pod {
            pod: pod.clone(),
            reason,
        };
        let Some(found) = found else {
            return Err(refuse("no longer exists".to_owned()));
        };
        let uid = found.metadata.uid.unwrap_or_default();
        if uid != bound.pod_uid {
            return Err(refuse(format!(
                "has UID {uid}, but the token is bound to UID {}",
                bound.pod_uid
            )));
        }
        found
            .spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| refuse("is not scheduled on a node".to_owned()))
    }
}

/// A kube error on one line: an API server's refusal as its status code and message.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("HTTP {} {}: {}", s.code, s.reason, s.message),
        other => error_chain(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    const AUD: &str = "agentid-server";

    fn account() -> ServiceAccountRef {
        "agentid/agentid-node".parse().unwrap()
    }

    fn status(edit: impl FnOnce(&mut TokenReviewStatus)) -> TokenReviewStatus {
        let extra: BTreeMap<String, Vec<String>> = [
            (EXTRA_POD_NAME, "agentid-node-x7k2p"),
            (EXTRA_POD_UID, "0b5c5e2a-6d5e-4c1e-9a7e-2f7b1d2c3e4f"),
            (EXTRA_NODE_NAME, "node-a"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
        .collect();
        let mut s = TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![AUD.into()]),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:agentid:agentid-node".into()),
                extra: Some(extra),
                ..UserInfo::default()
            }),
            error: None,
        };
        edit(&mut s);
        s
    }

    fn check(s: &TokenReviewStatus) -> Result<Bound, NodeAuthError> {
        check_review(Some(s), AUD, &account())
    }

    #[test]
    fn a_bound_token_of_the_node_daemon_passes() {
        let b = check(&status(|_| {})).unwrap();
        assert_eq!(b.node_name.as_deref(), Some("node-a"));
        assert_eq!(b.pod(), "agentid/agentid-node-x7k2p");
        let no_node = status(|s| {
            let extra = s.user.as_mut().unwrap().extra.as_mut().unwrap();
            extra.remove(EXTRA_NODE_NAME);
        });
        assert_eq!(check(&no_node).unwrap().node_name, None);
    }

    #[test]
    fn each_refusal_says_why() {
        type Edit = fn(&mut TokenReviewStatus);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |s| {
                    s.authenticated = Some(false);
                    s.error = Some("token has expired".into());
                },
                "did not authenticate the token: token has expired",
            ),
            (|s| s.authenticated = None, "no reason given"),
            (
                |s| s.audiences = Some(vec!["https://kubernetes.default.svc".into()]),
                "not for audience \"agentid-server\"",
            ),
            (|s| s.audiences = None, "not for audience"),
            (
                |s| {
                    s.user.as_mut().unwrap().username =
                        Some("system:serviceaccount:default:default".into())
                },
                "belongs to \"system:serviceaccount:default:default\"",
            ),
            (
                |s| {
                    let extra = s.user.as_mut().unwrap().extra.as_mut().unwrap();
                    extra.remove(EXTRA_POD_UID);
                },
                "not bound to a pod",
            ),
            (
                |s| {
                    let extra = s.user.as_mut().unwrap().extra.as_mut().unwrap();
                    extra.insert(EXTRA_POD_NAME.into(), vec!["a".into(), "b".into()]);
                },
                "not bound to a pod",
            ),
        ];
        for (edit, want) in cases {
            let err = check(&status(edit)).expect_err(want);
            assert!(err.to_string().contains(want), "{err} lacks {want:?}");
            assert!(!err.is_unavailable());
        }
        assert!(matches!(
            check_review(None, AUD, &account()),
            Err(NodeAuthError::NotAuthenticated(_))
        ));
    }

    #[test]
    fn service_account_refs() {
        let a = account();
        assert_eq!(a.username(), "system:serviceaccount:agentid:agentid-node");
        assert_eq!(a.to_string(), "agentid/agentid-node");
        for bad in ["agentid", "/x", "x/", "a/b/c", ""] {
            assert!(bad.parse::<ServiceAccountRef>().is_err(), "{bad}");
        }
    }
}
