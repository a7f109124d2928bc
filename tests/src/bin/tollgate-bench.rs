//! `tollgate-bench`, run by `cargo xtask bench`: the gateway measured against the direct
//! path, side by side in one run.
//!
//! On the shared control plane it starts the agent on node 1 (allow-all policy), makes a
//! namespace with 500 ConfigMaps and two pods on node 1 running `sleep`: `direct`
//! (exempt: its connections to the API server are not steered) and `gateway` (labelled
//! `tollgate.dev/enforce=true`: the kernel steers them to the agent's proxy). The same
//! load generator (`tg-load`, a sibling binary) runs inside each pod with a token bound to
//! that pod, phase by phase, the two paths alternating within every round (and the order
//! swapping from phase to phase and round to round) so that machine noise hits both.
//!
//! Phases: `get` of one ConfigMap (1 client: p50/p99 and requests/s at 1 client), `get`
//! of one Secret (1 client; masked on the gateway path: the cost of masking on a read),
//! `list` of the 500 ConfigMaps (1 client), `create` (1 client; the created objects are
//! removed after each round), and `get` with 32 concurrent clients (requests/s). Every
//! loop is bounded in count and in time. Before the cluster part, the masker's
//! throughput is measured in process (`tollgate_tests::masking_bench`). The table of
//! ratios (gateway ÷ direct) goes to stdout, the full report to `--out` (default
//! `target/bench/report.json`).
//!
//! Usage: `tollgate-bench [--quick] [--approvals-only] [--masking-only] [--out FILE]`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use serde_json::{json, Value};
use tollgate_tests::agent::{AgentOptions, RunningAgent, ALLOW_ALL};
use tollgate_tests::cluster::{controlplane, Cluster, PodOptions, RunningPod, TestNamespace};
use tollgate_tests::topology::{CLUSTER_IP, CLUSTER_PORT};

/// Objects in the listed namespace.
const LIST_OBJECTS: usize = 500;
/// Bytes of data in each of them.
const OBJECT_DATA_BYTES: usize = 256;
/// The ConfigMap `get` reads.
const GET_NAME: &str = "cm-250";
/// The Secret `get_secret` reads (masked on the gateway path).
const SECRET_NAME: &str = "bench-secret";
/// Label on the objects `create` makes.
const CREATE_LABEL: &str = "tollgate.dev/bench";
/// Clients of the concurrent throughput phase.
const CONCURRENT_CLIENTS: usize = 32;
/// Targets (issue 4 item 8, DESIGN §9).
const TARGET_GET_P50_RATIO: f64 = 1.15;
const TARGET_THROUGHPUT_32_RATIO: f64 = 0.85;
/// Per-round ratios further apart than this (max ÷ min) mark the run as noisy.
const NOISY_SPREAD: f64 = 1.3;

/// How much to measure.
#[derive(Debug, Clone, serde::Serialize)]
struct Plan {
    name: &'static str,
    rounds: usize,
    /// Measured requests per path per round.
    get: usize,
    list: usize,
    create: usize,
    get_concurrent: usize,
    /// Unmeasured requests per client per invocation.
    warmup: usize,
    /// Hard stop for the measured part of one invocation.
    phase_time_limit_s: u64,
    /// Hard stop for the whole measuring loop.
    total_time_limit_s: u64,
    /// Approvals released per store.
    approval_rounds: usize,
    /// Times each masking body is masked (the best counts).
    masking_rounds: usize,
    /// Measured `get secret` requests per path per round (masked on the gateway path).
    get_secret: usize,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            name: "full",
            rounds: 6,
            get: 1000,
            list: 100,
            create: 100,
            get_concurrent: 8000,
            warmup: 10,
            phase_time_limit_s: 60,
            total_time_limit_s: 15 * 60,
            approval_rounds: 15,
            masking_rounds: 5,
            get_secret: 1000,
        }
    }

    fn quick() -> Plan {
        Plan {
            name: "quick",
            rounds: 2,
            get: 300,
            list: 25,
            create: 40,
            get_concurrent: 3000,
            warmup: 5,
            phase_time_limit_s: 15,
            total_time_limit_s: 90,
            approval_rounds: 5,
            masking_rounds: 2,
            get_secret: 300,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Direct,
    Gateway,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Gateway => "gateway",
        }
    }
}

