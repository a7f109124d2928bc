//! The reviewers' REST API against the real API server: the server runs in this test
//! process on 127.0.0.1 (an embedded store of its own, a certificate from the cluster
//! CA), and TokenReview and SubjectAccessReview go to the test control plane, so the
//! cluster's RBAC decides exactly as it would for a deployed agent.
//!
//! Approvals are put straight into the store: what is tested here is reviewing them,
//! not holding calls (suite `approvals` does that end to end).
//!
//! Reviewers are service accounts. A policy step names the group
//! `system:serviceaccounts:<ns>`, so accounts of the scene's namespace may review and
//! accounts of another namespace are outsiders even when RBAC lets them in.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_agent::api::{ApiArgs, ApiState};
use gateway_agent::approvals::model::*;
use gateway_agent::approvals::store::embedded::EmbeddedStore;
use gateway_agent::approvals::Store;
use hyper::{Method, Request};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::{json, Value};
use tollgate_tests::cluster::{Cluster, TestNamespace};

const AGENT: &str = env!("CARGO_BIN_EXE_tg-agent");

/// The API server of one test, on loopback.
struct Server {
    url: String,
    ca: PathBuf,
    state: Arc<ApiState>,
    store: Store,
    task: tokio::task::JoinHandle<()>,
    dir: PathBuf,
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
        "tollgate-api-test-{}-{}",
        std::process::id(),
        new_id()
    ));
    std::fs::create_dir_all(&dir).expect("test directory");
    let pki = cluster.layout.pki();
    // Issued from the cluster CA like the agent's own, so the CLI's default CA (the
    // kubeconfig cluster's) verifies it.
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
    let state = Arc::new(
        ApiState::from_args(
            &args,
            store.clone(),
            cluster.client().await.expect("client"),
        )
        .await
        .expect("API state"),
    );
    let tls = args
        .tls_config(&issued.cert, &issued.key)
        .expect("TLS config");
    // Loopback only (network-safety rule).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let url = format!("https://{}", listener.local_addr().expect("address"));
    let task = tokio::spawn(gateway_agent::api::serve(listener, tls, state.clone()));
    Server {
        url,
        ca: pki.join("ca.crt"),
        state,
        store,
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

/// The answer, or the Status `(code, reason, message)` the server sent.
type Answer = Result<Value, (u16, String, String)>;

async fn send(client: &kube::Client, method: Method, path: &str, body: Option<Value>) -> Answer {
    let mut request = Request::builder().method(method).uri(path);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    match client
        .request_text(request.body(body).expect("request"))
        .await
    {
        Ok(text) => Ok(serde_json::from_str(&text).expect("JSON answer")),
        Err(kube::Error::Api(status)) => Err((status.code, status.reason, status.message)),
        Err(other) => panic!("{method_path}: {other}", method_path = path),
    }
}

async fn get(client: &kube::Client, path: &str) -> Answer {
    send(client, Method::GET, path, None).await
}

async fn decide(client: &kube::Client, id: &str, verb: &str, reason: Option<&str>) -> Answer {
    let body = reason.map(|r| json!({ "reason": r }));
    send(
        client,
        Method::POST,
        &format!("/api/v1/approvals/{id}/{verb}"),
        body,
    )
    .await
}

fn refused(answer: Answer, code: u16, needle: &str) {
    match answer {
        Err((c, reason, message)) => {
            assert_eq!(c, code, "{reason}: {message}");
            assert!(
                message.contains(needle),
                "expected {needle:?} in {reason}: {message}"
            );
        }
        Ok(value) => panic!("expected {code}, got {value}"),
    }
}

/// The scene: a namespace with the requesting account `agent` and reviewer accounts.
struct Scene {
    ns: TestNamespace,
}

impl Scene {
    async fn new() -> Scene {
        let ns = Cluster::shared()
            .namespace("tg-api")
            .await
            .expect("namespace");
        ns.service_account("agent").await.expect("agent account");
        Scene { ns }
    }

    fn group(&self) -> String {
        format!("system:serviceaccounts:{}", self.ns.name)
    }

    fn requester(&self) -> String {
        format!("system:serviceaccount:{}:agent", self.ns.name)
    }

    /// An account of the scene's namespace; reviewer rights when `granted`. Its token.
    async fn account(&self, name: &str, granted: bool) -> String {
        self.ns.service_account(name).await.expect("account");
        if granted {
            self.ns
                .grant(name, &format!("review-{name}"), reviewer_rules())
                .await
                .expect("reviewer role");
        }
        self.ns.token(name, &[], None).await.expect("token")
    }

    /// A pending approval of a ConfigMap create by `agent`, one step for the scene's
    /// group.
    async fn approval(&self, store: &Store) -> ApprovalRequest {
        let ns = &self.ns.name;
        let approval = ApprovalRequest {
            id: new_id(),
            spec: ApprovalSpec {
                requester: Requester {
                    user: self.requester(),
                    uid: String::new(),
                    groups: vec![self.group()],
                    pod_namespace: ns.clone(),
                    pod_name: "agent-0".into(),
                    node: "node-1".into(),
                    session: String::new(),
                },
                request: HeldRequest {
                    audit_id: new_id(),
                    verb: "create".into(),
                    method: "POST".into(),
                    uri: format!("/api/v1/namespaces/{ns}/configmaps"),
                    api_group: String::new(),
                    api_version: "v1".into(),
                    resource: "configmaps".into(),
                    subresource: String::new(),
                    namespace: ns.clone(),
                    name: "settings".into(),
                    content_type: "application/json".into(),
                    body_sha256: "0".repeat(64),
                    fingerprint: new_id(),
                },
                rule: "writes-need-review".into(),
                mode: Mode::Hold,
                execute_as: None,
                steps: vec![StepSpec {
                    name: "team".into(),
                    groups: vec![self.group()],
                    approvals: 1,
                }],
                created_at: now_rfc3339(),
                // Nothing expires approvals in this server (the agent's sweep does).
                expires_at: now_rfc3339(),
                dry_run: Some(DryRun {
                    object: Some(json!({"kind": "ConfigMap", "data": {"mode": "fast"}})),
                    diff: "+kind: ConfigMap\n+data:\n+  mode: fast\n".into(),
                    note: String::new(),
                }),
            },
            status: ApprovalStatus::default(),
        };
        store.create(approval).await.expect("approval stored")
    }
}

/// The rights `deploy/reviewer-rbac.yaml` gives: read and decide on approvals.
fn reviewer_rules() -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec!["tollgate.dev".into()]),
        resources: Some(vec!["approvalrequests".into()]),
        verbs: ["get", "list", "watch", "approve", "deny"]
            .iter()
            .map(|v| v.to_string())
            .collect(),
        ..PolicyRule::default()
    }]
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_without_a_valid_token_or_rights_get_statuses() {
    let server = start_server().await;
    let scene = Scene::new().await;
    let approval = scene.approval(&server.store).await;

    refused(
        get(&client(&server, None), "/api/v1/approvals").await,
        401,
        "no credential",
    );
    refused(
        get(&client(&server, Some("garbage")), "/api/v1/approvals").await,
        401,
        "Unauthorized",
    );
    let nobody = client(&server, Some(&scene.account("nobody", false).await));
    refused(
        get(&nobody, "/api/v1/approvals").await,
        403,
        "cannot list resource \"approvalrequests\" in API group \"tollgate.dev\"",
    );
    refused(
        get(&nobody, &format!("/api/v1/approvals/{}", approval.id)).await,
        403,
        "cannot get",
    );
    refused(
        decide(&nobody, &approval.id, "approve", Some("why not")).await,
        403,
        "cannot approve",
    );
    // Nothing changed.
    let stored = server.store.get(&approval.id).await.unwrap().unwrap();
    assert_eq!(stored.status.state, State::Pending);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_granted_reviewer_lists_shows_and_approves() {
    let server = start_server().await;
    let scene = Scene::new().await;
    let first = scene.approval(&server.store).await;
    let second = scene.approval(&server.store).await;
    let reviewer = client(&server, Some(&scene.account("reviewer", true).await));

    let listed = get(&reviewer, "/api/v1/approvals?state=pending")
        .await
        .unwrap();
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&first.id.as_str()) && ids.contains(&second.id.as_str()),
        "{ids:?}"
    );

    let shown = get(&reviewer, &format!("/api/v1/approvals/{}", first.id))
        .await
        .unwrap();
    assert_eq!(
        shown["spec"]["dryRun"]["diff"],
        "+kind: ConfigMap\n+data:\n+  mode: fast\n"
    );
    assert_eq!(shown["spec"]["requester"]["user"], scene.requester());

    // Deny needs a reason; a bad body is a 400 too.
    refused(
        decide(&reviewer, &second.id, "deny", None).await,
        400,
        "reason",
    );
    refused(
        send(
            &reviewer,
            Method::POST,
            &format!("/api/v1/approvals/{}/deny", second.id),
            Some(json!(["not", "an", "object"])),
        )
        .await,
        400,
        "reason",
    );

    let approved = decide(&reviewer, &first.id, "approve", Some("looks right"))
        .await
        .unwrap();
    assert_eq!(approved["status"]["state"], "Approved");
    let decision = &approved["status"]["decisions"][0];
    assert_eq!(
        decision["reviewer"],
        format!("system:serviceaccount:{}:reviewer", scene.ns.name)
    );
    assert_eq!(decision["reason"], "looks right");
    // Once decided, never again.
    refused(
        decide(&reviewer, &first.id, "deny", Some("changed my mind")).await,
        409,
        "already Approved",
    );
    let denied = decide(&reviewer, &second.id, "deny", Some("not this week"))
        .await
        .unwrap();
    assert_eq!(denied["status"]["state"], "Denied");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_requester_and_outsiders_cannot_approve() {
    let server = start_server().await;
    let scene = Scene::new().await;
    let approval = scene.approval(&server.store).await;

    // The requesting account itself, with reviewer rights: still not its own reviewer.
    let agent_token = {
        scene
            .ns
            .grant("agent", "review-agent", reviewer_rules())
            .await
            .expect("role");
        scene.ns.token("agent", &[], None).await.expect("token")
    };
    refused(
        decide(
            &client(&server, Some(&agent_token)),
            &approval.id,
            "approve",
            None,
        )
        .await,
        403,
        "cannot review",
    );

    // An account of another namespace that RBAC lets review here: not in the step's
    // group.
    let elsewhere = Cluster::shared()
        .namespace("tg-api-out")
        .await
        .expect("namespace");
    elsewhere
        .service_account("outsider")
        .await
        .expect("account");
    bind_reviewer_role(&scene.ns, &elsewhere.name, "outsider").await;
    let outsider = client(
        &server,
        Some(&elsewhere.token("outsider", &[], None).await.expect("token")),
    );
    // RBAC lets the outsider read...
    get(&outsider, &format!("/api/v1/approvals/{}", approval.id))
        .await
        .expect("the outsider may read");
    // ...but the policy's step does not count them.
    refused(
        decide(&outsider, &approval.id, "approve", Some("lgtm")).await,
        403,
        "is in none of the groups of step 0",
    );
    let stored = server.store.get(&approval.id).await.unwrap().unwrap();
    assert_eq!(stored.status.state, State::Pending);
    assert!(stored.status.decisions.is_empty());
}

