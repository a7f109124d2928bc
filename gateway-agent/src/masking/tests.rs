//! Whole-body tests: every shape the API server answers with, chunked and not.

use std::time::Instant;

use serde_json::{json, Value};

use super::stream::Opening;
use super::*;

const JWT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJpc3MiOiJrdWJlcm5ldGVzIn0.c2lnbmF0dXJl";
const PEM: &str =
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n";

fn masker() -> Masker {
    Masker::new(&MaskingConfig::default()).unwrap()
}

fn secret(name: &str, with_kind: bool) -> Value {
    let mut s = json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
        "data": {"password": "aHVudGVyMg==", "username": "YWRtaW4="},
        "type": "Opaque",
    });
    if with_kind {
        s["kind"] = json!("Secret");
        s["apiVersion"] = json!("v1");
    }
    s
}

fn mask_doc(body: &Value, kind: Option<&str>) -> Result<(Value, MaskStats), MaskError> {
    let ctx = Context {
        kind: kind.map(str::to_string),
    };
    let (out, stats) =
        masker().mask_body(body.to_string().as_bytes(), BodyFormat::Document, &ctx)?;
    Ok((serde_json::from_slice(&out).unwrap(), stats))
}

/// Secret values that must never be in any output of these tests.
fn assert_clean(text: &str) {
    for secret in [
        "aHVudGVyMg==",
        "YWRtaW4=",
        "hunter2",
        JWT,
        "MIIEowIBAAKCAQEA",
        "AKIAIOSFODNN7EXAMPLE",
    ] {
        assert!(!text.contains(secret), "{secret} leaked in {text}");
    }
}

#[test]
fn single_secret_keeps_shape() {
    let mut s = secret("db", true);
    s["stringData"] = json!({"extra": "hunter2"});
    let (out, stats) = mask_doc(&s, Some("Secret")).unwrap();
    assert_eq!(out["data"]["password"], MASK_MARKER_BASE64);
    assert_eq!(out["data"]["username"], MASK_MARKER_BASE64);
    assert_eq!(out["stringData"]["extra"], MASK_MARKER);
    assert_eq!(out["metadata"], s["metadata"]);
    assert_eq!(out["type"], "Opaque");
    assert_eq!(stats.secret_fields, 3);
    assert_eq!(stats.masked(), 3);
    assert_clean(&out.to_string());
}

#[test]
fn secret_list_items_without_kind() {
    let list = json!({
        "kind": "SecretList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"},
        "items": [secret("a", false), secret("b", false)],
    });
    // The list's own kind names its items; no hint needed.
    let (out, stats) = mask_doc(&list, None).unwrap();
    assert_eq!(stats.secret_fields, 4);
    assert_eq!(stats.objects, 2);
    assert_eq!(out["items"][1]["data"]["username"], MASK_MARKER_BASE64);
    assert_eq!(out["metadata"]["resourceVersion"], "9");
    assert_clean(&out.to_string());
}

#[test]
fn generic_list_masks_by_each_items_kind() {
    let list = json!({
        "kind": "List", "apiVersion": "v1", "metadata": {},
        "items": [
            secret("a", true),
            {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "c"},
             "data": {"db_password": "hunter2", "port": "5432"}},
        ],
    });
    let (out, stats) = mask_doc(&list, None).unwrap();
    assert_eq!(out["items"][0]["data"]["password"], MASK_MARKER_BASE64);
    assert_eq!(out["items"][1]["data"]["db_password"], MASK_MARKER);
    assert_eq!(out["items"][1]["data"]["port"], "5432");
    assert_eq!((stats.secret_fields, stats.rule_fields), (2, 1));
    assert_clean(&out.to_string());
}

#[test]
fn unknown_kind_is_treated_as_a_secret() {
    // No kind anywhere and no hint: fail closed.
    let (out, _) = mask_doc(&json!({"data": {"k": "aHVudGVyMg=="}}), None).unwrap();
    assert_eq!(out["data"]["k"], MASK_MARKER_BASE64);
    // With the request's kind: a ConfigMap's data is not a Secret's.
    let (out, _) = mask_doc(&json!({"data": {"port": "1"}}), Some("ConfigMap")).unwrap();
    assert_eq!(out["data"]["port"], "1");
}

