//! Tamper-evident audit trail of security decisions.
//!
//! Each decision (SVID issued, renewed, denied, withdrawn, token delegated, bundle updated,
//! policy loaded or rejected) becomes one JSON line: a CloudEvents 1.0 envelope whose `data`
//! carries the decision, the credential's serial/`jti`/fingerprint (never the credential or a
//! key), identity, attestation, requester and delegation sections, and last of all
//! `integrity {seq, prev_hash, hash}`.
//!
//! # Hash chain
//!
//! The writer serializes the record from fixed-order structs with `"hash":""`, which by
//! construction makes the line end in `"hash":""}}}`; it computes
//! `hash = "sha256:" + hex(SHA-256(prev_hash || "\n" || those exact bytes))` and writes that
//! value into the empty string. The verifier takes the line's own bytes, requires them to end
//! in `"hash":"sha256:<64 hex>"}}}` with that value equal to the parsed `data.integrity.hash`,
//! blanks the value back to `""` and recomputes, so no JSON canonicalization is involved and
//! any changed byte in a line (including the newline) fails. `seq` starts at 1 and the first
//! `prev_hash` is [`GENESIS_HASH`]; every later `prev_hash` is the previous line's `hash`, so
//! deleting, inserting, duplicating or reordering lines breaks the chain at a named line.
//!
//! A hash chain without a key cannot stop someone who rewrites the whole tail consistently, and
//! cannot see a clean cut after the last line: pin a recent [`AuditReceipt`] somewhere else
//! (e.g. ship it off-host) and pass it as [`VerifyOptions::pinned`] to catch both.
//!
//! # Crashes
//!
//! A record is one `write(2)` on an `O_APPEND` descriptor, so a crash can at worst leave a torn
//! tail: a cut-off last line, or zeros the file system never filled. [`verify`] reports a last
//! line without its newline as torn. [`AuditLog::open`] resumes from the newest complete record,
//! skipping such leftovers (but refusing a newest line that is foreign or edited), and starts the
//! next record on a new line (the newline goes out with that record), so the torn bytes stay in
//! the file as their own line: strict verification then fails there, and
//! [`VerifyOptions::allow_torn`] accepts it only because the chain must continue unbroken across
//! it. Records are not fsynced; call [`AuditLog::sync_data`] where durability matters (e.g. on
//! shutdown).
//!
//! One process writes a file: `open` takes an exclusive `flock`, and a second `open` of the same
//! file fails with [`AuditError::Busy`]; share one [`AuditLog`] by cloning it.

mod chain;
mod record;

pub use chain::{
    AuditReceipt, GENESIS_HASH, MAX_LINE_BYTES, VerifyError, VerifyOptions, VerifyReport, verify,
    verify_file,
};
pub use record::{
    Action, Attestation, AuditEvent, Credential, CredentialKind, Decision, Delegation, Identity,
    Requester, Risk, Verdict, sha256_fingerprint,
};

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use time::OffsetDateTime;

