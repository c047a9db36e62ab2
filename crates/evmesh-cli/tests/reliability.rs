//! The figures of RELIABILITY.md: kill -9 cycles under publish load, subscribe-and-
//! drop cycles, a full disk, a truncated log. CI runs small counts; the figures'
//! counts come from the environment (RELIABILITY.md gives each command).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use evmesh_tests::v1 as pb;

mod support;

use support::{BIN, Served, get, sample};

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Publishes on `streams` streams until the node dies, each event id from
/// `next_id`, every event of `resend` first: what each stream got acked, and what
/// it sent that was not.
async fn publish_until_killed(
    url: String,
    streams: usize,
    cycle: usize,
    resend: Vec<String>,
) -> (Vec<(String, u64)>, Vec<String>) {
    let resend = std::sync::Arc::new(std::sync::Mutex::new(resend));
    let mut tasks = Vec::new();
    for stream in 0..streams {
        let (url, resend) = (url.clone(), resend.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut client) = pb::mesh_client::MeshClient::connect(url).await else {
                return (Vec::new(), Vec::new());
            };
            let (tx, rx) = tokio::sync::mpsc::channel(256);
            let Ok(responses) = client
                .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            else {
                return (Vec::new(), Vec::new());
            };
            let mut responses = responses.into_inner();
            let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
            let sender = {
                let sent = sent.clone();
                tokio::spawn(async move {
                    let mut i = 0usize;
                    loop {
                        // This stream's share of what the last cycle left unacked.
                        let id = resend.lock().unwrap().pop().unwrap_or_else(|| {
                            i += 1;
                            format!("c{cycle}-s{stream}-{i}")
                        });
                        sent.lock().unwrap().push(id.clone());
                        let e = evmesh_tests::event_with_id("kill.test.event", &id);
                        if tx
                            .send(pb::PublishRequest { event: Some(e) })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                })
            };
            let mut acked = Vec::new();
            while let Ok(Some(r)) = responses.message().await {
                let a = evmesh_tests::ack_of(&r);
                acked.push((a.event_id.clone(), a.sequence));
            }
            sender.abort();
            let sent = sent.lock().unwrap().clone();
            let done: std::collections::HashSet<&String> = acked.iter().map(|(id, _)| id).collect();
            let unacked = sent.into_iter().filter(|id| !done.contains(id)).collect();
            (acked, unacked)
        }));
    }
    let mut acked = Vec::new();
    let mut unacked = Vec::new();
    for t in tasks {
        let (a, u) = t.await.unwrap();
        acked.extend(a);
        unacked.extend(u);
    }
    (acked, unacked)
}

/// kill -9 of a node under full publish load, again and again on one log; each
/// cycle sends what the last one left unacked again, with the same ids, as a
/// client does. At the end, every acked event is in the log at the sequence it was
/// acked with, and no id is stored twice.
#[test]
fn kill_9_cycles_under_publish_load_lose_nothing_and_store_nothing_twice() {
    let cycles = count("EVMESH_KILL_CYCLES", 5);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut unacked: Vec<String> = Vec::new();
    for cycle in 0..cycles {
        let node = Served::start(&data);
        let url = node.url();
        let resend = std::mem::take(&mut unacked);
        let killer = std::thread::spawn(move || {
            // Somewhere between 200 and 700 ms into the load.
            std::thread::sleep(Duration::from_millis(200 + (cycle as u64 * 97) % 500));
            node.kill_9();
        });
        let (got, left) = runtime.block_on(publish_until_killed(url, 4, cycle, resend));
        killer.join().unwrap();
        for (id, sequence) in got {
            // An id acked twice (a resend of one acked before) has one sequence.
            if let Some(before) = acked.insert(id.clone(), sequence) {
                assert_eq!(
                    before, sequence,
                    "{id} acked at {before}, then at {sequence}"
                );
            }
        }
        unacked = left;
    }
    let node = Served::start(&data);
    let stored = runtime.block_on(all_stored(&node.url(), "kill.>"));
    let mut lost = 0;
    for (id, sequence) in &acked {
        match stored.get(id) {
            Some(at) if at == sequence => {}
            _ => lost += 1,
        }
    }
    println!(
        "kill -9 cycles: {cycles}; events acked: {}; stored: {}; acked and lost: {lost}; stored twice: 0",
        acked.len(),
        stored.len()
    );
    assert_eq!(lost, 0, "acked events lost");
    assert!(
        acked.len() > cycles * 50,
        "the publishers got going: {}",
        acked.len()
    );
}

/// Every event matching `pattern`, id → sequence; an id stored twice fails.
async fn all_stored(url: &str, pattern: &str) -> HashMap<String, u64> {
    let mut client = pb::mesh_client::MeshClient::connect(url.to_owned())
        .await
        .unwrap();
    let mut sub = evmesh_tests::Sub::open(
        &mut client,
        pb::SubscribeOpen {
            auto_ack: true,
            max_in_flight: 10_000,
            ..evmesh_tests::open(&[pattern])
        },
    )
    .await
    .unwrap();
    let mut stored = HashMap::new();
    while let Some(d) = sub.try_next(Duration::from_millis(1000)).await {
        let id = d.event.unwrap().id;
        if let Some(before) = stored.insert(id.clone(), d.sequence) {
            panic!("{id} is stored twice: at {before} and {}", d.sequence);
        }
    }
    stored
}

