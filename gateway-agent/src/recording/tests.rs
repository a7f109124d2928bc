//! End-to-end tests: sessions written by the recorder, then read, verified, tampered
//! with, replayed and pruned. Files go to fresh directories under the system temp dir.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::json;

use super::remotecommand::tests::ws_frame;
use super::*;

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "tollgate-recording-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const WAIT: Duration = Duration::from_secs(10);

fn config(dir: &Path) -> RecordingConfig {
    RecordingConfig {
        sync: SyncPolicy::Never,
        ..RecordingConfig::new(dir, "node-a")
    }
}

fn info(id: &str) -> SessionInfo {
    SessionInfo {
        id: id.into(),
        pod_namespace: "agents".into(),
        pod_name: "claude-0".into(),
        pod_uid: "uid-1".into(),
        pod_service_account: "agent".into(),
        peer: "10.0.0.7:41000".into(),
        api_server: "10.96.0.1:443".into(),
        started_at: Timestamp::parse("2026-03-04T05:06:07Z").unwrap(),
    }
}

fn exchange(n: usize) -> Exchange {
    let t = Timestamp::parse("2026-03-04T05:06:08Z").unwrap();
    Exchange {
        audit_id: format!("audit-{n}"),
        request_received_timestamp: t,
        response_started_timestamp: Some(t),
        stage_timestamp: Timestamp(t.0 + time::Duration::milliseconds(12)),
        user: UserInfo {
            username: "system:serviceaccount:agents:agent".into(),
            uid: "sa-uid".into(),
            groups: vec!["system:serviceaccounts".into()],
            ..Default::default()
        },
        source_ips: vec!["10.0.0.7".into()],
        verb: "get".into(),
        request_uri: format!("/api/v1/namespaces/agents/pods/p{n}"),
        object_ref: Some(ObjectRef {
            resource: Some("pods".into()),
            namespace: Some("agents".into()),
            name: Some(format!("p{n}")),
            api_version: Some("v1".into()),
            ..Default::default()
        }),
        response_status: Some(ResponseStatus {
            code: 200,
            ..Default::default()
        }),
        decision: Decision {
            action: Action::Allow,
            rule: Some("read-pods".into()),
            reason: None,
        },
        response_object: Body::JsonText(Bytes::from(format!(
            r#"{{"kind":"Pod","metadata":{{"name":"p{n}"}}}}"#
        ))),
        ..Default::default()
    }
}

/// Writes a closed session of `n` exchanges and returns its file.
fn write_session(recorder: &Recorder, id: &str, n: usize) -> PathBuf {
    let session = recorder.open_session(info(id));
    for i in 0..n {
        assert!(session.record(exchange(i)));
    }
    let path = session.path().unwrap().to_owned();
    drop(session);
    assert!(recorder.flush_blocking(WAIT));
    path
}

