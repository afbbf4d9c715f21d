//! Generic namespaced objects (secrets, configmaps, leases, AgentIdentities) stored as JSON:
//! their paths, the verbs with a real API server's checks and answers, and the test's helpers.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::list_watch::{list_response, watch_response};
use super::selector::{Field, FieldTerm, Meta, Selector};
use super::{
    Kind, Shared, StandIn, Store, bad_request, decode, is_watch, json_response, query_params,
    refusal, status_json, status_with_details,
};

/// The largest request body read (the API server's limit is 3 MiB).
const MAX_BODY: usize = 3 << 20;

/// The message of a 409 for a stale `resourceVersion`, as the API server words it.
const MODIFIED: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// A kind of generic object served from JSON storage.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Resource {
    /// API group; empty for core.
    group: &'static str,
    version: &'static str,
    pub(super) plural: &'static str,
    pub(super) kind: &'static str,
    /// A custom resource: DELETE answers the object, and `metadata.generation` counts changes
    /// outside `metadata`.
    custom: bool,
}

/// The generic objects served.
const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        custom: false,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        custom: false,
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        custom: false,
    },
    Resource {
        group: "agentid.dev",
        version: "v1alpha1",
        plural: "agentidentities",
        kind: "AgentIdentity",
        custom: true,
    },
];