#[test]
fn configmap_not_secret_is_untouched_byte_for_byte() {
    let body = br#"{"kind":"ConfigMapList","apiVersion":"v1","metadata":{},"items":[{"metadata":{"name":"x"},  "data":{"b":"1","a":"2"}}]}"#;
    let (out, stats) = masker()
        .mask_body(body, BodyFormat::Document, &Context::default())
        .unwrap();
    assert_eq!(stats.masked(), 0);
    // Items that needed nothing are copied as they came (spacing, key order).
    assert!(std::str::from_utf8(&out)
        .unwrap()
        .contains(r#"{"metadata":{"name":"x"},  "data":{"b":"1","a":"2"}}"#));
    assert_eq!(
        serde_json::from_slice::<Value>(&out).unwrap(),
        serde_json::from_slice::<Value>(body).unwrap()
    );
}

#[test]
fn a_small_single_object_is_read_whole() {
    let m = masker();
    // As the API server writes objects: kind first, `<` and `>` escaped.
    let configmap = r#"{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"x"},"data":{"b":"1","a":"\u003c2\u003e"}}"#;
    let secret = r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"s"},"data":{"password":"aHVudGVyMg=="},"type":"Opaque"}"#;
    let token = format!(r#"{{"kind":"ConfigMap","apiVersion":"v1","data":{{"t":"{JWT}"}}}}"#);
    for (body, masked) in [(configmap, 0), (secret, 1), (token.as_str(), 1)] {
        let (whole, stats) = m
            .mask_body(body.as_bytes(), BodyFormat::Document, &Context::default())
            .unwrap();
        assert_eq!(stats.masked(), masked, "{body}");
        if masked == 0 {
            // Nothing masked: byte for byte (key order and escapes as they came).
            assert_eq!(whole, body.as_bytes());
        }
        assert_clean(std::str::from_utf8(&whole).unwrap());
        for size in [1, 7, 64] {
            let mut sm = StreamMasker::new(&m, BodyFormat::Document, Context::default());
            let mut out = Vec::new();
            for chunk in body.as_bytes().chunks(size) {
                sm.push(chunk, &mut out).unwrap();
            }
            assert_eq!(sm.finish(&mut out).unwrap(), stats);
            assert_eq!(out, whole, "chunk size {size}");
        }
        // Read member by member (its kind is not first), the same values come out.
        let value: Value = serde_json::from_str(body).unwrap();
        let pretty = serde_json::to_vec_pretty(&value).unwrap();
        let (members, member_stats) = m
            .mask_body(&pretty, BodyFormat::Document, &Context::default())
            .unwrap();
        assert_eq!(member_stats, stats);
        assert_eq!(
            serde_json::from_slice::<Value>(&members).unwrap(),
            serde_json::from_slice::<Value>(&whole).unwrap()
        );
    }
    // Lists and Tables are streamed, not read whole; a kind with an escape, or not
    // first, is read member by member; a partial start waits for more.
    for (text, opening) in [
        (r#"{"kind":"Secret","data":{}}"#, Opening::Single),
        (r#"{"kind":"SecretList","items":[]}"#, Opening::Other),
        (r#"{"kind":"List","items":[]}"#, Opening::Other),
        (r#"{"kind":"Table","rows":[]}"#, Opening::Other),
        (r#"{"kind":"\u0053ecretList","items":[]}"#, Opening::Other),
        (r#"{"apiVersion":"v1","kind":"Secret"}"#, Opening::Other),
        (r#"{"kind":"","data":{}}"#, Opening::Other),
        (r#"{"ki"#, Opening::Incomplete),
        (r#"{"kind":"Secre"#, Opening::Incomplete),
    ] {
        assert_eq!(stream::opening(text.as_bytes()), opening, "{text}");
    }
}

fn watch_body() -> String {
    let events = [
        json!({"type": "ADDED", "object": secret("a", true)}),
        json!({"type": "MODIFIED", "object": secret("a", true)}),
        json!({"type": "BOOKMARK", "object": {"kind": "Secret", "apiVersion": "v1",
            "metadata": {"resourceVersion": "12", "annotations": {"k8s.io/initial-events-end": "true"}}}}),
        json!({"type": "DELETED", "object": secret("a", true)}),
        json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "too old resource version", "code": 410}}),
    ];
    events.iter().map(|e| format!("{e}\n")).collect()
}

#[test]
fn watch_every_event_masked_bookmarks_kept() {
    let body = watch_body();
    let (out, stats) = masker()
        .mask_body(
            body.as_bytes(),
            BodyFormat::WatchStream,
            &Context::for_kind("Secret"),
        )
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_clean(&text);
    assert_eq!(stats.secret_fields, 6);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5);
    // The bookmark and the error are passed byte for byte.
    let original: Vec<&str> = body.lines().collect();
    assert_eq!(lines[2], original[2]);
    assert_eq!(lines[4], original[4]);
    for line in &lines[..2] {
        let event: Value = serde_json::from_str(line).unwrap();
        assert_eq!(event["object"]["data"]["password"], MASK_MARKER_BASE64);
    }
}

#[test]
fn watch_masks_identically_whatever_the_chunking() {
    let body = watch_body();
    let m = masker();
    let ctx = Context::for_kind("Secret");
    let (whole, _) = m
        .mask_body(body.as_bytes(), BodyFormat::WatchStream, &ctx)
        .unwrap();
    for size in [1, 2, 3, 7, 64, 1000] {
        let mut sm = StreamMasker::new(&m, BodyFormat::WatchStream, ctx.clone());
        let mut out = Vec::new();
        let mut emitted_before_end = false;
        for chunk in body.as_bytes().chunks(size) {
            sm.push(chunk, &mut out).unwrap();
            emitted_before_end |= !out.is_empty();
        }
        sm.finish(&mut out).unwrap();
        assert_eq!(out, whole, "chunk size {size}");
        assert!(
            emitted_before_end,
            "chunk size {size}: nothing sent until the end"
        );
    }
}

#[test]
fn watch_events_without_newlines_and_empty_stream() {
    let a = json!({"type": "ADDED", "object": secret("a", true)});
    let body = format!("{a}{a}  {a}");
    let (out, stats) = masker()
        .mask_body(
            body.as_bytes(),
            BodyFormat::WatchStream,
            &Context::default(),
        )
        .unwrap();
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 3);
    assert_eq!(stats.secret_fields, 6);
    let (out, _) = masker()
        .mask_body(b"", BodyFormat::WatchStream, &Context::default())
        .unwrap();
    assert!(out.is_empty());
}

fn secret_columns() -> Value {
    json!([
        {"name": "Name", "type": "string", "format": "name"},
        {"name": "Type", "type": "string"},
        {"name": "Data", "type": "string"},
        {"name": "Age", "type": "string"},
        {"name": "Extra", "type": "string"},
    ])
}

fn table(rows: Vec<Value>) -> Value {
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "5"},
           "columnDefinitions": secret_columns(), "rows": rows})
}

#[test]
fn table_include_object_none() {
    let t = table(vec![json!({"cells": ["db", "Opaque", 2, "5m", "hunter2"]})]);
    let (out, stats) = mask_doc(&t, Some("Secret")).unwrap();
    assert_eq!(
        out["rows"][0]["cells"],
        json!(["db", "Opaque", 2, "5m", MASK_MARKER])
    );
    assert_eq!(stats.secret_fields, 1);
    // Not a Secret: cells kept, detectors still run.
    let t = table(vec![json!({"cells": ["cm", JWT, 1, "5m", "x"]})]);
    let (out, stats) = mask_doc(&t, Some("ConfigMap")).unwrap();
    assert_eq!(
        out["rows"][0]["cells"],
        json!(["cm", MASK_MARKER, 1, "5m", "x"])
    );
    assert_eq!(stats.detector_hits, 1);
}

#[test]
fn table_include_object_metadata() {
    let applied = secret("db", true).to_string();
    let t = table(vec![json!({
        "cells": ["db", "Opaque", 2, "5m", "x"],
        "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                   "metadata": {"name": "db", "annotations": {LAST_APPLIED_ANNOTATION: applied}}},
    })]);
    let (out, stats) = mask_doc(&t, Some("Secret")).unwrap();
    assert_clean(&out.to_string());
    let annotation = out["rows"][0]["object"]["metadata"]["annotations"][LAST_APPLIED_ANNOTATION]
        .as_str()
        .unwrap();
    let inner: Value = serde_json::from_str(annotation).unwrap();
    assert_eq!(inner["data"]["password"], MASK_MARKER_BASE64);
    assert_eq!(inner["metadata"]["name"], "db");
    assert_eq!(stats.annotations, 1);
    assert_eq!(out["rows"][0]["cells"][4], MASK_MARKER);
}

#[test]
fn table_include_object_object() {
    let t = table(vec![
        json!({"cells": ["db", "Opaque", 2, "5m", "x"], "object": secret("db", true)}),
    ]);
    // The object names its kind: no hint needed.
    let (out, stats) = mask_doc(&t, None).unwrap();
    assert_clean(&out.to_string());
    assert_eq!(
        out["rows"][0]["object"]["data"]["password"],
        MASK_MARKER_BASE64
    );
    assert_eq!(stats.secret_fields, 3);
}

#[test]
fn table_watch_remembers_columns() {
    // `kubectl get secrets -w`: only the first event's Table has column definitions.
    let first = json!({"type": "ADDED", "object": table(vec![json!({"cells": ["a", "Opaque", 1, "1s", "v1"]})])});
    let mut later_table = table(vec![json!({"cells": ["b", "Opaque", 1, "2s", "v2"]})]);
    later_table
        .as_object_mut()
        .unwrap()
        .remove("columnDefinitions");
    let later = json!({"type": "MODIFIED", "object": later_table});
    let body = format!("{first}\n{later}\n");
    let (out, _) = masker()
        .mask_body(
            body.as_bytes(),
            BodyFormat::WatchStream,
            &Context::for_kind("Secret"),
        )
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        events[1]["object"]["rows"][0]["cells"],
        json!(["b", "Opaque", 1, "2s", MASK_MARKER])
    );
    // Without any definitions, only the name is kept.
    let mut bare = table(vec![json!({"cells": ["c", "Opaque", 1, "2s"]})]);
    bare.as_object_mut().unwrap().remove("columnDefinitions");
    let (out, _) = mask_doc(&bare, Some("Secret")).unwrap();
    assert_eq!(
        out["rows"][0]["cells"],
        json!(["c", MASK_MARKER, 1, MASK_MARKER])
    );
}

#[test]
fn last_applied_of_any_object() {
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "annotations": {}},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "nginx",
            "env": [{"name": "API_TOKEN", "value": "hunter2"}, {"name": "MODE", "value": "prod"}]}]}}},
    });
    let mut obj = deployment.clone();
    obj["metadata"]["annotations"][LAST_APPLIED_ANNOTATION] = json!(format!("{deployment}\n"));
    let (out, stats) = mask_doc(&obj, None).unwrap();
    assert_clean(&out.to_string());
    assert_eq!(stats.rule_fields, 2);
    assert_eq!(stats.annotations, 1);
    let inner: Value = serde_json::from_str(
        out["metadata"]["annotations"][LAST_APPLIED_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let env = &inner["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(
        env,
        &json!([{"name": "API_TOKEN", "value": MASK_MARKER}, {"name": "MODE", "value": "prod"}])
    );

    // Nothing secret inside: the annotation is left exactly as it was.
    let plain = json!({"kind": "Service", "metadata": {"annotations": {LAST_APPLIED_ANNOTATION: "{\"kind\":\"Service\"}\n"}}});
    let (out, stats) = mask_doc(&plain, None).unwrap();
    assert_eq!(out, plain);
    assert_eq!(stats.masked(), 0);

    // Unparseable: replaced whole.
    let broken = json!({"kind": "ConfigMap", "metadata": {"annotations": {LAST_APPLIED_ANNOTATION: "{\"data\": {\"x\": \"hunter2\""}}});
    let (out, stats) = mask_doc(&broken, None).unwrap();
    assert_eq!(
        out["metadata"]["annotations"][LAST_APPLIED_ANNOTATION],
        MASK_MARKER
    );
    assert_eq!(stats.annotations, 1);

    // A Secret applied with stringData.
    let applied = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"p": "hunter2"}});
    let mut s = secret("s", true);
    s["metadata"]["annotations"] = json!({LAST_APPLIED_ANNOTATION: applied.to_string()});
    let (out, _) = mask_doc(&s, None).unwrap();
    assert_clean(&out.to_string());
}

