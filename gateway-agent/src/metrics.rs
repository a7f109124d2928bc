//! The agent's Prometheus metrics. Each component gets the handles it counts with;
//! `/metrics` encodes the one registry.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: String,
    pub decision: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `enforced`, `exempt` (spliced at L4), `unattributed` (refused), and
    /// `awaited_discovery` (also counted) when the pod was not classified on arrival.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApprovalLabels {
    /// `created`, `refused_by_dry_run`, `executed`, `denied`, `expired`, `cancelled`,
    /// `hold_timeout`.
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MaskedLabels {
    /// The kind the request was about (`Secret`, `ConfigMap`, `Deployment`, ...).
    pub kind: String,
    /// `secret_data`, `last_applied`, `rule` or `detector`.
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MaskRefusalLabels {
    /// `rule` (a masking rule refuses the read), `not_json`, `encoded`, `upgrade`,
    /// `uninspectable` (malformed or oversized, refused with a Status) or `aborted`
    /// (the same, found after part of the body was sent: the response was cut).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `mutated`, `not_enforced`, `already_mutated`, `no_service_account_volume` or
    /// `refused` (the pod was not admitted: the bundle could not be written, the
    /// namespace could not be read, the object was not a pod).
    pub outcome: &'static str,
}

/// Every metric the agent exports.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Histogram,
    pub connections: Family<ConnectionLabels, Counter>,
    pub pods_known: Gauge,
    pub api_targets: Gauge,
    pub approvals: Family<ApprovalLabels, Counter>,
    pub approvals_held: Gauge,
    pub masked_fields: Family<MaskedLabels, Counter>,
    pub masking_refusals: Family<MaskRefusalLabels, Counter>,
    /// Session recording, copied from the recorder's counters at each scrape.
    pub recording: RecordingGauges,
    /// Trust mode injected-ca: the webhook's decisions, and when the signing CA and
    /// the serving certificate end (Unix seconds; 0 in cluster-ca mode).
    pub trust_admissions: Family<AdmissionLabels, Counter>,
    pub trust_signing_ca_expiry: Gauge,
    pub trust_serving_cert_expiry: Gauge,
    registry: Arc<Registry>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "API requests through the proxy, by verb, decision and response code",
            requests.clone(),
        );
        let request_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            request_seconds.clone(),
        );
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections steered to the proxy, by how they were handled",
            connections.clone(),
        );
        let pods_known = Gauge::default();
        registry.register(
            "pods_known",
            "Pods on this node with a resolved cgroup (entries in the pod map)",
            pods_known.clone(),
        );
        let api_targets = Gauge::default();
        registry.register(
            "api_targets",
            "API-server addresses in the kernel target map",
            api_targets.clone(),
        );
        let approvals = Family::<ApprovalLabels, Counter>::default();
        registry.register(
            "approval_events",
            "Approvals made, refused before queueing, executed, or ended otherwise, as seen by this agent",
            approvals.clone(),
        );
        let approvals_held = Gauge::default();
        registry.register(
            "approvals_held",
            "Requests this agent is holding open while they wait for a decision",
            approvals_held.clone(),
        );
        let masked_fields = Family::<MaskedLabels, Counter>::default();
        registry.register(
            "masked_fields",
            "Values masked in answers to enforced pods, by requested kind and cause",
            masked_fields.clone(),
        );
        let masking_refusals = Family::<MaskRefusalLabels, Counter>::default();
        registry.register(
            "masking_refusals",
            "Answers to enforced pods refused or cut because they could not be masked, by reason",
            masking_refusals.clone(),
        );
        let trust_admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "trust_admissions",
            "Pod creations the admission webhook answered (trust mode injected-ca), by outcome",
            trust_admissions.clone(),
        );
        let trust_signing_ca_expiry = Gauge::default();
        registry.register(
            "trust_signing_ca_expiry_timestamp_seconds",
            "When Tollgate's signing CA expires (Unix time; injected-ca only). Rotation stages a successor --ca-rotate-before this",
            trust_signing_ca_expiry.clone(),
        );
        let trust_serving_cert_expiry = Gauge::default();
        registry.register(
            "trust_serving_cert_expiry_timestamp_seconds",
            "When the agent's serving certificate expires (Unix time; injected-ca only); it is renewed with a third of its life left",
            trust_serving_cert_expiry.clone(),
        );
        let recording = RecordingGauges::default();
        for (name, help, gauge) in [
            (
                "recording_sessions_open",
                "Recorded sessions open now",
                &recording.sessions_open,
            ),
            (
                "recording_sessions_opened",
                "Recorded sessions opened since start",
                &recording.sessions_opened,
            ),
            (
                "recording_records_written",
                "Session records written since start",
                &recording.records_written,
            ),
            (
                "recording_bytes_written",
                "Bytes of session records written since start",
                &recording.bytes_written,
            ),
            (
                "recording_records_dropped",
                "Session records lost since start (queue full, disk errors, shutdown)",
                &recording.records_dropped,
            ),
            (
                "recording_write_errors",
                "Failed writes of session records since start",
                &recording.write_errors,
            ),
            (
                "recording_queued_bytes",
                "Session record bytes waiting for the writer",
                &recording.queued_bytes,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        Metrics {
            recording,
            trust_admissions,
            trust_signing_ca_expiry,
            trust_serving_cert_expiry,
            masked_fields,
            masking_refusals,
            requests,
            approvals,
            approvals_held,
            request_seconds,
            connections,
            pods_known,
            api_targets,
            registry: Arc::new(registry),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The recorder's counters as gauges (set from its own counters at each scrape, so
/// the values are totals since start where the name says so).
#[derive(Clone, Default)]
pub struct RecordingGauges {
    pub sessions_open: Gauge,
    pub sessions_opened: Gauge,
    pub records_written: Gauge,
    pub bytes_written: Gauge,
    pub records_dropped: Gauge,
    pub write_errors: Gauge,
    pub queued_bytes: Gauge,
}

impl RecordingGauges {
    pub fn set(&self, stats: &crate::recording::RecorderStats) {
        let g = |gauge: &Gauge, value: u64| {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        g(&self.sessions_open, stats.sessions_open);
        g(&self.sessions_opened, stats.sessions_opened);
        g(&self.records_written, stats.records_written);
        g(&self.bytes_written, stats.bytes_written);
        g(&self.records_dropped, stats.records_dropped);
        g(&self.write_errors, stats.write_errors);
        g(&self.queued_bytes, stats.queued_bytes);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counted_requests() {
        let metrics = Metrics::new();
        metrics
            .requests
            .get_or_create(&RequestLabels {
                verb: "get".into(),
                decision: "allow".into(),
                code: 200,
            })
            .inc();
        let text = metrics.encode();
        assert!(
            text.contains(r#"tollgate_requests_total{verb="get",decision="allow",code="200"} 1"#),
            "{text}"
        );
        assert!(text.contains("# EOF"));
    }
}
