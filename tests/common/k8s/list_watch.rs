//! Lists and watches of any kind the stand-in serves, from the store and its event log.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::json;
use tokio::sync::watch;

use super::selector::Selector;
use super::{BOOKMARK_EVERY, Kind, Shared, event_line, json_response, key_order, status_json};

pub(super) fn list_response<'a>(
    s: &Shared,
    kind: Kind,
    selector: &Selector,
    param: &impl Fn(&str) -> Option<&'a str>,
) -> Response {
    if s.garbage.load(Ordering::SeqCst) {
        return json_response("{\"kind\":\"PodList\",\"items\":[{\"metadata\":");
    }
    let limit: usize = param("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let after = param("continue").unwrap_or_default().to_owned();
    let st = s.store.lock().unwrap();
    let mut rest = st
        .snapshot(kind, selector)
        .into_iter()
        .filter(|(k, _)| after.is_empty() || key_order(k) > key_order(&after))
        .peekable();
    let mut items = Vec::new();
    let mut last = String::new();
    while items.len() < limit {
        let Some((k, v)) = rest.next() else { break };
        last = k;
        items.push(v);
    }
    let continue_token = if rest.peek().is_some() {
        last
    } else {
        String::new()
    };
    let body = json!({
        "kind": format!("{}List", kind.kind()),
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": st.rv.to_string(), "continue": continue_token},
        "items": items,
    });
    json_response(&body.to_string())
}

struct WatchState {
    s: Arc<Shared>,
    kind: Kind,
    selector: Selector,
    cursor: u64,
    pending: VecDeque<String>,
    changes: watch::Receiver<u64>,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    done: bool,
}

pub(super) fn watch_response<'a>(
    s: &Arc<Shared>,
    kind: Kind,
    selector: Selector,
    param: &impl Fn(&str) -> Option<&'a str>,
) -> Response {
    let timeout = param("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1800u64);
    let bookmarks = param("allowWatchBookmarks") == Some("true");
    let initial_events = param("sendInitialEvents") == Some("true");
    let mut pending = VecDeque::new();
    let mut done = false;
    let st = s.store.lock().unwrap();
    // "0" or none: start now, with the current objects as ADDED (as the API server does).
    let cursor = match param("resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0") {
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) if rv < st.compacted => {
                pending.push_back(expired_line(rv, st.compacted));
                done = true;
                rv
            }
            Ok(rv) => rv,
            Err(_) => {
                return status_json(400, "BadRequest", &format!("bad resourceVersion {rv:?}"));
            }
        },
        None => {
            pending.extend(
                st.snapshot(kind, &selector)
                    .iter()
                    .map(|(_, v)| event_line("ADDED", v)),
            );
            if initial_events {
                pending.push_back(bookmark_line(
                    kind,
                    st.rv,
                    &[("k8s.io/initial-events-end", "true")],
                ));
            }
            st.rv
        }
    };
    drop(st);
    let state = WatchState {
        s: s.clone(),
        kind,
        selector,
        cursor,
        pending,
        changes: s.changed.subscribe(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
        bookmarks,
        done,
    };
    let stream = futures::stream::unfold(state, |mut w| async move {
        loop {
            if let Some(line) = w.pending.pop_front() {
                return Some((Ok::<Bytes, Infallible>(Bytes::from(line)), w));
            }
            if w.done || w.s.down.load(Ordering::SeqCst) {
                return None;
            }
            if w.s.garbage.load(Ordering::SeqCst) {
                w.pending
                    .push_back("{\"type\":\"ADDED\",\"object\":[1,2\n".to_owned());
                w.done = true;
                continue;
            }
            w.changes.borrow_and_update();
            {
                let st = w.s.store.lock().unwrap();
                if w.cursor < st.compacted {
                    // The events after the cursor are gone.
                    w.pending.push_back(expired_line(w.cursor, st.compacted));
                    w.done = true;
                    continue;
                }
                let seen = w.cursor;
                for ev in st.events.iter().filter(|e| e.rv > seen) {
                    w.cursor = ev.rv;
                    if ev.kind == w.kind && w.selector.matches(&ev.meta) {
                        w.pending.push_back(ev.line.clone());
                    }
                }
                // Keep the cursor at the store's version even when no event matched.
                w.cursor = w.cursor.max(st.rv);
            }
            if !w.pending.is_empty() {
                continue;
            }
            tokio::select! {
                _ = w.changes.changed() => {}
                () = tokio::time::sleep(BOOKMARK_EVERY), if w.bookmarks => {
                    w.pending.push_back(bookmark_line(w.kind, w.cursor, &[]));
                }
                () = tokio::time::sleep_until(w.deadline) => return None,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| status_json(500, "InternalError", "building the watch response"))
}

/// The `ERROR` event of a watch from a resourceVersion the log no longer holds.
fn expired_line(rv: u64, oldest: u64) -> String {
    event_line(
        "ERROR",
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: {rv} ({oldest})"),
            "reason": "Expired",
            "code": 410,
        }),
    )
}

fn bookmark_line(kind: Kind, rv: u64, annotations: &[(&str, &str)]) -> String {
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    let mut line = json!({
        "type": "BOOKMARK",
        "object": {
            "kind": kind.kind(),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": rv.to_string(), "annotations": annotations},
        },
    })
    .to_string();
    line.push('\n');
    line
}
