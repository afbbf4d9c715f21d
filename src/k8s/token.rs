//! Bearer tokens read from a file on every request: projected service-account tokens rotate
//! (about hourly), and a file written by hand often ends with a newline, which kube's own
//! token-file support would send verbatim (an invalid header); client-go trims it, so do we.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use http::{HeaderValue, Request, header};
use tower::util::MapRequestLayer;

/// Why a token file gave no usable token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {path} holds no usable bearer token")]
    Unusable { path: String },
}

/// A token file and the last token read from it.
#[derive(Debug, Clone)]
pub struct BearerTokenFile {
    path: PathBuf,
    last_good: Arc<Mutex<Option<HeaderValue>>>,
}

impl BearerTokenFile {
    /// Reads `path` once, so a missing or empty file is reported at start.
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        let first = read_bearer(path)?;
        Ok(Self {
            path: path.to_owned(),
            last_good: Arc::new(Mutex::new(Some(first))),
        })
    }

    /// The `Authorization` value from the file as it is now.
    pub fn header(&self) -> Result<HeaderValue, TokenError> {
        let value = read_bearer(&self.path)?;
        *self
            .last_good
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(value.clone());
        Ok(value)
    }

    /// The current token, or the last good one if the file cannot be read now (a token
    /// volume briefly missing while it is swapped must not break the watch).
    fn header_or_last(&self) -> Option<HeaderValue> {
        match self.header() {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "using the previous bearer token");
                self.last_good
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone()
            }
        }
    }

    /// A client layer that sets `Authorization` from the file on every request.
    pub fn layer<B>(self) -> MapRequestLayer<impl Fn(Request<B>) -> Request<B> + Clone> {
        MapRequestLayer::new(move |mut req: Request<B>| {
            if let Some(value) = self.header_or_last() {
                req.headers_mut().insert(header::AUTHORIZATION, value);
            }
            req
        })
    }
}

/// The `Authorization` value from the token file at `path` as it is now.
pub fn read_bearer(path: &Path) -> Result<HeaderValue, TokenError> {
    let display = || path.display().to_string();
    let raw = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: display(),
        source,
    })?;
    let token = raw.trim();
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .ok()
        .filter(|_| !token.is_empty())
        .ok_or_else(|| TokenError::Unusable { path: display() })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_rereads_and_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert!(matches!(
            BearerTokenFile::open(&path),
            Err(TokenError::Read { .. })
        ));
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(
            BearerTokenFile::open(&path),
            Err(TokenError::Unusable { .. })
        ));
        std::fs::write(&path, "bad\u{1}token").unwrap();
        assert!(matches!(
            BearerTokenFile::open(&path),
            Err(TokenError::Unusable { .. })
        ));
        std::fs::write(&path, "abc\n").unwrap();
        let file = BearerTokenFile::open(&path).unwrap();
        assert_eq!(file.header().unwrap(), "Bearer abc");
        assert!(file.header().unwrap().is_sensitive());
        std::fs::write(&path, "def").unwrap();
        assert_eq!(file.header_or_last().unwrap(), "Bearer def");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file.header_or_last().unwrap(), "Bearer def");
    }
}