/// Why opening or appending to the audit log failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The parent directory could not be created.
    #[error("creating audit log directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file could not be opened, inspected or read.
    #[error("opening audit log {}: {source}", path.display())]
    Open {
        /// The log file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The path is a directory, device or similar.
    #[error("audit log {} is not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The existing file is group- or world-writable, so its history cannot be trusted.
    #[error(
        "audit log {} has mode {mode:03o}: group/world-writable audit logs are refused (chmod go-w, then verify it)",
        path.display()
    )]
    InsecureMode {
        /// The log file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Another open handle (usually another process) is writing the file.
    #[error("audit log {} is locked by another writer", path.display())]
    Busy {
        /// The log file.
        path: PathBuf,
    },
    /// The newest line is neither a valid record nor crash debris, so the chain cannot continue.
    #[error("cannot continue the chain of audit log {}: newest line: {reason}; verify the file and move it aside", path.display())]
    Resume {
        /// The log file.
        path: PathBuf,
        /// What is wrong with that line.
        reason: String,
    },
    /// The event could not be serialized.
    #[error("encoding audit record: {0}")]
    Encode(#[from] serde_json::Error),
    /// The record would exceed [`MAX_LINE_BYTES`].
    #[error("audit record of {len} bytes exceeds the {MAX_LINE_BYTES}-byte line limit")]
    TooLarge {
        /// Encoded length.
        len: usize,
    },
    /// Appending failed; the chain was not advanced.
    #[error("appending to audit log: {0}")]
    Write(#[source] io::Error),
    /// `sync_data` failed.
    #[error("syncing audit log: {0}")]
    Sync(#[source] io::Error),
}

/// Append-only, hash-chained audit log; cheap to clone, `Send + Sync`.
///
/// [`AuditLog::record`] is synchronous and takes microseconds (one serialization, one SHA-256,
/// one `write(2)`), so async callers call it directly rather than via `spawn_blocking`.
#[derive(Debug, Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    source: String,
    // One lock around position and sink keeps seq order identical to file order.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    seq: u64,
    hash: String,
    // Set when the file may end in torn bytes: the next write starts with "\n".
    pending_newline: bool,
    sink: Sink,
}

#[derive(Debug)]
enum Sink {
    File(File),
    Memory(Vec<String>),
}

impl AuditLog {
    /// Opens (creating with mode 0600, parents 0700) the log at `path` and continues its chain.
    ///
    /// `source` is the CloudEvents source, by convention `agentid://<trust-domain>/<component>`.
    /// Only the last record is checked here; use [`verify_file`] for the whole history.
    pub fn open(path: &Path, source: impl Into<String>) -> Result<AuditLog, AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| AuditError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        // Checked on the open descriptor, not the path, so a swap in between cannot fool it.
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(AuditError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(AuditError::InsecureMode {
                path: path.to_owned(),
                mode,
            });
        }
        lock_exclusive(&file).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                AuditError::Busy {
                    path: path.to_owned(),
                }
            } else {
                open_err(e)
            }
        })?;
        let (head, torn) = find_head(&file, meta.len()).map_err(open_err)?;
        let head = head.map_err(|fault| AuditError::Resume {
            path: path.to_owned(),
            reason: fault.to_string(),
        })?;
        let (seq, hash) = head.map_or((0, GENESIS_HASH.to_owned()), |l| (l.seq, l.hash));
        Ok(Self::with_sink(
            source.into(),
            seq,
            hash,
            torn,
            Sink::File(file),
        ))
    }

    /// An in-memory log (for tests and embedding) with the same chaining; see [`AuditLog::lines`].
    pub fn memory(source: impl Into<String>) -> AuditLog {
        Self::with_sink(
            source.into(),
            0,
            GENESIS_HASH.to_owned(),
            false,
            Sink::Memory(Vec::new()),
        )
    }

    fn with_sink(source: String, seq: u64, hash: String, torn: bool, sink: Sink) -> AuditLog {
        AuditLog {
            inner: Arc::new(Inner {
                source,
                state: Mutex::new(State {
                    seq,
                    hash,
                    pending_newline: torn,
                    sink,
                }),
            }),
        }
    }

    // A panic while holding the lock cannot leave the state half-updated (it changes only after
    // a successful write), so a poisoned lock is safe to keep using.
    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `event` as the next record and returns its chain position.
    ///
    /// On a write error the chain does not advance and the next record starts on a new line, so
    /// any partly written bytes show up in [`verify`] instead of merging into a record.
    pub fn record(&self, event: AuditEvent) -> Result<AuditReceipt, AuditError> {
        // Random ID outside the lock: getrandom may be a syscall.
        let id = uuid::Uuid::new_v4().to_string();
        let mut st = self.state();
        let seq = st.seq + 1;
        let mut line = Vec::with_capacity(1024);
        if st.pending_newline {
            line.push(b'\n');
        }
        let start = line.len();
        let stamp = record::Stamp {
            source: &self.inner.source,
            id,
            // Taken under the lock so time order follows seq order.
            time: record::rfc3339(OffsetDateTime::now_utc(), true),
            seq,
            prev_hash: &st.hash,
        };
        record::encode(&event, stamp, &mut line)?;
        let hash = chain::seal(&st.hash, &mut line, start);
        if line.len() - start > MAX_LINE_BYTES {
            return Err(AuditError::TooLarge {
                len: line.len() - start,
            });
        }
        match &mut st.sink {
            Sink::File(file) => {
                line.push(b'\n');
                // O_APPEND + one buffer: one write(2) in the normal case, never interleaved.
                if let Err(e) = file.write_all(&line) {
                    st.pending_newline = true;
                    return Err(AuditError::Write(e));
                }
            }
            Sink::Memory(lines) => {
                // serde_json output is UTF-8, and `start` skips only an ASCII newline.
                lines.push(String::from_utf8_lossy(&line[start..]).into_owned());
            }
        }
        st.seq = seq;
        st.hash.clone_from(&hash);
        st.pending_newline = false;
        Ok(AuditReceipt { seq, hash })
    }

    /// The last record's position (seq 0 and [`GENESIS_HASH`] for an empty log).
    pub fn head(&self) -> AuditReceipt {
        let st = self.state();
        AuditReceipt {
            seq: st.seq,
            hash: st.hash.clone(),
        }
    }

    /// Flushes written records to stable storage (no-op in memory).
    pub fn sync_data(&self) -> Result<(), AuditError> {
        let st = self.state();
        match &st.sink {
            Sink::File(file) => file.sync_data().map_err(AuditError::Sync),
            Sink::Memory(_) => Ok(()),
        }
    }

    /// The lines of an in-memory log, without newlines (empty for a file log).
    pub fn lines(&self) -> Vec<String> {
        let st = self.state();
        match &st.sink {
            Sink::File(_) => Vec::new(),
            Sink::Memory(lines) => lines.clone(),
        }
    }
}

