//! SPIFFE ID templates: `spiffe://{{ .TrustDomain }}/user/{{ .UserName }}`.
//!
//! Only the documented placeholders exist; anything else is an error when the policy loads,
//! not when a workload first matches it.

use super::facts::WorkloadFacts;
use crate::spiffe::{IdError, SpiffeId, TrustDomain};

/// The placeholders a template may use, with what they stand for.
pub const PLACEHOLDERS: [(&str, &str); 5] = [
    ("TrustDomain", "the trust domain name"),
    ("PolicyName", "metadata.name of the policy"),
    ("UID", "the caller's user id"),
    ("GID", "the caller's primary group id"),
    ("UserName", "the caller's user name"),
];

/// Why a template is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unterminated placeholder (missing \"}}}}\")")]
    Unterminated,
    #[error(
        "unknown placeholder {{{{ .{0} }}}}; known: TrustDomain, PolicyName, UID, GID, UserName"
    )]
    Unknown(String),
    #[error("placeholder must look like {{{{ .Name }}}}, found {{{{{0}}}}}")]
    Syntax(String),
    #[error("placeholder {0} has no value for this workload")]
    NoValue(&'static str),
    #[error("result is not a valid SPIFFE ID: {0}")]
    InvalidId(IdError),
    #[error("result {0} is in another trust domain")]
    ForeignTrustDomain(String),
    #[error("result {0} is the trust domain itself; a workload ID needs a path")]
    RootId(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var(&'static str),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `source`, checking every placeholder is known.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                pieces.push(Piece::Lit(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or(TemplateError::Unterminated)?;
            let inner = after[..end].trim();
            let name = inner
                .strip_prefix('.')
                .ok_or_else(|| TemplateError::Syntax(inner.to_owned()))?;
            let known = PLACEHOLDERS
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| TemplateError::Unknown(name.to_owned()))?;
            pieces.push(Piece::Var(known.0));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Lit(rest.to_owned()));
        }
        Ok(Self {
            source: source.to_owned(),
            pieces,
        })
    }

    /// Whether the template contains the placeholder `{{ .<name> }}`.
    pub fn uses(&self, name: &str) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Var(v) if *v == name))
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders with the workload's facts and checks the result is a workload ID in `td`.
    pub fn render_id(
        &self,
        td: &TrustDomain,
        policy: &str,
        facts: &WorkloadFacts,
    ) -> Result<SpiffeId, TemplateError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(name) => out
                    .push_str(&value(name, td, policy, facts).ok_or(TemplateError::NoValue(name))?),
            }
        }
        let id: SpiffeId = out.parse().map_err(TemplateError::InvalidId)?;
        if id.trust_domain() != td {
            return Err(TemplateError::ForeignTrustDomain(out));
        }
        if id.is_root() {
            return Err(TemplateError::RootId(out));
        }
        Ok(id)
    }

    /// Renders with sample values, to catch templates that can never yield a valid ID.
    pub fn check(&self, td: &TrustDomain, policy: &str) -> Result<SpiffeId, TemplateError> {
        let sample = WorkloadFacts {
            unix: Some(super::UnixFacts {
                uid: 1000,
                gid: 1000,
                user_name: Some("user".into()),
                ..Default::default()
            }),
            k8s: None,
        };
        self.render_id(td, policy, &sample)
    }
}

fn value(name: &str, td: &TrustDomain, policy: &str, facts: &WorkloadFacts) -> Option<String> {
    let unix = facts.unix.as_ref();
    match name {
        "TrustDomain" => Some(td.to_string()),
        "PolicyName" => Some(policy.to_owned()),
        "UID" => unix.map(|u| u.uid.to_string()),
        "GID" => unix.map(|u| u.gid.to_string()),
        "UserName" => unix.and_then(|u| u.user_name.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_render() {
        let td = TrustDomain::new("td").unwrap();
        let t =
            Template::parse("spiffe://{{ .TrustDomain }}/p/{{.PolicyName}}/u/{{ .UID }}").unwrap();
        assert_eq!(
            t.check(&td, "web").unwrap().to_string(),
            "spiffe://td/p/web/u/1000"
        );
        assert!(t.uses("UID") && !t.uses("UserName"));
    }

    #[test]
    fn errors() {
        let td = TrustDomain::new("td").unwrap();
        assert_eq!(
            Template::parse("spiffe://{{ .Nope }}/x").unwrap_err(),
            TemplateError::Unknown("Nope".into())
        );
        assert_eq!(
            Template::parse("spiffe://{{ .TrustDomain /x").unwrap_err(),
            TemplateError::Unterminated
        );
        assert!(matches!(
            Template::parse("spiffe://{{ TrustDomain }}/x").unwrap_err(),
            TemplateError::Syntax(_)
        ));
        let foreign = Template::parse("spiffe://other/x").unwrap();
        assert!(matches!(
            foreign.check(&td, "p"),
            Err(TemplateError::ForeignTrustDomain(_))
        ));
        let root = Template::parse("spiffe://{{ .TrustDomain }}").unwrap();
        assert!(matches!(
            root.check(&td, "p"),
            Err(TemplateError::RootId(_))
        ));
        let bad = Template::parse("spiffe://{{ .TrustDomain }}/a b").unwrap();
        assert!(matches!(
            bad.check(&td, "p"),
            Err(TemplateError::InvalidId(_))
        ));
    }
}
