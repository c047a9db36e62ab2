//! The node's Prometheus metrics (prometheus-client, OpenMetrics text): counters
//! the request paths move as they go (per batch where there is one), gauges read
//! at each scrape (groups, the log's head, the process).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// Distinct event types labelled; events of further types count under `_other`,
/// so that a client inventing types cannot grow the metrics without bound.
const MAX_TYPES: usize = 1000;
const OTHER: &str = "_other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PublishLabels {
    pub r#type: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CodeLabels {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GroupLabels {
    pub group: String,
}

type GroupGauge = Family<GroupLabels, Gauge>;

/// Every metric of a node.
pub(crate) struct Metrics {
    registry: Registry,
    publish_events: Family<PublishLabels, Counter>,
    publish_rejections: Family<CodeLabels, Counter>,
    publish_duration: BatchHistogram,
    registrations: Family<ResultLabels, Counter>,
    pub(crate) connections: Gauge,
    pub(crate) subscriptions: Gauge,
    group_lag: GroupGauge,
    group_pending: GroupGauge,
    group_dead_letters: GroupGauge,
    group_members: GroupGauge,
    group_oldest_unacked: Family<GroupLabels, Gauge<f64, AtomicU64>>,
    group_counts: Arc<GroupCounts>,
    log_head: Gauge<u64, AtomicU64>,
    log_first: Gauge<u64, AtomicU64>,
    log_bytes: Gauge<u64, AtomicU64>,
    log_work: Arc<LogWork>,
    types: Mutex<HashSet<String>>,
    /// The listener's count of open connections, read at each scrape.
    open_connections: Mutex<Option<Arc<AtomicUsize>>>,
    /// Off when nothing can read them (no HTTP listener): the request paths count
    /// nothing then.
    on: bool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Counts one in a gauge for as long as it lives.
pub(crate) struct Open(Gauge);

impl Open {
    pub(crate) fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What became of a published event.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Stored,
    Duplicate,
    Rejected,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Duplicate => "duplicate",
            Self::Rejected => "rejected",
        }
    }
}

