//! `tg-load`: the benchmark's load generator, run inside a pod by `tollgate-bench`.
//!
//! It talks to the API server the way an in-pod client-go does: HTTPS to the Service
//! address, the cluster CA, a bearer token, HTTP/2 with keep-alive. One invocation runs
//! one phase — `get` (one ConfigMap, or one object of the spec's `resource`), `list` (all ConfigMaps of the namespace, with
//! `limit=500` as kubectl's pager asks) or `create` (one new ConfigMap per request) — with
//! `concurrency` clients, each on its own connection, sharing a fixed request count.
//! Every client first sends a few unmeasured warm-up requests (TLS handshake, the
//! proxy's token review), then all start together. The phase stops at the count or at
//! the time limit, whichever comes first, and prints one JSON object on stdout:
//! `{"phase", "concurrency", "ok", "errors", "elapsed_s", "latencies_us": [...]}`.
//!
//! Usage: `tg-load SPEC.json` where SPEC is [`Spec`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

/// What to run (written by the orchestrator).
#[derive(Debug, Deserialize)]
struct Spec {
    /// e.g. `https://10.96.0.1:443`.
    server: String,
    /// PEM file of the cluster CA.
    ca_file: String,
    /// File holding the bearer token (bound to the pod this runs in).
    token_file: String,
    namespace: String,
    /// `get`, `list` or `create`.
    phase: String,
    /// The object `get` reads.
    #[serde(default)]
    get_name: String,
    /// The resource `get` and `list` read in the namespace: `configmaps` unless given
    /// (the bench reads `secrets` to time a masked `get`). `create` makes ConfigMaps.
    #[serde(default = "configmaps")]
    resource: String,
    /// Prefix of the names `create` uses (unique per invocation).
    #[serde(default)]
    create_prefix: String,
    /// Label put on created objects so the orchestrator can remove them.
    #[serde(default)]
    create_label: String,
    /// Measured requests, shared by all clients.
    requests: usize,
    /// Concurrent clients, each with its own connection.
    concurrency: usize,
    /// Unmeasured requests per client before the measured ones.
    warmup: usize,
    /// Hard stop for the measured part.
    time_limit_ms: u64,
}

#[derive(Debug, Serialize)]
struct Outcome {
    phase: String,
    concurrency: usize,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed_s: f64,
    /// Items seen in the first `list` response (a check that the list is the size asked).
    list_items: Option<usize>,
    latencies_us: Vec<u64>,
}

fn configmaps() -> String {
    "configmaps".to_owned()
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: tg-load SPEC.json")?;
    let spec: Spec =
        serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {path}"))?)
            .with_context(|| format!("parsing {path}"))?;
    if spec.concurrency == 0 || spec.concurrency > 256 {
        bail!("concurrency must be 1..=256");
    }
    // Two worker threads: the machines have two cores, and the same generator runs for
    // both paths, so its own cost is the same on both sides of every ratio.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(run(spec))?;
    println!("{}", serde_json::to_string(&outcome)?);
    Ok(())
}

fn tls_config(ca_file: &str) -> Result<rustls::ClientConfig> {
    let pem = std::fs::read(ca_file).with_context(|| format!("reading {ca_file}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    if roots.is_empty() {
        bail!("no certificate in {ca_file}");
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// One client: its own connection pool (HTTP/2 only: one connection).
fn client(tls: &rustls::ClientConfig) -> HttpsClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_only()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

struct Shared {
    spec: Spec,
    token: String,
    /// Next measured request number (claims one each).
    next: AtomicUsize,
    deadline_ms: u64,
}

enum Kind {
    Get,
    List,
    Create,
}

async fn run(spec: Spec) -> Result<Outcome> {
    let kind = match spec.phase.as_str() {
        "get" => Kind::Get,
        "list" => Kind::List,
        "create" => Kind::Create,
        other => bail!("unknown phase {other}"),
    };
    let token = std::fs::read_to_string(&spec.token_file)
        .with_context(|| format!("reading {}", spec.token_file))?
        .trim()
        .to_owned();
    let tls = tls_config(&spec.ca_file)?;
    let concurrency = spec.concurrency;
    let shared = Arc::new(Shared {
        deadline_ms: spec.time_limit_ms,
        spec,
        token,
        next: AtomicUsize::new(0),
    });
    let kind = Arc::new(kind);

    // Warm-up: every client connects and sends its unmeasured requests; the first
    // `list` answer is checked for its size.
    let clients: Vec<HttpsClient> = (0..concurrency).map(|_| client(&tls)).collect();
    let mut list_items = None;
    let mut warm = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        let shared = shared.clone();
        let kind = kind.clone();
        warm.spawn(async move {
            let mut items = None;
            for w in 0..shared.spec.warmup.max(1) {
                let body = one(&c, &shared, &kind, &format!("w{i}-{w}")).await?;
                if items.is_none() && matches!(*kind, Kind::List) {
                    let v: serde_json::Value = serde_json::from_slice(&body)?;
                    items = v["items"].as_array().map(|a| a.len());
                }
            }
            anyhow::Ok(items)
        });
    }
    while let Some(r) = warm.join_next().await {
        let items = r.context("warm-up task")?.context("warm-up request")?;
        list_items = list_items.or(items);
    }

    // Measured part: all clients start together and claim request numbers until the
    // count is used up or the time limit passes.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in clients {
        let shared = shared.clone();
        let kind = kind.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            let limit = Duration::from_millis(shared.deadline_ms);
            loop {
                let n = shared.next.fetch_add(1, Ordering::Relaxed);
                if n >= shared.spec.requests || started.elapsed() > limit {
                    break;
                }
                let t = Instant::now();
                match one(&c, &shared, &kind, &n.to_string()).await {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (lat, errors, first_error)
        });
    }
    let mut latencies = Vec::with_capacity(shared.spec.requests);
    let mut errors = 0;
    let mut first_error = None;
    while let Some(r) = tasks.join_next().await {
        let (lat, e, fe) = r.context("client task")?;
        latencies.extend(lat);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let elapsed = started.elapsed();
    Ok(Outcome {
        phase: shared.spec.phase.clone(),
        concurrency,
        ok: latencies.len(),
        errors,
        first_error,
        elapsed_s: elapsed.as_secs_f64(),
        list_items,
        latencies_us: latencies,
    })
}

/// One request, its body read to the end; an error unless the status is the expected one.
async fn one(c: &HttpsClient, shared: &Shared, kind: &Kind, suffix: &str) -> Result<Bytes> {
    let spec = &shared.spec;
    let base = format!(
        "{}/api/v1/namespaces/{}/{}",
        spec.server, spec.namespace, spec.resource
    );
    let (method, uri, body, expect) = match kind {
        Kind::Get => (
            Method::GET,
            format!("{base}/{}", spec.get_name),
            Bytes::new(),
            StatusCode::OK,
        ),
        Kind::List => (
            Method::GET,
            format!("{base}?limit=500"),
            Bytes::new(),
            StatusCode::OK,
        ),
        Kind::Create => {
            let object = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": format!("{}-{suffix}", spec.create_prefix),
                    "labels": { spec.create_label.clone(): "create" },
                },
                "data": { "key": "value" },
            });
            (
                Method::POST,
                base,
                Bytes::from(serde_json::to_vec(&object)?),
                StatusCode::CREATED,
            )
        }
    };
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {}", shared.token))
        .header("accept", "application/json")
        .header("user-agent", "tg-load/0.1");
    if !body.is_empty() {
        request = request.header("content-type", "application/json");
    }
    let response = c.request(request.body(Full::new(body))?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != expect {
        bail!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(body)
}