/// One phase of a round.
struct Phase {
    key: &'static str,
    verb: &'static str,
    /// What `get` reads: a resource of the namespace and an object's name.
    resource: &'static str,
    get_name: &'static str,
    concurrency: usize,
    requests: usize,
}

/// What one tg-load invocation reported.
#[derive(Debug, Clone, serde::Deserialize)]
struct Outcome {
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed_s: f64,
    list_items: Option<usize>,
    latencies_us: Vec<u64>,
}

/// Everything measured for one phase on one path, over all rounds.
#[derive(Default)]
struct Samples {
    latencies_us: Vec<u64>,
    ok: usize,
    errors: usize,
    elapsed_s: f64,
    first_error: Option<String>,
    /// Requests/s of every round (for the spread).
    per_round_rps: Vec<f64>,
    per_round_p50_ms: Vec<f64>,
}

fn main() -> Result<()> {
    let mut quick = false;
    let mut approvals_only = false;
    let mut masking_only = false;
    let mut out = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/bench/report.json"
    ));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--approvals-only" => approvals_only = true,
            "--masking-only" => masking_only = true,
            "--out" => out = PathBuf::from(args.next().context("--out needs a file")?),
            "-h" | "--help" => {
                println!(
                    "usage: tollgate-bench [--quick] [--approvals-only] [--masking-only] [--out FILE]"
                );
                return Ok(());
            }
            other => {
                bail!("unknown argument {other} (usage: tollgate-bench [--quick] [--out FILE])")
            }
        }
    }
    let plan = if quick { Plan::quick() } else { Plan::full() };
    if masking_only {
        // In process: no cluster, no root.
        let r = tollgate_tests::masking_bench::measure(plan.masking_rounds)?;
        tollgate_tests::masking_bench::print(&r);
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark runs a cluster in network namespaces and loads eBPF programs: run it as root");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if approvals_only {
        // Only the approval release latency (its figures are printed, not written).
        return runtime.block_on(async {
            let agent_bin = sibling("tg-agent")?;
            let r = approval_release(Cluster::shared(), &agent_bin, plan.approval_rounds).await;
            print_approval_release(&r);
            Ok(())
        });
    }
    runtime.block_on(bench(plan, out))
}

fn sibling(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it first (`cargo build --release -p tollgate-tests --bin {name}`)",
            path.display()
        );
    }
    Ok(path)
}