fn lines(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap();
    data.split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

fn rewrite(path: &Path, lines: &[Vec<u8>]) {
    std::fs::write(path, lines.concat()).unwrap();
}

fn first_bad(sessions: &Sessions, id: &str) -> BadRecord {
    let report = sessions.verify(id).unwrap();
    assert!(!report.ok, "{report:?}");
    report.first_bad.unwrap()
}

#[test]
fn round_trip() {
    let tmp = TempDir::new("round-trip");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    let session = recorder.open_session(info("s-1"));
    let mut ex = exchange(0);
    ex.verb = "create".into();
    ex.request_object = Body::Json(json!({"kind": "ConfigMap", "data": {"a": "b"}}));
    ex.approval_id = Some("ar-1".into());
    ex.annotations
        .insert("tollgate.dev/masked".into(), "0".into());
    assert!(session.record(ex.clone()));
    assert!(session.record(exchange(1)));
    let path = session.path().unwrap().to_owned();
    assert_eq!(path, tmp.0.join("2026-03-04").join("s-1.jsonl"));
    drop(session);
    assert!(recorder.flush_blocking(WAIT));

    let sessions = Sessions::open(&tmp.0);
    let list = sessions.list().unwrap();
    assert_eq!(list.len(), 1);
    let s = &list[0];
    assert_eq!(
        (s.id.as_str(), s.node.as_str(), s.pod.name.as_str()),
        ("s-1", "node-a", "claude-0")
    );
    assert_eq!(
        (s.records, s.state, s.complete),
        (2, reader::FileState::Closed, true)
    );
    assert!(s.ended_at.is_some());

    let records = sessions.records("s-1").unwrap();
    assert_eq!(
        records.iter().map(|r| r.kind).collect::<Vec<_>>(),
        [Kind::Exchange, Kind::Exchange, Kind::End]
    );
    assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2]);
    let back = records[0].exchange().unwrap();
    assert_eq!(
        back.request_object,
        Body::Json(json!({"kind": "ConfigMap", "data": {"a": "b"}}))
    );
    assert_eq!(
        back.response_object.json().unwrap()["metadata"]["name"],
        "p0"
    );
    // Everything but the bodies' representation comes back as it went in.
    let mut expected = ex;
    expected.request_object = back.request_object.clone();
    expected.response_object = back.response_object.clone();
    assert_eq!(back, expected);

    let detail = sessions.show("s-1").unwrap();
    assert_eq!(detail.header.pod.namespace, "agents");
    assert_eq!(detail.exchanges.len(), 2);
    assert_eq!(detail.exchanges[0].verb, "create");
    assert_eq!(detail.exchanges[0].duration_ms, 12);
    assert_eq!(detail.end.unwrap().records, 2);

    let report = sessions.verify("s-1").unwrap();
    assert!(report.ok && report.clean(), "{report:?}");
    assert_eq!(report.records, 2);
    assert_eq!(report.tail, Tail::Closed);
    assert_eq!(sessions.verify_all().unwrap().len(), 1);

    let mut raw = Vec::new();
    sessions.export("s-1", ExportFormat::Raw, &mut raw).unwrap();
    assert_eq!(raw, std::fs::read(&path).unwrap());
    let mut array = Vec::new();
    sessions
        .export("s-1", ExportFormat::JsonArray, &mut array)
        .unwrap();
    let array: serde_json::Value = serde_json::from_slice(&array).unwrap();
    assert_eq!(array.as_array().unwrap().len(), 4);
    assert_eq!(array[0]["kind"], "header");

    assert!(matches!(
        sessions.show("nope"),
        Err(RecordingError::NotFound(_))
    ));
    assert!(matches!(
        sessions.show("../x"),
        Err(RecordingError::InvalidId(_))
    ));
}

#[test]
fn a_changed_byte_anywhere_in_record_3_names_seq_3() {
    let tmp = TempDir::new("flip");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    let path = write_session(&recorder, "s-flip", 6);
    let sessions = Sessions::open(&tmp.0);
    let original = lines(&path);
    // Line 0 is the header, so record 3 is line 4.
    for at in 0..original[4].len() {
        let mut tampered = original.clone();
        tampered[4][at] ^= 0x01;
        rewrite(&path, &tampered);
        let bad = first_bad(&sessions, "s-flip");
        assert_eq!(bad.at, At::Seq(3), "byte {at}: {bad}");
    }
    // And in the header.
    let mut tampered = original.clone();
    tampered[0][30] ^= 0x01;
    rewrite(&path, &tampered);
    assert_eq!(first_bad(&sessions, "s-flip").at, At::Header);
}

#[test]
fn a_deleted_line_names_the_first_missing_seq() {
    let tmp = TempDir::new("delete");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    let path = write_session(&recorder, "s-del", 6);
    let sessions = Sessions::open(&tmp.0);
    let mut tampered = lines(&path);
    tampered.remove(3); // record 2
    rewrite(&path, &tampered);
    let bad = first_bad(&sessions, "s-del");
    assert_eq!(
        (bad.at, bad.problem.clone()),
        (At::Seq(2), Problem::Missing { found: 3 })
    );

    // Removing the end record (and a record before it) reads as a session not closed,
    // not as tampering: without an anchor a cut tail looks like a crash.
    let mut cut = lines(&path);
    cut.truncate(3);
    rewrite(&path, &cut);
    let report = sessions.verify("s-del").unwrap();
    assert!(report.ok);
    assert_eq!(report.tail, Tail::NotClosed);
}

