//! The figures: rows of named numbers, printed as a table and written as JSON.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

/// What a row's events/s is, so that the table can set them side by side.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// evmesh's durable publish with this many streams.
    Publish {
        streams: u64,
    },
    /// The bare tonic echo with this many streams.
    Ceiling {
        streams: u64,
    },
    /// JetStream's async publish with this many connections.
    JetStream {
        streams: u64,
    },
    /// JetStream's async publish with this many connections, each message as the
    /// JetStream backend publishes an event.
    JetStreamAsEvmesh {
        streams: u64,
    },
    /// evmesh's publish-to-delivery latency at this rate.
    Latency {
        rate: u64,
    },
    /// JetStream's, driven directly.
    JetStreamLatency {
        rate: u64,
    },
    Other,
}

pub struct Row {
    pub scenario: String,
    pub kind: Kind,
    /// Name, value, and the value as shown.
    pub figures: Vec<(String, f64, String)>,
}

impl Row {
    pub fn new(scenario: impl Into<String>) -> Self {
        Self {
            scenario: scenario.into(),
            kind: Kind::Other,
            figures: Vec::new(),
        }
    }

    pub fn kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    /// Adds a figure shown with `decimals` decimals.
    pub fn figure(mut self, name: &str, value: f64, decimals: usize) -> Self {
        self.figures
            .push((name.to_owned(), value, format!("{value:.decimals$}")));
        self
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| *v)
    }

    /// A throughput row: events/s and MB/s of `payload`-byte payloads.
    pub fn throughput(scenario: impl Into<String>, events: u64, secs: f64, payload: usize) -> Self {
        let rate = events as f64 / secs;
        Self::new(scenario)
            .figure("events/s", rate, 0)
            .figure("MB/s", rate * payload as f64 / 1e6, 1)
            .figure("events", events as f64, 0)
    }
}

/// Adds to each evmesh publish row its ratio to the ceiling and to JetStream with
/// the same number of streams, when those ran.
pub fn add_ratios(rows: &mut [Row]) {
    let rate = |rows: &[Row], kind: Kind| {
        rows.iter()
            .find(|r| r.kind == kind)
            .and_then(|r| r.get("events/s"))
    };
    for i in 0..rows.len() {
        if let Kind::Latency { rate } = rows[i].kind {
            let direct = rows
                .iter()
                .find(|r| r.kind == Kind::JetStreamLatency { rate })
                .and_then(|r| r.get("p99 ms"));
            if let (Some(own), Some(direct)) = (rows[i].get("p99 ms"), direct) {
                let ratio = own / direct;
                rows[i]
                    .figures
                    .push(("p99 vs JetStream".into(), ratio, format!("{ratio:.2}")));
            }
            continue;
        }
        let Kind::Publish { streams } = rows[i].kind else {
            continue;
        };
        let Some(own) = rows[i].get("events/s") else {
            continue;
        };
        let ceiling = rate(rows, Kind::Ceiling { streams });
        let jetstream = rate(rows, Kind::JetStream { streams });
        let as_evmesh = rate(rows, Kind::JetStreamAsEvmesh { streams });
        let row = &mut rows[i];
        if let Some(c) = ceiling {
            let ratio = own / c;
            row.figures
                .push(("vs ceiling".into(), ratio, format!("{ratio:.2}")));
        }
        if let Some(j) = jetstream {
            let ratio = own / j;
            row.figures
                .push(("vs JetStream".into(), ratio, format!("{ratio:.2}")));
        }
        if let Some(j) = as_evmesh {
            let ratio = own / j;
            row.figures.push((
                "vs JetStream as evmesh".into(),
                ratio,
                format!("{ratio:.2}"),
            ));
        }
    }
}

pub fn print_table(rows: &[Row]) {
    let width = rows
        .iter()
        .map(|r| r.scenario.len())
        .max()
        .unwrap_or(8)
        .max(8);
    println!("{:<width$}  figures", "scenario");
    for row in rows {
        let figures: Vec<String> = row
            .figures
            .iter()
            .map(|(k, _, v)| format!("{k}={v}"))
            .collect();
        println!("{:<width$}  {}", row.scenario, figures.join("  "));
    }
}

pub fn write_json(rows: &[Row], path: &Path) -> anyhow::Result<()> {
    let all: Vec<_> = rows
        .iter()
        .map(|r| {
            let figures: serde_json::Map<String, serde_json::Value> = r
                .figures
                .iter()
                .map(|(k, v, _)| (k.clone(), json!(v)))
                .collect();
            json!({ "scenario": r.scenario, "figures": figures })
        })
        .collect();
    std::fs::write(path, serde_json::to_string_pretty(&all)?)
        .with_context(|| format!("cannot write {}", path.display()))
}
