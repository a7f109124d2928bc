//! The sessions endpoints in process: sessions written by the real recorder into a
//! fresh directory, read through the real routing and handlers; RBAC from the parent's
//! fake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::super::auth::Authenticator;
use super::super::authz::{Authorizer, CacheConfig, SESSIONS};
use super::super::{handle, ApiState, Limits};
use super::{assert_status, call, user, Rbac, Tokens};
use crate::approvals::store::embedded::EmbeddedStore;
use crate::approvals::Store;
use crate::recording::{
    Action, Body, Decision, Exchange, ObjectRef, Recorder, RecordingConfig, ResponseStatus,
    SessionInfo, Sessions, SyncPolicy, Timestamp, UserInfo,
};

const WAIT: Duration = Duration::from_secs(10);

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-api-sessions-{name}-{}-{}",
            std::process::id(),
            crate::approvals::model::new_id()
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

/// The state (its approval store under `root`), serving the sessions under
/// `root/sessions` when `recording`.
struct Fixture {
    state: Arc<ApiState>,
    root: TempDir,
}

impl Fixture {
    fn sessions(&self) -> PathBuf {
        self.root.0.join("sessions")
    }
}

fn fixture_with(recording: bool, limits: Limits) -> Fixture {
    let root = TempDir::new("api");
    let store = Store::Embedded(EmbeddedStore::open(&root.0.join("approvals.redb")).unwrap());
    let tokens = Tokens(std::collections::HashMap::from([
        ("admin", user("admin", &[])),
        ("lead", user("lead", &[])),
        ("nobody", user("nobody", &[])),
        ("approver", user("approver", &[])),
    ]));
    let rbac = Rbac(vec![
        ("admin", "*", "*", ""),
        ("lead", SESSIONS, "get", "agents"),
        ("lead", SESSIONS, "list", "agents"),
        // Approvals rights are not session rights.
        ("approver", super::APPROVALS, "*", ""),
    ]);
    let mut state = ApiState::new(
        store,
        Authenticator::new(Arc::new(tokens), None),
        Authorizer::new(Box::new(rbac), CacheConfig::default()),
    )
    .with_limits(limits);
    if recording {
        state = state.with_sessions(root.0.join("sessions"));
    }
    Fixture {
        state: Arc::new(state),
        root,
    }
}

fn fixture(limits: Limits) -> Fixture {
    fixture_with(true, limits)
}

fn info(id: &str, namespace: &str, pod: &str, started: &str) -> SessionInfo {
    SessionInfo {
        id: id.into(),
        pod_namespace: namespace.into(),
        pod_name: pod.into(),
        pod_uid: format!("uid-{pod}"),
        pod_service_account: "agent".into(),
        peer: "10.0.0.7:41000".into(),
        api_server: "10.96.0.1:443".into(),
        started_at: Timestamp::parse(started).unwrap(),
    }
}

fn exchange(namespace: &str, n: usize, padding: usize) -> Exchange {
    let t = Timestamp::parse("2026-03-04T05:06:08Z").unwrap();
    Exchange {
        audit_id: format!("audit-{n}"),
        request_received_timestamp: t,
        stage_timestamp: t,
        user: UserInfo {
            username: format!("system:serviceaccount:{namespace}:agent"),
            ..Default::default()
        },
        verb: "get".into(),
        request_uri: format!("/api/v1/namespaces/{namespace}/configmaps/c{n}"),
        object_ref: Some(ObjectRef {
            resource: Some("configmaps".into()),
            namespace: Some(namespace.into()),
            name: Some(format!("c{n}")),
            api_version: Some("v1".into()),
            ..Default::default()
        }),
        response_status: Some(ResponseStatus {
            code: 200,
            ..Default::default()
        }),
        decision: Decision {
            action: Action::Allow,
            rule: Some("read".into()),
            reason: None,
        },
        response_object: Body::JsonText(Bytes::from(format!(
            r#"{{"kind":"ConfigMap","data":{{"pad":"{}"}}}}"#,
            "x".repeat(padding)
        ))),
        ..Default::default()
    }
}

