//! Reading policy files: YAML, one or more `AgentIdentity` documents per file.
//!
//! Every error names the file, the document (1-based) and the field, so an operator can fix a
//! broken file without guessing; a reload that fails keeps the previous policies in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::schema::{
    AgentIdentity, CompositeSpec, DelegationSpec, K8sSelector, TokensSpec, normalize_sha256,
};
use super::{
    DEFAULT_JWT_TTL, DEFAULT_X509_TTL, JWT_TTL_RANGE, Policy, PolicySet, Template, X509_TTL_RANGE,
};
use crate::spiffe::TrustDomain;
use crate::token::{DEFAULT_MAX_TTL, MAX_DEPTH, SpiffeIdPattern, TokenRules};

/// API version and kind every document must declare.
pub const API_VERSION: &str = "agentid.dev/v1alpha1";
pub const KIND: &str = "AgentIdentity";

/// Why policies could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: document {doc}: {field}: {message}")]
    Document {
        file: String,
        doc: usize,
        field: String,
        message: String,
    },
    #[error(
        "{file}: document {doc}: metadata.name: duplicate policy name {name:?} (first defined in {first})"
    )]
    DuplicateName {
        file: String,
        doc: usize,
        name: String,
        first: String,
    },
    #[error("{0}: no policy files (*.yaml, *.yml) found")]
    Empty(PathBuf),
}

/// Parses and validates the documents of one file. `file` names it in errors.
pub fn parse_documents(
    file: &str,
    text: &str,
    td: &TrustDomain,
) -> Result<Vec<Policy>, PolicyError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let err = |field: &str, message: String| PolicyError::Document {
            file: file.into(),
            doc,
            field: field.into(),
            message,
        };
        // A document that is only comments or `---` deserializes as null: skip it.
        let value =
            serde_yaml_ng::Value::deserialize(de).map_err(|e| err("(document)", e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let ai: AgentIdentity = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            err(
                if path == "." { "(document)" } else { &path },
                e.into_inner().to_string(),
            )
        })?;
        out.push(
            validate(ai, td, &format!("{file} (document {doc})"))
                .map_err(|(field, message)| err(field, message))?,
        );
    }
    Ok(out)
}

fn validate(
    ai: AgentIdentity,
    td: &TrustDomain,
    origin: &str,
) -> Result<Policy, (&'static str, String)> {
    if ai.api_version != API_VERSION {
        return Err((
            "apiVersion",
            format!("must be {API_VERSION:?}, found {:?}", ai.api_version),
        ));
    }
    if ai.kind != KIND {
        return Err(("kind", format!("must be {KIND:?}, found {:?}", ai.kind)));
    }
    let name = ai.metadata.name;
    if !is_dns_subdomain(&name) {
        return Err((
            "metadata.name",
            format!("{name:?} is not a lowercase DNS name (a-z, 0-9, '-', '.'; at most 253)"),
        ));
    }
    let spec = ai.spec;
    let template =
        Template::parse(&spec.spiffe_id).map_err(|e| ("spec.spiffeID", e.to_string()))?;
    template
        .check(td, &name)
        .map_err(|e| ("spec.spiffeID", e.to_string()))?;
    if spec
        .hint
        .as_ref()
        .is_some_and(|h| h.is_empty() || h.len() > 1024)
    {
        return Err(("spec.hint", "must be 1 to 1024 bytes".into()));
    }
    if spec.selector.is_empty() {
        return Err((
            "spec.selector",
            "must name at least one attribute (an empty selector would match every process)".into(),
        ));
    }
    let mut selector = spec.selector;
    if let Some(unix) = selector.unix.as_mut() {
        if let Some(h) = unix.sha256.as_mut() {
            let n = normalize_sha256(h);
            if n.len() != 7 + 64 || !n[7..].bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((
                    "spec.selector.unix.sha256",
                    format!("{h:?} is not a SHA-256 digest (64 hex digits)"),
                ));
            }
            *h = n;
        }
        if unix.path.as_ref().is_some_and(|p| !p.starts_with('/')) {
            return Err(("spec.selector.unix.path", "must be an absolute path".into()));
        }
    }
    if let Some(k8s) = selector.k8s.as_mut() {
        validate_k8s_selector(k8s)?;
    }
    let composite = spec
        .composite
        .map(validate_composite)
        .transpose()?
        .map(std::sync::Arc::new);
    // A fixed agent name is known now, so a template it cannot fill is a load error.
    if let Some(agent) = composite.as_ref().and_then(|c| c.agent_name.as_deref())
        && template.uses("AgentName")
        && let Some(reason) = super::template::segment_error(agent)
    {
        return Err((
            "spec.composite.agentName",
            format!("{agent:?} cannot fill {{{{ .AgentName }}}} in spec.spiffeID: {reason}"),
        ));
    }
    let x509_ttl = spec.x509_ttl.unwrap_or(DEFAULT_X509_TTL);
    if !(X509_TTL_RANGE.0..=X509_TTL_RANGE.1).contains(&x509_ttl) {
        return Err((
            "spec.x509TTL",
            format!(
                "must be between {} and {}",
                fmt(X509_TTL_RANGE.0),
                fmt(X509_TTL_RANGE.1)
            ),
        ));
    }
    let jwt_ttl = spec.jwt_ttl.unwrap_or(DEFAULT_JWT_TTL);
    if !(JWT_TTL_RANGE.0..=JWT_TTL_RANGE.1).contains(&jwt_ttl) {
        return Err((
            "spec.jwtTTL",
            format!(
                "must be between {} and {}",
                fmt(JWT_TTL_RANGE.0),
                fmt(JWT_TTL_RANGE.1)
            ),
        ));
    }
    let token_rules = Arc::new(token_rules(spec.tokens, spec.delegation)?);
    Ok(Policy {
        composite,
        token_rules,
        name,
        origin: origin.to_owned(),
        spiffe_id: template,
        hint: spec.hint,
        selector,
        x509_ttl,
        jwt_ttl,
    })
}

