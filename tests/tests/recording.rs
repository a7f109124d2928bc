//! Suite `recording`: every session of an enforced pod is recorded as it happened, on
//! the real control plane, with kubectl inside simulated pods; the records are checked
//! against what the agent served (its request log), replayed, verified after tampering,
//! and read back after the agent was killed with SIGKILL.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::Value;
use tollgate_tests::agent::{AgentOptions, RunningAgent, ALLOW_ALL};
use tollgate_tests::cluster::harness::wait_until;
use tollgate_tests::cluster::{Cluster, PodOptions, RunningPod, TestNamespace};
use tollgate_tests::output::{stderr, stdout};

const AGENT: &str = env!("CARGO_BIN_EXE_tg-agent");

fn rule(resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..PolicyRule::default()
    }
}

/// A namespace whose `agent` account may work with ConfigMaps and Secrets and exec
/// into pods, and an enforced pod of that account on node 1.
async fn scene(prefix: &str) -> (TestNamespace, RunningPod) {
    let ns = Cluster::shared()
        .namespace(prefix)
        .await
        .expect("namespace");
    ns.service_account("agent").await.expect("account");
    ns.grant(
        "agent",
        "work",
        vec![
            rule(&["configmaps", "secrets"], &["*"]),
            rule(&["pods"], &["get", "list"]),
            rule(&["pods/exec"], &["create", "get"]),
        ],
    )
    .await
    .expect("role");
    let mut opts = PodOptions::new("recorded", 1, &["sleep", "3600"]);
    opts.service_account = Some("agent".into());
    opts.labels
        .insert("tollgate.dev/enforce".into(), "true".into());
    let pod = ns.run_pod(opts).await.expect("pod");
    (ns, pod)
}

fn agent() -> RunningAgent {
    RunningAgent::start(Cluster::shared(), AgentOptions::new(AGENT, 1, ALLOW_ALL))
        .expect("agent starts")
}

fn in_pod(pod: &RunningPod, script: &str) -> String {
    let out = pod.kubectl_exec(Cluster::shared(), &[], &["sh", "-c", script]);
    assert!(
        out.status.success(),
        "{script}: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// One recorded session: its file, header and records (parsed lines).
struct Session {
    file: PathBuf,
    header: Value,
    records: Vec<Value>,
}

impl Session {
    fn id(&self) -> &str {
        self.header["session"].as_str().unwrap_or("")
    }
    fn exchanges(&self) -> impl Iterator<Item = &Value> {
        self.records.iter().filter(|r| r["kind"] == "exchange")
    }
}

fn session_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(days) = std::fs::read_dir(dir) else {
        return files;
    };
    for day in days.filter_map(|d| d.ok()) {
        if let Ok(entries) = std::fs::read_dir(day.path()) {
            files.extend(
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "jsonl")),
            );
        }
    }
    files.sort();
    files
}

/// The sessions of pods in `namespace`, read from the agent's files as they are now.
fn sessions(agent: &RunningAgent, namespace: &str) -> Vec<Session> {
    session_files(&agent.sessions_dir())
        .into_iter()
        .filter_map(|file| {
            let text = std::fs::read_to_string(&file).ok()?;
            let mut lines = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok());
            let header = lines.next()?;
            (header["pod"]["namespace"] == namespace).then(|| Session {
                file: file.clone(),
                header,
                records: lines.collect(),
            })
        })
        .collect()
}

/// The paths the agent logged as served in session `id`, in order (its `done` lines).
fn served_paths(agent: &RunningAgent, id: &str) -> Vec<String> {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains(&format!("session={id} ")) && l.contains(" done "))
        .filter_map(|l| {
            let path = l.split(" path=").nth(1)?.split_whitespace().next()?;
            Some(path.trim_end_matches(['}', ':']).to_owned())
        })
        .collect()
}

const SECRET_VALUE: &str = "hunter2-TG-REC";
const SECRET_VALUE_B64: &str = "aHVudGVyMi1URy1SRUM=";

