//! `SpiffeId` and `TrustDomain`, validated by the rules of the SPIFFE-ID standard.
//!
//! Parsing is strict: the scheme and trust domain must already be lowercase.
//! The standard calls them case-insensitive but also says the trust domain
//! MUST be lowercase, and go-spiffe and SPIRE reject uppercase; accepting it
//! here would let two spellings name one identity.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID the standard requires implementations to support, in bytes.
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name (RFC 3986 host), in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("scheme must be \"spiffe://\" (lowercase)")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error(
        "trust domain character {0:?} is not allowed (only lowercase a-z, 0-9, '.', '-', '_'; no port, userinfo or percent-encoding)"
    )]
    BadTrustDomainChar(char),
    #[error("a trust domain is named without a path")]
    TrustDomainHasPath,
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("query and fragment are not allowed in a SPIFFE ID")]
    QueryOrFragment,
    #[error("path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("path character {0:?} is not allowed (only a-z, A-Z, 0-9, '.', '-', '_')")]
    BadPathChar(char),
}

/// A trust domain name such as `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare name (`example.org`) or a trust-domain ID (`spiffe://example.org`).
    pub fn new(s: &str) -> Result<Self, IdError> {
        if s.starts_with(SCHEME) {
            let id = SpiffeId::from_str(s)?;
            if !id.is_root() {
                return Err(IdError::TrustDomainHasPath);
            }
            return Ok(id.td);
        }
        validate_trust_domain(s)?;
        Ok(Self(s.to_owned()))
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<name>`: the key used in Workload API bundle maps and the CA's URI SAN.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// The trust domain's own (root) SPIFFE ID.
    pub fn root_id(&self) -> SpiffeId {
        SpiffeId {
            td: self.clone(),
            path: String::new(),
        }
    }

    /// Builds `spiffe://<td><path>` after validating `path`.
    pub fn id(&self, path: &str) -> Result<SpiffeId, IdError> {
        validate_path(path)?;
        let id = SpiffeId {
            td: self.clone(),
            path: path.to_owned(),
        };
        if id.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        Ok(id)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    td: TrustDomain,
    path: String,
}

impl SpiffeId {
    /// The trust domain the ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, empty for the root ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// True for `spiffe://<td>` itself, which may name a signing authority but never a workload.
    pub fn is_root(&self) -> bool {
        self.path.is_empty()
    }

    /// Length of the string form, in bytes.
    pub fn len(&self) -> usize {
        SCHEME.len() + self.td.0.len() + self.path.len()
    }

    /// Never true: a SPIFFE ID always has a trust domain.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl SpiffeId {
    /// The URI in its parts, in order: what its string forms are made of (the two below, and
    /// the node's X509-SVID answers, which write the parts straight into the message).
    pub fn uri_parts(&self) -> [&str; 3] {
        [SCHEME, &self.td.0, &self.path]
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Plain writes, not `write!` through `fmt::Arguments`.
        self.uri_parts()
            .into_iter()
            .try_for_each(|p| f.write_str(p))
    }
}

/// The ID as a URI, in one allocation of the right size (`to_string` grows its buffer once
/// per part). Every JWT-SVID answer carries the ID as a string.
impl From<&SpiffeId> for String {
    fn from(id: &SpiffeId) -> String {
        id.uri_parts().concat()
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::WrongScheme)?;
        if rest.contains(['?', '#']) {
            return Err(IdError::QueryOrFragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(SpiffeId {
            td: TrustDomain(td.to_owned()),
            path: path.to_owned(),
        })
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(IdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(IdError::BadPathChar(path.chars().next().unwrap_or('/')));
    };
    for seg in rest.split('/') {
        match seg {
            "" => return Err(IdError::EmptySegment),
            "." | ".." => return Err(IdError::DotSegment),
            _ => {}
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(IdError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SpiffeId, IdError> {
        s.parse()
    }

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://td/a",
            "spiffe://td",
            "spiffe://10.0.0.1/a",
            "spiffe://td/Ab-1_.x",
            "spiffe://a.b-c_d/x/y/z",
        ] {
            let id = parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
            assert_eq!(String::from(&id), s);
        }
        assert!(parse("spiffe://td").unwrap().is_root());
        assert_eq!(parse("spiffe://td/a/b").unwrap().path(), "/a/b");
    }

    // ID-01..ID-11: one case per rule, each with the specific error.
    #[test]
    fn rejects_each_rule_violation() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("http://td/a", IdError::WrongScheme),
            ("SPIFFE://td/a", IdError::WrongScheme),
            ("spiffe:///a", IdError::MissingTrustDomain),
            ("spiffe://", IdError::MissingTrustDomain),
            ("spiffe://td/a?x=1", IdError::QueryOrFragment),
            ("spiffe://td/a#f", IdError::QueryOrFragment),
            ("spiffe://u@td/a", IdError::BadTrustDomainChar('@')),
            ("spiffe://td:8080/a", IdError::BadTrustDomainChar(':')),
            ("spiffe://Td/a", IdError::BadTrustDomainChar('T')),
            ("spiffe://t$d/a", IdError::BadTrustDomainChar('$')),
            ("spiffe://t%41d/a", IdError::BadTrustDomainChar('%')),
            ("spiffe://[::1]/a", IdError::BadTrustDomainChar('[')),
            ("spiffe://td/a%41", IdError::BadPathChar('%')),
            ("spiffe://td/a//b", IdError::EmptySegment),
            ("spiffe://td/a/./b", IdError::DotSegment),
            ("spiffe://td/a/../b", IdError::DotSegment),
            ("spiffe://td/a/", IdError::EmptySegment),
            ("spiffe://td/", IdError::EmptySegment),
            ("spiffe://td/a!b", IdError::BadPathChar('!')),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input).unwrap_err(), *want, "input {input:?}");
        }
    }

    // ID-12..ID-14: length limits.
    #[test]
    fn length_limits() {
        let prefix = "spiffe://td/";
        let ok = format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len()));
        assert_eq!(ok.len(), 2048);
        assert!(parse(&ok).is_ok());
        let long = format!("{ok}b");
        assert_eq!(parse(&long).unwrap_err(), IdError::TooLong);
        let td = TrustDomain::new("td").unwrap();
        assert_eq!(
            td.id(&format!("/{}", "a".repeat(MAX_ID_LEN))).unwrap_err(),
            IdError::TooLong
        );
        assert!(TrustDomain::new(&"a".repeat(255)).is_ok());
        assert_eq!(
            TrustDomain::new(&"a".repeat(256)).unwrap_err(),
            IdError::TrustDomainTooLong
        );
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            TrustDomain::new("example.org").unwrap().as_str(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().as_str(),
            "example.org"
        );
        assert!(TrustDomain::new("spiffe://example.org/x").is_err());
        assert_eq!(
            TrustDomain::new("example.org").unwrap().id_string(),
            "spiffe://example.org"
        );
    }
}
