//! `tollgate-bench`, run by `cargo xtask bench`: the gateway measured against the direct
//! path, side by side in one run, with every figure DESIGN §9 names.
//!
//! On the shared control plane it starts the agent on node 1 (allow-all policy), makes a
//! namespace with 500 ConfigMaps and two pods on node 1 running `sleep`: `direct`
//! (exempt: its connections to the API server are not steered) and `gateway` (labelled
//! `tollgate.dev/enforce=true`: the kernel steers them to the agent's proxy). The same
//! load generator (`tg-load`, a sibling binary) runs inside each pod with a token bound to
//! that pod, phase by phase, the two paths alternating within every round (and the order
//! swapping from phase to phase and round to round) so that machine noise hits both.
//!
//! Phases of a round: `get` of one ConfigMap (1 client: p50/p99 and requests/s at 1
//! client), `get` of one Secret (1 client; masked on the gateway path: the cost of
//! masking on a read), `list` of the 500 ConfigMaps (1 client), `create` (1 client; the
//! created objects are removed after each round), `get` with 32 concurrent clients
//! (requests/s), and watch event delivery (a watcher in each pod, the admin changing a
//! ConfigMap: each event's arrival in both pods against the moment its change was sent).
//! Every loop is bounded in count and in time.
//!
//! Around the rounds: the masker's throughput in process (`masking_bench`), before the
//! cluster part; the kernel's statistics of the agent's eBPF programs over the rounds
//! and over loops of plain connects from each pod (the connect hook's cost per call);
//! the agent's memory at idle, after the rounds and with many watches held open through
//! it (`agent_bench`, `watch_bench`); then the approval release latency per store
//! (`approval_bench`, agents of its own). One table of everything, with the targets, goes
//! to stdout at the end; the full report to `--out` (default `target/bench/report.json`).
//!
//! Usage: `tollgate-bench [--quick] [--approvals-only] [--masking-only] [--out FILE]`.
//!
//! For profiling the agent: `--phases get,get_32` runs only those phases (by report
//! key) and skips the parts around the rounds (watch delivery, open watches,
//! approvals); `--rounds N` overrides the plan's rounds; `--perf DIR` records the agent
//! with `perf record` (DWARF call graphs) while the gateway pod runs each phase, one
//! file per phase and round (`DIR/<phase>-r<round>.data`; `perf report -i FILE`).

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
use tollgate_tests::agent_bench;
use tollgate_tests::cluster::{controlplane, Cluster, PodOptions, RunningPod, TestNamespace};
use tollgate_tests::topology::{CLUSTER_IP, CLUSTER_PORT};
use tollgate_tests::watch_bench::{self, Watcher, WATCH_LABEL};

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
/// The ConfigMap the admin changes for the watch delivery phase.
const WATCHED_NAME: &str = "watched";
/// Unmeasured changes at the start of each watch round (the first event on a new
/// stream also pays for things a steady stream does not).
const WATCH_WARMUP: u64 = 3;
/// A label nothing carries: the many open watches stay idle.
const IDLE_LABEL: &str = "tollgate.dev/bench-idle";
/// How long the many watches may take to be answered.
const MANY_WATCHES_ESTABLISH: Duration = Duration::from_secs(20);
/// Watches opened first, alone (see `try_many_watches`).
const MANY_WATCHES_FIRST: usize = 50;
/// The agent's count of answered watches (at the answer's head).
const WATCH_METRIC: &str =
    "tollgate_requests_total{verb=\"watch\",decision=\"allow\",code=\"200\"}";

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
    /// Changes of the watched ConfigMap per round (each delivered to both watchers).
    watch_changes: usize,
    /// Plain TCP connects per path for the connect hook's cost.
    connects: usize,
    /// Watch streams held open through the proxy while the agent's memory is read, and
    /// the connections they share.
    many_watches: usize,
    many_watch_connections: usize,
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
            watch_changes: 60,
            connects: 2000,
            many_watches: 1000,
            many_watch_connections: 10,
        }
    }

    /// What this plan measures less of than the full one, as `field: this (full: that)`.
    fn reductions(&self) -> Vec<String> {
        let (this, full) = match (
            serde_json::to_value(self),
            serde_json::to_value(Plan::full()),
        ) {
            (Ok(this), Ok(full)) => (this, full),
            _ => return Vec::new(),
        };
        let Some(full) = full.as_object() else {
            return Vec::new();
        };
        full.iter()
            .filter(|(k, v)| *k != "name" && this[k.as_str()] != **v)
            .map(|(k, v)| format!("{k}: {} (full: {v})", this[k.as_str()]))
            .collect()
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
            watch_changes: 25,
            connects: 1000,
            // DESIGN §9's figure is "with many open sessions": 1,000 in both modes.
            many_watches: 1000,
            many_watch_connections: 10,
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
    let mut profile = Profile::default();
    let mut rounds = None;
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
            "--phases" => {
                let keys = args.next().context("--phases needs phase keys")?;
                profile.phases = Some(keys.split(',').map(str::to_owned).collect());
            }
            "--rounds" => {
                rounds = Some(
                    args.next()
                        .context("--rounds needs a number")?
                        .parse::<usize>()
                        .context("--rounds needs a number")?,
                )
            }
            "--perf" => {
                profile.perf = Some(PathBuf::from(
                    args.next().context("--perf needs a directory")?,
                ))
            }
            "-h" | "--help" => {
                println!(
                    "usage: tollgate-bench [--quick] [--approvals-only] [--masking-only] [--out FILE] [--phases KEY,..] [--rounds N] [--perf DIR]"
                );
                return Ok(());
            }
            other => {
                bail!("unknown argument {other} (usage: tollgate-bench [--quick] [--out FILE])")
            }
        }
    }
    let mut plan = if quick { Plan::quick() } else { Plan::full() };
    if let Some(rounds) = rounds {
        plan.rounds = rounds;
    }
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
    runtime.block_on(bench(plan, out, profile))
}