/// The node's resident memory and live tasks, from its metrics.
fn footprint(node: &Served) -> (f64, f64) {
    let (_, _, body) = get(&node.http, "/metrics");
    (
        sample(&body, "process_resident_memory_bytes").expect("the RSS metric"),
        sample(&body, "evmesh_runtime_tasks").expect("the task metric"),
    )
}

/// Subscriptions opened and dropped again and again: the node's memory and task
/// count come back to where they were.
#[test]
fn subscribe_and_drop_cycles_leave_memory_and_tasks_where_they_were() {
    let cycles = count("EVMESH_DROP_CYCLES", 2_000);
    let dir = tempfile::tempdir().unwrap();
    let node = Served::start(&dir.path().join("data"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = node.url();
    let churn = |n: usize| {
        runtime.block_on(async {
            let mut client = pb::mesh_client::MeshClient::connect(url.clone())
                .await
                .unwrap();
            for i in 0..n {
                let group = if i % 2 == 0 {
                    String::new()
                } else {
                    format!("drop.g{}", i % 7)
                };
                let sub = evmesh_tests::Sub::open(
                    &mut client,
                    pb::SubscribeOpen {
                        group,
                        ..evmesh_tests::open(&["drop.>"])
                    },
                )
                .await
                .unwrap();
                drop(sub);
            }
        })
    };
    // Warm up: the pools, the groups and the allocator's arenas are made.
    churn(200);
    std::thread::sleep(Duration::from_millis(500));
    let (rss_before, tasks_before) = footprint(&node);
    churn(cycles);
    let settled = runtime.block_on(evmesh_tests::eventually("the tasks settle", || async {
        let (rss, tasks) = footprint(&node);
        (tasks <= tasks_before * 1.1 + 2.0).then_some((rss, tasks))
    }));
    let (rss_after, tasks_after) = settled;
    println!(
        "subscribe-and-drop cycles: {cycles}; RSS {:.1} -> {:.1} MiB; tasks {tasks_before} -> {tasks_after}",
        rss_before / 1048576.0,
        rss_after / 1048576.0
    );
    assert!(
        rss_after <= rss_before * 1.1,
        "RSS grew from {rss_before} to {rss_after}"
    );
}

/// A tmpfs of `size` at `dir` (the test runs as root, as CI here does).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a small tmpfs (the full-disk test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_owned())
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A disk that fills under publishes: they are refused with a clear status, none
/// is acked without being stored, and once there is room again the same node takes
/// publishes again.
#[test]
fn a_full_disk_refuses_publishes_without_a_false_ack_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("disk"), "12m");
    let data = dir.path().join("disk/data");
    let node = Served::start(&data);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime
        .block_on(pb::mesh_client::MeshClient::connect(node.url()))
        .unwrap();
    let big = |id: String| {
        let mut e = evmesh_tests::event_with_id("disk.test.event", &id);
        e.payload.as_mut().unwrap().value = vec![0x42; 64 * 1024];
        pb::PublishRequest { event: Some(e) }
    };
    let mut acked = Vec::new();
    let mut refusal = None;
    runtime.block_on(async {
        for i in 0..2_000 {
            let id = format!("d-{i}");
            match client.publish_event(big(id.clone())).await {
                Ok(r) => match r.into_inner().result {
                    Some(pb::publish_response::Result::Ack(a)) => acked.push((id, a.sequence)),
                    other => panic!("{other:?}"),
                },
                Err(status) => {
                    refusal = Some(status);
                    break;
                }
            }
        }
    });
    let refusal = refusal.expect("the disk filled");
    println!(
        "full disk: {} events acked, then {:?}: {}",
        acked.len(),
        refusal.code(),
        refusal.message()
    );
    assert!(
        matches!(
            refusal.code(),
            tonic::Code::ResourceExhausted | tonic::Code::Unavailable
        ),
        "{refusal:?}"
    );
    assert!(
        refusal.message().contains("disk") || refusal.message().contains("full"),
        "{refusal:?}"
    );
    // More room: the same node takes publishes again.
    disk.resize("64m");
    runtime.block_on(evmesh_tests::eventually(
        "publishes are taken again",
        || {
            let mut client = client.clone();
            async move {
                client
                    .publish_event(big("after".into()))
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            }
        },
    ));
    // Every acked event is there, at its sequence.
    let stored = runtime.block_on(all_stored(&node.url(), "disk.>"));
    for (id, sequence) in &acked {
        assert_eq!(stored.get(id), Some(sequence), "acked {id} is stored");
    }
    assert!(stored.contains_key("after"));
    drop(node);
}

/// A log cut short (a copy stopped half way, a disk that lost its tail) is refused
/// at start with one line and a non-zero exit, and left as it was.
#[test]
fn a_truncated_log_stops_the_node_at_start_and_is_left_as_it_was() {
    use evmesh_store::sqlite::DB_FILE;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = Served::start(&data);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = pb::mesh_client::MeshClient::connect(node.url())
            .await
            .unwrap();
        for i in 0..300 {
            let mut e = evmesh_tests::event_with_id("cut.test.event", &format!("t-{i}"));
            e.payload.as_mut().unwrap().value = vec![0x33; 2048];
            evmesh_tests::publish(&mut client, e).await;
        }
    });
    assert!(node.terminate().success());
    let path = data.join(DB_FILE);
    let full = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(full / 2).unwrap();
    drop(file);
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "off"])
        .env("EVMESH_DATA", &data)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a truncated log served");
    let message = String::from_utf8_lossy(&out.stderr);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(
        message.contains("evmesh.db") || message.contains("log"),
        "{message}"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        full / 2,
        "the log was changed"
    );
}
