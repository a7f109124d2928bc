//! `GET /api/v1/openapi.json`: the API described by hand in `openapi.json` beside this
//! file (a written document reads better than a generated one, and the tests below keep
//! it honest: every route in the table is in it, every path in it is a route, and every
//! reference resolves).

/// The OpenAPI 3 document, served as is.
pub const DOCUMENT: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::api::routes::ROUTES;

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    #[test]
    fn every_route_is_documented_and_nothing_else() {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        for row in ROUTES {
            let method = row.method.as_str().to_ascii_lowercase();
            assert!(
                paths
                    .get(row.pattern)
                    .and_then(|p| p.get(&method))
                    .is_some(),
                "{} {} is not in openapi.json",
                row.method,
                row.pattern
            );
        }
        for (path, item) in paths {
            for method in item.as_object().unwrap().keys() {
                if method == "parameters" {
                    continue;
                }
                assert!(
                    ROUTES.iter().any(
                        |r| r.pattern == path && r.method.as_str().eq_ignore_ascii_case(method)
                    ),
                    "openapi.json documents {method} {path}, which the router does not serve"
                );
            }
        }
    }

    #[test]
    fn every_reference_resolves() {
        fn walk(doc: &Value, node: &Value) {
            match node {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        let pointer = r.strip_prefix('#').expect("local reference");
                        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
                    }
                    map.values().for_each(|v| walk(doc, v));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(doc, v)),
                _ => {}
            }
        }
        let doc = document();
        walk(&doc, &doc);
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    }

    #[test]
    fn the_approval_schema_names_every_field_the_model_has() {
        use crate::approvals::model::*;
        let approval = ApprovalRequest {
            id: "ar-0123456789abcdef".into(),
            spec: ApprovalSpec {
                requester: Requester {
                    user: "u".into(),
                    uid: "1".into(),
                    groups: vec!["g".into()],
                    pod_namespace: "ns".into(),
                    pod_name: "p".into(),
                    node: "n".into(),
                    session: "s".into(),
                },
                request: HeldRequest {
                    audit_id: "a".into(),
                    verb: "create".into(),
                    method: "POST".into(),
                    uri: "/api/v1/namespaces/ns/configmaps".into(),
                    api_group: "".into(),
                    api_version: "v1".into(),
                    resource: "configmaps".into(),
                    subresource: "".into(),
                    namespace: "ns".into(),
                    name: "x".into(),
                    content_type: "application/json".into(),
                    body_sha256: "0".into(),
                    fingerprint: "0".into(),
                },
                rule: "r".into(),
                mode: Mode::Hold,
                execute_as: Some("ns/sa".into()),
                steps: vec![StepSpec {
                    name: "s".into(),
                    groups: vec!["g".into()],
                    approvals: 1,
                }],
                created_at: now_rfc3339(),
                expires_at: now_rfc3339(),
                dry_run: Some(DryRun {
                    object: Some(serde_json::json!({})),
                    diff: "+a".into(),
                    note: "n".into(),
                }),
            },
            status: ApprovalStatus {
                state: State::Approved,
                decisions: vec![Decision {
                    reviewer: "r".into(),
                    reviewer_groups: vec![],
                    verdict: Verdict::Approve,
                    reason: "ok".into(),
                    at: now_rfc3339(),
                    step: 0,
                }],
                decided_at: Some(now_rfc3339()),
                message: "m".into(),
                execution: Some(Execution {
                    at: now_rfc3339(),
                    node: "n".into(),
                    code: 201,
                }),
            },
        };
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        // Each object in the serialised approval against the schema of the same name.
        let json = serde_json::to_value(&approval).unwrap();
        let pairs = [
            ("ApprovalRequest", &json),
            ("ApprovalSpec", &json["spec"]),
            ("Requester", &json["spec"]["requester"]),
            ("HeldRequest", &json["spec"]["request"]),
            ("DryRun", &json["spec"]["dryRun"]),
            ("StepSpec", &json["spec"]["steps"][0]),
            ("ApprovalStatus", &json["status"]),
            ("Decision", &json["status"]["decisions"][0]),
            ("Execution", &json["status"]["execution"]),
        ];
        for (schema, value) in pairs {
            let properties = schemas[schema]["properties"].as_object().unwrap();
            for field in value.as_object().unwrap().keys() {
                assert!(
                    properties.contains_key(field),
                    "schema {schema} lacks field {field}"
                );
            }
        }
    }
}
