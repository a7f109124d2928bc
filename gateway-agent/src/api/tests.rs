//! The API end to end in process: real routing, handlers and embedded store; TokenReview
//! and SubjectAccessReview answered by small fakes that model RBAC.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use super::auth::{Authenticator, Caller, ReviewTokens};
use super::authz::{
    Access, AccessReviewer, Attributes, Authorizer, AuthzError, CacheConfig, APPROVALS,
};
use super::oidc::tests::{claims, temp_file, TestKey, ISSUER};
use super::oidc::{KeySource, OidcVerifier};
use super::{handle, ApiState, Limits};
use crate::approvals::model::*;
use crate::approvals::store::embedded::EmbeddedStore;
use crate::approvals::Store;
use crate::identity::{IdentityError, Review, UserInfo};

mod sessions;

const REQUESTER: &str = "system:serviceaccount:agents:coder";

/// Tokens → users.
struct Tokens(HashMap<&'static str, UserInfo>);

impl ReviewTokens for Tokens {
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Review, IdentityError>> + Send + 'a>> {
        Box::pin(async move {
            Ok(match self.0.get(token) {
                Some(user) => Review::Authenticated(user.clone()),
                None => Review::Rejected("token not recognised".into()),
            })
        })
    }
}

/// RBAC in miniature: (user, resource, verb, namespace) grants; `*` is any resource or
/// verb; namespace "" is cluster-wide and covers every namespace, as a
/// ClusterRoleBinding does.
struct Rbac(Vec<(&'static str, &'static str, &'static str, &'static str)>);

impl AccessReviewer for Rbac {
    fn review<'a>(
        &'a self,
        caller: &'a Caller,
        a: &'a Attributes,
    ) -> Pin<Box<dyn Future<Output = Result<Access, AuthzError>> + Send + 'a>> {
        let allowed = self.0.iter().any(|(user, resource, verb, ns)| {
            *user == caller.username
                && (*resource == a.resource || *resource == "*")
                && (*verb == a.verb || *verb == "*")
                && (ns.is_empty() || *ns == a.namespace)
        });
        Box::pin(async move {
            Ok(Access {
                allowed,
                reason: String::new(),
            })
        })
    }
}

fn user(name: &str, groups: &[&str]) -> UserInfo {
    UserInfo {
        username: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..UserInfo::default()
    }
}

struct Fixture {
    state: Arc<ApiState>,
    store: Store,
    key: TestKey,
}

async fn fixture() -> Fixture {
    let path = temp_file("approvals.redb", "");
    std::fs::remove_file(&path).unwrap();
    let store = Store::Embedded(EmbeddedStore::open(&path).unwrap());
    let tokens = Tokens(HashMap::from([
        ("admin", user("admin", &["reviewers"])),
        ("lead", user("lead", &["reviewers"])),
        ("nobody", user("nobody", &["reviewers"])),
        ("outsider", user("outsider", &["other"])),
        ("coder", user(REQUESTER, &["reviewers"])),
    ]));
    let rbac = Rbac(vec![
        ("admin", "*", "*", ""),
        ("lead", APPROVALS, "get", "agents"),
        ("lead", APPROVALS, "list", "agents"),
        ("lead", APPROVALS, "watch", "agents"),
        ("lead", APPROVALS, "approve", "agents"),
        ("lead", APPROVALS, "deny", "agents"),
        ("outsider", APPROVALS, "*", ""),
        (REQUESTER, APPROVALS, "*", ""),
        ("https://issuer.test#alice", APPROVALS, "*", ""),
    ]);
    let key = TestKey::generate("k1");
    let jwks = temp_file("jwks.json", &super::oidc::tests::jwks(&[&key]));
    let oidc = OidcVerifier::new(super::oidc::tests::config(KeySource::File(jwks))).await;
    let state = ApiState::new(
        store.clone(),
        Authenticator::new(Arc::new(tokens), Some(oidc)),
        Authorizer::new(Box::new(rbac), CacheConfig::default()),
    )
    .with_limits(Limits {
        max_body_bytes: 1024,
        ..Limits::default()
    });
    Fixture {
        state: Arc::new(state),
        store,
        key,
    }
}

