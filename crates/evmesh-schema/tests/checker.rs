//! The checker, case by case: one line per schema change, with what it needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_schema::{Bump, compare};

mod common;
use common::schema;

const HEADER: &str = "syntax = \"proto3\";\npackage shop.v1;\n";

/// `old` and `new` are bodies of shop.v1.Root (plus anything after it) in one file.
#[track_caller]
fn check(old: &str, new: &str, needs: Bump, expect: &[&str]) {
    check_files(
        &[("shop.proto", &format!("{HEADER}{old}"))],
        &[("shop.proto", &format!("{HEADER}{new}"))],
        "shop.v1.Root",
        needs,
        expect,
    );
}

#[track_caller]
fn check_files(
    old: &[(&str, &str)],
    new: &[(&str, &str)],
    message: &str,
    needs: Bump,
    expect: &[&str],
) {
    let verdict = compare(&schema(old, message), &schema(new, message));
    let mut got: Vec<String> = verdict
        .changes
        .iter()
        .map(|c| format!("{} {} {}", c.needs, c.rule, c.path))
        .collect();
    got.sort();
    let mut expect: Vec<String> = expect.iter().map(|s| (*s).to_owned()).collect();
    expect.sort();
    assert_eq!(got, expect, "changes");
    assert_eq!(
        verdict.needs, needs,
        "needs; changes: {:#?}",
        verdict.changes
    );
}

const BASE: &str = "message Root { string id = 1; int32 qty = 2; Status status = 3; }\nenum Status { STATUS_UNSPECIFIED = 0; STATUS_OPEN = 1; }\n";

#[test]
fn none_and_patch() {
    check(BASE, BASE, Bump::None, &[]);
    check(
        BASE,
        &format!("// A comment.\n{BASE}"),
        Bump::Patch,
        &["PATCH DESCRIPTOR_CHANGED shop.v1.Root"],
    );
    check(
        BASE,
        "message Root { int32 qty = 2; string id = 1; Status status = 3; }\nenum Status { STATUS_UNSPECIFIED = 0; STATUS_OPEN = 1; }\n",
        Bump::Patch,
        &["PATCH DESCRIPTOR_CHANGED shop.v1.Root"],
    );
    check(
        BASE,
        "message Root { string id = 1 [deprecated = true]; int32 qty = 2; Status status = 3; }\nenum Status { STATUS_UNSPECIFIED = 0; STATUS_OPEN = 1; }\n",
        Bump::Patch,
        &["PATCH DESCRIPTOR_CHANGED shop.v1.Root"],
    );
}

#[test]
fn minor() {
    check(
        "message Root { string id = 1; }",
        "message Root { string id = 1; int64 total = 2; }",
        Bump::Minor,
        &["MINOR FIELD_ADDED shop.v1.Root.total"],
    );
    check(
        "message Root { string id = 1; }",
        "message Root { string id = 1; }\nmessage Extra { string x = 1; }",
        Bump::Minor,
        &["MINOR MESSAGE_ADDED shop.v1.Extra"],
    );
    check(
        "message Root { string id = 1; Item item = 2; }\nmessage Item { string sku = 1; }",
        "message Root { string id = 1; Item item = 2; }\nmessage Item { string sku = 1; Item child = 2; }",
        Bump::Minor,
        &["MINOR FIELD_ADDED shop.v1.Item.child"],
    );
    check(
        BASE,
        "message Root { string id = 1; int32 qty = 2; Status status = 3; }\nenum Status { STATUS_UNSPECIFIED = 0; STATUS_OPEN = 1; STATUS_CLOSED = 2; }\n",
        Bump::Minor,
        &["MINOR ENUM_VALUE_ADDED shop.v1.Status.STATUS_CLOSED"],
    );
    check(
        "message Root { string id = 1; }",
        "message Root { string id = 1; oneof pay { string card = 2; string iban = 3; } }",
        Bump::Minor,
        &[
            "MINOR FIELD_ADDED shop.v1.Root.card",
            "MINOR FIELD_ADDED shop.v1.Root.iban",
        ],
    );
}

