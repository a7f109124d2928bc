//! The recorded-sessions routes of the reviewers' REST API against the real API server:
//! the server runs in this test process on 127.0.0.1 (a certificate from the cluster
//! CA), serving a sessions directory of its own, and TokenReview and SubjectAccessReview
//! go to the test control plane, so the cluster's RBAC on `sessions.tollgate.dev`
//! decides exactly as it would for a deployed agent.
//!
//! Sessions are written in process by the real recorder, for pods of two namespaces:
//! what is tested here is reading them (suite `recording` records real kubectl calls
//! through the proxy).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gateway_agent::api::{ApiArgs, ApiState};
use gateway_agent::approvals::model::new_id;
use gateway_agent::approvals::store::embedded::EmbeddedStore;
use gateway_agent::approvals::Store;
use gateway_agent::recording::{
    Action, Body, Decision, Exchange, ObjectRef, Recorder, RecordingConfig, ResponseStatus,
    SessionInfo, Sessions, SyncPolicy, Timestamp, UserInfo,
};
use hyper::Request;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use serde_json::{json, Value};
use tollgate_tests::cluster::{Cluster, TestNamespace};

/// The API server of one test, on loopback, with its sessions directory.
struct Server {
    url: String,
    ca: PathBuf,
    task: tokio::task::JoinHandle<()>,
    dir: PathBuf,
}

impl Server {
    fn sessions(&self) -> PathBuf {
        self.dir.join("sessions")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_server() -> Server {
    let cluster = Cluster::shared();
    let dir = std::env::temp_dir().join(format!(
        "tollgate-sessions-api-test-{}-{}",
        std::process::id(),
        new_id()
    ));
    std::fs::create_dir_all(&dir).expect("test directory");
    let pki = cluster.layout.pki();
    let issued = gateway_agent::certs::issue(&gateway_agent::certs::IssueRequest {
        ca_cert: pki.join("ca.crt"),
        ca_key: pki.join("ca.key"),
        out_dir: dir.join("tls"),
        cluster_ip: "10.96.0.1".parse().expect("address"),
        cluster_domain: "cluster.local".into(),
        extra_sans: vec!["127.0.0.1".into()],
        validity: Duration::from_secs(86_400),
    })
    .expect("serving certificate");
    let store =
        Store::Embedded(EmbeddedStore::open(&dir.join("approvals.redb")).expect("embedded store"));
    let args = ApiArgs::default();
    let state = ApiState::from_args(&args, store, cluster.client().await.expect("client"))
        .await
        .expect("API state")
        .with_sessions(dir.join("sessions"));
    let tls = args
        .tls_config(&issued.cert, &issued.key)
        .expect("TLS config");
    // Loopback only (network-safety rule).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let url = format!("https://{}", listener.local_addr().expect("address"));
    let task = tokio::spawn(gateway_agent::api::serve(listener, tls, Arc::new(state)));
    Server {
        url,
        ca: pki.join("ca.crt"),
        task,
        dir,
    }
}

/// A kube client for the Tollgate API with `token` (or none).
fn client(server: &Server, token: Option<&str>) -> kube::Client {
    let mut config = kube::Config::new(server.url.parse().expect("URL"));
    let pem = std::fs::read(&server.ca).expect("CA");
    config.root_cert = Some(
        rustls_pemfile::certs(&mut pem.as_slice())
            .map(|c| c.expect("CA certificate").to_vec())
            .collect(),
    );
    if let Some(token) = token {
        config.auth_info = serde_json::from_value(json!({ "token": token })).expect("auth info");
    }
    kube::Client::try_from(config).expect("client")
}

/// The answer's text, or the Status `(code, reason, message)` the server sent.
type Answer = Result<String, (u16, String, String)>;

async fn fetch(client: &kube::Client, path: &str, accept: Option<&str>) -> Answer {
    let mut request = Request::get(path);
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    match client
        .request_text(request.body(Vec::new()).expect("request"))
        .await
    {
        Ok(text) => Ok(text),
        Err(kube::Error::Api(status)) => Err((status.code, status.reason, status.message)),
        Err(other) => panic!("{path}: {other}"),
    }
}

/// The JSON answer, or the Status.
async fn get(client: &kube::Client, path: &str) -> Result<Value, (u16, String, String)> {
    fetch(client, path, None)
        .await
        .map(|text| serde_json::from_str(&text).expect("JSON answer"))
}

fn refused<T: std::fmt::Debug>(answer: Result<T, (u16, String, String)>, code: u16, needle: &str) {
    match answer {
        Err((c, reason, message)) => {
            assert_eq!(c, code, "{reason}: {message}");
            assert!(
                message.contains(needle),
                "expected {needle:?} in {reason}: {message}"
            );
        }
        Ok(value) => panic!("expected {code}, got {value:?}"),
    }
}

fn ids(list: &Value) -> Vec<String> {
    assert_eq!(list["kind"], "SessionList", "{list}");
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_owned())
        .collect()
}

/// The `n`th exchange an agent pod of `namespace` made: a ConfigMap read whose answer
/// carries a marker to find in the records.
fn exchange(namespace: &str, n: usize) -> Exchange {
    let t = Timestamp::now();
    Exchange {
        audit_id: format!("{namespace}-audit-{n}"),
        request_received_timestamp: t,
        response_started_timestamp: Some(t),
        stage_timestamp: t,
        user: UserInfo {
            username: format!("system:serviceaccount:{namespace}:agent"),
            groups: vec!["system:serviceaccounts".into()],
            ..Default::default()
        },
        source_ips: vec!["10.0.0.7".into()],
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
            rule: Some("read-configmaps".into()),
            reason: None,
        },
        response_object: Body::JsonText(Bytes::from(format!(
            r#"{{"kind":"ConfigMap","metadata":{{"name":"c{n}"}},"data":{{"marker":"m-{namespace}-{n}"}}}}"#
        ))),
        ..Default::default()
    }
}

