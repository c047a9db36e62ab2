//! buf as an oracle: over many generated old/new schema pairs, whatever
//! `buf breaking` with the WIRE_JSON rules calls breaking, evmesh must call MAJOR.
//! Needs buf on PATH (the README's test command installs it from npm); fails, never
//! skips, without it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use evmesh_schema::{Bump, compare};

#[derive(Clone, Debug)]
struct Field {
    label: &'static str,
    ty: String,
    name: String,
    number: u32,
    oneof: Option<&'static str>,
    json_name: Option<String>,
}

#[derive(Clone, Debug)]
struct Model {
    root: Vec<Field>,
    root_reserved: Vec<u32>,
    item: Vec<Field>,
    status: Vec<(String, i32)>,
    comment: bool,
}

fn field(label: &'static str, ty: &str, name: &str, number: u32) -> Field {
    Field {
        label,
        ty: ty.into(),
        name: name.into(),
        number,
        oneof: None,
        json_name: None,
    }
}

fn base() -> Model {
    Model {
        root: vec![
            field("", "string", "order_id", 1),
            field("", "int64", "total_cents", 2),
            field("optional", "string", "coupon", 3),
            field("repeated", "Item", "items", 4),
            field("", "Status", "status", 5),
            field("", "map<string, int32>", "counts", 6),
            field("", "google.protobuf.Timestamp", "placed_at", 7),
        ],
        root_reserved: vec![20],
        item: vec![
            field("", "string", "sku", 1),
            field("", "int32", "quantity", 2),
        ],
        status: vec![
            ("STATUS_UNSPECIFIED".into(), 0),
            ("STATUS_OPEN".into(), 1),
            ("STATUS_PAID".into(), 2),
        ],
        comment: false,
    }
}

fn render_fields(fields: &[Field]) -> String {
    let mut out = String::new();
    let mut oneofs: Vec<&str> = fields.iter().filter_map(|f| f.oneof).collect();
    oneofs.dedup();
    let line = |f: &Field| {
        let label = if f.label.is_empty() {
            String::new()
        } else {
            format!("{} ", f.label)
        };
        let json = f
            .json_name
            .as_ref()
            .map(|j| format!(" [json_name = \"{j}\"]"))
            .unwrap_or_default();
        format!("{label}{} {} = {}{json};", f.ty, f.name, f.number)
    };
    for f in fields.iter().filter(|f| f.oneof.is_none()) {
        out.push_str(&format!("  {}\n", line(f)));
    }
    for o in oneofs {
        out.push_str(&format!("  oneof {o} {{\n"));
        for f in fields.iter().filter(|f| f.oneof == Some(o)) {
            out.push_str(&format!("    {}\n", line(f)));
        }
        out.push_str("  }\n");
    }
    out
}

