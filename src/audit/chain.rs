//! Sealing lines into the hash chain, and verifying a log.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{Context, SHA256};
use serde::Deserialize;

/// `prev_hash` of the first record of a fresh log.
pub const GENESIS_HASH: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// Longest line the writer produces and the verifier reads.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// How the unsealed line ends: `integrity.hash` empty and last in the line.
const PLACEHOLDER: &[u8] = br#""hash":""}}}"#;
/// Bytes after the hash value in a sealed line.
const CLOSE: &[u8] = br#""}}}"#;
/// Length of `sha256:` + 64 hex digits.
const HASH_LEN: usize = 7 + 64;

/// `sha256:<hex>` of `prev_hash || "\n" || unsealed`, where `unsealed` is `body` + [`PLACEHOLDER`].
fn chain_hash(prev_hash: &str, body: &[u8]) -> String {
    let mut ctx = Context::new(&SHA256);
    ctx.update(prev_hash.as_bytes());
    ctx.update(b"\n");
    ctx.update(body);
    ctx.update(PLACEHOLDER);
    format!("sha256:{}", hex::encode(ctx.finish().as_ref()))
}

/// Seals the unsealed line in `line[start..]` (ending in [`PLACEHOLDER`]) in place; returns its hash.
pub(super) fn seal(prev_hash: &str, line: &mut Vec<u8>, start: usize) -> String {
    debug_assert!(line[start..].ends_with(PLACEHOLDER), "unsealed line shape");
    let body_end = line.len() - PLACEHOLDER.len();
    let hash = chain_hash(prev_hash, &line[start..body_end]);
    // Drop `"}}}` and write the value where the empty string was.
    line.truncate(line.len() - CLOSE.len());
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(CLOSE);
    hash
}

/// The chain fields of one well-formed, self-consistent line.
#[derive(Debug)]
pub(super) struct Link {
    pub seq: u64,
    pub prev_hash: String,
    pub hash: String,
}

/// Why a single line (judged alone) is not a sealed record.
#[derive(Debug)]
pub(super) enum Fault {
    NotJson(String),
    NotRecord(String),
    HashMismatch,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::NotJson(d) => write!(f, "not valid JSON ({d})"),
            Fault::NotRecord(d) => write!(f, "not an audit record ({d})"),
            Fault::HashMismatch => f.write_str("hash mismatch (record edited)"),
        }
    }
}

// Only the members the chain needs; the rest of the line is covered by the hash.
#[derive(Deserialize)]
struct LineEnvelope {
    specversion: String,
    data: LineData,
}

#[derive(Deserialize)]
struct LineData {
    integrity: LineIntegrity,
}

#[derive(Deserialize)]
struct LineIntegrity {
    seq: u64,
    prev_hash: String,
    hash: String,
}

/// Parses one line (without its newline) and checks its own hash.
pub(super) fn parse_line(line: &[u8]) -> Result<Link, Fault> {
    let env: LineEnvelope = serde_json::from_slice(line).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Fault::NotRecord(e.to_string()),
        _ => Fault::NotJson(e.to_string()),
    })?;
    if env.specversion != "1.0" {
        return Err(Fault::NotRecord(format!(
            "specversion {:?}, expected \"1.0\"",
            env.specversion
        )));
    }
    let integrity = env.data.integrity;
    if integrity.seq == 0 {
        return Err(Fault::NotRecord("seq 0 (sequences start at 1)".into()));
    }
    // The sealed line must end with `"hash":"<value>"}}}` and that value must be the parsed
    // integrity.hash; otherwise the bytes hashed would not be the bytes that were sealed.
    let tail = PLACEHOLDER.len() - CLOSE.len() + HASH_LEN + CLOSE.len();
    let shaped = line.len() >= tail && line.ends_with(CLOSE) && {
        let value = &line[line.len() - CLOSE.len() - HASH_LEN..line.len() - CLOSE.len()];
        line[line.len() - tail..].starts_with(&PLACEHOLDER[..PLACEHOLDER.len() - CLOSE.len()])
            && value == integrity.hash.as_bytes()
    };
    if !shaped {
        return Err(Fault::NotRecord(
            "data.integrity.hash is not the last member of the line".into(),
        ));
    }
    let body = &line[..line.len() - tail];
    if chain_hash(&integrity.prev_hash, body) != integrity.hash {
        return Err(Fault::HashMismatch);
    }
    Ok(Link {
        seq: integrity.seq,
        prev_hash: integrity.prev_hash,
        hash: integrity.hash,
    })
}

