//! Shared by the schema tests: compile protos from strings.
#![allow(dead_code)]

use evmesh_schema::Schema;

/// Compiles `files` (name, source) with protox and makes the schema of `message`.
pub fn schema(files: &[(&str, &str)], message: &str) -> Schema {
    let dir = tempfile_dir();
    for (name, source) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, source).unwrap();
    }
    let names: Vec<&str> = files.iter().map(|f| f.0).collect();
    let set = protox::compile(&names, [&dir]).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(&dir);
    Schema::from_set(set, message).unwrap()
}

fn tempfile_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "evmesh-schema-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
