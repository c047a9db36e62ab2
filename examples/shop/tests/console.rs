//! The web console in a real browser (Debian's Chromium, driven headless by
//! playwright-core from `tests/console/console.cjs`) against a real node holding the
//! shop's events: every page renders what the node holds, a schema diff shows a
//! field deletion as MAJOR, the tail shows an event published after it opened, a
//! dead letter redriven from the page reaches a member again, and a chain shows the
//! shop's four events in causal order; with `--auth`, the console asks for a token
//! and has exactly its principal's rights.
//!
//! With `EVMESH_CONSOLE_SHOTS=DIR`, the script also saves each page at a desktop and
//! a phone width there (the README's screenshots come from it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use evmesh_client::Mesh;
use evmesh_shop::events::{LineItem, OrderPlaced};
use evmesh_tests::v1 as pb;
use evmesh_tests::{Sub, TestNode, eventually};
use std::io::Write as _;

/// How long the whole browser script may take.
const SCRIPT_PATIENCE: Duration = Duration::from_secs(240);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/console.cjs")
}

/// Where npm's global packages are: playwright-core, installed by `scripts/test`.
fn node_path() -> String {
    let out = std::process::Command::new("npm")
        .args(["root", "--global"])
        .output()
        .expect("npm runs (scripts/test installs Node.js packages with it)");
    assert!(out.status.success(), "npm root --global failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Stops the browser script by its PID when the test ends before it does (a
/// timeout, or a panic on the test's side).
struct Stop(u32);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .status();
    }
}