#[tokio::test(flavor = "multi_thread")]
async fn a_session_records_what_kubectl_did_request_by_request() {
    let agent = agent();
    let (ns, pod) = scene("rec-kubectl").await;
    // kubectl create sends protobuf; apply sends JSON: both kinds of request body.
    in_pod(
        &pod,
        "printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: rec-a\ndata:\n  colour: blue\n' | kubectl apply -f -",
    );
    in_pod(&pod, "kubectl get configmap rec-a -o json");
    in_pod(&pod, "kubectl delete configmap rec-a");
    in_pod(
        &pod,
        &format!("kubectl create secret generic rec-s --from-literal=password={SECRET_VALUE}"),
    );

    // Every kubectl is a connection, so a session; each closes when kubectl exits.
    let mut found = Vec::new();
    wait_until("four closed sessions", Duration::from_secs(20), || {
        found = sessions(&agent, &ns.name);
        found.len() >= 4
            && found
                .iter()
                .all(|s| s.records.last().is_some_and(|r| r["kind"] == "end"))
    })
    .unwrap_or_else(|e| panic!("{e}: {} sessions", found.len()));

    let all: Vec<&Value> = found.iter().flat_map(|s| s.exchanges()).collect();
    // The first answered call of that verb on that resource (kubectl apply reads the
    // object, 404, before it creates it).
    let find = |verb: &str, resource: &str| {
        all.iter()
            .find(|e| {
                e["verb"] == verb
                    && e["objectRef"]["resource"] == resource
                    && e["responseStatus"]["code"]
                        .as_u64()
                        .is_some_and(|c| c < 300)
            })
            .copied()
            .unwrap_or_else(|| panic!("no {verb} {resource} among {all:#?}"))
    };
    let create = find("create", "configmaps");
    assert_eq!(
        create["requestObject"]["data"]["colour"], "blue",
        "{create}"
    );
    assert_eq!(create["responseStatus"]["code"], 201);
    assert_eq!(create["responseObject"]["metadata"]["name"], "rec-a");
    assert_eq!(
        create["user"]["username"],
        format!("system:serviceaccount:{}:agent", ns.name)
    );
    assert_eq!(create["decision"]["action"], "allow");
    assert_eq!(create["sourceIPs"][0], pod.ip.as_str());
    let get = find("get", "configmaps");
    assert_eq!(get["objectRef"]["name"], "rec-a");
    assert_eq!(get["responseObject"]["data"]["colour"], "blue");
    assert_eq!(find("delete", "configmaps")["responseStatus"]["code"], 200);
    let secret = find("create", "secrets");
    assert_eq!(secret["responseStatus"]["code"], 201);
    // kubectl create sent protobuf, which cannot be shown masked: kept by size and hash.
    assert_eq!(
        secret["requestObjectOmitted"]["reason"], "notJson",
        "{secret}"
    );
    assert!(
        secret["requestObjectOmitted"]["sha256"].is_string(),
        "{secret}"
    );
    assert!(
        secret["responseObject"]["data"]["password"].is_string(),
        "{secret}"
    );

    // No secret value in any recording, requests included.
    for session in &found {
        let text = std::fs::read_to_string(&session.file).expect("session file");
        assert!(
            !text.contains(SECRET_VALUE) && !text.contains(SECRET_VALUE_B64),
            "a secret value is in {}",
            session.file.display()
        );
    }

    // Request by request: each session's records are exactly what the agent served on
    // that connection, in order.
    for session in &found {
        let recorded: Vec<String> = session
            .exchanges()
            .map(|e| {
                let uri = e["requestURI"].as_str().unwrap_or("");
                uri.split('?').next().unwrap_or(uri).to_owned()
            })
            .collect();
        assert_eq!(
            recorded,
            served_paths(&agent, session.id()),
            "session {}",
            session.id()
        );
        assert!(!recorded.is_empty());
    }

    // The CLI agrees, and every chain verifies.
    let out = agent.sessions_cli(&["verify"]).expect("verify");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let listed = agent.sessions_cli(&["list", "-o", "json"]).expect("list");
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("list json");
    for session in &found {
        assert!(
            listed.to_string().contains(session.id()),
            "{} missing from {listed}",
            session.id()
        );
    }
}