#[test]
fn env_rules_in_every_workload_kind() {
    let spec = json!({"containers": [{"name": "c", "env": [{"name": "DB_PASSWORD", "value": "hunter2"}]}]});
    let objects = [
        json!({"kind": "Pod", "spec": spec}),
        json!({"kind": "Deployment", "spec": {"template": {"spec": spec}}}),
        json!({"kind": "StatefulSet", "spec": {"template": {"spec": spec}}}),
        json!({"kind": "DaemonSet", "spec": {"template": {"spec": spec}}}),
        json!({"kind": "ReplicaSet", "spec": {"template": {"spec": spec}}}),
        json!({"kind": "Job", "spec": {"template": {"spec": spec}}}),
        json!({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {"spec": spec}}}}}),
    ];
    for obj in objects {
        let (out, stats) = mask_doc(&obj, None).unwrap();
        assert_clean(&out.to_string());
        assert_eq!(stats.rule_fields, 1, "{}", obj["kind"]);
    }
    // A PodList's items have no kind: the list's kind names them.
    let list = json!({"kind": "PodList", "items": [{"spec": spec}]});
    let (out, _) = mask_doc(&list, None).unwrap();
    assert_clean(&out.to_string());
}

#[test]
fn detectors_in_any_string_value() {
    let cm = json!({"kind": "ConfigMap", "metadata": {"name": "c", "annotations": {"note": format!("Bearer {JWT}")}},
        "data": {"tls.key": PEM, "aws": "id=AKIAIOSFODNN7EXAMPLE", "ok": "plain"}});
    let (out, stats) = mask_doc(&cm, None).unwrap();
    assert_clean(&out.to_string());
    assert_eq!(out["data"]["ok"], "plain");
    assert_eq!(out["data"]["aws"], format!("id={MASK_MARKER}"));
    // `tls.key` matches the key pattern (a rule) before the detectors see it.
    assert_eq!(stats.rule_fields, 1);
    assert_eq!(stats.detector_hits, 2);
}

