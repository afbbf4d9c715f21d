//! Field and label selectors, as lists and watches apply them.

use std::collections::BTreeMap;

use serde_json::Value;

use super::Kind;

/// The parts of an object that selectors match.
#[derive(Default)]
pub(super) struct Meta {
    pub(super) name: String,
    pub(super) namespace: String,
    /// `spec.nodeName` of a pod.
    pub(super) node: String,
    pub(super) labels: BTreeMap<String, String>,
}

impl Meta {
    pub(super) fn of(object: &Value) -> Meta {
        let m = &object["metadata"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        Meta {
            name: s(&m["name"]),
            namespace: s(&m["namespace"]),
            node: s(&object["spec"]["nodeName"]),
            labels: m["labels"]
                .as_object()
                .map(|l| {
                    l.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// A field a field selector can name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    Name,
    Namespace,
    /// `spec.nodeName`, pods only.
    Node,
}

#[derive(Clone)]
pub(super) struct FieldTerm {
    pub(super) field: Field,
    pub(super) value: String,
    /// `=`/`==` rather than `!=`.
    pub(super) equal: bool,
}

#[derive(Clone)]
enum LabelTerm {
    Equal(String, String),
    NotEqual(String, String),
    Exists(String),
    Absent(String),
}

/// A list's or watch's field and label selectors: every term has to hold.
#[derive(Clone, Default)]
pub(super) struct Selector {
    pub(super) fields: Vec<FieldTerm>,
    labels: Vec<LabelTerm>,
}

impl Selector {
    pub(super) fn parse<'a>(
        kind: Kind,
        param: &impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Selector, String> {
        let mut selector = Selector::default();
        for term in param("fieldSelector")
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (key, value, equal) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, v, true)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let field = match (key.trim(), kind) {
                ("metadata.name", _) => Field::Name,
                ("metadata.namespace", Kind::Pods | Kind::Object(_)) => Field::Namespace,
                ("spec.nodeName", Kind::Pods) => Field::Node,
                (other, _) => return Err(format!("field label not supported: {other}")),
            };
            selector.fields.push(FieldTerm {
                field,
                value: value.trim().to_owned(),
                equal,
            });
        }
        for term in param("labelSelector")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let label = if term.contains(['(', ')', ' ', '<', '>']) {
                return Err(format!(
                    "unsupported label selector term {term:?} (only =, ==, !=, k and !k)"
                ));
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelTerm::NotEqual(k.to_owned(), v.to_owned())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelTerm::Equal(k.to_owned(), v.to_owned())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelTerm::Equal(k.to_owned(), v.to_owned())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelTerm::Absent(k.to_owned())
            } else {
                LabelTerm::Exists(term.to_owned())
            };
            let key = match &label {
                LabelTerm::Equal(k, _)
                | LabelTerm::NotEqual(k, _)
                | LabelTerm::Exists(k)
                | LabelTerm::Absent(k) => k,
            };
            if key.is_empty() {
                return Err(format!("invalid label selector term {term:?}"));
            }
            selector.labels.push(label);
        }
        Ok(selector)
    }

    pub(super) fn matches(&self, m: &Meta) -> bool {
        let fields = self.fields.iter().all(|t| {
            let have = match t.field {
                Field::Name => &m.name,
                Field::Namespace => &m.namespace,
                Field::Node => &m.node,
            };
            (*have == t.value) == t.equal
        });
        let labels = self.labels.iter().all(|t| match t {
            LabelTerm::Equal(k, v) => m.labels.get(k) == Some(v),
            LabelTerm::NotEqual(k, v) => m.labels.get(k) != Some(v),
            LabelTerm::Exists(k) => m.labels.contains_key(k),
            LabelTerm::Absent(k) => !m.labels.contains_key(k),
        });
        fields && labels
    }
}
