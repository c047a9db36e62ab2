//! The abuse run: a well-behaved client publishing at a steady rate and consuming
//! what it publishes, once on a quiet node and once while another client attacks
//! the node over its public API with the inputs of the robustness issue. The node's
//! peak RSS and the well-behaved client's publish-to-delivery p99 should not move.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_client::MeshClient;
use prost::Message;
use tokio::io::AsyncWriteExt;

use crate::load::{event, latency_subscriber, open_loop_publish, quantile_ms};
use crate::node::{NodeProcess, connect};
use crate::report::Row;
use crate::scenarios::RssPeak;

/// What one run of the well-behaved client saw.
struct Run {
    p99_ms: f64,
    peak_rss_mib: f64,
    attacks: u64,
}

/// The row: the same steady client on a quiet node and on an attacked one.
pub async fn abuse(rate: u64, seconds: u64) -> anyhow::Result<Row> {
    let quiet = run(rate, seconds, false).await?;
    let attacked = run(rate, seconds, true).await?;
    Ok(Row::new(format!("abuse, a client at {rate}/s"))
        .figure("p99 ms quiet", quiet.p99_ms, 2)
        .figure("p99 ms attacked", attacked.p99_ms, 2)
        .figure("peak RSS MiB quiet", quiet.peak_rss_mib, 1)
        .figure("peak RSS MiB attacked", attacked.peak_rss_mib, 1)
        .figure("attacks", attacked.attacks as f64, 0))
}

async fn run(rate: u64, seconds: u64, attack: bool) -> anyhow::Result<Run> {
    let node = NodeProcess::start(None, true).await?;
    register_schemas(node.addr).await?;
    let total = rate * seconds;
    let base = Instant::now();
    let receiver = latency_subscriber(node.addr, "bench.steady.>", total, base).await?;
    let peak = RssPeak::start(&node);
    let stop = Arc::new(AtomicBool::new(false));
    let attacks = Arc::new(AtomicU64::new(0));
    let attacker = attack.then(|| {
        let (stop, attacks, addr) = (stop.clone(), attacks.clone(), node.addr);
        tokio::spawn(async move { attack_until(addr, &stop, &attacks).await })
    });
    open_loop_publish(node.addr, "bench.steady.tick", rate, total, 256, base).await?;
    let mut latencies = receiver.await?;
    stop.store(true, Ordering::Relaxed);
    if let Some(attacker) = attacker {
        attacker.await??;
    }
    let peak = peak.finish().await?;
    node.stop()?;
    latencies.sort_unstable();
    Ok(Run {
        p99_ms: quantile_ms(&latencies, 0.99),
        peak_rss_mib: peak as f64 / (1024.0 * 1024.0),
        attacks: attacks.load(Ordering::Relaxed),
    })
}

/// A bench schema: `message abuse.v1.Root { repeated Item items = 1; }` with
/// `message Item { string sku = 1; }`.
fn items_schema() -> Vec<u8> {
    use prost_types::field_descriptor_proto::{Label, Type};
    use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto};
    let field =
        |name: &str, label: Label, ty: Type, type_name: Option<&str>| FieldDescriptorProto {
            name: Some(name.into()),
            number: Some(1),
            label: Some(label as i32),
            r#type: Some(ty as i32),
            type_name: type_name.map(Into::into),
            ..Default::default()
        };
    let message = |name: &str, f| DescriptorProto {
        name: Some(name.into()),
        field: vec![f],
        ..Default::default()
    };
    let file = FileDescriptorProto {
        name: Some("abuse/v1/items.proto".into()),
        package: Some("abuse.v1".into()),
        syntax: Some("proto3".into()),
        message_type: vec![
            message("Item", field("sku", Label::Optional, Type::String, None)),
            message(
                "Root",
                field(
                    "items",
                    Label::Repeated,
                    Type::Message,
                    Some(".abuse.v1.Item"),
                ),
            ),
        ],
        ..Default::default()
    };
    prost_types::FileDescriptorSet { file: vec![file] }.encode_to_vec()
}