/// A private key's body, as a terminal might print it.
const KEY_BODY: &str = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7";

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_session_replays_at_its_pace() {
    // This agent logs JSON, as a DaemonSet's log collector wants it.
    let mut options = AgentOptions::new(AGENT, 1, ALLOW_ALL);
    options.extra_args = vec!["--log-format".into(), "json".into()];
    let agent = RunningAgent::start(Cluster::shared(), options).expect("agent starts");
    let (ns, pod) = scene("rec-exec").await;
    let target = ns
        .run_pod(PodOptions::new("target", 1, &["sleep", "3600"]))
        .await
        .expect("target pod");
    let out = in_pod(
        &pod,
        &format!(
            "kubectl exec {} -- sh -c 'echo hello-from-tg; printf \"%s\\n\" \"-----BEGIN PRIVATE KEY-----\" {KEY_BODY} \"-----END PRIVATE KEY-----\"; sleep 1; echo bye-from-tg'",
            target.name
        ),
    );
    assert!(
        out.contains("hello-from-tg") && out.contains("bye-from-tg"),
        "{out}"
    );
    // The terminal showed the key: what is forwarded is never changed.
    assert!(out.contains(KEY_BODY), "{out}");

    let mut id = String::new();
    wait_until("the exec session to close", Duration::from_secs(20), || {
        let found = sessions(&agent, &ns.name);
        let exec = found
            .iter()
            .find(|s| s.records.iter().any(|r| r["kind"] == "streamStart"));
        match exec {
            Some(s) if s.records.last().is_some_and(|r| r["kind"] == "end") => {
                id = s.id().to_owned();
                true
            }
            _ => false,
        }
    })
    .expect("an exec session");

    let started = Instant::now();
    let replay = agent.sessions_cli(&["replay", &id]).expect("replay");
    let took = started.elapsed();
    assert!(replay.status.success(), "{}", stderr(&replay));
    let shown = stdout(&replay);
    let (hello, bye) = (
        shown.find("hello-from-tg").expect("hello replayed"),
        shown.find("bye-from-tg").expect("bye replayed"),
    );
    assert!(hello < bye, "{shown}");
    // The recording does not keep it: the detectors masked it in the frame.
    assert!(!shown.contains(KEY_BODY), "{shown}");
    assert!(
        shown.contains(gateway_agent::masking::MASK_MARKER),
        "{shown}"
    );
    // The recorded pause (one second) is played, not skipped...
    assert!(took >= Duration::from_millis(800), "replayed in {took:?}");
    // ...and `--speed 0` plays it at once.
    let fast = agent
        .sessions_cli(&["replay", &id, "--speed", "0"])
        .expect("replay");
    assert!(stdout(&fast).contains("bye-from-tg"));

    // Every log line is a JSON object; a proxied request's carries its request id and
    // session.
    let log = agent.log_text();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!lines.is_empty(), "{log}");
    let done = lines
        .iter()
        .find(|l| l["fields"]["message"] == "done" && l["span"]["session"] == id.as_str())
        .unwrap_or_else(|| panic!("no request of session {id} in:\n{log}"));
    assert!(
        done["span"]["id"].as_str().is_some_and(|i| !i.is_empty()),
        "{done}"
    );

    // The recorder's counters are on /metrics.
    let written = agent
        .metric("tollgate_recording_records_written")
        .expect("metrics");
    assert!(written >= 3.0, "records written: {written}");
    assert!(
        agent
            .metric("tollgate_recording_bytes_written")
            .expect("metrics")
            > 0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_byte_makes_verify_fail_and_name_the_record() {
    let agent = agent();
    let (ns, pod) = scene("rec-tamper").await;
    in_pod(&pod, "kubectl get configmaps; kubectl get pods");
    let mut file = PathBuf::new();
    let mut id = String::new();
    wait_until("closed sessions", Duration::from_secs(20), || {
        let found = sessions(&agent, &ns.name);
        let done: Vec<&Session> = found
            .iter()
            .filter(|s| {
                s.records.len() >= 3 && s.records.last().is_some_and(|r| r["kind"] == "end")
            })
            .collect();
        if let Some(s) = done.first() {
            file = s.file.clone();
            id = s.id().to_owned();
        }
        done.len() == 2
    })
    .expect("sessions");
    let clean = agent.sessions_cli(&["verify", &id]).expect("verify");
    assert!(clean.status.success(), "{}", stdout(&clean));

    // Change one byte inside record seq 1 (line 3: the header is line 1).
    let text = std::fs::read_to_string(&file).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let target = &mut lines[2];
    assert!(target.contains("\"seq\":1"), "{target}");
    let at = target.find("requestURI").expect("a requestURI") + 14;
    let mut bytes = std::mem::take(target).into_bytes();
    bytes[at] = if bytes[at] == b'x' { b'y' } else { b'x' };
    *target = String::from_utf8(bytes).expect("utf-8");
    std::fs::write(&file, lines.join("\n") + "\n").expect("write");

    let out = agent
        .sessions_cli(&["verify", &id, "-o", "json"])
        .expect("verify");
    assert!(!out.status.success(), "verify must fail: {}", stdout(&out));
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    let report = if report.is_array() {
        report[0].clone()
    } else {
        report
    };
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["firstBad"]["at"], 1, "{report}");
    let text_out = agent.sessions_cli(&["verify", &id]).expect("verify");
    assert!(
        stdout(&text_out).contains("seq 1") || stderr(&text_out).contains("seq 1"),
        "{}{}",
        stdout(&text_out),
        stderr(&text_out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_session_loses_nothing_completed() {
    let mut agent = agent();
    let (ns, pod) = scene("rec-kill").await;
    let cluster = Cluster::shared();
    cluster
        .kubectl_ok(&["create", "configmap", "before", "-n", &ns.name])
        .expect("create");
    // One connection: kubectl lists, then watches on the same connection.
    let mut watch = pod
        .kubectl_exec_child(
            cluster,
            &["kubectl", "get", "configmaps", "-w", "-o", "name"],
        )
        .expect("watch");
    assert!(
        watch.wait_for_line(|| {}, "configmap/before", Duration::from_secs(30)),
        "the list arrived: {:?}",
        watch.seen
    );
    // An event on the open watch: the list exchange is well behind us.
    assert!(
        watch.wait_for_line(
            || {
                cluster
                    .kubectl_ok(&["create", "configmap", "during", "-n", &ns.name])
                    .expect("create");
            },
            "configmap/during",
            Duration::from_secs(30)
        ),
        "{:?}",
        watch.seen
    );
    agent.kill();

    let found = sessions(&agent, &ns.name);
    let session = found
        .iter()
        .find(|s| s.exchanges().any(|e| e["verb"] == "list"))
        .unwrap_or_else(|| {
            panic!(
                "the list exchange survived the kill: {} sessions",
                found.len()
            )
        });
    let list = session
        .exchanges()
        .find(|e| e["verb"] == "list")
        .expect("list");
    assert_eq!(list["responseStatus"]["code"], 200);
    assert!(list["responseObject"]["items"].is_array(), "{list}");
    assert!(
        session.records.iter().all(|r| r["kind"] != "end"),
        "the session was cut, not closed"
    );
    // Intact, but not closed: verify passes, `--strict` does not.
    let out = agent
        .sessions_cli(&["verify", session.id()])
        .expect("verify");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let strict = agent
        .sessions_cli(&["verify", session.id(), "--strict"])
        .expect("verify");
    assert!(!strict.status.success(), "{}", stdout(&strict));
}
