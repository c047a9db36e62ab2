//! Schemas of a chosen size, for benchmarks: the criterion bench and `evmesh-bench`
//! check the same ones.

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet};

/// The payload message of every [`chain`] schema.
pub const CHAIN_ROOT: &str = "big.v1.M0";

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

/// An encoded `FileDescriptorSet` of `messages` messages M0 → M1 → … (each one's
/// field `next` holds the following one), each with ten scalar fields; `extra` adds
/// a field to the last message, a minor change.
pub fn chain(messages: usize, extra: bool) -> Vec<u8> {
    chain_with(messages, usize::from(extra))
}

/// [`chain`] with `added` fields added to the last message: each one more is a minor
/// change, so `chain_with(n, 0)`, `chain_with(n, 1)`, … are successive versions.
pub fn chain_with(messages: usize, added: usize) -> Vec<u8> {
    let mut all = Vec::with_capacity(messages);
    for i in 0..messages {
        let mut field: Vec<FieldDescriptorProto> = (1..=10)
            .map(|n| {
                scalar(
                    &format!("f{n}"),
                    n,
                    [Type::String, Type::Int64, Type::Bool, Type::Bytes][n as usize % 4],
                )
            })
            .collect();
        if i + 1 < messages {
            field.push(FieldDescriptorProto {
                type_name: Some(format!(".big.v1.M{}", i + 1)),
                r#type: Some(Type::Message as i32),
                ..scalar("next", 11, Type::Message)
            });
        } else {
            for k in 0..added {
                let name = if k == 0 {
                    "added".to_owned()
                } else {
                    format!("added{k}")
                };
                field.push(scalar(&name, 12 + k as i32, Type::String));
            }
        }
        all.push(DescriptorProto {
            name: Some(format!("M{i}")),
            field,
            ..Default::default()
        });
    }
    FileDescriptorSet {
        file: vec![FileDescriptorProto {
            name: Some("big.proto".into()),
            package: Some("big.v1".into()),
            syntax: Some("proto3".into()),
            message_type: all,
            ..Default::default()
        }],
    }
    .encode_to_vec()
}
