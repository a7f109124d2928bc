//! `gateway-agent sessions list | show ID | replay ID | verify [ID] | export ID`: the
//! recorded sessions, read straight from their files (on the node, or in a copy of its
//! sessions directory). The REST API under `/api/v1/sessions` serves the same reads.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};

use super::reader::{ExportFormat, FileState, SessionDetail, SessionSummary, Sessions};
use super::replay::ReplayOptions;
use super::verify::VerifyReport;
use super::{Action, RecordingError, Timestamp};

/// Where the agent writes sessions unless configured otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/tollgate/sessions";

/// Recorded sessions: list, show, replay, verify, export.
#[derive(clap::Args, Debug)]
pub struct SessionsArgs {
    /// The sessions directory (the agent's, or a copy of it).
    #[arg(long, env = "TOLLGATE_SESSIONS_DIR", default_value = DEFAULT_DIR, global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// The file byte for byte (it verifies wherever it is copied).
    Raw,
    /// One JSON array: the header, then every record.
    Json,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// List sessions, oldest first.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show a session: whose it was, its exchanges and streams.
    Show {
        id: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Play a session's exec/attach output in this terminal at its recorded pace.
    Replay {
        id: String,
        /// Faster (2), slower (0.5), or 0 for no pauses at all.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Only the stream of this exchange (its audit id); default: every stream.
        #[arg(long, value_name = "AUDIT_ID")]
        exchange: Option<String>,
        /// Longest pause in seconds, however long the terminal sat idle.
        #[arg(long, value_name = "SECONDS")]
        max_idle: Option<f64>,
    },
    /// Check hash chains: name the first record changed, removed, inserted or
    /// reordered. Exit code 1 when any session fails.
    Verify {
        /// One session; default: every session.
        id: Option<String>,
        /// Also fail sessions that were not closed (agent killed) or end in a cut line.
        #[arg(long)]
        strict: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Write a session to stdout.
    Export {
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Raw)]
        format: Format,
    },
}

impl SessionsArgs {
    /// Runs the command; exit code 1 when `verify` finds a session that fails.
    pub fn run(self) -> Result<ExitCode> {
        let sessions = Sessions::open(&self.dir);
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let result = match self.command {
            Command::List { output } => list(&sessions, output, &mut out),
            Command::Show { id, output } => show(&sessions, &id, output, &mut out),
            Command::Replay {
                id,
                speed,
                exchange,
                max_idle,
            } => replay(&sessions, &id, speed, exchange, max_idle, &mut out),
            Command::Verify { id, strict, output } => {
                verify(&sessions, id.as_deref(), strict, output, &mut out)
            }
            Command::Export { id, format } => {
                let format = match format {
                    Format::Raw => ExportFormat::Raw,
                    Format::Json => ExportFormat::JsonArray,
                };
                sessions
                    .export(&id, format, &mut out)
                    .map(|()| ExitCode::SUCCESS)
                    .map_err(Into::into)
            }
        };
        match result {
            // `... | head` closing the pipe is not a failure.
            Err(err) if is_broken_pipe(&err) => Ok(ExitCode::SUCCESS),
            other => other,
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            || matches!(
                cause.downcast_ref::<RecordingError>(),
                Some(RecordingError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe
            )
    })
}

fn list(sessions: &Sessions, output: Output, out: &mut impl Write) -> Result<ExitCode> {
    let list = sessions.list()?;
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?,
        Output::Text if list.is_empty() => {
            writeln!(out, "no sessions in {}", sessions.dir().display())?
        }
        Output::Text => write!(out, "{}", list_table(&list))?,
    }
    Ok(ExitCode::SUCCESS)
}

fn show(sessions: &Sessions, id: &str, output: Output, out: &mut impl Write) -> Result<ExitCode> {
    let detail = sessions.show(id)?;
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&detail)?)?,
        Output::Text => write!(out, "{}", describe(&detail))?,
    }
    Ok(ExitCode::SUCCESS)
}

