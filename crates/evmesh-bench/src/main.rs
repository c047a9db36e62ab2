//! `evmesh-bench`: runs every scenario against a real node over loopback, beside two
//! references measured in the same run (a bare tonic echo, the ceiling, and NATS
//! JetStream, the peer), and prints a table (and, with `--json`, a JSON file) of
//! the figures.
//!
//! The node under test runs in this process on its own runtime and threads, over a
//! temporary directory; the load runs on another runtime. Both share the machine's
//! cores, as a node and its clients on one machine do. The memory and start-up
//! scenarios run the node in a child process (this binary with `--serve-node`), so
//! that its RSS and its start are its own.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

mod abuse;
mod ceiling;
mod fairness;
mod jetstream;
mod load;
mod mesh;
mod node;
mod report;
mod scenarios;

use evmesh_store::jetstream::JetStreamConfig;
use jetstream::Nats;
use node::Node;
use report::Row;

const ALL: &str = "publish,ceiling,jetstream,latency,fanout,consumer,stall,startup,schema,versions,abuse,fairness,metrics,retention";

#[derive(Parser)]
#[command(
    about = "Benchmarks an evmesh node over loopback beside a bare tonic echo and NATS JetStream"
)]
struct Args {
    /// Tiny sizes: proves the harness works in seconds, measures nothing.
    #[arg(long)]
    quick: bool,
    /// Events per publish-throughput run.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Seconds per latency run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Runs of each side (metrics on, off) in the metrics scenario; the medians are
    /// compared.
    #[arg(long, default_value_t = 3)]
    metrics_rounds: usize,
    /// Events published past the stalled subscriber.
    #[arg(long, default_value_t = 1_000_000)]
    stall_events: u64,
    /// Log sizes the node starts over, in events.
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    startup_events: Vec<u64>,
    /// Versions of one large schema registered by the versions scenario.
    #[arg(long, default_value_t = 8)]
    schema_versions: usize,
    /// Encoded bytes of each of those versions.
    #[arg(long, default_value_t = 1_000_000)]
    schema_bytes: usize,
    /// Scenarios to run; `mesh` (nodes on one JetStream cluster, with --backend
    /// jetstream) runs when named.
    #[arg(long, value_delimiter = ',', default_value = ALL)]
    scenarios: Vec<String>,
    /// Keep the node's log in this directory instead of a temporary one.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where to write every figure as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The node's storage: the embedded log, or JetStream (nats-servers of the
    /// run's own, as --nats-sync and --nats-replicas say).
    #[arg(long, value_enum, default_value = "embedded")]
    backend: BackendArg,
    /// How the nats-servers store, for the JetStream backend and the JetStream
    /// reference: `always` fsyncs before every ack; `default` is the server's.
    #[arg(long, value_enum, default_value = "default")]
    nats_sync: SyncArg,
    /// Replicas of the JetStream streams: 1 runs one nats-server, 3 a cluster of
    /// three on loopback.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    nats_replicas: u8,
    /// `--serve-node` over this JetStream cluster instead of its directory.
    #[arg(long, hide = true)]
    serve_nats: Option<String>,
    #[arg(long, hide = true, default_value_t = 1)]
    serve_nats_replicas: usize,
    /// Serve a node over this data directory until standard input closes (what the
    /// memory and start-up scenarios run).
    #[arg(long, hide = true, requires = "listen")]
    serve_node: Option<PathBuf>,
    /// The address of `--serve-node`.
    #[arg(long, hide = true)]
    listen: Option<SocketAddr>,
    /// `--serve-node` without the integrity check at open.
    #[arg(long, hide = true)]
    skip_integrity_check: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BackendArg {
    Embedded,
    Jetstream,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SyncArg {
    Always,
    Default,
}

/// The scenarios that run on the JetStream backend; the others measure the
/// embedded log alone.
const ON_JETSTREAM: &str = "publish,ceiling,jetstream,latency,fanout,consumer,stall,mesh";

/// One step of the run, as the progress bar counts them.
enum Step {
    Publish {
        streams: u64,
        validated: bool,
    },
    Ceiling {
        streams: u64,
    },
    JetStream {
        streams: u64,
        shape: jetstream::Shape,
    },
    JetStreamLatency {
        rate: u64,
    },
    Latency {
        rate: Option<u64>,
    },
    FanOut {
        subscribers: usize,
        rate: u64,
    },
    Consumer,
    Stall,
    Startup {
        events: u64,
    },
    Schema,
    /// Many versions of one large schema: memory and start-up.
    Versions,
    /// A steady client on a quiet node, then on an attacked one.
    Abuse,
    /// A steady publisher while another principal floods the node, capped and not.
    Fairness,
    /// Publish throughput through `nodes` nodes of one cluster.
    MeshPublish {
        nodes: usize,
    },
    /// Publish-to-delivery latency through `nodes` nodes.
    MeshLatency {
        nodes: usize,
        rate: u64,
    },
    /// A group's owner killed: how long until it delivers again.
    MeshMove,
    /// Durable publish with the metrics on and off.
    MetricsCost {
        streams: u64,
    },
    /// Publish latency at a fixed rate while retention deletes.
    Retention {
        rate: u64,
    },
}

impl Step {
    fn label(&self) -> String {
        match self {
            Step::Publish { streams, validated } => format!(
                "durable publish, {streams} stream(s){}",
                if *validated { "" } else { ", no validation" }
            ),
            Step::Ceiling { streams } => format!("ceiling, {streams} stream(s)"),
            Step::JetStream {
                streams,
                shape: jetstream::Shape::Plain,
            } => format!("JetStream, {streams} conn(s)"),
            Step::JetStream {
                streams,
                shape: jetstream::Shape::MsgId,
            } => format!("JetStream with msg ids, {streams} conn(s)"),
            Step::JetStream {
                streams,
                shape: jetstream::Shape::AsEvmesh,
            } => format!("JetStream as evmesh publishes, {streams} conn(s)"),
            Step::JetStreamLatency { rate } => format!("JetStream latency at {rate}/s"),
            Step::Latency { rate: Some(rate) } => format!("latency at {rate}/s"),
            Step::Latency { rate: None } => "latency at half the maximum".into(),
            Step::FanOut { subscribers, .. } => format!("fan-out to {subscribers}"),
            Step::Consumer => "consumer with inbox and outbox".into(),
            Step::Stall => "stalled subscriber".into(),
            Step::Startup { events } => format!("start-up over {events} events"),
            Step::Schema => "schema check".into(),
            Step::Versions => "schema versions".into(),
            Step::Abuse => "abuse".into(),
            Step::Fairness => "fairness".into(),
            Step::MeshPublish { nodes } => format!("mesh publish through {nodes} node(s)"),
            Step::MeshLatency { nodes, .. } => format!("mesh latency through {nodes} node(s)"),
            Step::MeshMove => "mesh group move".into(),
            Step::MetricsCost { streams } => format!("metrics on and off, {streams} stream(s)"),
            Step::Retention { rate } => format!("retention at {rate}/s"),
        }
    }
}

impl Step {
    /// Whether the step measures the node (on the run's backend), not a reference.
    fn on_node(&self) -> bool {
        !matches!(
            self,
            Step::Ceiling { .. } | Step::JetStream { .. } | Step::JetStreamLatency { .. }
        )
    }
}

/// Sizes for a run: the flags, or tiny ones with `--quick`.
struct Sizes {
    events: u64,
    seconds: u64,
    stall_events: u64,
    /// Runs with and without the stalled subscribers, for the medians.
    stall_pairs: usize,
    rate_divisor: u64,
    fanout_seconds: u64,
    schema_runs: u32,
    schema_versions: usize,
    schema_bytes: usize,
}

fn plan(args: &Args) -> Vec<Step> {
    let run = |name: &str| args.scenarios.iter().any(|s| s == name);
    let mut steps = Vec::new();
    if run("publish") {
        for (streams, validated) in [(1, true), (4, true), (16, true), (1, false)] {
            steps.push(Step::Publish { streams, validated });
        }
    }
    if run("ceiling") {
        steps.extend([1, 4, 16].map(|streams| Step::Ceiling { streams }));
    }
    if run("jetstream") {
        use jetstream::Shape;
        for shape in [Shape::Plain, Shape::MsgId, Shape::AsEvmesh] {
            steps.extend([1, 4, 16].map(|streams| Step::JetStream { streams, shape }));
        }
        steps.push(Step::JetStreamLatency { rate: 1_000 });
    }
    if run("latency") {
        steps.push(Step::Latency { rate: Some(1_000) });
        steps.push(Step::Latency { rate: Some(10_000) });
        steps.push(Step::Latency { rate: None });
    }
    if run("fanout") {
        steps.push(Step::FanOut {
            subscribers: 10,
            rate: 2_000,
        });
        steps.push(Step::FanOut {
            subscribers: 100,
            rate: 500,
        });
    }
    if run("consumer") {
        steps.push(Step::Consumer);
    }
    if run("stall") {
        steps.push(Step::Stall);
    }
    if run("startup") {
        // Smallest first: each size fills the same log further.
        let mut sizes = if args.quick {
            vec![1_000, 10_000]
        } else {
            args.startup_events.clone()
        };
        sizes.sort_unstable();
        steps.extend(sizes.into_iter().map(|events| Step::Startup { events }));
    }
    if run("schema") {
        steps.push(Step::Schema);
    }
    if run("versions") {
        steps.push(Step::Versions);
    }
    if run("abuse") {
        steps.push(Step::Abuse);
    }
    if run("fairness") {
        steps.push(Step::Fairness);
    }
    if run("metrics") {
        steps.extend([1, 16].map(|streams| Step::MetricsCost { streams }));
    }
    if run("retention") {
        steps.push(Step::Retention { rate: 10_000 });
    }
    if run("mesh") {
        steps.extend([1, 2, 3].map(|nodes| Step::MeshPublish { nodes }));
        steps.extend([1, 2, 3].map(|nodes| Step::MeshLatency { nodes, rate: 1_000 }));
        steps.push(Step::MeshMove);
    }
    steps
}

/// mimalloc: the node allocates and frees a few small buffers per event, and glibc's
/// malloc was a fifth of its CPU time under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A fresh node (over a new temporary directory unless `--data` names one, or over
/// new nats-servers) with the bench payload's schema registered: a new group reads
/// the log from its start, so no step should read what an earlier one left.
async fn fresh_node(data: Option<PathBuf>, nats: Option<Nats>) -> anyhow::Result<Node> {
    let node = match nats {
        Some(nats) => {
            let cluster = nats.start().await;
            let mut config = JetStreamConfig::new(cluster.urls());
            config.replicas = nats.replicas;
            let mut node = Node::start(None, Some(config))?;
            node.nats = Some(cluster);
            node
        }
        None => Node::start(data, None)?,
    };
    for ty in [
        "bench.order.placed",
        "bench.latency.tick",
        "bench.fanout.tick",
    ] {
        scenarios::register(node.addr, ty).await?;
    }
    Ok(node)
}

/// Waits for SIGINT or SIGTERM; names the one that came.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without signal handlers the default actions stay: nothing to wait for.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Flushes the machine's dirty pages (`sync`), so that a step's fsyncs do not wait
/// behind the write-back of the step before.
fn settle() {
    let _ = std::process::Command::new("sync").status();
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(data) = &args.serve_node {
        let listen = args
            .listen
            .ok_or_else(|| anyhow::anyhow!("--serve-node needs --listen"))?;
        let nats = args.serve_nats.as_ref().map(|urls| {
            let mut config = JetStreamConfig::new(urls.split(',').map(str::to_owned).collect());
            config.replicas = args.serve_nats_replicas;
            config
        });
        return node::serve_child(data, nats, listen, !args.skip_integrity_check);
    }
    let nats = Nats {
        sync: match args.nats_sync {
            SyncArg::Always => evmesh_testkit::Sync::Always,
            SyncArg::Default => evmesh_testkit::Sync::Default,
        },
        replicas: usize::from(args.nats_replicas),
    };
    let backend = (args.backend == BackendArg::Jetstream).then_some(nats);
    if backend.is_some()
        && let Some(embedded_only) = args
            .scenarios
            .iter()
            .find(|s| !ON_JETSTREAM.split(',').any(|a| a == s.as_str()))
    {
        anyhow::bail!(
            "scenario {embedded_only:?} measures the embedded log only; with --backend jetstream choose from {ON_JETSTREAM}"
        );
    }
    if let Some(unknown) = args
        .scenarios
        .iter()
        .find(|s| s.as_str() != "mesh" && !ALL.split(',').any(|a| a == s.as_str()))
    {
        anyhow::bail!("unknown scenario {unknown:?}: choose from {ALL},mesh");
    }
    if backend.is_none() && args.scenarios.iter().any(|s| s == "mesh") {
        anyhow::bail!(
            "scenario \"mesh\" runs nodes on one JetStream cluster: add --backend jetstream"
        );
    }
    let sizes = if args.quick {
        Sizes {
            events: 2_000,
            seconds: 1,
            stall_events: 2_000,
            stall_pairs: 1,
            rate_divisor: 10,
            fanout_seconds: 1,
            schema_runs: 5,
            schema_versions: 3,
            schema_bytes: 20_000,
        }
    } else {
        Sizes {
            events: args.events,
            seconds: args.seconds,
            stall_events: args.stall_events,
            stall_pairs: 3,
            rate_divisor: 1,
            fanout_seconds: 3,
            schema_runs: 200,
            schema_versions: args.schema_versions,
            schema_bytes: args.schema_bytes,
        }
    };
    let steps = plan(&args);
    let progress = ProgressBar::new(steps.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.enable_steady_tick(Duration::from_millis(200));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let payload = args.payload;
    let run = async {
        let mut rows: Vec<Row> = Vec::new();
        let mut ceiling_addr = None;
        let mut reference: Option<evmesh_testkit::NatsCluster> = None;
        let startup_dir = tempfile::tempdir()?;
        for step in &steps {
            progress.set_message(step.label());
            // Each step starts on a quiet disk: what earlier steps (and JetStream,
            // which flushes on its own schedule) left dirty is written back first.
            if !matches!(step, Step::JetStream { .. }) {
                reference = None;
            }
            settle();
            let node = || fresh_node(args.data.clone(), backend);
            let row = match *step {
                Step::Publish { streams, validated } => {
                    scenarios::publish(&node().await?, streams, sizes.events, payload, validated)
                        .await?
                }
                Step::Ceiling { streams } => {
                    let addr = match ceiling_addr {
                        Some(addr) => addr,
                        None => *ceiling_addr.insert(ceiling::start()?),
                    };
                    scenarios::ceiling(addr, streams, sizes.events, payload).await?
                }
                Step::JetStream { streams, shape } => {
                    let cluster = match &reference {
                        Some(cluster) => cluster,
                        None => reference.insert(nats.start().await),
                    };
                    let direct = jetstream::Direct { cluster, nats };
                    scenarios::jetstream(&direct, streams, sizes.events, payload, shape).await?
                }
                Step::JetStreamLatency { rate } => {
                    let cluster = nats.start().await;
                    let direct = jetstream::Direct {
                        cluster: &cluster,
                        nats,
                    };
                    let rate = (rate / sizes.rate_divisor).max(1);
                    scenarios::jetstream_latency(&direct, rate, sizes.seconds, payload).await?
                }
                Step::Latency { rate } => {
                    // Half the maximum: half of what one stream published durably.
                    let half = rows
                        .iter()
                        .find(|r| r.kind == report::Kind::Publish { streams: 1 })
                        .and_then(|r| r.get("events/s"))
                        .map(|max| (max / 2.0) as u64);
                    let Some(rate) = rate.or(half) else {
                        progress.println(
                            "latency at half the maximum needs the publish scenario: skipped",
                        );
                        progress.inc(1);
                        continue;
                    };
                    let rate = (rate / sizes.rate_divisor).max(1);
                    scenarios::delivery_latency(&node().await?, rate, sizes.seconds, payload)
                        .await?
                }
                Step::FanOut { subscribers, rate } => {
                    let rate = rate / sizes.rate_divisor;
                    scenarios::fan_out(
                        &node().await?,
                        subscribers,
                        rate,
                        sizes.fanout_seconds,
                        payload,
                    )
                    .await?
                }
                Step::Consumer => {
                    scenarios::consumer(&node().await?, sizes.events / 4, payload).await?
                }
                Step::Stall => {
                    scenarios::stalled(sizes.stall_events, payload, sizes.stall_pairs, backend)
                        .await?
                }
                Step::Startup { events } => {
                    scenarios::startup(startup_dir.path(), events, payload).await?
                }
                Step::Schema => scenarios::schema_check(&node().await?, sizes.schema_runs).await?,
                Step::Versions => {
                    scenarios::schema_versions(sizes.schema_versions, sizes.schema_bytes).await?
                }
                Step::Abuse => abuse::abuse(1000 / sizes.rate_divisor, sizes.seconds).await?,
                Step::Fairness => {
                    fairness::fairness(1000 / sizes.rate_divisor, sizes.seconds, payload).await?
                }
                Step::MeshPublish { nodes } => {
                    mesh::publish(nats, nodes, sizes.events, payload).await?
                }
                Step::MeshLatency { nodes, rate } => {
                    let rate = (rate / sizes.rate_divisor).max(1);
                    mesh::latency(nats, nodes, rate, sizes.seconds, payload).await?
                }
                Step::MeshMove => {
                    mesh::group_move(nats, 1000 / sizes.rate_divisor, payload).await?
                }
                Step::MetricsCost { streams } => {
                    scenarios::metrics_cost(
                        streams,
                        sizes.events,
                        payload,
                        if args.quick { 1 } else { args.metrics_rounds },
                    )
                    .await?
                }
                Step::Retention { rate } => {
                    let rate = (rate / sizes.rate_divisor).max(1);
                    scenarios::retention_latency(rate, sizes.seconds, payload, sizes.events).await?
                }
            };
            let row = match backend {
                Some(nats) if step.on_node() => Row {
                    scenario: format!("{} [JetStream backend, {}]", row.scenario, nats.label()),
                    ..row
                },
                _ => row,
            };
            progress.inc(1);
            rows.push(row);
        }
        anyhow::Ok(rows)
    };
    // Interrupted, the run is dropped where it stands: its nodes, node processes
    // and nats-servers are stopped by their destructors, not left running.
    let rows = runtime.block_on(async {
        tokio::select! {
            rows = run => rows,
            signal = interrupted() => Err(anyhow::anyhow!(
                "interrupted by {signal}: the nodes and nats-servers of the run are stopped"
            )),
        }
    });
    progress.finish_and_clear();
    let mut rows = rows?;
    drop(runtime);

    report::add_ratios(&mut rows);
    report::print_table(&rows);
    if let Some(path) = &args.json {
        report::write_json(&rows, path)?;
    }
    Ok(())
}