/// Longest task-token lifetime a policy may allow.
pub const MAX_TOKEN_TTL: Duration = crate::token::MAX_TTL;

fn validate_tokens(t: TokensSpec) -> Result<TokensSpec, (&'static str, String)> {
    for (field, list) in [
        ("spec.tokens.audiences", &t.audiences),
        ("spec.tokens.scopes", &t.scopes),
    ] {
        if let Some(bad) = list.iter().find(|v| {
            v.is_empty() || v.len() > 256 || v.chars().any(|c| c.is_whitespace() || c.is_control())
        }) {
            return Err((
                field,
                format!("{bad:?} must be 1 to 256 characters without spaces"),
            ));
        }
    }
    if let Some(ttl) = t.max_ttl
        && (ttl < Duration::from_secs(1) || ttl > MAX_TOKEN_TTL)
    {
        return Err((
            "spec.tokens.maxTTL",
            format!("must be between 1s and {}", fmt(MAX_TOKEN_TTL)),
        ));
    }
    Ok(t)
}

/// Delegation depth of minted tokens when `spec.delegation` gives none.
pub const DEFAULT_MAX_DEPTH: u32 = 2;
/// Children per task when `spec.delegation` gives none.
pub const DEFAULT_MAX_FAN_OUT: u32 = 10;

