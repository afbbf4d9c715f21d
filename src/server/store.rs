//! File storage for authority key material: a 0700 directory of PEM files, written atomically.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the state directory could not be used.
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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A directory holding secret files.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

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

    /// Writes `name` atomically with mode 0600: temp file, fsync, rename, fsync directory.
    /// A crash leaves either the old file or the new one, never half of either.
    pub fn write(&self, name: &str, contents: &[u8]) -> Result<(), StoreError> {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(contents).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
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
}