/// A Role with the reviewer rules in `ns`, bound to service account `from_ns/name`.
async fn bind_reviewer_role(ns: &TestNamespace, from_ns: &str, name: &str) {
    let role_name = format!("review-{from_ns}-{name}");
    Api::<Role>::namespaced(ns.client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &Role {
                metadata: ObjectMeta {
                    name: Some(role_name.clone()),
                    ..Default::default()
                },
                rules: Some(reviewer_rules()),
            },
        )
        .await
        .expect("role");
    Api::<RoleBinding>::namespaced(ns.client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some(role_name.clone()),
                    ..Default::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: role_name,
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: name.into(),
                    namespace: Some(from_ns.into()),
                    ..Default::default()
                }]),
            },
        )
        .await
        .expect("role binding");
}

/// The next line of a watch, as JSON.
async fn next_event<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut tokio::io::Lines<R>) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("a watch event in time")
        .expect("reading the CLI")
        .expect("the watch goes on");
    serde_json::from_str(&line).expect("a JSON event")
}

/// `tg-agent approvals watch -o json` as the reviewer: the CLI's watch against the
/// server's, line by line.
#[tokio::test(flavor = "multi_thread")]
async fn watch_delivers_a_new_approval_and_ends_with_its_client() {
    use tokio::io::AsyncBufReadExt;

    let server = start_server().await;
    let scene = Scene::new().await;
    let existing = scene.approval(&server.store).await;
    let token = scene.account("reviewer", true).await;
    let mut child = tokio::process::Command::new(AGENT)
        .args(["approvals", "watch", "--state", "pending", "-o", "json"])
        .args(["--server", &server.url, "--token", &token])
        .arg("--certificate-authority")
        .arg(&server.ca)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("CLI watch starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = next_event(&mut lines).await;
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["id"], existing.id.as_str());
    assert_eq!(server.state.active_watches(), 1);

    let created = scene.approval(&server.store).await;
    let second = next_event(&mut lines).await;
    assert_eq!(second["type"], "ADDED");
    assert_eq!(second["object"]["id"], created.id.as_str());
    assert_eq!(second["object"]["status"]["state"], "Pending");

    // The reviewer goes away: the server notices the closed connection.
    child.kill().await.expect("CLI stops");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.state.active_watches() > 0 {
        assert!(
            Instant::now() < deadline,
            "the watch outlived its client's connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_is_public_and_lists_every_route() {
    let server = start_server().await;
    let doc = get(&client(&server, None), "/api/v1/openapi.json")
        .await
        .expect("openapi.json without a token");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/api/v1/approvals", "get"),
        ("/api/v1/approvals/{id}", "get"),
        ("/api/v1/approvals/{id}/approve", "post"),
        ("/api/v1/approvals/{id}/deny", "post"),
        ("/api/v1/openapi.json", "get"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} missing");
    }
    assert!(doc["components"]["schemas"]["Status"].is_object());
    // Hostile paths are plain 404 Statuses.
    let anyone = client(&server, None);
    for path in [
        "/api/v1/approvals/../openapi.json",
        "/api/v1/approvals/ar-XYZ",
        "/api/v2/approvals",
        "/",
    ] {
        refused(get(&anyone, path).await, 404, "could not find");
    }
    refused(
        send(&anyone, Method::DELETE, "/api/v1/approvals", None).await,
        405,
        "not allowed",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_lists_shows_and_approves_with_a_token() {
    let server = start_server().await;
    let scene = Scene::new().await;
    let approval = scene.approval(&server.store).await;
    let token = scene.account("reviewer", true).await;
    let kubeconfig = Cluster::shared().kubeconfig();
    let cli = |args: &[&str], token: &str| {
        let mut cmd = tokio::process::Command::new(AGENT);
        cmd.arg("approvals")
            .args(args)
            .args(["--server", &server.url, "--token", token])
            // The admin kubeconfig's cluster CA is the default CA: no
            // --certificate-authority needed.
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env_remove("TOLLGATE_SERVER")
            .env_remove("TOLLGATE_TOKEN");
        async move { cmd.output().await.expect("CLI runs") }
    };
    let text = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    let out = cli(&["list"], &token).await;
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains(&approval.id), "{table}");
    assert!(table.contains("configmaps"), "{table}");

    let out = cli(&["list", "--state", "pending", "-o", "json"], &token).await;
    assert!(out.status.success(), "{}", text(&out));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON list");
    assert_eq!(listed["items"][0]["id"], approval.id.as_str());

    let out = cli(&["show", &approval.id], &token).await;
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.contains("+  mode: fast"), "{shown}");
    assert!(shown.contains("<- current"), "{shown}");

    let out = cli(&["approve", &approval.id, "--reason", "ship it"], &token).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("approved; now Approved"),
        "{}",
        text(&out)
    );
    let stored = server.store.get(&approval.id).await.unwrap().unwrap();
    assert_eq!(stored.status.state, State::Approved);
    assert_eq!(stored.status.decisions[0].reason, "ship it");

    // Installed as a kubectl plugin, found by kubectl on PATH.
    let plugins = server.dir.join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugin directory");
    std::os::unix::fs::symlink(AGENT, plugins.join("kubectl-tollgate")).expect("symlink");
    let path = format!(
        "{}:{}",
        plugins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new("kubectl")
        .args(["tollgate", "approvals", "list", "--state", "approved"])
        .args(["--server", &server.url, "--token", &token])
        .arg("--certificate-authority")
        .arg(&server.ca)
        .env("PATH", path)
        .output()
        .await
        .expect("kubectl runs");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&approval.id),
        "{}",
        text(&out)
    );

    // A refusal prints the server's Status and exits 1.
    let nobody = scene.account("nobody", false).await;
    let out = cli(&["list"], &nobody).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("Error from server (Forbidden)"),
        "{}",
        text(&out)
    );
}