/// A chain position: a record's seq and hash (returned by `record`, pinned by operators).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuditReceipt {
    /// Sequence number of the record.
    pub seq: u64,
    /// Its `sha256:<hex>` chain hash.
    pub hash: String,
}

/// What [`verify`] accepts beyond a complete log starting at seq 1.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The record the first line must follow (last receipt of the previous, rotated file).
    pub follows: Option<AuditReceipt>,
    /// Accept whatever the first record links to; deleted head records then go unnoticed.
    pub any_start: bool,
    /// A record the log must contain with this hash (a head pinned earlier); catches truncation.
    pub pinned: Option<AuditReceipt>,
    /// Skip lines that are not JSON (torn by a crash) provided the chain continues across them;
    /// a skipped last line is then indistinguishable from tail truncation (see `pinned`).
    pub allow_torn: bool,
}

/// Outcome of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of records checked.
    pub records: u64,
    /// Seq of the first record (0 when there are none).
    pub first_seq: u64,
    /// Seq of the last record (the start position when there are none).
    pub last_seq: u64,
    /// Hash of the last record (the start hash when there are none): pin this.
    pub last_hash: String,
    /// 1-based numbers of torn lines skipped under [`VerifyOptions::allow_torn`].
    pub torn_lines: Vec<u64>,
}

/// Why a log failed verification; line numbers are 1-based.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be opened.
    #[error("opening {}: {source}", path.display())]
    Open {
        /// The log file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Reading failed part-way.
    #[error("line {line}: read error: {source}")]
    Read {
        /// Line being read.
        line: u64,
        /// The cause.
        source: io::Error,
    },
    /// A line exceeds [`MAX_LINE_BYTES`].
    #[error("line {line}: longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong {
        /// The line.
        line: u64,
    },
    /// The last line has no trailing newline (crash during a write, or truncation).
    #[error("line {line}: torn last line (no trailing newline)")]
    TornLastLine {
        /// The line.
        line: u64,
    },
    /// A line is not JSON.
    #[error("line {line}: not valid JSON ({detail})")]
    NotJson {
        /// The line.
        line: u64,
        /// Parser message.
        detail: String,
    },
    /// A line is JSON but not a sealed audit record.
    #[error("line {line}: not an audit record ({detail})")]
    NotRecord {
        /// The line.
        line: u64,
        /// What is missing or malformed.
        detail: String,
    },
    /// A line's hash does not recompute: its bytes were changed.
    #[error("line {line}: hash mismatch (record edited)")]
    HashMismatch {
        /// The line.
        line: u64,
    },
    /// The first record is not the expected one.
    #[error(
        "line {line}: chain starts at seq {seq}, expected {expected} (head records missing, or a rotated log: see VerifyOptions::follows)"
    )]
    BadStart {
        /// The line.
        line: u64,
        /// Seq found.
        seq: u64,
        /// Seq expected.
        expected: u64,
    },
    /// The first record's prev_hash is not the expected predecessor's hash.
    #[error(
        "line {line}: prev_hash does not match the expected predecessor (wrong file or rewritten head)"
    )]
    BadStartHash {
        /// The line.
        line: u64,
    },
    /// Seq jumps forward.
    #[error("line {line}: seq {seq} follows {prev} (records missing)")]
    SeqGap {
        /// The line.
        line: u64,
        /// Seq found.
        seq: u64,
        /// Seq of the previous record.
        prev: u64,
    },
    /// Seq repeats or goes backwards.
    #[error("line {line}: seq {seq} follows {prev} (records duplicated or reordered)")]
    SeqNotIncreasing {
        /// The line.
        line: u64,
        /// Seq found.
        seq: u64,
        /// Seq of the previous record.
        prev: u64,
    },
    /// Seq is right but prev_hash is not the previous record's hash.
    #[error(
        "line {line}: prev_hash does not match the previous record (records replaced or rewritten)"
    )]
    ChainBroken {
        /// The line.
        line: u64,
    },
    /// The pinned seq is present with a different hash.
    #[error("line {line}: seq {seq} does not match the pinned hash (log rewritten)")]
    PinnedMismatch {
        /// The line.
        line: u64,
        /// The pinned seq.
        seq: u64,
    },
    /// The pinned record is absent.
    #[error(
        "pinned record seq {seq} is not in the log, which ends at seq {last_seq} (tail truncated, or wrong file)"
    )]
    PinnedMissing {
        /// The pinned seq.
        seq: u64,
        /// Last seq present.
        last_seq: u64,
    },
}

