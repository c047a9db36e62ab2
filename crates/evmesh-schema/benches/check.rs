//! Checking a 200-message schema against its next version: every message reachable
//! from the payload, each with ten fields.
#![allow(clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use evmesh_schema::fixtures::{CHAIN_ROOT, chain};
use evmesh_schema::{Schema, compare};

const MESSAGES: usize = 200;

fn schema(extra: bool) -> Schema {
    Schema::new(&chain(MESSAGES, extra), CHAIN_ROOT).expect("valid schema")
}

fn bench(c: &mut Criterion) {
    let (old, new) = (schema(false), schema(true));
    assert_eq!(compare(&old, &new).changes.len(), 1);
    c.bench_function("check 200-message schema", |b| {
        b.iter(|| compare(&old, &new))
    });
    let encoded = new.encoded().to_vec();
    c.bench_function("load 200-message schema", |b| {
        b.iter(|| Schema::new(&encoded, CHAIN_ROOT).expect("valid"))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
