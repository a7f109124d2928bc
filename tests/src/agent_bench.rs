//! What the kernel and the process table say about a running agent, for `cargo xtask
//! bench` (DESIGN §9): the run counts and run times of its eBPF programs (the cost of
//! the connect hook per call) and its memory.
//!
//! The programs are found through the links the agent pinned under its bpffs directory;
//! their statistics come from `bpftool prog show` while the kernel keeps statistics
//! (`BPF_ENABLE_STATS`, held by [`KernelStats`]). The agent's process is the one process
//! of the cgroup the harness runs it in.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::agent::RunningAgent;
use crate::cluster::controlplane;

/// The kernel keeps run statistics for every BPF program while this lives (a reference
/// count in the kernel: other holders, such as the datapath suite, are not disturbed).
pub struct KernelStats {
    _fd: OwnedFd,
}

impl KernelStats {
    pub fn enable() -> Result<KernelStats> {
        let fd = gateway_agent::datapath::enable_stats().context("enabling BPF statistics")?;
        Ok(KernelStats { _fd: fd })
    }
}

/// One program's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgCounters {
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// The agent's attached programs, by name (`tg_connect4`, ...), and their counters now.
pub fn program_counters(bpffs: &Path) -> Result<BTreeMap<String, ProgCounters>> {
    let status = gateway_agent::datapath::status(bpffs)
        .with_context(|| format!("reading the pins under {}", bpffs.display()))?;
    let mut out = BTreeMap::new();
    for (name, id) in status.links {
        let Some(id) = id else { continue };
        let output = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string(), "--json"])
            .output()
            .context("running bpftool (installed by `cargo xtask setup`)")?;
        if !output.status.success() {
            bail!(
                "bpftool prog show id {id} ({name}): {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let v: Value = serde_json::from_slice(&output.stdout).context("bpftool's JSON")?;
        // bpftool leaves the fields out while they are zero.
        out.insert(
            name,
            ProgCounters {
                run_cnt: v["run_cnt"].as_u64().unwrap_or(0),
                run_time_ns: v["run_time_ns"].as_u64().unwrap_or(0),
            },
        );
    }
    if out.is_empty() {
        bail!("no program is attached under {}", bpffs.display());
    }
    Ok(out)
}

/// Per program: calls and ns per call between two readings.
pub fn program_delta(
    before: &BTreeMap<String, ProgCounters>,
    after: &BTreeMap<String, ProgCounters>,
) -> Value {
    let mut out = serde_json::Map::new();
    for (name, a) in after {
        let b = before.get(name).copied().unwrap_or_default();
        let calls = a.run_cnt.saturating_sub(b.run_cnt);
        let ns = a.run_time_ns.saturating_sub(b.run_time_ns);
        out.insert(
            name.clone(),
            json!({
                "calls": calls,
                "run_time_ns": ns,
                "ns_per_call": if calls > 0 { Some(ns as f64 / calls as f64) } else { None },
            }),
        );
    }
    Value::Object(out)
}

/// The cgroup the harness runs node `node`'s agent in.
fn agent_cgroup(agent: &RunningAgent) -> Result<PathBuf> {
    Ok(controlplane::cgroup_root()?
        .join("system.slice")
        .join(format!("tollgate-agent-{}.service", agent.node.name)))
}

/// The agent's process id: the process of its cgroup whose program is the agent's.
pub fn agent_pid(agent: &RunningAgent) -> Result<u32> {
    let procs = agent_cgroup(agent)?.join("cgroup.procs");
    let text =
        std::fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
    let bin = agent.bin.file_name().unwrap_or_default();
    for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.file_name() == Some(bin) {
            return Ok(pid);
        }
    }
    bail!("no {bin:?} process in {}", procs.display())
}

/// Resident memory of a process, KiB.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss_kib: u64,
    /// VmHWM: the most it has been resident.
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Ok(Memory {
        rss_kib: field("VmRSS:").context("no VmRSS")?,
        hwm_kib: field("VmHWM:").context("no VmHWM")?,
    })
}