/// Records one closed session per `(id, namespace, exchanges)` under `dir`, with the
/// recorder the agent uses, and waits until they are on disk.
async fn record(dir: &Path, sessions: &[(&str, &str, usize)]) {
    let recorder = Recorder::new(RecordingConfig {
        sync: SyncPolicy::Never,
        ..RecordingConfig::new(dir, "node-1")
    })
    .expect("recorder");
    for (id, namespace, n) in sessions {
        let session = recorder.open_session(SessionInfo {
            id: (*id).to_owned(),
            pod_namespace: (*namespace).to_owned(),
            pod_name: "agent-0".into(),
            pod_uid: new_id(),
            pod_service_account: "agent".into(),
            peer: "10.0.0.7:41000".into(),
            api_server: "10.96.0.1:443".into(),
            started_at: Timestamp::default(),
        });
        for i in 0..*n {
            assert!(session.record(exchange(namespace, i)), "record queued");
        }
        // Dropping the last handle closes the session with its `end` record.
    }
    recorder.shutdown().await;
}

/// The rights the reviewer ClusterRole of `deploy/reviewer-rbac.yaml` gives on sessions.
fn session_reader_rules() -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec!["tollgate.dev".into()]),
        resources: Some(vec!["sessions".into()]),
        verbs: vec!["get".into(), "list".into()],
        ..PolicyRule::default()
    }]
}

/// The scene: namespaces A and B, each with one session of its agent pod (A: 3
/// exchanges, B: 2), recorded on the server's node.
struct Scene {
    a: TestNamespace,
    b: TestNamespace,
    session_a: String,
    session_b: String,
}

impl Scene {
    async fn new(server: &Server) -> Scene {
        let cluster = Cluster::shared();
        let a = cluster.namespace("tg-sess-a").await.expect("namespace A");
        let b = cluster.namespace("tg-sess-b").await.expect("namespace B");
        let session_a = format!("conn-{}", new_id());
        let session_b = format!("conn-{}", new_id());
        record(
            &server.sessions(),
            &[(&session_a, &a.name, 3), (&session_b, &b.name, 2)],
        )
        .await;
        Scene {
            a,
            b,
            session_a,
            session_b,
        }
    }