async fn bench(plan: Plan, out: PathBuf) -> Result<()> {
    let run_started = Instant::now();
    let load = sibling("tg-load")?;
    let agent_bin = sibling("tg-agent")?;
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "Tollgate bench ({}): {} rounds, direct and gateway interleaved, {build} build",
        plan.name, plan.rounds
    );
    // In process, before the cluster part: one thread, its own CPU time.
    let masking = tollgate_tests::masking_bench::measure(plan.masking_rounds)
        .unwrap_or_else(|err| json!({ "error": format!("{err:#}") }));

    let cluster = Cluster::shared();
    let mut agent = RunningAgent::start(
        cluster,
        AgentOptions::new(agent_bin.to_str().context("path")?, 1, ALLOW_ALL),
    )
    .context("starting the agent on node 1")?;
    // `/readyz` could have been answered by another test process's agent on the same
    // node (ours then fails to bind and exits): make sure ours is the one running.
    std::thread::sleep(Duration::from_millis(500));
    if !agent.is_running() {
        bail!(
            "the agent exited right after it seemed ready (another agent on node 1?):\n{}",
            agent.log_text()
        );
    }
    println!(
        "agent ready on {} (log {})",
        agent.node.name,
        agent.log.display()
    );

    let ns = cluster.namespace("bench").await?;
    ns.service_account("bench").await?;
    ns.grant(
        "bench",
        "bench",
        vec![
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["configmaps".into()]),
                verbs: vec!["*".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["secrets".into()]),
                verbs: vec!["get".into()],
                ..PolicyRule::default()
            },
        ],
    )
    .await?;
    let setup = Instant::now();
    make_configmaps(&ns).await?;
    make_secret(&ns).await?;
    println!(
        "namespace {}: {LIST_OBJECTS} ConfigMaps of {OBJECT_DATA_BYTES} bytes of data made in {:.1}s",
        ns.name,
        setup.elapsed().as_secs_f64()
    );

    let direct = sleeper(&ns, "direct", false).await?;
    let gateway = sleeper(&ns, "gateway", true).await?;
    let dir = std::env::temp_dir().join(format!(
        "tollgate-bench-{}",
        tollgate_tests::topology::unique_id()
    ));
    std::fs::create_dir_all(&dir)?;
    let _cleanup_dir = RemoveDir(dir.clone());
    let ca = cluster.layout.pki().join("ca.crt");
    let mut tokens = BTreeMap::new();
    for (path, pod) in [(Route::Direct, &direct), (Route::Gateway, &gateway)] {
        let token = ns.token("bench", &[], Some(pod)).await?;
        let file = dir.join(format!("{}.token", path.name()));
        std::fs::write(&file, token)?;
        tokens.insert(path, file);
    }

    let phases = [
        Phase {
            key: "get",
            verb: "get",
            resource: "configmaps",
            get_name: GET_NAME,
            concurrency: 1,
            requests: plan.get,
        },
        Phase {
            key: "get_secret",
            verb: "get",
            resource: "secrets",
            get_name: SECRET_NAME,
            concurrency: 1,
            requests: plan.get_secret,
        },
        Phase {
            key: "list",
            verb: "list",
            resource: "configmaps",
            get_name: GET_NAME,
            concurrency: 1,
            requests: plan.list,
        },
        Phase {
            key: "create",
            verb: "create",
            resource: "configmaps",
            get_name: GET_NAME,
            concurrency: 1,
            requests: plan.create,
        },
        Phase {
            key: "get_32",
            verb: "get",
            resource: "configmaps",
            get_name: GET_NAME,
            concurrency: CONCURRENT_CLIENTS,
            requests: plan.get_concurrent,
        },
    ];
    // The agent's own background CPU (watches, timers, log), to read the per-request
    // figures against: it is included in them.
    let idle_before = agent_cpu_us(&agent);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu_us_per_s = idle_before
        .zip(agent_cpu_us(&agent))
        .map(|(b, a)| a.saturating_sub(b) as f64 / 2.0);
    let proxied_before = proxied_counts(&agent)?;
    let agent_log_before = std::fs::metadata(&agent.log).map(|m| m.len()).unwrap_or(0);

    let mut samples: BTreeMap<(&str, Route), Samples> = BTreeMap::new();
    let mut sent_to_gateway: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut list_items = BTreeMap::new();
    // Per phase: the agent's CPU time (µs) while the gateway pod ran it, and requests.
    let mut agent_cpu: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    let measure_started = Instant::now();
    let total_limit = Duration::from_secs(plan.total_time_limit_s);
    let mut rounds_done = 0;
    'rounds: for round in 0..plan.rounds {
        for (i, phase) in phases.iter().enumerate() {
            let order = if (round + i) % 2 == 0 {
                [Route::Direct, Route::Gateway]
            } else {
                [Route::Gateway, Route::Direct]
            };
            for path in order {
                if measure_started.elapsed() > total_limit {
                    eprintln!(
                        "bench: the time limit of {}s is reached; stopping after {rounds_done} round(s)",
                        plan.total_time_limit_s
                    );
                    break 'rounds;
                }
                let pod = if path == Route::Direct {
                    &direct
                } else {
                    &gateway
                };
                let spec = json!({
                    "server": format!("https://{CLUSTER_IP}:{CLUSTER_PORT}"),
                    "ca_file": ca,
                    "token_file": tokens[&path],
                    "namespace": ns.name,
                    "phase": phase.verb,
                    "get_name": phase.get_name,
                    "resource": phase.resource,
                    "create_prefix": format!("c-{}-r{round}", path.name()),
                    "create_label": CREATE_LABEL,
                    "requests": phase.requests,
                    "concurrency": phase.concurrency,
                    "warmup": plan.warmup,
                    "time_limit_ms": plan.phase_time_limit_s * 1000,
                });
                let spec_file = dir.join(format!("{}-{}-{round}.json", phase.key, path.name()));
                std::fs::write(&spec_file, serde_json::to_vec(&spec)?)?;
                let cpu_before = agent_cpu_us(&agent);
                let outcome = run_load(
                    pod,
                    &load,
                    &spec_file,
                    Duration::from_secs(plan.phase_time_limit_s + 60),
                )
                .with_context(|| format!("{} through the {} path", phase.key, path.name()))?;
                if path == Route::Gateway {
                    if let (Some(before), Some(after)) = (cpu_before, agent_cpu_us(&agent)) {
                        let cpu = agent_cpu.entry(phase.key).or_insert((0, 0));
                        cpu.0 += after.saturating_sub(before);
                        cpu.1 +=
                            outcome.ok + outcome.errors + plan.warmup.max(1) * phase.concurrency;
                    }
                    let sent = sent_to_gateway.entry(phase.verb).or_insert((0, 0));
                    sent.0 += outcome.ok + plan.warmup.max(1) * phase.concurrency;
                    sent.1 += outcome.errors;
                }
                if let Some(n) = outcome.list_items {
                    list_items.insert(path.name(), n);
                }
                let s = samples.entry((phase.key, path)).or_default();
                let mut round_lat = outcome.latencies_us.clone();
                round_lat.sort_unstable();
                s.per_round_p50_ms
                    .push(percentile(&round_lat, 50.0) / 1000.0);
                s.per_round_rps
                    .push(outcome.ok as f64 / outcome.elapsed_s.max(1e-9));
                s.latencies_us.extend(outcome.latencies_us);
                s.ok += outcome.ok;
                s.errors += outcome.errors;
                s.elapsed_s += outcome.elapsed_s;
                if s.first_error.is_none() {
                    s.first_error = outcome.first_error;
                }
            }
            if phase.verb == "create" {
                remove_created(&ns).await?;
            }
        }
        rounds_done += 1;
        println!(
            "round {}/{} done ({:.0}s)",
            round + 1,
            plan.rounds,
            measure_started.elapsed().as_secs_f64()
        );
    }
    let measuring_s = measure_started.elapsed().as_secs_f64();
    let proxied_after = proxied_counts(&agent)?;
    let agent_log_bytes =
        std::fs::metadata(&agent.log).map(|m| m.len()).unwrap_or(0) - agent_log_before;

    // Did the gateway pod really go through the proxy, and the direct pod not?
    let mut proxied = serde_json::Map::new();
    let mut path_check_ok = true;
    for (verb, (ok, errors)) in &sent_to_gateway {
        let seen = proxied_after.get(*verb).copied().unwrap_or(0.0)
            - proxied_before.get(*verb).copied().unwrap_or(0.0);
        // Successful answers the gateway pod got (warm-up included); failed ones may or
        // may not be counted as allowed, depending on where they failed.
        if seen < *ok as f64 - 0.5 || seen > (*ok + *errors) as f64 + 0.5 {
            path_check_ok = false;
        }
        proxied.insert(
            verb.to_string(),
            json!({"answered_to_gateway_pod": ok, "failed": errors, "counted_by_proxy": seen}),
        );
    }

    let report = report(
        &plan,
        build,
        rounds_done,
        &samples,
        &list_items,
        Value::Object(proxied),
        path_check_ok,
        &agent_cpu,
        idle_cpu_us_per_s,
        agent_log_bytes,
        measuring_s,
        run_started.elapsed().as_secs_f64(),
    );
    print_table(&report);
    tollgate_tests::masking_bench::print(&masking);
    // The approval release latency needs agents of its own on node 1.
    drop(direct);
    drop(gateway);
    drop(ns);
    drop(agent);
    let mut report = report;
    report["masking_throughput"] = masking;
    report["approval_release"] = approval_release(cluster, &agent_bin, plan.approval_rounds).await;
    print_approval_release(&report["approval_release"]);
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
    println!("report written to {}", out.display());
    if !path_check_ok {
        bail!(
            "the proxy did not count exactly the gateway pod's requests: the two paths may not be what they claim (see \"proxied\" in the report)"
        );
    }
    Ok(())
}

