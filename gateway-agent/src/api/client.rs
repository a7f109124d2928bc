//! `gateway-agent approvals ...`: the reviewer's CLI over the REST API.
//!
//! Credentials come from the reviewer's kubeconfig, as kubectl's do: the kubeconfig is
//! loaded with kube-rs (which runs exec plugins, reads token files and refreshes), and
//! only the server it talks to is swapped for Tollgate's. The Tollgate API's serving
//! certificate is issued from the cluster CA, so the kubeconfig's CA verifies it unless
//! `--certificate-authority` says otherwise.
//!
//! As a kubectl plugin: `ln -s $(command -v gateway-agent) /usr/local/bin/kubectl-tollgate`
//! and `kubectl tollgate approvals list` runs this (see [`plugin_args`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::TryStreamExt;
use http::{Method, Request};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::WatchEvent;

use crate::approvals::model::{parse_rfc3339, ApprovalRequest, State};

/// Review held API calls: list, show, approve, deny, watch.
#[derive(clap::Args, Debug)]
pub struct ApprovalsArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

/// Where the API is and who the reviewer is.
#[derive(clap::Args, Debug)]
struct Connection {
    /// The Tollgate REST API (e.g. https://tollgate.example:15444).
    #[arg(long, env = "TOLLGATE_SERVER", global = true)]
    server: Option<String>,
    /// CA bundle (PEM) that signed the API's certificate; default: the kubeconfig
    /// cluster's CA.
    #[arg(long, global = true)]
    certificate_authority: Option<PathBuf>,
    /// Kubeconfig to take credentials from; default: $KUBECONFIG or ~/.kube/config.
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context; default: the current one.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Bearer token to use instead of the kubeconfig's credentials.
    #[arg(long, env = "TOLLGATE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// List approvals, newest first.
    List {
        /// Only approvals in this state (pending, approved, denied, expired, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only calls from pods of this namespace (what a reviewer whose rights are in
        /// one namespace passes).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Show one approval: the call, who made it, the steps, decisions and dry-run diff.
    Show { id: String },
    /// Approve the current step of an approval.
    Approve {
        id: String,
        /// Why (recorded on the approval).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Deny an approval; the requester sees the reason.
    Deny {
        id: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
    /// Print a line for each new or changed approval until interrupted.
    Watch {
        /// Only approvals in this state.
        #[arg(long)]
        state: Option<String>,
        /// Only calls from pods of this namespace.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
}

impl ApprovalsArgs {
    /// Runs the command; exit code 1 when the server refused it (its Status message is
    /// printed).
    pub fn run(self) -> Result<ExitCode> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        runtime.block_on(self.run_async())
    }

    async fn run_async(self) -> Result<ExitCode> {
        let output = self.connection.output;
        let client = self.connection.client().await?;
        let result = match self.command {
            Command::List { state, namespace } => {
                list(&client, state.as_deref(), namespace.as_deref(), output).await
            }
            Command::Show { id } => show(&client, &id, output).await,
            Command::Approve { id, reason } => {
                decide(&client, &id, "approve", &reason, output).await
            }
            Command::Deny { id, reason } => decide(&client, &id, "deny", &reason, output).await,
            Command::Watch { state, namespace } => {
                watch(&client, state.as_deref(), namespace.as_deref(), output).await
            }
        };
        match result {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(err) => match err.downcast_ref::<kube::Error>() {
                Some(kube::Error::Api(status)) => {
                    eprintln!("Error from server ({}): {}", status.reason, status.message);
                    if status.code == 401 && !self.connection.has_bearer_credentials() {
                        eprintln!(
                            "hint: the Tollgate API takes bearer tokens only; this kubeconfig user has \
                             none (client certificates are not accepted): pass --token"
                        );
                    }
                    Ok(ExitCode::FAILURE)
                }
                _ => Err(err),
            },
        }
    }
}

impl Connection {
    /// A kube client for the Tollgate API with the kubeconfig's credentials.
    async fn client(&self) -> Result<kube::Client> {
        let server = self
            .server
            .as_deref()
            .filter(|s| !s.is_empty())
            .context("no server: pass --server https://<host>:15444 or set TOLLGATE_SERVER")?;
        let url: http::Uri = server
            .parse()
            .with_context(|| format!("--server {server:?} is not a URL"))?;
        if url.scheme_str() != Some("https") {
            bail!("--server {server:?} must be an https URL (the API carries bearer tokens)");
        }
        let kubeconfig = match &self.kubeconfig {
            Some(path) => Some(
                Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?,
            ),
            // Without a kubeconfig, a token and a CA are enough.
            None if self.token.is_some() && self.certificate_authority.is_some() => {
                Kubeconfig::read().ok()
            }
            None => Some(Kubeconfig::read().context("reading the kubeconfig")?),
        };
        let mut config = match kubeconfig {
            Some(kubeconfig) => {
                let options = KubeConfigOptions {
                    context: self.context.clone(),
                    ..KubeConfigOptions::default()
                };
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .context("loading the kubeconfig")?
            }
            None => kube::Config::new(url.clone()),
        };
        config.cluster_url = url;
        // Settings that were about the API server's certificate do not carry over.
        config.tls_server_name = None;
        config.accept_invalid_certs = false;
        if let Some(ca) = &self.certificate_authority {
            config.root_cert = Some(read_ca(ca)?);
            config.root_cert_file = None;
        }
        if let Some(token) = &self.token {
            // Through kube's own auth layer, so exactly one Authorization header goes
            // out (the kubeconfig user's credentials are dropped).
            config.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))
                .context("using --token")?;
        }
        kube::Client::try_from(config).context("building the API client")
    }

    /// Whether some bearer credential will be sent (for the 401 hint).
    fn has_bearer_credentials(&self) -> bool {
        if self.token.is_some() {
            return true;
        }
        let kubeconfig = match &self.kubeconfig {
            Some(path) => Kubeconfig::read_from(path).ok(),
            None => Kubeconfig::read().ok(),
        };
        let Some(kubeconfig) = kubeconfig else {
            return false;
        };
        let context = self
            .context
            .clone()
            .or(kubeconfig.current_context.clone())
            .unwrap_or_default();
        let user = kubeconfig
            .contexts
            .iter()
            .find(|c| c.name == context)
            .and_then(|c| c.context.as_ref())
            .and_then(|c| c.user.clone())
            .unwrap_or_default();
        kubeconfig
            .auth_infos
            .iter()
            .find(|a| a.name == user)
            .and_then(|a| a.auth_info.as_ref())
            .is_some_and(|a| {
                a.token.is_some()
                    || a.token_file.is_some()
                    || a.exec.is_some()
                    || a.auth_provider.is_some()
            })
    }
}

fn read_ca(path: &Path) -> Result<Vec<Vec<u8>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs: Vec<Vec<u8>> = rustls_pemfile::certs(&mut pem.as_slice())
        .filter_map(|c| c.ok())
        .map(|c| c.to_vec())
        .collect();
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// `kubectl-tollgate X...` → `gateway-agent X...`: when the binary is installed as the
/// kubectl plugin `kubectl-tollgate`, kubectl runs it with that name and the words after
/// `kubectl tollgate`; everything else is passed through unchanged.
pub fn plugin_args(args: Vec<OsString>) -> Vec<OsString> {
    let is_plugin = args
        .first()
        .and_then(|argv0| Path::new(argv0).file_name())
        .is_some_and(|name| name == "kubectl-tollgate");
    if !is_plugin {
        return args;
    }
    let mut mapped = Vec::with_capacity(args.len());
    mapped.push(OsString::from("gateway-agent"));
    mapped.extend(args.into_iter().skip(1));
    mapped
}

fn checked_state(state: Option<&str>) -> Result<Option<State>> {
    state
        .map(|s| {
            State::parse(s).with_context(|| {
                format!("unknown state {s:?}; one of pending, approved, denied, expired, cancelled")
            })
        })
        .transpose()
}

fn checked_id(id: &str) -> Result<&str> {
    // The id goes into the request path: only well-formed ids get that far.
    if !super::routes::is_approval_id(id) {
        bail!("{id:?} is not an approval id (they look like ar-0123456789abcdef)");
    }
    Ok(id)
}

fn get(uri: &str) -> Result<Request<Vec<u8>>> {
    Ok(Request::builder()
        .method(Method::GET)
        .uri(uri)
        .body(Vec::new())?)
}

#[derive(serde::Deserialize)]
struct ApprovalList {
    items: Vec<ApprovalRequest>,
}

/// `/api/v1/approvals` with the filters given (`watch=true` first when watching).
fn approvals_uri(watch: bool, state: Option<&str>, namespace: Option<&str>) -> Result<String> {
    let mut query = Vec::new();
    if watch {
        query.push("watch=true".to_owned());
    }
    if let Some(s) = checked_state(state)? {
        query.push(format!("state={}", s.as_str()));
    }
    if let Some(ns) = namespace {
        // The server checks the name; only keep it from changing the query's shape.
        if ns.is_empty() || !ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            bail!("--namespace {ns:?} is not a namespace name");
        }
        query.push(format!("namespace={ns}"));
    }
    Ok(if query.is_empty() {
        "/api/v1/approvals".to_owned()
    } else {
        format!("/api/v1/approvals?{}", query.join("&"))
    })
}

