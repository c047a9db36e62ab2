//! Durable groups across the nodes of a mesh: three `evmesh serve` processes on a
//! 3-server NATS cluster (replicas 3, `sync_interval: always`), members of one
//! group on different nodes, and the group's owner killed mid-delivery. Every
//! delivery is checked as it comes: no aggregate has two events out at once, and
//! none is handled before every earlier event of its aggregate was acked. Every
//! process is stopped by its PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evmesh_client::Mesh;
use evmesh_tests::{NatsCluster, Sub, Sync, event_with_id, eventually, open, v1 as pb};

mod support;

use support::{Served, free_port, nodes_json, stored};

const NAMES: [&str; 3] = ["a", "b", "c"];

/// Three nodes on a 3-server cluster, each on a port of its own that it keeps
/// across restarts.
struct ThreeNodes {
    runtime: tokio::runtime::Runtime,
    nodes: Vec<Option<Served>>,
    ports: Vec<u16>,
    cluster: NatsCluster,
    dir: tempfile::TempDir,
}

impl ThreeNodes {
    fn start() -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let cluster = runtime.block_on(NatsCluster::start(3, Sync::Always));
        let dir = tempfile::tempdir().unwrap();
        let mut mesh = Self {
            runtime,
            nodes: Vec::new(),
            ports: (0..3).map(|_| free_port()).collect(),
            cluster,
            dir,
        };
        mesh.nodes = (0..3).map(|i| Some(mesh.spawn(i))).collect();
        mesh
    }

    /// Node `i` over its data directory, on its port.
    fn spawn(&self, i: usize) -> Served {
        Served::start_on(
            &format!("127.0.0.1:{}", self.ports[i]),
            &self.dir.path().join(NAMES[i]),
            &[
                "--allow-unregistered",
                "--nats",
                &self.cluster.urls().join(","),
                "--nats-replicas",
                "3",
                "--node-name",
                NAMES[i],
            ],
        )
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    /// Every node, node `first` first: what a client of the mesh is given.
    fn from(&self, first: usize) -> String {
        (0..3)
            .map(|k| self.url((first + k) % 3))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn kill_9(&mut self, i: usize) {
        self.nodes[i].take().unwrap().kill_9();
    }

    /// SIGTERM, then the node again on its port over its data.
    fn restart(&mut self, i: usize) {
        let status = self.nodes[i].take().unwrap().terminate();
        assert!(status.success(), "node {} exited with {status}", NAMES[i]);
        self.nodes[i] = Some(self.spawn(i));
    }
}

/// What every member saw, checked as it happens.
#[derive(Default)]
struct Checker {
    /// Each aggregate's sequences, in log order.
    sequences: HashMap<String, Vec<u64>>,
    aggregate_of: HashMap<u64, String>,
    /// The event of each aggregate out now, and the member holding it.
    out: HashMap<String, (u64, usize)>,
    acked: HashSet<u64>,
    dead: HashSet<usize>,
    /// Deliveries per member.
    got: HashMap<usize, usize>,
    /// Attempts seen per sequence (the highest).
    attempts: HashMap<u64, u32>,
    violations: Vec<String>,
    /// Members stop once this is set (every event acked, and a moment passed for
    /// the last acks to reach the node: a member that hung up at once would lose
    /// them).
    stop: bool,
    /// Members hold what they got before this until then (a handler busy for a
    /// while, across a takeover).
    stall_until: Option<std::time::Instant>,
    /// What each member holds now: never more than its max_in_flight.
    holding: HashMap<usize, HashSet<u64>>,
}

/// Each member's max_in_flight.
const MAX_IN_FLIGHT: usize = 4;

impl Checker {
    fn delivered(&mut self, member: usize, seq: u64, attempt: u32) {
        *self.got.entry(member).or_default() += 1;
        let holding = self.holding.entry(member).or_default();
        holding.insert(seq);
        if holding.len() > MAX_IN_FLIGHT {
            self.violations.push(format!(
                "member {member} holds {} events, over its max_in_flight of {MAX_IN_FLIGHT}",
                holding.len()
            ));
        }
        let best = self.attempts.entry(seq).or_default();
        *best = (*best).max(attempt);
        let Some(aggregate) = self.aggregate_of.get(&seq).cloned() else {
            self.violations.push(format!("{seq} was never published"));
            return;
        };
        if let Some(&(held, holder)) = self.out.get(&aggregate)
            && !self.dead.contains(&holder)
            && (held, holder) != (seq, member)
        {
            self.violations.push(format!(
                "aggregate {aggregate}: {seq} delivered to member {member} while member {holder} holds {held}"
            ));
        }
        if !self.acked.contains(&seq) {
            let earlier: Vec<u64> = self.sequences[&aggregate]
                .iter()
                .copied()
                .filter(|&s| s < seq && !self.acked.contains(&s))
                .collect();
            if !earlier.is_empty() {
                self.violations.push(format!(
                    "aggregate {aggregate}: {seq} delivered before {earlier:?} were acked"
                ));
            }
        }
        self.out.insert(aggregate, (seq, member));
    }

    /// The member settles `seq` (acks it, or nacks it when `acked` is false).
    fn settled(&mut self, member: usize, seq: u64, acked: bool) {
        if let Some(holding) = self.holding.get_mut(&member) {
            holding.remove(&seq);
        }
        if let Some(aggregate) = self.aggregate_of.get(&seq)
            && self.out.get(aggregate) == Some(&(seq, member))
        {
            self.out.remove(aggregate);
        }
        if acked {
            self.acked.insert(seq);
        }
    }

    fn all_acked(&self) -> bool {
        self.aggregate_of.keys().all(|s| self.acked.contains(s))
    }
}

/// Publishes `total` events of `ty` through `node`, round-robin over `aggregates`
/// aggregates, into the checker.
async fn publish(node: &str, ty: &str, total: usize, aggregates: usize, checker: &Mutex<Checker>) {
    let mesh = Mesh::connect(node).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let publisher = mesh.publisher().clone();
        let aggregate = format!("agg-{}", i % aggregates);
        let mut event = event_with_id(ty, &format!("e-{i}"));
        event.aggregate_id = aggregate.clone();
        tasks.spawn(async move {
            let ack = publisher.publish(event).await.unwrap();
            (aggregate, ack.sequence)
        });
    }
    let mut published = Vec::new();
    while let Some(done) = tasks.join_next().await {
        published.push(done.unwrap());
    }
    published.sort_by_key(|(_, seq)| *seq);
    let mut checker = checker.lock().unwrap();
    for (aggregate, seq) in published {
        checker.aggregate_of.insert(seq, aggregate.clone());
        checker.sequences.entry(aggregate).or_default().push(seq);
    }
}