fn replay(
    sessions: &Sessions,
    id: &str,
    speed: f64,
    audit_id: Option<String>,
    max_idle: Option<f64>,
    out: &mut impl Write,
) -> Result<ExitCode> {
    let max_idle = max_idle
        .map(Duration::try_from_secs_f64)
        .transpose()
        .context("--max-idle must be a positive number of seconds")?;
    let options = ReplayOptions {
        audit_id,
        speed,
        max_idle,
    };
    let summary = sessions.replay(id, &options, out)?;
    for audit_id in &summary.opaque {
        eprintln!(
            "stream {audit_id} was recorded undecoded (SPDY or another protocol): nothing to play"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(
    sessions: &Sessions,
    id: Option<&str>,
    strict: bool,
    output: Output,
    out: &mut impl Write,
) -> Result<ExitCode> {
    let reports = match id {
        Some(id) => vec![sessions.verify(id)?],
        None => sessions.verify_all()?,
    };
    let passed = |r: &VerifyReport| if strict { r.clean() } else { r.ok };
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&reports)?)?,
        Output::Text if reports.is_empty() => {
            writeln!(out, "no sessions in {}", sessions.dir().display())?
        }
        Output::Text => write!(out, "{}", verify_table(&reports, strict))?,
    }
    Ok(if reports.iter().all(passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `list` as an aligned table.
fn list_table(list: &[SessionSummary]) -> String {
    let header = [
        "SESSION", "POD", "NODE", "STARTED", "DURATION", "RECORDS", "SIZE", "STATE",
    ];
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            let duration = match (s.started_at, s.ended_at) {
                (Some(start), Some(end)) => human_duration((end.0 - start.0).whole_milliseconds()),
                _ => "-".to_owned(),
            };
            vec![
                s.id.clone(),
                pod(&s.pod.namespace, &s.pod.name),
                or_dash(&s.node),
                s.started_at.map_or("-".to_owned(), short_time),
                duration,
                s.records.to_string(),
                human_bytes(s.bytes),
                state(s).to_owned(),
            ]
        })
        .collect();
    table(&header, &rows)
}

fn state(s: &SessionSummary) -> &'static str {
    match (s.state, s.complete) {
        (FileState::Closed, true) => "closed",
        (FileState::Closed, false) => "closed, incomplete",
        (FileState::Open, _) => "not closed",
        (FileState::Unreadable, _) => "unreadable",
    }
}