#[test]
fn swapped_lines_are_named() {
    let tmp = TempDir::new("swap");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    let path = write_session(&recorder, "s-swap", 6);
    let sessions = Sessions::open(&tmp.0);
    let mut tampered = lines(&path);
    tampered.swap(3, 4); // records 2 and 3
    rewrite(&path, &tampered);
    let bad = first_bad(&sessions, "s-swap");
    assert_eq!(
        (bad.at, bad.problem),
        (At::Seq(2), Problem::Reordered { found: 3 })
    );
}

#[test]
fn forged_lines_are_named() {
    let tmp = TempDir::new("forge");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    let path = write_session(&recorder, "s-forge", 4);
    let sessions = Sessions::open(&tmp.0);
    let original = lines(&path);

    // A copy of a record appended after the end.
    let mut appended = original.clone();
    appended.push(original[2].clone());
    rewrite(&path, &appended);
    let bad = first_bad(&sessions, "s-forge");
    assert_eq!((bad.at, bad.problem), (At::Seq(5), Problem::AfterEnd));

    // A well-formed record with a correct hash of its own, put in place of the end
    // record, but chained to nothing.
    let forged = format::seal(format::record_object(
        4,
        &"0".repeat(64),
        Kind::Exchange,
        &serde_json::to_vec(&exchange(9)).unwrap(),
    ))
    .0;
    let mut replaced = original.clone();
    *replaced.last_mut().unwrap() = forged;
    rewrite(&path, &replaced);
    let bad = first_bad(&sessions, "s-forge");
    assert_eq!((bad.at, bad.problem), (At::Seq(4), Problem::Unchained));

    // A copy of an earlier record inserted.
    let mut inserted = original.clone();
    inserted.insert(3, original[1].clone());
    rewrite(&path, &inserted);
    let bad = first_bad(&sessions, "s-forge");
    assert_eq!(
        (bad.at, bad.problem),
        (At::Seq(2), Problem::Inserted { found: 0 })
    );

    // A session file renamed to pass for another.
    rewrite(&path, &original);
    let other = path.with_file_name("s-other.jsonl");
    std::fs::rename(&path, &other).unwrap();
    let bad = first_bad(&sessions, "s-other");
    assert_eq!(bad.at, At::Header);
    assert!(matches!(bad.problem, Problem::WrongSession { .. }));
}

#[test]
fn a_cut_last_line_is_an_incomplete_tail() {
    let tmp = TempDir::new("tail");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    let path = write_session(&recorder, "s-tail", 4);
    let sessions = Sessions::open(&tmp.0);
    let mut cut = lines(&path);
    cut.pop(); // the end record
    let last = cut.last_mut().unwrap();
    last.truncate(last.len() / 2);
    rewrite(&path, &cut);
    let report = sessions.verify("s-tail").unwrap();
    assert!(report.ok, "{report:?}");
    assert!(!report.clean());
    assert!(
        matches!(report.tail, Tail::IncompleteTail { .. }),
        "{report:?}"
    );
    assert_eq!(report.records, 3);
    assert!(report.tail.to_string().starts_with("incomplete tail"));
    // Reading still works: the cut line is left out.
    assert_eq!(sessions.records("s-tail").unwrap().len(), 3);
    assert!(sessions.show("s-tail").unwrap().incomplete_tail);
}

#[test]
fn a_session_never_closed_keeps_its_records() {
    let tmp = TempDir::new("crash");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    let session = recorder.open_session(info("s-crash"));
    for i in 0..3 {
        session.record(exchange(i));
    }
    session.abandon();
    assert!(recorder.flush_blocking(WAIT));
    let sessions = Sessions::open(&tmp.0);
    let report = sessions.verify("s-crash").unwrap();
    assert!(report.ok);
    assert_eq!((report.tail, report.records), (Tail::NotClosed, 3));
    let summary = &sessions.list().unwrap()[0];
    assert_eq!(
        (summary.state, summary.records, summary.complete),
        (reader::FileState::Open, 3, false)
    );
}

