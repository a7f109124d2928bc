//! Configured rules: a path-like selector, an optional name pattern, mask or refuse.
//!
//! Path syntax: segments separated by `.`:
//! - `field` — a member of an object; `a|b|c` — any of those members;
//! - `field[]` — every element of the array in that member;
//! - `*` — every member of an object (its key is the value's name);
//! - `@podSpec` (first segment only) — the pod spec wherever the object's kind keeps
//!   it: `spec` (Pod), `spec.template.spec` (Deployment, StatefulSet, DaemonSet,
//!   ReplicaSet, ReplicationController, Job), `spec.jobTemplate.spec.template.spec`
//!   (CronJob), `template.spec` (PodTemplate).
//!
//! The name tested by `namePattern` is the nearest one along the path: the key of a `*`
//! step, or the `name` member of an element reached by `[]`. A value the path reaches is
//! masked as a whole: a string becomes the marker; an object or array has every string
//! inside it masked; numbers, booleans and null are kept (the shape is kept).

use regex::Regex;
use serde_json::Value;

use super::{Action, ConfigError, MaskError, RuleConfig, MASK_MARKER, MASK_MARKER_BASE64};

/// Kinds that hold a pod spec, for `@podSpec`.
pub const POD_SPEC_KINDS: &[&str] = &[
    "Pod",
    "PodTemplate",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "ReplicationController",
    "Job",
    "CronJob",
];

/// Where `@podSpec` is for a kind.
fn pod_spec_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &["spec"],
        "PodTemplate" => &["template", "spec"],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template", "spec"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    PodSpec,
    Field(Vec<String>),
    Each,
    Members,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    kinds: Vec<String>,
    pub(crate) path: Option<Vec<Step>>,
    name_pattern: Option<Regex>,
    marker: &'static str,
}

fn parse_path(path: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for (i, segment) in path.split('.').enumerate() {
        if segment == "*" {
            steps.push(Step::Members);
            continue;
        }
        if segment == "@podSpec" {
            if i != 0 {
                return Err("@podSpec can only be the first segment".into());
            }
            steps.push(Step::PodSpec);
            continue;
        }
        let mut field = segment;
        let mut each = 0;
        while let Some(rest) = field.strip_suffix("[]") {
            field = rest;
            each += 1;
        }
        if field.is_empty() {
            return Err(format!("empty field name in segment {segment:?}"));
        }
        let names: Vec<String> = field.split('|').map(str::to_string).collect();
        if let Some(bad) = names.iter().find(|n| {
            n.is_empty() || n.contains(['[', ']', '*', '@']) || n.chars().any(char::is_whitespace)
        }) {
            return Err(format!("invalid field name {bad:?}"));
        }
        steps.push(Step::Field(names));
        steps.extend(std::iter::repeat_n(Step::Each, each));
    }
    Ok(steps)
}

impl Rule {
    pub fn compile(config: &RuleConfig) -> Result<Rule, ConfigError> {
        let path = match &config.path {
            None => {
                if config.action == Action::Mask {
                    return Err(ConfigError::MaskWithoutPath {
                        rule: config.name.clone(),
                    });
                }
                None
            }
            Some(text) => Some(parse_path(text).map_err(|reason| ConfigError::Path {
                rule: config.name.clone(),
                path: text.clone(),
                reason,
            })?),
        };
        let name_pattern = match &config.name_pattern {
            None => None,
            Some(p) => Some(Regex::new(p).map_err(|source| ConfigError::NamePattern {
                rule: config.name.clone(),
                source: Box::new(source),
            })?),
        };
        Ok(Rule {
            name: config.name.clone(),
            action: config.action,
            kinds: config.kinds.clone(),
            path,
            name_pattern,
            marker: if config.base64 {
                MASK_MARKER_BASE64
            } else {
                MASK_MARKER
            },
        })
    }

    /// The kinds the rule names (empty: every kind).
    pub fn kinds(&self) -> &[String] {
        &self.kinds
    }

    /// Whether the rule is about objects of this kind (`None`: unknown kind, only rules
    /// for every kind apply).
    pub fn applies_to(&self, kind: Option<&str>) -> bool {
        self.kinds.is_empty() || kind.is_some_and(|k| self.kinds.iter().any(|r| r == k))
    }