/// `show` as text: who, when, how much, then a line per exchange and per stream.
fn describe(d: &SessionDetail) -> String {
    use std::fmt::Write as _;
    let h = &d.header;
    let s = &d.summary;
    let mut out = String::new();
    let mut field = |name: &str, value: &str| {
        let _ = writeln!(out, "{:<12}{value}", format!("{name}:"));
    };
    field("Session", &h.session);
    field("File", &s.file.display().to_string());
    field("Node", &h.node);
    let mut pod_line = pod(&h.pod.namespace, &h.pod.name);
    if !h.pod.uid.is_empty() {
        pod_line.push_str(&format!(" (uid {})", h.pod.uid));
    }
    field("Pod", &pod_line);
    if !h.pod.service_account.is_empty() {
        field("Account", &h.pod.service_account);
    }
    field("Peer", &h.peer);
    if !h.api_server.is_empty() {
        field("API server", &h.api_server);
    }
    field("Started", &h.started_at.to_string());
    let ended = match &d.end {
        Some(end) => format!("{} ({})", end.ended_at, end.reason),
        None if d.incomplete_tail => {
            "not closed; the last line is cut short (a crash mid-write)".into()
        }
        None => "not closed (still open, or the agent was stopped hard)".into(),
    };
    field("Ended", &ended);
    let frames: u64 = d.streams.iter().map(|st| st.frames).sum();
    field(
        "Records",
        &format!(
            "{} ({} exchanges, {} streams, {frames} frames)",
            s.records,
            d.exchanges.len(),
            d.streams.len()
        ),
    );
    field("Size", &human_bytes(s.bytes));
    if let Some(t) = &d.truncated {
        let omitted = d
            .end
            .as_ref()
            .map_or("later".to_owned(), |e| e.omitted.to_string());
        field(
            "Truncated",
            &format!(
                "{omitted} records not stored: the session reached its cap of {}",
                human_bytes(t.max_session_bytes)
            ),
        );
    }
    if let Some(end) = d.end.as_ref().filter(|e| e.dropped > 0) {
        field(
            "Dropped",
            &format!(
                "{} records lost (writer behind, or disk errors)",
                end.dropped
            ),
        );
    }
    if d.unreadable_lines > 0 {
        field(
            "Unreadable",
            &format!("{} lines do not parse (run verify)", d.unreadable_lines),
        );
    }
    if !d.exchanges.is_empty() {
        out.push_str("\nExchanges:\n");
        let header = [
            "SEQ", "TIME", "VERB", "URI", "CODE", "DECISION", "DURATION", "USER",
        ];
        let rows: Vec<Vec<String>> = d
            .exchanges
            .iter()
            .map(|e| {
                let mut decision = match e.decision.action {
                    Action::Allow => "allow".to_owned(),
                    Action::Deny => "deny".to_owned(),
                    Action::Approve => "approve".to_owned(),
                };
                if let Some(rule) = &e.decision.rule {
                    decision.push_str(&format!(" ({rule})"));
                }
                if let Some(approval) = &e.approval_id {
                    decision.push_str(&format!(" {approval}"));
                }
                vec![
                    e.seq.to_string(),
                    time_of_day(e.at),
                    e.verb.clone(),
                    e.request_uri.clone(),
                    e.code.map_or("-".to_owned(), |c| c.to_string()),
                    decision,
                    human_duration(i128::from(e.duration_ms)),
                    or_dash(&e.user.username),
                ]
            })
            .collect();
        out.push_str(&table(&header, &rows));
    }
    if !d.streams.is_empty() {
        out.push_str("\nStreams:\n");
        let header = [
            "AUDIT-ID", "PROTOCOL", "STARTED", "DURATION", "FRAMES", "BYTES", "STATE",
        ];
        let rows: Vec<Vec<String>> = d
            .streams
            .iter()
            .map(|st| {
                let mut state = if st.ended { "ended" } else { "not ended" }.to_owned();
                if st.truncated {
                    state.push_str(", truncated");
                }
                if !st.decoded {
                    state.push_str(", undecoded");
                }
                vec![
                    st.audit_id.clone(),
                    st.protocol.clone(),
                    time_of_day(st.started_at),
                    human_duration(i128::from(st.duration_ms)),
                    st.frames.to_string(),
                    human_bytes(st.bytes),
                    state,
                ]
            })
            .collect();
        out.push_str(&table(&header, &rows));
    }
    out
}

/// One line per session: ok / FAILED and why.
fn verify_table(reports: &[VerifyReport], strict: bool) -> String {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            let (verdict, detail) = match &r.first_bad {
                Some(bad) => ("FAILED", bad.to_string()),
                None if strict && !r.clean() => (
                    "FAILED",
                    format!("{}; {} records intact", r.tail, r.records),
                ),
                None => ("ok", format!("{}, {} records", r.tail, r.records)),
            };
            vec![r.session.clone(), verdict.to_owned(), detail]
        })
        .collect();
    table(&["SESSION", "RESULT", "DETAIL"], &rows)
}