#[test]
fn shutdown_closes_open_sessions() {
    let tmp = TempDir::new("shutdown");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    let session = recorder.open_session(info("s-shut"));
    session.record(exchange(0));
    assert!(recorder.shutdown_blocking(WAIT));
    assert!(session.status().closed);
    // After shutdown nothing is written, and the loss is counted.
    assert!(!session.record(exchange(1)));
    assert_eq!(session.status().dropped, 1);
    let end = Sessions::open(&tmp.0).show("s-shut").unwrap().end.unwrap();
    assert_eq!((end.reason.as_str(), end.records), ("shutdown", 1));
}

#[test]
fn body_and_session_caps() {
    let tmp = TempDir::new("caps");
    let recorder = Recorder::new(RecordingConfig {
        max_record_body_bytes: 100,
        max_session_bytes: 4000,
        ..config(&tmp.0)
    })
    .unwrap();
    let session = recorder.open_session(info("s-caps"));
    let mut big = exchange(0);
    let body = format!(r#"{{"data":"{}"}}"#, "x".repeat(500));
    big.response_object = Body::JsonText(Bytes::from(body.clone()));
    big.request_object = Body::Json(json!({"data": "y".repeat(500)}));
    session.record(big);
    for i in 1..40 {
        session.record(exchange(i));
    }
    drop(session);
    assert!(recorder.flush_blocking(WAIT));

    let sessions = Sessions::open(&tmp.0);
    let records = sessions.records("s-caps").unwrap();
    let first = records[0].exchange().unwrap();
    let Body::Omitted(omitted) = &first.response_object else {
        panic!("{first:?}")
    };
    assert_eq!(omitted.reason, OmitReason::TooLarge);
    assert_eq!(omitted.bytes, body.len() as u64);
    assert_eq!(
        omitted.sha256.as_deref(),
        Some(format::sha256_hex(body.as_bytes()).as_str())
    );
    assert!(matches!(
        first.request_object,
        Body::Omitted(Omitted {
            reason: OmitReason::TooLarge,
            ..
        })
    ));

    let kinds: Vec<Kind> = records.iter().map(|r| r.kind).collect();
    let cut = kinds
        .iter()
        .position(|k| *k == Kind::SessionTruncated)
        .unwrap();
    assert_eq!(kinds[cut + 1..], [Kind::End]);
    let end = sessions.show("s-caps").unwrap().end.unwrap();
    assert_eq!(end.exchanges as usize, cut);
    assert_eq!(end.omitted as usize, 40 - cut);
    // Over the cap only by the marker and the end record.
    let size = std::fs::metadata(sessions.find("s-caps").unwrap())
        .unwrap()
        .len();
    assert!(size < 4000 + 600, "{size}");
    let summary = &sessions.list().unwrap()[0];
    assert!(!summary.complete);
    assert!(sessions.verify("s-caps").unwrap().clean());
}

#[test]
fn status_reports_truncation_and_drops() {
    let tmp = TempDir::new("status");
    let recorder = Recorder::new(RecordingConfig {
        max_session_bytes: 1500,
        ..config(&tmp.0)
    })
    .unwrap();
    let session = recorder.open_session(info("s-status"));
    for i in 0..5 {
        session.record(exchange(i));
    }
    assert!(recorder.flush_blocking(WAIT));
    let status = session.status();
    assert!(status.truncated && !status.complete(), "{status:?}");
    assert!(status.records >= 1);

    // A queue too small for any record: records are dropped, not waited for.
    let tmp2 = TempDir::new("queue");
    let tiny = Recorder::new(RecordingConfig {
        max_queued_bytes: 10,
        ..config(&tmp2.0)
    })
    .unwrap();
    let s = tiny.open_session(info("s-queue"));
    assert!(!s.record(exchange(0)));
    assert_eq!(s.status().dropped, 1);
    drop(s);
    assert!(tiny.flush_blocking(WAIT));
    let end = Sessions::open(&tmp2.0)
        .show("s-queue")
        .unwrap()
        .end
        .unwrap();
    assert_eq!((end.records, end.dropped), (0, 1));
    assert_eq!(tiny.stats().records_dropped, 1);
}

#[test]
fn a_session_that_cannot_be_created_fails_quietly() {
    let tmp = TempDir::new("fail");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    // The day directory's place is taken by a file.
    std::fs::write(tmp.0.join("2026-03-04"), b"").unwrap();
    let session = recorder.open_session(info("s-fail"));
    assert!(recorder.flush_blocking(WAIT));
    assert!(session.status().failed);
    assert!(!session.record(exchange(0)));
    assert!(!session.status().complete());
    assert_eq!(recorder.stats().sessions_failed, 1);
}

#[test]
fn disabled_handles_record_nothing() {
    let session = SessionHandle::disabled();
    assert!(!session.record(exchange(0)));
    let stream = session.stream("a", &StreamProtocol::Spdy);
    stream.frame(Direction::Stdout, b"x");
    assert_eq!(session.id(), "");
}

/// A stream recorded through the taps, as the proxy's splice would feed them.
fn record_exec(recorder: &Recorder, id: &str) {
    let session = recorder.open_session(info(id));
    let protocol =
        StreamProtocol::negotiated(Some("websocket"), Some("v5.channel.k8s.io"), Some("exec"));
    let stream = session.stream("audit-exec", &protocol);
    let (mut up, mut down) = RemoteCommandTap::pair(stream);
    let mask = Some([9, 8, 7, 6]);
    let msg = |channel: u8, data: &[u8]| [&[channel][..], data].concat();
    down.observe(&ws_frame(true, 2, &msg(1, b"$ "), None));
    std::thread::sleep(Duration::from_millis(15));
    let typed = ws_frame(true, 2, &msg(0, b"ls\n"), mask);
    up.observe(&typed[..3]);
    up.observe(&typed[3..]);
    up.observe(&ws_frame(
        true,
        2,
        &msg(4, br#"{"Width":80,"Height":24}"#),
        mask,
    ));
    std::thread::sleep(Duration::from_millis(15));
    let out = ws_frame(true, 2, &msg(1, b"a.txt\r\nb.txt\r\n"), None);
    down.observe(&out[..7]);
    down.observe(&out[7..]);
    down.observe(&ws_frame(true, 2, &msg(2, b"warning\r\n"), None));
    down.observe(&ws_frame(
        true,
        2,
        &msg(3, br#"{"status":"Success"}"#),
        None,
    ));
    drop((up, down));
    session.record(Exchange {
        audit_id: "audit-exec".into(),
        verb: "create".into(),
        request_uri: "/api/v1/namespaces/agents/pods/p/exec?command=sh&stdin=true&tty=true".into(),
        response_status: Some(ResponseStatus {
            code: 101,
            ..Default::default()
        }),
        ..Default::default()
    });
    drop(session);
    assert!(recorder.flush_blocking(WAIT));
}

#[test]
fn exec_streams_record_and_replay() {
    let tmp = TempDir::new("exec");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    record_exec(&recorder, "s-exec");
    let sessions = Sessions::open(&tmp.0);

    let frames: Vec<Frame> = sessions
        .records("s-exec")
        .unwrap()
        .iter()
        .filter_map(Record::frame)
        .collect();
    let dirs: Vec<Direction> = frames.iter().map(|f| f.dir).collect();
    use Direction::*;
    assert_eq!(dirs, [Stdout, Stdin, Resize, Stdout, Stdout, Stderr, Error]);
    // A read that held only part of a frame's header records nothing; each read that
    // carries payload records what it carried.
    assert_eq!(frames[1].data.as_deref(), Some("ls\n"));
    assert_eq!(
        frames[2].data.as_deref(),
        Some(r#"{"Width":80,"Height":24}"#)
    );
    assert_eq!(frames[3].data.as_deref(), Some("a.tx"));
    assert!(frames[3].t >= frames[0].t + 30, "{frames:?}");
    let detail = sessions.show("s-exec").unwrap();
    assert_eq!(detail.streams.len(), 1);
    assert!(detail.streams[0].ended && detail.streams[0].decoded);
    assert!(sessions.verify("s-exec").unwrap().clean());

    // Speed 0: no sleeping; stdout and stderr in order, stdin and the rest left out.
    let mut out = Vec::new();
    let mut sleeps = Vec::new();
    let options = ReplayOptions {
        speed: 0.0,
        ..Default::default()
    };
    let summary = sessions
        .replay_with("s-exec", &options, &mut out, |d| sleeps.push(d))
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "$ a.txt\r\nb.txt\r\nwarning\r\n"
    );
    assert!(sleeps.is_empty());
    assert_eq!(summary.streams, ["audit-exec"]);

    // Speed 1: the pauses add up to the last output frame's time.
    let mut sleeps = Vec::new();
    sessions
        .replay_with("s-exec", &ReplayOptions::default(), &mut Vec::new(), |d| {
            sleeps.push(d)
        })
        .unwrap();
    let last_t = frames
        .iter()
        .filter(|f| matches!(f.dir, Stdout | Stderr))
        .map(|f| f.t)
        .max()
        .unwrap();
    assert_eq!(
        sleeps.iter().sum::<Duration>(),
        Duration::from_millis(last_t)
    );
    assert!(last_t >= 30, "{last_t}");

    let missing = ReplayOptions {
        audit_id: Some("other".into()),
        ..Default::default()
    };
    assert!(matches!(
        sessions.replay_with("s-exec", &missing, &mut Vec::new(), |_| {}),
        Err(RecordingError::NoStream { .. })
    ));
}

fn set_age(path: &Path, now: SystemTime, age: Duration) {
    let file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.set_modified(now - age).unwrap();
}

#[test]
fn retention_prunes_by_age_then_size_and_spares_open_sessions() {
    let tmp = TempDir::new("retention");
    let day = Duration::from_secs(24 * 3600);
    let recorder = Recorder::new(RecordingConfig {
        retention_max_age: Some(30 * day),
        retention_max_total_bytes: None,
        ..config(&tmp.0)
    })
    .unwrap();
    let now = SystemTime::now();
    let ancient = write_session(&recorder, "s-ancient", 1);
    let old = write_session(&recorder, "s-old", 1);
    let new = write_session(&recorder, "s-new", 1);
    let open = recorder.open_session(info("s-open"));
    open.record(exchange(0));
    assert!(recorder.flush_blocking(WAIT));
    let open_path = open.path().unwrap().to_owned();
    set_age(&ancient, now, 60 * day);
    set_age(&old, now, 10 * day);
    set_age(&new, now, day);
    set_age(&open_path, now, 90 * day);

    // By age: the ancient one goes; the open one, older still, stays.
    let report = recorder.prune(now).unwrap();
    assert_eq!(report.deleted, std::slice::from_ref(&ancient));
    assert!(!ancient.exists() && open_path.exists());
    assert_eq!(report.kept, 2);

    // By size: the oldest go until what is left fits (the open session counts).
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    let policy = RetentionPolicy {
        max_age: None,
        max_total_bytes: Some(size(&new) + size(&open_path)),
    };
    let open_set = [open_path.clone()].into_iter().collect();
    let old_size = size(&old);
    let report = prune_dir(&tmp.0, policy, now, &open_set).unwrap();
    assert_eq!(report.deleted, std::slice::from_ref(&old));
    assert_eq!(report.freed_bytes, old_size);
    assert!(new.exists() && open_path.exists());
    drop(open);
    assert!(recorder.flush_blocking(WAIT));
    assert_eq!(Sessions::open(&tmp.0).list().unwrap().len(), 2);
}

#[test]
fn an_undecodable_direction_is_recorded_opaque_from_then_on() {
    let tmp = TempDir::new("opaque");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    let session = recorder.open_session(info("s-opaque"));
    let protocol =
        StreamProtocol::negotiated(Some("websocket"), Some("v4.channel.k8s.io"), Some("attach"));
    let (_up, mut down) = RemoteCommandTap::pair(session.stream("audit-a", &protocol));
    down.observe(&ws_frame(true, 2, b"\x01ok", None));
    let mut compressed = ws_frame(true, 2, b"\x01zz", None);
    compressed[0] |= 0x40;
    down.observe(&compressed);
    down.observe(b"more");
    drop((_up, down, session));
    assert!(recorder.flush_blocking(WAIT));
    let frames: Vec<Frame> = Sessions::open(&tmp.0)
        .records("s-opaque")
        .unwrap()
        .iter()
        .filter_map(Record::frame)
        .collect();
    let got: Vec<(Direction, Vec<u8>)> =
        frames.iter().map(|f| (f.dir, f.bytes().unwrap())).collect();
    assert_eq!(
        got,
        [
            (Direction::Stdout, b"ok".to_vec()),
            (Direction::Out, b"more".to_vec())
        ]
    );
}

#[test]
fn stream_cap_truncates_with_one_marker() {
    let tmp = TempDir::new("stream-cap");
    let recorder = Recorder::new(RecordingConfig {
        max_stream_bytes: 10,
        ..config(&tmp.0)
    })
    .unwrap();
    let session = recorder.open_session(info("s-scap"));
    let stream = session.stream("audit-s", &StreamProtocol::Spdy);
    for _ in 0..5 {
        stream.frame(Direction::Out, b"abcd");
    }
    drop((stream, session));
    assert!(recorder.flush_blocking(WAIT));
    let records = Sessions::open(&tmp.0).records("s-scap").unwrap();
    let kinds: Vec<Kind> = records.iter().map(|r| r.kind).collect();
    use Kind::*;
    assert_eq!(
        kinds,
        [StreamStart, Frame, Frame, StreamTruncated, StreamEnd, End]
    );
    let end: format::StreamEnd = records[4].parse().unwrap();
    assert_eq!(
        (end.frames, end.bytes, end.omitted_frames, end.omitted_bytes),
        (2, 8, 3, 12)
    );
    let mut sleeps = 0;
    let summary = Sessions::open(&tmp.0)
        .replay_with("s-scap", &ReplayOptions::default(), &mut Vec::new(), |_| {
            sleeps += 1
        })
        .unwrap();
    assert_eq!((summary.opaque.len(), summary.frames, sleeps), (1, 0, 0));
}

#[tokio::test]
async fn splice_forwards_both_ways_and_records() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = TempDir::new("splice");
    let recorder = Recorder::new(config(&tmp.0)).unwrap();
    let session = recorder.open_session(info("s-splice"));
    let protocol =
        StreamProtocol::negotiated(Some("websocket"), Some("v5.channel.k8s.io"), Some("exec"));
    let (up, down) = RemoteCommandTap::pair(session.stream("audit-x", &protocol));

    let (mut client, proxy_client) = tokio::io::duplex(64);
    let (proxy_upstream, mut server) = tokio::io::duplex(64);
    let splice = tokio::spawn(splice_recorded(proxy_client, proxy_upstream, up, down));

    let typed = ws_frame(true, 2, b"\x00echo hi\n", Some([1, 2, 3, 4]));
    client.write_all(&typed).await.unwrap();
    let mut got = vec![0u8; typed.len()];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(got, typed);
    let answer = ws_frame(true, 2, b"\x01hi\n", None);
    server.write_all(&answer).await.unwrap();
    let mut got = vec![0u8; answer.len()];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, answer);
    drop(client);
    drop(server);
    let (to_server, to_client) = splice.await.unwrap().unwrap_or((0, 0));
    assert!(to_server <= typed.len() as u64 && to_client <= answer.len() as u64);
    drop(session);
    recorder.flush().await;

    let frames: Vec<Frame> = Sessions::open(&tmp.0)
        .records("s-splice")
        .unwrap()
        .iter()
        .filter_map(Record::frame)
        .collect();
    let got: Vec<(Direction, String)> = frames
        .iter()
        .map(|f| (f.dir, f.data.clone().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (Direction::Stdin, "echo hi\n".into()),
            (Direction::Stdout, "hi\n".into())
        ]
    );
}