/// Targets for the time from the approve call to the held call's completion.
const TARGET_RELEASE_P50_MS: [(&str, f64); 2] = [("embedded", 50.0), ("kubernetes", 150.0)];

async fn approval_release(cluster: &'static Cluster, agent_bin: &Path, rounds: usize) -> Value {
    let mut stores = serde_json::Map::new();
    for (store, target) in TARGET_RELEASE_P50_MS {
        let result =
            tollgate_tests::approval_bench::measure(cluster, agent_bin, store, rounds).await;
        let entry = match result {
            Ok(samples) => {
                let mut summary = tollgate_tests::approval_bench::summary(&samples);
                let met = summary["p50_ms"].as_f64().is_some_and(|p50| p50 <= target);
                summary["target_p50_ms_max"] = json!(target);
                summary["met"] = json!(met);
                summary
            }
            Err(err) => json!({ "error": format!("{err:#}") }),
        };
        stores.insert(store.to_owned(), entry);
    }
    Value::Object(stores)
}

fn print_approval_release(r: &Value) {
    println!();
    println!("approval release (approve call -> held call complete):");
    for (store, target) in TARGET_RELEASE_P50_MS {
        let e = &r[store];
        if let Some(err) = e["error"].as_str() {
            println!("  {store:<11} failed: {err}");
            continue;
        }
        println!(
            "  {store:<11} p50 {:>7.1} ms  max {:>7.1} ms  ({} samples)   target p50 <= {target:.0} ms  {}",
            e["p50_ms"].as_f64().unwrap_or(f64::NAN),
            e["max_ms"].as_f64().unwrap_or(f64::NAN),
            e["samples"],
            if e["met"].as_bool() == Some(true) { "met" } else { "NOT met" }
        );
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn make_configmaps(ns: &TestNamespace) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    let mut tasks = tokio::task::JoinSet::new();
    let value: String = "x".repeat(OBJECT_DATA_BYTES);
    for i in 0..LIST_OBJECTS {
        if tasks.len() >= 16 {
            tasks.join_next().await.context("task")???;
        }
        let api = api.clone();
        let value = value.clone();
        tasks.spawn(async move {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(format!("cm-{i:03}")),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([("key".to_owned(), value)])),
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm)
                .await
                .with_context(|| format!("creating cm-{i:03}"))?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("task")??;
    }
    Ok(())
}

/// The Secret the masked `get` reads: three values, about 3 KiB, like a TLS Secret
/// with a password.
async fn make_secret(ns: &TestNamespace) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(ns.client.clone(), &ns.name);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.to_owned()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([
            ("password".to_owned(), "p".repeat(24)),
            ("config".to_owned(), "c".repeat(384)),
            ("tls.key".to_owned(), "k".repeat(1700)),
        ])),
        ..Default::default()
    };
    api.create(&PostParams::default(), &secret)
        .await
        .context("creating the bench Secret")?;
    Ok(())
}