/// A partial run for profiling (see the module documentation).
#[derive(Default)]
struct Profile {
    /// Only these phases (report keys); `None`: every phase and every other part.
    phases: Option<Vec<String>>,
    /// Record the agent with `perf` during the gateway runs, into this directory.
    perf: Option<PathBuf>,
}

impl Profile {
    fn runs(&self, key: &str) -> bool {
        self.phases
            .as_ref()
            .is_none_or(|keys| keys.iter().any(|k| k == key))
    }

    /// Whether the parts around the phases run (a full report).
    fn everything(&self) -> bool {
        self.phases.is_none()
    }
}

/// `perf record` attached to the agent while it lives.
struct PerfRecord(std::process::Child);

impl PerfRecord {
    fn start(pid: u32, file: &Path) -> Result<PerfRecord> {
        let child = std::process::Command::new("perf")
            .args([
                "record",
                "--quiet",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
            ])
            .arg("-p")
            .arg(pid.to_string())
            .arg("-o")
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        // perf needs a moment to attach before the load starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(PerfRecord(child))
    }

    /// Stops the recording (SIGINT, as at a terminal) and waits for the file.
    fn stop(mut self) {
        // SAFETY: kill with a child's own pid and a valid signal.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGINT);
        }
        let _ = self.0.wait();
    }
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

