//! What a caller's policy lets it do with task tokens.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::claims::Scopes;
use crate::spiffe::{IdError, SpiffeId};

/// Default and usual upper bound of a task token's lifetime (spec: 5 minutes).
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(300);

/// Longest lifetime any rule allows: the authority keeps a retired JWT key in the bundle for
/// this long after it stopped signing, so no token outlives its key.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// Deepest delegation chain a token may carry; bounds the actor chain verifiers walk.
pub const MAX_DEPTH: u32 = 16;

/// Why a child pattern or a rule set is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("child pattern {pattern:?}: {source}")]
    BadPattern { pattern: String, source: IdError },
    #[error("child pattern {0:?}: '*' is only allowed as a whole last segment (\"…/*\")")]
    MisplacedWildcard(String),
    #[error("child pattern {0:?} names a trust domain, never a workload")]
    RootId(String),
    #[error("scope {0:?} is not a valid scope token")]
    BadScope(String),
    #[error("audience is empty")]
    EmptyAudience,
    #[error("max_depth {0} is above the limit of {MAX_DEPTH}")]
    DepthTooLarge(u32),
    #[error("max_ttl must be at least one second")]
    ZeroTtl,
}

/// A SPIFFE ID a caller may delegate to: exact, or every ID below a path (`spiffe://td/agents/*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SpiffeIdPattern {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID in the same trust domain whose path is strictly below this one.
    Below(SpiffeId),
}

impl SpiffeIdPattern {
    /// True when `id` matches.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(p) => p == id,
            Self::Below(p) => {
                p.trust_domain() == id.trust_domain()
                    && id
                        .path()
                        .strip_prefix(p.path())
                        .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/'))
            }
        }
    }
}

impl FromStr for SpiffeIdPattern {
    type Err = RulesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |source| RulesError::BadPattern {
            pattern: s.to_owned(),
            source,
        };
        if let Some(prefix) = s.strip_suffix("/*") {
            if prefix.contains('*') {
                return Err(RulesError::MisplacedWildcard(s.to_owned()));
            }
            // `spiffe://td/*` (every workload of td) has the root ID as its prefix.
            return prefix.parse().map(Self::Below).map_err(bad);
        }
        if s.contains('*') {
            return Err(RulesError::MisplacedWildcard(s.to_owned()));
        }
        let id: SpiffeId = s.parse().map_err(bad)?;
        if id.is_root() {
            return Err(RulesError::RootId(s.to_owned()));
        }
        Ok(Self::Exact(id))
    }
}

impl fmt::Display for SpiffeIdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::Below(id) => write!(f, "{id}/*"),
        }
    }
}

impl<'de> Deserialize<'de> for SpiffeIdPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The task-token rules of one caller, taken from its policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenRules {
    /// Audiences the caller may mint for; empty allows none.
    pub audiences: Vec<String>,
    /// Scopes the caller may mint with; empty allows none.
    pub scopes: Vec<String>,
    /// Longest lifetime of a token it mints or delegates; longer requests are clamped.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Whether the caller may name the root principal (`sub`) instead of being it.
    pub allow_subject: bool,
    /// SPIFFE IDs the caller may delegate to.
    pub allowed_children: Vec<SpiffeIdPattern>,
    /// Delegation depth of tokens it mints, and a cap on the depth it passes on.
    pub max_depth: u32,
    /// Children per task (`txn`) this caller may delegate to.
    pub max_fan_out: u32,
}

impl Default for TokenRules {
    fn default() -> Self {
        Self {
            audiences: Vec::new(),
            scopes: Vec::new(),
            max_ttl: DEFAULT_MAX_TTL,
            allow_subject: false,
            allowed_children: Vec::new(),
            max_depth: 0,
            max_fan_out: 0,
        }
    }
}

impl TokenRules {
    /// Checks what the types cannot: scope syntax, non-empty audiences, `max_ttl` and `max_depth`.
    pub fn validate(&self) -> Result<(), RulesError> {
        for s in &self.scopes {
            Scopes::new([s.as_str()]).map_err(|_| RulesError::BadScope(s.clone()))?;
        }
        if self.audiences.iter().any(String::is_empty) {
            return Err(RulesError::EmptyAudience);
        }
        if self.max_ttl < Duration::from_secs(1) {
            return Err(RulesError::ZeroTtl);
        }
        if self.max_depth > MAX_DEPTH {
            return Err(RulesError::DepthTooLarge(self.max_depth));
        }
        Ok(())
    }

    /// True when the caller may delegate to `child`.
    pub fn may_delegate_to(&self, child: &SpiffeId) -> bool {
        self.allowed_children.iter().any(|p| p.matches(child))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn patterns_match_exactly_or_strictly_below() {
        let exact: SpiffeIdPattern = "spiffe://example.org/agents/a".parse().unwrap();
        assert!(exact.matches(&id("spiffe://example.org/agents/a")));
        assert!(!exact.matches(&id("spiffe://example.org/agents/a/b")));

        let below: SpiffeIdPattern = "spiffe://example.org/agents/*".parse().unwrap();
        assert_eq!(below.to_string(), "spiffe://example.org/agents/*");
        assert!(below.matches(&id("spiffe://example.org/agents/a")));
        assert!(below.matches(&id("spiffe://example.org/agents/a/b")));
        assert!(!below.matches(&id("spiffe://example.org/agents")));
        assert!(!below.matches(&id("spiffe://example.org/agentsx/a")));
        assert!(!below.matches(&id("spiffe://other.org/agents/a")));

        let td: SpiffeIdPattern = "spiffe://example.org/*".parse().unwrap();
        assert!(td.matches(&id("spiffe://example.org/x")));
        assert!(!td.matches(&id("spiffe://example.org")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for (p, want) in [
            ("spiffe://example.org/a*", "MisplacedWildcard"),
            ("spiffe://example.org/*/a", "MisplacedWildcard"),
            ("spiffe://example.org/*/*", "MisplacedWildcard"),
            ("spiffe://example.org", "RootId"),
            ("spiffe://Example.org/a", "BadPattern"),
            ("example.org/a/*", "BadPattern"),
            ("spiffe://example.org/a/../*", "BadPattern"),
        ] {
            let err = p.parse::<SpiffeIdPattern>().unwrap_err();
            assert!(format!("{err:?}").starts_with(want), "{p}: {err:?}");
        }
    }

    #[test]
    fn rules_deserialize_strictly_with_defaults() {
        let r: TokenRules = serde_json::from_value(serde_json::json!({
            "audiences": ["ledger"], "scopes": ["ledger:read"],
            "allowed_children": ["spiffe://example.org/agents/*"], "max_depth": 2
        }))
        .unwrap();
        assert_eq!(r.max_ttl, DEFAULT_MAX_TTL);
        r.validate().unwrap();
        assert!(r.may_delegate_to(&id("spiffe://example.org/agents/x")));
        let ttl: TokenRules =
            serde_json::from_value(serde_json::json!({"max_ttl": "90s"})).unwrap();
        assert_eq!(ttl.max_ttl, Duration::from_secs(90));
        assert!(serde_json::from_value::<TokenRules>(serde_json::json!({"scope": []})).is_err());
        assert!(
            serde_json::from_value::<TokenRules>(
                serde_json::json!({"allowed_children": ["spiffe://x/*/y"]})
            )
            .is_err()
        );
        let bad = TokenRules {
            scopes: vec!["a b".into()],
            ..Default::default()
        };
        assert_eq!(bad.validate(), Err(RulesError::BadScope("a b".into())));
    }
}