async fn remove_created(ns: &TestNamespace) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    api.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels(CREATE_LABEL),
    )
    .await
    .context("removing the created ConfigMaps")?;
    Ok(())
}

async fn sleeper(ns: &TestNamespace, name: &str, enforced: bool) -> Result<RunningPod> {
    let mut opts = PodOptions::new(name, 1, &["sleep", "3600"]);
    opts.service_account = Some("bench".into());
    if enforced {
        opts.labels
            .insert("tollgate.dev/enforce".into(), "true".into());
    }
    ns.run_pod(opts).await
}

/// Runs tg-load inside `pod`, killing it if it overruns `limit`.
fn run_load(pod: &RunningPod, load: &Path, spec: &Path, limit: Duration) -> Result<Outcome> {
    let mut child = pod
        .command(load)?
        .arg(spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tg-load in the pod")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("tg-load ran longer than {limit:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        bail!("tg-load failed ({status}): {err}{out}");
    }
    serde_json::from_str(out.trim()).with_context(|| format!("tg-load printed {out:?} {err}"))
}

/// CPU time (µs) the agent has used so far: `usage_usec` of the cgroup the agent
/// harness runs it in (`system.slice/tollgate-agent-<node>.service` under the cluster's
/// cgroup root). None when that cannot be read.
fn agent_cpu_us(agent: &RunningAgent) -> Option<u64> {
    let stat = controlplane::cgroup_root()
        .ok()?
        .join("system.slice")
        .join(format!("tollgate-agent-{}.service", agent.node.name))
        .join("cpu.stat");
    std::fs::read_to_string(stat)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
}

/// The proxy's allowed-request counters by verb.
fn proxied_counts(agent: &RunningAgent) -> Result<BTreeMap<&'static str, f64>> {
    let mut counts = BTreeMap::new();
    for (verb, code) in [("get", 200), ("list", 200), ("create", 201)] {
        counts.insert(
            verb,
            agent.metric(&format!(
                "tollgate_requests_total{{verb=\"{verb}\",decision=\"allow\",code=\"{code}\"}}"
            ))?,
        );
    }
    Ok(counts)
}

