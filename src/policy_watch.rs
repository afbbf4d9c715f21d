//! Keeps the policies in force current: reloads on SIGHUP and when a policy file changes.
//!
//! A reload that fails leaves the last good policies in force; the error is logged, counted
//! and audited, so an operator's typo never takes identities away from running agents.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::audit::{Action, AuditEvent, AuditLog, Decision};
use prometheus_client::metrics::counter::Counter;

use crate::policy::{PolicySet, load_paths};
use crate::spiffe::TrustDomain;

/// Quiet period after a file event before reloading: editors write files in several steps.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Watches `paths` and publishes each successfully loaded policy set on `tx`; `failures`
/// counts refused reloads.
///
/// Returns once the watches are in place; reloading continues in a background task.
pub fn spawn(
    paths: Vec<PathBuf>,
    td: TrustDomain,
    tx: watch::Sender<Arc<PolicySet>>,
    audit: AuditLog,
    failures: Counter,
) -> Result<(), notify::Error> {
    let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
    let relevant = Relevant::new(&paths);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(e) = res
            && !e.kind.is_access()
            && e.paths.iter().any(|p| relevant.matches(p))
        {
            let _ = events_tx.send(());
        }
    })?;
    for p in &paths {
        // Watch the directory holding a file too: editors and `kubectl` replace files by rename.
        let target = if p.is_dir() {
            p.clone()
        } else {
            p.parent().map(PathBuf::from).unwrap_or_else(|| p.clone())
        };
        watcher.watch(&target, RecursiveMode::NonRecursive)?;
    }
    let mut hup = signal(SignalKind::hangup()).map_err(notify::Error::io)?;
    tokio::spawn(async move {
        let _watcher = watcher; // dropped (and unwatched) when the task ends
        loop {
            tokio::select! {
                _ = hup.recv() => tracing::info!("SIGHUP: reloading policies"),
                ev = events.recv() => {
                    if ev.is_none() { return; }
                    tokio::time::sleep(DEBOUNCE).await;
                    while events.try_recv().is_ok() {}
                }
                _ = tx.closed() => return,
            }
            reload(&paths, &td, &tx, &audit, &failures);
        }
    });
    Ok(())
}

/// Which file events concern the policies: the named files themselves, and `*.yaml` /
/// `*.yml` in named directories. Other files next to a policy file (a log, an editor's swap
/// file) must not trigger reloads.
struct Relevant {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Relevant {
    fn new(paths: &[PathBuf]) -> Self {
        let (dirs, files) = paths.iter().cloned().partition(|p| p.is_dir());
        Self { files, dirs }
    }

    fn matches(&self, path: &std::path::Path) -> bool {
        self.files.iter().any(|f| f == path)
            || (path.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && path
                    .parent()
                    .is_some_and(|d| self.dirs.iter().any(|w| w == d)))
    }
}

fn reload(
    paths: &[PathBuf],
    td: &TrustDomain,
    tx: &watch::Sender<Arc<PolicySet>>,
    audit: &AuditLog,
    failures: &Counter,
) {
    match load_paths(paths, td) {
        Ok(set) => {
            let changed = tx.send_if_modified(|cur| {
                if **cur == set {
                    return false;
                }
                *cur = Arc::new(set.clone());
                true
            });
            if changed {
                let names: Vec<&str> = set.policies().iter().map(|p| p.name.as_str()).collect();
                tracing::info!(policies = ?names, "policies reloaded");
                record(
                    audit,
                    AuditEvent::new(Action::PolicyLoaded, "policies")
                        .decision(Decision::allow().reason(format!("loaded {}", names.join(", ")))),
                );
            }
        }
        Err(e) => {
            failures.inc();
            tracing::error!(error = %e, "policy reload refused; the previous policies stay in force");
            record(
                audit,
                AuditEvent::new(Action::PolicyRejected, "policies")
                    .decision(Decision::deny(e.to_string())),
            );
        }
    }
}

fn record(audit: &AuditLog, event: AuditEvent) {
    if let Err(e) = audit.record(event) {
        tracing::error!(error = %e, "writing audit record");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_policy_files_are_relevant() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("policies");
        std::fs::create_dir(&sub).unwrap();
        let file = dir.path().join("p.yaml");
        let r = Relevant::new(&[file.clone(), sub.clone()]);
        assert!(r.matches(&file));
        assert!(
            !r.matches(&dir.path().join("agentid.log")),
            "a neighbour of a policy file"
        );
        assert!(
            !r.matches(&dir.path().join("other.yaml")),
            "a neighbour of a policy file"
        );
        assert!(r.matches(&sub.join("a.yml")));
        assert!(!r.matches(&sub.join(".a.yaml.swp")));
    }
}