/// Verifies a whole log read from `reader`.
pub fn verify(mut reader: impl BufRead, opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    // (seq, hash) the next record must follow; None only before the first record under any_start.
    let mut prev: Option<(u64, String)> = match (&opts.follows, opts.any_start) {
        (Some(r), _) => Some((r.seq, r.hash.clone())),
        (None, true) => None,
        (None, false) => Some((0, GENESIS_HASH.to_owned())),
    };
    let mut report = VerifyReport {
        records: 0,
        first_seq: 0,
        last_seq: prev.as_ref().map_or(0, |p| p.0),
        last_hash: prev.as_ref().map_or(GENESIS_HASH, |p| &p.1).to_owned(),
        torn_lines: Vec::new(),
    };
    let mut pinned_seen = false;
    let mut buf = Vec::with_capacity(2048);
    let mut line = 0u64;
    loop {
        line += 1;
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(|source| VerifyError::Read { line, source })?;
        if n == 0 {
            break;
        }
        let content = match buf.strip_suffix(b"\n") {
            Some(c) => c,
            None if buf.len() > MAX_LINE_BYTES => return Err(VerifyError::LineTooLong { line }),
            None if !opts.allow_torn => return Err(VerifyError::TornLastLine { line }),
            // Under allow_torn a complete record merely missing its newline still counts.
            None => &buf[..],
        };
        if content.len() > MAX_LINE_BYTES {
            return Err(VerifyError::LineTooLong { line });
        }
        let link = match parse_line(content) {
            Ok(link) => link,
            // Skipping is safe: the next record must still link to the last good one.
            Err(Fault::NotJson(_)) if opts.allow_torn => {
                report.torn_lines.push(line);
                continue;
            }
            Err(Fault::NotJson(detail)) => return Err(VerifyError::NotJson { line, detail }),
            Err(Fault::NotRecord(detail)) => return Err(VerifyError::NotRecord { line, detail }),
            Err(Fault::HashMismatch) => return Err(VerifyError::HashMismatch { line }),
        };
        if let Some((pseq, phash)) = &prev {
            let (pseq, first) = (*pseq, report.records == 0);
            if first && link.seq != pseq + 1 {
                let expected = pseq + 1;
                return Err(VerifyError::BadStart {
                    line,
                    seq: link.seq,
                    expected,
                });
            }
            if link.seq <= pseq {
                return Err(VerifyError::SeqNotIncreasing {
                    line,
                    seq: link.seq,
                    prev: pseq,
                });
            }
            if link.seq > pseq + 1 {
                return Err(VerifyError::SeqGap {
                    line,
                    seq: link.seq,
                    prev: pseq,
                });
            }
            if link.prev_hash != *phash {
                return Err(if first {
                    VerifyError::BadStartHash { line }
                } else {
                    VerifyError::ChainBroken { line }
                });
            }
        }
        if let Some(pin) = &opts.pinned
            && pin.seq == link.seq
        {
            if pin.hash != link.hash {
                return Err(VerifyError::PinnedMismatch { line, seq: pin.seq });
            }
            pinned_seen = true;
        }
        if report.records == 0 {
            report.first_seq = link.seq;
        }
        report.records += 1;
        report.last_seq = link.seq;
        report.last_hash.clone_from(&link.hash);
        prev = Some((link.seq, link.hash));
    }
    if let Some(pin) = &opts.pinned
        && !pinned_seen
    {
        return Err(VerifyError::PinnedMissing {
            seq: pin.seq,
            last_seq: report.last_seq,
        });
    }
    Ok(report)
}

/// Verifies the log file at `path`.
pub fn verify_file(path: &Path, opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let file = File::open(path).map_err(|source| VerifyError::Open {
        path: path.to_owned(),
        source,
    })?;
    verify(BufReader::with_capacity(64 * 1024, file), opts)
}