async fn bench(plan: Plan, out: PathBuf, profile: Profile) -> Result<()> {
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
    let masking = if profile.everything() {
        tollgate_tests::masking_bench::measure(plan.masking_rounds)
            .unwrap_or_else(|err| json!({ "error": format!("{err:#}") }))
    } else {
        json!({ "error": "not measured (--phases)" })
    };

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
    let cm_api: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    watch_bench::make_watched(&cm_api, WATCHED_NAME).await?;
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
    let phases: Vec<Phase> = phases.into_iter().filter(|p| profile.runs(p.key)).collect();
    if let Some(dir) = &profile.perf {
        std::fs::create_dir_all(dir)?;
    }
    // The agent's own background CPU (watches, timers, log), to read the per-request
    // figures against: it is included in them.
    let idle_before = agent_cpu_us(&agent);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu_us_per_s = idle_before
        .zip(agent_cpu_us(&agent))
        .map(|(b, a)| a.saturating_sub(b) as f64 / 2.0);
    // Memory at idle: started, its watches synced, nothing proxied yet.
    let agent_pid = agent_bench::agent_pid(&agent);
    let memory_idle = agent_pid
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|pid| agent_bench::memory(*pid));
    let proxied_before = proxied_counts(&agent)?;
    let env = Env {
        ns: &ns,
        direct: &direct,
        gateway: &gateway,
        load: &load,
        dir: &dir,
        ca: &ca,
        tokens: &tokens,
        plan: &plan,
    };
    // The kernel's statistics of the agent's programs, from here to the end of the
    // connect loops (the kernel adds two clock reads per program run meanwhile, on both
    // paths alike).
    let kernel_stats = agent_bench::KernelStats::enable();
    let programs_before = agent_bench::program_counters(&agent.bpffs);
    let agent_log_before = std::fs::metadata(&agent.log).map(|m| m.len()).unwrap_or(0);

    let mut samples: BTreeMap<(&str, Route), Samples> = BTreeMap::new();
    let mut sent_to_gateway: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut list_items = BTreeMap::new();
    // Per phase: the agent's CPU time (µs) while the gateway pod ran it, and requests.
    let mut agent_cpu: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    let measure_started = Instant::now();
    let total_limit = Duration::from_secs(plan.total_time_limit_s);
    let mut rounds_done = 0;
    let mut watch = WatchDelivery::default();
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
                let perf = match (&profile.perf, &agent_pid) {
                    (Some(dir), Ok(pid)) if path == Route::Gateway => Some(PerfRecord::start(
                        *pid,
                        &dir.join(format!("{}-r{}.data", phase.key, round + 1)),
                    )?),
                    _ => None,
                };
                let cpu_before = agent_cpu_us(&agent);
                let outcome = run_load(
                    pod,
                    &load,
                    &spec_file,
                    Duration::from_secs(plan.phase_time_limit_s + 60),
                )
                .with_context(|| format!("{} through the {} path", phase.key, path.name()))?;
                let cpu_after = agent_cpu_us(&agent);
                if let Some(perf) = perf {
                    perf.stop();
                }
                if path == Route::Gateway {
                    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
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
        if measure_started.elapsed() > total_limit {
            eprintln!(
                "bench: the time limit of {}s is reached; stopping after {rounds_done} round(s)",
                plan.total_time_limit_s
            );
            break 'rounds;
        }
        if profile.everything() {
            watch.round(&env, round, &mut samples).await;
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
    // The proxy's counts for the path check cover the measured phases only.
    let proxied_after = proxied_counts(&agent)?;
    sent_to_gateway.entry("watch").or_insert((0, 0)).0 += watch.gateway_watchers;
    let programs_after_phases = agent_bench::program_counters(&agent.bpffs);
    let memory_after_phases = agent_pid
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|pid| agent_bench::memory(*pid));
    let connect_hook = connect_hook(
        &env,
        &agent,
        kernel_stats.as_ref().err(),
        &programs_before,
        &programs_after_phases,
    );
    drop(kernel_stats);
    let many = if profile.everything() {
        many_watches(&env, &agent, agent_pid.as_ref().ok().copied()).await
    } else {
        json!({ "error": "not measured (--phases)" })
    };
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
    let mut report = report;
    report["latency"]["watch"]["added_by_gateway"] = watch.added_summary();
    if let Some(err) = &watch.first_error {
        report["latency"]["watch"]["error"] = json!(err);
    }
    report["connect_hook"] = connect_hook;
    report["agent_memory"] = json!({
        "pid": agent_pid.as_ref().ok(),
        "idle_after_start": memory_json(&memory_idle),
        "after_measured_phases": memory_json(&memory_after_phases),
        "open_watches": many,
    });
    // The approval release latency needs agents of its own on node 1.
    drop(direct);
    drop(gateway);
    drop(ns);
    drop(agent);
    println!(
        "approval release: {} round(s) per store",
        plan.approval_rounds
    );
    report["masking_throughput"] = masking;
    report["approval_release"] = if profile.everything() {
        approval_release(cluster, &agent_bin, plan.approval_rounds).await
    } else {
        json!({ "error": "not measured (--phases)" })
    };
    finish(&mut report, &plan, run_started.elapsed().as_secs_f64());
    print_table(&report);
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
    println!("report (JSON, every figure) written to {}", out.display());
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
    for (verb, code) in [("get", 200), ("list", 200), ("create", 201), ("watch", 200)] {
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
    for key in ["get", "get_secret", "list", "create", "watch"] {
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
    let p50_ratio_per_round = |key: &'static str| -> Vec<f64> {
        get(key, Route::Gateway)
            .per_round_p50_ms
            .iter()
            .zip(&get(key, Route::Direct).per_round_p50_ms)
            .map(|(g, d)| ratio(*g, *d))
            .collect()
    };
    let p50_per_round = p50_ratio_per_round("get");
    let watch_p50_per_round = p50_ratio_per_round("watch");
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
    let spreads = [
        ("get_p50_ratio", spread(&p50_per_round)),
        ("get_32_clients_ratio", spread(&tp32_per_round)),
        ("watch_p50_ratio", spread(&watch_p50_per_round)),
    ];
    let noisy = spreads.iter().any(|(_, s)| *s > NOISY_SPREAD);
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
        "watch_p50_per_round_ratio": watch_p50_per_round.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
        "noisy": noisy,
        // max ÷ min of the per-round ratios; over NOISY_SPREAD marks the run noisy.
        "noise": {
            "spread_limit": NOISY_SPREAD,
            "spreads": spreads.iter().map(|(k, s)| (k.to_string(), json!(round3(*s)))).collect::<serde_json::Map<_, _>>(),
        },
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

/// The one table: every figure of DESIGN §9, gateway against direct where there are
/// two paths, the agent's own figures in the gateway column, and the targets.
fn print_table(r: &Value) {
    let num = |v: &Value, digits: usize| {
        v.as_f64()
            .filter(|x| x.is_finite())
            .map_or("-".to_owned(), |x| format!("{x:.digits$}"))
    };
    let mib = |v: &Value| {
        v.as_f64()
            .map_or("-".to_owned(), |kib| format!("{:.1}", kib / 1024.0))
    };
    let verdict = |met: &Value| {
        if met.as_bool() == Some(true) {
            "met"
        } else {
            "NOT met"
        }
    };
    let row = |label: &str, direct: String, gateway: String, ratio: String, target: String| {
        println!("{label:<44} {direct:>10} {gateway:>10} {ratio:>7}   {target}");
    };
    let heading = |title: &str| println!("{title}");
    let t = &r["targets"];
    println!();
    println!(
        "Tollgate bench ({}, {} build, {} round(s)): one run, the two paths interleaved",
        r["plan"]["name"].as_str().unwrap_or("?"),
        r["build"].as_str().unwrap_or("?"),
        r["rounds_done"]
    );
    row(
        "",
        "direct".into(),
        "gateway".into(),
        "ratio".into(),
        "target".into(),
    );
    heading("latency (ms)");
    for (key, label) in [
        ("get", "get"),
        ("get_secret", "get secret (masked)"),
        ("list", "list 500"),
        ("create", "create"),
        ("watch", "watch event delivery"),
    ] {
        let l = &r["latency"][key];
        for q in ["p50", "p99"] {
            let target = if key == "get" && q == "p50" {
                format!(
                    "<= {TARGET_GET_P50_RATIO:.2}  {}",
                    verdict(&t["get_p50_met"])
                )
            } else {
                String::new()
            };
            row(
                &format!("  {label} {q}"),
                num(&l["direct"][format!("{q}_ms")], 2),
                num(&l["gateway"][format!("{q}_ms")], 2),
                num(&l[format!("ratio_{q}")], 2),
                target,
            );
        }
    }
    let added = &r["latency"]["watch"]["added_by_gateway"];
    row(
        "  watch: gateway minus direct, same event p50/p99",
        String::new(),
        format!("{}/{}", num(&added["p50_ms"], 2), num(&added["p99_ms"], 2)),
        String::new(),
        String::new(),
    );
    heading("throughput (requests/s)");
    for (key, label) in [
        ("get_1_client", "get, 1 client"),
        ("get_32_clients", "get, 32 clients"),
    ] {
        let tp = &r["throughput"][key];
        let target = if key == "get_32_clients" {
            format!(
                ">= {TARGET_THROUGHPUT_32_RATIO:.2}  {}",
                verdict(&t["throughput_32_met"])
            )
        } else {
            String::new()
        };
        row(
            &format!("  {label}"),
            num(&tp["direct"]["requests_per_s"], 0),
            num(&tp["gateway"]["requests_per_s"], 0),
            num(&tp["ratio"], 2),
            target,
        );
    }
    let hook = &r["connect_hook"];
    heading("connect hook (kernel statistics, ns per call; direct = exempt pod, not redirected)");
    if let Some(err) = hook["error"].as_str() {
        println!("  failed: {err}");
    } else {
        row(
            "  tg_connect4",
            num(&hook["not_redirected"]["connect4_ns_per_call"], 0),
            num(&hook["redirected"]["connect4_ns_per_call"], 0),
            num(&hook["connect4_ratio"], 2),
            String::new(),
        );
        row(
            "  all the agent's programs, per connect",
            num(&hook["not_redirected"]["all_programs_ns_per_connect"], 0),
            num(&hook["redirected"]["all_programs_ns_per_connect"], 0),
            String::new(),
            String::new(),
        );
        let phases = &hook["during_measured_phases"]["tg_connect4"];
        row(
            "  tg_connect4 over the measured phases",
            String::new(),
            num(&phases["ns_per_call"], 0),
            String::new(),
            format!("({} calls, both paths)", phases["calls"]),
        );
    }
    heading("agent CPU per proxied request (µs, its background included)");
    for (key, label) in [
        ("get", "get"),
        ("get_secret", "get secret"),
        ("list", "list 500"),
        ("create", "create"),
        ("get_32", "get, 32 clients"),
    ] {
        row(
            &format!("  {label}"),
            String::new(),
            num(&r["agent_cpu_us_per_request"][key], 0),
            String::new(),
            String::new(),
        );
    }
    let mem = &r["agent_memory"];
    let open = &mem["open_watches"];
    heading("agent memory (MiB resident)");
    row(
        "  idle after start",
        String::new(),
        mib(&mem["idle_after_start"]["rss_kib"]),
        String::new(),
        String::new(),
    );
    row(
        "  after the measured phases (peak)",
        String::new(),
        format!(
            "{} ({})",
            mib(&mem["after_measured_phases"]["rss_kib"]),
            mib(&mem["after_measured_phases"]["hwm_kib"])
        ),
        String::new(),
        String::new(),
    );
    if let Some(err) = open["error"].as_str() {
        println!("  with {} open watches: failed: {err}", open["watches"]);
    } else {
        let first = &open["first_stage"];
        row(
            &format!("  with {} watches open", first["established"]),
            String::new(),
            mib(&first["memory"]["rss_kib"]),
            String::new(),
            format!(
                "({} KiB per watch)",
                num(&open["rss_kib_per_open_watch"], 1)
            ),
        );
        row(
            &format!("  with {} watches asked for", open["watches"]),
            String::new(),
            mib(&open["with_watches_open"]["rss_kib"]),
            String::new(),
            format!(
                "({} answered, {} failed, {} waiting; {} KiB per watch)",
                open["established"],
                open["failed"],
                open["pending"],
                num(&open["rss_kib_per_watch_held"], 1)
            ),
        );
        let probe = &open["get_while_open"];
        println!(
            "  a get from the same pod meanwhile: {}",
            match probe["error"].as_str() {
                Some(err) => format!("no answer ({err})"),
                None => format!(
                    "{} answered, p50 {} ms",
                    probe["answered"],
                    num(&probe["p50_ms"], 2)
                ),
            }
        );
        if let Some(note) = open["note"].as_str() {
            println!("  NOTE: {note}");
        }
        row(
            "  after closing them",
            String::new(),
            mib(&open["after_closing"]["rss_kib"]),
            String::new(),
            String::new(),
        );
    }
    let m = &r["masking_throughput"];
    heading("masking (MB of input per CPU second, one thread)");
    if let Some(err) = m["error"].as_str() {
        println!("  failed: {err}");
    } else {
        for (key, label) in [
            ("secret_list", "Secret list"),
            ("secret_list_small_values", "Secret list, short values"),
            (
                "configmap_list_nothing_to_mask",
                "ConfigMap list, nothing to mask",
            ),
            ("secret_watch_events", "Secret watch events"),
        ] {
            let target = if key == "secret_list" {
                format!(
                    ">= {:.0}  {}",
                    tollgate_tests::masking_bench::TARGET_MB_PER_S,
                    verdict(&t["masking_met"])
                )
            } else {
                String::new()
            };
            row(
                &format!("  {label}"),
                String::new(),
                num(&m[key]["mb_per_cpu_s"], 0),
                String::new(),
                target,
            );
        }
    }
    heading("approval release, approve call -> held call complete (ms)");
    for (store, target) in TARGET_RELEASE_P50_MS {
        let e = &r["approval_release"][store];
        if let Some(err) = e["error"].as_str() {
            println!("  {store}: failed: {err}");
            continue;
        }
        row(
            &format!("  {store} store p50 (max)"),
            String::new(),
            format!("{} ({})", num(&e["p50_ms"], 1), num(&e["max_ms"], 0)),
            String::new(),
            format!("<= {target:.0}  {}", verdict(&e["met"])),
        );
    }
    println!();
    println!(
        "per-round ratios: get p50 {}; get req/s at 32 clients {}; watch delivery p50 {}",
        r["get_p50_per_round_ratio"],
        r["throughput"]["get_32_clients"]["per_round_ratio"],
        r["watch_p50_per_round_ratio"]
    );
    if r["noisy"].as_bool() == Some(true) {
        println!(
            "WARNING: the rounds disagree by more than {NOISY_SPREAD}x ({}): the machine was busy with something else; rerun before trusting these ratios",
            r["noise"]["spreads"]
        );
    }
    if let Some(err) = r["latency"]["watch"]["error"].as_str() {
        println!("watch delivery: {err}");
    }
    println!(
        "targets: {}",
        if t["all_met"].as_bool() == Some(true) {
            "all met"
        } else {
            "NOT all met"
        }
    );
    println!(
        "errors: {}; proxy counted the gateway pod's requests exactly: {}",
        r["errors"], r["path_check_ok"]
    );
    if let Some(reduced) = r["reduced_in_this_mode"]
        .as_array()
        .filter(|a| !a.is_empty())
    {
        let list: Vec<&str> = reduced.iter().filter_map(Value::as_str).collect();
        println!("quick mode measures less: {}", list.join("; "));
    }
    println!(
        "wall time: {:.0}s (the cluster phases {:.0}s)",
        r["total_s"].as_f64().unwrap_or(0.0),
        r["measuring_s"].as_f64().unwrap_or(0.0)
    );
}

/// What the cluster phases added for DESIGN §9 share: the namespace, the two pods, the
/// load generator and where its specs go.
struct Env<'a> {
    ns: &'a TestNamespace,
    direct: &'a RunningPod,
    gateway: &'a RunningPod,
    load: &'a Path,
    dir: &'a Path,
    ca: &'a Path,
    tokens: &'a BTreeMap<Route, PathBuf>,
    plan: &'a Plan,
}

impl Env<'_> {
    fn pod(&self, path: Route) -> &RunningPod {
        match path {
            Route::Direct => self.direct,
            Route::Gateway => self.gateway,
        }
    }

    /// Writes a tg-load spec for `path`: the common fields, then `fields` over them.
    fn spec(&self, path: Route, name: &str, fields: Value) -> Result<PathBuf> {
        let mut spec = json!({
            "server": format!("https://{CLUSTER_IP}:{CLUSTER_PORT}"),
            "ca_file": self.ca,
            "token_file": self.tokens[&path],
            "namespace": self.ns.name,
            "phase": "get",
            "requests": 0,
            "concurrency": 1,
            "warmup": 0,
            "time_limit_ms": self.plan.phase_time_limit_s * 1000,
        });
        if let (Some(spec), Some(fields)) = (spec.as_object_mut(), fields.as_object()) {
            for (k, v) in fields {
                spec.insert(k.clone(), v.clone());
            }
        }
        let file = self.dir.join(format!("{name}-{}.json", path.name()));
        std::fs::write(&file, serde_json::to_vec(&spec)?)?;
        Ok(file)
    }
}

