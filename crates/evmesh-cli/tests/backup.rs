//! `evmesh backup` of a node under publish load, `evmesh restore` of the file, and a
//! node started on the copy: every event acked before the backup began is there,
//! with the schemas and the groups' positions. Every process is stopped by its PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evmesh_tests::{Sub, event_with_id, group_info, open, order_schema, publish, v1 as pb};

mod support;

use support::{BIN, Served, stored};

#[test]
fn a_backup_under_load_restores_the_acked_events_the_schemas_and_the_groups() {
    let dir = tempfile::tempdir().unwrap();
    let node = Served::start(&dir.path().join("data"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime
        .block_on(pb::mesh_client::MeshClient::connect(node.url()))
        .unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let floor = runtime.block_on(async {
        pb::schema_registry_client::SchemaRegistryClient::connect(node.url())
            .await
            .unwrap()
            .register_schema(pb::RegisterSchemaRequest {
                r#type: "shop.order.placed".into(),
                version: "1.0.0".into(),
                message_name: "shop.v1.OrderPlaced".into(),
                descriptor_set: order_schema("string id = 1;"),
            })
            .await
            .unwrap();
        // Group "keep" has settled the first 100 of 200.
        let mut sub = Sub::open(
            &mut client,
            pb::SubscribeOpen {
                group: "keep".into(),
                ..open(&["load.>"])
            },
        )
        .await
        .unwrap();
        for i in 0..200 {
            let id = format!("pre-{i}");
            publish(&mut client, event_with_id("load.test", &id)).await;
            acked.lock().unwrap().push(id);
        }
        for _ in 0..100 {
            let d = sub.next().await;
            sub.ack(&[d.sequence]).await;
        }
        evmesh_tests::eventually("the acks settled", || {
            let mut client = client.clone();
            async move {
                let info = group_info(&mut client, "keep").await;
                (info.ack_floor >= 100).then_some(info.ack_floor)
            }
        })
        .await
    });

    // Publishes go on, one at a time, through the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (mut client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        runtime.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("live-{i}");
                publish(&mut client, event_with_id("load.test", &id)).await;
                acked.lock().unwrap().push(id);
                i += 1;
            }
            i
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let before: Vec<String> = acked.lock().unwrap().clone();
    let file = dir.path().join("nightly.evmesh");
    let out = node.ok(&["backup", "--output", file.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let during = runtime.block_on(load).unwrap();
    assert!(during > 0, "no publish went on during the backup");
    let head: u64 = out
        .split("events up to sequence ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(head >= before.len() as u64, "{out}");

    // Restored into a new directory, a node starts on it.
    let restored = dir.path().join("restored");
    let run = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    let out = run(&[
        "restore",
        file.to_str().unwrap(),
        "--data",
        restored.to_str().unwrap(),
    ]);
    support::assert_ok(&out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("restored {head} events"))
            && said.contains("1 groups and 1 schema versions"),
        "{said}"
    );
    assert!(node.terminate().success());
    let copy = Served::start(&restored);
    let ids = runtime.block_on(stored(&copy.url(), "load.test", head as usize));
    for id in &before {
        assert!(
            ids.contains_key(id),
            "{id}, acked before the backup, is missing"
        );
    }
    runtime.block_on(async {
        let mut client = pb::mesh_client::MeshClient::connect(copy.url())
            .await
            .unwrap();
        assert!(group_info(&mut client, "keep").await.ack_floor >= floor);
        let schemas = pb::schema_registry_client::SchemaRegistryClient::connect(copy.url())
            .await
            .unwrap()
            .list_schemas(pb::ListSchemasRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(
            format!("{schemas:?}").contains("shop.order.placed"),
            "{schemas:?}"
        );
    });

    // A directory that holds a log is not overwritten; a damaged file is refused.
    let out = run(&[
        "restore",
        file.to_str().unwrap(),
        "--data",
        restored.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("already holds a log"), "{said}");
    assert_eq!(said.lines().count(), 1, "{said}");
    let damaged = dir.path().join("damaged.evmesh");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(&[
        "restore",
        damaged.to_str().unwrap(),
        "--data",
        dir.path().join("other").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("damaged.evmesh"), "{said}");
    assert!(!dir.path().join("other").join("evmesh.db").exists());
    assert!(copy.terminate().success());
}