/// Nearest-rank percentile of sorted samples, in the samples' unit.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

fn ratio(gateway: f64, direct: f64) -> f64 {
    if direct > 0.0 {
        gateway / direct
    } else {
        f64::NAN
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[allow(clippy::too_many_arguments)]
fn report(
    plan: &Plan,
    build: &str,
    rounds_done: usize,
    samples: &BTreeMap<(&'static str, Route), Samples>,
    list_items: &BTreeMap<&str, usize>,
    proxied: Value,
    path_check_ok: bool,
    agent_cpu: &BTreeMap<&str, (u64, usize)>,
    idle_cpu_us_per_s: Option<f64>,
    agent_log_bytes: u64,
    measuring_s: f64,
    total_s: f64,
) -> Value {
    let empty = Samples::default();
    let get = |key: &'static str, path: Route| samples.get(&(key, path)).unwrap_or(&empty);
    let mut latency = serde_json::Map::new();
    for key in ["get", "get_secret", "list", "create"] {
        let mut entry = serde_json::Map::new();
        let mut p = BTreeMap::new();
        for path in [Route::Direct, Route::Gateway] {
            let s = get(key, path);
            let mut lat = s.latencies_us.clone();
            lat.sort_unstable();
            let p50 = percentile(&lat, 50.0) / 1000.0;
            let p99 = percentile(&lat, 99.0) / 1000.0;
            p.insert(path, (p50, p99));
            entry.insert(
                path.name().into(),
                json!({
                    "p50_ms": round3(p50),
                    "p99_ms": round3(p99),
                    "p90_ms": round3(percentile(&lat, 90.0) / 1000.0),
                    "max_ms": round3(lat.last().map_or(f64::NAN, |m| *m as f64 / 1000.0)),
                    // Stalls of a delayed-ACK's size show up here first.
                    "over_40ms": lat.iter().filter(|l| **l > 40_000).count(),
                    "mean_ms": round3(if lat.is_empty() { f64::NAN } else {
                        lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1000.0
                    }),
                    "ok": s.ok,
                    "errors": s.errors,
                    "first_error": s.first_error,
                    "per_round_p50_ms": s.per_round_p50_ms.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
                }),
            );
        }
        let (d, g) = (p[&Route::Direct], p[&Route::Gateway]);
        entry.insert("ratio_p50".into(), json!(round3(ratio(g.0, d.0))));
        entry.insert("ratio_p99".into(), json!(round3(ratio(g.1, d.1))));
        latency.insert(key.into(), Value::Object(entry));
    }
    let mut throughput = serde_json::Map::new();
    for (key, name) in [("get", "get_1_client"), ("get_32", "get_32_clients")] {
        let mut entry = serde_json::Map::new();
        let mut rps = BTreeMap::new();
        for path in [Route::Direct, Route::Gateway] {
            let s = get(key, path);
            let r = s.ok as f64 / s.elapsed_s.max(1e-9);
            rps.insert(path, r);
            entry.insert(
                path.name().into(),
                json!({
                    "requests_per_s": round3(r),
                    "ok": s.ok,
                    "errors": s.errors,
                    "elapsed_s": round3(s.elapsed_s),
                    "per_round_requests_per_s": s.per_round_rps.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
                }),
            );
        }
        entry.insert(
            "ratio".into(),
            json!(round3(ratio(rps[&Route::Gateway], rps[&Route::Direct]))),
        );
        // The spread of the per-round ratios, to judge the noise.
        let per_round: Vec<f64> = get(key, Route::Gateway)
            .per_round_rps
            .iter()
            .zip(&get(key, Route::Direct).per_round_rps)
            .map(|(g, d)| round3(ratio(*g, *d)))
            .collect();
        entry.insert("per_round_ratio".into(), json!(per_round));
        throughput.insert(name.into(), Value::Object(entry));
    }
    let get_p50_ratio = latency["get"]["ratio_p50"].as_f64().unwrap_or(f64::NAN);
    let tp32_ratio = throughput["get_32_clients"]["ratio"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let errors: usize = samples.values().map(|s| s.errors).sum();
    // Rounds that disagree much mean the machine was busy with something else during
    // some of them: say so rather than print a ratio that looks precise.
    let p50_per_round: Vec<f64> = get("get", Route::Gateway)
        .per_round_p50_ms
        .iter()
        .zip(&get("get", Route::Direct).per_round_p50_ms)
        .map(|(g, d)| ratio(*g, *d))
        .collect();
    let tp32_per_round: Vec<f64> = throughput["get_32_clients"]["per_round_ratio"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let spread = |v: &[f64]| {
        let max = v.iter().copied().fold(f64::MIN, f64::max);
        let min = v.iter().copied().fold(f64::MAX, f64::min);
        if v.len() < 2 || min <= 0.0 {
            1.0
        } else {
            max / min
        }
    };
    let noisy = spread(&p50_per_round) > NOISY_SPREAD || spread(&tp32_per_round) > NOISY_SPREAD;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "plan": plan,
        "build": build,
        "finished_unix": now,
        "rounds_done": rounds_done,
        "setup": {
            "list_objects": LIST_OBJECTS,
            "object_data_bytes": OBJECT_DATA_BYTES,
            "list_items_seen": list_items,
            "concurrent_clients": CONCURRENT_CLIENTS,
            "client": "tg-load: hyper 1 HTTP/2 over rustls, one connection per client, bearer token bound to the pod",
            "direct": "exempt pod on node 1 -> 10.96.0.1:443 -> API server",
            "gateway": "enforced pod on node 1 -> 10.96.0.1:443 steered to the agent's proxy on node 1 -> API server",
        },
        "latency": latency,
        "throughput": throughput,
        "targets": {
            "get_p50_ratio_max": TARGET_GET_P50_RATIO,
            "get_p50_ratio": get_p50_ratio,
            "get_p50_met": get_p50_ratio <= TARGET_GET_P50_RATIO,
            "throughput_32_ratio_min": TARGET_THROUGHPUT_32_RATIO,
            "throughput_32_ratio": tp32_ratio,
            "throughput_32_met": tp32_ratio >= TARGET_THROUGHPUT_32_RATIO,
        },
        "errors": errors,
        "get_p50_per_round_ratio": p50_per_round.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
        "noisy": noisy,
        "proxied": proxied,
        "path_check_ok": path_check_ok,
        // The agent's CPU time per proxied request (warm-up requests and TLS handshakes
        // included), from its cgroup's cpu.stat.
        "agent_cpu_us_per_request": agent_cpu
            .iter()
            .map(|(k, (us, n))| (k.to_string(), json!(round3(*us as f64 / (*n).max(1) as f64))))
            .collect::<serde_json::Map<_, _>>(),
        "agent_idle_cpu_us_per_s": idle_cpu_us_per_s.map(round3),
        "agent_log_bytes_during_measurement": agent_log_bytes,
        "measuring_s": round3(measuring_s),
        "total_s": round3(total_s),
    })
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    let verdict = |met: &Value| {
        if met.as_bool() == Some(true) {
            "met"
        } else {
            "NOT met"
        }
    };
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>8}   target",
        "", "direct", "gateway", "ratio"
    );
    for (key, label) in [
        ("get", "get"),
        ("get_secret", "get secret (masked)"),
        ("list", "list 500"),
        ("create", "create"),
    ] {
        let l = &r["latency"][key];
        for (q, field) in [("p50", "p50_ms"), ("p99", "p99_ms")] {
            let target = if key == "get" && q == "p50" {
                format!(
                    "<= {TARGET_GET_P50_RATIO:.2}  {}",
                    verdict(&r["targets"]["get_p50_met"])
                )
            } else {
                String::new()
            };
            println!(
                "{:<28} {:>10} {:>10} {:>8}   {target}",
                format!("{label} {q} (ms)"),
                f(&l["direct"][field]),
                f(&l["gateway"][field]),
                f(&l[format!("ratio_{q}")]),
            );
        }
    }
    for (key, label) in [
        ("get_1_client", "get req/s, 1 client"),
        ("get_32_clients", "get req/s, 32 clients"),
    ] {
        let t = &r["throughput"][key];
        let target = if key == "get_32_clients" {
            format!(
                ">= {TARGET_THROUGHPUT_32_RATIO:.2}  {}",
                verdict(&r["targets"]["throughput_32_met"])
            )
        } else {
            String::new()
        };
        println!(
            "{:<28} {:>10} {:>10} {:>8}   {target}",
            label,
            t["direct"]["requests_per_s"]
                .as_f64()
                .map_or("-".to_owned(), |x| format!("{x:.0}")),
            t["gateway"]["requests_per_s"]
                .as_f64()
                .map_or("-".to_owned(), |x| format!("{x:.0}")),
            f(&t["ratio"]),
        );
    }
    println!();
    println!(
        "per-round ratios: get p50 {}; get req/s at 32 clients {}",
        r["get_p50_per_round_ratio"], r["throughput"]["get_32_clients"]["per_round_ratio"]
    );
    if r["noisy"].as_bool() == Some(true) {
        println!(
            "WARNING: the rounds disagree by more than {NOISY_SPREAD}x: the machine was busy with something else; rerun before trusting these ratios"
        );
    }
    println!(
        "agent CPU per proxied request (µs, background included): {}; idle: {} µs/s",
        r["agent_cpu_us_per_request"], r["agent_idle_cpu_us_per_s"]
    );
    println!(
        "errors: {}; proxy counted the gateway pod's requests exactly: {}; measuring took {:.0}s, the whole run {:.0}s",
        r["errors"],
        r["path_check_ok"],
        r["measuring_s"].as_f64().unwrap_or(0.0),
        r["total_s"].as_f64().unwrap_or(0.0)
    );
}