fn approval(namespace: &str) -> ApprovalRequest {
    ApprovalRequest {
        id: new_id(),
        spec: ApprovalSpec {
            requester: Requester {
                user: REQUESTER.into(),
                uid: String::new(),
                groups: vec![],
                pod_namespace: namespace.into(),
                pod_name: "coder-0".into(),
                node: "node-1".into(),
                session: String::new(),
            },
            request: HeldRequest {
                audit_id: "a".into(),
                verb: "create".into(),
                method: "POST".into(),
                uri: format!("/api/v1/namespaces/{namespace}/configmaps"),
                api_group: String::new(),
                api_version: "v1".into(),
                resource: "configmaps".into(),
                subresource: String::new(),
                namespace: namespace.into(),
                name: "settings".into(),
                content_type: "application/json".into(),
                body_sha256: "0".into(),
                fingerprint: new_id(),
            },
            rule: "needs-review".into(),
            mode: Mode::Hold,
            execute_as: None,
            steps: vec![StepSpec {
                name: String::new(),
                groups: vec!["reviewers".into()],
                approvals: 1,
            }],
            created_at: now_rfc3339(),
            expires_at: now_rfc3339(),
            dry_run: Some(DryRun {
                object: None,
                diff: "+data:\n+  a: b\n".into(),
                note: String::new(),
            }),
        },
        status: ApprovalStatus::default(),
    }
}

struct Answer {
    code: StatusCode,
    headers: HeaderMap,
    json: Value,
}

async fn call(
    state: &Arc<ApiState>,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: &str,
) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if !body.is_empty() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = handle(state, request).await;
    let code = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        code,
        headers,
        json,
    }
}

fn assert_status(answer: &Answer, code: u16, reason: &str) {
    assert_eq!(answer.code.as_u16(), code, "{}", answer.json);
    assert_eq!(answer.json["kind"], "Status", "{}", answer.json);
    assert_eq!(answer.json["code"], code);
    assert_eq!(answer.json["reason"], reason, "{}", answer.json);
    assert!(answer.headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn authentication_is_required_except_for_the_openapi_document() {
    let f = fixture().await;
    let a = call(&f.state, Method::GET, "/api/v1/openapi.json", None, "").await;
    assert_eq!(a.code, StatusCode::OK);
    assert!(a.json["paths"]["/api/v1/approvals"].is_object());
    let a = call(&f.state, Method::GET, "/api/v1/approvals", None, "").await;
    assert_status(&a, 401, "Unauthorized");
    assert!(a.headers.contains_key("www-authenticate"));
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals",
        Some("garbage"),
        "",
    )
    .await;
    assert_status(&a, 401, "Unauthorized");
    assert!(a.json["message"]
        .as_str()
        .unwrap()
        .contains("not recognised"));
}

#[tokio::test]
async fn unknown_paths_and_methods_are_statuses() {
    let f = fixture().await;
    let a = call(&f.state, Method::GET, "/api/v1/nope", Some("admin"), "").await;
    assert_status(&a, 404, "NotFound");
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals/../../etc/passwd",
        None,
        "",
    )
    .await;
    assert_status(&a, 404, "NotFound");
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals/AR-1",
        Some("admin"),
        "",
    )
    .await;
    assert_status(&a, 404, "NotFound");
    let a = call(
        &f.state,
        Method::DELETE,
        "/api/v1/approvals",
        Some("admin"),
        "",
    )
    .await;
    assert_status(&a, 405, "MethodNotAllowed");
    assert_eq!(a.headers["allow"], "GET");
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals?sate=x",
        Some("admin"),
        "",
    )
    .await;
    assert_status(&a, 400, "BadRequest");
}

