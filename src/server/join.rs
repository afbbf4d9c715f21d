//! Single-use join tokens: how a host outside Kubernetes proves it may run a node daemon.
//!
//! Only SHA-256 digests of tokens are kept (in memory and in the store, 0600), so the store
//! never holds a usable token. A redeemed token is remembered until it would have expired,
//! so a replay is told apart from a token that never existed (both are refused and audited).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::store::{DocStore, StoreError};
use crate::crypto::sha256_hex;

/// The store document of the token digests.
pub const DOC: &str = "join-tokens.json";
/// Longest lifetime a join token may be given.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Compare-and-swap attempts before a change is given up (replicas redeeming at once).
const ATTEMPTS: usize = 8;

/// Why a join token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("join token unknown")]
    Unknown,
    #[error("join token already used (replay)")]
    Used,
    #[error("join token expired")]
    Expired,
    #[error("join token is bound to node {bound:?}, not {presented:?}")]
    WrongNode { bound: String, presented: String },
    #[error(
        "join token lifetime must be between 1s and {}",
        humantime::format_duration(MAX_TTL)
    )]
    BadTtl,
    #[error("storing join tokens: {0}")]
    Store(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    expires_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(default)]
    used: bool,
}

type Entries = HashMap<String, Entry>;

/// The join tokens of one trust domain. With a store, every change is a compare-and-swap of
/// the stored document, so replicas sharing it agree: a token redeemed through one replica is
/// a replay at every other. Calls block on the store; make them from blocking contexts.
pub struct JoinTokens {
    store: Option<Arc<dyn DocStore>>,
    /// Without a store: the tokens, in memory only.
    memory: Mutex<Entries>,
}

impl std::fmt::Debug for JoinTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokens")
            .field("stored", &self.store.is_some())
            .finish_non_exhaustive()
    }
}

impl JoinTokens {
    /// Tokens kept in `store` (shared by replicas, surviving restarts), or in memory only.
    /// A stored document that does not parse is refused here, not silently emptied.
    pub fn open(store: Option<Arc<dyn DocStore>>) -> Result<Self, StoreError> {
        if let Some(s) = &store {
            load(s.as_ref())?;
        }
        Ok(Self {
            store,
            memory: Mutex::new(HashMap::new()),
        })
    }

    /// A new token valid for `ttl` from `now` (Unix seconds), usable once, by `node` if given.
    pub fn create(
        &self,
        ttl: Duration,
        node: Option<String>,
        now: i64,
    ) -> Result<(String, i64), JoinError> {
        if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
            return Err(JoinError::BadTtl);
        }
        let mut raw = [0u8; 32];
        aws_lc_rs::rand::fill(&mut raw).map_err(|_| JoinError::Store("no randomness".into()))?;
        // Hex: a token that starts with '-' would read as a flag on a command line.
        let token = hex::encode(raw);
        let expires_at = now.saturating_add(ttl.as_secs() as i64);
        let digest = sha256_hex(token.as_bytes());
        self.update(|entries| {
            entries.retain(|_, e| e.expires_at > now);
            entries.insert(
                digest.clone(),
                Entry {
                    expires_at,
                    node: node.clone(),
                    used: false,
                },
            );
            Ok(())
        })?;
        Ok((token, expires_at))
    }

    /// Uses up `token` for `node_name` at `now`.
    pub fn redeem(&self, token: &str, node_name: &str, now: i64) -> Result<(), JoinError> {
        let digest = sha256_hex(token.as_bytes());
        self.update(|entries| {
            let entry = entries.get_mut(&digest).ok_or(JoinError::Unknown)?;
            if entry.used {
                return Err(JoinError::Used);
            }
            if entry.expires_at <= now {
                return Err(JoinError::Expired);
            }
            if let Some(bound) = &entry.node
                && bound != node_name
            {
                return Err(JoinError::WrongNode {
                    bound: bound.clone(),
                    presented: node_name.to_owned(),
                });
            }
            entry.used = true;
            Ok(())
        })
    }

    /// Applies `f` to the tokens and stores the result; a refusal from `f` stores nothing.
    fn update(
        &self,
        mut f: impl FnMut(&mut Entries) -> Result<(), JoinError>,
    ) -> Result<(), JoinError> {
        let Some(store) = &self.store else {
            return f(&mut self.memory.lock().expect("join tokens"));
        };
        let failed = |e: StoreError| JoinError::Store(e.to_string());
        for _ in 0..ATTEMPTS {
            let (mut entries, revision) = load(store.as_ref()).map_err(failed)?;
            f(&mut entries)?;
            let text =
                serde_json::to_string(&entries).map_err(|e| JoinError::Store(e.to_string()))?;
            match store.save_doc(DOC, &text, revision.as_ref()) {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(failed(e)),
            }
        }
        Err(JoinError::Store(format!(
            "{}: changed concurrently {ATTEMPTS} times in a row; try again",
            store.describe(DOC)
        )))
    }
}

