//! What the metrics cost the publish path: the work a node with metrics does for one
//! batch of stored events (a label lookup per type and outcome, a counter step each,
//! one histogram step, and each event's type kept for it) beside a node without
//! (nothing), for batches of 1, 64 and 1,024 events of 1 and 8 types. BENCHMARKS.md
//! sets the difference per event beside the node's CPU time per published event.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn events(n: usize, types: usize) -> Vec<evmesh_proto::v1::Event> {
    (0..n)
        .map(|i| evmesh_proto::v1::Event {
            id: format!("e-{i}"),
            r#type: format!("bench.type{}.done", i % types),
            correlation_id: format!("e-{i}"),
            ..Default::default()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish batch metrics");
    for (n, types) in [(1, 1), (64, 1), (1024, 1), (1024, 8)] {
        group.throughput(Throughput::Elements(n as u64));
        for on in [true, false] {
            let mut work = evmesh_node::benching::metrics_of_a_batch(on, events(n, types));
            let id = BenchmarkId::new(
                if on { "on" } else { "off" },
                format!("{n} events, {types} types"),
            );
            group.bench_function(id, |b| b.iter(&mut work));
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