async fn list(
    client: &kube::Client,
    state: Option<&str>,
    namespace: Option<&str>,
    output: Output,
) -> Result<()> {
    let uri = approvals_uri(false, state, namespace)?;
    let text = client.request_text(get(&uri)?).await?;
    if output == Output::Json {
        return print_json(&text);
    }
    let list: ApprovalList = serde_json::from_str(&text).context("reading the server's list")?;
    let mut out = std::io::stdout().lock();
    if list.items.is_empty() {
        writeln!(out, "No approvals.")?;
        return Ok(());
    }
    write!(
        out,
        "{}",
        table(&list.items, time::OffsetDateTime::now_utc())
    )?;
    Ok(())
}

async fn show(client: &kube::Client, id: &str, output: Output) -> Result<()> {
    let uri = format!("/api/v1/approvals/{}", checked_id(id)?);
    let text = client.request_text(get(&uri)?).await?;
    if output == Output::Json {
        return print_json(&text);
    }
    let approval: ApprovalRequest =
        serde_json::from_str(&text).context("reading the server's approval")?;
    print!("{}", describe(&approval, time::OffsetDateTime::now_utc()));
    Ok(())
}

async fn decide(
    client: &kube::Client,
    id: &str,
    verb: &str,
    reason: &str,
    output: Output,
) -> Result<()> {
    let uri = format!("/api/v1/approvals/{}/{verb}", checked_id(id)?);
    let body = serde_json::to_vec(&serde_json::json!({ "reason": reason }))?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)?;
    let text = client.request_text(request).await?;
    if output == Output::Json {
        return print_json(&text);
    }
    let approval: ApprovalRequest =
        serde_json::from_str(&text).context("reading the server's answer")?;
    let verdict = if verb == "approve" {
        "approved"
    } else {
        "denied"
    };
    println!("{id} {verdict}; now {}", state_line(&approval));
    Ok(())
}