/// The task-token rules of a policy: what `spec.tokens` and `spec.delegation` allow. Without
/// them nothing is allowed: no audience, no scope, no child.
fn token_rules(
    tokens: Option<TokensSpec>,
    delegation: Option<DelegationSpec>,
) -> Result<TokenRules, (&'static str, String)> {
    let mut rules = TokenRules::default();
    if let Some(t) = tokens.map(validate_tokens).transpose()? {
        rules.audiences = t.audiences;
        rules.scopes = t.scopes;
        rules.max_ttl = t.max_ttl.unwrap_or(DEFAULT_MAX_TTL);
        rules.allow_subject = t.allow_subject;
    }
    if let Some(d) = delegation {
        rules.allowed_children = d
            .allowed_children
            .iter()
            .map(|p| {
                p.parse::<SpiffeIdPattern>().map_err(|e| {
                    (
                        "spec.delegation.allowedChildren",
                        format!("{e} (a SPIFFE ID, or a SPIFFE ID prefix ending in /*)"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        rules.max_depth = d.max_depth.unwrap_or(DEFAULT_MAX_DEPTH);
        if rules.max_depth == 0 || rules.max_depth > MAX_DEPTH {
            return Err((
                "spec.delegation.maxDepth",
                format!("must be between 1 and {MAX_DEPTH}"),
            ));
        }
        rules.max_fan_out = d.max_fan_out.unwrap_or(DEFAULT_MAX_FAN_OUT);
        if rules.max_fan_out == 0 || rules.max_fan_out > 1000 {
            return Err((
                "spec.delegation.maxFanOut",
                "must be between 1 and 1000".into(),
            ));
        }
    }
    // What the schema checks above cannot see (scope syntax): refuse rather than serve a
    // rule set the issuer would trip over later.
    rules
        .validate()
        .map_err(|e| ("spec.tokens", e.to_string()))?;
    Ok(rules)
}

/// Checks names against Kubernetes' own rules, so a typo fails at load instead of matching
/// nothing, and refuses empty label maps, which Kubernetes reads as "everything".
fn validate_k8s_selector(k: &mut K8sSelector) -> Result<(), (&'static str, String)> {
    for (field, v, ok, what) in [
        (
            "spec.selector.k8s.namespace",
            &k.namespace,
            is_dns_label as fn(&str) -> bool,
            "a namespace name (lowercase DNS label, at most 63)",
        ),
        (
            "spec.selector.k8s.serviceAccount",
            &k.service_account,
            is_dns_subdomain,
            "a service account name (lowercase DNS name, at most 253)",
        ),
        (
            "spec.selector.k8s.containerName",
            &k.container_name,
            is_dns_label,
            "a container name (lowercase DNS label, at most 63)",
        ),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !ok(v)) {
            return Err((field, format!("{v:?} is not {what}")));
        }
    }
    for (field, labels) in [
        (
            "spec.selector.k8s.namespaceSelector.matchLabels",
            k.namespace_selector.as_ref().map(|s| &s.match_labels),
        ),
        ("spec.selector.k8s.podLabels", k.pod_labels.as_ref()),
    ] {
        let Some(labels) = labels else { continue };
        if labels.is_empty() {
            return Err((
                field,
                "must name at least one label (an empty map would match every pod)".into(),
            ));
        }
        for (key, value) in labels {
            if !is_label_key(key) {
                return Err((field, format!("{key:?} is not a label key ([prefix/]name)")));
            }
            if !value.is_empty() && !is_label_name(value) {
                return Err((
                    field,
                    format!(
                        "label {key}: {value:?} is not a label value (at most 63 of a-z A-Z 0-9 - _ ., alphanumeric at both ends)"
                    ),
                ));
            }
        }
    }
    if let Some(d) = k.image_digest.as_mut() {
        let hex = d.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err((
                "spec.selector.k8s.imageDigest",
                format!("{d:?} is not a SHA-256 digest (sha256:<64 hex digits>)"),
            ));
        }
        *d = format!("sha256:{}", hex.to_ascii_lowercase());
    }
    Ok(())
}

fn validate_composite(mut c: CompositeSpec) -> Result<CompositeSpec, (&'static str, String)> {
    for (field, model) in c
        .model
        .iter()
        .map(|m| ("spec.composite.model", m))
        .chain(c.models.iter().map(|m| ("spec.composite.models", m)))
    {
        if !is_model(model) {
            return Err((
                field,
                format!("{model:?} is not provider/model-id (e.g. anthropic/claude-sonnet-4-5)"),
            ));
        }
    }
    for (field, files) in [
        ("spec.composite.configFiles", &c.config_files),
        ("spec.composite.toolsFiles", &c.tools_files),
    ] {
        if let Some(f) = files
            .iter()
            .find(|f| !f.starts_with('/') || f.contains('\0'))
        {
            return Err((field, format!("{f:?} is not an absolute path")));
        }
    }
    for (field, digests) in [
        ("spec.composite.configDigests", &mut c.config_digests),
        ("spec.composite.toolsDigests", &mut c.tools_digests),
        ("spec.composite.imageDigests", &mut c.image_digests),
    ] {
        for d in digests.iter_mut() {
            let n = normalize_sha256(d);
            if n.len() != 7 + 64 || !n[7..].bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((
                    field,
                    format!("{d:?} is not a SHA-256 digest (sha256:<64 hex digits>)"),
                ));
            }
            *d = n;
        }
    }
    for (field, v) in [
        ("spec.composite.agentName", &c.agent_name),
        ("spec.composite.agentVersion", &c.agent_version),
    ] {
        if v.as_ref()
            .is_some_and(|v| v.is_empty() || v.len() > 253 || v.chars().any(char::is_control))
        {
            return Err((field, "must be 1 to 253 printable characters".into()));
        }
    }
    Ok(c)
}

fn is_model(m: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '@'))
    };
    matches!(m.split_once('/'), Some((p, id)) if ok(p) && ok(id))
}

