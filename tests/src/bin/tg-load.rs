//! `tg-load`: the benchmark's load generator, run inside a pod by `tollgate-bench`.
//!
//! It talks to the API server the way an in-pod client-go does: HTTPS to the Service
//! address, the cluster CA, a bearer token, HTTP/2 with keep-alive. One invocation runs
//! one phase:
//!
//! - `get` (one ConfigMap, or one object of the spec's `resource`), `list` (all
//!   ConfigMaps of the namespace, with `limit=500` as kubectl's pager asks) or `create`
//!   (one new ConfigMap per request), with `concurrency` clients, each on its own
//!   connection, sharing a fixed request count. Every client first sends a few
//!   unmeasured warm-up requests (TLS handshake, the proxy's token review), then all
//!   start together. The phase stops at the count or at the time limit, whichever comes
//!   first, and prints one JSON object on stdout:
//!   `{"phase", "concurrency", "ok", "errors", "elapsed_s", "latencies_us": [...]}`.
//! - `connect`: `requests` plain TCP connects to the server's address, one after the
//!   other, each closed at once (no TLS): what the kernel's connect hook sees, and
//!   nothing else. Same output; the latencies are the connects'.
//! - `watch`: `watches` watch streams on the namespace's `resource` (with
//!   `label_selector`), spread over `concurrency` connections. It prints JSON lines:
//!   `{"established": n, "failed": m, "pending": p, "first_error"}` once every stream
//!   has its answer head or failed (or at `establish_timeout_ms`, `pending` saying how
//!   many had no answer yet), then, with `print_events`, `{"event": {"t_ns", "type", "name",
//!   "seq"}}` per event as it arrives (`t_ns`: wall clock, nanoseconds since the epoch;
//!   `seq`: the object's `data.seq`), and `{"done": ...}` at the end. It ends when its
//!   standard input closes (the orchestrator's "stop") or at the time limit.
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
    /// `get`, `list`, `create`, `connect` or `watch`.
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
    /// Hard stop for the measured part (`watch`: for the whole invocation).
    time_limit_ms: u64,
    /// `watch`: streams to open, spread over `concurrency` connections.
    #[serde(default)]
    watches: usize,
    /// `watch`: a label selector for the watched objects (none when empty).
    #[serde(default)]
    label_selector: String,
    /// `watch`: print a line per event (else only count them).
    #[serde(default)]
    print_events: bool,
    /// `watch`: how long to wait for every stream's answer before saying how many came
    /// (0: the time limit). Streams answered later are still read.
    #[serde(default)]
    establish_timeout_ms: u64,
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
    if spec.phase == "connect" {
        // Blocking connects on this thread: no runtime between the program and the
        // kernel.
        let outcome = connect_loop(&spec)?;
        println!("{}", serde_json::to_string(&outcome)?);
        return Ok(());
    }
    // Two worker threads: the machines have two cores, and the same generator runs for
    // both paths, so its own cost is the same on both sides of every ratio.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if spec.phase == "watch" {
        return runtime.block_on(watch(spec));
    }
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

/// `connect`: plain TCP connects to the server's address, one at a time, each closed at
/// once. The address is the Service's, as a client dials it: what the kernel's connect
/// hook sees is exactly a client's connect, without TLS or HTTP in the figures.
fn connect_loop(spec: &Spec) -> Result<Outcome> {
    let uri: hyper::Uri = spec.server.parse().context("parsing server")?;
    let host = uri.host().context("server has no host")?;
    let ip: std::net::IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .with_context(|| format!("server host {host} is not an address"))?;
    let addr = std::net::SocketAddr::new(ip, uri.port_u16().unwrap_or(443));
    let limit = Duration::from_millis(spec.time_limit_ms);
    let mut latencies = Vec::with_capacity(spec.requests);
    let mut errors = 0;
    let mut first_error = None;
    let started = Instant::now();
    for _ in 0..spec.requests {
        if started.elapsed() > limit {
            break;
        }
        let t = Instant::now();
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            // Dropped at once: the peer sees an end of stream before any TLS.
            Ok(stream) => {
                latencies.push(t.elapsed().as_micros() as u64);
                drop(stream);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("connecting to {addr}: {e}"));
            }
        }
    }
    Ok(Outcome {
        phase: spec.phase.clone(),
        concurrency: 1,
        ok: latencies.len(),
        errors,
        first_error,
        elapsed_s: started.elapsed().as_secs_f64(),
        list_items: None,
        latencies_us: latencies,
    })
}

/// What the watch streams share.
struct Watching {
    spec: Spec,
    token: String,
    /// Set once: stop reading (standard input closed, or the time limit).
    stop: tokio::sync::watch::Receiver<bool>,
    /// Each stream's answer: `Ok` once its head says 200, else why not.
    established: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
    events: AtomicUsize,
    /// Streams the server (or the proxy) ended or broke while we still read them.
    ended_early: AtomicUsize,
}