/// A member of `group` on `node`: handles each delivery for `work`, acking it
/// (or nacking it once, at its first attempt, when `nack_first` says so), until
/// every event is acked or its node goes.
async fn member(
    id: usize,
    node: String,
    group: &'static str,
    ty: &'static str,
    work: Duration,
    nack_first: fn(u64) -> bool,
    checker: Arc<Mutex<Checker>>,
) {
    let mut client = pb::mesh_client::MeshClient::connect(node).await.unwrap();
    let mut sub = Sub::open(
        &mut client,
        pb::SubscribeOpen {
            group: group.into(),
            max_in_flight: MAX_IN_FLIGHT as u32,
            // A delivery or an ack lost with a NATS server comes again soon.
            ack_timeout: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            ..open(&[ty])
        },
    )
    .await
    .unwrap();
    // Deliveries are recorded as they arrive (out, from the mesh's view), and
    // handled one at a time; the one in hand is settled when its work is done.
    let mut queue = std::collections::VecDeque::new();
    let mut busy: Option<(pb::Delivery, tokio::time::Instant)> = None;
    loop {
        if checker.lock().unwrap().stop {
            return;
        }
        if busy.is_none()
            && let Some(d) = queue.pop_front()
        {
            busy = Some((d, tokio::time::Instant::now() + work));
        }
        let wake = busy.as_ref().map(|b| b.1);
        tokio::select! {
            polled = sub.poll(Duration::from_millis(200)) => match polled {
                Ok(Some(d)) => {
                    checker.lock().unwrap().delivered(id, d.sequence, d.attempt);
                    queue.push_back(d);
                }
                Ok(None) => {}
                Err(_) => {
                    checker.lock().unwrap().dead.insert(id);
                    return;
                }
            },
            () = sleep_until(wake), if wake.is_some() => {
                let stall = checker.lock().unwrap().stall_until.map(tokio::time::Instant::from);
                if let (Some(until), Some(b)) = (stall, busy.as_mut())
                    && tokio::time::Instant::now() < until
                {
                    b.1 = until;
                    continue;
                }
                let Some((d, _)) = busy.take() else { continue };
                let nack = d.attempt == 1 && nack_first(d.sequence);
                checker.lock().unwrap().settled(id, d.sequence, !nack);
                let request = if nack {
                    pb::subscribe_request::Request::Nack(pb::Nack {
                        sequences: vec![d.sequence],
                        delay: Some(prost_types::Duration::default()),
                        reason: "once".into(),
                    })
                } else {
                    pb::subscribe_request::Request::Ack(pb::Ack {
                        sequences: vec![d.sequence],
                    })
                };
                if !sub.try_send(request).await {
                    checker.lock().unwrap().dead.insert(id);
                    return;
                }
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The node that owns `group`, as `evmesh nodes` says, asked through `server`.
fn owner_of(server: &str, group: &str) -> Option<String> {
    nodes_json(server).into_iter().find_map(|n| {
        n["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == group && g["owner"] == true)
            .then(|| n["name"].as_str().unwrap().to_owned())
    })
}

/// Waits until every event is acked, then checks what the members saw.
async fn until_all_acked(checker: &Mutex<Checker>, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        {
            let c = checker.lock().unwrap();
            assert!(c.violations.is_empty(), "{what}: {:#?}", c.violations);
            if c.all_acked() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {} of {} acked",
                c.acked.len(),
                c.aggregate_of.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing is delivered again once every event is acked.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut c = checker.lock().unwrap();
    assert!(c.violations.is_empty(), "{what}: {:#?}", c.violations);
    c.stop = true;
}

/// Published on a; a group with members on b and c gets everything, split
/// between them, one event of an aggregate out at a time, in log order; a nack
/// comes back at attempt 2, through either node.
#[test]
fn members_on_other_nodes_share_a_group() {
    const TOTAL: usize = 400;
    let mesh = ThreeNodes::start();
    let checker = Arc::new(Mutex::new(Checker::default()));
    let (a, b, c) = (mesh.url(0), mesh.url(1), mesh.url(2));
    let owner = mesh.runtime.block_on(async {
        publish(&a, "split.test", TOTAL, 16, &checker).await;
        let nack_some: fn(u64) -> bool = |seq| seq % 10 == 3;
        let members = [(1, b.clone()), (2, c.clone())].map(|(id, node)| {
            tokio::spawn(member(
                id,
                node,
                "split",
                "split.>",
                Duration::from_millis(2),
                nack_some,
                checker.clone(),
            ))
        });
        // While they consume, one of their nodes owns the group, and says so.
        let owner = eventually("the group's owner listed", || {
            let a = a.clone();
            async move {
                tokio::task::spawn_blocking(move || owner_of(&a, "split"))
                    .await
                    .unwrap()
            }
        })
        .await;
        // A node that neither owns the group nor has a member of it lists it as
        // its owner sees it: both members.
        let listed = tokio::task::spawn_blocking({
            let a = a.clone();
            move || {
                let out = std::process::Command::new(support::BIN)
                    .args(["groups", "list", "--server", &a])
                    .output()
                    .unwrap();
                support::assert_ok(&out);
                String::from_utf8(out.stdout).unwrap()
            }
        })
        .await
        .unwrap();
        let row: Vec<&str> = listed
            .lines()
            .find(|l| l.starts_with("split "))
            .unwrap_or_else(|| panic!("{listed}"))
            .split_whitespace()
            .collect();
        assert_eq!(row[6], "2", "members of split, listed through a: {listed}");
        until_all_acked(&checker, "members on b and c").await;
        for m in members {
            m.await.unwrap();
        }
        owner
    });
    // The log's figures from the events stream, through any node.
    let http = mesh.nodes[2].as_ref().unwrap().http.clone();
    let (_, _, metrics) = support::get(&http, "/metrics");
    assert_eq!(
        support::sample(&metrics, "evmesh_log_first_sequence"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        support::sample(&metrics, "evmesh_log_head_sequence"),
        Some(TOTAL as f64),
        "{metrics}"
    );
    assert!(
        support::sample(&metrics, "evmesh_log_bytes").is_some_and(|b| b > 0.0),
        "{metrics}"
    );
    assert!(owner == "b" || owner == "c", "{owner}");
    let c = checker.lock().unwrap();
    assert!(c.violations.is_empty(), "{:#?}", c.violations);
    assert!(
        c.got.get(&1).copied().unwrap_or(0) > 0 && c.got.get(&2).copied().unwrap_or(0) > 0,
        "the members shared the group: {:?}",
        c.got
    );
    for (&seq, &attempt) in &c.attempts {
        let expected = if seq % 10 == 3 { 2 } else { 1 };
        assert_eq!(attempt, expected, "attempts of {seq}");
    }
}

/// kill -9 of the node that owns a group while its members (on every node) have
/// deliveries out: another node takes the group within seconds, what the dead
/// node's member held comes back, what the live members held stays theirs (they
/// hold it for 7 s, past the takeover: nothing of those aggregates goes out
/// meanwhile), every event is acked by the end, and no aggregate ever has two
/// events out.
#[test]
fn the_group_moves_when_its_owner_dies() {
    const TOTAL: usize = 600;
    let mut mesh = ThreeNodes::start();
    let checker = Arc::new(Mutex::new(Checker::default()));
    let (a, b, c) = (mesh.url(0), mesh.url(1), mesh.url(2));
    let never: fn(u64) -> bool = |_| false;
    mesh.runtime.block_on(async {
        publish(&b, "takeover.test", TOTAL, 24, &checker).await;
    });
    let join = |id: usize, node: &str| {
        mesh.runtime.spawn(member(
            id,
            node.to_owned(),
            "takeover",
            "takeover.>",
            Duration::from_millis(5),
            never,
            checker.clone(),
        ))
    };
    // The first member joins through a, which takes the group.
    let on_a = join(0, &a);
    let deadline = std::time::Instant::now() + evmesh_tests::PATIENCE;
    while owner_of(&b, "takeover").as_deref() != Some("a") {
        assert!(
            std::time::Instant::now() < deadline,
            "a never owned the group"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let others = [join(1, &b), join(2, &c)];
    // Deliveries flowing to every member, then the owner dies.
    let deadline = std::time::Instant::now() + evmesh_tests::PATIENCE;
    loop {
        {
            let c = checker.lock().unwrap();
            assert!(c.violations.is_empty(), "{:#?}", c.violations);
            if c.acked.len() >= TOTAL / 4 && c.got.len() == 3 {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "deliveries never reached every member"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // What the live members hold now, they hold until well after the takeover.
    let killed_at = std::time::Instant::now();
    {
        let mut c = checker.lock().unwrap();
        c.dead.insert(0);
        c.stall_until = Some(killed_at + Duration::from_secs(7));
    }
    mesh.kill_9(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let owner = loop {
        if let Some(owner) = owner_of(&b, "takeover")
            && owner != "a"
        {
            break owner;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nobody took the group"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let moved = killed_at.elapsed();
    assert!(owner == "b" || owner == "c", "{owner}");
    mesh.runtime.block_on(async {
        until_all_acked(&checker, "after the owner died").await;
        for m in others {
            m.await.unwrap();
        }
        let _ = on_a.await;
    });
    let c = checker.lock().unwrap();
    assert!(c.violations.is_empty(), "{:#?}", c.violations);
    eprintln!("the group moved to {owner}, listed as its owner after {moved:?}");
}

/// Publishes `total` events of `ty` through the mesh `servers`, 200 at a time,
/// calling `at(i)` before the `i`th: each id with the sequence its ack gave.
async fn publish_through(
    servers: &str,
    ty: &str,
    total: usize,
    mut at: impl FnMut(usize),
) -> HashMap<String, u64> {
    let mesh = Mesh::connect(servers).await.unwrap();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        at(i);
        let permit = in_flight.clone().acquire_owned().await.unwrap();
        let publisher = mesh.publisher().clone();
        let mut event = event_with_id(ty, &format!("e-{i}"));
        event.aggregate_id = format!("agg-{}", i % 32);
        tasks.spawn(async move {
            let id = event.id.clone();
            let ack = publisher
                .publish(event)
                .await
                .unwrap_or_else(|e| panic!("publish of {id}: {e}"));
            drop(permit);
            (id, ack.sequence)
        });
    }
    let mut acks = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (id, sequence) = done.unwrap();
        acks.insert(id, sequence);
    }
    acks
}

/// Every acked event is in the log once, at the sequence its ack gave.
fn assert_stored_once(acks: &HashMap<String, u64>, ids: &HashMap<String, u64>) {
    assert_eq!(ids.len(), acks.len(), "every id stored");
    for (id, sequence) in ids {
        assert_eq!(
            Some(sequence),
            acks.get(id),
            "{id} acked at another sequence"
        );
    }
}

/// kill -9 of the node a client publishes through: the client moves to the next
/// node, and every event it published is stored exactly once.
#[test]
fn a_publisher_moves_across_the_mesh() {
    const TOTAL: usize = 2000;
    let mut mesh = ThreeNodes::start();
    let servers = mesh.from(0);
    let b = mesh.url(1);
    let mut victim = Some(0);
    let acks = {
        let ThreeNodes { runtime, nodes, .. } = &mut mesh;
        runtime.block_on(publish_through(&servers, "failover.test", TOTAL, |i| {
            if i == TOTAL / 3
                && let Some(v) = victim.take()
            {
                nodes[v].take().unwrap().kill_9();
            }
        }))
    };
    let ids = mesh.runtime.block_on(stored(&b, "failover.test", TOTAL));
    assert_stored_once(&acks, &ids);
}

/// kill -9 of one NATS server while events are published, and again while a
/// group with members on two nodes consumes them: nothing acked is lost, nothing
/// is stored twice, every event is acked by the group, in order per aggregate.
#[test]
fn nothing_acked_is_lost_when_a_nats_server_dies() {
    const TOTAL: usize = 1500;
    let mut mesh = ThreeNodes::start();
    let (servers, b, c) = (mesh.from(0), mesh.url(1), mesh.url(2));
    let leader = mesh
        .runtime
        .block_on(mesh.cluster.leader_of("EVMESH_EVENTS"));
    // Publishing: the events stream's leader dies at a third, and is back after.
    let acks = {
        let ThreeNodes {
            runtime, cluster, ..
        } = &mut mesh;
        runtime.block_on(publish_through(&servers, "natskill.test", TOTAL, |i| {
            if i == TOTAL / 3 {
                cluster.servers[leader].kill();
            }
        }))
    };
    mesh.runtime
        .block_on(mesh.cluster.servers[leader].restart());
    let ids = mesh.runtime.block_on(stored(&b, "natskill.test", TOTAL));
    assert_stored_once(&acks, &ids);

    // Consuming: members on b and c; a server dies under them.
    let checker = Arc::new(Mutex::new(Checker::default()));
    {
        let mut by_seq: Vec<(u64, String)> = acks.into_iter().map(|(id, s)| (s, id)).collect();
        by_seq.sort();
        let mut c = checker.lock().unwrap();
        for (seq, id) in by_seq {
            let n: usize = id.trim_start_matches("e-").parse().unwrap();
            let aggregate = format!("agg-{}", n % 32);
            c.aggregate_of.insert(seq, aggregate.clone());
            c.sequences.entry(aggregate).or_default().push(seq);
        }
    }
    let never: fn(u64) -> bool = |_| false;
    let members = [(1, b), (2, c)].map(|(id, node)| {
        mesh.runtime.spawn(member(
            id,
            node,
            "natskill",
            "natskill.>",
            Duration::from_millis(2),
            never,
            checker.clone(),
        ))
    });
    let deadline = std::time::Instant::now() + evmesh_tests::PATIENCE;
    while checker.lock().unwrap().acked.len() < TOTAL / 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "consumption never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let victim = (leader + 1) % 3;
    mesh.cluster.servers[victim].kill();
    mesh.runtime.block_on(async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        mesh.cluster.servers[victim].restart().await;
        until_all_acked(&checker, "with a nats-server killed").await;
        for m in members {
            m.await.unwrap();
        }
    });
}

/// The shop, its services spread over the three nodes, one node killed while
/// orders flow: every order reaches its final state, and each effect happens once
/// (a row per order in each service's table, one event of each kind per order).
#[test]
fn the_shop_survives_a_node_dying() {
    use evmesh_shop::events::{LineItem, OrderPlaced};
    const ORDERS: usize = 60;
    let mut mesh = ThreeNodes::start();
    let dir = tempfile::tempdir().unwrap();
    let servers: Vec<String> = (0..3).map(|i| mesh.from(i)).collect();
    let a = mesh.url(0);
    let order = |i: usize| OrderPlaced {
        order_id: format!("o-{i}"),
        customer: "ada".into(),
        // Every fifth over the limit: its payment fails.
        total_cents: if i.is_multiple_of(5) {
            evmesh_shop::PAYMENT_LIMIT_CENTS + 1
        } else {
            1_000
        },
        items: vec![LineItem {
            sku: "book".into(),
            quantity: 1,
        }],
    };
    let refused = (0..ORDERS).filter(|i| i.is_multiple_of(5)).count() as i64;
    let (shop, status_db, orders) = mesh.runtime.block_on(async {
        let orders = Mesh::connect(&servers[0]).await.unwrap();
        evmesh_shop::register_all(&orders).await.unwrap();
        let db = |name: &str| {
            let path = dir.path().join(name);
            async move { evmesh_shop::database(&path).await }
        };
        let status_db = db("order-status.db").await.unwrap();
        // Each service through a node of its own first.
        let through = |i: usize| Mesh::connect(&servers[i % 3]);
        let consumers = vec![
            evmesh_shop::payment(&through(1).await.unwrap(), db("payment.db").await.unwrap())
                .await
                .unwrap(),
            evmesh_shop::inventory(
                &through(2).await.unwrap(),
                db("inventory.db").await.unwrap(),
            )
            .await
            .unwrap(),
            evmesh_shop::shipping(&through(0).await.unwrap(), db("shipping.db").await.unwrap())
                .await
                .unwrap(),
            evmesh_shop::order_status(&through(1).await.unwrap(), status_db.clone())
                .await
                .unwrap(),
        ];
        (consumers, status_db, orders)
    });
    let settled = |pool: &sqlx::SqlitePool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM order_status WHERE status IN ('shipped', 'payment failed')",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    mesh.runtime.block_on(async {
        for i in 0..ORDERS / 3 {
            evmesh_shop::place_order(&orders, order(i)).await.unwrap();
        }
    });
    // b (where payment and the projection joined) dies with orders in flight.
    mesh.kill_9(1);
    mesh.runtime.block_on(async {
        for i in ORDERS / 3..ORDERS {
            evmesh_shop::place_order(&orders, order(i)).await.unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while settled(&status_db).await < ORDERS as i64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {ORDERS} orders settled",
                settled(&status_db).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let count = |db: &'static str, table: &'static str| {
            let path = dir.path().join(db);
            async move {
                let pool = evmesh_shop::database(&path).await.unwrap();
                sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {table}"))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        let paid = ORDERS as i64 - refused;
        assert_eq!(count("payment.db", "payments").await, ORDERS as i64);
        assert_eq!(count("inventory.db", "reservations").await, paid);
        assert_eq!(count("shipping.db", "shipments").await, paid);
        let shipped: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM order_status WHERE status = 'shipped'")
                .fetch_one(&status_db)
                .await
                .unwrap();
        assert_eq!(shipped, paid);
        // One event of each kind per order: no handler's effects published twice.
        let expected = [
            ("shop.order.placed", ORDERS),
            ("shop.payment.succeeded", paid as usize),
            ("shop.payment.failed", refused as usize),
            ("shop.inventory.reserved", paid as usize),
            ("shop.shipment.scheduled", paid as usize),
        ];
        for (ty, n) in expected {
            let ids = stored(&a, ty, n).await;
            assert_eq!(ids.len(), n, "{ty}");
        }
        for consumer in shop {
            consumer.stop().await.unwrap();
        }
    });
}

/// Every node restarted in turn (SIGTERM, then again on its port) while a client
/// publishes and an effectively-once consumer handles: nothing acked is lost, and
/// nothing is handled twice.
#[test]
fn a_rolling_restart_loses_nothing() {
    const ORDERS: usize = 1200;
    let mut mesh = ThreeNodes::start();
    let dir = tempfile::tempdir().unwrap();
    let (publishing, consuming, a) = (mesh.from(0), mesh.from(1), mesh.url(0));
    let pool = mesh
        .runtime
        .block_on(evmesh_tests::payment_db(&dir.path().join("payment.db")));
    let consumer = mesh.runtime.block_on(async {
        let service = Mesh::connect(&consuming).await.unwrap();
        evmesh_tests::payment_service(&service, pool.clone()).await
    });
    let publisher = mesh.runtime.spawn(async move {
        let shop = Mesh::connect(&publishing).await.unwrap();
        let mut acks = HashMap::new();
        for i in 0..ORDERS {
            let ack = support::place_order(&shop, i).await;
            acks.insert(ack.event_id.clone(), ack.sequence);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acks
    });
    let charged = |pool: &sqlx::SqlitePool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM charges")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    for (i, name) in NAMES.iter().enumerate() {
        let deadline = std::time::Instant::now() + evmesh_tests::PATIENCE;
        let before = mesh.runtime.block_on(charged(&pool));
        while mesh.runtime.block_on(charged(&pool)) < before + 50 {
            assert!(
                std::time::Instant::now() < deadline,
                "no progress before restarting {}",
                name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        mesh.restart(i);
    }
    let acks = mesh.runtime.block_on(publisher).unwrap();
    assert_eq!(acks.len(), ORDERS);
    mesh.runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while charged(&pool).await < ORDERS as i64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "charged {} of {ORDERS}",
                charged(&pool).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let distinct: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT order_id) FROM charges")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(distinct, ORDERS as i64);
        assert_eq!(
            charged(&pool).await,
            ORDERS as i64,
            "an order handled twice"
        );
        let ids = stored(&a, "shop.order.placed", ORDERS).await;
        assert_stored_once(&acks, &ids);
        stored(&a, "shop.payment.succeeded", ORDERS).await;
        consumer.stop().await.unwrap();
    });
}

/// A member on b of a group owned by a (its first member, there, joined and left),
/// nacking every delivery with a delay: each event comes again no sooner than the
/// delay, at attempts 1, 2, 3, then goes to the dead letters with the member's
/// reason, listed through c.
#[test]
fn nacks_with_delay_and_dead_letters_across_nodes() {
    const DELAY: Duration = Duration::from_millis(400);
    let mesh = ThreeNodes::start();
    let (a, b, c) = (mesh.url(0), mesh.url(1), mesh.url(2));
    let spec = |ty: &str| pb::SubscribeOpen {
        group: "retry".into(),
        max_deliveries: 3,
        ..open(&[ty])
    };
    let deliveries = mesh.runtime.block_on(async {
        let mut on_a = pb::mesh_client::MeshClient::connect(a.clone())
            .await
            .unwrap();
        let holder = Sub::open(&mut on_a, spec("retry.>")).await.unwrap();
        let mut on_b = pb::mesh_client::MeshClient::connect(b.clone())
            .await
            .unwrap();
        let mut member = Sub::open(&mut on_b, spec("retry.>")).await.unwrap();
        drop(holder);
        let owner = eventually("a listed as the owner of retry", || {
            let c = c.clone();
            async move {
                tokio::task::spawn_blocking(move || owner_of(&c, "retry"))
                    .await
                    .unwrap()
            }
        })
        .await;
        assert_eq!(owner, "a");
        let mut on_c = pb::mesh_client::MeshClient::connect(c.clone())
            .await
            .unwrap();
        for i in 0..3 {
            let mut event = event_with_id("retry.test", &format!("r-{i}"));
            event.aggregate_id = format!("agg-{i}");
            evmesh_tests::publish(&mut on_c, event).await;
        }
        let mut deliveries: Vec<(u64, u32, std::time::Instant)> = Vec::new();
        while deliveries.len() < 9 {
            let d = member.next().await;
            deliveries.push((d.sequence, d.attempt, std::time::Instant::now()));
            member.nack(&[d.sequence], DELAY, "try later").await;
        }
        assert!(
            member.try_next(Duration::from_secs(1)).await.is_none(),
            "nothing after the third attempt"
        );
        deliveries
    });
    let mut by_seq: HashMap<u64, Vec<(u32, std::time::Instant)>> = HashMap::new();
    for (seq, attempt, at) in deliveries {
        by_seq.entry(seq).or_default().push((attempt, at));
    }
    assert_eq!(by_seq.len(), 3);
    for (seq, tries) in &by_seq {
        let attempts: Vec<u32> = tries.iter().map(|t| t.0).collect();
        assert_eq!(attempts, [1, 2, 3], "attempts of {seq}");
        for pair in tries.windows(2) {
            assert!(
                pair[1].1.duration_since(pair[0].1) >= DELAY,
                "{seq} came again before its delay"
            );
        }
    }
    let out = std::process::Command::new(support::BIN)
        .args(["dlq", "list", "retry", "--output", "json", "--server", &c])
        .output()
        .unwrap();
    support::assert_ok(&out);
    let letters: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 3, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["attempts"], 3, "{letter}");
        assert_eq!(letter["reason"], "try later", "{letter}");
    }
}