    /// Applies the rule to one object: the number of values masked, or
    /// [`MaskError::Refused`] when a refusing rule matches.
    pub fn apply(&self, obj: &mut Value, kind: Option<&str>) -> Result<u64, MaskError> {
        let refused = || MaskError::Refused {
            rule: self.name.clone(),
            kind: kind.unwrap_or("object").to_string(),
        };
        let Some(steps) = &self.path else {
            return Err(refused());
        };
        let (target, steps) = match steps.split_first() {
            Some((Step::PodSpec, rest)) => {
                let Some(prefix) = kind.and_then(pod_spec_path) else {
                    return Ok(0);
                };
                let mut target = Some(&mut *obj);
                for field in prefix {
                    target = target.and_then(|v| v.get_mut(*field));
                }
                match target {
                    Some(t) => (t, rest),
                    None => return Ok(0),
                }
            }
            _ => (obj, steps.as_slice()),
        };
        let mut count = 0;
        let mut matched = false;
        let refuse = self.action == Action::Refuse;
        walk(target, steps, None, &mut |value, name| {
            if let Some(pattern) = &self.name_pattern {
                if !name.is_some_and(|n| pattern.is_match(n)) {
                    return;
                }
            }
            matched = true;
            if !refuse {
                count += mask_strings(value, self.marker);
            }
        });
        if refuse && matched {
            return Err(refused());
        }
        Ok(count)
    }
}

/// Visits every value `steps` reaches from `value`, with the nearest name.
fn walk(
    value: &mut Value,
    steps: &[Step],
    name: Option<&str>,
    visit: &mut dyn FnMut(&mut Value, Option<&str>),
) {
    let Some((step, rest)) = steps.split_first() else {
        visit(value, name);
        return;
    };
    match step {
        Step::PodSpec => {}
        Step::Field(names) => {
            if let Value::Object(fields) = value {
                for field in names {
                    if let Some(child) = fields.get_mut(field) {
                        walk(child, rest, name, visit);
                    }
                }
            }
        }
        Step::Members => {
            if let Value::Object(fields) = value {
                for (key, child) in fields.iter_mut() {
                    walk(child, rest, Some(key), visit);
                }
            }
        }
        Step::Each => {
            if let Value::Array(items) = value {
                for item in items {
                    let own = item.get("name").and_then(Value::as_str).map(str::to_string);
                    let name = own.as_deref().or(name);
                    walk(item, rest, name, visit);
                }
            }
        }
    }
}