fn register(ty: &str, message: &str, set: Vec<u8>) -> pb::RegisterSchemaRequest {
    pb::RegisterSchemaRequest {
        r#type: ty.into(),
        version: String::new(),
        message_name: message.into(),
        descriptor_set: set,
    }
}

/// The schemas the attacks aim at, registered before either run begins: a schema
/// owner's doing, not the attacker's, so that the quiet run holds them too and the
/// runs differ by the attacks alone.
async fn register_schemas(addr: SocketAddr) -> anyhow::Result<()> {
    use evmesh_schema::fixtures::{CHAIN_ROOT, chain};
    let mut registry = pb::schema_registry_client::SchemaRegistryClient::new(connect(addr).await?)
        .max_encoding_message_size(64 << 20);
    registry
        .register_schema(register("abuse.chain", CHAIN_ROOT, chain(3000, false)))
        .await?;
    registry
        .register_schema(register("abuse.items", "abuse.v1.Root", items_schema()))
        .await?;
    Ok(())
}

/// The attacks, round after round, each answered (or refused) before the next:
/// the node is to refuse them cheaply, not to be outrun by them.
async fn attack_until(
    addr: SocketAddr,
    stop: &AtomicBool,
    attacks: &AtomicU64,
) -> anyhow::Result<()> {
    use evmesh_schema::fixtures::{CHAIN_ROOT, chain};
    let channel = connect(addr).await?;
    let mut mesh = MeshClient::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut registry = pb::schema_registry_client::SchemaRegistryClient::new(channel.clone())
        .max_encoding_message_size(64 << 20);
    let deep = chain(3000, true);
    // 200,000 items, each with an unknown field: 200,000 violations.
    let bomb: Vec<u8> = std::iter::repeat_n([0x0a, 0x02, 0x78, 0x01], 200_000)
        .flatten()
        .collect();
    let mut silent = Vec::new();
    let mut round = 0u64;
    let count = || {
        attacks.fetch_add(1, Ordering::Relaxed);
    };
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        // The checker on a type graph 3000 messages deep.
        let _ = registry
            .check_schema(register("abuse.chain", CHAIN_ROOT, deep.clone()))
            .await;
        count();
        // A payload with 200,000 violations.
        let mut e = event("abuse.items", 0, vec![]);
        e.payload = Some(prost_types::Any {
            type_url: "type.googleapis.com/abuse.v1.Root".into(),
            value: bomb.clone(),
        });
        let _ = mesh
            .publish_event(pb::PublishRequest { event: Some(e) })
            .await;
        count();
        // 4 MiB padded through type_url.
        let mut e = event("abuse.padded", 16, vec![]);
        if let Some(p) = e.payload.as_mut() {
            p.type_url = "t/".repeat(2 << 20);
        }
        let _ = mesh
            .publish_event(pb::PublishRequest { event: Some(e) })
            .await;
        count();
        // Large events, which the recent-events ring must not hold without bound.
        let big: Vec<pb::Event> = (0..8)
            .map(|_| event("abuse.big", 1 << 20, vec![]))
            .collect();
        for e in big {
            let _ = mesh
                .publish_event(pb::PublishRequest { event: Some(e) })
                .await;
        }
        count();
        // Silent connections, which the node closes after its handshake deadline.
        for _ in 0..50 {
            if let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await {
                let _ = tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                silent.push(tcp);
            }
        }
        silent.truncate(2000);
        count();
        // Groups opened and left, and one member nacking with the longest delay.
        for i in 0..20 {
            let mut open = pb::SubscribeOpen {
                patterns: vec!["abuse.groups.>".into()],
                group: format!("abuse.left-{round}-{i}"),
                ..Default::default()
            };
            if i == 0 {
                open.ack_timeout = Some(prost_types::Duration {
                    seconds: i64::MAX,
                    nanos: 0,
                });
            }
            let requests = tokio_stream::iter(vec![pb::SubscribeRequest {
                request: Some(pb::subscribe_request::Request::Open(open)),
            }]);
            if let Ok(response) = mesh.subscribe(requests).await {
                drop(response);
            }
        }
        count();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