#[tokio::test]
async fn lists_are_filtered_by_rbac_namespaces() {
    let f = fixture().await;
    let mine = f.store.create(approval("agents")).await.unwrap();
    let other = f.store.create(approval("elsewhere")).await.unwrap();
    let ids = |a: &Answer| -> Vec<String> {
        a.json["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals",
        Some("admin"),
        "",
    )
    .await;
    assert_eq!(a.code, StatusCode::OK);
    let mut all = ids(&a);
    all.sort();
    let mut want = vec![other.id.clone(), mine.id.clone()];
    want.sort();
    assert_eq!(all, want);
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals?state=PENDING",
        Some("lead"),
        "",
    )
    .await;
    assert_eq!(ids(&a), std::slice::from_ref(&mine.id));
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals?state=approved",
        Some("lead"),
        "",
    )
    .await;
    // The lead's namespace holds no approved ones: allowed somewhere, so an empty list
    // would be right, but with nothing to look at RBAC cannot be asked per namespace...
    assert_status(&a, 403, "Forbidden");
    // ...unless the lead names the namespace: then RBAC is asked there.
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals?state=approved&namespace=agents",
        Some("lead"),
        "",
    )
    .await;
    assert_eq!(a.code, StatusCode::OK, "{}", a.json);
    assert!(ids(&a).is_empty());
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals?namespace=agents",
        Some("admin"),
        "",
    )
    .await;
    assert_eq!(
        ids(&a),
        std::slice::from_ref(&mine.id),
        "only that namespace"
    );
    for (query, code) in [("namespace=elsewhere", 403), ("namespace=Not_A_Name", 400)] {
        let a = call(
            &f.state,
            Method::GET,
            &format!("/api/v1/approvals?{query}"),
            Some("lead"),
            "",
        )
        .await;
        assert_eq!(a.code.as_u16(), code, "{query}: {}", a.json);
    }
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals",
        Some("nobody"),
        "",
    )
    .await;
    assert_status(&a, 403, "Forbidden");
    let message = a.json["message"].as_str().unwrap();
    assert!(
        message.contains("cannot list resource \"approvalrequests\" in API group \"tollgate.dev\""),
        "{message}"
    );
}

#[tokio::test]
async fn show_returns_the_whole_approval_and_hides_what_may_not_be_seen() {
    let f = fixture().await;
    let mine = f.store.create(approval("agents")).await.unwrap();
    let other = f.store.create(approval("elsewhere")).await.unwrap();
    let path = |id: &str| format!("/api/v1/approvals/{id}");
    let a = call(&f.state, Method::GET, &path(&mine.id), Some("lead"), "").await;
    assert_eq!(a.code, StatusCode::OK);
    assert_eq!(a.json["spec"]["dryRun"]["diff"], "+data:\n+  a: b\n");
    let a = call(&f.state, Method::GET, &path(&other.id), Some("lead"), "").await;
    assert_status(&a, 403, "Forbidden");
    assert_eq!(a.json["details"]["name"], other.id.as_str());
    // A missing id: 404 for whoever could read it anywhere, 403 for the others.
    let missing = "ar-0000000000000000";
    let a = call(&f.state, Method::GET, &path(missing), Some("admin"), "").await;
    assert_status(&a, 404, "NotFound");
    let a = call(&f.state, Method::GET, &path(missing), Some("lead"), "").await;
    assert_status(&a, 403, "Forbidden");
}

