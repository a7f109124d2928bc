//! Masking throughput, for `cargo xtask bench` (issue 6 item 7, DESIGN §9): the agent's
//! masker, in process, on bodies shaped like the API server's answers.
//!
//! Bodies: a list of 10,000 Secrets (each with labels, managedFields as kubectl leaves
//! them, and three `data` keys: a password, a config blob and a PEM key, ~3 KiB), a list
//! of 10,000 ConfigMaps with nothing to mask (the cost every other read pays), and a
//! watch stream of 10,000 Secret events. Each is pushed through a
//! [`StreamMasker`] in 64 KiB chunks, as the proxy does with the frames it receives,
//! on one thread; the figure is MB of input per second of that thread's CPU time (so
//! "per core", whatever else the machine does), best of the rounds. For scale, the same
//! for a plain `serde_json` parse and serialise of the whole body.

use gateway_agent::masking::{
    default_masker, BodyFormat, Context, Masker, StreamMasker, MASK_MARKER_BASE64,
};
use serde_json::{json, Value};

/// Items in each body.
pub const ITEMS: usize = 10_000;
/// The chunk size bodies are pushed in (an HTTP/2 frame is at most 16 KiB, an HTTP/1.1
/// read usually 8–64 KiB).
pub const CHUNK: usize = 64 * 1024;
/// Target (issue 6 item 7).
pub const TARGET_MB_PER_S: f64 = 150.0;

/// CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A base64 string of `len` characters (content does not matter to the masker).
fn b64(len: usize, seed: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..len)
        .map(|i| ALPHABET[(i * 7 + seed * 13) % 64] as char)
        .collect()
}

fn metadata(name: &str, i: usize, manager: &str) -> Value {
    json!({
        "name": name,
        "namespace": "bench",
        "uid": format!("6f1d2c3e-0000-4000-8000-{i:012}"),
        "resourceVersion": (100_000 + i).to_string(),
        "creationTimestamp": "2026-11-24T10:00:00Z",
        "labels": {"app": "bench", "tier": "backend", "index": i.to_string()},
        "managedFields": [{
            "manager": manager,
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2026-11-24T10:00:00Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:data": {".": {}, "f:config": {}, "f:password": {}, "f:tls.key": {}},
                         "f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:index": {}, "f:tier": {}}},
                         "f:type": {}}
        }]
    })
}

fn secret(i: usize) -> Value {
    json!({
        "metadata": metadata(&format!("secret-{i:05}"), i, "kubectl-create"),
        "data": {
            "password": b64(24, i),
            "config": b64(512, i + 1),
            // A 2048-bit RSA key in PEM, base64 again as `data` carries it.
            "tls.key": b64(2240, i + 2),
        },
        "type": "Opaque",
    })
}

/// A Secret of many short values (service credentials, say): more, smaller strings
/// for the same bytes, the harder case for a parser.
fn small_values_secret(i: usize) -> Value {
    let data: serde_json::Map<String, Value> = (0..12)
        .map(|k| (format!("key-{k:02}"), json!(b64(32, i + k))))
        .collect();
    json!({
        "metadata": metadata(&format!("creds-{i:05}"), i, "kubectl-create"),
        "data": data,
        "type": "Opaque",
    })
}

fn configmap(i: usize) -> Value {
    json!({
        "metadata": metadata(&format!("config-{i:05}"), i, "kubectl-create"),
        "data": {
            "mode": "fast",
            "settings.yaml": format!("replicas: 3\nregion: eu-west\nindex: {i}\n{}", "x: 1\n".repeat(100)),
        },
    })
}

/// A list document in the API server's member order (kind, apiVersion, metadata,
/// items).
fn list(kind: &str, items: Vec<Value>) -> Vec<u8> {
    format!(
        r#"{{"kind":"{kind}","apiVersion":"v1","metadata":{{"resourceVersion":"200000"}},"items":{}}}"#,
        Value::Array(items)
    )
    .into_bytes()
}

fn watch_stream(items: Vec<Value>) -> Vec<u8> {
    let mut out = Vec::new();
    for mut object in items {
        object["kind"] = json!("Secret");
        object["apiVersion"] = json!("v1");
        out.extend_from_slice(
            json!({"type": "MODIFIED", "object": object})
                .to_string()
                .as_bytes(),
        );
        out.push(b'\n');
    }
    out
}

/// One body through a StreamMasker in chunks: CPU seconds, output, peak bytes held.
fn mask_once(
    masker: &Masker,
    body: &[u8],
    format: BodyFormat,
    kind: &str,
) -> anyhow::Result<(f64, Vec<u8>, usize)> {
    let started = thread_cpu_s();
    let mut sm = StreamMasker::new(masker, format, Context::for_kind(kind));
    let mut out = Vec::with_capacity(body.len() + body.len() / 8);
    for chunk in body.chunks(CHUNK) {
        sm.push(chunk, &mut out)?;
    }
    let peak = sm.peak_buffered();
    sm.finish(&mut out)?;
    Ok((thread_cpu_s() - started, out, peak))
}