fn render(m: &Model) -> Vec<(&'static str, String)> {
    let reserved = if m.root_reserved.is_empty() {
        String::new()
    } else {
        format!(
            "  reserved {};\n",
            m.root_reserved
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let comment = if m.comment {
        "// Placed when the customer pays.\n"
    } else {
        ""
    };
    let order = format!(
        "syntax = \"proto3\";\npackage shop.v1;\nimport \"google/protobuf/timestamp.proto\";\nimport \"shop/v1/item.proto\";\n{comment}message Root {{\n{}{reserved}}}\nenum Status {{\n{}}}\n",
        render_fields(&m.root),
        m.status
            .iter()
            .map(|(n, v)| format!("  {n} = {v};\n"))
            .collect::<String>()
    );
    let item = format!(
        "syntax = \"proto3\";\npackage shop.v1;\nmessage Item {{\n{}}}\n",
        render_fields(&m.item)
    );
    vec![("shop/v1/order.proto", order), ("shop/v1/item.proto", item)]
}

/// A small deterministic generator, so a failing case can be reproduced.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const TYPES: &[&str] = &[
    "int32", "int64", "sint32", "uint32", "string", "bytes", "bool", "double", "fixed32", "Item",
    "Status",
];

/// One random mutation; returns what it did.
fn mutate(m: &mut Model, rng: &mut Rng) -> String {
    let in_item = rng.below(4) == 0;
    let fields = if in_item { &mut m.item } else { &mut m.root };
    let i = rng
        .below(fields.len().max(1))
        .min(fields.len().saturating_sub(1));
    let next_number =
        fields.iter().map(|f| f.number).max().unwrap_or(0) + 1 + if in_item { 0 } else { 20 };
    match rng.below(14) {
        0 => {
            fields.push(field(
                "",
                TYPES[rng.below(TYPES.len())],
                &format!("added_{next_number}"),
                next_number,
            ));
            "add field".into()
        }
        1 if fields.len() > 1 => {
            let f = fields.remove(i);
            format!("delete {}", f.name)
        }
        2 if fields.len() > 1 => {
            let f = fields.remove(i);
            if !in_item {
                m.root_reserved.push(f.number);
            }
            format!("delete and reserve {}", f.name)
        }
        3 => {
            fields[i].name = format!("{}_renamed", fields[i].name);
            "rename".into()
        }
        4 => {
            fields[i].number = next_number;
            "renumber".into()
        }
        5 if !fields[i].ty.starts_with("map") => {
            fields[i].ty = TYPES[rng.below(TYPES.len())].into();
            format!("retype {}", fields[i].name)
        }
        6 if !fields[i].ty.starts_with("map") && fields[i].oneof.is_none() => {
            fields[i].label = ["", "optional", "repeated"][rng.below(3)];
            format!("relabel {}", fields[i].name)
        }
        7 => {
            fields[i].json_name = Some(format!("j{}", fields[i].number));
            "json_name".into()
        }
        8 if fields[i].label.is_empty() && !fields[i].ty.starts_with("map") => {
            fields[i].oneof = Some("choice");
            format!("into oneof {}", fields[i].name)
        }
        9 => {
            let n = m.status.len() as i32;
            m.status.push((format!("STATUS_NEW_{n}"), n + 10));
            "add enum value".into()
        }
        10 if m.status.len() > 1 => {
            m.status.pop();
            "delete enum value".into()
        }
        11 if m.status.len() > 1 => {
            m.status[1].0 = "STATUS_OPENED".into();
            "rename enum value".into()
        }
        12 => {
            m.root_reserved.clear();
            "unreserve".into()
        }
        13 => {
            if let Some(f) = m.root.iter_mut().find(|f| f.name == "counts") {
                f.ty = "map<string, int64>".into();
            }
            "map value type".into()
        }
        _ => {
            m.comment = !m.comment;
            "comment".into()
        }
    }
}

fn write(dir: &Path, files: &[(&'static str, String)]) {
    std::fs::write(
        dir.join("buf.yaml"),
        "version: v2\nbreaking:\n  use:\n    - WIRE_JSON\n",
    )
    .unwrap();
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// buf's breaking-change lines (empty when it finds none).
fn buf_breaking(
    buf: &Path,
    old: &[(&'static str, String)],
    new: &[(&'static str, String)],
) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!(
        "evmesh-buf-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let (old_dir, new_dir) = (dir.join("old"), dir.join("new"));
    std::fs::create_dir_all(&old_dir).unwrap();
    std::fs::create_dir_all(&new_dir).unwrap();
    write(&old_dir, old);
    write(&new_dir, new);
    let out = Command::new(buf)
        .arg("breaking")
        .arg(&new_dir)
        .arg("--against")
        .arg(&old_dir)
        .output()
        .expect("run buf");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Exit 100 = breaking changes found; anything else but 0 is buf failing.
    match out.status.code() {
        Some(0) => Vec::new(),
        Some(100) => stdout.lines().map(str::to_owned).collect(),
        other => panic!("buf failed ({other:?}): {stderr}\n{stdout}"),
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn find_buf() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("buf"))
        .find(|p| p.is_file())
        .expect("buf is not on PATH: run the test command from the README, which installs it")
}

#[test]
fn evmesh_calls_major_whatever_buf_calls_breaking() {
    let buf = find_buf();
    let mut rng = Rng(0x5eed_cafe_f00d);
    let (mut breaking, mut agreed_compatible, mut stricter) = (0, 0, 0);
    for case in 0..80 {
        let old = base();
        let mut new = old.clone();
        let steps: Vec<String> = (0..1 + rng.below(2))
            .map(|_| mutate(&mut new, &mut rng))
            .collect();
        let (old_files, new_files) = (render(&old), render(&new));
        let as_refs =
            |files: &[(&'static str, String)]| -> Vec<(&'static str, String)> { files.to_vec() };
        let compile = |files: &[(&'static str, String)]| {
            let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
            // A mutation can make an invalid schema (a oneof member that is
            // repeated, say); such pairs are not comparable and are skipped.
            std::panic::catch_unwind(|| common::schema(&refs, "shop.v1.Root")).ok()
        };
        let (Some(o), Some(n)) = (compile(&old_files), compile(&new_files)) else {
            continue;
        };
        let verdict = compare(&o, &n);
        let buf_says = buf_breaking(&buf, &as_refs(&old_files), &as_refs(&new_files));
        if buf_says.is_empty() {
            if verdict.needs == Bump::Major {
                stricter += 1;
            } else {
                agreed_compatible += 1;
            }
        } else {
            breaking += 1;
            assert_eq!(
                verdict.needs,
                Bump::Major,
                "case {case} ({steps:?}): buf calls it breaking:\n{}\nevmesh: {:#?}",
                buf_says.join("\n"),
                verdict.changes
            );
        }
    }
    eprintln!(
        "buf breaking: {breaking}; both compatible: {agreed_compatible}; evmesh stricter: {stricter}"
    );
    assert!(
        breaking >= 20,
        "the generator makes breaking changes: {breaking}"
    );
    assert!(
        agreed_compatible >= 5,
        "and compatible ones: {agreed_compatible}"
    );
}
