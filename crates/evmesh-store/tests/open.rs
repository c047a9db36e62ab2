//! Opening a log that is not what it seems (robustness issue, item 22).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_store::Store;
use evmesh_store::sqlite::{Config, DB_FILE, SqliteStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DB_FILE), b"").unwrap();
    std::fs::write(dir.path().join(format!("{DB_FILE}-wal")), b"frames").unwrap();
    let error = SqliteStore::open(Config::new(dir.path()))
        .await
        .err()
        .expect("a zero-length log beside its WAL must not open");
    let message = error.to_string();
    assert!(message.contains("is empty (0 bytes)"), "{message}");
    assert!(message.contains("evmesh.db-wal"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_empty_file_starts_a_new_log() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DB_FILE), b"").unwrap();
    let store = SqliteStore::open(Config::new(dir.path())).await.unwrap();
    assert_eq!(store.head(), 0);
    store.shutdown().await.unwrap();
}
