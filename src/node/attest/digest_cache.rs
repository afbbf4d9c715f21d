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
pub struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn ns(secs: i64, nanos: i64) -> i128 {
    i128::from(secs) * 1_000_000_000 + i128::from(nanos)
}

impl From<&Metadata> for FileKey {
    fn from(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The same key from a `statx` made without going through `std` (a `*at` call on a directory
/// handle): the device number is combined as `std` combines it.
impl From<&rustix::fs::Statx> for FileKey {
    fn from(st: &rustix::fs::Statx) -> Self {
        Self {
            dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            size: st.stx_size,
            mtime_ns: ns(st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec.into()),
            ctime_ns: ns(st.stx_ctime.tv_sec, st.stx_ctime.tv_nsec.into()),
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

    /// The digest of the file version `key` identifies, if known.
    pub fn get(&self, key: impl Into<FileKey>) -> Option<String> {
        self.entries
            .lock()
            .expect("digest cache")
            .get(&key.into())
            .cloned()
    }

    /// Remembers `digest` for the file version `key` identifies.
    pub fn insert(&self, key: impl Into<FileKey>, digest: &str) {
        let mut entries = self.entries.lock().expect("digest cache");
        if entries.len() >= self.max {
            entries.clear();
        }
        entries.insert(key.into(), digest.to_owned());
    }

    /// Forgets every digest: the next lookups re-read their files.
    pub fn clear(&self) {
        self.entries.lock().expect("digest cache").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys made from `std`'s metadata and from a raw `statx` agree, so a digest stored by one
    /// path through the code is found by the other.
    #[test]
    fn a_statx_key_is_the_metadata_key() {
        use rustix::fs::{AtFlags, CWD, StatxFlags};
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"v1").unwrap();
        let meta = std::fs::metadata(file.path()).unwrap();
        let st =
            rustix::fs::statx(CWD, file.path(), AtFlags::empty(), StatxFlags::BASIC_STATS).unwrap();
        assert_eq!(FileKey::from(&meta), FileKey::from(&st));
        let cache = DigestCache::new(4);
        cache.insert(&meta, "sha256:v1");
        assert_eq!(cache.get(&st).as_deref(), Some("sha256:v1"));
        // A write moves the key: the old digest is not found.
        std::fs::write(file.path(), b"v2").unwrap();
        let st =
            rustix::fs::statx(CWD, file.path(), AtFlags::empty(), StatxFlags::BASIC_STATS).unwrap();
        assert_eq!(cache.get(&st), None);
    }
}