impl Resource {
    fn by_plural(plural: &str) -> Option<&'static Resource> {
        RESOURCES.iter().find(|r| r.plural == plural)
    }

    pub(super) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `secrets`, `leases.coordination.k8s.io`: how error messages name the resource.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Secret`, `Lease.coordination.k8s.io`: how `Invalid` messages name the kind.
    fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// A `Status`'s `details` for the object `name`.
    fn details(&self, name: &str) -> Value {
        let mut d = json!({"name": name, "kind": self.plural});
        if !self.group.is_empty() {
            d["group"] = json!(self.group);
        }
        d
    }
}

/// Where a generic object is stored; the order is a list's order.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ObjKey {
    pub(super) plural: &'static str,
    pub(super) namespace: String,
    pub(super) name: String,
}

impl ObjKey {
    pub(super) fn new(res: &'static Resource, namespace: &str, name: &str) -> ObjKey {
        ObjKey {
            plural: res.plural,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl Store {
    /// Stores a complete generic object under the next resourceVersion and logs `ty`.
    fn save(&mut self, res: &'static Resource, mut obj: Value, ty: &str) -> Value {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let meta = Meta::of(&obj);
        self.emit(rv, Kind::Object(res), ty, &obj);
        self.objects
            .insert(ObjKey::new(res, &meta.namespace, &meta.name), obj.clone());
        obj
    }

    /// Removes a generic object, logging DELETED under the next resourceVersion.
    fn remove(&mut self, res: &'static Resource, namespace: &str, name: &str) -> Option<Value> {
        let mut obj = self.objects.remove(&ObjKey::new(res, namespace, name))?;
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit(rv, Kind::Object(res), "DELETED", &obj);
        Some(obj)
    }
}

impl StandIn {
    /// Creates or replaces the generic object `obj` of `plural` (`secrets`, `configmaps`,
    /// `leases`, `agentidentities`) in `namespace`, as if another client had written it: a
    /// watch sees ADDED or MODIFIED. `obj` needs `metadata.name`; the server's fields
    /// (`apiVersion`, `kind`, `metadata.namespace`, `resourceVersion`, `uid`,
    /// `creationTimestamp`, `generation`) are filled in, and given ones are kept; nothing is
    /// validated, so a test can plant what a real server would refuse (say, `data` that is not
    /// base64). Returns the stored object. Not recorded in `writes`, and never refused.
    pub fn put_object(&self, plural: &str, namespace: &str, obj: Value) -> Value {
        let res = Resource::by_plural(plural).unwrap_or_else(|| panic!("no resource {plural}"));
        let mut obj = obj;
        assert!(obj.is_object(), "not a JSON object: {obj}");
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("put_object needs metadata.name")
            .to_owned();
        obj["metadata"]["namespace"] = json!(namespace);
        if obj["apiVersion"].is_null() {
            obj["apiVersion"] = json!(res.api_version());
        }
        if obj["kind"].is_null() {
            obj["kind"] = json!(res.kind);
        }
        let given = obj["metadata"].clone();
        let stored = {
            let mut st = self.shared.store.lock().unwrap();
            let old = st.objects.get(&ObjKey::new(res, namespace, &name)).cloned();
            let ty = match &old {
                Some(old) => {
                    replace_fields(res, old, &mut obj);
                    "MODIFIED"
                }
                None => {
                    create_fields(res, &mut obj);
                    "ADDED"
                }
            };
            for field in ["uid", "creationTimestamp", "generation"] {
                if !given[field].is_null() {
                    obj["metadata"][field] = given[field].clone();
                }
            }
            st.save(res, obj, ty)
        };
        self.shared.bump();
        stored
    }

    /// The stored generic object, as a GET would answer it.
    pub fn get_object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = Resource::by_plural(plural)?;
        let st = self.shared.store.lock().unwrap();
        st.objects.get(&ObjKey::new(res, namespace, name)).cloned()
    }

    /// Every stored generic object of `plural`, in all namespaces, in list order.
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        let Some(res) = Resource::by_plural(plural) else {
            return Vec::new();
        };
        let st = self.shared.store.lock().unwrap();
        st.snapshot(Kind::Object(res), &Selector::default())
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Deletes a generic object as if another client had (a watch sees DELETED); returns it,
    /// or `None` if there was none.
    pub fn delete_object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = Resource::by_plural(plural)?;
        let gone = self
            .shared
            .store
            .lock()
            .unwrap()
            .remove(res, namespace, name);
        self.shared.bump();
        gone
    }

    /// Every write request (POST, PUT, DELETE, PATCH) to a generic object so far, refused ones
    /// included, as `METHOD plural namespace/name status`, e.g.
    /// `PUT secrets agentid/agentid-server-keys 200` (`409`, `401`, `503`, … when refused;
    /// `garbage` when answered with malformed JSON). A POST names the body's `metadata.name`,
    /// or its `generateName` prefix.
    pub fn writes(&self) -> Vec<String> {
        self.shared.writes.lock().unwrap().clone()
    }

    /// From now on every write to the objects of `plural` named `name` (in any namespace) fails
    /// with `code` (409: a `Conflict`; 500: an `InternalError`; others: their usual reason),
    /// nothing stored; `None` lets them through again.
    pub fn fail_writes(&self, plural: &str, name: &str, code: Option<u16>) {
        let key = (plural.to_owned(), name.to_owned());
        let mut failing = self.shared.failing.lock().unwrap();
        match code {
            Some(code) => failing.insert(key, code),
            None => failing.remove(&key),
        };
    }
}

fn not_found(res: &Resource, name: &str) -> Response {
    let message = format!("{} \"{name}\" not found", res.qualified());
    status_with_details(404, "NotFound", &message, Some(res.details(name)))
}

fn already_exists(res: &Resource, name: &str) -> Response {
    let message = format!("{} \"{name}\" already exists", res.qualified());
    status_with_details(409, "AlreadyExists", &message, Some(res.details(name)))
}

fn conflict(res: &Resource, name: &str, why: &str) -> Response {
    let message = format!(
        "Operation cannot be fulfilled on {} \"{name}\": {why}",
        res.qualified()
    );
    status_with_details(409, "Conflict", &message, Some(res.details(name)))
}

/// 422 for one bad field, e.g. `metadata.name: Required value: …`.
fn invalid(res: &Resource, name: &str, field: &str, cause: &str, detail: &str) -> Response {
    let message = format!(
        "{} \"{name}\" is invalid: {field}: {detail}",
        res.qualified_kind()
    );
    let mut details = res.details(name);
    details["kind"] = json!(res.kind);
    details["causes"] = json!([{"reason": cause, "message": detail, "field": field}]);
    status_with_details(422, "Invalid", &message, Some(details))
}

/// What `fail_writes` answers.
fn injected_failure(res: &Resource, name: &str, code: u16) -> Response {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => return not_found(res, name),
        409 => return conflict(res, name, MODIFIED),
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    let message = match code {
        500 => "Internal error occurred: failure injected by the test".to_owned(),
        _ => format!("failure injected by the test ({code})"),
    };
    status_with_details(code, reason, &message, Some(res.details(name)))
}

/// A path to a generic object or collection.
pub(super) struct Route {
    res: &'static Resource,
    /// `None`: across namespaces (list and watch only).
    namespace: Option<String>,
    name: Option<String>,
}

impl Route {
    /// `/api/v1[/namespaces/<ns>]/<plural>[/<name>]` or the same under
    /// `/apis/<group>/<version>`, for a plural in `RESOURCES`; anything else is `None`.
    pub(super) fn parse(path: &str) -> Option<Route> {
        let (group, version, rest) = match path.strip_prefix("/api/v1/") {
            Some(rest) => ("", "v1", rest),
            None => {
                let mut parts = path.strip_prefix("/apis/")?.splitn(3, '/');
                (parts.next()?, parts.next()?, parts.next()?)
            }
        };
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return None;
        }
        let (namespace, plural, name) = match segments.as_slice() {
            [plural] => (None, *plural, None),
            ["namespaces", ns, plural] => (Some(*ns), *plural, None),
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
            _ => return None,
        };
        let res = RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)?;
        Some(Route {
            res,
            namespace: namespace.map(decode),
            name: name.map(decode),
        })
    }
}

/// Everything under a generic object's path: refusals, then the verb; writes are recorded.
pub(super) async fn serve(
    s: &Arc<Shared>,
    req: Request,
    route: Route,
    path: &str,
    query: &str,
) -> Response {
    let method = req.method().clone();
    let refused = refusal(s, &req, false);
    // A write's body is read even when refused: the history names the object.
    let body = if method == Method::GET {
        Ok(Bytes::new())
    } else {
        axum::body::to_bytes(req.into_body(), MAX_BODY).await
    };
    let response = match (refused, &body) {
        (Some(refused), _) => refused,
        (None, Err(_)) => status_json(
            413,
            "RequestEntityTooLarge",
            "the request body is unreadable or larger than 3 MiB",
        ),
        (None, Ok(body)) => {
            let params = query_params(s, path, query);
            let param = |name: &str| {
                params
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            object_verb(s, &method, &route, &param, body)
        }
    };
    if method != Method::GET {
        let name = match (&route.name, &body) {
            (Some(name), _) => name.clone(),
            (None, Ok(body)) => body_name(body),
            (None, Err(_)) => String::new(),
        };
        record_write(s, &method, &route, &name, &response);
    }
    response
}

/// A POST's `metadata.name` (or its `generateName` prefix), for the write history.
fn body_name(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    let m = &v["metadata"];
    m["name"]
        .as_str()
        .or(m["generateName"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn record_write(s: &Shared, method: &Method, route: &Route, name: &str, response: &Response) {
    let outcome = if response.extensions().get::<Garbage>().is_some() {
        "garbage".to_owned()
    } else {
        response.status().as_u16().to_string()
    };
    let namespace = route.namespace.as_deref().unwrap_or_default();
    s.writes.lock().unwrap().push(format!(
        "{method} {} {namespace}/{name} {outcome}",
        route.res.plural
    ));
}

/// Marks a write answered with malformed JSON, for the write history.
#[derive(Clone)]
struct Garbage;

fn object_verb<'a>(
    s: &Arc<Shared>,
    method: &Method,
    route: &Route,
    param: &impl Fn(&str) -> Option<&'a str>,
    body: &[u8],
) -> Response {
    let res = route.res;
    let not_allowed = || {
        status_json(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    };
    let dry_run = match param("dryRun") {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return bad_request(&format!(
                "dryRun: Unsupported value: \"{other}\": supported values: \"All\""
            ));
        }
    };
    if *method == Method::PATCH {
        return status_json(
            405,
            "MethodNotAllowed",
            "PATCH is not served by this stand-in: use GET, POST, PUT and DELETE",
        );
    }
    if *method != Method::GET {
        let name = route.name.clone().unwrap_or_else(|| body_name(body));
        let failing = s
            .failing
            .lock()
            .unwrap()
            .get(&(res.plural.to_owned(), name.clone()))
            .copied();
        if let Some(code) = failing {
            return injected_failure(res, &name, code);
        }
        if s.garbage.load(Ordering::SeqCst) {
            let mut response = json_response("{\"kind\":\"Status\",\"metadata\":");
            response.extensions_mut().insert(Garbage);
            return response;
        }
    }
    match (method, &route.namespace, &route.name) {
        (&Method::GET, Some(ns), Some(name)) => {
            if s.garbage.load(Ordering::SeqCst) {
                return json_response("{\"kind\":");
            }
            let st = s.store.lock().unwrap();
            match st.objects.get(&ObjKey::new(res, ns, name)) {
                Some(obj) => json_response(&obj.to_string()),
                None => not_found(res, name),
            }
        }
        (&Method::GET, ns, None) => {
            let mut selector = match Selector::parse(Kind::Object(res), param) {
                Ok(selector) => selector,
                Err(e) => return bad_request(&e),
            };
            if let Some(ns) = ns {
                selector.fields.push(FieldTerm {
                    field: Field::Namespace,
                    value: ns.clone(),
                    equal: true,
                });
            }
            if is_watch(param) {
                watch_response(s, Kind::Object(res), selector, param)
            } else {
                list_response(s, Kind::Object(res), &selector, param)
            }
        }
        (&Method::POST, Some(ns), None) => create(s, res, ns, dry_run, body),
        (&Method::PUT, Some(ns), Some(name)) => replace(s, res, ns, name, dry_run, body),
        (&Method::DELETE, Some(ns), Some(name)) => delete(s, res, ns, name, dry_run, body),
        _ => not_allowed(),
    }
}

/// An object response with `code`.
fn object_response(code: StatusCode, obj: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        obj.to_string(),
    )
        .into_response()
}

/// The body of a POST or PUT: a JSON object of `res`'s kind (`apiVersion` and `kind` default
/// to it) with a `metadata` object whose namespace, when given, is `namespace` (set when not).
/// Anything else is a 400 with the returned message.
fn parse_object(res: &Resource, namespace: &str, body: &[u8]) -> Result<Value, String> {
    let cannot = |why: &str| {
        format!(
            "{} in version \"{}\" cannot be handled as a {}: {why}",
            res.kind, res.version, res.kind
        )
    };
    let mut obj: Value = serde_json::from_slice(body).map_err(|e| cannot(&e.to_string()))?;
    let Some(map) = obj.as_object_mut() else {
        return Err(cannot("not a JSON object"));
    };
    let api_version = res.api_version();
    match map.get("apiVersion") {
        None | Some(Value::Null) => {
            map.insert("apiVersion".into(), json!(api_version));
        }
        Some(v) if v.as_str() == Some(api_version.as_str()) => {}
        Some(v) => {
            return Err(format!(
                "the API version in the data ({}) does not match the expected API version \
                 ({api_version})",
                v.as_str().unwrap_or_default()
            ));
        }
    }
    match map.get("kind") {
        None | Some(Value::Null) => {
            map.insert("kind".into(), json!(res.kind));
        }
        Some(v) if v.as_str() == Some(res.kind) => {}
        Some(v) => {
            return Err(format!(
                "the kind in the data ({}) does not match the expected kind ({})",
                v.as_str().unwrap_or_default(),
                res.kind
            ));
        }
    }
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    if meta.is_null() {
        *meta = json!({});
    }
    let Some(meta) = meta.as_object_mut() else {
        return Err(cannot("metadata is not an object"));
    };
    for field in [
        "name",
        "generateName",
        "namespace",
        "resourceVersion",
        "uid",
    ] {
        if meta
            .get(field)
            .is_some_and(|v| !v.is_null() && !v.is_string())
        {
            return Err(cannot(&format!("metadata.{field} is not a string")));
        }
    }
    for field in ["labels", "annotations"] {
        let ok = match meta.get(field) {
            None | Some(Value::Null) => true,
            Some(Value::Object(m)) => m.values().all(Value::is_string),
            Some(_) => false,
        };
        if !ok {
            return Err(cannot(&format!("metadata.{field} is not a map of strings")));
        }
    }
    match meta.get("namespace").and_then(Value::as_str) {
        None | Some("") => {
            meta.insert("namespace".into(), json!(namespace));
        }
        Some(ns) if ns == namespace => {}
        Some(_) => {
            return Err(
                "the namespace of the provided object does not match the namespace sent \
                        on the request"
                    .to_owned(),
            );
        }
    }
    if res.plural == "secrets" {
        normalize_secret(&mut obj).map_err(|e| cannot(&e))?;
    }
    Ok(obj)
}

/// Folds `stringData` into `data`, checks that `data` holds base64, defaults `type`.
fn normalize_secret(obj: &mut Value) -> Result<(), String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some(map) = obj.as_object_mut() else {
        return Err("not a JSON object".into());
    };
    let mut data = match map.remove("data") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(data)) => data,
        Some(_) => return Err("data is not a map".into()),
    };
    for (k, v) in &data {
        let Some(v) = v.as_str() else {
            return Err(format!("data[{k:?}] is not a string"));
        };
        b64.decode(v)
            .map_err(|e| format!("data[{k:?}]: illegal base64 data: {e}"))?;
    }
    match map.remove("stringData") {
        None | Some(Value::Null) => {}
        Some(Value::Object(strings)) => {
            for (k, v) in strings {
                let Some(v) = v.as_str() else {
                    return Err(format!("stringData[{k:?}] is not a string"));
                };
                data.insert(k, json!(b64.encode(v)));
            }
        }
        Some(_) => return Err("stringData is not a map".into()),
    }
    if !data.is_empty() {
        map.insert("data".into(), Value::Object(data));
    }
    if map
        .get("type")
        .is_none_or(|t| t.as_str().is_none_or(str::is_empty))
    {
        map.insert("type".into(), json!("Opaque"));
    }
    Ok(())
}

/// What the server sets on a new object.
fn create_fields(res: &Resource, obj: &mut Value) {
    let meta = &mut obj["metadata"];
    meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
    meta["creationTimestamp"] = json!(now_rfc3339());
    if let Some(meta) = meta.as_object_mut() {
        meta.remove("resourceVersion");
        meta.remove("deletionTimestamp");
        meta.remove("generation");
    }
    if res.custom {
        obj["metadata"]["generation"] = json!(1);
    }
}

/// What the server keeps or sets on a replaced object: `uid`, `creationTimestamp` and (for now)
/// the `resourceVersion` of `old`; a custom resource's `generation`, bumped when anything
/// outside `metadata` changed.
fn replace_fields(res: &Resource, old: &Value, obj: &mut Value) {
    for field in ["uid", "creationTimestamp", "resourceVersion"] {
        obj["metadata"][field] = old["metadata"][field].clone();
    }
    if res.custom {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let outside_metadata = |v: &Value| {
            let mut v = v.clone();
            if let Some(m) = v.as_object_mut() {
                m.remove("metadata");
            }
            v
        };
        let changed = outside_metadata(old) != outside_metadata(obj);
        obj["metadata"]["generation"] = json!(generation + i64::from(changed));
    } else if let Some(meta) = obj["metadata"].as_object_mut() {
        meta.remove("generation");
    }
}

/// `POST <collection>`.
fn create(s: &Shared, res: &'static Resource, ns: &str, dry_run: bool, body: &[u8]) -> Response {
    let mut obj = match parse_object(res, ns, body) {
        Ok(obj) => obj,
        Err(message) => return bad_request(&message),
    };
    let meta = &obj["metadata"];
    let name = match meta["name"].as_str().filter(|n| !n.is_empty()) {
        Some(name) => name.to_owned(),
        None => match meta["generateName"].as_str().filter(|g| !g.is_empty()) {
            Some(prefix) => format!("{prefix}{}", random_suffix()),
            None => {
                return invalid(
                    res,
                    "",
                    "metadata.name",
                    "FieldValueRequired",
                    "Required value: name or generateName is required",
                );
            }
        },
    };
    if let Err(why) = check_name(&name) {
        let detail = format!("Invalid value: \"{name}\": {why}");
        return invalid(res, &name, "metadata.name", "FieldValueInvalid", &detail);
    }
    if meta["resourceVersion"]
        .as_str()
        .is_some_and(|rv| !rv.is_empty())
    {
        return status_json(
            500,
            "InternalError",
            "Internal error occurred: resourceVersion should not be set on objects to be created",
        );
    }
    obj["metadata"]["name"] = json!(name);
    create_fields(res, &mut obj);
    let stored = {
        let mut st = s.store.lock().unwrap();
        if st.objects.contains_key(&ObjKey::new(res, ns, &name)) {
            return already_exists(res, &name);
        }
        if dry_run {
            return object_response(StatusCode::CREATED, &obj);
        }
        st.save(res, obj, "ADDED")
    };
    s.bump();
    object_response(StatusCode::CREATED, &stored)
}

/// `PUT <collection>/<name>`.
fn replace(
    s: &Shared,
    res: &'static Resource,
    ns: &str,
    name: &str,
    dry_run: bool,
    body: &[u8],
) -> Response {
    let mut obj = match parse_object(res, ns, body) {
        Ok(obj) => obj,
        Err(message) => return bad_request(&message),
    };
    let body_name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if body_name != name {
        return bad_request(&format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        ));
    }
    let stored = {
        let mut st = s.store.lock().unwrap();
        let Some(old) = st.objects.get(&ObjKey::new(res, ns, name)) else {
            return not_found(res, name);
        };
        let meta = &obj["metadata"];
        let old_meta = &old["metadata"];
        if let Some(rv) = meta["resourceVersion"].as_str().filter(|rv| !rv.is_empty())
            && Some(rv) != old_meta["resourceVersion"].as_str()
        {
            return conflict(res, name, MODIFIED);
        }
        if let Some(uid) = meta["uid"].as_str().filter(|u| !u.is_empty())
            && Some(uid) != old_meta["uid"].as_str()
        {
            let detail = format!("Invalid value: \"{uid}\": field is immutable");
            return invalid(res, name, "metadata.uid", "FieldValueInvalid", &detail);
        }
        let old = old.clone();
        replace_fields(res, &old, &mut obj);
        if obj == old || dry_run {
            // Nothing changed: etcd is not written, the resourceVersion stays, no event.
            return object_response(StatusCode::OK, &obj);
        }
        st.save(res, obj, "MODIFIED")
    };
    s.bump();
    object_response(StatusCode::OK, &stored)
}

/// `DELETE <collection>/<name>`, with optional `DeleteOptions` in the body.
fn delete(
    s: &Shared,
    res: &'static Resource,
    ns: &str,
    name: &str,
    dry_run: bool,
    body: &[u8],
) -> Response {
    let options: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) if v.is_object() => v,
            Ok(_) => return bad_request("DeleteOptions is not a JSON object"),
            Err(e) => return bad_request(&format!("DeleteOptions: {e}")),
        }
    };
    let dry_run = dry_run
        || match &options["dryRun"] {
            Value::Null => false,
            Value::Array(modes) if modes.iter().all(|m| m == "All") => !modes.is_empty(),
            other => {
                return bad_request(&format!(
                    "dryRun: Unsupported value: {other}: supported values: \"All\""
                ));
            }
        };
    let gone = {
        let mut st = s.store.lock().unwrap();
        let Some(old) = st.objects.get(&ObjKey::new(res, ns, name)) else {
            return not_found(res, name);
        };
        let pre = &options["preconditions"];
        for (field, what) in [("resourceVersion", "ResourceVersion"), ("uid", "UID")] {
            if let Some(want) = pre[field].as_str() {
                let have = old["metadata"][field].as_str().unwrap_or_default();
                if want != have {
                    let why = format!(
                        "Precondition failed: {what} in precondition: {want}, {what} in object \
                         meta: {have}"
                    );
                    return conflict(res, name, &why);
                }
            }
        }
        if dry_run {
            old.clone()
        } else {
            match st.remove(res, ns, name) {
                Some(gone) => gone,
                None => return not_found(res, name),
            }
        }
    };
    if !dry_run {
        s.bump();
    }
    if res.custom {
        return object_response(StatusCode::OK, &gone);
    }
    let mut details = res.details(name);
    details["uid"] = gone["metadata"]["uid"].clone();
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    });
    object_response(StatusCode::OK, &body)
}

/// A DNS-1123 subdomain, as names of these kinds have to be.
fn check_name(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character"
                .into(),
        )
    }
}

/// The five characters `generateName` appends.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| char::from(ALPHABET[fastrand::usize(..ALPHABET.len())]))
        .collect()
}

/// `2024-05-01T12:00:00Z`, as `metadata.creationTimestamp` is written.
fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}
