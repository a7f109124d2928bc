//! What a request to the API server is about, worked out from its method and path the
//! way the API server's own `RequestInfoFactory` does it (k8s.io/apiserver
//! `pkg/endpoints/request/requestinfo.go`), so that policy sees the verb and resource
//! RBAC and the audit log will see.
//!
//! Resource paths look like
//! `/apis/<group>/<version>[/watch]/namespaces/<ns>/<resource>/<name>/<subresource>` and
//! `/api/<version>/...` for the core group; anything else (`/healthz`, `/version`,
//! `/openapi/v3`, discovery at `/apis`) is a non-resource request whose verb is the
//! lower-cased HTTP method.

use std::borrow::Cow;

use http::Method;

/// The classification of one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    pub is_resource_request: bool,
    /// The path as received, for non-resource requests and records.
    pub path: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`, `proxy`; for non-resource requests the lower-cased method.
    pub verb: String,
    pub api_prefix: String,
    /// Empty for the core group.
    pub api_group: String,
    pub api_version: String,
    /// Empty for cluster-scoped resources.
    pub namespace: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    /// Path segments from the resource on (for `proxy`, the rest of the proxied path).
    pub parts: Vec<String>,
}

/// A path the API server would refuse to route, refused here before it reaches policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestInfoError {
    #[error("path segment {0:?} is not allowed in a request path")]
    DotSegment(String),
    #[error("request path contains an invalid percent-encoding")]
    BadEncoding,
    #[error("request path contains an encoded '/' or a control character")]
    HiddenSeparator,
    #[error("unable to determine kind and namespace from url {0}")]
    Incomplete(String),
}

impl RequestInfo {
    /// True for verbs that change state (the calls approvals are about).
    pub fn is_mutating(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }

    /// A WebSocket upgrade arrives as a GET, but exec, attach and port-forward start a
    /// process or a tunnel: the API server authorizes such a GET as `create` too
    /// (AuthorizePodWebsocketUpgradeCreatePermission), and so does policy here, so a
    /// rule about `create` on `pods/exec` cannot be side-stepped by choosing WebSocket
    /// over SPDY. Call for requests that ask for a protocol upgrade.
    pub fn treat_streaming_upgrade_as_create(&mut self) {
        let streaming = matches!(self.subresource.as_str(), "exec" | "attach" | "portforward");
        if self.resource == "pods" && streaming && self.verb == "get" {
            self.verb = "create".to_owned();
        }
    }

    /// `resource/subresource`, or just `resource`: how RBAC rules name it.
    pub fn resource_with_subresource(&self) -> Cow<'_, str> {
        if self.subresource.is_empty() {
            Cow::Borrowed(&self.resource)
        } else {
            Cow::Owned(format!("{}/{}", self.resource, self.subresource))
        }
    }
}

/// Verbs that appear as the first path segment after the version (deprecated forms the
/// API server still serves: `/api/v1/watch/...`, `/api/v1/proxy/...`).
const SPECIAL_VERBS: [&str; 2] = ["proxy", "watch"];
/// Subresources of a namespace itself, which must not be mistaken for a resource type.
const NAMESPACE_SUBRESOURCES: [&str; 2] = ["status", "finalize"];

/// Classifies a request from its method, path and query string.
pub fn classify(
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<RequestInfo, RequestInfoError> {
    let decoded = percent_decode_path(path)?;
    let mut info = RequestInfo {
        path: path.to_owned(),
        verb: method.as_str().to_ascii_lowercase(),
        ..RequestInfo::default()
    };

    let trimmed = decoded.trim_matches('/');
    let segments: Vec<&str> = if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').collect()
    };
    for segment in &segments {
        if *segment == "." || *segment == ".." {
            return Err(RequestInfoError::DotSegment((*segment).to_owned()));
        }
    }

    // Only /api and /apis carry resources; /api has no group.
    let Some(prefix) = segments.first().copied() else {
        return Ok(info);
    };
    let mut rest: &[&str] = match prefix {
        "api" if segments.len() >= 3 => {
            info.api_version = segments[1].to_owned();
            &segments[2..]
        }
        "apis" if segments.len() >= 4 => {
            info.api_group = segments[1].to_owned();
            info.api_version = segments[2].to_owned();
            &segments[3..]
        }
        _ => return Ok(info),
    };
    info.is_resource_request = true;
    info.api_prefix = prefix.to_owned();

    if SPECIAL_VERBS.contains(&rest[0]) {
        if rest.len() < 2 {
            return Err(RequestInfoError::Incomplete(path.to_owned()));
        }
        info.verb = rest[0].to_owned();
        rest = &rest[1..];
    } else {
        info.verb = match *method {
            Method::POST => "create",
            Method::GET | Method::HEAD => "get",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "",
        }
        .to_owned();
    }

    // /namespaces/<ns>/<resource>/...: the namespace scopes what follows. A bare
    // /namespaces/<ns>[/status|/finalize] is the namespace object itself.
    if rest[0] == "namespaces" && rest.len() > 1 {
        info.namespace = rest[1].to_owned();
        if rest.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&rest[2]) {
            rest = &rest[2..];
        }
    }
    info.parts = rest.iter().map(|s| (*s).to_owned()).collect();

    // resource/name/subresource/...; a proxy path has no subresource, the rest is the
    // proxied path.
    if let Some(resource) = rest.first() {
        info.resource = (*resource).to_owned();
    }
    if let Some(name) = rest.get(1) {
        info.name = (*name).to_owned();
    }
    if rest.len() >= 3 && info.verb != "proxy" {
        info.subresource = rest[2].to_owned();
    }

    // A get without a name is a list, or a watch when asked to; a field selector on
    // metadata.name narrows it to one object, as the API server records it.
    if info.name.is_empty() && info.verb == "get" {
        let params = QueryParams::parse(query.unwrap_or(""));
        info.verb = if params.watch { "watch" } else { "list" }.to_owned();
        if let Some(name) = params.field_selector_name {
            if is_valid_path_segment_name(&name) {
                info.name = name;
            }
        }
    }
    // A delete without a name deletes a collection.
    if info.name.is_empty() && info.verb == "delete" {
        info.verb = "deletecollection".to_owned();
    }
    Ok(info)
}

/// The query parameters classification depends on.
#[derive(Debug, Default)]
struct QueryParams {
    watch: bool,
    field_selector_name: Option<String>,
}

impl QueryParams {
    fn parse(query: &str) -> QueryParams {
        let mut params = QueryParams::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode_query(value);
            match key {
                // Go's strconv.ParseBool, which the API server's parameter codec uses.
                "watch" => {
                    params.watch =
                        matches!(value.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True")
                }
                "fieldSelector" => params.field_selector_name = exact_name_match(&value),
                _ => {}
            }
        }
        params
    }
}

/// `metadata.name=foo` (or `==`) as the only term of a field selector; anything else
/// (several terms, `!=`) does not pin one name.
fn exact_name_match(selector: &str) -> Option<String> {
    if selector.contains(',') {
        return None;
    }
    let (key, value) = if let Some((k, v)) = selector.split_once("==") {
        (k, v)
    } else if let Some((k, v)) = selector.split_once('=') {
        if k.ends_with('!') {
            return None;
        }
        (k, v)
    } else {
        return None;
    };
    (key.trim() == "metadata.name").then(|| value.trim().to_owned())
}

/// The API server's `path.IsValidPathSegmentName`.
fn is_valid_path_segment_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('%')
}

/// Decodes %XX in a path. An encoded '/' or a control character would let a path mean
/// one thing here and another upstream, so it is refused rather than guessed at.
fn percent_decode_path(path: &str) -> Result<String, RequestInfoError> {
    if !path.contains('%') {
        if path.bytes().any(|b| b.is_ascii_control()) {
            return Err(RequestInfoError::HiddenSeparator);
        }
        return Ok(path.to_owned());
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or(RequestInfoError::BadEncoding)?;
            let hex = std::str::from_utf8(hex).map_err(|_| RequestInfoError::BadEncoding)?;
            let byte = u8::from_str_radix(hex, 16).map_err(|_| RequestInfoError::BadEncoding)?;
            if byte == b'/' || byte.is_ascii_control() {
                return Err(RequestInfoError::HiddenSeparator);
            }
            out.push(byte);
            i += 3;
        } else {
            if bytes[i].is_ascii_control() {
                return Err(RequestInfoError::HiddenSeparator);
            }
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| RequestInfoError::BadEncoding)
}

/// Decodes a query value (`+` is a space, %XX a byte); malformed escapes stay as they are.
fn percent_decode_query(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match decoded {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (method, path?query, verb, group, version, namespace, resource, subresource, name)
    /// The cases of the API server's own TestGetAPIRequestInfo, plus the ones kubectl
    /// sends every day.
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    );
    const CASES: &[Case] = &[
        // core group, namespaced
        ("GET", "/api/v1/namespaces/default/pods/web", "get", "", "v1", "default", "pods", "", "web"),
        ("GET", "/api/v1/namespaces/default/pods", "list", "", "v1", "default", "pods", "", ""),
        ("GET", "/api/v1/namespaces/default/pods?watch=true", "watch", "", "v1", "default", "pods", "", ""),
        ("GET", "/api/v1/namespaces/default/pods?watch=1&resourceVersion=10", "watch", "", "v1", "default", "pods", "", ""),
        ("GET", "/api/v1/namespaces/default/pods?watch=false", "list", "", "v1", "default", "pods", "", ""),
        ("GET", "/api/v1/watch/namespaces/default/pods", "watch", "", "v1", "default", "pods", "", ""),
        ("GET", "/api/v1/watch/namespaces/default/pods/web", "watch", "", "v1", "default", "pods", "", "web"),
        ("POST", "/api/v1/namespaces/default/pods", "create", "", "v1", "default", "pods", "", ""),
        ("PUT", "/api/v1/namespaces/default/pods/web", "update", "", "v1", "default", "pods", "", "web"),
        ("PATCH", "/api/v1/namespaces/default/pods/web", "patch", "", "v1", "default", "pods", "", "web"),
        ("DELETE", "/api/v1/namespaces/default/pods/web", "delete", "", "v1", "default", "pods", "", "web"),
        ("DELETE", "/api/v1/namespaces/default/pods", "deletecollection", "", "v1", "default", "pods", "", ""),
        ("HEAD", "/api/v1/namespaces/default/pods/web", "get", "", "v1", "default", "pods", "", "web"),
        // subresources
        ("GET", "/api/v1/namespaces/default/pods/web/log", "get", "", "v1", "default", "pods", "log", "web"),
        ("GET", "/api/v1/namespaces/default/pods/web/log?follow=true", "get", "", "v1", "default", "pods", "log", "web"),
        ("POST", "/api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true", "create", "", "v1", "default", "pods", "exec", "web"),
        ("GET", "/api/v1/namespaces/default/pods/web/exec?command=sh", "get", "", "v1", "default", "pods", "exec", "web"),
        ("POST", "/api/v1/namespaces/default/pods/web/attach", "create", "", "v1", "default", "pods", "attach", "web"),
        ("POST", "/api/v1/namespaces/default/pods/web/portforward", "create", "", "v1", "default", "pods", "portforward", "web"),
        ("PUT", "/api/v1/namespaces/default/pods/web/status", "update", "", "v1", "default", "pods", "status", "web"),
        ("POST", "/api/v1/namespaces/default/serviceaccounts/bot/token", "create", "", "v1", "default", "serviceaccounts", "token", "bot"),
        // cluster-scoped, and namespaces themselves
        ("GET", "/api/v1/nodes", "list", "", "v1", "", "nodes", "", ""),
        ("GET", "/api/v1/nodes/node1", "get", "", "v1", "", "nodes", "", "node1"),
        ("GET", "/api/v1/namespaces", "list", "", "v1", "", "namespaces", "", ""),
        ("GET", "/api/v1/namespaces/kube-system", "get", "", "v1", "kube-system", "namespaces", "", "kube-system"),
        ("PUT", "/api/v1/namespaces/kube-system/status", "update", "", "v1", "kube-system", "namespaces", "status", "kube-system"),
        ("PUT", "/api/v1/namespaces/kube-system/finalize", "update", "", "v1", "kube-system", "namespaces", "finalize", "kube-system"),
        ("DELETE", "/api/v1/namespaces/scratch", "delete", "", "v1", "scratch", "namespaces", "", "scratch"),
        // named groups
        ("GET", "/apis/apps/v1/namespaces/prod/deployments/api", "get", "apps", "v1", "prod", "deployments", "", "api"),
        ("PATCH", "/apis/apps/v1/namespaces/prod/deployments/api/scale", "patch", "apps", "v1", "prod", "deployments", "scale", "api"),
        ("GET", "/apis/apps/v1/deployments", "list", "apps", "v1", "", "deployments", "", ""),
        ("GET", "/apis/apps/v1/watch/deployments", "watch", "apps", "v1", "", "deployments", "", ""),
        ("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", "create", "rbac.authorization.k8s.io", "v1", "", "clusterrolebindings", "", ""),
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews", "create", "authentication.k8s.io", "v1", "", "tokenreviews", "", ""),
        ("GET", "/apis/tollgate.dev/v1alpha1/namespaces/a/approvalrequests/x/status", "get", "tollgate.dev", "v1alpha1", "a", "approvalrequests", "status", "x"),
        // field selector pinning a name (kubectl get pod x -w)
        ("GET", "/api/v1/namespaces/default/pods?fieldSelector=metadata.name%3Dweb&watch=true", "watch", "", "v1", "default", "pods", "", "web"),
        ("GET", "/api/v1/namespaces/default/pods?fieldSelector=metadata.name%3D%3Dweb", "list", "", "v1", "default", "pods", "", "web"),
        ("GET", "/api/v1/namespaces/default/pods?fieldSelector=metadata.name%21%3Dweb", "list", "", "v1", "default", "pods", "", ""),
        ("GET", "/api/v1/namespaces/default/pods?fieldSelector=metadata.name%3Dweb%2Cstatus.phase%3DRunning", "list", "", "v1", "default", "pods", "", ""),
        // proxy: no subresource, the rest is the proxied path
        ("GET", "/api/v1/namespaces/default/services/web/proxy/healthz", "get", "", "v1", "default", "services", "proxy", "web"),
        ("GET", "/api/v1/proxy/namespaces/default/pods/web/metrics", "proxy", "", "v1", "default", "pods", "", "web"),
        // unusual methods keep an empty verb, as the API server does
        ("OPTIONS", "/api/v1/namespaces/default/pods/web", "", "", "v1", "default", "pods", "", "web"),
    ];

    #[test]
    fn resource_requests_classify_like_the_api_server() {
        for (method, target, verb, group, version, namespace, resource, subresource, name) in CASES
        {
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (*target, None),
            };
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let info =
                classify(&method, path, query).unwrap_or_else(|e| panic!("{method} {target}: {e}"));
            let got = (
                info.verb.as_str(),
                info.api_group.as_str(),
                info.api_version.as_str(),
                info.namespace.as_str(),
                info.resource.as_str(),
                info.subresource.as_str(),
                info.name.as_str(),
            );
            assert_eq!(
                got,
                (
                    *verb,
                    *group,
                    *version,
                    *namespace,
                    *resource,
                    *subresource,
                    *name
                ),
                "{method} {target}"
            );
            assert!(info.is_resource_request, "{method} {target}");
        }
    }

    #[test]
    fn non_resource_requests_use_the_method_as_verb() {
        for (method, path, verb) in [
            ("GET", "/healthz", "get"),
            ("GET", "/version", "get"),
            ("GET", "/api", "get"),
            ("GET", "/api/v1", "get"),
            ("GET", "/apis", "get"),
            ("GET", "/apis/apps", "get"),
            ("GET", "/apis/apps/v1", "get"),
            ("GET", "/openapi/v3/apis/apps/v1", "get"),
            ("POST", "/logs", "post"),
            ("GET", "/", "get"),
            ("GET", "", "get"),
        ] {
            let info =
                classify(&Method::from_bytes(method.as_bytes()).unwrap(), path, None).unwrap();
            assert!(!info.is_resource_request, "{method} {path}");
            assert_eq!(info.verb, verb, "{method} {path}");
            assert_eq!(info.path, path);
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        for path in [
            "/api/v1/namespaces/default/pods/../secrets",
            "/api/v1/namespaces/./pods",
            "/api/v1/namespaces/default/pods/%2e%2e/secrets",
            "/api/v1/namespaces/default%2Fkube-system/pods",
            "/api/v1/namespaces/default/pods/a%00b",
            "/api/v1/namespaces/default/pods/%zz",
            "/api/v1/namespaces/default/pods/%4",
            "/api/v1/namespaces/default/pods/\u{7f}",
        ] {
            assert!(
                classify(&Method::GET, path, None).is_err(),
                "{path} was accepted"
            );
        }
        assert_eq!(
            classify(&Method::GET, "/api/v1/watch", None),
            Err(RequestInfoError::Incomplete("/api/v1/watch".into()))
        );
    }

    #[test]
    fn percent_encoded_names_are_decoded() {
        let info = classify(
            &Method::GET,
            "/api/v1/namespaces/default/configmaps/a%3Ab",
            None,
        )
        .unwrap();
        assert_eq!(info.name, "a:b");
    }

    #[test]
    fn websocket_exec_counts_as_create() {
        for sub in ["exec", "attach", "portforward"] {
            let path = format!("/api/v1/namespaces/a/pods/p/{sub}");
            let mut info = classify(&Method::GET, &path, Some("command=sh")).unwrap();
            assert_eq!(info.verb, "get");
            info.treat_streaming_upgrade_as_create();
            assert_eq!(info.verb, "create", "{sub}");
        }
        let mut logs = classify(&Method::GET, "/api/v1/namespaces/a/pods/p/log", None).unwrap();
        logs.treat_streaming_upgrade_as_create();
        assert_eq!(logs.verb, "get");
    }

    #[test]
    fn mutating_verbs() {
        let mutating = |m: Method, p: &str| classify(&m, p, None).unwrap().is_mutating();
        assert!(mutating(Method::POST, "/api/v1/namespaces/a/configmaps"));
        assert!(mutating(Method::DELETE, "/api/v1/namespaces/a/configmaps"));
        assert!(mutating(
            Method::PATCH,
            "/apis/apps/v1/namespaces/a/deployments/x"
        ));
        assert!(!mutating(Method::GET, "/api/v1/namespaces/a/configmaps"));
        assert!(!mutating(Method::GET, "/healthz"));
    }
}
