//! Single-use join tokens: how a host outside Kubernetes proves it may run a node daemon.
//!
//! Only SHA-256 digests of tokens are kept (in memory and in the store, 0600), so the store
//! never holds a usable token. A redeemed token is remembered until it would have expired,
//! so a replay is told apart from a token that never existed (both are refused and audited).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::store::{FileStore, StoreError};
use crate::crypto::sha256_hex;

/// Store file of the token digests.
const FILE: &str = "join-tokens.json";
/// Longest lifetime a join token may be given.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

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

/// The join tokens of one server.
#[derive(Debug)]
pub struct JoinTokens {
    store: Option<FileStore>,
    /// By SHA-256 hex of the token.
    entries: Mutex<HashMap<String, Entry>>,
}

impl JoinTokens {
    /// Tokens kept in `store` (so they survive a restart), or in memory only.
    pub fn open(store: Option<FileStore>) -> Result<Self, StoreError> {
        let entries = match &store {
            Some(s) => s
                .read(FILE)?
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default(),
            None => HashMap::new(),
        };
        Ok(Self {
            store,
            entries: Mutex::new(entries),
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
        let mut entries = self.entries.lock().expect("join tokens");
        entries.retain(|_, e| e.expires_at > now);
        entries.insert(
            sha256_hex(token.as_bytes()),
            Entry {
                expires_at,
                node,
                used: false,
            },
        );
        self.persist(&entries)?;
        Ok((token, expires_at))
    }

    /// Uses up `token` for `node_name` at `now`.
    pub fn redeem(&self, token: &str, node_name: &str, now: i64) -> Result<(), JoinError> {
        let mut entries = self.entries.lock().expect("join tokens");
        let entry = entries
            .get_mut(&sha256_hex(token.as_bytes()))
            .ok_or(JoinError::Unknown)?;
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
        self.persist(&entries)
    }

    fn persist(&self, entries: &HashMap<String, Entry>) -> Result<(), JoinError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let text = serde_json::to_vec(entries).map_err(|e| JoinError::Store(e.to_string()))?;
        store
            .write(FILE, &text)
            .map_err(|e| JoinError::Store(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;

    #[test]
    fn single_use_bound_expiring_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let tokens = JoinTokens::open(Some(store.clone())).unwrap();
        let (t, exp) = tokens.create(Duration::from_secs(60), None, NOW).unwrap();
        assert_eq!(exp, NOW + 60);
        assert!(
            !store.read(FILE).unwrap().unwrap().contains(&t),
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
}