#[test]
fn major_fields() {
    check(
        "message Root { string id = 1; int32 qty = 2; }",
        "message Root { string id = 1; }",
        Bump::Major,
        &["MAJOR FIELD_NO_DELETE shop.v1.Root.qty"],
    );
    check(
        "message Root { string id = 1; int32 qty = 2; }",
        "message Root { string id = 1; reserved 2; reserved \"qty\"; }",
        Bump::Major,
        &["MAJOR FIELD_NO_DELETE shop.v1.Root.qty"],
    );
    check(
        "message Root { string id = 1; int32 qty = 2; }",
        "message Root { string id = 1; int32 qty = 3; }",
        Bump::Major,
        &[
            "MAJOR FIELD_NO_DELETE shop.v1.Root.qty",
            "MAJOR FIELD_SAME_NUMBER shop.v1.Root.qty",
        ],
    );
    for (from, to) in [
        ("int32", "int64"),
        ("int32", "sint32"),
        ("int32", "uint32"),
        ("string", "bytes"),
        ("fixed64", "uint64"),
        ("float", "double"),
    ] {
        check(
            &format!("message Root {{ {from} a = 1; }}"),
            &format!("message Root {{ {to} a = 1; }}"),
            Bump::Major,
            &["MAJOR FIELD_SAME_TYPE shop.v1.Root.a"],
        );
    }
    check(
        "message Root { int32 a = 1; }",
        "message Root { repeated int32 a = 1; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_CARDINALITY shop.v1.Root.a"],
    );
    check(
        "message Root { optional string a = 1; }",
        "message Root { repeated string a = 1; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_CARDINALITY shop.v1.Root.a"],
    );
    check(
        "message Root { int32 a = 1; }",
        "message Root { optional int32 a = 1; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_PRESENCE shop.v1.Root.a"],
    );
    check(
        "message Root { int32 a = 1; }",
        "message Root { int32 b = 1; }",
        Bump::Major,
        &[
            "MAJOR FIELD_SAME_NAME shop.v1.Root.a",
            "MAJOR FIELD_SAME_JSON_NAME shop.v1.Root.a",
        ],
    );
    check(
        "message Root { int32 total_cents = 1; }",
        "message Root { int32 total_cents = 1 [json_name = \"total\"]; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_JSON_NAME shop.v1.Root.total_cents"],
    );
    check(
        "message Root { string card = 1; string iban = 2; }",
        "message Root { oneof pay { string card = 1; string iban = 2; } }",
        Bump::Major,
        &[
            "MAJOR FIELD_SAME_ONEOF shop.v1.Root.card",
            "MAJOR FIELD_SAME_ONEOF shop.v1.Root.iban",
        ],
    );
    check(
        "message Root { oneof pay { string card = 1; string iban = 2; } }",
        "message Root { oneof pay { string card = 1; } string iban = 2; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_ONEOF shop.v1.Root.iban"],
    );
    check(
        "message Root { oneof pay { string card = 1; } }",
        "message Root { string card = 1; }",
        Bump::Major,
        &[
            "MAJOR FIELD_SAME_ONEOF shop.v1.Root.card",
            "MAJOR ONEOF_NO_DELETE shop.v1.Root.pay",
        ],
    );
    check(
        "message Root { string id = 1; reserved 5 to 7; }",
        "message Root { string id = 1; }",
        Bump::Major,
        &["MAJOR RESERVED_MESSAGE_NO_DELETE shop.v1.Root"],
    );
    check(
        "message Root { string id = 1; reserved 5; }",
        "message Root { string id = 1; int32 x = 5; }",
        Bump::Major,
        &[
            "MAJOR FIELD_NO_REUSE_RESERVED shop.v1.Root.x",
            "MAJOR RESERVED_MESSAGE_NO_DELETE shop.v1.Root",
        ],
    );
}