#[tokio::test]
async fn decisions_follow_the_rules_and_map_to_statuses() {
    let f = fixture().await;
    let a1 = f.store.create(approval("agents")).await.unwrap();
    let approve = format!("/api/v1/approvals/{}/approve", a1.id);
    let deny = format!("/api/v1/approvals/{}/deny", a1.id);
    // RBAC first.
    let a = call(&f.state, Method::POST, &approve, Some("nobody"), "").await;
    assert_status(&a, 403, "Forbidden");
    assert!(a.json["message"]
        .as_str()
        .unwrap()
        .contains("cannot approve"));
    // Then the model's rules.
    let a = call(&f.state, Method::POST, &approve, Some("coder"), "").await;
    assert_status(&a, 403, "Forbidden");
    assert!(a.json["message"]
        .as_str()
        .unwrap()
        .contains("cannot review"));
    let a = call(&f.state, Method::POST, &approve, Some("outsider"), "").await;
    assert_status(&a, 403, "Forbidden");
    assert!(a.json["message"]
        .as_str()
        .unwrap()
        .contains("none of the groups"));
    let a = call(&f.state, Method::POST, &deny, Some("lead"), "").await;
    assert_status(&a, 400, "BadRequest");
    let a = call(
        &f.state,
        Method::POST,
        &deny,
        Some("lead"),
        r#"{"reason": "#,
    )
    .await;
    assert_status(&a, 400, "BadRequest");
    let big = format!(r#"{{"reason": "{}"}}"#, "x".repeat(2000));
    let a = call(&f.state, Method::POST, &deny, Some("lead"), &big).await;
    assert_status(&a, 413, "RequestEntityTooLarge");
    // A good approval.
    let a = call(
        &f.state,
        Method::POST,
        &approve,
        Some("lead"),
        r#"{"reason":"ok"}"#,
    )
    .await;
    assert_eq!(a.code, StatusCode::OK, "{}", a.json);
    assert_eq!(a.json["status"]["state"], "Approved");
    assert_eq!(a.json["status"]["decisions"][0]["reviewer"], "lead");
    assert_eq!(a.json["status"]["decisions"][0]["reason"], "ok");
    // Decided: no more decisions.
    let a = call(
        &f.state,
        Method::POST,
        &deny,
        Some("admin"),
        r#"{"reason":"late"}"#,
    )
    .await;
    assert_status(&a, 409, "Conflict");
    // A denial with its reason.
    let a2 = f.store.create(approval("agents")).await.unwrap();
    let deny2 = format!("/api/v1/approvals/{}/deny", a2.id);
    let a = call(
        &f.state,
        Method::POST,
        &deny2,
        Some("lead"),
        r#"{"reason":"not today"}"#,
    )
    .await;
    assert_eq!(a.json["status"]["state"], "Denied");
    assert!(a.json["status"]["message"]
        .as_str()
        .unwrap()
        .contains("not today"));
}

#[tokio::test]
async fn oidc_tokens_are_reviewers_too() {
    let f = fixture().await;
    let a1 = f.store.create(approval("agents")).await.unwrap();
    let token = f.key.sign(&claims("alice", &["reviewers"]));
    let mut c = claims("alice", &["reviewers"]);
    c["exp"] = json!(jsonwebtoken::get_current_timestamp() - 600);
    let expired = f.key.sign(&c);
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals",
        Some(&expired),
        "",
    )
    .await;
    assert_status(&a, 401, "Unauthorized");
    assert!(a.json["message"].as_str().unwrap().contains("expired"));
    // The groups prefix makes the IdP's "reviewers" "oidc:reviewers": not the step's.
    let approve = format!("/api/v1/approvals/{}/approve", a1.id);
    let a = call(&f.state, Method::POST, &approve, Some(&token), "").await;
    assert_status(&a, 403, "Forbidden");
    assert!(a.json["message"]
        .as_str()
        .unwrap()
        .contains(&format!("{ISSUER}#alice")));
}

/// Reads watch lines until `n` have arrived (or fails after a few seconds).
async fn lines(body: &mut super::Body, n: usize) -> Vec<Value> {
    let mut buffer = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a watch event in time")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buffer.extend_from_slice(&data);
        }
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            out.push(serde_json::from_slice(&line).unwrap());
        }
    }
    out
}