    /// A service account of namespace A allowed to read A's sessions; its token.
    async fn reviewer_of_a(&self) -> String {
        self.a
            .service_account("reviewer")
            .await
            .expect("reviewer account");
        self.a
            .grant("reviewer", "read-sessions", session_reader_rules())
            .await
            .expect("reviewer role");
        self.a.token("reviewer", &[], None).await.expect("token")
    }
}

/// A ClusterRole and ClusterRoleBinding (cluster objects: namespaces do not take them
/// along), deleted by [`ClusterGrant::remove`], or when dropped by a failing test.
struct ClusterGrant {
    /// Empty once removed.
    name: String,
}

impl ClusterGrant {
    /// Lets service account `ns/sa` read every namespace's sessions.
    async fn sessions_reader(ns: &TestNamespace, sa: &str) -> ClusterGrant {
        let name = format!("tollgate-test-sessions-{}", ns.name);
        let grant = ClusterGrant { name: name.clone() };
        Api::<ClusterRole>::all(ns.client.clone())
            .create(
                &PostParams::default(),
                &ClusterRole {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    rules: Some(session_reader_rules()),
                    ..Default::default()
                },
            )
            .await
            .expect("cluster role");
        Api::<ClusterRoleBinding>::all(ns.client.clone())
            .create(
                &PostParams::default(),
                &ClusterRoleBinding {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "ClusterRole".into(),
                        name,
                    },
                    subjects: Some(vec![Subject {
                        kind: "ServiceAccount".into(),
                        name: sa.into(),
                        namespace: Some(ns.name.clone()),
                        ..Default::default()
                    }]),
                },
            )
            .await
            .expect("cluster role binding");
        grant
    }

    async fn remove(mut self) {
        let name = std::mem::take(&mut self.name);
        let client = Cluster::shared().client().await.expect("client");
        Api::<ClusterRoleBinding>::all(client.clone())
            .delete(&name, &DeleteParams::default())
            .await
            .expect("deleting the cluster role binding");
        Api::<ClusterRole>::all(client)
            .delete(&name, &DeleteParams::default())
            .await
            .expect("deleting the cluster role");
    }
}

