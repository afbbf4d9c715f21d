//! Storage for the server's state documents: the authority's key state and the join tokens.
//!
//! Each document is replaced as a whole, with a compare-and-swap on its revision: a file in a
//! private directory here (written atomically, revision = its digest), or a Kubernetes Secret
//! (`kube_store`, revision = the Secret's `resourceVersion`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::state::KeyState;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable or writable by other users (mode {mode:o}); it must be 0700 and owned by us"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{what}: not a valid document: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("{0}: changed by someone else since it was read")]
    Conflict(String),
    #[error("{what}: the Kubernetes API: {reason}")]
    Api { what: String, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Which version of the stored document a change was based on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision(pub String);

/// Where the server's documents live, each replaced as a whole with a compare-and-swap. Calls
/// block (file I/O, or an API request for a Secret): make them from blocking contexts only.
pub trait DocStore: Send + Sync + 'static {
    /// The text of document `name` and its revision, or None if it is not stored.
    fn load_doc(&self, name: &str) -> Result<Option<(String, Revision)>, StoreError>;
    /// Replaces document `name` in one atomic write if its stored revision is still
    /// `expected` (`None`: it may not exist yet); returns the new revision, or `Conflict`.
    fn save_doc(
        &self,
        name: &str,
        text: &str,
        expected: Option<&Revision>,
    ) -> Result<Revision, StoreError>;
    /// Where document `name` lives, for messages.
    fn describe(&self, name: &str) -> String;
}

/// Where the key state lives. Calls block (file I/O, or an API request for a Secret): the
/// authority makes them from blocking contexts only.
pub trait StateStore: Send + Sync + 'static {
    /// The stored state and its revision, or None if nothing is stored yet.
    fn load(&self) -> Result<Option<(KeyState, Revision)>, StoreError>;
    /// Replaces the state in one atomic write if the stored revision is still `expected`
    /// (`None`: nothing may be stored yet); returns the new revision, or `Conflict`.
    fn save(&self, state: &KeyState, expected: Option<&Revision>) -> Result<Revision, StoreError>;
}

/// A 0700 directory of 0600 files, each written atomically.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// The key state document in a [`FileStore`].
pub const STATE_FILE: &str = "keys.json";
/// Held (flock) while the state file is compared and replaced, so two processes on one
/// directory cannot both win a compare-and-swap.
const LOCK_FILE: &str = ".keys.lock";

impl FileStore {
    /// Opens (creating with 0700) the directory; refuses one that others can read or write.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mode = fs::metadata(dir).map_err(io(dir))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            // A directory we just created may carry the umask's bits; tighten ours, refuse others'.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
            let now = fs::metadata(dir).map_err(io(dir))?.permissions().mode() & 0o777;
            if now & 0o077 != 0 {
                return Err(StoreError::Permissions {
                    path: dir.to_owned(),
                    mode: now,
                });
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The full path of `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads `name`, or None if it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<String>, StoreError> {
        let path = self.path(name);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// When `name` was last written, or None if it does not exist.
    pub fn modified(&self, name: &str) -> Result<Option<SystemTime>, StoreError> {
        let path = self.path(name);
        match fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Writes `name` atomically with mode 0600: temp file, fsync, rename, fsync directory.
    /// A crash leaves either the old file or the new one, never half of either; a temp file a
    /// crash left behind is replaced, never read.
    pub fn write(&self, name: &str, contents: &[u8]) -> Result<(), StoreError> {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        // A fresh file, so the mode below applies even if a stale temp file had another one.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&tmp)(e)),
            _ => {}
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(contents).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        self.sync_dir()
    }

    /// Removes `name` if it exists, durably.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    /// An exclusive advisory lock on the directory's lock file, released when dropped.
    fn lock(&self) -> Result<File, StoreError> {
        let path = self.path(LOCK_FILE);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        // SAFETY: flock on a descriptor we own; it is released when `f` is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&path)(std::io::Error::last_os_error()));
        }
        Ok(f)
    }
}

impl DocStore for FileStore {
    fn load_doc(&self, name: &str) -> Result<Option<(String, Revision)>, StoreError> {
        Ok(self.read(name)?.map(|text| {
            let rev = Revision(crate::crypto::sha256_hex(text.as_bytes()));
            (text, rev)
        }))
    }

    fn save_doc(
        &self,
        name: &str,
        text: &str,
        expected: Option<&Revision>,
    ) -> Result<Revision, StoreError> {
        let _lock = self.lock()?;
        let stored = self.load_doc(name)?.map(|(_, rev)| rev);
        if stored.as_ref() != expected {
            return Err(StoreError::Conflict(self.describe(name)));
        }
        self.write(name, text.as_bytes())?;
        Ok(Revision(crate::crypto::sha256_hex(text.as_bytes())))
    }

    fn describe(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// The key state is the document [`STATE_FILE`] of any document store.
impl<D: DocStore> StateStore for D {
    fn load(&self) -> Result<Option<(KeyState, Revision)>, StoreError> {
        let Some((text, rev)) = self.load_doc(STATE_FILE)? else {
            return Ok(None);
        };
        let state = KeyState::from_json(&text).map_err(|reason| StoreError::Corrupt {
            what: self.describe(STATE_FILE),
            reason,
        })?;
        Ok(Some((state, rev)))
    }

    fn save(&self, state: &KeyState, expected: Option<&Revision>) -> Result<Revision, StoreError> {
        self.save_doc(STATE_FILE, &state.to_json(), expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_0600_in_a_0700_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let store = FileStore::open(&dir).unwrap();
        store.write("k", b"secret").unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            fs::metadata(store.path("k")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(store.read("k").unwrap().as_deref(), Some("secret"));
        assert_eq!(store.read("missing").unwrap(), None);
        store.write("k", b"new").unwrap();
        assert_eq!(store.read("k").unwrap().as_deref(), Some("new"));
        assert!(!store.path(".k.tmp").exists());
    }

    #[test]
    fn a_stale_temp_file_is_replaced_with_a_private_one() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        // What a crash mid-write (or someone else) left behind, world-readable.
        fs::write(store.path(".k.tmp"), b"half a ke").unwrap();
        fs::set_permissions(store.path(".k.tmp"), fs::Permissions::from_mode(0o644)).unwrap();
        store.write("k", b"whole key").unwrap();
        assert_eq!(store.read("k").unwrap().as_deref(), Some("whole key"));
        assert_eq!(
            fs::metadata(store.path("k")).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
