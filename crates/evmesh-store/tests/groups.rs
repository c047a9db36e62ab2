//! Idle durable groups cost no task (robustness issue, item 4): a group whose
//! members left gives its dispatcher up, and comes back from the log, where it
//! was, when it is asked for again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use evmesh_proto::v1::Event;
use evmesh_store::sqlite::{Config, SqliteStore};
use evmesh_store::{Feedback, Pattern, StartPosition, Store, SubscriptionSpec};

fn spec(group: &str) -> SubscriptionSpec {
    let mut spec = SubscriptionSpec::new(vec![Pattern::parse("idle.>").unwrap()]);
    spec.group = Some(group.to_owned());
    spec.start = StartPosition::Earliest;
    spec
}

fn event(i: u64) -> Event {
    Event {
        id: format!("e-{i}"),
        r#type: "idle.event".into(),
        correlation_id: format!("c-{i}"),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/idle.v1.E".into(),
            value: vec![1],
        }),
        ..Default::default()
    }
}

async fn until_no_live_groups(store: &SqliteStore) {
    for _ in 0..200 {
        if store.live_groups().await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} groups still have a task", store.live_groups().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_give_up_their_task() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path());
    config.idle_group_exit = Duration::from_millis(100);
    let store = SqliteStore::open(config).await.unwrap();
    store.append((1..=3).map(event).collect()).await.unwrap();

    // A member takes two events, acks them and leaves.
    let mut member = store.subscribe(spec("idle.g0")).await.unwrap();
    for _ in 0..2 {
        let d = member.next().await.unwrap();
        member
            .control()
            .send(Feedback::Ack(vec![d.event.sequence]))
            .await
            .unwrap();
    }
    drop(member);
    // Fifty more groups opened and left.
    for i in 1..=50 {
        drop(store.subscribe(spec(&format!("idle.g{i}"))).await.unwrap());
    }
    until_no_live_groups(&store).await;

    // Asked for, every group is there as it was; then idle again.
    let listed = store.groups("", 1000).await.unwrap();
    assert_eq!(listed.len(), 51);
    let g0 = listed.iter().find(|g| g.name == "idle.g0").unwrap();
    assert_eq!((g0.ack_floor, g0.lag, g0.pending), (2, 1, 0), "{g0:?}");
    assert!(
        listed
            .iter()
            .filter(|g| g.name != "idle.g0")
            .all(|g| g.lag == 3)
    );
    let page = store.groups("idle.g0", 10).await.unwrap();
    assert_eq!(page.len(), 10);
    assert_eq!(page[0].name, "idle.g1");
    until_no_live_groups(&store).await;

    // A member coming back resumes after the last settled event.
    let mut back = store.subscribe(spec("idle.g0")).await.unwrap();
    assert!(!back.created);
    let d = back.next().await.unwrap();
    assert_eq!((d.event.sequence, d.attempt), (3, 1));
    drop(back);
    store.shutdown().await.unwrap();
}