async fn open_watch(state: &Arc<ApiState>, query: &str, token: &str) -> super::Body {
    let request = Request::get(format!("/api/v1/approvals?watch=true{query}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = handle(state, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body()
}

#[tokio::test]
async fn watch_sends_the_current_approvals_then_changes_and_ends_with_the_client() {
    let f = fixture().await;
    let before = f.store.create(approval("agents")).await.unwrap();
    f.store.create(approval("elsewhere")).await.unwrap();
    let mut body = open_watch(&f.state, "&state=pending", "lead").await;
    assert_eq!(f.state.active_watches(), 1);
    let first = lines(&mut body, 1).await;
    assert_eq!(first[0]["type"], "ADDED");
    assert_eq!(first[0]["object"]["id"], before.id.as_str());
    // A new one in the lead's namespace, one elsewhere (not shown), a decision.
    let added = f.store.create(approval("agents")).await.unwrap();
    f.store.create(approval("elsewhere")).await.unwrap();
    let approve = format!("/api/v1/approvals/{}/approve", added.id);
    let a = call(&f.state, Method::POST, &approve, Some("lead"), "").await;
    assert_eq!(a.code, StatusCode::OK);
    let next = lines(&mut body, 2).await;
    assert_eq!(next[0]["type"], "ADDED");
    assert_eq!(next[0]["object"]["id"], added.id.as_str());
    // It left the `pending` filter: told once, with its new state.
    assert_eq!(next[1]["type"], "MODIFIED");
    assert_eq!(next[1]["object"]["status"]["state"], "Approved");
    drop(body);
    for _ in 0..100 {
        if f.state.active_watches() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.state.active_watches(), 0, "the watch outlived its client");
    let a = call(
        &f.state,
        Method::GET,
        "/api/v1/approvals?watch=true",
        Some("nobody"),
        "",
    )
    .await;
    assert_status(&a, 403, "Forbidden");
}

#[tokio::test]
async fn a_watch_that_falls_behind_lists_again() {
    let f = fixture().await;
    let caller = Caller {
        username: "admin".into(),
        groups: vec!["reviewers".into()],
        ..Caller::default()
    };
    // A change feed of two, overrun before the watcher reads it.
    let (feed, changes) = tokio::sync::broadcast::channel(2);
    let mut created = Vec::new();
    for _ in 0..5 {
        let a = f.store.create(approval("agents")).await.unwrap();
        let _ = feed.send(a.clone());
        created.push(a);
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let mut watcher = super::watch::Watcher::new(f.state.clone(), caller, None);
    let task = tokio::spawn(async move {
        watcher
            .run(Vec::new(), changes, tx, Duration::from_secs(2))
            .await
    });
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let line = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event in time")
            .expect("the watch goes on");
        let event: Value = serde_json::from_slice(&line).unwrap();
        seen.push(event["object"]["id"].as_str().unwrap().to_owned());
    }
    seen.sort();
    let mut want: Vec<String> = created.iter().map(|a| a.id.clone()).collect();
    want.sort();
    assert_eq!(seen, want, "every approval arrives despite the overrun");
    drop(feed);
    task.await.unwrap();
}

#[test]
fn the_flag_defaults_are_the_default_args() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        api: super::ApiArgs,
    }
    let parsed = Cli::try_parse_from(["x"]).unwrap().api;
    assert_eq!(parsed, super::ApiArgs::default());
    assert_eq!(parsed.api_listen.to_string(), "0.0.0.0:15444");
    assert!(parsed.oidc_config().unwrap().is_none());
}

#[test]
fn oidc_flags_are_checked_together() {
    let args = |issuer: Option<&str>, audience: Option<&str>| super::ApiArgs {
        oidc_issuer_url: issuer.map(str::to_owned),
        oidc_audience: audience.map(str::to_owned),
        ..super::ApiArgs::default()
    };
    let config = args(Some(ISSUER), Some("tollgate"))
        .oidc_config()
        .unwrap()
        .unwrap();
    assert!(matches!(
        config.keys,
        KeySource::Discovery { ca_file: None }
    ));
    assert_eq!(config.username_claim, "sub");
    for bad in [
        args(Some("http://issuer.test"), Some("tollgate")),
        args(Some(ISSUER), None),
        args(None, Some("tollgate")),
    ] {
        assert!(
            matches!(bad.oidc_config(), Err(super::ApiError::Config(_))),
            "{bad:?}"
        );
    }
    let half_tls = super::ApiArgs {
        api_tls_cert: Some("/x.crt".into()),
        ..super::ApiArgs::default()
    };
    assert!(half_tls
        .tls_config(std::path::Path::new("/a"), std::path::Path::new("/b"))
        .is_err());
}