/// Replaces every string in `value` by `marker`; returns how many.
pub(crate) fn mask_strings(value: &mut Value, marker: &str) -> u64 {
    match value {
        Value::String(s) => {
            *s = marker.to_string();
            1
        }
        Value::Array(items) => items.iter_mut().map(|v| mask_strings(v, marker)).sum(),
        Value::Object(fields) => fields.values_mut().map(|v| mask_strings(v, marker)).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(kinds: &[&str], path: Option<&str>, pattern: Option<&str>, action: Action) -> Rule {
        Rule::compile(&RuleConfig {
            name: "r".into(),
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            path: path.map(str::to_string),
            name_pattern: pattern.map(str::to_string),
            action,
            base64: false,
        })
        .unwrap()
    }

    #[test]
    fn path_syntax() {
        assert_eq!(
            parse_path("@podSpec.containers|initContainers[].env[].value").unwrap(),
            vec![
                Step::PodSpec,
                Step::Field(vec!["containers".into(), "initContainers".into()]),
                Step::Each,
                Step::Field(vec!["env".into()]),
                Step::Each,
                Step::Field(vec!["value".into()]),
            ]
        );
        assert_eq!(
            parse_path("data.*").unwrap(),
            vec![Step::Field(vec!["data".into()]), Step::Members]
        );
        assert_eq!(
            parse_path("m[][]").unwrap(),
            vec![Step::Field(vec!["m".into()]), Step::Each, Step::Each]
        );
        for bad in ["", "a..b", "a.@podSpec", "[]", "a|", "a b", "a[0]"] {
            assert!(parse_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn compile_errors() {
        let config = |path: Option<&str>, pattern: Option<&str>, action| RuleConfig {
            name: "bad".into(),
            kinds: vec![],
            path: path.map(str::to_string),
            name_pattern: pattern.map(str::to_string),
            action,
            base64: false,
        };
        assert!(matches!(
            Rule::compile(&config(None, None, Action::Mask)),
            Err(ConfigError::MaskWithoutPath { .. })
        ));
        assert!(matches!(
            Rule::compile(&config(Some("a"), Some("("), Action::Mask)),
            Err(ConfigError::NamePattern { .. })
        ));
        assert!(matches!(
            Rule::compile(&config(Some("a..b"), None, Action::Mask)),
            Err(ConfigError::Path { .. })
        ));
        assert!(Rule::compile(&config(None, None, Action::Refuse)).is_ok());
    }

    fn pod_spec() -> Value {
        json!({"containers": [
            {"name": "app", "env": [
                {"name": "DB_PASSWORD", "value": "hunter2"},
                {"name": "LOG_LEVEL", "value": "debug"},
                {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ]},
        ], "initContainers": [
            {"name": "init", "env": [{"name": "SECRET_KEY", "value": "abc"}]},
        ]})
    }

    #[test]
    fn env_values_by_name_in_every_pod_template_kind() {
        let r = rule(
            &[],
            Some("@podSpec.containers|initContainers[].env[].value"),
            Some("(?i)password|token|secret|key"),
            Action::Mask,
        );
        let objects = [
            ("Pod", json!({"kind": "Pod", "spec": pod_spec()})),
            (
                "Deployment",
                json!({"spec": {"template": {"spec": pod_spec()}}}),
            ),
            ("Job", json!({"spec": {"template": {"spec": pod_spec()}}})),
            (
                "CronJob",
                json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": pod_spec()}}}}}),
            ),
            ("PodTemplate", json!({"template": {"spec": pod_spec()}})),
        ];
        for (kind, mut obj) in objects {
            assert_eq!(r.apply(&mut obj, Some(kind)).unwrap(), 2, "{kind}");
            let text = obj.to_string();
            assert!(!text.contains("hunter2"), "{kind}: {text}");
            assert!(!text.contains("\"abc\""), "{kind}: {text}");
            assert!(text.contains("debug"), "{kind}: {text}");
            // valueFrom references are not values: kept.
            assert!(text.contains("secretKeyRef"), "{kind}: {text}");
        }
        // A kind without a pod spec: nothing.
        let mut obj = json!({"spec": pod_spec()});
        assert_eq!(r.apply(&mut obj, Some("Service")).unwrap(), 0);
        assert_eq!(r.apply(&mut obj, None).unwrap(), 0);
    }

    #[test]
    fn configmap_keys_by_pattern() {
        let r = rule(
            &["ConfigMap"],
            Some("data.*"),
            Some("(?i)password"),
            Action::Mask,
        );
        let mut cm = json!({"data": {"db_password": "x", "port": "5432"}});
        assert!(r.applies_to(Some("ConfigMap")));
        assert!(!r.applies_to(Some("Secret")));
        assert!(!r.applies_to(None));
        assert_eq!(r.apply(&mut cm, Some("ConfigMap")).unwrap(), 1);
        assert_eq!(
            cm,
            json!({"data": {"db_password": MASK_MARKER, "port": "5432"}})
        );
    }

    #[test]
    fn whole_subtrees_keep_their_shape() {
        let r = rule(&[], Some("spec.credentials"), None, Action::Mask);
        let mut obj =
            json!({"spec": {"credentials": {"user": "u", "pin": 1234, "list": ["a", null]}}});
        assert_eq!(r.apply(&mut obj, Some("Thing")).unwrap(), 2);
        assert_eq!(
            obj,
            json!({"spec": {"credentials": {"user": MASK_MARKER, "pin": 1234, "list": [MASK_MARKER, null]}}})
        );
    }

    #[test]
    fn refuse_when_matched_only() {
        let r = rule(
            &["ConfigMap"],
            Some("data.*"),
            Some("(?i)password"),
            Action::Refuse,
        );
        let mut ok = json!({"data": {"port": "1"}});
        assert_eq!(r.apply(&mut ok, Some("ConfigMap")).unwrap(), 0);
        let mut bad = json!({"data": {"PASSWORD": "1"}});
        assert!(matches!(
            r.apply(&mut bad, Some("ConfigMap")),
            Err(MaskError::Refused { rule, kind }) if rule == "r" && kind == "ConfigMap"
        ));
        // Refused, not masked: the value is left alone (the body is never sent).
        assert_eq!(bad, json!({"data": {"PASSWORD": "1"}}));
        let whole = rule(&["Secret"], None, None, Action::Refuse);
        assert!(whole.apply(&mut json!({}), Some("Secret")).is_err());
    }

    #[test]
    fn nearest_name_wins() {
        // `[]` over elements without a name keeps the outer key's name.
        let r = rule(&[], Some("*.items[]"), Some("^secret$"), Action::Mask);
        let mut obj = json!({"secret": {"items": ["a", {"name": "public", "v": "b"}]}, "other": {"items": ["c"]}});
        assert_eq!(r.apply(&mut obj, None).unwrap(), 1);
        assert_eq!(
            obj,
            json!({"secret": {"items": [MASK_MARKER, {"name": "public", "v": "b"}]}, "other": {"items": ["c"]}})
        );
    }
}
