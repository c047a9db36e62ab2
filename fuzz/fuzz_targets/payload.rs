//! Any bytes as the payload of an event whose schema uses every shape (nesting,
//! repeated messages, a map of messages, a oneof, packed scalars, enums, proto2
//! required fields): validation never panics, and what it accepts prost-reflect's
//! full decode accepts too.
#![no_main]

use std::sync::OnceLock;

use evmesh_schema::Schema;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const PROTO3: &str = "syntax = \"proto3\";\npackage fz.v1;\n\
enum Kind { KIND_UNSPECIFIED = 0; KIND_A = 1; KIND_B = 2; }\n\
message Item { string sku = 1; int32 qty = 2; Item child = 3; repeated sint64 deltas = 4; Kind kind = 5; }\n\
message Order { string id = 1; repeated Item items = 2; map<string, Item> by_sku = 3;\n\
  oneof pay { string card = 4; int64 cents = 5; }\n\
  repeated fixed32 codes = 6; double ratio = 7; bytes blob = 8; map<int32, string> names = 9; bool done = 10; }\n";

const PROTO2: &str = "syntax = \"proto2\";\npackage fz.v2;\n\
message Part { required string name = 1; optional int32 size = 2; repeated Part parts = 3; }\n\
message Whole { required Part root = 1; repeated Part more = 2; optional fixed64 stamp = 3; }\n";

fn schemas() -> &'static [Schema; 2] {
    static SCHEMAS: OnceLock<[Schema; 2]> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("evmesh-fuzz-payload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        std::fs::write(dir.join("p3.proto"), PROTO3).expect("writing a proto");
        std::fs::write(dir.join("p2.proto"), PROTO2).expect("writing a proto");
        let compile = |file: &str, message: &str| {
            let set = protox::compile([file], [&dir]).expect("the fuzz schema compiles");
            Schema::new(&set.encode_to_vec(), message).expect("the fuzz schema loads")
        };
        let schemas = [
            compile("p3.proto", "fz.v1.Order"),
            compile("p2.proto", "fz.v2.Whole"),
        ];
        let _ = std::fs::remove_dir_all(&dir);
        schemas
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let schema = &schemas()[usize::from(which & 1)];
    let accepted = evmesh_node::fuzzing::payload(schema, bytes).is_ok();
    if accepted {
        prost_reflect::DynamicMessage::decode(schema.message().clone(), bytes)
            .expect("what validation accepts decodes");
    }
});