/// Runs the browser script for `scenario` and answers its requests: a line
/// `publish TYPE` (or `publish TYPE large`, with a payload of some 3 KB) from it
/// publishes an event of TYPE and answers `published ID`.
async fn run_script(scenario: &str, env: &[(&str, String)], node: &TestNode) {
    let mut command = std::process::Command::new("node");
    command
        .arg(script())
        .arg(scenario)
        .env("NODE_PATH", node_path())
        .env(
            "CONSOLE_URL",
            format!("http://{}", node.http.expect("an HTTP listener")),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .expect("node runs (scripts/test installs Node.js)");
    let stop = Stop(child.id());
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut client = node.client().await;
    let talk = async {
        while let Some(line) = lines.recv().await {
            println!("console.cjs: {line}");
            if let Some(request) = line.strip_prefix("publish ") {
                let (ty, large) = match request.strip_suffix(" large") {
                    Some(ty) => (ty, true),
                    None => (request, false),
                };
                let id = format!("tail-{}", uuid::Uuid::now_v7());
                let payload = OrderPlaced {
                    order_id: "o-tail".into(),
                    customer: if large {
                        "grace ".repeat(500)
                    } else {
                        "grace".into()
                    },
                    total_cents: 1_234,
                    items: Vec::new(),
                };
                let event = pb::Event {
                    id: id.clone(),
                    r#type: ty.to_owned(),
                    source: "console-test".into(),
                    aggregate_id: "o-tail".into(),
                    payload: Some(prost_types::Any {
                        type_url: "type.googleapis.com/shop.v1.OrderPlaced".into(),
                        value: prost::Message::encode_to_vec(&payload),
                    }),
                    ..Default::default()
                };
                evmesh_tests::publish(&mut client, event).await;
                stdin
                    .write_all(format!("published {id}\n").as_bytes())
                    .unwrap();
                stdin.flush().unwrap();
            }
        }
    };
    if tokio::time::timeout(SCRIPT_PATIENCE, talk).await.is_err() {
        drop(stop);
        let _ = child.wait();
        panic!("the browser script ({scenario}) took longer than {SCRIPT_PATIENCE:?}");
    }
    let status = child.wait().unwrap();
    // Ended and reaped: its PID is no longer its own to kill.
    std::mem::forget(stop);
    assert!(
        status.success(),
        "the browser script ({scenario}) failed: {status}"
    );
}

fn screenshots() -> Vec<(&'static str, String)> {
    std::env::var("EVMESH_CONSOLE_SHOTS")
        .map(|dir| vec![("SHOTS", dir)])
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_shows_what_the_node_holds_in_a_real_browser() {
    let node = TestNode::start_with_http(evmesh_node::NodeConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::connect(&node.url()).await.unwrap();
    evmesh_shop::register_all(&mesh).await.unwrap();
    // A type with two versions, the second deleting a field.
    for (version, body) in [
        (
            "1.0.0",
            "string sku = 1; string name = 2; int64 price_cents = 3;",
        ),
        ("2.0.0", "string sku = 1; int64 price_cents = 3;"),
    ] {
        let set = evmesh_tests::descriptor_set(&[(
            "catalog/v1/item.proto",
            &format!(
                "syntax = \"proto3\";\npackage catalog.v1;\nmessage ItemChanged {{ {body} }}\n"
            ),
        )]);
        evmesh_tests::register(
            &node,
            "catalog.item.changed",
            version,
            "catalog.v1.ItemChanged",
            set,
        )
        .await
        .unwrap();
    }
    let shop = evmesh_shop::start_all(&mesh, dir.path()).await.unwrap();
    let order = |id: &str| OrderPlaced {
        order_id: id.into(),
        customer: "ada".into(),
        total_cents: 4_200,
        items: vec![LineItem {
            sku: "book".into(),
            quantity: 2,
        }],
    };
    let placed = evmesh_shop::place_order(&mesh, order("o-1")).await.unwrap();
    evmesh_shop::place_order(&mesh, order("o-2")).await.unwrap();
    let mut client = node.client().await;
    eventually("the workflow's four events", || {
        let mut client = client.clone();
        let correlation_id = placed.correlation_id.clone();
        async move {
            let events = client
                .get_chain(pb::GetChainRequest {
                    correlation_id,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .events;
            (events.len() == 4).then_some(())
        }
    })
    .await;

    // A member of "audit" that fails both orders once, which dead-letters them (one
    // delivery allowed); the page purges the second and redrives the first, which
    // the member then takes again.
    let mut audit = Sub::open(
        &mut client,
        pb::SubscribeOpen {
            group: "audit".into(),
            max_deliveries: 1,
            ..evmesh_tests::open(&["shop.order.placed"])
        },
    )
    .await
    .unwrap();
    let first = audit.next().await;
    let second = audit.next().await;
    audit
        .nack(
            &[first.sequence, second.sequence],
            Duration::ZERO,
            "the audit store is down",
        )
        .await;
    eventually("two dead letters", || {
        let mut client = client.clone();
        async move {
            let letters = client
                .list_dead_letters(pb::ListDeadLettersRequest {
                    group: "audit".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .dead_letters;
            (letters.len() == 2).then_some(())
        }
    })
    .await;
    let (redelivered_tx, redelivered) = tokio::sync::oneshot::channel();
    let (dead, purged) = (first.sequence, second.sequence);
    let member = tokio::spawn(async move {
        // The events the tail publishes come to the member too: each acked.
        let mut seen = Vec::new();
        loop {
            let delivery = audit.next().await;
            audit.ack(&[delivery.sequence]).await;
            seen.push(delivery.sequence);
            if delivery.sequence == dead {
                let _ = redelivered_tx.send(delivery);
                // Kept open: a member that leaves at once may take its ack along.
                return (seen, audit);
            }
        }
    });

    run_script(
        "pages",
        &[
            [
                ("CORRELATION_ID", placed.correlation_id.clone()),
                ("GROUP", "audit".to_owned()),
                ("DIFF_TYPE", "catalog.item.changed".to_owned()),
            ]
            .as_slice(),
            screenshots().as_slice(),
        ]
        .concat(),
        &node,
    )
    .await;

    let again = tokio::time::timeout(Duration::from_secs(30), redelivered)
        .await
        .expect("the redriven dead letter reaches the member")
        .unwrap();
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(
        again.attempt, 1,
        "a redriven event starts again at attempt 1"
    );
    let (seen, _audit) = member.await.unwrap();
    assert!(
        !seen.contains(&purged),
        "the purged dead letter never comes back: {seen:?}"
    );
    for consumer in shop.consumers {
        consumer.stop().await.unwrap();
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_the_console_asks_for_a_token_and_has_its_rights() {
    let token = "evm_console-test-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(
        &path,
        format!(
            "[[principal]]\nname = \"oncall\"\n{}\nsubscribe = [\"shop.>\"]\nregistry = \"none\"\ngroups = [\"audit\"]\n",
            evmesh_node::auth::token_line(token)
        ),
    )
    .unwrap();
    let auth: Arc<evmesh_node::auth::Auth> = evmesh_node::auth::Auth::load(&path).unwrap();
    let node = TestNode::start_with_http(evmesh_node::NodeConfig {
        auth: Some(auth),
        ..evmesh_node::NodeConfig::default()
    })
    .await;
    run_script("auth", &[("TOKEN", token.to_owned())], &node).await;
    node.stop().await;
}
