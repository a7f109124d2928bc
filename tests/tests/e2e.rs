//! Suite `e2e`: the story `cargo xtask demo` tells (`tollgate_tests::story`), run the
//! same way and checked step by step, on the real control plane with kubectl in an
//! enforced pod of simulated node 1, one agent with the Kubernetes approval store, and
//! the reviewer's and the recording's CLIs.

use std::time::Instant;

use serde_json::Value;
use tollgate_tests::story::{
    DeploymentState, Story, StoryOptions, AGENT_POD, APPROVAL_REASON, DENY_REASON, DENY_RULE,
    DEPLOYMENT, IMAGE_AFTER, IMAGE_BEFORE, MASK_MARKER, REPLICAS_AFTER, REPLICAS_BEFORE, REVIEWER,
    REVIEW_RULE, SECRET_VALUE,
};

const AGENT: &str = env!("CARGO_BIN_EXE_tg-agent");

/// The Secret's value as `data` carries it (base64).
const SECRET_VALUE_B64: &str = "dGctZGVtby1kYi1wYXNzLTV3OHIyaw==";

/// Panics with the whole error chain and the agent's last log lines.
fn step<T>(story: &Story, what: &str, result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e:#}\n{}", story.agent_log_tail()))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_story_holds_reviews_masks_refuses_and_records() {
    let started = Instant::now();
    let (mut story, set_up) = Story::set_up(StoryOptions::new(AGENT))
        .await
        .unwrap_or_else(|e| panic!("setting up the story: {e:#}"));
    let ns = set_up.namespace.clone();
    let requester = format!("system:serviceaccount:{ns}:{AGENT_POD}");
    let before = DeploymentState {
        replicas: REPLICAS_BEFORE,
        image: IMAGE_BEFORE.into(),
    };
    let after = DeploymentState {
        replicas: REPLICAS_AFTER,
        image: IMAGE_AFTER.into(),
    };
    eprintln!("  set up: {:.1}s", started.elapsed().as_secs_f64());
    let story_started = Instant::now();

    // a. The apply is held: a pending approval for exactly this call, nothing changed.
    let result = story.hold_an_apply();
    let held = step(&story, "a. holding the apply", result);
    let approval = &held.approval;
    assert_eq!(approval["status"]["state"], "Pending", "{approval}");
    assert_eq!(approval["spec"]["rule"], REVIEW_RULE, "{approval}");
    assert_eq!(approval["spec"]["mode"], "hold", "{approval}");
    let request = &approval["spec"]["request"];
    assert_eq!(request["verb"], "patch", "{approval}");
    assert_eq!(request["resource"], "deployments", "{approval}");
    assert_eq!(request["namespace"], ns.as_str(), "{approval}");
    assert_eq!(request["name"], DEPLOYMENT, "{approval}");
    assert_eq!(approval["spec"]["requester"]["user"], requester.as_str());
    assert_eq!(approval["spec"]["requester"]["podName"], AGENT_POD);
    assert!(!held.session().is_empty(), "{approval}");
    assert_eq!(
        held.live_while_held, before,
        "nothing may change before approval"
    );
    let row = held
        .approval_requests
        .lines()
        .find(|l| l.starts_with(&held.approval_id))
        .unwrap_or_else(|| panic!("kubectl get approvalrequests:\n{}", held.approval_requests));
    assert!(row.contains("Pending") && row.contains(DEPLOYMENT), "{row}");

    // b. The dry-run diff shows the change, in the reviewer's own view too.
    let shown = step(&story, "b. showing the approval", story.show_dry_run(&held));
    for line in [
        "-  replicas: 2".to_owned(),
        "+  replicas: 3".to_owned(),
        format!("-        image: {IMAGE_BEFORE}"),
        format!("+        image: {IMAGE_AFTER}"),
    ] {
        assert!(
            shown.diff.lines().any(|l| l.trim_end() == line),
            "{line:?} not in the diff:\n{}",
            shown.diff
        );
        assert!(
            shown.shown.contains(&line),
            "{line:?} not shown:\n{}",
            shown.shown
        );
    }
    assert!(shown.shown.contains(REVIEW_RULE), "{}", shown.shown);
    assert!(shown.shown.contains("Pending"), "{}", shown.shown);
    assert!(!shown.diff.contains(SECRET_VALUE), "{}", shown.diff);

    // c. The reviewer's approval succeeds and is on record.
    let decided = step(&story, "c. approving", story.approve(&held));
    assert!(
        decided
            .output
            .contains(&format!("{} approved", held.approval_id)),
        "{}",
        decided.output
    );
    assert_eq!(decided.state, "Approved");
    assert_eq!(
        decided.reviewer,
        format!(
            "system:serviceaccount:{}:{REVIEWER}",
            set_up.reviewers_namespace
        )
    );
    assert_eq!(decided.reason, APPROVAL_REASON);

    // d. kubectl, held since a, prints its own line; the Deployment has the change.
    let result = story.finish_apply(&held);
    let applied = step(&story, "d. finishing the apply", result);
    assert_eq!(
        applied.result_line,
        format!("deployment.apps/{DEPLOYMENT} configured"),
        "{:?}",
        applied.kubectl_lines
    );
    assert_eq!(applied.live_after, after);
    assert_eq!(applied.execution_code, Some(200));

    // e. The pod sees the mask, never the value; the admin sees the value.
    let secret = step(&story, "e. reading the Secret", story.read_secret());
    assert_eq!(secret.in_pod.trim(), MASK_MARKER, "{}", secret.in_pod);
    assert!(!secret.in_pod.contains(SECRET_VALUE), "{}", secret.in_pod);
    assert_eq!(secret.by_admin.trim(), SECRET_VALUE);

    // f. The delete is refused with the rule's reason; the Deployment stays.
    let delete = step(&story, "f. deleting", story.delete_workload());
    assert!(!delete.succeeded, "the delete must fail: {}", delete.stderr);
    let refusal = delete
        .stderr
        .lines()
        .find(|l| l.starts_with("Error from server (Forbidden)"))
        .unwrap_or_else(|| panic!("no Forbidden line: {}", delete.stderr));
    assert!(
        refusal.contains(DENY_RULE) && refusal.contains(DENY_REASON),
        "{refusal}"
    );
    assert_eq!(delete.still_there, Some(after));

    // g. The apply's session is listed, shows the held patch with its approval, and
    // every session verifies; no recording holds the Secret's value.
    let replayed = step(&story, "g. replaying", story.replay_session(&held));
    assert!(
        replayed
            .list
            .lines()
            .any(|l| l.starts_with(&replayed.session) && l.contains("closed")),
        "{} not listed as closed:\n{}",
        replayed.session,
        replayed.list
    );
    let exchanges = replayed.exchanges();
    let patch: &Value = exchanges
        .iter()
        .find(|e| e["verb"] == "patch")
        .unwrap_or_else(|| panic!("no patch among {exchanges:#?}"));
    assert_eq!(patch["approvalID"], held.approval_id.as_str(), "{patch:#}");
    assert_eq!(patch["code"], 200, "{patch:#}");
    assert_eq!(patch["decision"]["action"], "approve", "{patch:#}");
    assert_eq!(patch["decision"]["rule"], REVIEW_RULE, "{patch:#}");
    assert_eq!(patch["user"]["username"], requester.as_str(), "{patch:#}");
    assert!(
        patch["requestURI"]
            .as_str()
            .is_some_and(|uri| uri.contains(&format!("/deployments/{DEPLOYMENT}"))),
        "{patch:#}"
    );
    assert!(
        exchanges.iter().any(|e| e["verb"] == "get"
            && e["requestURI"]
                .as_str()
                .is_some_and(|uri| uri.ends_with(&format!("/deployments/{DEPLOYMENT}")))),
        "kubectl apply read the object first: {exchanges:#?}"
    );
    assert!(
        replayed.shown.contains(&held.approval_id),
        "{}",
        replayed.shown
    );
    assert!(replayed.verified, "{}", replayed.verify);
    let verdicts: Vec<&str> = replayed.verify.lines().skip(1).collect();
    assert!(
        verdicts.len() >= 3 && verdicts.iter().all(|l| l.contains(" ok ")),
        "the apply, the read and the delete each verify:\n{}",
        replayed.verify
    );
    for file in session_files(&story.agent.sessions_dir()) {
        let text = std::fs::read_to_string(&file).expect("a session file");
        assert!(
            !text.contains(SECRET_VALUE) && !text.contains(SECRET_VALUE_B64),
            "the Secret's value is in {}",
            file.display()
        );
    }

    eprintln!("  story: {:.1}s", story_started.elapsed().as_secs_f64());
    drop(story);
    eprintln!("  in all: {:.1}s", started.elapsed().as_secs_f64());
}

/// Every `*.jsonl` under the sessions directory (one directory per day).
fn session_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for day in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(day.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.path().extension().is_some_and(|e| e == "jsonl") {
                files.push(entry.path());
            }
        }
    }
    assert!(!files.is_empty(), "no sessions under {}", dir.display());
    files
}