fn fmt(d: std::time::Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// RFC 1123 label, as Kubernetes names namespaces and containers.
fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns_subdomain(s)
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(s),
    }
}

/// A label name or non-empty value: at most 63, alphanumeric at both ends, `-_.` inside.
fn is_label_name(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.len() <= 63
        && alnum(s.chars().next())
        && alnum(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Reads and validates every policy file under `paths`: files as given, `*.yaml` / `*.yml` in
/// directories (sorted). The set keeps the texts it was read from (see [`PolicySet::sources`]).
pub fn load_paths(paths: &[PathBuf], td: &TrustDomain) -> Result<PolicySet, PolicyError> {
    from_sources(read_sources(paths)?, td)
}

/// The texts of the policy files under `paths`, in load order.
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<PolicySource>, PolicyError> {
    let mut files = Vec::new();
    for path in paths {
        let io = |source| PolicyError::Io {
            path: path.clone(),
            source,
        };
        if std::fs::metadata(path).map_err(io)?.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml") && p.is_file())
                .collect();
            if found.is_empty() {
                return Err(PolicyError::Empty(path.clone()));
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(|source| PolicyError::Io {
                path: file.clone(),
                source,
            })?;
            Ok(PolicySource {
                origin: file.display().to_string(),
                text,
            })
        })
        .collect()
}

/// Parses and validates policy texts as one set: names must be unique across all of them.
/// This is how a node daemon loads what its server sends, exactly as the server loaded it.
pub fn from_sources(
    sources: Vec<PolicySource>,
    td: &TrustDomain,
) -> Result<PolicySet, PolicyError> {
    let mut policies: Vec<super::Policy> = Vec::new();
    for source in &sources {
        let name = &source.origin;
        for p in parse_documents(name, &source.text, td)? {
            if let Some(first) = policies.iter().find(|q| q.name == p.name) {
                let doc = p
                    .origin
                    .rsplit("document ")
                    .next()
                    .and_then(|s| s.trim_end_matches(')').parse().ok())
                    .unwrap_or(0);
                return Err(PolicyError::DuplicateName {
                    file: name.clone(),
                    doc,
                    name: p.name,
                    first: first.origin.clone(),
                });
            }
            policies.push(p);
        }
    }
    Ok(PolicySet::new(policies).with_sources(sources))
}

/// The text of one policy file (or custom resource), as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    /// Where it came from, for messages.
    pub origin: String,
    /// YAML, one or more `AgentIdentity` documents.
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: agentid.dev/v1alpha1
kind: AgentIdentity
metadata: {name: myservice}
spec:
  spiffeID: "spiffe://{{ .TrustDomain }}/myservice"
  hint: myservice
  selector:
    unix: {uid: 1000, sha256: "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"}
  x509TTL: 1h
  jwtTTL: 5m
"#;

    fn td() -> TrustDomain {
        TrustDomain::new("td").unwrap()
    }

    fn err(text: &str) -> String {
        parse_documents("f.yaml", text, &td())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_document() {
        let p = parse_documents("f.yaml", GOOD, &td()).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].x509_ttl.as_secs(), 3600);
        assert_eq!(p[0].jwt_ttl.as_secs(), 300);
        assert_eq!(p[0].origin, "f.yaml (document 1)");
        assert!(
            p[0].selector
                .unix
                .as_ref()
                .unwrap()
                .sha256
                .as_ref()
                .unwrap()
                .starts_with("sha256:abcdef")
        );
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let second = format!("{GOOD}---\n{}", GOOD.replace("uid: 1000", "uidd: 1000"));
        let e = err(&second);
        assert!(
            e.starts_with("f.yaml: document 2: spec.selector.unix.uidd: unknown field `uidd`"),
            "{e}"
        );
        let e = err(&GOOD.replace("{{ .TrustDomain }}", "{{ .Nope }}"));
        assert!(
            e.starts_with("f.yaml: document 1: spec.spiffeID: unknown placeholder"),
            "{e}"
        );
        let e = err(&GOOD.replace("/myservice\"", "/my%20service\""));
        assert!(
            e.contains("spec.spiffeID: result is not a valid SPIFFE ID"),
            "{e}"
        );
        let e = err(&GOOD.replace("x509TTL: 1h", "x509TTL: 90d"));
        assert!(e.contains("spec.x509TTL: must be between"), "{e}");
        let e = err(&GOOD.replace("x509TTL: 1h", "x509TTL: soon"));
        assert!(e.contains("spec.x509TTL"), "{e}");
        let e = err(&GOOD.replace("kind: AgentIdentity", "kind: Other"));
        assert!(e.contains("document 1: kind: must be"), "{e}");
        let e = err(&GOOD.replace("unix: {uid: 1000, sha256: \"ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789\"}", "unix: {}"));
        assert!(
            e.contains("spec.selector: must name at least one attribute"),
            "{e}"
        );
        let e = err("apiVersion: [");
        assert!(e.starts_with("f.yaml: document 1: (document):"), "{e}");
    }

    #[test]
    fn token_and_delegation_rules_load_and_are_checked() {
        let ok = format!(
            "{GOOD}  tokens:\n    audiences: [ledger]\n    scopes: [ledger:read, ledger:write]\n    maxTTL: 2m\n  delegation:\n    allowedChildren: [\"spiffe://example.org/agent/*\", \"spiffe://example.org/reader\"]\n    maxDepth: 3\n    maxFanOut: 4\n"
        );
        let p = parse_documents("f.yaml", &ok, &td()).unwrap().remove(0);
        let r = &p.token_rules;
        assert_eq!(r.scopes, ["ledger:read", "ledger:write"]);
        assert_eq!(r.max_ttl, Duration::from_secs(120));
        assert_eq!((r.max_depth, r.max_fan_out), (3, 4));
        assert!(r.may_delegate_to(&"spiffe://example.org/agent/x".parse().unwrap()));
        assert!(r.may_delegate_to(&"spiffe://example.org/reader".parse().unwrap()));
        assert!(!r.may_delegate_to(&"spiffe://example.org/reader/x".parse().unwrap()));

        // Without the two parts nothing is allowed; delegation alone gets the defaults.
        let none = parse_documents("f.yaml", GOOD, &td()).unwrap().remove(0);
        assert_eq!(*none.token_rules, TokenRules::default());
        let d = format!("{GOOD}  delegation:\n    allowedChildren: [\"spiffe://example.org/a\"]\n");
        let d = parse_documents("f.yaml", &d, &td()).unwrap().remove(0);
        assert_eq!(
            (d.token_rules.max_depth, d.token_rules.max_fan_out),
            (DEFAULT_MAX_DEPTH, DEFAULT_MAX_FAN_OUT)
        );
        assert!(d.token_rules.audiences.is_empty());

        let e = err(&format!("{GOOD}  tokens:\n    scopes: [\"two words\"]\n"));
        assert!(e.contains("spec.tokens.scopes"), "{e}");
        let e = err(&format!("{GOOD}  tokens:\n    maxTTL: 2h\n"));
        assert!(e.contains("spec.tokens.maxTTL"), "{e}");
        let e = err(&format!(
            "{GOOD}  delegation:\n    allowedChildren: [\"agent/*\"]\n"
        ));
        assert!(e.contains("spec.delegation.allowedChildren"), "{e}");
        let e = err(&format!(
            "{GOOD}  delegation:\n    allowedChildren: [\"spiffe://example.org/a*\"]\n"
        ));
        assert!(e.contains("'*' is only allowed"), "{e}");
        let e = err(&format!("{GOOD}  delegation:\n    maxDepth: 0\n"));
        assert!(e.contains("spec.delegation.maxDepth"), "{e}");
        let e = err(&format!("{GOOD}  delegation:\n    widen: true\n"));
        assert!(e.contains("widen"), "{e}");
    }

    #[test]
    fn composite_spec_is_validated_and_pins_checked() {
        let doc = format!(
            "{GOOD}  composite:\n    model: anthropic/claude-sonnet-4-5\n    agentName: refund\n    configFiles: [/etc/agent/prompt.md]\n    models: [anthropic/claude-sonnet-4-5]\n    configDigests: [\"SHA256:{}\"]\n",
            "AB".repeat(32)
        );
        let p = parse_documents("f.yaml", &doc, &td()).unwrap().remove(0);
        let c = p.composite.expect("composite parsed");
        assert_eq!(
            c.config_digests,
            [format!("sha256:{}", "ab".repeat(32))],
            "normalised"
        );
        let good = format!("sha256:{}", "ab".repeat(32));
        let attested = |model, config| crate::policy::Attested {
            model,
            config_digest: config,
            ..Default::default()
        };
        assert!(
            c.check_pins(attested(Some("anthropic/claude-sonnet-4-5"), Some(&good)))
                .is_ok()
        );
        let e = c
            .check_pins(attested(Some("openai/gpt-4o"), Some(&good)))
            .unwrap_err();
        assert_eq!((e.field, e.value.as_str()), ("model", "openai/gpt-4o"));
        let e = c
            .check_pins(attested(Some("anthropic/claude-sonnet-4-5"), None))
            .unwrap_err();
        assert_eq!(
            e.field, "config_digest",
            "an absent value never satisfies a pin"
        );

        let e = err(&format!("{GOOD}  composite:\n    model: claude\n"));
        assert!(
            e.contains("spec.composite.model: \"claude\" is not provider/model-id"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}  composite:\n    configFiles: [prompt.md]\n"
        ));
        assert!(e.contains("spec.composite.configFiles"), "{e}");
        let e = err(&format!("{GOOD}  composite:\n    toolsDigests: [md5:00]\n"));
        assert!(e.contains("spec.composite.toolsDigests"), "{e}");
        let e = err(&format!("{GOOD}  composite:\n    modle: a/b\n"));
        assert!(e.contains("spec.composite.modle: unknown field"), "{e}");
    }

    #[test]
    fn duplicate_names_across_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yml"), GOOD).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let e = load_paths(&[dir.path().to_owned()], &td())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b.yml: document 1: metadata.name: duplicate policy name \"myservice\""),
            "{e}"
        );
        std::fs::remove_file(dir.path().join("b.yml")).unwrap();
        assert_eq!(
            load_paths(&[dir.path().to_owned()], &td())
                .unwrap()
                .policies()
                .len(),
            1
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_paths(&[empty.path().to_owned()], &td()),
            Err(PolicyError::Empty(_))
        ));
        assert!(matches!(
            load_paths(&[dir.path().join("missing.yaml")], &td()),
            Err(PolicyError::Io { .. })
        ));
    }

    const POD: &str = r#"