impl Metrics {
    /// Metrics counted when `on`.
    pub(crate) fn new(on: bool) -> Self {
        let mut registry = Registry::default();
        let publish_events = Family::<PublishLabels, Counter>::default();
        registry.register(
            "evmesh_publish_events",
            "Events published, by type and what became of them",
            publish_events.clone(),
        );
        let publish_rejections = Family::<CodeLabels, Counter>::default();
        registry.register(
            "evmesh_publish_rejections",
            "Published events refused, by gRPC code",
            publish_rejections.clone(),
        );
        // 100 µs to ~6.5 s.
        let publish_duration = BatchHistogram::new(exponential_buckets(0.0001, 2.0, 17).collect());
        registry.register(
            "evmesh_publish_duration_seconds",
            "From an event's arrival to its durable ack",
            publish_duration.clone(),
        );
        let registrations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "evmesh_schema_registrations",
            "Schema registrations, by result",
            registrations.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "evmesh_connections",
            "Client connections open",
            connections.clone(),
        );
        let subscriptions = Gauge::default();
        registry.register(
            "evmesh_subscriptions",
            "Subscriptions open",
            subscriptions.clone(),
        );
        let group = |registry: &mut Registry, name: &str, help: &str| {
            let family = GroupGauge::default();
            registry.register(name, help, family.clone());
            family
        };
        let group_lag = group(
            &mut registry,
            "evmesh_group_lag",
            "Events a durable group selects and has not settled",
        );
        let group_pending = group(
            &mut registry,
            "evmesh_group_pending",
            "Events a durable group delivered and has not seen acked",
        );
        let group_dead_letters = group(
            &mut registry,
            "evmesh_group_dead_letters",
            "A durable group's dead letters",
        );
        let group_members = group(
            &mut registry,
            "evmesh_group_members",
            "A durable group's live members",
        );
        let group_oldest_unacked = Family::<GroupLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "evmesh_group_oldest_unacked_age_seconds",
            "How long a durable group's oldest delivery not yet acked has been out",
            group_oldest_unacked.clone(),
        );
        let group_counts = Arc::new(GroupCounts::default());
        registry.register_collector(Box::new(group_counts.clone()));
        let log_head = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "evmesh_log_head_sequence",
            "The last sequence in the log",
            log_head.clone(),
        );
        let log_first = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "evmesh_log_first_sequence",
            "The first sequence the log still holds (0 when empty)",
            log_first.clone(),
        );
        let log_bytes = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "evmesh_log_bytes",
            "Bytes the log takes on disk (on JetStream, the events stream's)",
            log_bytes.clone(),
        );
        let log_work = Arc::new(LogWork::default());
        registry.register_collector(Box::new(log_work.clone()));
        registry.register_collector(Box::new(Process));
        Self {
            registry,
            publish_events,
            publish_rejections,
            publish_duration,
            registrations,
            connections,
            subscriptions,
            group_lag,
            group_pending,
            group_dead_letters,
            group_members,
            group_oldest_unacked,
            group_counts,
            log_head,
            log_first,
            log_bytes,
            log_work,
            types: Mutex::default(),
            open_connections: Mutex::default(),
            on,
        }
    }

    /// Reads the connections open from `open` at each scrape.
    pub(crate) fn count_connections(&self, open: Arc<AtomicUsize>) {
        *self
            .open_connections
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(open);
    }

    /// The label an event type counts under.
    fn type_label(&self, event_type: &str) -> String {
        let mut types = self.types.lock().unwrap_or_else(|e| e.into_inner());
        if types.contains(event_type) {
            return event_type.to_owned();
        }
        if types.len() < MAX_TYPES {
            types.insert(event_type.to_owned());
            return event_type.to_owned();
        }
        OTHER.to_owned()
    }

    /// Whether the node counts: it has an HTTP listener to serve the counts on.
    pub(crate) fn on(&self) -> bool {
        self.on
    }

    /// `n` events of `event_type` with `outcome`: one label lookup for them all.
    pub(crate) fn published(&self, event_type: &str, outcome: Outcome, n: u64) {
        if !self.on {
            return;
        }
        let labels = PublishLabels {
            r#type: self.type_label(event_type),
            result: outcome.label(),
        };
        self.publish_events.get_or_create(&labels).inc_by(n);
    }

    pub(crate) fn rejected(&self, code: tonic::Code, n: u64) {
        if !self.on {
            return;
        }
        self.publish_rejections
            .get_or_create(&CodeLabels {
                code: code_label(code),
            })
            .inc_by(n);
    }

    /// `n` events acked `took` after they arrived.
    pub(crate) fn acked_after(&self, took: Duration, n: usize) {
        if !self.on {
            return;
        }
        self.publish_duration
            .observe_n(took.as_secs_f64(), n as u64);
    }

    pub(crate) fn registration(&self, result: &'static str) {
        self.registrations
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The figures read at each scrape: every durable group's, and the log's head.
    pub(crate) async fn refresh<S: evmesh_store::Store>(&self, store: &S) {
        let open = self
            .open_connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(open) = open {
            self.connections.set(
                i64::try_from(open.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(i64::MAX),
            );
        }
        let mut groups = Vec::new();
        let mut after = String::new();
        loop {
            match store.groups(&after, 1000).await {
                Ok(page) if page.is_empty() => break,
                Ok(page) => {
                    after = page.last().map(|g| g.name.clone()).unwrap_or_default();
                    let full = page.len() < 1000;
                    groups.extend(page);
                    if full {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "listing groups for the metrics");
                    return;
                }
            }
        }
        for family in [
            &self.group_lag,
            &self.group_pending,
            &self.group_dead_letters,
            &self.group_members,
        ] {
            family.clear();
        }
        self.group_oldest_unacked.clear();
        *self
            .group_counts
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            groups.iter().map(|g| (g.name.clone(), g.counts)).collect();
        match store.log_stats().await {
            Ok(log) => {
                self.log_first.set(log.first_sequence);
                self.log_head.set(log.head_sequence);
                self.log_bytes.set(log.bytes);
                *self.log_work.last.lock().unwrap_or_else(|e| e.into_inner()) = log.work;
            }
            Err(e) => tracing::debug!(error = %e, "reading the log's figures for the metrics"),
        }
        for g in groups {
            self.group_oldest_unacked
                .get_or_create(&GroupLabels {
                    group: g.name.clone(),
                })
                .set(g.oldest_unacked.as_secs_f64());
            let labels = GroupLabels { group: g.name };
            let set = |family: &GroupGauge, v: u64| {
                family
                    .get_or_create(&labels)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            set(&self.group_lag, g.lag);
            set(&self.group_pending, g.pending);
            set(&self.group_dead_letters, g.dead_letters);
            set(&self.group_members, u64::from(g.members));
        }
    }

    /// The metrics in OpenMetrics text.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding the metrics");
        }
        out
    }
}