/// Columns padded to their widest cell; the last one is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            text.push_str(&format!("{cell:<width$}   ", width = widths[i]));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn pod(namespace: &str, name: &str) -> String {
    match (namespace, name) {
        ("", "") => "-".to_owned(),
        ("", name) => name.to_owned(),
        (ns, name) => format!("{ns}/{name}"),
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// `2026-03-04 05:06:07` (UTC).
fn short_time(t: Timestamp) -> String {
    t.to_string()
        .get(..19)
        .unwrap_or_default()
        .replace('T', " ")
}

/// `05:06:07.123` (UTC): exchanges of one session are close together.
fn time_of_day(t: Timestamp) -> String {
    t.to_string().get(11..23).unwrap_or_default().to_owned()
}

/// `850ms`, `12.3s`, `3m04s`, `2h03m`.
fn human_duration(ms: i128) -> String {
    let ms = ms.max(0);
    match ms {
        ms if ms < 1000 => format!("{ms}ms"),
        ms if ms < 60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        ms if ms < 3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        ms => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// `512 B`, `4.2 KiB`, `1.0 MiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::super::{Exchange, Recorder, RecordingConfig, SessionInfo, SyncPolicy};
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SessionsArgs,
    }

    fn parse(args: &[&str]) -> SessionsArgs {
        Cli::try_parse_from(std::iter::once("sessions").chain(args.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn arguments() {
        let a = parse(&[
            "--dir",
            "/tmp/x",
            "replay",
            "s-1",
            "--speed",
            "2",
            "--exchange",
            "a-1",
        ]);
        assert_eq!(a.dir, PathBuf::from("/tmp/x"));
        assert!(
            matches!(a.command, Command::Replay { speed, exchange: Some(ref e), .. } if speed == 2.0 && e == "a-1")
        );
        let a = parse(&["verify", "--dir", "/d"]);
        assert!(matches!(
            a.command,
            Command::Verify {
                id: None,
                strict: false,
                ..
            }
        ));
        assert_eq!(a.dir, PathBuf::from("/d"));
        assert!(matches!(
            parse(&["list", "-o", "json"]).command,
            Command::List {
                output: Output::Json
            }
        ));
    }

    #[test]
    fn humans() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4300), "4.2 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_duration(850), "850ms");
        assert_eq!(human_duration(12_345), "12.3s");
        assert_eq!(human_duration(184_000), "3m04s");
        assert_eq!(human_duration(7_380_000), "2h03m");
        let t = Timestamp::parse("2026-03-04T05:06:07.123456Z").unwrap();
        assert_eq!(short_time(t), "2026-03-04 05:06:07");
        assert_eq!(time_of_day(t), "05:06:07.123");
    }

    #[test]
    fn list_show_verify_output() {
        let dir =
            std::env::temp_dir().join(format!("tollgate-sessions-cli-{}", std::process::id()));
        let recorder = Recorder::new(RecordingConfig {
            sync: SyncPolicy::Never,
            ..RecordingConfig::new(&dir, "node-a")
        })
        .unwrap();
        let session = recorder.open_session(SessionInfo {
            id: "s-cli".into(),
            pod_namespace: "agents".into(),
            pod_name: "bot".into(),
            ..Default::default()
        });
        session.record(Exchange {
            audit_id: "a-1".into(),
            verb: "list".into(),
            request_uri: "/api/v1/secrets".into(),
            ..Default::default()
        });
        let path = session.path().unwrap().to_owned();
        drop(session);
        assert!(recorder.flush_blocking(Duration::from_secs(10)));
        let sessions = Sessions::open(&dir);

        let mut out = Vec::new();
        list(&sessions, Output::Text, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("SESSION   POD          NODE"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("s-cli     agents/bot   node-a"),
            "{text}"
        );
        assert!(lines[1].ends_with("closed"), "{text}");

        let mut out = Vec::new();
        show(&sessions, "s-cli", Output::Text, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Pod:        agents/bot"), "{text}");
        assert!(text.contains("/api/v1/secrets"), "{text}");
        let mut out = Vec::new();
        show(&sessions, "s-cli", Output::Json, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["exchanges"][0]["verb"], "list");

        let mut out = Vec::new();
        assert_eq!(
            verify(&sessions, None, false, Output::Text, &mut out).unwrap(),
            ExitCode::SUCCESS
        );
        assert!(String::from_utf8(out).unwrap().contains("s-cli     ok"));

        // One changed byte: exit code 1, the record named.
        let mut data = std::fs::read(&path).unwrap();
        let at = data.iter().position(|&b| b == b'\n').unwrap() + 40;
        data[at] ^= 0x01;
        std::fs::write(&path, &data).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            verify(&sessions, Some("s-cli"), false, Output::Text, &mut out).unwrap(),
            ExitCode::FAILURE
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("FAILED   seq 0 (line 2): changed"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