apiVersion: agentid.dev/v1alpha1
kind: AgentIdentity
metadata: {name: refund}
spec:
  spiffeID: "spiffe://{{ .TrustDomain }}/ns/{{ .Namespace }}/sa/{{ .ServiceAccount }}/agent/{{ .AgentName }}"
  selector:
    k8s:
      namespace: payments
      namespaceSelector: {matchLabels: {team: pay}}
      serviceAccount: refund-agent
      podLabels: {app.kubernetes.io/name: refund, tier: agent}
      containerName: agent
      imageDigest: "sha256:ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB"
"#;

    #[test]
    fn k8s_selector_loads_and_is_normalised() {
        let p = parse_documents("f.yaml", POD, &td()).unwrap().remove(0);
        let k = p.selector.k8s.expect("k8s part");
        assert_eq!(k.namespace.as_deref(), Some("payments"));
        assert_eq!(k.namespace_selector.unwrap().match_labels["team"], "pay");
        assert_eq!(k.service_account.as_deref(), Some("refund-agent"));
        assert_eq!(k.pod_labels.unwrap().len(), 2);
        assert_eq!(k.container_name.as_deref(), Some("agent"));
        assert_eq!(
            k.image_digest.unwrap(),
            format!("sha256:{}", "ab".repeat(32)),
            "hex lowercased"
        );
        assert!(p.selector.unix.is_none());
    }

    #[test]
    fn k8s_selector_errors_name_the_field() {
        let second = |from: &str, to: &str| {
            let doc = POD.replace("name: refund}", "name: refund-2}");
            assert!(doc.contains(from), "{from}");
            err(&format!("{POD}---\n{}", doc.replace(from, to)))
        };
        for (from, to, want) in [
            (
                "imageDigest: \"sha256:",
                "imageDigest: \"md5:",
                "f.yaml: document 2: spec.selector.k8s.imageDigest: \"md5:",
            ),
            (
                "imageDigest: \"sha256:AB",
                "imageDigest: \"sha256:",
                "f.yaml: document 2: spec.selector.k8s.imageDigest: ",
            ),
            (
                "namespace: payments",
                "namespace: Payments",
                "f.yaml: document 2: spec.selector.k8s.namespace: \"Payments\" is not a namespace name",
            ),
            (
                "namespace: payments",
                "namespace: a/b",
                "f.yaml: document 2: spec.selector.k8s.namespace: \"a/b\" is not",
            ),
            (
                "serviceAccount: refund-agent",
                "serviceAccount: refund_agent",
                "f.yaml: document 2: spec.selector.k8s.serviceAccount: \"refund_agent\" is not",
            ),
            (
                "containerName: agent",
                "containerName: \"\"",
                "f.yaml: document 2: spec.selector.k8s.containerName: \"\" is not",
            ),
            (
                "podLabels: {app.kubernetes.io/name: refund, tier: agent}",
                "podLabels: {}",
                "f.yaml: document 2: spec.selector.k8s.podLabels: must name at least one label",
            ),
            (
                "tier: agent}",
                "tier: -agent}",
                "f.yaml: document 2: spec.selector.k8s.podLabels: label tier: \"-agent\" is not a label value",
            ),
            (
                "tier: agent}",
                "\"bad key!\": agent}",
                "f.yaml: document 2: spec.selector.k8s.podLabels: \"bad key!\" is not a label key",
            ),
            (
                "{matchLabels: {team: pay}}",
                "{matchLabels: {}}",
                "f.yaml: document 2: spec.selector.k8s.namespaceSelector.matchLabels: must name at least one label",
            ),
            (
                "{matchLabels: {team: pay}}",
                "{matchExpressions: []}",
                "f.yaml: document 2: spec.selector.k8s.namespaceSelector.matchExpressions: unknown field",
            ),
            (
                "containerName: agent",
                "container: agent",
                "f.yaml: document 2: spec.selector.k8s.container: unknown field `container`",
            ),
        ] {
            let e = second(from, to);
            assert!(e.starts_with(want), "{to}: {e}");
        }
    }

    #[test]
    fn empty_k8s_selector_is_an_empty_selector() {
        let doc = |selector: &str| {
            GOOD.replace(
                "unix: {uid: 1000, sha256: \"ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789\"}",
                selector,
            )
        };
        let e = err(&doc("k8s: {}"));
        assert!(
            e.contains("document 1: spec.selector: must name at least one attribute"),
            "{e}"
        );
        let e = err(&doc("{unix: {}, k8s: {}}"));
        assert!(e.contains("spec.selector: must name at least one"), "{e}");
        assert!(
            parse_documents(
                "f.yaml",
                &doc("{unix: {uid: 1}, k8s: {namespace: a}}"),
                &td()
            )
            .is_ok()
        );
    }

    #[test]
    fn k8s_placeholders_load_without_a_k8s_selector() {
        let doc = GOOD.replace("/myservice\"", "/ns/{{ .Namespace }}/pod/{{ .PodUID }}\"");
        assert!(parse_documents("f.yaml", &doc, &td()).is_ok());
        // A template that no caller could fill is still refused.
        let doc = GOOD.replace("/myservice\"", "/ns-{{ .Namespace }}/%\"");
        let e = err(&doc);
        assert!(
            e.contains("spec.spiffeID: result is not a valid SPIFFE ID"),
            "{e}"
        );
    }

    #[test]
    fn a_fixed_agent_name_must_fit_the_template() {
        let doc = GOOD.replace("/myservice\"", "/agent/{{ .AgentName }}\"");
        assert!(
            parse_documents(
                "f.yaml",
                &format!("{doc}  composite: {{agentName: refund}}\n"),
                &td()
            )
            .is_ok()
        );
        let e = err(&format!(
            "{doc}  composite: {{agentName: \"refund agent\"}}\n"
        ));
        assert!(
            e.starts_with("f.yaml: document 1: spec.composite.agentName: \"refund agent\" cannot fill {{ .AgentName }}"),
            "{e}"
        );
        // Not used by the template: any printable name is fine.
        assert!(
            parse_documents(
                "f.yaml",
                &format!("{GOOD}  composite: {{agentName: \"refund agent\"}}\n"),
                &td()
            )
            .is_ok()
        );
    }
}
