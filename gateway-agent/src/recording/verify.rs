//! Checking a session file's hash chain, naming the first record that is not what the
//! writer wrote.
//!
//! Every line is checked on its own first (its `hash` against its bytes), then against
//! its neighbours (`seq` in order, `prevHash` equal to the previous line's `hash`), so
//! the report names the record that was touched rather than the one after it:
//!
//! - a changed byte breaks that line's own hash: the line is named;
//! - a removed line leaves a gap in `seq`: the first missing seq is named;
//! - lines swapped or moved: the first seq not in its place is named;
//! - a line forged with a valid hash of its own (appended, inserted, or a record
//!   replaced and re-hashed) does not chain: the first line whose `prevHash` is not the
//!   previous line's hash is named (when a record was replaced, it is the one after);
//! - anything after an `end` record is named;
//! - a last line without its newline is a write cut short by a crash: an incomplete
//!   tail, not tampering; a file without `end` was not closed (agent killed, or still
//!   being written).
//!
//! A chain without a key cannot stop someone who rewrites every line from the change
//! to the end; the writer logs each session's last hash when it closes, and
//! [`VerifyReport::last_hash`] is there to compare with that log.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};

use super::format::{unseal, End, Header, Kind, FORMAT};
use super::RecordingError;

/// Where in a file a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// The header line.
    Header,
    /// The record with this `seq` (the one that should be there).
    Seq(u64),
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Header => f.write_str("header"),
            At::Seq(seq) => write!(f, "seq {seq}"),
        }
    }
}

impl Serialize for At {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            At::Header => s.serialize_str("header"),
            At::Seq(seq) => s.serialize_u64(*seq),
        }
    }
}

/// What is wrong with a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "camelCase")]
pub enum Problem {
    /// The line's bytes do not match its own hash.
    Changed,
    /// Not a sealed line of this format.
    Malformed { why: String },
    /// The record is gone: the next line holds `found`.
    Missing { found: u64 },
    /// The record is elsewhere in the file: `found` is in its place.
    Reordered { found: u64 },
    /// A line repeating an earlier `seq` (`found`) stands where this record should be.
    Inserted { found: u64 },
    /// The record is intact but its `prevHash` is not the previous line's hash: it was
    /// forged (appended or inserted), or the line before it was replaced and re-hashed.
    Unchained,
    /// Something follows the `end` record.
    AfterEnd,
    /// The header names another session than the file does.
    WrongSession { header: String },
    /// The `end` record's count disagrees with its position.
    BadEnd { records: u64 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Changed => f.write_str("changed: its bytes do not match its hash"),
            Problem::Malformed { why } => write!(f, "malformed: {why}"),
            Problem::Missing { found } => write!(f, "missing: removed (the next line is seq {found})"),
            Problem::Reordered { found } => {
                write!(f, "out of order: moved later in the file (seq {found} is in its place)")
            }
            Problem::Inserted { found } => {
                write!(f, "inserted: a line repeating seq {found} stands in its place")
            }
            Problem::Unchained => f.write_str(
                "does not chain to the line before it: forged (appended or inserted), or the line before was replaced",
            ),
            Problem::AfterEnd => f.write_str("appended after the end record"),
            Problem::WrongSession { header } => {
                write!(f, "header belongs to session {header:?}, not this file")
            }
            Problem::BadEnd { records } => {
                write!(f, "end record counts {records} records, disagreeing with its seq")
            }
        }
    }
}

/// The first record that is not what the writer wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BadRecord {
    pub at: At,
    /// 1-based line number in the file.
    pub line: u64,
    #[serde(flatten)]
    pub problem: Problem,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (line {}): {}", self.at, self.line, self.problem)
    }
}

/// How a file ends (when nothing before was wrong).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Tail {
    /// With its `end` record.
    Closed,
    /// Without `end`: the agent was killed, or the session is still being written.
    NotClosed,
    /// The last line is cut short (a crash mid-write); the records before it are
    /// intact.
    IncompleteTail { bytes: u64 },
}

impl fmt::Display for Tail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tail::Closed => f.write_str("closed"),
            Tail::NotClosed => f.write_str("not closed (agent stopped or session still open)"),
            Tail::IncompleteTail { bytes } => {
                write!(
                    f,
                    "incomplete tail: last line cut short after {bytes} bytes (a crash mid-write)"
                )
            }
        }
    }
}

/// The outcome of verifying one session file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub session: String,
    pub file: PathBuf,
    /// No record was changed, removed, inserted or reordered.
    pub ok: bool,
    pub first_bad: Option<BadRecord>,
    /// Records that verified, before any problem (`end` not counted).
    pub records: u64,
    pub tail: Tail,
    /// The hash of the last line that verified: compare it with the agent's
    /// `session closed` log line.
    pub last_hash: Option<String>,
}

impl VerifyReport {
    /// Intact and closed: what `verify --strict` requires.
    pub fn clean(&self) -> bool {
        self.ok && self.tail == Tail::Closed
    }
}

/// The chain members of a record line.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Chain {
    seq: u64,
    prev_hash: String,
    kind: Kind,
}