/// Takes a non-blocking exclusive `flock` held until the file is closed.
fn lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock takes a descriptor number and no pointers; `file` keeps it open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Finds the newest record, skipping torn lines after it; also says whether the file ends torn.
///
/// Reads backwards from the end, so open costs O(last lines), not O(file).
fn find_head(
    file: &File,
    len: u64,
) -> io::Result<(Result<Option<chain::Link>, chain::Fault>, bool)> {
    if len == 0 {
        return Ok((Ok(None), false));
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    let torn = last[0] != b'\n';
    // Exclusive end of the line to look at, not counting its newline.
    let mut end = if torn { len } else { len - 1 };
    loop {
        let (start, line) = line_ending_at(file, end)?;
        match chain::parse_line(&line) {
            Ok(link) => return Ok((Ok(Some(link)), torn)),
            // Leftovers of earlier crashes; the chain continues from the record before them.
            Err(chain::Fault::NotJson(_)) if looks_torn(&line) => {}
            Err(fault) => return Ok((Err(fault), torn)),
        }
        if start == 0 {
            return Ok((Ok(None), torn));
        }
        end = start - 1;
    }
}

/// Whether a non-JSON line could be a record cut short by a crash (a prefix, or unwritten zeros),
/// as opposed to a foreign file that must not be appended to.
fn looks_torn(line: &[u8]) -> bool {
    const HEAD: &[u8] = br#"{"specversion":"1.0","#;
    line.starts_with(HEAD) || HEAD.starts_with(line) || line.iter().all(|&b| b == 0)
}

/// The line that ends at offset `end` (exclusive) and its start offset.
fn line_ending_at(file: &File, end: u64) -> io::Result<(u64, Vec<u8>)> {
    const CHUNK: u64 = 8 * 1024;
    let mut start = end;
    let mut line = Vec::new();
    while start > 0 {
        let n = CHUNK.min(start);
        let mut chunk = vec![0; n as usize];
        file.read_exact_at(&mut chunk, start - n)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            chunk.drain(..=i);
            chunk.extend_from_slice(&line);
            return Ok((start - n + i as u64 + 1, chunk));
        }
        start -= n;
        chunk.extend_from_slice(&line);
        line = chunk;
        if line.len() > MAX_LINE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line near the end is longer than {MAX_LINE_BYTES} bytes"),
            ));
        }
    }
    Ok((0, line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::fs;
    use tempfile::TempDir;

    const SRC: &str = "agentid://example.org/server";

    fn event(i: u32) -> AuditEvent {
        AuditEvent::new(Action::Issued, format!("spiffe://example.org/agent/{i}"))
            .decision(Decision::allow().policy("default"))
            .credential(
                Credential::new(CredentialKind::X509Svid)
                    .serial(format!("{i:02x}"))
                    .fingerprint_of(b"der")
                    .not_after(OffsetDateTime::UNIX_EPOCH),
            )
            .requester(Requester::peer(100 + i, 1000, 1000))
    }

    /// A fresh log of `n` records, with its path and receipts.
    fn write_log(n: u32) -> (TempDir, PathBuf, Vec<AuditReceipt>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, SRC).unwrap();
        let receipts = (1..=n).map(|i| log.record(event(i)).unwrap()).collect();
        (dir, path, receipts)
    }

    fn read_lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn verify_lines(lines: &[String], opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
        let mut text = lines.join("\n");
        text.push('\n');
        verify(text.as_bytes(), opts)
    }

    fn strict(lines: &[String]) -> Result<VerifyReport, VerifyError> {
        verify_lines(lines, &VerifyOptions::default())
    }

    fn json(line: &str) -> Value {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn records_verify_and_report_the_head() {
        let (_dir, path, receipts) = write_log(10);
        let report = verify_file(&path, &VerifyOptions::default()).unwrap();
        assert_eq!(report.records, 10);
        assert_eq!(report.first_seq, 1);
        assert_eq!(report.last_seq, 10);
        assert_eq!(report.last_hash, receipts[9].hash);
        assert!(report.torn_lines.is_empty());
        let seqs: Vec<u64> = receipts.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        for (line, r) in read_lines(&path).iter().zip(&receipts) {
            let v = json(line);
            assert_eq!(v["data"]["integrity"]["seq"], r.seq);
            assert_eq!(v["data"]["integrity"]["hash"], r.hash.as_str());
        }
    }

    #[test]
    fn record_has_the_documented_shape() {
        let (_dir, path, receipts) = write_log(2);
        let lines = read_lines(&path);
        let v = json(&lines[0]);
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["source"], SRC);
        assert_eq!(v["type"], "dev.agentid.issued");
        assert_eq!(v["subject"], "spiffe://example.org/agent/1");
        assert_eq!(v["datacontenttype"], "application/json");
        let id = uuid::Uuid::parse_str(v["id"].as_str().unwrap()).unwrap();
        assert_eq!(id.get_version_num(), 4);
        let t = v["time"].as_str().unwrap().as_bytes();
        assert_eq!((t.len(), t[10], t[19], t[23]), (24, b'T', b'.', b'Z'));
        let d = &v["data"];
        assert_eq!(d["decision"]["verdict"], "allow");
        assert_eq!(d["decision"]["action"], "issued");
        assert_eq!(d["decision"]["policy"], "default");
        assert!(d["decision"].get("reason").is_none());
        assert_eq!(d["credential"]["kind"], "x509-svid");
        assert_eq!(d["credential"]["serial"], "01");
        assert_eq!(d["credential"]["not_after"], "1970-01-01T00:00:00Z");
        assert_eq!(d["credential"]["fingerprint"], sha256_fingerprint(b"der"));
        assert!(d["credential"].get("aud").is_none());
        assert_eq!(d["requester"]["pid"], 101);
        assert!(d.get("identity").is_none() && d.get("risk").is_none());
        assert_eq!(d["integrity"]["prev_hash"], GENESIS_HASH);
        assert_eq!(
            json(&lines[1])["data"]["integrity"]["prev_hash"],
            receipts[0].hash.as_str()
        );
    }

    #[test]
    fn sections_keep_their_order_and_defaults_apply() {
        let log = AuditLog::memory(SRC);
        let full = AuditEvent::new(Action::Delegated, "spiffe://example.org/a")
            .decision(Decision::deny("scope too wide"))
            .credential(
                Credential::new(CredentialKind::TaskToken)
                    .jti("j1")
                    .aud(["svc"]),
            )
            .identity(Identity {
                spiffe_id: Some("spiffe://example.org/a".into()),
                ..Default::default()
            })
            .attestation(Attestation {
                selectors: vec!["unix:uid:1000".into()],
                node: None,
            })
            .requester(Requester::peer(1, 2, 3))
            .delegation(Delegation {
                txn: Some("t".into()),
                actors: vec!["spiffe://example.org/b".into()],
                scope: None,
            })
            .risk(0.5);
        log.record(full).unwrap();
        log.record(AuditEvent::new(Action::PolicyRejected, ""))
            .unwrap();
        let lines = log.lines();
        let order = [
            "decision",
            "credential",
            "identity",
            "attestation",
            "requester",
            "delegation",
            "risk",
            "integrity",
        ];
        let at: Vec<usize> = order
            .iter()
            .map(|k| lines[0].find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
        let v = json(&lines[0]);
        assert_eq!(v["data"]["decision"]["verdict"], "deny");
        assert_eq!(v["data"]["credential"]["kind"], "task-token");
        assert_eq!(v["data"]["credential"]["aud"][0], "svc");
        let v = json(&lines[1]);
        assert_eq!(v["type"], "dev.agentid.policy_rejected");
        assert_eq!(v["data"]["decision"]["verdict"], "deny");
        assert!(v.get("subject").is_none());
        assert_eq!(strict(&lines).unwrap().records, 2);
    }

    #[test]
    fn hash_follows_the_documented_formula() {
        let log = AuditLog::memory(SRC);
        log.record(event(1)).unwrap();
        let r2 = log.record(event(2)).unwrap();
        let line = &log.lines()[1];
        let v = json(line);
        let prev = v["data"]["integrity"]["prev_hash"].as_str().unwrap();
        let hash = v["data"]["integrity"]["hash"].as_str().unwrap();
        assert!(line.ends_with(&format!(",\"hash\":\"{hash}\"}}}}}}")));
        let unsealed = line.replacen(hash, "", 1);
        let want = sha256_fingerprint(format!("{prev}\n{unsealed}").as_bytes());
        assert_eq!((hash, r2.hash.as_str()), (want.as_str(), want.as_str()));
    }

    #[test]
    fn memory_log_chains_like_a_file() {
        let log = AuditLog::memory(SRC);
        let receipts: Vec<_> = (1..=5).map(|i| log.record(event(i)).unwrap()).collect();
        let last = receipts[4].clone();
        assert_eq!(log.head(), last);
        let report = strict(&log.lines()).unwrap();
        assert_eq!((report.records, report.last_hash), (5, last.hash));
        log.sync_data().unwrap();
    }

    #[test]
    fn reopen_continues_the_chain() {
        let (_dir, path, receipts) = write_log(3);
        let log = AuditLog::open(&path, SRC).unwrap();
        assert_eq!(log.head(), receipts[2]);
        let r4 = log.record(event(4)).unwrap();
        log.record(event(5)).unwrap();
        assert_eq!(r4.seq, 4);
        assert!(log.lines().is_empty());
        let lines = read_lines(&path);
        assert_eq!(
            json(&lines[3])["data"]["integrity"]["prev_hash"],
            receipts[2].hash.as_str()
        );
        assert_eq!(
            verify_file(&path, &VerifyOptions::default())
                .unwrap()
                .records,
            5
        );
    }

    #[test]
    fn edited_byte_is_a_hash_mismatch() {
        let (_dir, path, _) = write_log(10);
        let mut lines = read_lines(&path);
        lines[4] = lines[4].replace("\"uid\":1000", "\"uid\":1001");
        assert!(matches!(
            strict(&lines),
            Err(VerifyError::HashMismatch { line: 5 })
        ));
    }

    #[test]
    fn added_whitespace_is_a_hash_mismatch() {
        let (_dir, path, _) = write_log(4);
        let mut lines = read_lines(&path);
        lines[1] = lines[1].replacen(",", ", ", 1);
        assert!(matches!(
            strict(&lines),
            Err(VerifyError::HashMismatch { line: 2 })
        ));
    }

    #[test]
    fn changed_hash_fields_are_hash_mismatches() {
        let (_dir, path, receipts) = write_log(5);
        let lines = read_lines(&path);
        let mut own = lines.clone();
        let flipped = receipts[2].hash.replacen("sha256:", "sha256:f", 1);
        own[2] = own[2].replace(&receipts[2].hash, &flipped[..receipts[2].hash.len()]);
        assert!(matches!(
            strict(&own),
            Err(VerifyError::HashMismatch { line: 3 })
        ));
        let mut prev = lines;
        prev[2] = prev[2].replacen(&receipts[1].hash, &receipts[0].hash, 1);
        assert!(matches!(
            strict(&prev),
            Err(VerifyError::HashMismatch { line: 3 })
        ));
    }

    #[test]
    fn deleted_middle_line_is_a_gap() {
        let (_dir, path, _) = write_log(10);
        let mut lines = read_lines(&path);
        lines.remove(4);
        let err = strict(&lines).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::SeqGap {
                    line: 5,
                    seq: 6,
                    prev: 4
                }
            ),
            "{err}"
        );
        assert_eq!(err.to_string(), "line 5: seq 6 follows 4 (records missing)");
    }

    #[test]
    fn swapped_lines_are_detected() {
        let (_dir, path, _) = write_log(10);
        let mut lines = read_lines(&path);
        lines.swap(3, 4);
        let err = strict(&lines).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::SeqGap {
                    line: 4,
                    seq: 5,
                    prev: 3
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn duplicated_line_is_detected() {
        let (_dir, path, _) = write_log(10);
        let mut lines = read_lines(&path);
        lines.insert(5, lines[4].clone());
        let err = strict(&lines).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::SeqNotIncreasing {
                    line: 6,
                    seq: 5,
                    prev: 5
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn resealed_edit_breaks_the_next_link() {
        let (_dir, path, receipts) = write_log(10);
        let mut lines = read_lines(&path);
        // A forger who recomputes the edited line's hash still cannot fix its successor.
        let edited = lines[4].replace("agent/5", "agent/X");
        let mut bytes = edited.as_bytes()[..edited.len() - 83].to_vec();
        bytes.extend_from_slice(br#""hash":""}}}"#);
        chain::seal(&receipts[3].hash, &mut bytes, 0);
        lines[4] = String::from_utf8(bytes).unwrap();
        let err = strict(&lines).unwrap_err();
        assert!(matches!(err, VerifyError::ChainBroken { line: 6 }), "{err}");
    }

    #[test]
    fn truncated_mid_line_is_a_torn_last_line() {
        let (_dir, path, _) = write_log(8);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, &text[..text.len() - 40]).unwrap();
        let err = verify_file(&path, &VerifyOptions::default()).unwrap_err();
        assert!(
            matches!(err, VerifyError::TornLastLine { line: 8 }),
            "{err}"
        );
    }

    #[test]
    fn deleted_head_needs_an_explicit_start() {
        let (_dir, path, receipts) = write_log(10);
        let lines = read_lines(&path)[3..].to_vec();
        let err = strict(&lines).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::BadStart {
                    line: 1,
                    seq: 4,
                    expected: 1
                }
            ),
            "{err}"
        );
        let follows = |r: &AuditReceipt| VerifyOptions {
            follows: Some(r.clone()),
            ..Default::default()
        };
        let report = verify_lines(&lines, &follows(&receipts[2])).unwrap();
        assert_eq!(
            (report.records, report.first_seq, report.last_seq),
            (7, 4, 10)
        );
        let err = verify_lines(&lines, &follows(&receipts[1])).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::BadStart {
                    line: 1,
                    seq: 4,
                    expected: 3
                }
            ),
            "{err}"
        );
        let wrong = AuditReceipt {
            seq: 3,
            hash: receipts[1].hash.clone(),
        };
        assert!(matches!(
            verify_lines(&lines, &follows(&wrong)),
            Err(VerifyError::BadStartHash { line: 1 })
        ));
        let any = VerifyOptions {
            any_start: true,
            ..Default::default()
        };
        assert_eq!(verify_lines(&lines, &any).unwrap().first_seq, 4);
    }

    #[test]
    fn pinned_head_catches_truncation_and_rewrites() {
        let (_dir, path, receipts) = write_log(10);
        let lines = read_lines(&path)[..8].to_vec();
        assert_eq!(strict(&lines).unwrap().last_seq, 8);
        let pin = |seq: u64, hash: &str| VerifyOptions {
            pinned: Some(AuditReceipt {
                seq,
                hash: hash.to_owned(),
            }),
            ..Default::default()
        };
        let err = verify_lines(&lines, &pin(10, &receipts[9].hash)).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::PinnedMissing {
                    seq: 10,
                    last_seq: 8
                }
            ),
            "{err}"
        );
        assert!(verify_lines(&lines, &pin(5, &receipts[4].hash)).is_ok());
        assert!(matches!(
            verify_lines(&lines, &pin(5, &receipts[5].hash)),
            Err(VerifyError::PinnedMismatch { line: 5, seq: 5 })
        ));
    }

    #[test]
    fn malformed_lines_are_named() {
        let (_dir, path, _) = write_log(4);
        let lines = read_lines(&path);
        let mut garbage = lines.clone();
        garbage[2] = "not json".into();
        let err = strict(&garbage).unwrap_err();
        assert!(matches!(err, VerifyError::NotJson { line: 3, .. }), "{err}");
        assert!(err.to_string().starts_with("line 3: not valid JSON"));
        // Even under allow_torn, dropping a whole record is a gap.
        let lenient = VerifyOptions {
            allow_torn: true,
            ..Default::default()
        };
        assert!(matches!(
            verify_lines(&garbage, &lenient),
            Err(VerifyError::SeqGap {
                line: 4,
                seq: 4,
                prev: 2
            })
        ));
        let mut extra = lines;
        extra[1] = format!("{},\"x\":1}}}}}}", &extra[1][..extra[1].len() - 3]);
        assert!(matches!(
            strict(&extra),
            Err(VerifyError::NotRecord { line: 2, .. })
        ));
    }

    #[test]
    fn reopen_finds_a_last_line_longer_than_a_read_chunk() {
        let (_dir, path, _) = write_log(2);
        let log = AuditLog::open(&path, SRC).unwrap();
        let long =
            AuditEvent::new(Action::Denied, "s").decision(Decision::deny("x".repeat(20_000)));
        let r3 = log.record(long).unwrap();
        drop(log);
        let log = AuditLog::open(&path, SRC).unwrap();
        assert_eq!(log.head(), r3);
        log.record(event(4)).unwrap();
        assert_eq!(
            verify_file(&path, &VerifyOptions::default())
                .unwrap()
                .records,
            4
        );
    }

    #[test]
    fn crash_leftovers_stay_visible_after_reopen() {
        let (_dir, path, receipts) = write_log(3);
        let third = read_lines(&path).pop().unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&third.as_bytes()[..100])
            .unwrap();
        let log = AuditLog::open(&path, SRC).unwrap();
        assert_eq!(log.head(), receipts[2]);
        log.record(event(4)).unwrap();
        let last = log.record(event(5)).unwrap();
        let err = verify_file(&path, &VerifyOptions::default()).unwrap_err();
        assert!(matches!(err, VerifyError::NotJson { line: 4, .. }), "{err}");
        let lenient = VerifyOptions {
            allow_torn: true,
            ..Default::default()
        };
        let report = verify_file(&path, &lenient).unwrap();
        assert_eq!(
            (report.records, report.torn_lines, report.last_hash),
            (5, vec![4], last.hash)
        );
    }

    #[test]
    fn crash_that_lost_only_the_newline_resumes_from_that_record() {
        let (_dir, path, receipts) = write_log(3);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.trim_end_matches('\n')).unwrap();
        let log = AuditLog::open(&path, SRC).unwrap();
        assert_eq!(log.head(), receipts[2]);
        log.record(event(4)).unwrap();
        assert_eq!(
            verify_file(&path, &VerifyOptions::default())
                .unwrap()
                .records,
            4
        );
    }

    #[test]
    fn zero_filled_tail_is_skipped_on_open() {
        let (_dir, path, receipts) = write_log(3);
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[0; 300])
            .unwrap();
        assert_eq!(AuditLog::open(&path, SRC).unwrap().head(), receipts[2]);
    }

    #[test]
    fn foreign_or_edited_last_line_is_not_continued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(&path, "hello\n").unwrap();
        let err = AuditLog::open(&path, SRC).unwrap_err();
        assert!(matches!(err, AuditError::Resume { .. }), "{err}");
        let (_dir, path, _) = write_log(3);
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("agent/3", "agent/X");
        fs::write(&path, text).unwrap();
        let err = AuditLog::open(&path, SRC).unwrap_err();
        assert!(matches!(err, AuditError::Resume { .. }), "{err}");
    }

    #[test]
    fn new_file_is_0600_and_writable_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/audit.jsonl");
        drop(AuditLog::open(&path, SRC).unwrap());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        for bad in [0o620, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let err = AuditLog::open(&path, SRC).unwrap_err();
            assert!(
                matches!(err, AuditError::InsecureMode { mode, .. } if mode == bad),
                "{err}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(AuditLog::open(&path, SRC).is_ok());
    }

    #[test]
    fn second_writer_is_refused() {
        let (_dir, path, _) = write_log(1);
        let first = AuditLog::open(&path, SRC).unwrap();
        let err = AuditLog::open(&path, SRC).unwrap_err();
        assert!(matches!(err, AuditError::Busy { .. }), "{err}");
        drop(first);
        assert!(AuditLog::open(&path, SRC).is_ok());
    }

    #[test]
    fn oversized_record_is_refused_without_advancing() {
        let log = AuditLog::memory(SRC);
        let huge = Decision::deny("x".repeat(MAX_LINE_BYTES));
        let err = log
            .record(AuditEvent::new(Action::Denied, "s").decision(huge))
            .unwrap_err();
        assert!(matches!(err, AuditError::TooLarge { .. }), "{err}");
        assert_eq!(log.head().seq, 0);
        assert!(log.lines().is_empty());
    }

    #[test]
    fn concurrent_records_form_one_chain() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<AuditLog>();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, SRC).unwrap();
        let mut seqs: Vec<u64> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|t| {
                    let log = log.clone();
                    s.spawn(move || {
                        (0..50)
                            .map(|i| log.record(event(t * 100 + i)).unwrap().seq)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        let report = verify_file(&path, &VerifyOptions::default()).unwrap();
        assert_eq!((report.records, report.last_hash), (200, log.head().hash));
    }
}
