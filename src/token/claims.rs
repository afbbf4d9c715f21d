//! The claim set of a task token and its parts: scopes, the actor chain and the task context.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::spiffe::SpiffeId;

/// JWT header `typ` of every task token.
pub const TYP: &str = "txntoken+jwt";

/// Why a `scope` string is not a space-separated list of RFC 6749 scope tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope has an empty entry (leading, trailing or doubled space)")]
    EmptyEntry,
    #[error(
        "scope {0:?} has a character outside RFC 6749 scope-token (printable ASCII but space, '\"' and '\\\\')"
    )]
    BadChar(String),
    #[error("scope {0:?} appears twice")]
    Duplicate(String),
}

/// A set of scopes: space-separated in JSON, sorted and duplicate-free here.
///
/// Parsing refuses empty entries and duplicates instead of normalising them: a token that
/// carries either was not written by us.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scopes(BTreeSet<String>);

impl Scopes {
    /// Builds a set from individual scope tokens, each validated.
    pub fn new<I, S>(scopes: I) -> Result<Self, ScopeError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set = BTreeSet::new();
        for s in scopes {
            let s = s.into();
            check_scope_token(&s)?;
            if !set.insert(s.clone()) {
                return Err(ScopeError::Duplicate(s));
            }
        }
        Ok(Self(set))
    }

    /// True when `scope` is in the set.
    pub fn contains(&self, scope: &str) -> bool {
        self.0.contains(scope)
    }

    /// True when every scope of `self` is in `other`.
    pub fn is_subset(&self, other: &Scopes) -> bool {
        self.0.is_subset(&other.0)
    }

    /// The scopes in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// Number of scopes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no scopes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn check_scope_token(s: &str) -> Result<(), ScopeError> {
    if s.is_empty() {
        return Err(ScopeError::EmptyEntry);
    }
    // RFC 6749 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
    if !s
        .bytes()
        .all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
    {
        return Err(ScopeError::BadChar(s.to_owned()));
    }
    Ok(())
}

impl FromStr for Scopes {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(Self::default());
        }
        Self::new(s.split(' '))
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(s)?;
        }
        Ok(())
    }
}

impl Serialize for Scopes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One link of the actor chain: who holds the token, and who held it before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    /// The actor's SPIFFE ID.
    pub sub: SpiffeId,
    /// The actor's composite identity digest, when the issuer attested it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    /// The previous actor (the delegator), absent for the root actor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The chain from this (outermost) actor inwards to the root actor.
    pub fn chain(&self) -> impl Iterator<Item = &Actor> {
        std::iter::successors(Some(self), |a| a.act.as_deref())
    }

    /// Number of actors in the chain, this one included.
    pub fn len(&self) -> usize {
        self.chain().count()
    }

    /// Never true: a chain has at least this actor.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The innermost actor: the agent the token was first minted for.
    pub fn root(&self) -> &Actor {
        self.chain().last().unwrap_or(self)
    }
}

/// Task facts fixed when the root token is minted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskContext {
    /// Free-text purpose given at mint time, carried unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Delegations still allowed below the holder of this token.
    pub depth: u32,
    /// The depth the root token was minted with; with the chain length it makes `depth` checkable.
    pub max_depth: u32,
}

/// The claims of a task token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskClaims {
    /// The issuing trust domain as `spiffe://<td>`.
    pub iss: String,
    /// The root principal the task is done for.
    pub sub: String,
    /// Target services or the trust domain; always an array.
    pub aud: Vec<String>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Unique per token.
    pub jti: String,
    /// One id for the whole task tree.
    pub txn: String,
    pub scope: Scopes,
    /// Actor chain, outermost = the presenter.
    pub act: Actor,
    pub tctx: TaskContext,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_strictly_and_print_sorted() {
        let s: Scopes = "b:read a:write".parse().unwrap();
        assert_eq!(s.to_string(), "a:write b:read");
        assert_eq!("".parse::<Scopes>().unwrap().len(), 0);
        assert_eq!("a  b".parse::<Scopes>(), Err(ScopeError::EmptyEntry));
        assert_eq!(" a".parse::<Scopes>(), Err(ScopeError::EmptyEntry));
        assert_eq!(
            "a a".parse::<Scopes>(),
            Err(ScopeError::Duplicate("a".into()))
        );
        assert!(matches!(
            "a\"b".parse::<Scopes>(),
            Err(ScopeError::BadChar(_))
        ));
        assert!(matches!(Scopes::new(["é"]), Err(ScopeError::BadChar(_))));
    }

    #[test]
    fn claims_refuse_unknown_fields_and_non_spiffe_actors() {
        let good = serde_json::json!({
            "iss": "spiffe://example.org", "sub": "user:alice", "aud": ["svc"],
            "iat": 1, "nbf": 1, "exp": 2, "jti": "j", "txn": "t", "scope": "a b",
            "act": {"sub": "spiffe://example.org/agent", "cid": "c"},
            "tctx": {"depth": 1, "max_depth": 1}
        });
        let c: TaskClaims = serde_json::from_value(good.clone()).unwrap();
        assert_eq!(c.act.len(), 1);
        assert_eq!(serde_json::to_value(&c).unwrap(), good, "round trip");

        let mut extra = good.clone();
        extra["admin"] = true.into();
        assert!(serde_json::from_value::<TaskClaims>(extra).is_err());
        let mut extra_act = good.clone();
        extra_act["act"]["role"] = "x".into();
        assert!(serde_json::from_value::<TaskClaims>(extra_act).is_err());
        let mut bad_actor = good.clone();
        bad_actor["act"]["sub"] = "user:bob".into();
        assert!(serde_json::from_value::<TaskClaims>(bad_actor).is_err());
        let mut string_aud = good;
        string_aud["aud"] = "svc".into();
        assert!(serde_json::from_value::<TaskClaims>(string_aud).is_err());
    }
}