impl Drop for ClusterGrant {
    /// On a failed test: delete with kubectl, which needs no runtime.
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        for kind in ["clusterrolebinding", "clusterrole"] {
            let _ =
                Cluster::shared().kubectl_ok(&["delete", kind, &self.name, "--ignore-not-found"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_without_a_valid_token_or_rights_get_statuses() {
    let server = start_server().await;
    let scene = Scene::new(&server).await;
    let session_a = format!("/api/v1/sessions/{}", scene.session_a);

    for path in ["/api/v1/sessions", &session_a] {
        refused(
            get(&client(&server, None), path).await,
            401,
            "no credential",
        );
        refused(
            get(&client(&server, Some("garbage")), path).await,
            401,
            "Unauthorized",
        );
    }
    scene.a.service_account("nobody").await.expect("account");
    let nobody = client(
        &server,
        Some(&scene.a.token("nobody", &[], None).await.expect("token")),
    );
    refused(
        get(&nobody, "/api/v1/sessions").await,
        403,
        "cannot list resource \"sessions\" in API group \"tollgate.dev\"",
    );
    refused(get(&nobody, &session_a).await, 403, "cannot get");
    refused(
        fetch(&nobody, &format!("{session_a}/records"), None).await,
        403,
        "cannot get",
    );
    // Approvals rights are not session rights.
    scene
        .a
        .grant(
            "nobody",
            "review-approvals",
            vec![PolicyRule {
                api_groups: Some(vec!["tollgate.dev".into()]),
                resources: Some(vec!["approvalrequests".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..PolicyRule::default()
            }],
        )
        .await
        .expect("approvals role");
    // Past the authorizer's cache of the refusal.
    tokio::time::sleep(Duration::from_secs(3)).await;
    refused(
        get(&nobody, &session_a).await,
        403,
        "cannot get resource \"sessions\"",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_reviewer_sees_its_namespace_only() {
    let server = start_server().await;
    let scene = Scene::new(&server).await;
    let reviewer = client(&server, Some(&scene.reviewer_of_a().await));

    let listed = get(&reviewer, "/api/v1/sessions").await.expect("list");
    assert_eq!(ids(&listed), std::slice::from_ref(&scene.session_a));
    let item = &listed["items"][0];
    assert_eq!(item["pod"]["namespace"], scene.a.name.as_str());
    assert_eq!(item["pod"]["name"], "agent-0");
    assert_eq!(item["node"], "node-1");
    assert_eq!(item["records"], 3, "three exchanges (the end not counted)");
    assert_eq!(item["state"], "closed");
    assert_eq!(item["complete"], true);
    assert!(item.get("file").is_none(), "no node paths: {item}");
    let filtered = get(
        &reviewer,
        &format!("/api/v1/sessions?namespace={}&pod=agent-0", scene.a.name),
    )
    .await
    .expect("filtered list");
    assert_eq!(ids(&filtered), std::slice::from_ref(&scene.session_a));

    let shown = get(&reviewer, &format!("/api/v1/sessions/{}", scene.session_a))
        .await
        .expect("show");
    assert_eq!(shown["kind"], "Session");
    assert_eq!(shown["header"]["pod"]["namespace"], scene.a.name.as_str());
    assert_eq!(shown["exchanges"].as_array().expect("exchanges").len(), 3);
    assert_eq!(
        shown["exchanges"][2]["requestURI"],
        format!("/api/v1/namespaces/{}/configmaps/c2", scene.a.name)
    );
    assert_eq!(shown["verify"]["ok"], true, "{}", shown["verify"]);
    assert_eq!(shown["verify"]["tail"], "closed");

    let records = get(
        &reviewer,
        &format!("/api/v1/sessions/{}/records", scene.session_a),
    )
    .await
    .expect("records");
    assert_eq!(records.as_array().expect("an array").len(), 4);

    // B's session, every way.
    let b_path = format!("/api/v1/sessions/{}", scene.session_b);
    refused(
        get(&reviewer, &b_path).await,
        403,
        "cannot get resource \"sessions\"",
    );
    refused(
        get(&reviewer, &b_path).await,
        403,
        &format!("in the namespace {:?}", scene.b.name),
    );
    refused(
        fetch(&reviewer, &format!("{b_path}/records"), None).await,
        403,
        "cannot get",
    );
    refused(
        get(
            &reviewer,
            &format!("/api/v1/sessions?namespace={}", scene.b.name),
        )
        .await,
        403,
        "cannot list",
    );
    // A session that does not exist looks like one the reviewer may not see.
    refused(
        get(&reviewer, "/api/v1/sessions/conn-none").await,
        403,
        "cannot get",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_wide_reader_sees_every_namespace() {
    let server = start_server().await;
    let scene = Scene::new(&server).await;
    scene.b.service_account("auditor").await.expect("account");
    let grant = ClusterGrant::sessions_reader(&scene.b, "auditor").await;
    let auditor = client(
        &server,
        Some(&scene.b.token("auditor", &[], None).await.expect("token")),
    );

    let listed = get(&auditor, "/api/v1/sessions").await.expect("list");
    let mut seen = ids(&listed);
    seen.sort();
    let mut want = vec![scene.session_a.clone(), scene.session_b.clone()];
    want.sort();
    assert_eq!(seen, want);
    for (id, namespace, exchanges) in [
        (&scene.session_a, &scene.a.name, 3),
        (&scene.session_b, &scene.b.name, 2),
    ] {
        let shown = get(&auditor, &format!("/api/v1/sessions/{id}"))
            .await
            .expect("show");
        assert_eq!(shown["header"]["pod"]["namespace"], namespace.as_str());
        assert_eq!(
            shown["exchanges"].as_array().expect("exchanges").len(),
            exchanges
        );
        let records = get(&auditor, &format!("/api/v1/sessions/{id}/records"))
            .await
            .expect("records");
        assert_eq!(records.as_array().expect("array").len(), exchanges + 1);
    }
    // Only a cluster-wide reader learns that an id does not exist.
    refused(
        get(&auditor, "/api/v1/sessions/conn-none").await,
        404,
        "not found",
    );
    grant.remove().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn records_are_exactly_what_was_written() {
    let server = start_server().await;
    let scene = Scene::new(&server).await;
    let reviewer = client(&server, Some(&scene.reviewer_of_a().await));
    let path = format!("/api/v1/sessions/{}/records", scene.session_a);
    let on_disk: Vec<Value> = Sessions::open(server.sessions())
        .records(&scene.session_a)
        .expect("records on disk")
        .into_iter()
        .map(|r| r.value)
        .collect();

    let array = get(&reviewer, &path).await.expect("records as JSON");
    let array = array.as_array().expect("a JSON array").clone();
    assert_eq!(array, on_disk);
    // Request by request, what the recorder was given.
    for (n, record) in array.iter().take(3).enumerate() {
        assert_eq!(record["seq"], n);
        assert_eq!(record["kind"], "exchange");
        assert_eq!(record["auditID"], format!("{}-audit-{n}", scene.a.name));
        assert_eq!(
            record["requestURI"],
            format!("/api/v1/namespaces/{}/configmaps/c{n}", scene.a.name)
        );
        assert_eq!(record["responseStatus"]["code"], 200);
        assert_eq!(record["decision"]["action"], "allow");
        assert_eq!(
            record["responseObject"]["data"]["marker"],
            format!("m-{}-{n}", scene.a.name)
        );
        assert!(record["hash"].is_string() && record["prevHash"].is_string());
    }
    assert_eq!(array[3]["kind"], "end");
    assert_eq!(array[3]["records"], 3);

    let text = fetch(&reviewer, &path, Some("application/x-ndjson"))
        .await
        .expect("records as NDJSON");
    assert!(text.ends_with('\n'), "{text}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
        .collect();
    assert_eq!(lines, on_disk);
    // Byte for byte as the file holds them (the header line aside), so a client can
    // check the hash chain itself.
    let file = Sessions::open(server.sessions())
        .find(&scene.session_a)
        .expect("session file");
    let written = std::fs::read_to_string(&file).expect("session file");
    let written: Vec<&str> = written.lines().skip(1).collect();
    assert_eq!(text.lines().collect::<Vec<_>>(), written);

    refused(
        fetch(&reviewer, &path, Some("text/html")).await,
        406,
        "x-ndjson",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_session_fails_verify_naming_the_record() {
    let server = start_server().await;
    let scene = Scene::new(&server).await;
    let reviewer = client(&server, Some(&scene.reviewer_of_a().await));
    let file = Sessions::open(server.sessions())
        .find(&scene.session_a)
        .expect("session file");
    // One byte of the answer recorded in seq 1 (line 3: the header is line 1).
    let text = std::fs::read_to_string(&file).expect("session file");
    let marker = format!("m-{}-1", scene.a.name);
    assert_eq!(text.matches(&marker).count(), 1, "{text}");
    let forged = marker.replacen("m-", "M-", 1);
    std::fs::write(&file, text.replacen(&marker, &forged, 1)).expect("tampering");

    let shown = get(&reviewer, &format!("/api/v1/sessions/{}", scene.session_a))
        .await
        .expect("show");
    let verify = &shown["verify"];
    assert_eq!(verify["ok"], false, "{verify}");
    assert_eq!(verify["firstBad"]["at"], 1, "{verify}");
    assert_eq!(verify["firstBad"]["line"], 3, "{verify}");
    assert_eq!(verify["firstBad"]["problem"], "changed", "{verify}");
    assert_eq!(verify["records"], 1, "seq 0 verified before it");
    // The other session is untouched.
    let b = Sessions::open(server.sessions())
        .verify(&scene.session_b)
        .expect("verify B");
    assert!(b.clean(), "{b:?}");
}
