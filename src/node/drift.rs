//! Noticing that a file behind a live composite identity changed.
//!
//! Open streams register the files their composite identities were hashed from (paths under
//! `/proc/<pid>/root`, so they name the container's files). Each file and its directory are
//! watched with inotify: the file for writes in place (through a symlink too), the directory
//! for replacement by rename, which is how editors and Kubernetes ConfigMap/Secret volumes
//! (`..data` swaps) update files. A relevant event bumps a generation counter that the streams
//! watch; they then recompose, and a changed `cid` leads to re-issuance or withdrawal.
//!
//! inotify can miss what it cannot see (a symlink target in another directory replaced by
//! rename, a file changed behind a bind mount); the periodic re-hash (`poke` after
//! `Composer::flush`) is the safety net for those.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::watch;

/// Shared handle to the watcher.
#[derive(Clone)]
pub struct DriftWatch {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` when inotify is unavailable: only the periodic re-hash detects drift then.
    watcher: Mutex<Option<RecommendedWatcher>>,
    state: Arc<Mutex<State>>,
    generation: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// Watched files and how many registrations hold each.
    files: HashMap<PathBuf, usize>,
    /// Watched directories and how many watched files they hold.
    dirs: HashMap<PathBuf, usize>,
}

/// Keeps a set of files watched until dropped.
pub struct Watching {
    inner: Weak<Inner>,
    files: Vec<PathBuf>,
}

impl Default for DriftWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl DriftWatch {
    /// Starts the watcher. Without inotify (limits reached, unsupported filesystem) it logs a
    /// warning and relies on the periodic re-hash.
    pub fn new() -> Self {
        let state: Arc<Mutex<State>> = Arc::default();
        let generation = watch::Sender::new(0u64);
        let st = state.clone();
        let changed = settle(generation.clone());
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else {
                // Overflow or a watcher error: something may have changed unseen.
                changed();
                return;
            };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            let relevant = {
                let st = st.lock().expect("drift state");
                event.paths.iter().any(|p| st.concerns(p))
            };
            if relevant {
                changed();
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable: config drift is detected by the periodic re-hash only");
                None
            }
        };
        Self {
            inner: Arc::new(Inner {
                watcher: Mutex::new(watcher),
                state,
                generation,
            }),
        }
    }

    /// Changes whenever a watched file may have changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// Wakes every subscriber, as a change would (the periodic re-hash).
    pub fn poke(&self) {
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// Watches `files` until the returned guard is dropped. A file that cannot be watched is
    /// logged and left to the periodic re-hash.
    pub fn watch(&self, files: &[PathBuf]) -> Watching {
        if files.is_empty() {
            // Most streams state no composite identity: no need for the watcher's locks.
            return Watching {
                inner: Weak::new(),
                files: Vec::new(),
            };
        }
        let mut state = self.inner.state.lock().expect("drift state");
        let mut watcher = self.inner.watcher.lock().expect("drift watcher");
        for f in files {
            let n = state.files.entry(f.clone()).or_default();
            *n += 1;
            if *n > 1 {
                continue;
            }
            if let Some(w) = watcher.as_mut() {
                if let Err(e) = w.watch(f, RecursiveMode::NonRecursive) {
                    tracing::debug!(path = %f.display(), error = %e, "cannot watch file");
                }
                if let Some(dir) = f.parent() {
                    let d = state.dirs.entry(dir.to_owned()).or_default();
                    *d += 1;
                    if *d == 1
                        && let Err(e) = w.watch(dir, RecursiveMode::NonRecursive)
                    {
                        tracing::debug!(path = %dir.display(), error = %e, "cannot watch directory");
                    }
                }
            } else if let Some(dir) = f.parent() {
                *state.dirs.entry(dir.to_owned()).or_default() += 1;
            }
        }
        Watching {
            inner: Arc::downgrade(&self.inner),
            files: files.to_vec(),
        }
    }

    /// Files currently watched (for tests and `/config`).
    pub fn watched(&self) -> usize {
        self.inner.state.lock().expect("drift state").files.len()
    }
}

/// Quiet time after a change before streams re-check: a file written in place is first
/// truncated, and hashing it between the truncation and the write would state a config that
/// never existed. Bursts are cut off after `SETTLE_MAX`, well inside the 1 s drift target.
const SETTLE: Duration = Duration::from_millis(50);
const SETTLE_MAX: Duration = Duration::from_millis(250);

/// Returns the function the watcher calls on a change: it bumps `generation` once the burst
/// of events has settled. Without a tokio runtime it bumps at once.
fn settle(generation: watch::Sender<u64>) -> impl Fn() + Send + 'static {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return Box::new(move || generation.send_modify(|g| *g += 1)) as Box<dyn Fn() + Send>;
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    runtime.spawn(async move {
        // Ends when the watcher (and with it `tx`) is dropped.
        while rx.recv().await.is_some() {
            let first = tokio::time::Instant::now();
            loop {
                match tokio::time::timeout(SETTLE, rx.recv()).await {
                    Ok(Some(())) if first.elapsed() < SETTLE_MAX => continue,
                    _ => break,
                }
            }
            generation.send_modify(|g| *g += 1);
        }
    });
    Box::new(move || {
        let _ = tx.send(());
    })
}

impl State {
    /// Whether an event on `path` may change a watched file: the file itself, or an entry of
    /// a watched directory that is a watched file or a `..`-prefixed volume internal.
    fn concerns(&self, path: &Path) -> bool {
        if self.files.contains_key(path) {
            return true;
        }
        let internal = path
            .file_name()
            .and_then(OsStr::to_str)
            .is_some_and(|n| n.starts_with(".."));
        internal && path.parent().is_some_and(|d| self.dirs.contains_key(d))
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut state = inner.state.lock().expect("drift state");
        let mut watcher = inner.watcher.lock().expect("drift watcher");
        for f in &self.files {
            let Some(n) = state.files.get_mut(f) else {
                continue;
            };
            *n -= 1;
            if *n > 0 {
                continue;
            }
            state.files.remove(f);
            if let Some(w) = watcher.as_mut() {
                let _ = w.unwatch(f);
            }
            let Some(dir) = f.parent() else { continue };
            if let Some(d) = state.dirs.get_mut(dir) {
                *d -= 1;
                if *d == 0 {
                    state.dirs.remove(dir);
                    if let Some(w) = watcher.as_mut() {
                        let _ = w.unwatch(dir);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn changed_within(rx: &mut watch::Receiver<u64>, d: Duration) -> bool {
        tokio::time::timeout(d, rx.changed()).await.is_ok()
    }

    #[tokio::test]
    async fn writes_and_renames_of_watched_files_wake_subscribers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prompt.md");
        std::fs::write(&file, "v1").unwrap();
        std::fs::write(dir.path().join("unrelated.log"), "").unwrap();
        let drift = DriftWatch::new();
        let mut rx = drift.subscribe();
        let guard = drift.watch(std::slice::from_ref(&file));
        assert_eq!(drift.watched(), 1);

        std::fs::write(&file, "v2").unwrap();
        assert!(changed_within(&mut rx, Duration::from_secs(2)).await);
        rx.mark_unchanged();

        // Atomic replacement, as editors and ConfigMap volumes do it.
        let tmp = dir.path().join("..prompt.tmp");
        std::fs::write(&tmp, "v3").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert!(changed_within(&mut rx, Duration::from_secs(2)).await);
        // Let the events of the replacement drain before checking for silence.
        tokio::time::sleep(Duration::from_millis(200)).await;
        rx.mark_unchanged();

        // Another file in the same directory is not drift.
        std::fs::write(dir.path().join("unrelated.log"), "noise").unwrap();
        assert!(!changed_within(&mut rx, Duration::from_millis(300)).await);

        drop(guard);
        assert_eq!(drift.watched(), 0);
        drift.poke();
        assert!(changed_within(&mut rx, Duration::from_millis(100)).await);
    }
}