/// Watch event delivery over the rounds: per round, a watcher in each pod on the same
/// ConfigMap, and changes of it made by the admin (this process) that both see. The
/// delay of an event is its arrival in the pod minus the moment its change was sent, so
/// it includes the API server's write; the gateway's share is the difference between
/// the two arrivals of the same event.
#[derive(Default)]
struct WatchDelivery {
    /// The next `data.seq` to write (unique over the run).
    next_seq: u64,
    /// Gateway arrival minus direct arrival of each event both saw, µs (negative when
    /// the gateway's came first).
    added_us: Vec<i64>,
    /// Watches the gateway pod opened (for the proxy's count check).
    gateway_watchers: usize,
    first_error: Option<String>,
}

impl WatchDelivery {
    /// One round; a failure is noted in the report and the other figures still count.
    async fn round(
        &mut self,
        env: &Env<'_>,
        round: usize,
        samples: &mut BTreeMap<(&'static str, Route), Samples>,
    ) {
        if let Err(err) = self.try_round(env, round, samples).await {
            eprintln!("bench: watch delivery, round {}: {err:#}", round + 1);
            self.first_error
                .get_or_insert(format!("round {}: {err:#}", round + 1));
        }
    }

    async fn try_round(
        &mut self,
        env: &Env<'_>,
        round: usize,
        samples: &mut BTreeMap<(&'static str, Route), Samples>,
    ) -> Result<()> {
        let plan = env.plan;
        let order = if round.is_multiple_of(2) {
            [Route::Direct, Route::Gateway]
        } else {
            [Route::Gateway, Route::Direct]
        };
        let mut watchers = BTreeMap::new();
        for path in order {
            let spec = env.spec(
                path,
                &format!("watch-{round}"),
                json!({
                    "phase": "watch",
                    "resource": "configmaps",
                    "watches": 1,
                    "label_selector": WATCH_LABEL,
                    "print_events": true,
                    "time_limit_ms": (plan.phase_time_limit_s + 30) * 1000,
                }),
            )?;
            watchers.insert(path, Watcher::start(env.pod(path), env.load, &spec)?);
        }
        for (path, w) in watchers.iter_mut() {
            let e = w
                .wait_established(Duration::from_secs(30))
                .with_context(|| format!("the {} watcher", path.name()))?;
            if e.established != 1 {
                bail!(
                    "the {} watcher's stream was not answered: {}",
                    path.name(),
                    w.other.join("; ")
                );
            }
            if *path == Route::Gateway {
                self.gateway_watchers += 1;
            }
        }
        let api: Api<ConfigMap> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
        let limit = Duration::from_secs(plan.phase_time_limit_s);
        let first = self.next_seq;
        let measured_from = first + WATCH_WARMUP;
        self.next_seq = measured_from + plan.watch_changes as u64;
        watch_bench::change(&api, WATCHED_NAME, first..measured_from, limit).await?;
        let sent =
            watch_bench::change(&api, WATCHED_NAME, measured_from..self.next_seq, limit).await?;
        if let Some((last, _)) = sent.last() {
            for w in watchers.values_mut() {
                // Events arrive in order: once the last is in, every one that will is.
                w.wait_for_seq(*last, Duration::from_secs(10));
            }
        }
        let mut delays = BTreeMap::new();
        for (path, w) in watchers.iter_mut() {
            w.stop(Duration::from_secs(10))
                .with_context(|| format!("stopping the {} watcher", path.name()))?;
            delays.insert(*path, watch_bench::delays_us(&sent, &w.arrivals));
        }
        for (path, d) in &delays {
            let seen: Vec<u64> = d.iter().flatten().copied().collect();
            let missed = d.len() - seen.len();
            let mut sorted = seen.clone();
            sorted.sort_unstable();
            let s = samples.entry(("watch", *path)).or_default();
            s.per_round_p50_ms.push(percentile(&sorted, 50.0) / 1000.0);
            s.latencies_us.extend(seen);
            s.ok += d.len() - missed;
            s.errors += missed;
            if missed > 0 && s.first_error.is_none() {
                s.first_error = Some(format!(
                    "round {}: {missed} of {} events never arrived",
                    round + 1,
                    d.len()
                ));
            }
        }
        for (d, g) in delays[&Route::Direct].iter().zip(&delays[&Route::Gateway]) {
            if let (Some(d), Some(g)) = (d, g) {
                self.added_us.push(*g as i64 - *d as i64);
            }
        }
        Ok(())
    }

    /// p50/p99 of the gateway's share of the delivery time (ms).
    fn added_summary(&self) -> Value {
        let mut v = self.added_us.clone();
        v.sort_unstable();
        let at = |p: f64| {
            if v.is_empty() {
                return Value::Null;
            }
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            json!(round3(v[rank.clamp(1, v.len()) - 1] as f64 / 1000.0))
        };
        json!({
            "events": v.len(),
            "p50_ms": at(50.0),
            "p99_ms": at(99.0),
            "what": "per event: arrival in the gateway pod minus arrival in the direct pod",
        })
    }
}

/// The connect hook's cost per call, from the kernel's statistics: over the measured
/// phases (every connect on node 1, either path), then in dedicated loops of plain TCP
/// connects from each pod (redirected from the gateway pod; not redirected from the
/// exempt one, where the program runs and leaves the connect alone). A failure goes in
/// the report.
fn connect_hook(
    env: &Env<'_>,
    agent: &RunningAgent,
    stats_error: Option<&anyhow::Error>,
    before: &Result<BTreeMap<String, agent_bench::ProgCounters>>,
    after_phases: &Result<BTreeMap<String, agent_bench::ProgCounters>>,
) -> Value {
    if let Some(err) = stats_error {
        return json!({ "error": format!("{err:#}") });
    }
    let (before, after) = match (before, after_phases) {
        (Ok(b), Ok(a)) => (b, a),
        (Err(err), _) | (_, Err(err)) => return json!({ "error": format!("{err:#}") }),
    };
    let mut out = json!({
        "during_measured_phases": agent_bench::program_delta(before, after),
        "what": "kernel run time (BPF_ENABLE_STATS) divided by run count; plain TCP connects to 10.96.0.1:443, no TLS",
    });
    for (key, path) in [
        ("redirected", Route::Gateway),
        ("not_redirected", Route::Direct),
    ] {
        out[key] = connect_loop(env, agent, path)
            .unwrap_or_else(|err| json!({ "error": format!("{err:#}") }));
    }
    let per_call = |key: &str| out[key]["connect4_ns_per_call"].as_f64();
    if let (Some(r), Some(n)) = (per_call("redirected"), per_call("not_redirected")) {
        out["connect4_ratio"] = json!(round3(ratio(r, n)));
    }
    out
}

fn connect_loop(env: &Env<'_>, agent: &RunningAgent, path: Route) -> Result<Value> {
    let spec = env.spec(
        path,
        "connect",
        json!({ "phase": "connect", "requests": env.plan.connects }),
    )?;
    let before = agent_bench::program_counters(&agent.bpffs)?;
    let outcome = run_load(
        env.pod(path),
        env.load,
        &spec,
        Duration::from_secs(env.plan.phase_time_limit_s + 60),
    )
    .with_context(|| format!("connect loop in the {} pod", path.name()))?;
    let after = agent_bench::program_counters(&agent.bpffs)?;
    let programs = agent_bench::program_delta(&before, &after);
    let all_ns: u64 = programs
        .as_object()
        .map(|m| m.values().filter_map(|p| p["run_time_ns"].as_u64()).sum())
        .unwrap_or(0);
    let mut lat = outcome.latencies_us.clone();
    lat.sort_unstable();
    Ok(json!({
        "pod": path.name(),
        "connects": outcome.ok,
        "errors": outcome.errors,
        "first_error": outcome.first_error,
        "connect_syscall_p50_us": percentile(&lat, 50.0),
        "connect4_calls": programs["tg_connect4"]["calls"],
        "connect4_ns_per_call": programs["tg_connect4"]["ns_per_call"].as_f64().map(round3),
        // Every program of the agent (connect, getpeername, sock_ops) over the loop.
        "all_programs_ns_per_connect": if outcome.ok > 0 { Some(round3(all_ns as f64 / outcome.ok as f64)) } else { None },
        "programs": programs,
    }))
}

/// The agent's memory with many watch streams open through it: tg-load in the gateway
/// pod opens them (idle: their selector matches nothing), the bench waits until the
/// agent has answered every one, reads the agent's memory, closes them, and reads it
/// again. A failure goes in the report.
async fn many_watches(env: &Env<'_>, agent: &RunningAgent, pid: Option<u32>) -> Value {
    println!(
        "opening {} watches through the proxy ({} connections)",
        env.plan.many_watches, env.plan.many_watch_connections
    );
    match try_many_watches(env, agent, pid).await {
        Ok(v) => v,
        Err(err) => {
            eprintln!("bench: open watches: {err:#}");
            json!({ "watches": env.plan.many_watches, "error": format!("{err:#}") })
        }
    }
}

async fn try_many_watches(env: &Env<'_>, agent: &RunningAgent, pid: Option<u32>) -> Result<Value> {
    let pid = pid.context("the agent's process id is unknown")?;
    let plan = env.plan;
    let before = agent_bench::memory(pid)?;
    // First a few, well under any per-connection stream limit: the cost of an open
    // watch when every one is answered. Then the rest, up to the plan's count.
    let first = MANY_WATCHES_FIRST.min(plan.many_watches);
    let (mut a, a_out) = open_watches(env, agent, pid, "first", first, 5).await?;
    let rest = plan.many_watches - first;
    let (b, b_out) = if rest > 0 {
        let (w, out) =
            open_watches(env, agent, pid, "rest", rest, plan.many_watch_connections).await?;
        (Some(w), out)
    } else {
        (None, Value::Null)
    };
    // Meanwhile, does another call from the same pod still get through?
    let probe = probe_get(env);
    let mut summaries = Vec::new();
    if let Some(mut b) = b {
        summaries.push(b.stop(Duration::from_secs(15))?);
    }
    summaries.push(a.stop(Duration::from_secs(15))?);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = agent_bench::memory(pid)?;

    let answered = |v: &Value| v["established"].as_u64().unwrap_or(0);
    let held = |v: &Value| answered(v) + v["pending"].as_u64().unwrap_or(0);
    let per = |stage: &Value, n: u64| {
        let rss = stage["memory"]["rss_kib"].as_f64()?;
        (n > 0).then(|| round3((rss - before.rss_kib as f64) / n as f64))
    };
    let last = if b_out.is_null() { &a_out } else { &b_out };
    let established = answered(&a_out) + answered(&b_out);
    let pending = b_out["pending"].as_u64().unwrap_or(0) + a_out["pending"].as_u64().unwrap_or(0);
    let mut out = json!({
        "watches": plan.many_watches,
        "established": established,
        "failed": a_out["failed"].as_u64().unwrap_or(0) + b_out["failed"].as_u64().unwrap_or(0),
        "pending": pending,
        "before": before,
        "first_stage": a_out,
        "second_stage": b_out,
        "with_watches_open": last["memory"],
        "after_closing": after,
        // Every stream answered: the cost of one open watch.
        "rss_kib_per_open_watch": per(&a_out, answered(&a_out)),
        // All of them, answered or still waiting in the agent.
        "rss_kib_per_watch_held": per(last, held(&a_out) + held(&b_out)),
        "get_while_open": probe,
        "load_summaries": summaries,
    });
    if pending > 0 {
        out["note"] = json!(format!(
            "only {established} of {} watches were answered within {}s; the others waited in the agent (its upstream multiplexes a node's calls over one HTTP/2 connection, and kube-apiserver allows 100 streams per connection unless --http2-max-streams-per-connection says more)",
            plan.many_watches,
            MANY_WATCHES_ESTABLISH.as_secs()
        ));
    }
    Ok(out)
}

/// Opens `n` idle watches from the gateway pod over `connections` connections, waits
/// (bounded) until they are answered and the agent has counted them, and reads the
/// agent's memory. The streams stay open until the returned watcher is stopped.
async fn open_watches(
    env: &Env<'_>,
    agent: &RunningAgent,
    pid: u32,
    stage: &str,
    n: usize,
    connections: usize,
) -> Result<(Watcher, Value)> {
    let counted_before = agent.metric(WATCH_METRIC)?;
    let spec = env.spec(
        Route::Gateway,
        &format!("watches-{stage}"),
        json!({
            "phase": "watch",
            "resource": "configmaps",
            "watches": n,
            "concurrency": connections,
            "label_selector": IDLE_LABEL,
            "establish_timeout_ms": MANY_WATCHES_ESTABLISH.as_millis() as u64,
            // Long enough for both stages and what follows; "stop" ends it sooner.
            "time_limit_ms": (3 * MANY_WATCHES_ESTABLISH + Duration::from_secs(60)).as_millis() as u64,
        }),
    )?;
    let started = Instant::now();
    let mut watcher = Watcher::start(env.gateway, env.load, &spec)?;
    let established = watcher.wait_established(MANY_WATCHES_ESTABLISH + Duration::from_secs(10))?;
    let establish_s = started.elapsed().as_secs_f64();
    // The agent counts a watch once it has passed its answer's head on; the streams are
    // then open on both sides of the proxy.
    let wait_started = Instant::now();
    let mut counted = 0.0;
    while wait_started.elapsed() < Duration::from_secs(10) {
        counted = agent.metric(WATCH_METRIC)? - counted_before;
        if counted >= established.established as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let what follows the head (session records, buffers) settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let memory = agent_bench::memory(pid)?;
    println!(
        "  {n} watches over {connections} connections: {} answered, {} failed, {} waiting ({establish_s:.1}s)",
        established.established, established.failed, established.pending
    );
    let out = json!({
        "requested": n,
        "connections": connections,
        "established": established.established,
        "failed": established.failed,
        "pending": established.pending,
        "first_error": watcher.other.iter().find(|l| l.starts_with("first error")),
        "counted_by_agent": counted,
        "establish_s": round3(establish_s),
        "memory": memory,
    });
    Ok((watcher, out))
}

/// A few `get`s from the gateway pod on a new connection, bounded at 10 s.
fn probe_get(env: &Env<'_>) -> Value {
    let run = || -> Result<Outcome> {
        let spec = env.spec(
            Route::Gateway,
            "probe-get",
            json!({ "phase": "get", "get_name": GET_NAME, "requests": 3, "warmup": 1, "time_limit_ms": 5000 }),
        )?;
        run_load(env.gateway, env.load, &spec, Duration::from_secs(10))
    };
    match run() {
        Ok(o) => {
            let mut lat = o.latencies_us.clone();
            lat.sort_unstable();
            json!({ "answered": o.ok, "errors": o.errors, "p50_ms": round3(percentile(&lat, 50.0) / 1000.0) })
        }
        Err(err) => json!({ "answered": 0, "error": format!("{err:#}") }),
    }
}

fn memory_json(m: &Result<agent_bench::Memory>) -> Value {
    match m {
        Ok(m) => json!(m),
        Err(err) => json!({ "error": format!("{err:#}") }),
    }
}

/// The targets of the parts measured after the main report (masking, approvals), what
/// quick mode measures less of, and the wall time.
fn finish(r: &mut Value, plan: &Plan, total_s: f64) {
    let masking = r["masking_throughput"]["secret_list"]["mb_per_cpu_s"].as_f64();
    r["targets"]["masking_secret_list_mb_per_s_min"] =
        json!(tollgate_tests::masking_bench::TARGET_MB_PER_S);
    r["targets"]["masking_secret_list_mb_per_s"] = json!(masking);
    r["targets"]["masking_met"] = json!(r["masking_throughput"]["met"].as_bool() == Some(true));
    for (store, target) in TARGET_RELEASE_P50_MS {
        let e = &r["approval_release"][store];
        let (p50, met) = (e["p50_ms"].clone(), e["met"].as_bool() == Some(true));
        r["targets"][format!("approval_release_{store}_p50_ms_max")] = json!(target);
        r["targets"][format!("approval_release_{store}_p50_ms")] = p50;
        r["targets"][format!("approval_release_{store}_met")] = json!(met);
    }
    let all_met = r["targets"]
        .as_object()
        .map(|t| {
            t.iter()
                .filter(|(k, _)| k.ends_with("_met"))
                .all(|(_, v)| v.as_bool() == Some(true))
        })
        .unwrap_or(false);
    r["targets"]["all_met"] = json!(all_met);
    r["reduced_in_this_mode"] = json!(plan.reductions());
    r["total_s"] = json!(round3(total_s));
}
