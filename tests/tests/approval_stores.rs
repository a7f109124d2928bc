//! Suite `approval_stores`: the Kubernetes approval store against the real API server.
//! Two `KubeStore`s in one process stand for the agents of two nodes: each has its own
//! client, its own watch and its own cache, and they share only the API server.
//!
//! Runs as root (the shared cluster); applies the ApprovalRequest CRD from
//! `deploy/crds/` (idempotent) and waits until the API server serves it.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use gateway_agent::approvals::model::{
    self, ApprovalRequest, ApprovalSpec, ApprovalStatus, DecisionError, Execution, HeldRequest,
    Mode, Requester, Reviewer, State, StepSpec, Verdict,
};
use gateway_agent::approvals::store::kubernetes::{KubeStore, STATE_LABEL};
use gateway_agent::approvals::{Store, StoreError};
use tokio::sync::broadcast;
use tollgate_tests::cluster::harness::wait_until;
use tollgate_tests::cluster::Cluster;

const CRD: &str = "approvalrequests.tollgate.dev";

/// A client with the agent's own credentials (deploy/rbac.yaml's account), as the
/// agents' stores have them.
async fn agent_client(cluster: &Cluster) -> Result<kube::Client> {
    let rbac = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac.yaml");
    let rbac = rbac.display().to_string();
    if cluster.kubectl_ok(&["apply", "-f", &rbac]).is_err() {
        cluster.kubectl_ok(&["apply", "-f", &rbac])?;
    }
    let token = cluster.kubectl_ok(&[
        "create",
        "token",
        "tollgate-agent",
        "-n",
        "tollgate-system",
        "--duration=1h",
    ])?;
    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig())?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.auth_info = serde_json::from_value(serde_json::json!({ "token": token.trim() }))?;
    Ok(kube::Client::try_from(config)?)
}

/// Applies the CRD (once per test process) and waits for its Established condition.
fn install_crd(cluster: &Cluster) -> Result<()> {
    // Tests run in parallel, and two `kubectl apply`s creating the same CRD at once
    // make one fail with AlreadyExists; so one test applies, the others wait for it.
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    // The CRD, and the admission policy that lets only the agent's account write its
    // objects (which is why the stores below run with that account's token).
    for file in [format!("{CRD}.yaml"), format!("{CRD}-writers.yaml")] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/crds")
            .join(file);
        let path = path.display().to_string();
        // Another suite's process may be applying it at the same moment: then the
        // second try finds it and updates it.
        if cluster.kubectl_ok(&["apply", "-f", &path]).is_err() {
            cluster.kubectl_ok(&["apply", "-f", &path])?;
        }
    }
    let mut last = String::new();
    wait_until("the CRD to be Established", Duration::from_secs(60), || {
        last = cluster
            .kubectl_ok(&[
                "get",
                "crd",
                CRD,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
            ])
            .unwrap_or_else(|e| e.to_string());
        last == "True"
    })
    .with_context(|| format!("last answer: {last}"))?;
    *installed = true;
    Ok(())
}

/// A pending approval held for `user` in `namespace` on `node`.
fn approval(namespace: &str, node: &str, mode: Mode, expires_at: &str) -> ApprovalRequest {
    let id = model::new_id();
    ApprovalRequest {
        spec: ApprovalSpec {
            requester: Requester {
                user: format!("system:serviceaccount:{namespace}:agent"),
                uid: "uid-1".into(),
                groups: vec!["system:serviceaccounts".into()],
                pod_namespace: namespace.into(),
                pod_name: "agent-0".into(),
                node: node.into(),
                session: "s-1".into(),
            },
            request: HeldRequest {
                audit_id: "audit-1".into(),
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
                body_sha256: "0".repeat(64),
                // Unique per approval, and longer than a label value may be.
                fingerprint: format!("{}{}", "f".repeat(48), &id[3..]),
            },
            rule: "configmap-writes".into(),
            mode,
            execute_as: None,
            steps: vec![StepSpec {
                name: "ops".into(),
                groups: vec!["ops".into()],
                approvals: 1,
            }],
            created_at: model::now_rfc3339(),
            expires_at: expires_at.into(),
            dry_run: Some(model::DryRun {
                object: Some(serde_json::json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "settings"}, "data": {"k": "v"}
                })),
                diff: "+data:\n+  k: v\n".into(),
                note: String::new(),
            }),
        },
        id,
        status: ApprovalStatus::default(),
    }
}