/// Writes closed sessions `(id, namespace, pod, started, exchanges)` with the recorder.
async fn record(dir: &Path, sessions: &[(&str, &str, &str, &str, usize)], padding: usize) {
    let recorder = Recorder::new(RecordingConfig {
        sync: SyncPolicy::Never,
        ..RecordingConfig::new(dir, "node-a")
    })
    .unwrap();
    for (id, namespace, pod, started, n) in sessions {
        let session = recorder.open_session(info(id, namespace, pod, started));
        for i in 0..*n {
            assert!(session.record(exchange(namespace, i, padding)));
        }
    }
    recorder.shutdown().await;
}

/// The fixture's usual sessions: two in `agents`, one in `elsewhere`.
async fn usual(f: &Fixture) {
    record(
        &f.sessions(),
        &[
            ("s-old", "agents", "coder-0", "2026-03-01T00:00:00Z", 2),
            ("s-new", "agents", "coder-1", "2026-03-03T00:00:00Z", 3),
            ("s-other", "elsewhere", "coder-0", "2026-03-02T00:00:00Z", 1),
        ],
        10,
    )
    .await;
}

fn ids(a: &super::Answer) -> Vec<String> {
    a.json["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", a.json))
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn get(state: &Arc<ApiState>, uri: &str, token: &str) -> super::Answer {
    call(state, Method::GET, uri, Some(token), "").await
}

