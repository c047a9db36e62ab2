//! Any bytes as a registration's descriptor set, for any message name it holds:
//! loading never panics, and a schema that loads names its message.
#![no_main]

use evmesh_schema::Schema;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(set) = prost_types::FileDescriptorSet::decode(data) else {
        let _ = Schema::new(data, "a.B");
        return;
    };
    let mut names = Vec::new();
    for file in &set.file {
        for message in &file.message_type {
            let package = file.package();
            names.push(if package.is_empty() {
                message.name().to_owned()
            } else {
                format!("{package}.{}", message.name())
            });
        }
    }
    names.truncate(4);
    names.push("missing.Message".into());
    for name in names {
        if let Ok(schema) = Schema::new(data, &name) {
            assert_eq!(schema.message_name(), name);
        }
    }
});