#[test]
fn major_maps_and_nesting() {
    check(
        "message Root { map<string, int32> counts = 1; }",
        "message Root { map<string, int64> counts = 1; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_TYPE shop.v1.Root.counts.value"],
    );
    check(
        "message Root { map<string, int32> counts = 1; }",
        "message Root { map<int32, int32> counts = 1; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_TYPE shop.v1.Root.counts.key"],
    );
    check(
        "message Root { map<string, Item> items = 1; }\nmessage Item { string sku = 1; }",
        "message Root { map<string, Item> items = 1; }\nmessage Item { bytes sku = 1; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_TYPE shop.v1.Item.sku"],
    );
    check(
        "message Root { map<string, int32> counts = 1; }",
        "message Root { repeated int32 counts = 1; }",
        Bump::Major,
        &[
            "MAJOR FIELD_SAME_CARDINALITY shop.v1.Root.counts",
            "MAJOR FIELD_SAME_TYPE shop.v1.Root.counts",
        ],
    );
    // A self-referencing message terminates.
    check(
        "message Root { Root parent = 1; string id = 2; }",
        "message Root { Root parent = 1; bytes id = 2; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_TYPE shop.v1.Root.id"],
    );
    // Three levels deep, in an imported file.
    let deep = |ty: &str| {
        format!(
            "syntax = \"proto3\";\npackage other.v1;\nmessage Level1 {{ Level2 next = 1; }}\nmessage Level2 {{ Level3 next = 1; }}\nmessage Level3 {{ {ty} x = 1; }}\n"
        )
    };
    let root = "syntax = \"proto3\";\npackage shop.v1;\nimport \"other/v1/deep.proto\";\nmessage Root { other.v1.Level1 first = 1; }\n";
    check_files(
        &[
            ("other/v1/deep.proto", &deep("int32")),
            ("shop.proto", root),
        ],
        &[
            ("other/v1/deep.proto", &deep("sint32")),
            ("shop.proto", root),
        ],
        "shop.v1.Root",
        Bump::Major,
        &["MAJOR FIELD_SAME_TYPE other.v1.Level3.x"],
    );
    // Well-known types are compared like any message.
    check(
        "import \"google/protobuf/timestamp.proto\";\nmessage Root { google.protobuf.Timestamp at = 1; }",
        "import \"google/protobuf/duration.proto\";\nmessage Root { google.protobuf.Duration at = 1; }",
        Bump::Major,
        &[
            "MAJOR FIELD_SAME_TYPE shop.v1.Root.at",
            "MINOR MESSAGE_ADDED google.protobuf.Duration",
        ],
    );
    check(
        "import \"google/protobuf/timestamp.proto\";\nmessage Root { google.protobuf.Timestamp at = 1; }",
        "import \"google/protobuf/timestamp.proto\";\nmessage Root { int64 at = 1; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_TYPE shop.v1.Root.at"],
    );
}