/// google.rpc.Code's name for `code`, e.g. `NOT_FOUND`.
pub(crate) fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One of a group's counts.
type Count = fn(&evmesh_store::GroupCounts) -> u64;

/// Each durable group's counters (this node's counts, kept by its store), as the
/// last scrape read them.
#[derive(Debug, Default)]
struct GroupCounts {
    groups: Mutex<Vec<(String, evmesh_store::GroupCounts)>>,
}

impl Collector for GroupCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let families: [(&str, &str, Count); 6] = [
            (
                "evmesh_deliveries",
                "Deliveries of a durable group's events, redeliveries included",
                |c| c.delivered,
            ),
            (
                "evmesh_redeliveries",
                "Deliveries at attempt 2 or later",
                |c| c.redelivered,
            ),
            ("evmesh_acks", "Deliveries acked", |c| c.acked),
            ("evmesh_nacks", "Deliveries nacked", |c| c.nacked),
            (
                "evmesh_dead_letters",
                "Events moved to a group's dead letters",
                |c| c.dead_lettered,
            ),
            (
                "evmesh_retention_skipped_events",
                "Events a group had not settled that retention deleted before it got to them",
                |c| c.skipped,
            ),
        ];
        for (name, help, value) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (group, counts) in groups.iter() {
                let labels = GroupLabels {
                    group: group.clone(),
                };
                ConstCounter::new(value(counts)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A histogram that takes a batch of equal observations in one step: every event
/// of a publish batch is acked after the same time, so counting them costs the
/// same for one event as for a thousand.
/// Clones share it.
#[derive(Debug, Clone)]
struct BatchHistogram {
    uppers: Arc<[f64]>,
    /// Per bucket (the last: above every bound).
    counts: Arc<[AtomicU64]>,
    /// The sum of the observations, in nanoseconds.
    sum_nanos: Arc<AtomicU64>,
}

impl BatchHistogram {
    fn new(uppers: Vec<f64>) -> Self {
        let counts = (0..=uppers.len()).map(|_| AtomicU64::new(0)).collect();
        Self {
            uppers: uppers.into(),
            counts,
            sum_nanos: Arc::default(),
        }
    }

    fn observe_n(&self, value: f64, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let bucket = self
            .uppers
            .iter()
            .position(|&upper| value <= upper)
            .unwrap_or(self.uppers.len());
        self.counts[bucket].fetch_add(n, Relaxed);
        self.sum_nanos
            .fetch_add(((value * 1e9) as u64).saturating_mul(n), Relaxed);
    }
}

impl EncodeMetric for BatchHistogram {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        ConstHistogram {
            sum: self.sum_nanos.load(Relaxed) as f64 / 1e9,
            count: counts.iter().sum(),
            buckets: self
                .uppers
                .iter()
                .copied()
                .chain([f64::MAX])
                .zip(counts)
                .collect(),
        }
        .encode(encoder)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// The log's own work (syncs, retention), as the last scrape read it from the
/// store; nothing on a backend that does neither itself.
#[derive(Debug, Default)]
struct LogWork {
    last: Mutex<Option<evmesh_store::LogWork>>,
}

/// A histogram whose figures were counted elsewhere.
struct ConstHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for ConstHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            self.count,
            &self.buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

impl Collector for LogWork {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let Some(work) = last.as_ref() else {
            return Ok(());
        };
        let uppers = evmesh_store::SYNC_BUCKETS.iter().copied().chain([f64::MAX]);
        let histogram = ConstHistogram {
            sum: work.sync_seconds,
            count: work.sync_buckets.iter().sum(),
            buckets: uppers.zip(work.sync_buckets.iter().copied()).collect(),
        };
        histogram.encode(encoder.encode_descriptor(
            "evmesh_log_sync_duration_seconds",
            "How long each sync of the log's write-ahead file to disk took",
            None,
            MetricType::Histogram,
        )?)?;
        ConstCounter::new(work.sync_failures).encode(encoder.encode_descriptor(
            "evmesh_log_sync_failures",
            "Syncs of the log to disk that failed (the node acknowledges nothing after one)",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(work.retention_deleted).encode(encoder.encode_descriptor(
            "evmesh_retention_deleted_events",
            "Events retention deleted from the log",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

/// The standard `process_*` metrics, read from /proc at each scrape.
#[derive(Debug)]
struct Process;

impl Process {
    fn stat() -> Option<(f64, f64, u64)> {
        // Fields after the command's closing parenthesis: utime is the 12th, stime
        // the 13th, num_threads the 18th, starttime the 20th (clock ticks).
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = 100.0; // USER_HZ on Linux
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        let threads: u64 = fields.get(17)?.parse().ok()?;
        let start_ticks: f64 = fields.get(19)?.parse().ok()?;
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        let started = now - uptime + start_ticks / tick;
        Some(((utime + stime) / tick, started, threads))
    }

    fn resident_bytes() -> Option<i64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib: i64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    fn open_fds() -> Option<i64> {
        Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as i64)
    }

    fn max_fds() -> Option<i64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    }
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        if let Some((cpu, started, threads)) = Self::stat() {
            let metric = ConstCounter::new(cpu);
            metric.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                MetricType::Counter,
            )?)?;
            ConstGauge::new(started).encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                None,
                MetricType::Gauge,
            )?)?;
            ConstGauge::new(threads as i64).encode(encoder.encode_descriptor(
                "process_threads",
                "Threads of the process",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Some(rss) = Self::resident_bytes() {
            ConstGauge::new(rss).encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Some(fds) = Self::open_fds() {
            ConstGauge::new(fds).encode(encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let tasks = i64::try_from(runtime.metrics().num_alive_tasks()).unwrap_or(i64::MAX);
            ConstGauge::new(tasks).encode(encoder.encode_descriptor(
                "evmesh_runtime_tasks",
                "Tasks alive on the node's runtime",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Some(max) = Self::max_fds() {
            ConstGauge::new(max).encode(encoder.encode_descriptor(
                "process_max_fds",
                "The limit on open file descriptors",
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_equal_observations_counts_each() {
        let metrics = Metrics::new(true);
        metrics.acked_after(Duration::from_micros(150), 3);
        metrics.acked_after(Duration::from_secs(10), 2);
        let text = metrics.encode();
        for line in [
            r#"evmesh_publish_duration_seconds_bucket{le="0.0001"} 0"#,
            r#"evmesh_publish_duration_seconds_bucket{le="0.0002"} 3"#,
            r#"evmesh_publish_duration_seconds_bucket{le="6.5536"} 3"#,
            r#"evmesh_publish_duration_seconds_bucket{le="+Inf"} 5"#,
            "evmesh_publish_duration_seconds_count 5",
            "evmesh_publish_duration_seconds_sum 20.00045",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