fn reviewer(user: &str) -> Reviewer {
    Reviewer {
        user: user.into(),
        groups: vec!["ops".into()],
    }
}

/// What an agent does before it runs an approved call: claim it, once.
fn claim(a: &mut ApprovalRequest, node: &str) -> Result<(), DecisionError> {
    if a.status.state != State::Approved {
        return Err(DecisionError::NotApproved {
            id: a.id.clone(),
            state: a.status.state,
        });
    }
    if let Some(done) = &a.status.execution {
        return Err(DecisionError::AlreadyExecuted {
            id: a.id.clone(),
            at: done.at.clone(),
        });
    }
    a.status.execution = Some(Execution {
        at: model::now_rfc3339(),
        node: node.into(),
        code: 0,
    });
    Ok(())
}

/// Waits for a change of approval `id` that satisfies `done`.
async fn wait_for_change(
    changes: &mut broadcast::Receiver<ApprovalRequest>,
    id: &str,
    done: impl Fn(&ApprovalRequest) -> bool,
) -> Result<ApprovalRequest> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Ok(a)) if a.id == id && done(&a) => return Ok(a),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) => bail!("change channel closed"),
            Err(_) => bail!("no change of {id} seen within 30s"),
        }
    }
}

fn label(cluster: &Cluster, namespace: &str, id: &str, key: &str) -> Result<String> {
    cluster.kubectl_ok(&[
        "get",
        "approvalrequests",
        "-n",
        namespace,
        id,
        "-o",
        &format!("jsonpath={{.metadata.labels.{}}}", key.replace('.', "\\.")),
    ])
}

/// Create on one agent, see it on the other (get, subscribe, fingerprint, list);
/// concurrent decisions and claims from both have exactly one winner; the state label
/// follows; `kubectl get approvalrequests -A` shows useful columns; a restarted agent
/// sees everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_share_one_queue() -> Result<()> {
    let cluster = Cluster::shared();
    install_crd(cluster)?;
    let ns = cluster.namespace("approvals").await?;
    let result = shared_queue(cluster, &ns.name).await;
    let _ = cluster.kubectl_ok(&["delete", "approvalrequests", "--all", "-n", &ns.name]);
    result
}

