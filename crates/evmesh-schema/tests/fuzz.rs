//! Property tests: no input makes schema loading or the checker panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_schema::{Schema, compare};
use proptest::prelude::*;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet};

const SCALARS: &[Type] = &[
    Type::Int32,
    Type::Int64,
    Type::Sint32,
    Type::Uint64,
    Type::String,
    Type::Bytes,
    Type::Bool,
    Type::Double,
    Type::Fixed32,
    Type::Message,
];

/// Fields with distinct numbers: number → (type, label, renamed).
fn fields(max: usize) -> impl Strategy<Value = Vec<FieldDescriptorProto>> {
    proptest::collection::btree_map(
        1i32..16,
        (0usize..SCALARS.len(), 0usize..3, any::<bool>()),
        0..max,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(number, (ty, label, renamed))| {
                let ty = SCALARS[ty];
                let name = if renamed {
                    format!("g{number}")
                } else {
                    format!("f{number}")
                };
                FieldDescriptorProto {
                    json_name: Some(name.clone()),
                    name: Some(name),
                    number: Some(number),
                    label: Some([Label::Optional, Label::Repeated, Label::Optional][label] as i32),
                    r#type: Some(ty as i32),
                    type_name: (ty == Type::Message).then(|| ".fuzz.v1.Inner".to_owned()),
                    proto3_optional: (label == 2 && ty != Type::Message).then_some(true),
                    ..Default::default()
                }
            })
            .collect()
    })
}

fn set(fields: Vec<FieldDescriptorProto>, inner: Vec<FieldDescriptorProto>) -> FileDescriptorSet {
    FileDescriptorSet {
        file: vec![FileDescriptorProto {
            name: Some("fuzz.proto".into()),
            package: Some("fuzz.v1".into()),
            syntax: Some("proto3".into()),
            message_type: vec![
                DescriptorProto {
                    name: Some("Root".into()),
                    field: fields,
                    ..Default::default()
                },
                DescriptorProto {
                    name: Some("Inner".into()),
                    field: inner,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
    }
}

thread_local! {
    /// Valid pairs compared on this thread: the cases of one run share its thread.
    static COMPARED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_load_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512), name in "[a-zA-Z.]{0,24}") {
        let _ = Schema::new(&bytes, &name);
    }

    #[test]
    fn checker_never_panics(
        old in fields(8),
        new in fields(8),
        old_inner in fields(4),
        new_inner in fields(4),
    ) {
        // proto3 optional fields need their synthetic oneofs, which this generator
        // leaves out; such descriptors are refused by Schema, the rest compared.
        let old = Schema::new(&set(old, old_inner).encode_to_vec(), "fuzz.v1.Root");
        let new = Schema::new(&set(new, new_inner).encode_to_vec(), "fuzz.v1.Root");
        if let (Ok(old), Ok(new)) = (old, new) {
            COMPARED.with(|c| c.set(c.get() + 1));
            let forward = compare(&old, &new);
            let back = compare(&new, &old);
            prop_assert_eq!(compare(&old, &old).changes.len(), 0);
            prop_assert!(forward.changes.iter().all(|c| c.needs <= forward.needs));
            prop_assert!(back.changes.iter().all(|c| c.needs <= back.needs));
        }
    }
}

#[test]
fn the_generator_makes_comparable_pairs() {
    // Run the property once more here, sequentially, and count what it compared.
    checker_never_panics();
    let compared = COMPARED.with(std::cell::Cell::get);
    assert!(
        compared >= 50,
        "only {compared} of 256 cases were valid pairs"
    );
}