/// A raw answer: status, headers and body bytes.
async fn raw(
    state: &Arc<ApiState>,
    uri: &str,
    token: &str,
    accept: Option<&str>,
) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    let mut request = Request::get(uri).header("authorization", format!("Bearer {token}"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = handle(state, request.body(Full::new(Bytes::new())).unwrap()).await;
    let code = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (code, headers, body.to_vec())
}

#[tokio::test]
async fn without_a_sessions_directory_the_routes_say_so() {
    let f = fixture_with(false, Limits::default());
    let state = &f.state;
    for uri in [
        "/api/v1/sessions",
        "/api/v1/sessions/s-1",
        "/api/v1/sessions/s-1/records",
    ] {
        let a = get(state, uri, "admin").await;
        assert_status(&a, 404, "NotFound");
        assert_eq!(
            a.json["message"], "session recording is not enabled on this agent",
            "{uri}"
        );
    }
    // Authentication still comes first.
    let a = call(state, Method::GET, "/api/v1/sessions", None, "").await;
    assert_status(&a, 401, "Unauthorized");
}

#[tokio::test]
async fn before_anything_is_recorded_there_is_nothing() {
    // The directory does not exist until the recorder makes it.
    let f = fixture(Limits::default());
    let a = get(&f.state, "/api/v1/sessions", "admin").await;
    assert_eq!(a.code, StatusCode::OK, "{}", a.json);
    assert_eq!(ids(&a), Vec::<String>::new());
    let a = get(&f.state, "/api/v1/sessions/s-1", "admin").await;
    assert_status(&a, 404, "NotFound");
    let a = get(&f.state, "/api/v1/sessions/s-1", "lead").await;
    assert_status(&a, 403, "Forbidden");
}

#[tokio::test]
async fn lists_are_newest_first_filtered_and_limited_by_rbac() {
    let f = fixture(Limits::default());
    usual(&f).await;
    let a = get(&f.state, "/api/v1/sessions", "admin").await;
    assert_eq!(a.code, StatusCode::OK, "{}", a.json);
    assert_eq!(a.json["kind"], "SessionList");
    assert_eq!(ids(&a), ["s-new", "s-other", "s-old"]);
    let first = &a.json["items"][0];
    assert_eq!(first["pod"]["namespace"], "agents");
    assert_eq!(first["pod"]["name"], "coder-1");
    assert_eq!(first["records"], 3);
    assert_eq!(first["state"], "closed");
    assert!(first.get("file").is_none(), "no node paths: {first}");

    let a = get(&f.state, "/api/v1/sessions", "lead").await;
    assert_eq!(ids(&a), ["s-new", "s-old"]);
    let a = get(&f.state, "/api/v1/sessions?pod=coder-0", "admin").await;
    assert_eq!(ids(&a), ["s-other", "s-old"]);
    let a = get(
        &f.state,
        "/api/v1/sessions?namespace=agents&pod=coder-0",
        "lead",
    )
    .await;
    assert_eq!(ids(&a), ["s-old"]);
    let a = get(&f.state, "/api/v1/sessions?namespace=elsewhere", "lead").await;
    assert_status(&a, 403, "Forbidden");
    assert!(
        a.json["message"]
            .as_str()
            .unwrap()
            .contains("cannot list resource \"sessions\" in API group \"tollgate.dev\" in the namespace \"elsewhere\""),
        "{}",
        a.json
    );
    for who in ["nobody", "approver"] {
        let a = get(&f.state, "/api/v1/sessions", who).await;
        assert_status(&a, 403, "Forbidden");
    }
    let a = get(&f.state, "/api/v1/sessions?limit=1", "admin").await;
    assert_status(&a, 400, "BadRequest");
}

#[tokio::test]
async fn show_has_header_summary_exchanges_and_verdict() {
    let f = fixture(Limits::default());
    usual(&f).await;
    let a = get(&f.state, "/api/v1/sessions/s-new", "lead").await;
    assert_eq!(a.code, StatusCode::OK, "{}", a.json);
    assert_eq!(a.json["kind"], "Session");
    assert_eq!(a.json["id"], "s-new");
    assert_eq!(a.json["header"]["pod"]["namespace"], "agents");
    assert_eq!(a.json["header"]["node"], "node-a");
    assert_eq!(a.json["summary"]["records"], 3);
    assert!(a.json["summary"].get("file").is_none());
    assert_eq!(a.json["exchanges"].as_array().unwrap().len(), 3);
    assert_eq!(a.json["verify"]["ok"], true);
    assert_eq!(a.json["verify"]["tail"], "closed");
    assert!(a.json["verify"]["firstBad"].is_null());
    assert!(a.json["verify"].get("file").is_none());

    let a = get(&f.state, "/api/v1/sessions/s-other", "lead").await;
    assert_status(&a, 403, "Forbidden");
    assert_eq!(a.json["details"]["name"], "s-other");
    assert_eq!(a.json["details"]["kind"], "sessions");
    // A missing id: 404 for whoever could read it anywhere, 403 for the others.
    let a = get(&f.state, "/api/v1/sessions/s-none", "admin").await;
    assert_status(&a, 404, "NotFound");
    assert_eq!(a.json["details"]["kind"], "sessions");
    let a = get(&f.state, "/api/v1/sessions/s-none", "lead").await;
    assert_status(&a, 403, "Forbidden");
    let a = get(&f.state, "/api/v1/sessions/s-none/records", "lead").await;
    assert_status(&a, 403, "Forbidden");
    let a = get(&f.state, "/api/v1/sessions/s-new?x=1", "lead").await;
    assert_status(&a, 400, "BadRequest");
}

#[tokio::test]
async fn hostile_ids_never_reach_the_disk() {
    let f = fixture(Limits::default());
    usual(&f).await;
    // A file beside the sessions directory that a traversal would find.
    std::fs::write(f.root.0.join("secret.jsonl"), b"{}\n").unwrap();
    for uri in [
        "/api/v1/sessions/..",
        "/api/v1/sessions/../secret",
        "/api/v1/sessions/..%2fsecret",
        "/api/v1/sessions/%2e%2e%2fsecret/records",
        "/api/v1/sessions/.hidden",
        "/api/v1/sessions/s-new/../s-other",
    ] {
        let a = get(&f.state, uri, "admin").await;
        assert_status(&a, 404, "NotFound");
        assert_eq!(
            a.json["message"], "the server could not find the requested resource",
            "{uri}"
        );
    }
}

#[tokio::test]
async fn records_are_exactly_what_was_written_as_json_or_ndjson() {
    let f = fixture(Limits::default());
    usual(&f).await;
    let written: Vec<Value> = Sessions::open(f.sessions())
        .records("s-new")
        .unwrap()
        .into_iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(written.len(), 4, "three exchanges and the end");

    let (code, headers, body) = raw(&f.state, "/api/v1/sessions/s-new/records", "lead", None).await;
    assert_eq!(code, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/json");
    let array: Vec<Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(array, written);
    assert_eq!(array[0]["seq"], 0);
    assert_eq!(array[0]["auditID"], "audit-0");
    assert_eq!(array[3]["kind"], "end");

    let (code, headers, body) = raw(
        &f.state,
        "/api/v1/sessions/s-new/records",
        "lead",
        Some("application/x-ndjson"),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines, written);

    let (code, _, _) = raw(
        &f.state,
        "/api/v1/sessions/s-new/records",
        "lead",
        Some("text/html"),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_ACCEPTABLE);
    let a = get(&f.state, "/api/v1/sessions/s-other/records", "lead").await;
    assert_status(&a, 403, "Forbidden");
    // The reader's place is given back when its thread ends, which may be a moment
    // after the client has the whole answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while f.state.active_record_streams() != 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(f.state.active_record_streams(), 0);
}

#[tokio::test]
async fn a_tampered_session_names_its_record() {
    let f = fixture(Limits::default());
    usual(&f).await;
    let file = Sessions::open(f.sessions()).find("s-new").unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    // seq 1 is the third line: change one byte of its body.
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_owned).collect();
    lines[2] = lines[2].replacen("xxxxxxxxxx", "xxxxxxxxxy", 1);
    std::fs::write(&file, lines.concat()).unwrap();
    let a = get(&f.state, "/api/v1/sessions/s-new", "admin").await;
    assert_eq!(a.code, StatusCode::OK, "{}", a.json);
    assert_eq!(a.json["verify"]["ok"], false);
    assert_eq!(a.json["verify"]["firstBad"]["at"], 1);
    assert_eq!(a.json["verify"]["firstBad"]["line"], 3);
    assert_eq!(a.json["verify"]["firstBad"]["problem"], "changed");
}

#[tokio::test]
async fn a_garbled_header_is_shown_only_cluster_wide_with_its_verdict() {
    let f = fixture(Limits::default());
    usual(&f).await;
    let file = Sessions::open(f.sessions()).find("s-old").unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let (_, rest) = text.split_once('\n').unwrap();
    std::fs::write(&file, format!("not a header\n{rest}")).unwrap();
    // Its namespace is unknown: the lead of `agents` may not see it any more.
    let a = get(&f.state, "/api/v1/sessions/s-old", "lead").await;
    assert_status(&a, 403, "Forbidden");
    let a = get(&f.state, "/api/v1/sessions", "lead").await;
    assert_eq!(ids(&a), ["s-new"]);
    let a = get(&f.state, "/api/v1/sessions/s-old", "admin").await;
    assert_eq!(a.code, StatusCode::OK, "{}", a.json);
    assert!(a.json["unreadable"].is_string(), "{}", a.json);
    assert_eq!(a.json["verify"]["firstBad"]["at"], "header");
}

#[tokio::test]
async fn record_streams_are_bounded() {
    let f = fixture(Limits {
        max_record_streams: 0,
        ..Limits::default()
    });
    usual(&f).await;
    let a = get(&f.state, "/api/v1/sessions/s-new/records", "admin").await;
    assert_status(&a, 429, "TooManyRequests");
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(a.json["details"]["retryAfterSeconds"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_short_and_frees_its_reader() {
    let f = fixture(Limits {
        stream_stall_timeout: Duration::from_millis(200),
        ..Limits::default()
    });
    // About 2 MiB of records: far more than the queued chunks hold.
    record(
        &f.sessions(),
        &[("s-big", "agents", "coder-0", "2026-03-01T00:00:00Z", 256)],
        8 * 1024,
    )
    .await;
    let request = Request::get("/api/v1/sessions/s-big/records")
        .header("authorization", "Bearer admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = handle(&f.state, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(f.state.active_record_streams(), 1);
    // Nobody reads: the reader gives up after the stall timeout.
    let deadline = std::time::Instant::now() + WAIT;
    while f.state.active_record_streams() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the reader never gave up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What was queued is there, then an error: never a whole-looking answer.
    let mut body = response.into_body();
    let mut received = 0;
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len()),
            Some(Err(err)) => break err,
            None => panic!("the answer ended as if whole after {received} bytes"),
        }
    };
    assert!(received < 1 << 20, "{received} bytes");
    assert!(error.to_string().contains("cut short"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_session_streams_whole() {
    let f = fixture(Limits::default());
    record(
        &f.sessions(),
        &[("s-big", "agents", "coder-0", "2026-03-01T00:00:00Z", 256)],
        8 * 1024,
    )
    .await;
    let request = Request::get("/api/v1/sessions/s-big/records")
        .header("authorization", "Bearer lead")
        .header("accept", "application/x-ndjson")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = handle(&f.state, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let (mut frames, mut largest, mut lines) = (0, 0, 0);
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        frames += 1;
        largest = largest.max(data.len());
        lines += data.iter().filter(|b| **b == b'\n').count();
    }
    assert_eq!(lines, 257, "256 exchanges and the end");
    assert!(frames > 10, "sent in chunks, not at once ({frames})");
    assert!(largest < 128 * 1024, "chunks stay small ({largest})");
}

/// Every member of `value` is a property of `schema` in openapi.json.
fn assert_documented(schema: &str, value: &Value) {
    let doc: Value = serde_json::from_str(super::super::openapi::DOCUMENT).unwrap();
    let properties = doc["components"]["schemas"][schema]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema {schema}"));
    for field in value.as_object().unwrap().keys() {
        assert!(
            properties.contains_key(field),
            "schema {schema} lacks field {field}"
        );
    }
}

#[tokio::test]
async fn the_openapi_schemas_name_every_field_sent() {
    let f = fixture(Limits::default());
    usual(&f).await;
    let list = get(&f.state, "/api/v1/sessions", "admin").await;
    assert_documented("SessionList", &list.json);
    assert_documented("SessionSummary", &list.json["items"][0]);
    assert_documented("PodRef", &list.json["items"][0]["pod"]);
    let shown = get(&f.state, "/api/v1/sessions/s-new", "admin").await;
    for (schema, value) in [
        ("Session", &shown.json),
        ("SessionSummary", &shown.json["summary"]),
        ("SessionHeader", &shown.json["header"]),
        ("ExchangeSummary", &shown.json["exchanges"][0]),
        ("AuditUser", &shown.json["exchanges"][0]["user"]),
        ("RecordedDecision", &shown.json["exchanges"][0]["decision"]),
        ("SessionEnd", &shown.json["end"]),
        ("VerifyReport", &shown.json["verify"]),
    ] {
        assert_documented(schema, value);
    }
    // A failing verdict, and the unreadable form.
    let file = Sessions::open(f.sessions()).find("s-old").unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replacen("\"seq\":1", "\"seq\":7", 1)).unwrap();
    let shown = get(&f.state, "/api/v1/sessions/s-old", "admin").await;
    assert_documented("BadRecord", &shown.json["verify"]["firstBad"]);
    std::fs::write(&file, format!("garbage\n{text}")).unwrap();
    let shown = get(&f.state, "/api/v1/sessions/s-old", "admin").await;
    assert_documented("Session", &shown.json);
    assert_documented("BadRecord", &shown.json["verify"]["firstBad"]);
}