async fn shared_queue(cluster: &'static Cluster, namespace: &str) -> Result<()> {
    let a = KubeStore::start(agent_client(cluster).await?).await?;
    let b = KubeStore::start(agent_client(cluster).await?).await?;
    let mut b_changes = b.subscribe();
    let node = format!("node-{}", &model::new_id()[3..11]);

    // Created on A: A has it at once; so does B (from its watch, or looked up by name).
    let pending = approval(namespace, &node, Mode::Hold, "2999-01-01T00:00:00Z");
    let id = pending.id.clone();
    let created = a.create(pending.clone()).await?;
    assert_eq!(created, pending, "the stored approval is what was asked");
    assert_eq!(a.get(&id).await?, Some(pending.clone()));
    assert_eq!(b.get(&id).await?, Some(pending.clone()));
    let seen = wait_for_change(&mut b_changes, &id, |_| true).await?;
    assert_eq!(seen, pending);
    assert!(matches!(
        a.create(pending.clone()).await,
        Err(StoreError::Exists(existing)) if existing == id
    ));
    let fingerprint = &pending.spec.request.fingerprint;
    for store in [&a, &b] {
        let found = store.find_by_fingerprint(fingerprint).await?;
        assert_eq!(found, vec![pending.clone()]);
        let listed = store.list(Some(State::Pending)).await?;
        ensure!(listed.iter().any(|x| x.id == id), "{id} not listed pending");
    }
    assert_eq!(label(cluster, namespace, &id, STATE_LABEL)?, "Pending");
    assert_eq!(
        label(cluster, namespace, &id, "tollgate.dev/fingerprint")?,
        fingerprint[..63]
    );
    assert_eq!(label(cluster, namespace, &id, "tollgate.dev/node")?, node);

    // A self-review is refused and changes nothing.
    let requester = Reviewer {
        user: pending.spec.requester.user.clone(),
        groups: vec!["ops".into()],
    };
    let refused = a
        .update(&id, |x| {
            x.decide(&requester, Verdict::Approve, "mine", &model::now_rfc3339())
                .map(drop)
        })
        .await;
    assert!(
        matches!(
            refused,
            Err(StoreError::Rejected(DecisionError::SelfReview { .. }))
        ),
        "{refused:?}"
    );

    // Two reviewers decide at the same moment through different agents: one wins, the
    // other is told it is already final.
    let (approve, deny) = tokio::join!(
        a.update(&id, |x| x
            .decide(
                &reviewer("bob"),
                Verdict::Approve,
                "fine",
                &model::now_rfc3339()
            )
            .map(drop)),
        b.update(&id, |x| x
            .decide(
                &reviewer("carol"),
                Verdict::Deny,
                "not now",
                &model::now_rfc3339()
            )
            .map(drop)),
    );
    let (winner, loser) = match (&approve, &deny) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w.clone(), l),
        _ => bail!("exactly one decision must win: {approve:?} / {deny:?}"),
    };
    assert!(
        matches!(
            loser,
            StoreError::Rejected(DecisionError::AlreadyFinal { .. })
        ),
        "{loser}"
    );
    assert_eq!(winner.status.decisions.len(), 1);
    assert_eq!(
        label(cluster, namespace, &id, STATE_LABEL)?,
        winner.status.state.as_str()
    );
    let b_view = wait_for_change(&mut b_changes, &id, |x| x.status.state.is_final()).await?;
    assert_eq!(b_view.status, winner.status);

    // Approved calls are claimed exactly once, whichever agent asks first.
    let approved = approval(namespace, &node, Mode::Retry, "2999-01-01T00:00:00Z");
    let approved_id = approved.id.clone();
    b.create(approved).await?;
    a.update(&approved_id, |x| {
        x.decide(
            &reviewer("bob"),
            Verdict::Approve,
            "ok",
            &model::now_rfc3339(),
        )
        .map(drop)
    })
    .await?;
    assert_eq!(
        label(cluster, namespace, &approved_id, STATE_LABEL)?,
        "Approved"
    );
    let (claim_a, claim_b) = tokio::join!(
        a.update(&approved_id, |x| claim(x, "node-a")),
        b.update(&approved_id, |x| claim(x, "node-b")),
    );
    let (claimed, lost) = match (&claim_a, &claim_b) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w.clone(), l),
        _ => bail!("exactly one claim must win: {claim_a:?} / {claim_b:?}"),
    };
    assert!(
        matches!(
            lost,
            StoreError::Rejected(DecisionError::AlreadyExecuted { .. })
        ),
        "{lost}"
    );
    let execution = claimed.status.execution.clone().context("no execution")?;
    assert_eq!(
        b.update(&approved_id, |x| claim(x, "node-c"))
            .await
            .err()
            .map(|e| e.to_string()),
        Some(format!(
            "approval {approved_id} was already used at {}",
            execution.at
        ))
    );

    // kubectl shows the queue with its columns.
    let table = cluster.kubectl_ok(&["get", "approvalrequests", "-A"])?;
    let header = table.lines().next().unwrap_or_default();
    for column in [
        "NAMESPACE",
        "NAME",
        "STATE",
        "VERB",
        "RESOURCE",
        "TARGET NAMESPACE",
        "TARGET NAME",
        "REQUESTER",
        "MODE",
        "AGE",
    ] {
        ensure!(header.contains(column), "no {column} column in:\n{table}");
    }
    let row = table
        .lines()
        .find(|l| l.contains(&approved_id))
        .with_context(|| format!("no row for {approved_id} in:\n{table}"))?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    let expected_user = format!("system:serviceaccount:{namespace}:agent");
    assert_eq!(
        &cells[..9],
        [
            namespace,
            approved_id.as_str(),
            "Approved",
            "create",
            "configmaps",
            namespace,
            "settings",
            expected_user.as_str(),
            "retry",
        ],
        "{table}"
    );
    let short = cluster.kubectl_ok(&["get", "ar", "-n", namespace, "-o", "name"])?;
    ensure!(short.contains(&approved_id), "shortName ar: {short}");

    // A restarted agent (a fresh store) has everything from its first listing.
    drop(a);
    let a = KubeStore::start(agent_client(cluster).await?).await?;
    assert_eq!(a.get(&approved_id).await?, Some(claimed.clone()));
    assert_eq!(a.get(&id).await?.map(|x| x.status), Some(winner.status));
    Ok(())
}

