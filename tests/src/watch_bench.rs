//! Watch streams for `cargo xtask bench` (DESIGN §9): the delivery time of watch
//! events, direct against gateway, and many open watches held through the proxy while
//! the agent's memory is read.
//!
//! Both run the load generator `tg-load` in its `watch` mode inside a pod: it prints a
//! JSON line once its streams are answered, one per event when asked (with the wall-clock
//! time the event arrived), and stops when its standard input closes. The pods share the
//! bench's kernel and clock, so an event's arrival time and the time the bench sent the
//! change compare directly.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};

use crate::cluster::RunningPod;

/// The label the watched ConfigMap carries (and the delivery watchers select on).
pub const WATCH_LABEL: &str = "tollgate.dev/bench-watch";

/// A `tg-load watch` running in a pod.
pub struct Watcher {
    child: Child,
    /// Closing it tells tg-load to stop.
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Events seen so far: `data.seq` -> arrival (ns since the epoch), first arrival only.
    pub arrivals: BTreeMap<u64, u128>,
    /// Standard error and lines that were not events, for error messages.
    pub other: Vec<String>,
}

/// What tg-load said once its streams were answered.
#[derive(Debug, Clone, Copy)]
pub struct Established {
    pub established: usize,
    pub failed: usize,
    /// Streams with no answer yet when tg-load reported.
    pub pending: usize,
}

impl Watcher {
    /// Starts `load SPEC` inside `pod` (the spec's phase must be `watch`).
    pub fn start(pod: &RunningPod, load: &Path, spec: &Path) -> Result<Watcher> {
        let mut child = pod
            .command(load)?
            .arg(spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tg-load watch in the pod")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        let lines = crate::cluster::harness::line_channel(stdout, stderr);
        Ok(Watcher {
            child,
            stdin,
            lines,
            arrivals: BTreeMap::new(),
            other: Vec::new(),
        })
    }

    /// Takes one line: events go to `arrivals`; returns the others parsed.
    fn take(&mut self, line: String) -> Option<Value> {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            self.other.push(line);
            return None;
        };
        if let Some(event) = v.get("event") {
            let t = event["t_ns"].as_str().and_then(|t| t.parse::<u128>().ok());
            let seq = event["seq"].as_str().and_then(|s| s.parse::<u64>().ok());
            if let (Some(t), Some(seq)) = (t, seq) {
                self.arrivals.entry(seq).or_insert(t);
            }
            return None;
        }
        self.other.push(line);
        Some(v)
    }

    /// Waits (bounded) for the line saying the streams are answered.
    pub fn wait_established(&mut self, timeout: Duration) -> Result<Established> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = self.take(line) {
                        if let Some(n) = v["established"].as_u64() {
                            if let Some(err) = v["first_error"].as_str() {
                                self.other.push(format!("first error: {err}"));
                            }
                            return Ok(Established {
                                established: n as usize,
                                failed: v["failed"].as_u64().unwrap_or(0) as usize,
                                pending: v["pending"].as_u64().unwrap_or(0) as usize,
                            });
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("tg-load watch exited early: {}", self.other.join("\n"))
                }
            }
        }
        bail!(
            "tg-load watch did not report its streams within {timeout:?}: {}",
            self.other.join("\n")
        )
    }

    /// Reads lines until an event with `seq` has arrived or `timeout` passes.
    pub fn wait_for_seq(&mut self, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.arrivals.contains_key(&seq) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.take(line);
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Closes its standard input (tg-load's "stop"), reads what is left and waits
    /// (bounded) for it to exit, killing it if it overruns. Returns the final summary.
    pub fn stop(&mut self, timeout: Duration) -> Result<Value> {
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        let mut done = Value::Null;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = self.take(line) {
                        if v.get("done").is_some() {
                            done = v;
                        }
                    }
                }
                // Both pipes closed: the process has ended.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => break,
            }
        }
        let exited =
            self.child.try_wait()?.is_some() || wait_child(&mut self.child, Duration::from_secs(2));
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            bail!("tg-load watch did not stop within {timeout:?} and was killed");
        }
        if done.is_null() {
            bail!(
                "tg-load watch ended without its summary: {}",
                self.other.join("\n")
            );
        }
        Ok(done)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // A watcher dropped on an error path: it must not outlive the bench.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Wall clock now, in ns since the epoch (the clock tg-load stamps events with).
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The watched ConfigMap: `name`, labelled [`WATCH_LABEL`], its `seq` unset.
pub async fn make_watched(api: &Api<ConfigMap>, name: &str) -> Result<()> {
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(WATCH_LABEL.to_owned(), "1".to_owned())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("seq".to_owned(), "none".to_owned())])),
        ..Default::default()
    };
    api.create(&Default::default(), &cm)
        .await
        .context("creating the watched ConfigMap")?;
    Ok(())
}

/// Sets the watched ConfigMap's `data.seq` to each of `seqs` in turn, one change after
/// the other (each waits for the API server's answer), stopping early at `time_limit`.
/// Returns `(seq, ns since the epoch just before the change was sent)` per change made.
pub async fn change(
    api: &Api<ConfigMap>,
    name: &str,
    seqs: std::ops::Range<u64>,
    time_limit: Duration,
) -> Result<Vec<(u64, u128)>> {
    let started = Instant::now();
    let mut sent = Vec::with_capacity(seqs.clone().count());
    for seq in seqs {
        if started.elapsed() > time_limit {
            break;
        }
        let patch = json!({"data": {"seq": seq.to_string()}});
        let t0 = now_ns();
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("changing the watched ConfigMap (seq {seq})"))?;
        sent.push((seq, t0));
    }
    Ok(sent)
}

/// Delivery delay (µs) of each change a watcher saw: arrival minus send time.
pub fn delays_us(sent: &[(u64, u128)], arrivals: &BTreeMap<u64, u128>) -> Vec<Option<u64>> {
    sent.iter()
        .map(|(seq, t0)| {
            arrivals
                .get(seq)
                .map(|t| (t.saturating_sub(*t0) / 1000) as u64)
        })
        .collect()
}