/// The stored tokens and their revision (none stored: empty).
fn load(store: &dyn DocStore) -> Result<(Entries, Option<super::store::Revision>), StoreError> {
    match store.load_doc(DOC)? {
        None => Ok((HashMap::new(), None)),
        Some((text, rev)) => {
            let entries = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                what: store.describe(DOC),
                reason: e.to_string(),
            })?;
            Ok((entries, Some(rev)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::FileStore;

    const NOW: i64 = 1_700_000_000;

    #[test]
    fn single_use_bound_expiring_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let files = FileStore::open(dir.path()).unwrap();
        let store: Arc<dyn DocStore> = Arc::new(files.clone());
        let tokens = JoinTokens::open(Some(store.clone())).unwrap();
        let (t, exp) = tokens.create(Duration::from_secs(60), None, NOW).unwrap();
        assert_eq!(exp, NOW + 60);
        assert!(
            !files.read(DOC).unwrap().unwrap().contains(&t),
            "only digests are stored"
        );
        // A restart keeps it.
        let tokens = JoinTokens::open(Some(store.clone())).unwrap();
        tokens.redeem(&t, "n1", NOW + 1).unwrap();
        assert_eq!(tokens.redeem(&t, "n1", NOW + 2), Err(JoinError::Used));
        let again = JoinTokens::open(Some(store)).unwrap();
        assert_eq!(
            again.redeem(&t, "n1", NOW + 2),
            Err(JoinError::Used),
            "a replay after a restart is still a replay"
        );
        assert_eq!(again.redeem("nope", "n1", NOW), Err(JoinError::Unknown));

        let (late, _) = again.create(Duration::from_secs(5), None, NOW).unwrap();
        assert_eq!(again.redeem(&late, "n1", NOW + 5), Err(JoinError::Expired));
        let (bound, _) = again
            .create(Duration::from_secs(60), Some("n2".into()), NOW)
            .unwrap();
        assert!(matches!(
            again.redeem(&bound, "n1", NOW),
            Err(JoinError::WrongNode { .. })
        ));
        again.redeem(&bound, "n2", NOW).unwrap();
        assert_eq!(
            again.create(Duration::ZERO, None, NOW),
            Err(JoinError::BadTtl)
        );
    }

    #[test]
    fn replicas_sharing_a_store_agree_on_redemption() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn DocStore> = Arc::new(FileStore::open(dir.path()).unwrap());
        let a = JoinTokens::open(Some(store.clone())).unwrap();
        let b = JoinTokens::open(Some(store)).unwrap();
        let (t, _) = a.create(Duration::from_secs(60), None, NOW).unwrap();
        let (u, _) = b.create(Duration::from_secs(60), None, NOW).unwrap();
        b.redeem(&t, "n1", NOW).unwrap();
        assert_eq!(a.redeem(&t, "n1", NOW), Err(JoinError::Used));
        // b's create did not drop a's token (each change starts from the stored document).
        a.redeem(&u, "n2", NOW).unwrap();
    }

    #[test]
    fn a_corrupt_document_is_refused_not_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let files = FileStore::open(dir.path()).unwrap();
        files.write(DOC, b"{not json").unwrap();
        let err = JoinTokens::open(Some(Arc::new(files))).unwrap_err();
        assert!(
            err.to_string()
                .contains("join-tokens.json: not a valid document"),
            "{err}"
        );
    }
}