#[test]
fn major_enums_and_messages() {
    let with_enum = |values: &str| {
        format!("message Root {{ Status status = 1; }}\nenum Status {{ {values} }}\n")
    };
    check(
        &with_enum("S_UNSPECIFIED = 0; S_OPEN = 1;"),
        &with_enum("S_UNSPECIFIED = 0;"),
        Bump::Major,
        &["MAJOR ENUM_VALUE_NO_DELETE shop.v1.Status.S_OPEN"],
    );
    check(
        &with_enum("S_UNSPECIFIED = 0; S_OPEN = 1;"),
        &with_enum("S_UNSPECIFIED = 0; S_OPENED = 1;"),
        Bump::Major,
        &["MAJOR ENUM_VALUE_SAME_NAME shop.v1.Status.S_OPEN"],
    );
    check(
        &with_enum("S_UNSPECIFIED = 0; S_OPEN = 1;"),
        &with_enum("S_UNSPECIFIED = 0; S_OPEN = 2;"),
        Bump::Major,
        &[
            "MAJOR ENUM_VALUE_NO_DELETE shop.v1.Status.S_OPEN",
            "MAJOR ENUM_VALUE_SAME_NUMBER shop.v1.Status.S_OPEN",
        ],
    );
    check(
        &with_enum("S_UNSPECIFIED = 0; reserved 5;"),
        &with_enum("S_UNSPECIFIED = 0;"),
        Bump::Major,
        &["MAJOR RESERVED_ENUM_NO_DELETE shop.v1.Status"],
    );
    check(
        "message Root { Status s = 1; }\nenum Status { S_UNSPECIFIED = 0; }\nenum State { STATE_UNSPECIFIED = 0; }",
        "message Root { State s = 1; }\nenum Status { S_UNSPECIFIED = 0; }\nenum State { STATE_UNSPECIFIED = 0; }",
        Bump::Major,
        &["MAJOR FIELD_SAME_TYPE shop.v1.Root.s"],
    );
    // The payload message renamed (or moved to another package).
    check_files(
        &[(
            "shop.proto",
            &format!("{HEADER}message Root {{ string id = 1; }}"),
        )],
        &[(
            "shop.proto",
            &format!(
                "{HEADER}message Root {{ string id = 1; }}\nmessage Placed {{ string id = 1; }}"
            ),
        )],
        "shop.v1.Root",
        Bump::Minor,
        &["MINOR MESSAGE_ADDED shop.v1.Placed"],
    );
    let old = schema(
        &[(
            "shop.proto",
            &format!("{HEADER}message Root {{ string id = 1; }}"),
        )],
        "shop.v1.Root",
    );
    let new = schema(
        &[(
            "shop.proto",
            &format!("{HEADER}message Placed {{ string id = 1; }}"),
        )],
        "shop.v1.Placed",
    );
    let verdict = compare(&old, &new);
    assert_eq!(verdict.needs, Bump::Major);
    assert!(
        verdict
            .changes
            .iter()
            .any(|c| c.rule == "MESSAGE_SAME_NAME"),
        "{verdict:?}"
    );
}

#[test]
fn proto2() {
    let p2 = |body: &str| format!("syntax = \"proto2\";\npackage shop.v1;\n{body}");
    check_files(
        &[(
            "shop.proto",
            &p2("message Root { optional int32 a = 1 [default = 5]; }"),
        )],
        &[(
            "shop.proto",
            &p2("message Root { optional int32 a = 1 [default = 6]; }"),
        )],
        "shop.v1.Root",
        Bump::Major,
        &["MAJOR FIELD_SAME_DEFAULT shop.v1.Root.a"],
    );
    check_files(
        &[("shop.proto", &p2("message Root { optional int32 a = 1; }"))],
        &[(
            "shop.proto",
            &p2("message Root { optional int32 a = 1; required int32 b = 2; }"),
        )],
        "shop.v1.Root",
        Bump::Major,
        &["MAJOR FIELD_NEW_REQUIRED shop.v1.Root.b"],
    );
    check_files(
        &[("shop.proto", &p2("message Root { optional int32 a = 1; }"))],
        &[("shop.proto", &p2("message Root { required int32 a = 1; }"))],
        "shop.v1.Root",
        Bump::Major,
        &["MAJOR FIELD_SAME_CARDINALITY shop.v1.Root.a"],
    );
    check_files(
        &[("shop.proto", &p2("message Root { optional int32 a = 1; }"))],
        &[(
            "shop.proto",
            &p2("message Root { optional int32 a = 1; optional string b = 2; }"),
        )],
        "shop.v1.Root",
        Bump::Minor,
        &["MINOR FIELD_ADDED shop.v1.Root.b"],
    );
}

#[test]
fn file_moves_are_patch() {
    let item = "syntax = \"proto3\";\npackage shop.v1;\nmessage Item { string sku = 1; }\n";
    check_files(
        &[
            (
                "shop.proto",
                &format!("{HEADER}import \"item.proto\";\nmessage Root {{ Item item = 1; }}"),
            ),
            ("item.proto", item),
        ],
        &[
            (
                "shop.proto",
                &format!("{HEADER}import \"items/item.proto\";\nmessage Root {{ Item item = 1; }}"),
            ),
            ("items/item.proto", item),
        ],
        "shop.v1.Root",
        Bump::Patch,
        &["PATCH DESCRIPTOR_CHANGED shop.v1.Root"],
    );
}