/// Measures every body `rounds` times; the report's `masking_throughput` section.
pub fn measure(rounds: usize) -> anyhow::Result<Value> {
    let masker = default_masker();
    let bodies = [
        (
            "secret_list",
            list("SecretList", (0..ITEMS).map(secret).collect()),
            BodyFormat::Document,
            "Secret",
        ),
        (
            "secret_list_small_values",
            list("SecretList", (0..ITEMS).map(small_values_secret).collect()),
            BodyFormat::Document,
            "Secret",
        ),
        (
            "configmap_list_nothing_to_mask",
            list("ConfigMapList", (0..ITEMS).map(configmap).collect()),
            BodyFormat::Document,
            "ConfigMap",
        ),
        (
            "secret_watch_events",
            watch_stream((0..ITEMS).map(secret).collect()),
            BodyFormat::WatchStream,
            "Secret",
        ),
    ];
    let mut results = serde_json::Map::new();
    for (name, body, format, kind) in &bodies {
        let mb = body.len() as f64 / 1e6;
        let mut best = f64::INFINITY;
        let mut peak = 0;
        let largest_item = largest(body, *format);
        for _ in 0..rounds.max(1) {
            let (cpu_s, out, held) = mask_once(&masker, body, *format, kind)?;
            best = best.min(cpu_s);
            peak = peak.max(held);
            // A check that it masked (and did not, say, stop early).
            if *kind == "Secret" {
                let masked = out
                    .windows(MASK_MARKER_BASE64.len())
                    .filter(|w| *w == MASK_MARKER_BASE64.as_bytes())
                    .count();
                let expected = if *name == "secret_list_small_values" {
                    12
                } else {
                    3
                };
                anyhow::ensure!(masked == expected * ITEMS, "{name}: {masked} values masked");
            } else {
                anyhow::ensure!(out.len() == body.len(), "{name}: the output changed size");
            }
        }
        // Baseline: serde_json alone, whole body.
        let started = thread_cpu_s();
        let baseline_s = match format {
            BodyFormat::Document => {
                let parsed: Value = serde_json::from_slice(body)?;
                let again = serde_json::to_vec(&parsed)?;
                anyhow::ensure!(!again.is_empty());
                thread_cpu_s() - started
            }
            BodyFormat::WatchStream => {
                for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    let parsed: Value = serde_json::from_slice(line)?;
                    anyhow::ensure!(!serde_json::to_vec(&parsed)?.is_empty());
                }
                thread_cpu_s() - started
            }
        };
        results.insert(
            (*name).to_owned(),
            json!({
                "items": ITEMS,
                "body_mb": round3(mb),
                "mb_per_cpu_s": round3(mb / best),
                "best_cpu_s": round3(best),
                "serde_json_parse_serialise_mb_per_cpu_s": round3(mb / baseline_s.max(1e-9)),
                "peak_buffered_bytes": peak,
                "largest_item_bytes": largest_item,
                "chunk_bytes": CHUNK,
            }),
        );
    }
    let secrets = results["secret_list"]["mb_per_cpu_s"]
        .as_f64()
        .unwrap_or(0.0);
    results.insert("target_mb_per_s".into(), json!(TARGET_MB_PER_S));
    results.insert("met".into(), json!(secrets >= TARGET_MB_PER_S));
    results.insert("rounds".into(), json!(rounds.max(1)));
    Ok(Value::Object(results))
}

/// The largest list item or event of a body (for the memory bound).
fn largest(body: &[u8], format: BodyFormat) -> usize {
    match format {
        BodyFormat::WatchStream => body
            .split(|b| *b == b'\n')
            .map(<[u8]>::len)
            .max()
            .unwrap_or(0),
        BodyFormat::Document => serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| {
                v["items"]
                    .as_array()
                    .map(|items| items.iter().map(|i| i.to_string().len()).max().unwrap_or(0))
            })
            .unwrap_or(0),
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Prints the section [`measure`] returns.
pub fn print(r: &Value) {
    println!();
    println!(
        "masking throughput (one thread, MB of input per CPU second, {} items, {} KiB chunks):",
        ITEMS,
        CHUNK / 1024
    );
    if let Some(err) = r["error"].as_str() {
        println!("  failed: {err}");
        return;
    }
    for (key, label) in [
        ("secret_list", "Secret list"),
        (
            "secret_list_small_values",
            "Secret list, 12 short values each",
        ),
        (
            "configmap_list_nothing_to_mask",
            "ConfigMap list (nothing to mask)",
        ),
        ("secret_watch_events", "Secret watch events"),
    ] {
        let e = &r[key];
        println!(
            "  {label:<34} {:>7.1} MB/s  ({:.1} MB; serde_json parse+serialise alone {:.1} MB/s; peak held {} KiB, largest item {} KiB){}",
            e["mb_per_cpu_s"].as_f64().unwrap_or(f64::NAN),
            e["body_mb"].as_f64().unwrap_or(f64::NAN),
            e["serde_json_parse_serialise_mb_per_cpu_s"].as_f64().unwrap_or(f64::NAN),
            e["peak_buffered_bytes"].as_u64().unwrap_or(0) / 1024,
            e["largest_item_bytes"].as_u64().unwrap_or(0) / 1024,
            if key == "secret_list" {
                format!(
                    "   target >= {TARGET_MB_PER_S:.0}  {}",
                    if r["met"].as_bool() == Some(true) { "met" } else { "NOT met" }
                )
            } else {
                String::new()
            }
        );
    }
}