/// Verifies the file at `path`; `session` is the id its name gives (the header must
/// agree).
pub fn verify_file(path: &Path, session: &str) -> Result<VerifyReport, RecordingError> {
    let io = |error| RecordingError::Io {
        path: path.to_owned(),
        error,
    };
    // First pass: the seq each line claims, to tell a removed record from a moved one.
    let mut claimed: Vec<Option<u64>> = Vec::new();
    for_each_line(path, |_, line, _| claimed.push(claimed_seq(line))).map_err(io)?;

    let mut report = VerifyReport {
        session: session.to_owned(),
        file: path.to_owned(),
        ok: true,
        first_bad: None,
        records: 0,
        tail: Tail::NotClosed,
        last_hash: None,
    };
    let mut checker = Checker {
        claimed: &claimed,
        session,
        prev: None,
        next_seq: 0,
        closed: false,
        incomplete: None,
    };
    let mut bad = None;
    for_each_line(path, |index, line, complete| {
        if bad.is_none() {
            bad = checker.line(index, line, complete).err();
        }
    })
    .map_err(io)?;

    report.records = checker.next_seq.saturating_sub(u64::from(checker.closed));
    report.last_hash = checker.prev.clone();
    report.tail = match (checker.closed, checker.incomplete) {
        (true, _) => Tail::Closed,
        (false, Some(bytes)) => Tail::IncompleteTail { bytes },
        (false, None) => Tail::NotClosed,
    };
    if let Some(bad) = bad {
        report.ok = false;
        report.first_bad = Some(bad);
    }
    Ok(report)
}

struct Checker<'a> {
    claimed: &'a [Option<u64>],
    session: &'a str,
    /// The previous line's hash; `None` before the header.
    prev: Option<String>,
    next_seq: u64,
    closed: bool,
    incomplete: Option<u64>,
}

impl Checker<'_> {
    fn line(&mut self, index: usize, line: &[u8], complete: bool) -> Result<(), BadRecord> {
        let at = if index == 0 {
            At::Header
        } else {
            At::Seq(self.next_seq)
        };
        let bad = |problem| BadRecord {
            at,
            line: index as u64 + 1,
            problem,
        };
        if self.closed {
            return Err(bad(Problem::AfterEnd));
        }
        if !complete {
            // Only the last line can lack its newline: a write the crash cut short.
            self.incomplete = Some(line.len() as u64);
            return Ok(());
        }
        let Some((stated, computed)) = unseal(line) else {
            return Err(bad(Problem::Malformed {
                why: "no hash member where the line should end".into(),
            }));
        };
        if stated != computed {
            return Err(bad(Problem::Changed));
        }
        if index == 0 {
            let header: Header = serde_json::from_slice(line).map_err(|err| {
                bad(Problem::Malformed {
                    why: format!("not a session header: {err}"),
                })
            })?;
            if header.format != FORMAT {
                return Err(bad(Problem::Malformed {
                    why: format!("unknown format {:?}", header.format),
                }));
            }
            if header.session != self.session {
                return Err(bad(Problem::WrongSession {
                    header: header.session,
                }));
            }
            self.prev = Some(computed);
            return Ok(());
        }
        let chain: Chain = serde_json::from_slice(line).map_err(|err| {
            bad(Problem::Malformed {
                why: format!("no seq, prevHash or kind: {err}"),
            })
        })?;
        let expected = self.next_seq;
        if chain.seq != expected {
            let problem = if chain.seq < expected {
                Problem::Inserted { found: chain.seq }
            } else if self.claimed[index..].contains(&Some(expected)) {
                Problem::Reordered { found: chain.seq }
            } else {
                Problem::Missing { found: chain.seq }
            };
            return Err(bad(problem));
        }
        if Some(&chain.prev_hash) != self.prev.as_ref() {
            // Both lines hash right and the seqs are in order, so one of them was written
            // by someone who could compute hashes but not the chain. Which one the
            // chain cannot tell; this is the first place it is broken.
            return Err(bad(Problem::Unchained));
        }
        if chain.kind == Kind::End {
            let end: End = serde_json::from_slice(line).map_err(|err| {
                bad(Problem::Malformed {
                    why: format!("not an end record: {err}"),
                })
            })?;
            if end.records != chain.seq {
                return Err(bad(Problem::BadEnd {
                    records: end.records,
                }));
            }
            self.closed = true;
        }
        self.prev = Some(computed);
        self.next_seq += 1;
        Ok(())
    }
}

/// The `seq` a record line states, read from the prefix the writer always puts first
/// (cheap: this runs over every line before the real check).
fn claimed_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(br#"{"seq":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Calls `f(index, line without newline, ended with a newline)` for every line.
pub(crate) fn for_each_line(
    path: &Path,
    mut f: impl FnMut(usize, &[u8], bool),
) -> std::io::Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, File::open(path)?);
    let mut line = Vec::new();
    let mut index = 0;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        f(index, &line, complete);
        index += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_seq_reads_the_prefix() {
        assert_eq!(claimed_seq(br#"{"seq":42,"prevHash":"x"}"#), Some(42));
        assert_eq!(claimed_seq(br#"{"kind":"header"}"#), None);
    }
}