#[test]
fn refusals() {
    let config = MaskingConfig {
        secrets: Action::Refuse,
        rules: vec![RuleConfig {
            name: "no-kubeconfigs".into(),
            kinds: vec!["ConfigMap".into()],
            path: Some("data.*".into()),
            name_pattern: Some("kubeconfig".into()),
            action: Action::Refuse,
            base64: false,
        }],
        ..MaskingConfig::default()
    };
    let m = Masker::new(&config).unwrap();
    assert_eq!(m.refusal_for_kind("Secret"), Some("secrets"));
    assert_eq!(m.refusal_for_kind("ConfigMap"), None);
    let body = secret("a", true).to_string();
    let err = m
        .mask_body(body.as_bytes(), BodyFormat::Document, &Context::default())
        .unwrap_err();
    assert!(
        matches!(err, MaskError::Refused { ref rule, ref kind } if rule == "secrets" && kind == "Secret"),
        "{err}"
    );
    let cm = json!({"kind": "ConfigMap", "data": {"admin.kubeconfig": "x"}}).to_string();
    assert!(matches!(
        m.mask_body(cm.as_bytes(), BodyFormat::Document, &Context::default()),
        Err(MaskError::Refused { rule, .. }) if rule == "no-kubeconfigs"
    ));
    // Secret rows of a Table without objects are refused by kind too.
    let t = table(vec![json!({"cells": ["db", "Opaque", 2, "5m", "x"]})]).to_string();
    assert!(matches!(
        m.mask_body(
            t.as_bytes(),
            BodyFormat::Document,
            &Context::for_kind("Secret")
        ),
        Err(MaskError::Refused { .. })
    ));
    // A whole-kind refusal rule.
    let m = Masker::new(&MaskingConfig {
        rules: vec![RuleConfig {
            name: "no-tokens".into(),
            kinds: vec!["TokenRequest".into()],
            path: None,
            name_pattern: None,
            action: Action::Refuse,
            base64: false,
        }],
        ..MaskingConfig::default()
    })
    .unwrap();
    assert_eq!(m.refusal_for_kind("TokenRequest"), Some("no-tokens"));
    assert_eq!(m.refusal_for_kind("Secret"), None);
}

