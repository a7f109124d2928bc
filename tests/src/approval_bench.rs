//! Approval release latency, for `cargo xtask bench`: the time from a reviewer's
//! approve call (sent to the agent's REST API) to the completion of the held call it
//! releases, per approval store.
//!
//! Each round: an enforced pod starts `curl` creating a ConfigMap that the policy holds
//! (hold mode); once the agent reports the call held, the bench opens a TLS connection
//! to the REST API (inside the node's namespace), takes `t0`, sends the approve, and the
//! pod prints the wall-clock time (`date +%s%N`) right after curl returns. Same machine,
//! same clock: `t1 - t0` is the release latency, plus the cost of starting `date`
//! (about a millisecond).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::Value;

use crate::agent::{AgentOptions, RunningAgent};
use crate::cluster::harness::wait_until;
use crate::cluster::{Cluster, PodOptions};

/// Milliseconds from approve to completion, one per round.
pub async fn measure(
    cluster: &'static Cluster,
    agent_bin: &Path,
    store: &str,
    rounds: usize,
) -> Result<Vec<f64>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    cluster.kubectl_ok(&["apply", "-f", path(&root.join("deploy/crds"))?])?;
    cluster.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/approvalrequests.tollgate.dev",
        "--timeout=60s",
    ])?;
    cluster.kubectl_ok(&[
        "apply",
        "-f",
        path(&root.join("deploy/reviewer-rbac.yaml"))?,
    ])?;

    let ns = cluster.namespace("bench-appr").await?;
    let reviewers = cluster.namespace("bench-appr-rev").await?;
    ns.service_account("agent").await?;
    ns.grant(
        "agent",
        "writes",
        vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            verbs: vec!["*".into()],
            ..PolicyRule::default()
        }],
    )
    .await?;
    reviewers.service_account("reviewer").await?;
    cluster.kubectl_ok(&[
        "create",
        "rolebinding",
        "bench-reviewer",
        "-n",
        &ns.name,
        "--clusterrole=tollgate-approval-reviewer",
        &format!("--serviceaccount={}:reviewer", reviewers.name),
    ])?;
    let token = reviewers.token("reviewer", &[], None).await?;
    let mut opts = PodOptions::new("held", 1, &["sleep", "3600"]);
    opts.service_account = Some("agent".into());
    opts.labels
        .insert("tollgate.dev/enforce".into(), "true".into());
    let pod = ns.run_pod(opts).await?;

    let policy = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: bench-hold\n    action: approve\n    caller:\n      namespaces: [{ns}]\n    request:\n      verbs: [create]\n      resources: [configmaps]\n    approval:\n      mode: hold\n      steps:\n        - groups: [\"system:serviceaccounts:{rev}\"]\n",
        ns = ns.name,
        rev = reviewers.name
    );
    let mut options = AgentOptions::new(path(agent_bin)?, 1, &policy);
    options.approval_store = Some(store.to_owned());
    let agent = RunningAgent::start(cluster, options)?;
    let api = ApiClient::new(&agent, &token)?;

    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let name = format!("release-{round}");
        let body =
            format!(r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}"}}}}"#);
        let script = format!(
            "T=/var/run/secrets/kubernetes.io/serviceaccount; curl --cacert $T/ca.crt -sS -o /dev/null \
             -H \"Authorization: Bearer $(cat $T/token)\" -H 'Content-Type: application/json' \
             -X POST --data '{body}' https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/{ns}/configmaps; \
             echo done-$(date +%s%N)",
            ns = ns.name
        );
        let mut held = pod.kubectl_exec_child(cluster, &["sh", "-c", &script])?;
        wait_until("the call to be held", Duration::from_secs(30), || {
            agent.metric("tollgate_approvals_held").unwrap_or(0.0) >= 1.0
        })?;
        let pending = api
            .request("GET", "/api/v1/approvals?state=pending", None)
            .await?;
        let items = match &pending.1 {
            Value::Array(items) => items.clone(),
            other => other["items"].as_array().cloned().unwrap_or_default(),
        };
        let id = items
            .iter()
            .find(|a| a["spec"]["dryRun"]["object"]["metadata"]["name"] == name.as_str())
            .and_then(|a| a["id"].as_str())
            .with_context(|| format!("no pending approval for {name}: {}", pending.1))?
            .to_owned();
        let (code, answer, t0) = api
            .request_timed(
                "POST",
                &format!("/api/v1/approvals/{id}/approve"),
                Some(r#"{"reason":"bench"}"#),
            )
            .await?;
        if code != 200 {
            bail!("approve answered {code}: {answer}");
        }
        if !held.wait_for_line(|| {}, "done-", Duration::from_secs(30)) {
            bail!("the released call did not finish: {:?}", held.seen);
        }
        let t1: u128 = held
            .seen
            .iter()
            .find_map(|l| l.trim().strip_prefix("done-")?.parse().ok())
            .context("no completion time")?;
        let t0 = t0.duration_since(UNIX_EPOCH)?.as_nanos();
        samples.push(t1.saturating_sub(t0) as f64 / 1e6);
        // Wait until the agent no longer holds it, so the next round's "held" is new.
        wait_until("the held gauge to drop", Duration::from_secs(10), || {
            agent.metric("tollgate_approvals_held").unwrap_or(1.0) < 1.0
        })?;
    }
    drop(agent);
    Ok(samples)
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

/// A TLS client of the agent's REST API that connects from inside the node's network
/// namespace (the socket stays there; the bench uses it from here).
struct ApiClient {
    addr: std::net::SocketAddr,
    netns: crate::topology::Netns,
    tls: Arc<rustls::ClientConfig>,
    token: String,
}

impl ApiClient {
    fn new(agent: &RunningAgent, token: &str) -> Result<ApiClient> {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&agent.ca_file)?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert?)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(ApiClient {
            addr: std::net::SocketAddr::new(agent.node.ip.into(), crate::agent::API_PORT),
            netns: agent.node.netns_handle(),
            tls: Arc::new(tls),
            token: token.to_owned(),
        })
    }

    async fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value)> {
        let (code, value, _) = self.request_timed(method, path, body).await?;
        Ok((code, value))
    }

    /// Connects (TCP, TLS, HTTP/1.1) first, then notes the time and sends: the time
    /// returned is when the request started, not when the connection did.
    async fn request_timed(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, Value, SystemTime)> {
        let addr = self.addr;
        let tcp = self.netns.run_in(move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })??;
        tcp.set_nonblocking(true)?;
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let name = rustls::pki_types::ServerName::from(addr.ip());
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))?;
        let started = SystemTime::now();
        let response = sender.send_request(request).await?;
        let code = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((code, value, started))
    }
}

/// p50 and max of the samples (ms).
pub fn summary(samples: &[f64]) -> Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        if sorted.is_empty() {
            return Value::Null;
        }
        let i = ((sorted.len() - 1) as f64 * q).round() as usize;
        serde_json::json!((sorted[i] * 10.0).round() / 10.0)
    };
    serde_json::json!({
        "samples": sorted.len(),
        "p50_ms": at(0.5),
        "max_ms": at(1.0),
    })
}
