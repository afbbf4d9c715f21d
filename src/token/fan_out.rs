//! Counting delegations per task and delegator, so one agent cannot fan a task out without bound.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::spiffe::SpiffeId;

/// Children delegated per (`txn`, delegator), in memory and shared by all requests.
///
/// An entry is forgotten once every parent token it was counted under has expired: after
/// that the delegator cannot delegate in that task any more, so the count has no use.
/// The count lives in one issuer process; several issuer replicas each enforce their own.
#[derive(Debug, Default)]
pub struct FanOut {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<(String, SpiffeId), Entry>,
    /// Earliest `until` among the entries: no pruning is due before it.
    next_prune: i64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    count: u32,
    until: i64,
}

impl FanOut {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one more child for (`txn`, `delegator`) if fewer than `max` were counted;
    /// otherwise returns the count. `until` is the parent token's `exp`.
    pub(crate) fn acquire(
        &self,
        txn: &str,
        delegator: &SpiffeId,
        max: u32,
        until: i64,
        now: i64,
    ) -> Result<(), u32> {
        let mut inner = self.inner.lock().expect("fan-out lock");
        inner.prune(now);
        let entry = inner
            .entries
            .entry((txn.to_owned(), delegator.clone()))
            .or_insert(Entry { count: 0, until });
        if entry.count >= max {
            return Err(entry.count);
        }
        entry.count += 1;
        entry.until = entry.until.max(until);
        inner.next_prune = inner.next_prune.min(until);
        Ok(())
    }

    /// Gives back a count taken by `acquire` when the child token could not be signed.
    pub(crate) fn release(&self, txn: &str, delegator: &SpiffeId) {
        let mut inner = self.inner.lock().expect("fan-out lock");
        if let Some(e) = inner.entries.get_mut(&(txn.to_owned(), delegator.clone())) {
            e.count = e.count.saturating_sub(1);
        }
    }

    /// Children counted so far for (`txn`, `delegator`), as of `now`.
    pub fn count(&self, txn: &str, delegator: &SpiffeId, now: i64) -> u32 {
        let inner = self.inner.lock().expect("fan-out lock");
        inner
            .entries
            .get(&(txn.to_owned(), delegator.clone()))
            .filter(|e| e.until > now)
            .map_or(0, |e| e.count)
    }

    /// Number of (`txn`, delegator) pairs tracked, expired ones not yet pruned included.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("fan-out lock").entries.len()
    }

    /// True when nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn prune(&mut self, now: i64) {
        if self.entries.is_empty() || now < self.next_prune {
            return;
        }
        self.entries.retain(|_, e| e.until > now);
        self.next_prune = self.entries.values().map(|e| e.until).min().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_task_and_delegator_and_forgets_after_expiry() {
        let f = FanOut::new();
        let a: SpiffeId = "spiffe://example.org/a".parse().unwrap();
        let b: SpiffeId = "spiffe://example.org/b".parse().unwrap();
        assert_eq!(f.acquire("t1", &a, 2, 100, 0), Ok(()));
        assert_eq!(f.acquire("t1", &a, 2, 100, 0), Ok(()));
        assert_eq!(f.acquire("t1", &a, 2, 100, 0), Err(2));
        // Another delegator, another task: separate counts.
        assert_eq!(f.acquire("t1", &b, 2, 100, 0), Ok(()));
        assert_eq!(f.acquire("t2", &a, 2, 50, 0), Ok(()));
        f.release("t1", &a);
        assert_eq!(f.count("t1", &a, 0), 1);
        assert_eq!(f.acquire("t1", &a, 2, 100, 0), Ok(()));
        assert_eq!(f.len(), 3);
        // t2's parent expired at 50: pruned on the next call after it.
        assert_eq!(f.acquire("t1", &b, 2, 100, 60), Ok(()));
        assert_eq!(f.len(), 2);
        assert_eq!(f.count("t1", &a, 100), 0);
        assert_eq!(f.acquire("t1", &a, 2, 200, 100), Ok(()));
        assert_eq!(f.len(), 1);
    }
}