/// `watch` (see the module documentation).
async fn watch(spec: Spec) -> Result<()> {
    if spec.watches == 0 || spec.watches > 10_000 {
        bail!("watches must be 1..=10000");
    }
    let token = std::fs::read_to_string(&spec.token_file)
        .with_context(|| format!("reading {}", spec.token_file))?
        .trim()
        .to_owned();
    let tls = tls_config(&spec.ca_file)?;
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(spec.time_limit_ms);
    let establish_deadline = match spec.establish_timeout_ms {
        0 => deadline,
        ms => deadline.min(started + Duration::from_millis(ms)),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    // The orchestrator says "stop" by closing our standard input.
    {
        let stop_tx = stop_tx.clone();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = stop_tx.send(true);
        });
    }
    let (est_tx, mut est_rx) = tokio::sync::mpsc::unbounded_channel();
    let watches = spec.watches;
    let connections = spec.concurrency.min(watches);
    let shared = Arc::new(Watching {
        spec,
        token,
        stop: stop_rx.clone(),
        established: est_tx,
        events: AtomicUsize::new(0),
        ended_early: AtomicUsize::new(0),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        // Streams i, i + connections, ... go over connection i.
        let streams = (watches - i).div_ceil(connections);
        tasks.spawn(connection_streams(client(&tls), streams, shared.clone()));
    }

    // Every stream answers (or fails) once; bounded by the deadline and by "stop".
    let mut established = 0;
    let mut failed = 0;
    let mut first_error = None;
    let mut stop = stop_rx.clone();
    while established + failed < watches {
        tokio::select! {
            r = est_rx.recv() => match r {
                Some(Ok(())) => established += 1,
                Some(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
                None => break,
            },
            _ = tokio::time::sleep_until(establish_deadline) => break,
            _ = stop.changed() => break,
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "established": established,
            "failed": failed,
            "pending": watches - established - failed,
            "first_error": first_error,
        })
    );

    // Hold the streams open until told to stop or out of time.
    if !*stop.borrow() {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = stop.changed() => {}
        }
    }
    let _ = stop_tx.send(true);
    // The streams end as soon as they see "stop"; do not wait on a stuck one for long.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    // Streams answered after the "established" line.
    while let Ok(r) = est_rx.try_recv() {
        match r {
            Ok(()) => established += 1,
            Err(_) => failed += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "done": true,
            "established": established,
            "failed": failed,
            "events": shared.events.load(Ordering::Relaxed),
            "ended_early": shared.ended_early.load(Ordering::Relaxed),
        })
    );
    Ok(())
}

/// The streams of one connection: the first one alone (it makes the connection, so
/// that the others share it instead of each dialling its own), then the rest together.
async fn connection_streams(c: HttpsClient, streams: usize, shared: Arc<Watching>) {
    let mut tasks = tokio::task::JoinSet::new();
    match open_watch(&c, &shared).await {
        Ok(body) => {
            let _ = shared.established.send(Ok(()));
            tasks.spawn(read_watch(body, shared.clone()));
        }
        Err(e) => {
            // The connection failed: so would every stream on it.
            for _ in 0..streams {
                let _ = shared.established.send(Err(format!("{e:#}")));
            }
            return;
        }
    }
    for _ in 1..streams {
        let c = c.clone();
        let shared = shared.clone();
        tasks.spawn(async move {
            match open_watch(&c, &shared).await {
                Ok(body) => {
                    let _ = shared.established.send(Ok(()));
                    read_watch(body, shared).await;
                }
                Err(e) => {
                    let _ = shared.established.send(Err(format!("{e:#}")));
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Sends one watch request and returns its body once the head says 200.
async fn open_watch(c: &HttpsClient, shared: &Watching) -> Result<hyper::body::Incoming> {
    let spec = &shared.spec;
    // The server ends the watch by itself a little after our own time limit.
    let mut uri = format!(
        "{}/api/v1/namespaces/{}/{}?watch=true&timeoutSeconds={}",
        spec.server,
        spec.namespace,
        spec.resource,
        spec.time_limit_ms / 1000 + 5
    );
    if !spec.label_selector.is_empty() {
        uri.push_str("&labelSelector=");
        uri.push_str(&query_escape(&spec.label_selector));
    }
    let request = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header("authorization", format!("Bearer {}", shared.token))
        .header("accept", "application/json")
        .header("user-agent", "tg-load/0.1")
        .body(Full::new(Bytes::new()))?;
    let mut stop = shared.stop.clone();
    let response = tokio::select! {
        r = c.request(request) => r?,
        _ = stop.changed() => bail!("stopped before the watch was answered"),
    };
    let status = response.status();
    if status != StatusCode::OK {
        let body = response.into_body().collect().await?.to_bytes();
        bail!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(response.into_body())
}

/// Reads a watch stream until "stop": counts its events and, when asked, prints each
/// with the time its last byte arrived.
async fn read_watch(mut body: hyper::body::Incoming, shared: Arc<Watching>) {
    let mut stop = shared.stop.clone();
    let mut pending: Vec<u8> = Vec::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = stop.changed() => return,
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers
            },
            Some(Err(_)) | None => {
                shared.ended_early.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        // The arrival time, before any parsing.
        let t_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        if !shared.spec.print_events {
            // One event per line: counting newlines is enough.
            let n = data.iter().filter(|b| **b == b'\n').count();
            shared.events.fetch_add(n, Ordering::Relaxed);
            continue;
        }
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            shared.events.fetch_add(1, Ordering::Relaxed);
            let event: serde_json::Value = match serde_json::from_slice(&line) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let object = &event["object"];
            println!(
                "{}",
                serde_json::json!({"event": {
                    "t_ns": t_ns.to_string(),
                    "type": event["type"],
                    "name": object["metadata"]["name"],
                    "seq": object["data"]["seq"],
                }})
            );
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (and `/`, which a
/// query may hold as it is).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