#[test]
fn malformed_bodies_are_errors() {
    let m = masker();
    let ctx = Context::for_kind("Secret");
    let doc = |body: &str| m.mask_body(body.as_bytes(), BodyFormat::Document, &ctx);
    assert!(matches!(doc(""), Err(MaskError::Truncated)));
    assert!(matches!(doc("   "), Err(MaskError::Truncated)));
    assert!(matches!(
        doc(r#"{"kind":"Secret","data":{"a":"b"}"#),
        Err(MaskError::Truncated)
    ));
    assert!(matches!(
        doc(r#"{"kind":"SecretList","items":[{"data":{}}"#),
        Err(MaskError::Truncated)
    ));
    assert!(matches!(
        doc(r#"{"kind" "Secret"}"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(
        doc(r#"{"kind":"Secret",}"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(
        doc(r#"{"kind":"Secret"} x"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(
        doc(r#"{"kind":"Secret"}{}"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(
        doc(r#"{"data":{"a":"b"]}"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(
        doc(r#"{"kind":"SecretList","items":[{"data":{}} {}]}"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(
        doc(r#"{"kind":"SecretList","items":[{"data":{"a":tru}}]}"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(
        doc(r#"{"kind":"SecretList","items":"x"}"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(
        doc(r#"{"kind":"Table","rows":[1]}"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(doc("not json"), Err(MaskError::Malformed(_))));
    let watch = |body: &str| m.mask_body(body.as_bytes(), BodyFormat::WatchStream, &ctx);
    assert!(matches!(
        watch(r#"{"type":"ADDED","object":{"data":{}}"#),
        Err(MaskError::Truncated)
    ));
    assert!(matches!(watch(r#"[1]"#), Err(MaskError::Malformed(_))));
    assert!(matches!(
        watch(r#"{"object":{}}"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(
        watch(r#"{"type":"ADDED"}"#),
        Err(MaskError::Malformed(_))
    ));
    assert!(matches!(
        watch(r#"{"type":"ADDED","object":{}} ]"#),
        Err(MaskError::Malformed(_))
    ));
}

#[test]
fn oversized_values_are_refused() {
    let m = Masker::new(&MaskingConfig {
        max_object_bytes: 4096,
        ..MaskingConfig::default()
    })
    .unwrap();
    let big = "x".repeat(5000);
    let list = json!({"kind": "SecretList", "items": [{"data": {"a": big}}]}).to_string();
    let mut sm = StreamMasker::new(&m, BodyFormat::Document, Context::default());
    let mut out = Vec::new();
    let err = list
        .as_bytes()
        .chunks(1000)
        .try_for_each(|c| sm.push(c, &mut out))
        .unwrap_err();
    assert!(matches!(err, MaskError::TooLarge { limit: 4096 }));
    // A single object collected member by member counts all its members.
    let parts =
        json!({"kind": "ConfigMap", "a": "x".repeat(3000), "b": "y".repeat(3000)}).to_string();
    assert!(matches!(
        m.mask_body(parts.as_bytes(), BodyFormat::Document, &Context::default()),
        Err(MaskError::TooLarge { .. })
    ));
    assert!(matches!(
        Masker::new(&MaskingConfig {
            max_object_bytes: 10,
            ..MaskingConfig::default()
        }),
        Err(ConfigError::MaxObjectBytes)
    ));
}

#[test]
fn late_kind_and_tail_members() {
    // `items` before `kind`: not streamed, but masked all the same.
    let body = r#"{"items":[{"data":{"a":"aHVudGVyMg=="}}],"kind":"SecretList"}"#;
    let (out, stats) = masker()
        .mask_body(body.as_bytes(), BodyFormat::Document, &Context::default())
        .unwrap();
    assert_clean(std::str::from_utf8(&out).unwrap());
    assert_eq!(stats.secret_fields, 1);
    // Members after a streamed array are kept.
    let body = r#"{"kind":"SecretList","items":[],"metadata":{"continue":"abc"}}"#;
    let (out, _) = masker()
        .mask_body(body.as_bytes(), BodyFormat::Document, &Context::default())
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out).unwrap(),
        serde_json::from_str::<Value>(body).unwrap()
    );
    // A top-level value that is not an object: passes through the detectors.
    let (out, _) = masker()
        .mask_body(
            format!("[\"{JWT}\"]").as_bytes(),
            BodyFormat::Document,
            &Context::default(),
        )
        .unwrap();
    assert_clean(std::str::from_utf8(&out).unwrap());
}

#[test]
fn document_chunking_does_not_change_the_result() {
    let list = json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
        "items": [secret("a", true), {"kind": "ConfigMap", "data": {"x": format!("key {PEM}"), "y": "\"}]\\"}}]});
    let t = table(vec![
        json!({"cells": ["db", "Opaque", 2, "5m", "hunter2"], "object": secret("db", true)}),
    ]);
    let m = masker();
    for doc in [list, t, secret("single", true)] {
        let body = serde_json::to_string_pretty(&doc).unwrap();
        let (whole, stats) = m
            .mask_body(body.as_bytes(), BodyFormat::Document, &Context::default())
            .unwrap();
        for size in [1, 5, 13, 100] {
            let mut sm = StreamMasker::new(&m, BodyFormat::Document, Context::default());
            let mut out = Vec::new();
            for chunk in body.as_bytes().chunks(size) {
                sm.push(chunk, &mut out).unwrap();
            }
            assert_eq!(sm.finish(&mut out).unwrap(), stats);
            assert_eq!(out, whole, "chunk size {size}");
        }
        let parsed: Value = serde_json::from_slice(&whole).unwrap();
        assert_clean(&parsed.to_string());
    }
}

#[test]
fn config_from_json_and_validation() {
    let config: MaskingConfig = serde_json::from_value(json!({
        "secrets": "refuse",
        "detectors": {"tokens": false, "patterns": ["corp_[0-9]+"]},
        "rules": [{"name": "r", "kinds": ["ConfigMap"], "path": "data.*", "namePattern": "(?i)pass", "action": "mask"}],
    }))
    .unwrap();
    assert_eq!(config.secrets, Action::Refuse);
    assert!(config.detectors.private_keys && !config.detectors.tokens);
    assert_eq!(config.max_object_bytes, DEFAULT_MAX_OBJECT_BYTES);
    assert!(Masker::new(&config).is_ok());
    // A misspelt field is an error, not a silently wider rule.
    assert!(serde_json::from_value::<MaskingConfig>(
        json!({"rules": [{"name": "r", "paht": "x"}]})
    )
    .is_err());
    assert!(serde_json::from_value::<MaskingConfig>(json!({"secret": "mask"})).is_err());
    let mut twice = MaskingConfig::default();
    twice.rules.push(twice.rules[0].clone());
    assert!(matches!(
        Masker::new(&twice),
        Err(ConfigError::DuplicateRule(_))
    ));
}

/// Issue 6 item 3: a 10,000-Secret list, pushed in 64 KiB chunks, masks correctly while
/// the masker holds no more than one chunk plus one item; prints the throughput.
#[test]
fn ten_thousand_secrets_bounded_memory() {
    let mut items = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let mut s = secret(&format!("secret-{i:05}"), false);
        s["data"]["tls.key"] = json!("LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCk1JSUV2UUlCQURBTkJna3Foa2lHOXcwQkFRRUZBQVNDQktjd2dnU2pBZ0VBQW9JQkFRQzdWSlRVdDlVczhjS2oKTXpFZlljWGEyOVZJRmRMK01qQXBrR2lqYkZ4dEJGNVp1K0lqRFdodlBqYmhZM0JkdUZFSEdFRXBTbGtEcWgKLS0tLS1FTkQgUFJJVkFURSBLRVktLS0tLQo=");
        s["metadata"]["labels"] = json!({"app": "bench", "index": i.to_string()});
        items.push(s);
    }
    // Members in the API server's order (serde_json would sort them: items first).
    let body = format!(
        r#"{{"kind":"SecretList","apiVersion":"v1","metadata":{{"resourceVersion":"100"}},"items":{}}}"#,
        Value::Array(items)
    );
    let list: Value = serde_json::from_str(&body).unwrap();
    let largest_item = items_max_len(&list);
    let m = masker();
    const CHUNK: usize = 64 * 1024;
    let start = Instant::now();
    let mut sm = StreamMasker::new(&m, BodyFormat::Document, Context::for_kind("Secret"));
    let mut out = Vec::with_capacity(body.len());
    for chunk in body.as_bytes().chunks(CHUNK) {
        sm.push(chunk, &mut out).unwrap();
    }
    let peak = sm.peak_buffered();
    let stats = sm.finish(&mut out).unwrap();
    let elapsed = start.elapsed();
    let mb = body.len() as f64 / 1e6;
    println!(
        "masked {:.1} MB (10,000 Secrets) in {:.3}s: {:.1} MB/s ({} build); peak buffered {} bytes (chunk {} + largest item {})",
        mb,
        elapsed.as_secs_f64(),
        mb / elapsed.as_secs_f64(),
        if cfg!(debug_assertions) { "debug" } else { "release" },
        peak,
        CHUNK,
        largest_item,
    );
    // For scale: plain serde_json parse + serialise of the same body, same build.
    let start = Instant::now();
    let parsed: Value = serde_json::from_str(&body).unwrap();
    let reserialised = serde_json::to_vec(&parsed).unwrap();
    let baseline = start.elapsed();
    println!(
        "baseline serde_json parse + serialise: {:.1} MB/s (masking takes {:.2}x its time)",
        mb / baseline.as_secs_f64(),
        elapsed.as_secs_f64() / baseline.as_secs_f64()
    );
    assert_eq!(reserialised.len(), body.len());
    assert!(peak <= CHUNK + largest_item, "peak {peak}");
    assert_eq!(stats.secret_fields, 30_000);
    assert_eq!(stats.objects, 10_000);
    let masked: Value = serde_json::from_slice(&out).unwrap();
    let items = masked["items"].as_array().unwrap();
    assert_eq!(items.len(), 10_000);
    assert_eq!(items[9_999]["metadata"]["name"], "secret-09999");
    assert!(items.iter().all(|s| s["data"]
        .as_object()
        .unwrap()
        .values()
        .all(|v| v == MASK_MARKER_BASE64)));
    assert_clean(std::str::from_utf8(&out).unwrap());
    // The same result as masking the parsed document in one go.
    let mut expected = list.clone();
    m.mask_value(&mut expected, &Context::for_kind("Secret"))
        .unwrap();
    assert_eq!(masked, expected);
}

fn items_max_len(list: &Value) -> usize {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.to_string().len())
        .max()
        .unwrap()
}

#[test]
fn duplicate_keys_are_refused() {
    let m = masker();
    let ctx = Context::default();
    for body in [
        // The list's kind twice: which one a client believes is not ours to guess.
        r#"{"kind":"ConfigMapList","kind":"SecretList","items":[{"data":{"a":"aHVudGVyMg=="}}]}"#,
        // An item that would otherwise pass byte for byte with its first `data`.
        r#"{"kind":"SecretList","items":[{"data":{"a":"aHVudGVyMg=="},"data":null}]}"#,
        r#"{"kind":"Secret","data":{"a":"aHVudGVyMg=="},"data":null}"#,
    ] {
        let err = m
            .mask_body(body.as_bytes(), BodyFormat::Document, &ctx)
            .unwrap_err();
        assert!(
            matches!(err, MaskError::Malformed(ref e) if e.contains("duplicate key")),
            "{body}: {err}"
        );
        assert_eq!(err.http_status(), 502);
    }
    let watch = r#"{"type":"ADDED","type":"BOOKMARK","object":{"kind":"Secret","data":{"a":"aHVudGVyMg=="}}}"#;
    assert!(m
        .mask_body(watch.as_bytes(), BodyFormat::WatchStream, &ctx)
        .is_err());
    // An annotation with duplicate keys cannot be read: replaced whole.
    let obj = json!({"kind": "Service", "metadata": {"annotations": {LAST_APPLIED_ANNOTATION: r#"{"kind":"Secret","kind":"Service"}"#}}});
    let (out, _) = mask_doc(&obj, None).unwrap();
    assert_eq!(
        out["metadata"]["annotations"][LAST_APPLIED_ANNOTATION],
        MASK_MARKER
    );
}

#[test]
fn multibyte_text_split_across_chunks() {
    let body = json!({"kind": "ConfigMapList", "items": [
        {"metadata": {"name": "é😀"}, "data": {"note": "ünïcödé 😀 \u{2028} text", "api_key": "😀"}},
    ]})
    .to_string();
    let m = masker();
    let (whole, stats) = m
        .mask_body(body.as_bytes(), BodyFormat::Document, &Context::default())
        .unwrap();
    assert_eq!(stats.rule_fields, 1);
    let mut sm = StreamMasker::new(&m, BodyFormat::Document, Context::default());
    let mut out = Vec::new();
    for chunk in body.as_bytes().chunks(1) {
        sm.push(chunk, &mut out).unwrap();
    }
    sm.finish(&mut out).unwrap();
    assert_eq!(out, whole);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["items"][0]["metadata"]["name"], "é😀");
    assert_eq!(v["items"][0]["data"]["api_key"], MASK_MARKER);
}

#[test]
fn refusal_maps_to_forbidden() {
    let err = MaskError::Refused {
        rule: "secrets".into(),
        kind: "Secret".into(),
    };
    assert_eq!(err.http_status(), 403);
    assert_eq!(
        err.to_string(),
        "reading this Secret is refused by masking rule \"secrets\""
    );
    assert_eq!(MaskError::Truncated.http_status(), 502);
}

#[test]
fn a_watch_event_read_as_a_document_is_still_masked() {
    let event = json!({"type": "ADDED", "object": secret("a", true)});
    let (out, stats) = mask_doc(&event, Some("Secret")).unwrap();
    assert_clean(&out.to_string());
    assert_eq!(stats.secret_fields, 2);
    // Several events where one document was expected: refused, not passed.
    let two = format!("{event}\n{event}\n");
    assert!(masker()
        .mask_body(two.as_bytes(), BodyFormat::Document, &Context::default())
        .is_err());
}

#[test]
fn partial_object_metadata_list_uses_the_requests_kind() {
    let applied = secret("db", true).to_string();
    let list = json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {},
        "items": [{"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                   "metadata": {"name": "db", "annotations": {LAST_APPLIED_ANNOTATION: applied}}}]});
    let (out, stats) = mask_doc(&list, Some("Secret")).unwrap();
    assert_clean(&out.to_string());
    assert_eq!((stats.annotations, stats.objects), (1, 1));
    // With `secrets: refuse`, metadata of Secrets is refused too.
    let m = Masker::new(&MaskingConfig {
        secrets: Action::Refuse,
        ..MaskingConfig::default()
    })
    .unwrap();
    assert!(matches!(
        m.mask_body(
            list.to_string().as_bytes(),
            BodyFormat::Document,
            &Context::for_kind("Secret")
        ),
        Err(MaskError::Refused { .. })
    ));
    // Other kinds' metadata passes.
    let cms = json!({"kind": "PartialObjectMetadataList", "items": [{"kind": "PartialObjectMetadata", "metadata": {"name": "c"}}]});
    assert!(m
        .mask_body(
            cms.to_string().as_bytes(),
            BodyFormat::Document,
            &Context::for_kind("ConfigMap")
        )
        .is_ok());
}

/// A 1.5 MB Secret (etcd's default object limit) in 4 KiB chunks: collected member by
/// member, masked, and the buffer is not moved on every chunk.
#[test]
fn large_single_object_in_small_chunks() {
    let mut s = secret("big", true);
    for i in 0..1500 {
        s["data"][format!("k{i}")] = json!("QUJD".repeat(250));
    }
    let body = s.to_string();
    assert!(body.len() > 1_500_000);
    let m = masker();
    let start = Instant::now();
    let mut sm = StreamMasker::new(&m, BodyFormat::Document, Context::default());
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = body.as_bytes().chunks(4096).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        sm.push(chunk, &mut out).unwrap();
        // Nothing of a single object is sent before it is complete.
        assert_eq!(out.is_empty(), i + 1 < chunks.len());
    }
    let peak = sm.peak_buffered();
    let stats = sm.finish(&mut out).unwrap();
    println!(
        "1.5 MB Secret in 4 KiB chunks: {:?}, peak buffered {peak} bytes",
        start.elapsed()
    );
    assert_eq!(stats.secret_fields, 1502);
    assert!(peak < 2 * body.len() + 64 * 1024, "peak {peak}");
    assert_clean(std::str::from_utf8(&out).unwrap());
    assert!(!std::str::from_utf8(&out).unwrap().contains("QUJD"));
}

#[test]
fn config_from_yaml() {
    let config = MaskingConfig::from_yaml(
        r#"
secrets: mask
maxObjectBytes: 8388608
detectors:
  privateKeys: true
  tokens: true
  cloudKeys: false
  patterns: ["corp_[0-9a-f]{8}"]
rules:
  - name: env-credentials
    kinds: [Deployment]
    path: "@podSpec.containers|initContainers|ephemeralContainers[].env[].value"
    namePattern: "(?i)password|token|secret|key"
  - name: no-kubeconfigs
    kinds: [ConfigMap]
    path: "data.*"
    namePattern: "kubeconfig"
    action: refuse
"#,
    )
    .unwrap();
    assert_eq!(config.max_object_bytes, 8 * 1024 * 1024);
    assert!(!config.detectors.cloud_keys);
    assert_eq!(config.rules[1].action, Action::Refuse);
    let m = Masker::new(&config).unwrap();
    let d = json!({"kind": "Deployment", "spec": {"template": {"spec": {"containers": [{"name": "c",
        "env": [{"name": "TOKEN", "value": "corp_deadbeef"}]}]}}}});
    let (out, _) = m
        .mask_body(
            d.to_string().as_bytes(),
            BodyFormat::Document,
            &Context::default(),
        )
        .unwrap();
    assert!(!String::from_utf8(out).unwrap().contains("corp_deadbeef"));
    for bad in [
        "rules: [{name: r, pth: x}]",
        "secrets: maybe",
        "detectors: {tokenz: true}",
    ] {
        assert!(
            matches!(MaskingConfig::from_yaml(bad), Err(ConfigError::Yaml(_))),
            "{bad}"
        );
    }
    // An empty document is the defaults.
    assert_eq!(
        MaskingConfig::from_yaml("{}").unwrap(),
        MaskingConfig::default()
    );
}

#[test]
fn refusals_by_resource_name() {
    for (kind, plural) in [
        ("Widget", "widgets"),
        ("Policy", "policies"),
        ("Gateway", "gateways"),
        ("Box", "boxes"),
        ("Batch", "batches"),
        ("Ingress", "ingresses"),
    ] {
        assert_eq!(conventional_plural(kind), plural);
    }
    let config = MaskingConfig {
        rules: vec![RuleConfig {
            name: "no-widgets".into(),
            kinds: vec!["Widget".into(), "geese.zoo.example".into()],
            path: None,
            name_pattern: None,
            action: Action::Refuse,
            base64: false,
        }],
        ..MaskingConfig::default()
    };
    let m = Masker::new(&config).unwrap();
    assert_eq!(
        m.refusal_for_resource("example.com", "widgets"),
        Some("no-widgets")
    );
    assert_eq!(
        m.refusal_for_resource("zoo.example", "geese"),
        Some("no-widgets")
    );
    assert_eq!(m.refusal_for_resource("example.com", "gadgets"), None);
    // Secrets are refused by `secrets: refuse` only, and only the core ones.
    assert_eq!(m.refusal_for_resource("", "secrets"), None);
    let refuse = MaskingConfig {
        secrets: Action::Refuse,
        ..MaskingConfig::default()
    };
    let m = Masker::new(&refuse).unwrap();
    assert_eq!(m.refusal_for_resource("", "secrets"), Some("secrets"));
    assert_eq!(m.refusal_for_resource("example.com", "secrets"), None);
}
