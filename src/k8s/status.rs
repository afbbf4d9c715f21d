//! How the pod source is doing: synced or not, up or down since when, the last error. Read by
//! `/readyz` and exported as metrics.

use std::fmt::Write as _;
use std::time::SystemTime;

use super::PodSource;

/// One stream feeding the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// This node's pods (the API watch, or the kubelet poll).
    Pods,
    /// Namespaces, for their labels (API source only).
    Namespaces,
}

impl Stream {
    /// A short name for logs and status lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Pods => "pods",
            Stream::Namespaces => "namespaces",
        }
    }
}

/// A failure reported by a source, with when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    pub at: SystemTime,
    pub message: String,
}

/// The health of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStatus {
    pub stream: Stream,
    /// A full list has been applied at least once.
    pub synced: bool,
    /// The last contact succeeded.
    pub up: bool,
    /// The last successful contact.
    pub last_ok: Option<SystemTime>,
    /// The last failure, kept after recovery for diagnosis.
    pub last_error: Option<SourceError>,
    /// The first failure of the current outage; `None` while up.
    pub down_since: Option<SystemTime>,
}

impl StreamStatus {
    pub(crate) fn new(stream: Stream) -> Self {
        Self {
            stream,
            synced: false,
            up: false,
            last_ok: None,
            last_error: None,
            down_since: None,
        }
    }

    /// Records a success; returns whether this ends an outage.
    pub(crate) fn ok(&mut self, now: SystemTime) -> bool {
        let recovered = self.down_since.is_some();
        self.up = true;
        self.last_ok = Some(now);
        self.down_since = None;
        recovered
    }

    /// Records a failure; returns whether it is news (starts an outage or changes the message).
    pub(crate) fn error(&mut self, now: SystemTime, message: String) -> bool {
        let news = self.down_since.is_none()
            || self
                .last_error
                .as_ref()
                .is_none_or(|e| e.message != message);
        self.up = false;
        self.down_since.get_or_insert(now);
        self.last_error = Some(SourceError { at: now, message });
        news
    }
}

/// A snapshot of the pod source and index, for readiness and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sStatus {
    pub source: PodSource,
    /// Pods in the index.
    pub pods: usize,
    /// Pods first, then namespaces for the API source.
    pub streams: Vec<StreamStatus>,
}

impl K8sStatus {
    /// Every stream has completed a full list: lookups can be answered.
    pub fn synced(&self) -> bool {
        self.streams.iter().all(|s| s.synced)
    }

    /// Every stream's last contact succeeded.
    pub fn up(&self) -> bool {
        self.streams.iter().all(|s| s.up)
    }

    /// Ready to attest pods: synced, even if the source is down now (known pods still resolve).
    pub fn ready(&self) -> bool {
        self.synced()
    }

    /// One line for `/readyz` and logs, e.g. "pod source api unreachable since … (pods: …),
    /// serving 12 known pods".
    pub fn summary(&self) -> String {
        let mut out = format!("pod source {}", self.source);
        let down: Vec<&StreamStatus> = self.streams.iter().filter(|s| !s.up).collect();
        if down.is_empty() {
            let _ = write!(out, " up, {} pods indexed", self.pods);
            return out;
        }
        let since = down.iter().filter_map(|s| s.down_since).min();
        match since {
            Some(t) => {
                let _ = write!(out, " unreachable since {}", rfc3339(t));
            }
            None => out.push_str(" not contacted yet"),
        }
        // Streams failing alike (one unreachable API server) are named together.
        let mut errors: Vec<(Vec<&str>, &str)> = Vec::new();
        for s in &down {
            let Some(e) = &s.last_error else { continue };
            match errors.iter_mut().find(|(_, m)| *m == e.message) {
                Some((names, _)) => names.push(s.stream.as_str()),
                None => errors.push((vec![s.stream.as_str()], &e.message)),
            }
        }
        let errors: Vec<String> = errors
            .iter()
            .map(|(names, message)| format!("{}: {message}", names.join(", ")))
            .collect();
        if !errors.is_empty() {
            let _ = write!(out, " ({})", errors.join("; "));
        }
        if self.synced() {
            let _ = write!(out, ", serving {} known pods", self.pods);
        } else {
            out.push_str(", no full list yet: no pod can be attested");
        }
        out
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn summary_lines() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut pods = StreamStatus::new(Stream::Pods);
        let mut namespaces = StreamStatus::new(Stream::Namespaces);
        let snap = |pods: &StreamStatus, namespaces: &StreamStatus| K8sStatus {
            source: PodSource::Api,
            pods: 12,
            streams: vec![pods.clone(), namespaces.clone()],
        };
        assert_eq!(
            snap(&pods, &namespaces).summary(),
            "pod source api not contacted yet, no full list yet: no pod can be attested"
        );
        assert!(pods.error(t0, "connection refused".into()));
        assert!(!pods.error(t0 + Duration::from_secs(5), "connection refused".into()));
        let s = snap(&pods, &namespaces);
        assert!(!s.ready() && !s.up());
        assert_eq!(
            s.summary(),
            "pod source api unreachable since 2027-01-15T08:00:00Z (pods: connection refused), \
             no full list yet: no pod can be attested"
        );
        pods.synced = true;
        namespaces.synced = true;
        assert!(pods.ok(t0), "ends the outage");
        assert!(!namespaces.ok(t0), "there was no outage");
        assert_eq!(
            snap(&pods, &namespaces).summary(),
            "pod source api up, 12 pods indexed"
        );
        pods.error(t0 + Duration::from_secs(60), "HTTP 503".into());
        namespaces.error(t0 + Duration::from_secs(61), "HTTP 503".into());
        let s = snap(&pods, &namespaces);
        assert!(s.ready() && !s.up());
        assert_eq!(
            s.summary(),
            "pod source api unreachable since 2027-01-15T08:01:00Z (pods, namespaces: HTTP 503), \
             serving 12 known pods"
        );
    }
}
