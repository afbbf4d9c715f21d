//! File digests remembered by what identifies one version of a file: device, inode, size,
//! mtime and ctime, all from `fstat`/`stat`. Any write moves `ctime` (which user space cannot
//! set back) and a replacement changes the inode, so a hit means the same content. Shared by
//! the executable digests of unix attestation and the config digests of composite identities.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

/// Digests by file version, bounded: past `max` entries it starts over (they are cheap to
/// rebuild).
#[derive(Debug)]
pub struct DigestCache {
    entries: Mutex<HashMap<FileKey, String>>,
    max: usize,
}

/// What identifies one version of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileKey {
    fn of(meta: &Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

impl DigestCache {
    /// A cache holding at most `max` digests.
    pub fn new(max: usize) -> Self {
        Self {
            entries: Mutex::default(),
            max: max.max(1),
        }
    }

    /// The digest of the file version `meta` describes, if known.
    pub fn get(&self, meta: &Metadata) -> Option<String> {
        self.entries
            .lock()
            .expect("digest cache")
            .get(&FileKey::of(meta))
            .cloned()
    }

    /// Remembers `digest` for the file version `meta` describes.
    pub fn insert(&self, meta: &Metadata, digest: &str) {
        let mut entries = self.entries.lock().expect("digest cache");
        if entries.len() >= self.max {
            entries.clear();
        }
        entries.insert(FileKey::of(meta), digest.to_owned());
    }

    /// Forgets every digest: the next lookups re-read their files.
    pub fn clear(&self) {
        self.entries.lock().expect("digest cache").clear();
    }
}
