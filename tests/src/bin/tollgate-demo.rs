//! `tollgate-demo`, run by `cargo xtask demo`: Tollgate's whole story, unattended, on
//! the local control plane and simulated node 1 (`tollgate_tests::story`, the steps the
//! `e2e` suite asserts). A coding agent's `kubectl apply` is held; the reviewer reads the
//! dry-run diff and approves with the CLI; the apply completes; the agent's read of a
//! Secret comes back masked; its delete is refused with the rule's reason; its session
//! is listed, shown and verified. Every step prints a headline and the real output.
//!
//! `--interactive`: at the approval, print the command a person runs (and a script
//! that runs it) and wait for their decision instead of approving.
//!
//! Everything the demo makes is removed at the end, also on failure or Ctrl-C; the
//! control plane stays up for the next run (`cargo xtask cluster down` stops it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tollgate_tests::story::{self, Held, Story, StoryOptions};

/// How long a person has to decide in `--interactive` mode.
const HAND_REVIEW_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Evidence shown per command, at most (the rest is counted).
const MAX_LINES: usize = 60;
/// Where long lines are cut: the last-applied annotation in a diff, and the patch
/// kubectl quotes in an error, are one line of JSON each.
const MAX_WIDTH: usize = 150;

fn main() -> ExitCode {
    let interactive = match parse_args() {
        Ok(interactive) => interactive,
        Err(err) => {
            eprintln!("tollgate-demo: {err:#}");
            return ExitCode::from(2);
        }
    };
    match run(interactive) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if story::interrupted() => {
            eprintln!("tollgate-demo: interrupted; everything it made is removed");
            // 128 + SIGINT, as a shell reports it.
            ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("\ntollgate-demo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> Result<bool> {
    let mut interactive = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--interactive" => interactive = true,
            "-h" | "--help" => {
                println!("usage: tollgate-demo [--interactive]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; usage: tollgate-demo [--interactive]"),
        }
    }
    Ok(interactive)
}

fn run(interactive: bool) -> Result<()> {
    if !is_root() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    // The CLIs the demo runs log at info by default; their lines would interleave with
    // the story. Set before any thread starts (the agent itself logs to its file).
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    stop_on_signals();
    let agent_bin = sibling("tg-agent")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let started = Instant::now();

    println!("Tollgate demo: a coding agent's kubectl calls, held for review, masked, refused");
    println!("and recorded. Lines after `|` are the real output of the command above them.");
    println!();
    println!("Setting up: the local control plane, simulated node 1, the scene and the agent...");
    let mut options = StoryOptions::new(agent_bin);
    if interactive {
        options.hold_timeout = HAND_REVIEW_TIMEOUT;
    }
    let (mut story, set_up) = runtime.block_on(Story::set_up(options))?;
    let set_up_took = started.elapsed();
    println!(
        "  control plane {}; namespace {} holds Deployment {} ({} replicas, image {})",
        set_up.control_plane,
        set_up.namespace,
        story::DEPLOYMENT,
        story::REPLICAS_BEFORE,
        story::IMAGE_BEFORE
    );
    println!(
        "  and Secret {}; pod {} (service account {}, label tollgate.dev/enforce=true)",
        story::SECRET,
        story::AGENT_POD,
        story::AGENT_POD
    );
    println!(
        "  runs on {}; reviewer {} is a service account of {}.",
        set_up.node,
        story::REVIEWER,
        set_up.reviewers_namespace
    );
    println!(
        "  The Tollgate agent runs on {} (REST API {}, approvals as custom resources):",
        set_up.node, set_up.api_url
    );
    println!(
        "    {:<30} deny deletes of deployments, statefulsets, configmaps",
        story::DENY_RULE
    );
    println!(
        "    {:<30} hold their creates, updates, patches for 1 approval by group",
        story::REVIEW_RULE
    );
    println!(
        "    {:<30} system:serviceaccounts:{}",
        "", set_up.reviewers_namespace
    );
    println!("    {:<30} allow the rest; mask Secret values", "(default)");
    println!("  Set up in {:.1}s.", set_up_took.as_secs_f64());

    let result = tell(&mut story, interactive);
    if let Err(err) = &result {
        if !story::interrupted() {
            eprintln!("\n{err:#}\n{}", story.agent_log_tail());
        }
    }
    println!();
    println!("Cleaning up: the agent and its kernel programs, the pod, the namespaces, the files.");
    let cleanup_started = Instant::now();
    drop(story);
    drop(runtime);
    println!(
        "  Done in {:.1}s. The control plane stays up for the next run (`cargo xtask cluster down`).",
        cleanup_started.elapsed().as_secs_f64()
    );
    result?;
    println!();
    println!(
        "Total: {:.1}s (set-up {:.1}s).",
        started.elapsed().as_secs_f64(),
        set_up_took.as_secs_f64()
    );
    Ok(())
}

/// The steps, a to g.
fn tell(story: &mut Story, interactive: bool) -> Result<()> {
    let pod = format!("pod {} $", story::AGENT_POD);
    let reviewer = format!("{} $", story::REVIEWER);

    let step = Instant::now();
    let held = story.hold_an_apply()?;
    headline(
        "a",
        "The coding agent rolls out checkout 1.5; Tollgate holds the apply",
        step,
    );
    command(&pod, &held.command);
    println!(
        "  (the manifest: {} replicas, image {})",
        story::REPLICAS_AFTER,
        story::IMAGE_AFTER
    );
    println!(
        "  kubectl waits. Tollgate filed approval {} (rule {}); the admin sees it:",
        held.approval_id,
        story::REVIEW_RULE
    );
    command(
        "admin $",
        &format!("kubectl get approvalrequests -n {}", story.ns.name),
    );
    evidence(&held.approval_requests);
    println!(
        "  The Deployment is unchanged meanwhile: {} replicas, image {}.",
        held.live_while_held.replicas, held.live_while_held.image
    );

    let step = Instant::now();
    let shown = story.show_dry_run(&held)?;
    headline(
        "b",
        "The reviewer reads the call and the API server's dry-run diff",
        step,
    );
    command(&reviewer, &shown.command);
    evidence_cut(&shown.shown, MAX_WIDTH);

    let step = Instant::now();
    let decided = if interactive {
        decide_by_hand(story, &held)?
    } else {
        let decided = story.approve(&held)?;
        headline("c", "The reviewer approves with the CLI", step);
        command(&reviewer, &decided.command);
        evidence(&decided.output);
        decided
    };
    println!(
        "  Decision on record: {} by {} ({:?}).",
        decided.state, decided.reviewer, decided.reason
    );

    let step = Instant::now();
    let applied = story.finish_apply(&held)?;
    let approved = decided.state == "Approved";
    headline(
        "d",
        if approved {
            "The apply completes: kubectl, waiting since step a, prints its own line"
        } else {
            "The apply is refused: kubectl prints the reviewer's reason"
        },
        step,
    );
    println!("  {pod} {} (continued)", held.command);
    for line in &applied.kubectl_lines {
        let line = line.strip_prefix("stderr: ").unwrap_or(line);
        // A refusal quotes the whole patch on one line: cut that one only, the
        // reviewer's reason is at the end of a later line.
        if line.starts_with('{') {
            evidence_cut(line, MAX_WIDTH);
        } else {
            evidence(line);
        }
    }
    println!(
        "  The admin reads the Deployment: {} replicas, image {}{}.",
        applied.live_after.replicas,
        applied.live_after.image,
        match applied.execution_code {
            Some(code) => format!(" (the approved call was answered HTTP {code})"),
            None => String::new(),
        }
    );

    let step = Instant::now();
    let secret = story.read_secret()?;
    headline(
        "e",
        "The coding agent reads the database password: masked",
        step,
    );
    command(&pod, &secret.command);
    evidence(&secret.in_pod);
    println!("  The same read by the admin (not through Tollgate) shows the value is real:");
    command("admin $", &secret.command);
    evidence(&secret.by_admin);

    let step = Instant::now();
    let delete = story.delete_workload()?;
    headline(
        "f",
        "The coding agent tries to delete the Deployment: refused, with the rule's reason",
        step,
    );
    command(&pod, &delete.command);
    evidence(&delete.stderr);
    match &delete.still_there {
        Some(state) => println!(
            "  The Deployment is still there ({} replicas, image {}).",
            state.replicas, state.image
        ),
        None => println!("  The Deployment is GONE: the delete went through!"),
    }

    let step = Instant::now();
    let replayed = story.replay_session(&held)?;
    headline(
        "g",
        "The recording: every connection of the pod is a session, chained by hashes",
        step,
    );
    command("node $", "tg-agent sessions list");
    evidence(&replayed.list);
    println!("  The apply's session (the approval names it), exchange by exchange:");
    command(
        "node $",
        &format!("tg-agent sessions show {}", replayed.session),
    );
    // The header as printed; the exchanges without their query strings (kubectl's
    // openapi hashes make the table too wide to read), from `show -o json`.
    let header = replayed
        .shown
        .split("\nExchanges:")
        .next()
        .unwrap_or_default();
    evidence(header);
    println!("  | Exchanges (query strings dropped):");
    evidence(&exchange_table(replayed.exchanges()));
    command("node $", "tg-agent sessions verify");
    evidence(&replayed.verify);
    if !replayed.verified {
        bail!("sessions verify failed");
    }
    Ok(())
}

/// SEQ, VERB, PATH, CODE, DECISION of each exchange, aligned.
fn exchange_table(exchanges: &[serde_json::Value]) -> String {
    let rows: Vec<[String; 5]> = exchanges
        .iter()
        .map(|e| {
            let uri = e["requestURI"].as_str().unwrap_or("");
            let mut decision = e["decision"]["action"].as_str().unwrap_or("").to_owned();
            if let Some(rule) = e["decision"]["rule"].as_str() {
                decision.push_str(&format!(" ({rule})"));
            }
            if let Some(approval) = e["approvalID"].as_str() {
                decision.push_str(&format!(" {approval}"));
            }
            [
                e["seq"].to_string(),
                e["verb"].as_str().unwrap_or("").to_owned(),
                uri.split('?').next().unwrap_or(uri).to_owned(),
                e["code"].to_string(),
                decision,
            ]
        })
        .collect();
    let header = ["SEQ", "VERB", "PATH", "CODE", "DECISION"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut table = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        table.push_str(cells.join("  ").trim_end());
        table.push('\n');
    }
    table
}

/// Step c with a person: print what to run, then wait for their decision.
fn decide_by_hand(story: &Story, held: &Held) -> Result<story::Decided> {
    let review = story.review_by_hand(held)?;
    println!();
    println!("c. A person decides (--interactive)");
    println!("  In another terminal, as root, run one of:");
    let script = review.script.display();
    println!("    {script} show");
    println!("    {script} approve \"your reason\"");
    println!("    {script} deny \"your reason\"");
    println!("  `approve` runs the reviewer's CLI against this node's agent:");
    println!("    {}", review.approve_command);
    println!(
        "  Waiting for a decision (up to {} minutes; Ctrl-C stops the demo and cleans up)...",
        HAND_REVIEW_TIMEOUT.as_secs() / 60
    );
    let step = Instant::now();
    let decided = story.wait_for_decision(held, HAND_REVIEW_TIMEOUT)?;
    println!(
        "  Decided after {:.1}s: {}.",
        step.elapsed().as_secs_f64(),
        decided.state
    );
    Ok(decided)
}

fn headline(letter: &str, text: &str, started: Instant) {
    println!();
    println!(
        "{letter}. {text}  [{:.2}s]",
        started.elapsed().as_secs_f64()
    );
}

fn command(who: &str, line: &str) {
    println!("  {who} {line}");
}

/// The output lines, indented behind `|`, at most MAX_LINES of them.
fn evidence(text: &str) {
    evidence_cut(text, usize::MAX);
}

/// The same, each line cut at `width` characters.
fn evidence_cut(text: &str, width: usize) {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    for line in lines.iter().take(MAX_LINES) {
        let line = line.trim_end();
        match line.char_indices().nth(width) {
            Some((cut, _)) => println!("  | {}...", &line[..cut]),
            None => println!("  | {line}"),
        }
    }
    if lines.len() > MAX_LINES {
        println!("  | ... ({} more lines)", lines.len() - MAX_LINES);
    }
}

/// A binary built beside this one (`cargo xtask demo` builds them together).
fn sibling(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()
        .context("locating the demo binary")?
        .with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing; run the demo with `cargo xtask demo`, which builds it",
            path.display()
        );
    }
    Ok(path)
}

/// Ctrl-C or SIGTERM: the story stops at its next wait and everything is cleaned up,
/// instead of the process dying with the namespaces, the agent and its pins left
/// behind. A second one ends the demo at once.
fn stop_on_signals() {
    extern "C" fn on_signal(signal: libc::c_int) {
        story::interrupt();
        // SAFETY: signal() is async-signal-safe; the next one takes the default action.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