/// Watches, reconnecting when the server ends the stream (its time limit), and prints
/// each approval once per change.
async fn watch(
    client: &kube::Client,
    state: Option<&str>,
    namespace: Option<&str>,
    output: Output,
) -> Result<()> {
    let uri = approvals_uri(true, state, namespace)?;
    // What was printed last for each approval, so a reconnect's replay is quiet.
    let mut printed: HashMap<String, String> = HashMap::new();
    loop {
        let events = client.request_events::<ApprovalRequest>(get(&uri)?).await?;
        futures_util::pin_mut!(events);
        while let Some(event) = events.try_next().await? {
            let (kind, approval) = match event {
                WatchEvent::Added(a) => ("ADDED", a),
                WatchEvent::Modified(a) => ("MODIFIED", a),
                WatchEvent::Deleted(a) => ("DELETED", a),
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Error(status) => return Err(kube::Error::Api(status).into()),
            };
            let fingerprint = serde_json::to_string(&approval.status)?;
            if printed.get(&approval.id) == Some(&fingerprint) {
                continue;
            }
            printed.insert(approval.id.clone(), fingerprint);
            let mut out = std::io::stdout().lock();
            if output == Output::Json {
                let line = serde_json::json!({ "type": kind, "object": approval });
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{}", event_line(kind, &approval))?;
            }
            out.flush()?;
        }
        // The server ends watches after a while; start again.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_json(text: &str) -> Result<()> {
    let value: serde_json::Value =
        serde_json::from_str(text).context("the server's answer is not JSON")?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// `deployments.apps`, `pods/exec`: the resource as RBAC names it.
fn resource(approval: &ApprovalRequest) -> String {
    let r = &approval.spec.request;
    let mut text = r.resource.clone();
    if !r.subresource.is_empty() {
        text.push('/');
        text.push_str(&r.subresource);
    }
    if !r.api_group.is_empty() {
        text.push('.');
        text.push_str(&r.api_group);
    }
    text
}

fn target(approval: &ApprovalRequest) -> String {
    let r = &approval.spec.request;
    match (r.namespace.as_str(), r.name.as_str()) {
        ("", "") => "-".to_owned(),
        ("", name) => name.to_owned(),
        (ns, "") => format!("{ns}/"),
        (ns, name) => format!("{ns}/{name}"),
    }
}

/// `5s`, `3m`, `2h`, `4d`, as kubectl prints ages.
fn age(since: &str, now: time::OffsetDateTime) -> String {
    let Some(then) = parse_rfc3339(since) else {
        return "?".to_owned();
    };
    let seconds = (now - then).whole_seconds().max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 120 * 60 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The list as an aligned table.
fn table(items: &[ApprovalRequest], now: time::OffsetDateTime) -> String {
    let header = [
        "ID",
        "STATE",
        "VERB",
        "RESOURCE",
        "NAMESPACE/NAME",
        "REQUESTER",
        "AGE",
    ];
    let rows: Vec<[String; 7]> = items
        .iter()
        .map(|a| {
            [
                a.id.clone(),
                a.status.state.to_string(),
                a.spec.request.verb.clone(),
                resource(a),
                target(a),
                a.spec.requester.user.clone(),
                age(&a.spec.created_at, now),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

/// `Pending (step 1 of 2)` or the final state with its message.
fn state_line(approval: &ApprovalRequest) -> String {
    let state = approval.status.state;
    if state == State::Pending {
        let steps = approval.spec.steps.len();
        match approval.current_step() {
            Some(step) if steps > 1 => format!("Pending (step {} of {steps})", step + 1),
            _ => "Pending".to_owned(),
        }
    } else if approval.status.message.is_empty() {
        state.to_string()
    } else {
        format!("{state}: {}", approval.status.message)
    }
}

fn event_line(kind: &str, approval: &ApprovalRequest) -> String {
    format!(
        "{} {:<8} {} {} {} {} {} by {}",
        crate::approvals::model::now_rfc3339(),
        kind,
        approval.id,
        approval.status.state,
        approval.spec.request.verb,
        resource(approval),
        target(approval),
        approval.spec.requester.user
    )
}

/// `show` as text: what was asked, by whom, the steps and decisions, the dry run.
fn describe(approval: &ApprovalRequest, now: time::OffsetDateTime) -> String {
    use std::fmt::Write as _;
    let spec = &approval.spec;
    let r = &spec.request;
    let mut out = String::new();
    let mut field = |name: &str, value: &str| {
        let _ = writeln!(out, "{:<12}{value}", format!("{name}:"));
    };
    field("ID", &approval.id);
    field("State", &state_line(approval));
    field("Requester", &spec.requester.user);
    field(
        "Pod",
        &format!(
            "{}/{} on {}",
            spec.requester.pod_namespace, spec.requester.pod_name, spec.requester.node
        ),
    );
    field(
        "Call",
        &format!("{} {} {}", r.verb, resource(approval), target(approval)),
    );
    field("Request", &format!("{} {}", r.method, r.uri));
    field("Rule", &spec.rule);
    field(
        "Mode",
        match spec.mode {
            crate::approvals::Mode::Hold => "hold (the client waits)",
            crate::approvals::Mode::Retry => "retry (the client retries after approval)",
        },
    );
    if let Some(account) = &spec.execute_as {
        field("Execute as", account);
    }
    field(
        "Created",
        &format!("{} ({} ago)", spec.created_at, age(&spec.created_at, now)),
    );
    field("Expires", &spec.expires_at);
    if let Some(at) = &approval.status.decided_at {
        field("Decided", at);
    }
    if let Some(execution) = &approval.status.execution {
        field(
            "Executed",
            &format!(
                "{} on {} (HTTP {})",
                execution.at, execution.node, execution.code
            ),
        );
    }
    let current = approval.current_step();
    let _ = writeln!(out, "Steps:");
    for (i, step) in spec.steps.iter().enumerate() {
        let got = approval
            .status
            .decisions
            .iter()
            .filter(|d| d.step == i && d.verdict == crate::approvals::Verdict::Approve)
            .count();
        let name = if step.name.is_empty() {
            String::new()
        } else {
            format!("{} ", step.name)
        };
        let marker = if current == Some(i) && approval.status.state == State::Pending {
            "  <- current"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {}. {name}groups: {}  approvals: {got}/{}{marker}",
            i + 1,
            step.groups.join(", "),
            step.approvals
        );
    }
    let _ = writeln!(out, "Decisions:");
    if approval.status.decisions.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for d in &approval.status.decisions {
        let verdict = match d.verdict {
            crate::approvals::Verdict::Approve => "approved",
            crate::approvals::Verdict::Deny => "denied",
        };
        let reason = if d.reason.is_empty() {
            String::new()
        } else {
            format!(": {:?}", d.reason)
        };
        let _ = writeln!(
            out,
            "  {} {} {verdict} step {}{reason}",
            d.at,
            d.reviewer,
            d.step + 1
        );
    }
    match &spec.dry_run {
        None => {
            let _ = writeln!(out, "Dry run:    (none)");
        }
        Some(dry) => {
            let _ = writeln!(out, "Dry run:");
            if !dry.note.is_empty() {
                let _ = writeln!(out, "  note: {}", dry.note);
            }
            if dry.diff.is_empty() {
                let _ = writeln!(out, "  (no changes)");
            }
            for line in dry.diff.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::model::*;

    fn approval(id: &str, created: &str) -> ApprovalRequest {
        ApprovalRequest {
            id: id.into(),
            spec: ApprovalSpec {
                requester: Requester {
                    user: "system:serviceaccount:agents:coder".into(),
                    uid: String::new(),
                    groups: vec![],
                    pod_namespace: "agents".into(),
                    pod_name: "coder-0".into(),
                    node: "node-1".into(),
                    session: String::new(),
                },
                request: HeldRequest {
                    audit_id: "a".into(),
                    verb: "patch".into(),
                    method: "PATCH".into(),
                    uri: "/apis/apps/v1/namespaces/prod/deployments/api".into(),
                    api_group: "apps".into(),
                    api_version: "v1".into(),
                    resource: "deployments".into(),
                    subresource: String::new(),
                    namespace: "prod".into(),
                    name: "api".into(),
                    content_type: "application/merge-patch+json".into(),
                    body_sha256: "0".into(),
                    fingerprint: "0".into(),
                },
                rule: "prod-changes".into(),
                mode: Mode::Hold,
                execute_as: None,
                steps: vec![
                    StepSpec {
                        name: "team".into(),
                        groups: vec!["team-leads".into()],
                        approvals: 1,
                    },
                    StepSpec {
                        name: "sre".into(),
                        groups: vec!["sre".into()],
                        approvals: 2,
                    },
                ],
                created_at: created.into(),
                expires_at: "2030-01-01T00:00:00Z".into(),
                dry_run: Some(DryRun {
                    object: None,
                    diff: "-  replicas: 2\n+  replicas: 5\n".into(),
                    note: String::new(),
                }),
            },
            status: ApprovalStatus::default(),
        }
    }

    fn now() -> time::OffsetDateTime {
        parse_rfc3339("2026-01-01T12:00:00Z").unwrap()
    }

    #[test]
    fn the_table_is_aligned() {
        let items = vec![
            approval("ar-0000000000000001", "2026-01-01T11:59:30Z"),
            approval("ar-0000000000000002", "2026-01-01T09:00:00Z"),
        ];
        let text = table(&items, now());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |line: &str, word: &str| line.find(word).unwrap();
        assert_eq!(col(lines[0], "REQUESTER"), col(lines[1], "system:"));
        assert_eq!(col(lines[0], "NAMESPACE/NAME"), col(lines[2], "prod/api"));
        assert!(lines[1].starts_with("ar-0000000000000001   Pending   patch   deployments.apps"));
        assert!(lines[1].ends_with("30s"), "{}", lines[1]);
        assert!(lines[2].ends_with("3h"), "{}", lines[2]);
    }

    #[test]
    fn show_has_the_steps_decisions_and_diff() {
        let mut a = approval("ar-0000000000000001", "2026-01-01T11:00:00Z");
        a.decide(
            &Reviewer {
                user: "lead".into(),
                groups: vec!["team-leads".into()],
            },
            Verdict::Approve,
            "fine by me",
            "2026-01-01T11:30:00Z",
        )
        .unwrap();
        let text = describe(&a, now());
        assert!(text.contains("State:      Pending (step 2 of 2)"), "{text}");
        assert!(
            text.contains("1. team groups: team-leads  approvals: 1/1"),
            "{text}"
        );
        assert!(
            text.contains("2. sre groups: sre  approvals: 0/2  <- current"),
            "{text}"
        );
        assert!(
            text.contains("lead approved step 1: \"fine by me\""),
            "{text}"
        );
        assert!(text.contains("  +  replicas: 5"), "{text}");
        assert!(text.contains("(60m ago)"), "{text}");
    }

    #[test]
    fn ages() {
        let now = now();
        assert_eq!(age("2026-01-01T11:59:55Z", now), "5s");
        assert_eq!(age("2026-01-01T11:58:05Z", now), "115s");
        assert_eq!(age("2026-01-01T11:57:00Z", now), "3m");
        assert_eq!(age("2026-01-01T11:00:00Z", now), "60m");
        assert_eq!(age("2025-12-31T12:00:00Z", now), "24h");
        assert_eq!(age("2025-12-01T12:00:00Z", now), "31d");
        assert_eq!(age("garbage", now), "?");
    }

    #[test]
    fn the_plugin_name_maps_to_the_agent() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            plugin_args(os(&[
                "/usr/local/bin/kubectl-tollgate",
                "approvals",
                "list"
            ])),
            os(&["gateway-agent", "approvals", "list"])
        );
        assert_eq!(
            plugin_args(os(&["kubectl-tollgate"])),
            os(&["gateway-agent"])
        );
        let direct = os(&["/usr/bin/gateway-agent", "approvals", "list"]);
        assert_eq!(plugin_args(direct.clone()), direct);
        assert_eq!(plugin_args(Vec::new()), Vec::<OsString>::new());
    }

    #[test]
    fn ids_and_states_are_checked_before_a_request() {
        assert!(checked_id("ar-0123456789abcdef").is_ok());
        assert!(checked_id("../../etc").is_err());
        assert_eq!(
            checked_state(Some("PENDING")).unwrap(),
            Some(State::Pending)
        );
        assert!(checked_state(Some("nope")).is_err());
    }

    #[test]
    fn the_cli_parses() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ApprovalsArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "deny",
            "ar-0123456789abcdef",
            "--reason",
            "no",
            "--server",
            "https://127.0.0.1:15444",
            "-o",
            "json",
        ])
        .unwrap();
        assert!(matches!(cli.args.command, Command::Deny { ref reason, .. } if reason == "no"));
        assert_eq!(cli.args.connection.output, Output::Json);
        // deny needs a reason.
        assert!(Cli::try_parse_from(["x", "deny", "ar-0123456789abcdef"]).is_err());
    }
}