/// Expiry and the cancellation of a restarted node's held requests, decided on one
/// agent and seen on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_cancellation() -> Result<()> {
    let cluster = Cluster::shared();
    install_crd(cluster)?;
    let ns = cluster.namespace("approvals-expiry").await?;
    let result = expiry(cluster, &ns.name).await;
    let _ = cluster.kubectl_ok(&["delete", "approvalrequests", "--all", "-n", &ns.name]);
    result
}

async fn expiry(cluster: &'static Cluster, namespace: &str) -> Result<()> {
    let a = Store::Kubernetes(KubeStore::start(agent_client(cluster).await?).await?);
    let b = Store::Kubernetes(KubeStore::start(agent_client(cluster).await?).await?);
    let mut b_changes = b.subscribe();
    let node = format!("node-{}", &model::new_id()[3..11]);

    let overdue = approval(namespace, &node, Mode::Retry, "2020-01-01T00:00:00Z");
    let current = approval(namespace, &node, Mode::Retry, "2999-01-01T00:00:00Z");
    a.create(overdue.clone()).await?;
    a.create(current.clone()).await?;
    let now = model::parse_rfc3339(&model::now_rfc3339()).context("now")?;
    let expired = a.expire_due(now).await?;
    // Other suites' leftovers may be due too; ours must be among them.
    ensure!(expired >= 1, "nothing expired");
    let seen = wait_for_change(&mut b_changes, &overdue.id, |x| {
        x.status.state == State::Expired
    })
    .await?;
    assert_eq!(
        seen.status.message,
        "expired: nobody decided before 2020-01-01T00:00:00Z"
    );
    assert_eq!(
        label(cluster, namespace, &overdue.id, STATE_LABEL)?,
        "Expired"
    );
    assert_eq!(
        b.get(&current.id).await?.map(|x| x.status.state),
        Some(State::Pending)
    );
    // The other agent's pass finds nothing of ours left to do.
    b.expire_due(now).await?;
    assert_eq!(b.get(&overdue.id).await?, Some(seen));

    // The agent on `node` restarts: its held requests are cancelled, its retry-mode
    // ones and other nodes' stay pending.
    let held = approval(namespace, &node, Mode::Hold, "2999-01-01T00:00:00Z");
    let elsewhere = approval(
        namespace,
        &format!("{node}-other"),
        Mode::Hold,
        "2999-01-01T00:00:00Z",
    );
    a.create(held.clone()).await?;
    a.create(elsewhere.clone()).await?;
    let mut a_changes = a.subscribe();
    assert_eq!(b.cancel_held_on_node(&node).await?, 1);
    let state = |id: String| {
        let a = a.clone();
        async move { a.get(&id).await.map(|x| x.map(|x| x.status.state)) }
    };
    let cancelled = wait_for_change(&mut b_changes, &held.id, |x| {
        x.status.state == State::Cancelled
    })
    .await?;
    ensure!(cancelled.status.message.contains("restarted"));
    assert_eq!(
        label(cluster, namespace, &held.id, STATE_LABEL)?,
        "Cancelled"
    );
    assert_eq!(state(current.id.clone()).await?, Some(State::Pending));
    assert_eq!(state(elsewhere.id.clone()).await?, Some(State::Pending));
    // Cancelled through B; A learns it from its watch.
    wait_for_change(&mut a_changes, &held.id, |x| {
        x.status.state == State::Cancelled
    })
    .await?;
    assert_eq!(state(held.id.clone()).await?, Some(State::Cancelled));

    // Retention: decided approvals go (the custom resources are deleted); pending stay.
    let later = now + std::time::Duration::from_secs(3600);
    let removed = a
        .prune_decided(later, std::time::Duration::from_secs(60))
        .await?;
    ensure!(removed >= 2, "pruned {removed}");
    let names = cluster.kubectl_ok(&["get", "approvalrequests", "-n", namespace, "-o", "name"])?;
    ensure!(!names.contains(&overdue.id), "{names}");
    ensure!(!names.contains(&held.id), "{names}");
    ensure!(names.contains(&current.id), "{names}");
    Ok(())
}
