//! Retention of the embedded log, on a real node: the oldest events go in
//! batches; a group that had not settled them moves on, counted in its GroupInfo
//! and a metric and logged once; its dead letters whose events went are reported
//! as such; idempotency reaches as far back as the log; and the file stops growing
//! once retention holds. Every process is stopped by its PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use evmesh_tests::{
    Sub, ack_of, event_with_id, group_info, open, publish, publish_stream, v1 as pb,
};

mod support;

use support::{Served, get, sample};

const KEEP: u64 = 50;
const SKIPPING: &str = "retention deleted events this group had not settled; it moves on past them";

/// Waits until `check` holds, for at most 30 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A member of group "slow" (ret.>, one delivery each).
async fn join_slow(client: &mut pb::mesh_client::MeshClient<tonic::transport::Channel>) -> Sub {
    Sub::open(
        client,
        pb::SubscribeOpen {
            group: "slow".into(),
            max_deliveries: 1,
            ..open(&["ret.>"])
        },
    )
    .await
    .unwrap()
}

fn metric(node: &Served, series: &str) -> Option<f64> {
    sample(&get(&node.http, "/metrics").2, series)
}

#[test]
fn retention_deletes_the_oldest_and_a_lagging_group_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = Served::start_with(
        dir.path(),
        &[
            "--allow-unregistered",
            "--retention-max-events",
            &KEEP.to_string(),
        ],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime
        .block_on(pb::mesh_client::MeshClient::connect(node.url()))
        .unwrap();

    // Group "slow" dead-letters the first event, then its member leaves.
    runtime.block_on(async {
        let mut sub = join_slow(&mut client).await;
        publish(&mut client, event_with_id("ret.test", "r-0")).await;
        let first = sub.next().await;
        sub.nack(&[first.sequence], Duration::ZERO, "refused").await;
        evmesh_tests::dead_letters_eventually(&client, "slow").await;
    });

    // 2,100 more, one in four of another type: the log keeps the newest 50.
    let events: Vec<pb::Event> = (1..=2100)
        .map(|i| {
            let ty = if i % 4 == 0 { "other.test" } else { "ret.test" };
            event_with_id(ty, &format!("r-{i}"))
        })
        .collect();
    let selected: Vec<bool> = events.iter().map(|e| e.r#type == "ret.test").collect();
    let acks = runtime.block_on(publish_stream(&mut client, events));
    let head = ack_of(acks.last().unwrap()).sequence;
    let first_kept = head - KEEP + 1;
    eventually("retention to hold", || {
        metric(&node, "evmesh_log_first_sequence") == Some(first_kept as f64)
    });
    // Every ret.test event from 2 (1 is dead) to the last deleted was skipped.
    let skipped = acks
        .iter()
        .zip(&selected)
        .filter(|(a, selects)| **selects && ack_of(a).sequence < first_kept)
        .count() as u64;
    let info = runtime.block_on(group_info(&mut client, "slow"));
    assert_eq!(info.skipped, skipped);
    assert_eq!(info.ack_floor, first_kept - 1);
    assert_eq!(
        metric(
            &node,
            r#"evmesh_retention_skipped_events_total{group="slow"}"#
        ),
        Some(skipped as f64)
    );
    assert_eq!(
        metric(&node, "evmesh_retention_deleted_events_total"),
        Some((first_kept - 1) as f64)
    );
    assert!(metric(&node, "evmesh_log_sync_duration_seconds_count").unwrap() > 0.0);
    assert_eq!(metric(&node, "evmesh_log_sync_failures_total"), Some(0.0));
    // Several batches, one warning.
    let warned = node.logged(SKIPPING);
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(warned[0]["fields"]["group"], "slow");

    runtime.block_on(async {
        // The dead letter stays, its event reported gone.
        let letters = client
            .list_dead_letters(pb::ListDeadLettersRequest {
                group: "slow".into(),
                after_sequence: 0,
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .dead_letters;
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].sequence, 1);
        assert!(letters[0].event_deleted);
        assert!(letters[0].event.is_none());
        assert_eq!(letters[0].reason, "refused");

        // A member that joins now gets the kept events of its type, from the first.
        let mut sub = join_slow(&mut client).await;
        let expected: Vec<u64> = acks
            .iter()
            .zip(&selected)
            .map(|(a, selects)| (ack_of(a).sequence, *selects))
            .filter(|&(seq, selects)| selects && seq >= first_kept)
            .map(|(seq, _)| seq)
            .collect();
        for &seq in &expected {
            let d = sub.next().await;
            assert_eq!(d.sequence, seq);
            sub.ack(&[seq]).await;
        }

        // Idempotency reaches as far back as the log: a deleted event's id is new
        // again, a kept one's is a duplicate.
        let kept = publish(&mut client, event_with_id("ret.test", "r-2100")).await;
        assert!(kept.duplicate);
        let again = publish(&mut client, event_with_id("ret.test", "r-1")).await;
        assert!(!again.duplicate);
        assert_eq!(again.sequence, head + 1);
    });
    assert!(node.terminate().success());
}

#[test]
fn the_file_stops_growing_once_retention_holds() {
    let dir = tempfile::tempdir().unwrap();
    let node = Served::start_with(
        dir.path(),
        &["--allow-unregistered", "--retention-max-bytes", "4MiB"],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime
        .block_on(pb::mesh_client::MeshClient::connect(node.url()))
        .unwrap();
    let db = dir.path().join("evmesh.db");
    let mut sizes = Vec::new();
    for round in 0..8 {
        // 2 MB a round.
        let events: Vec<pb::Event> = (0..2000)
            .map(|i| {
                let mut e = event_with_id("grow.test", &format!("g-{round}-{i}"));
                if let Some(payload) = e.payload.as_mut() {
                    payload.value = vec![b'x'; 1000];
                }
                e
            })
            .collect();
        runtime.block_on(publish_stream(&mut client, events));
        // Retention has caught up once it deletes nothing for two of its checks.
        let mut last = (-1.0, Instant::now());
        eventually("retention to catch up", || {
            let deleted = metric(&node, "evmesh_retention_deleted_events_total").unwrap_or(0.0);
            if deleted != last.0 {
                last = (deleted, Instant::now());
            }
            last.1.elapsed() > Duration::from_millis(2500)
        });
        sizes.push(std::fs::metadata(&db).unwrap().len());
    }
    let deleted = metric(&node, "evmesh_retention_deleted_events_total").unwrap();
    assert!(deleted > 10_000.0, "{deleted} of 16,000 deleted");
    // 16 MB published: past the first rounds, freed pages take the new events.
    assert!(
        sizes[7] <= sizes[3] + sizes[3] / 10,
        "the file kept growing: {sizes:?}"
    );
    assert!(sizes[7] < 12 << 20, "{sizes:?}");
    assert!(node.terminate().success());
}

#[test]
fn retention_flags_refuse_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value, says) in [
        ("--retention-max-age", "soon", "is not a duration"),
        ("--retention-max-age", "10ms", "less than a second"),
        ("--retention-max-events", "0", "0"),
        ("--retention-max-bytes", "lots", "is not a size"),
        ("--retention-max-bytes", "10KB", "less than 1MiB"),
    ] {
        let refused = support::serve_refused(dir.path(), &[flag, value]);
        assert!(
            refused.contains(flag) || refused.contains(says),
            "{flag} {value}: {refused}"
        );
        assert!(refused.contains(says), "{flag} {value}: {refused}");
    }
}
