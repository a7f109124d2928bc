//! `tg-kube-client`: a kube-rs program the suites run inside a simulated pod, with
//! kube-rs's defaults (in-cluster config, its own retry of 429 + Retry-After), to show
//! what a Rust controller sees through Tollgate.
//!
//! ```text
//! tg-kube-client create-configmap NAMESPACE NAME KEY=VALUE...
//!     prints `created configmap NAMESPACE/NAME uid=...`, or the error and exits 1
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tg-kube-client: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<String, String> {
    let [command, namespace, name, pairs @ ..] = args else {
        return Err("usage: tg-kube-client create-configmap NAMESPACE NAME KEY=VALUE...".into());
    };
    if command != "create-configmap" {
        return Err(format!("unknown command {command:?}"));
    }
    let config = kube::Config::incluster().map_err(|e| format!("in-cluster config: {e}"))?;
    let client = kube::Client::try_from(config).map_err(|e| format!("client: {e}"))?;
    let data: BTreeMap<String, String> = pairs
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    let configmap = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    };
    let created = Api::<ConfigMap>::namespaced(client, namespace)
        .create(&PostParams::default(), &configmap)
        .await
        .map_err(|e| format!("create: {e}"))?;
    Ok(format!(
        "created configmap {namespace}/{name} uid={}",
        created.metadata.uid.unwrap_or_default()
    ))
}
