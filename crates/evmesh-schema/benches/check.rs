//! Checking a 200-message schema against its next version: every message reachable
//! from the payload, each with ten fields.
#![allow(clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use evmesh_schema::{Schema, compare};
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet};

const MESSAGES: usize = 200;

fn scalar(name: &str, number: i32, ty: Type) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        json_name: Some(name.into()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(ty as i32),
        ..Default::default()
    }
}

/// M0 → M1 → … → M199, each with ten scalar fields; `extra` adds one more field
/// to the last message.
fn schema(extra: bool) -> Schema {
    let mut messages = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let mut field: Vec<FieldDescriptorProto> = (1..=10)
            .map(|n| {
                scalar(
                    &format!("f{n}"),
                    n,
                    [Type::String, Type::Int64, Type::Bool, Type::Bytes][n as usize % 4],
                )
            })
            .collect();
        if i + 1 < MESSAGES {
            field.push(FieldDescriptorProto {
                type_name: Some(format!(".big.v1.M{}", i + 1)),
                r#type: Some(Type::Message as i32),
                ..scalar("next", 11, Type::Message)
            });
        } else if extra {
            field.push(scalar("added", 12, Type::String));
        }
        messages.push(DescriptorProto {
            name: Some(format!("M{i}")),
            field,
            ..Default::default()
        });
    }
    let set = FileDescriptorSet {
        file: vec![FileDescriptorProto {
            name: Some("big.proto".into()),
            package: Some("big.v1".into()),
            syntax: Some("proto3".into()),
            message_type: messages,
            ..Default::default()
        }],
    };
    Schema::new(&set.encode_to_vec(), "big.v1.M0").expect("valid schema")
}

fn bench(c: &mut Criterion) {
    let (old, new) = (schema(false), schema(true));
    assert_eq!(compare(&old, &new).changes.len(), 1);
    c.bench_function("check 200-message schema", |b| {
        b.iter(|| compare(&old, &new))
    });
    let encoded = new.encoded().to_vec();
    c.bench_function("load 200-message schema", |b| {
        b.iter(|| Schema::new(&encoded, "big.v1.M0").expect("valid"))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
