//! The `evmesh` binary end to end: a real `evmesh serve` process, and the client
//! commands against it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

mod support;

use support::{BIN, Served};

/// A failing command prints exactly one line on stderr and exits non-zero.
#[track_caller]
fn one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("evmesh: "), "{stderr}");
    assert!(stderr.contains(needle), "{stderr} does not name {needle:?}");
}

#[test]
fn serve_publish_subscribe_chain_groups_dlq() {
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload.bin");
    std::fs::write(&payload, b"\x0a\x03o-1").unwrap();
    let payload = payload.to_str().unwrap();
    let node = Served::start(&dir.path().join("data"));

    let publish = |args: &[&str]| -> serde_json::Value {
        let mut all = vec![
            "publish",
            "--message",
            "shop.v1.OrderPlaced",
            "--payload-file",
            payload,
        ];
        all.extend_from_slice(args);
        serde_json::from_str(&node.ok(&all)).unwrap()
    };
    let placed = publish(&[
        "--type",
        "shop.order.placed",
        "--id",
        "o-1",
        "--source",
        "order",
        "--header",
        "k=v",
    ]);
    assert_eq!(placed["sequence"], 1);
    assert_eq!(placed["duplicate"], false);
    let again = publish(&["--type", "shop.order.placed", "--id", "o-1"]);
    assert_eq!(again["duplicate"], true);
    publish(&[
        "--type",
        "shop.payment.succeeded",
        "--id",
        "p-1",
        "--correlation-id",
        "o-1",
        "--causation-id",
        "o-1",
    ]);
    publish(&[
        "--type",
        "shop.shipment.scheduled",
        "--id",
        "s-1",
        "--correlation-id",
        "o-1",
        "--causation-id",
        "p-1",
    ]);

    let out = node.ok(&["subscribe", "shop.>", "--from", "earliest", "--count", "3"]);
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["id"], "o-1");
    assert_eq!(events[0]["headers"]["k"], "v");
    assert_eq!(
        events[0]["payload"]["@type"],
        "type.googleapis.com/shop.v1.OrderPlaced"
    );
    assert_eq!(events[2]["causation_id"], "p-1");

    let tree = node.ok(&["chain", "o-1"]);
    let lines: Vec<&str> = tree.lines().collect();
    assert!(
        lines[0].starts_with("#1 shop.order.placed  id=o-1 source=order"),
        "{tree}"
    );
    assert!(
        lines[1].starts_with("└─ #2 shop.payment.succeeded  id=p-1"),
        "{tree}"
    );
    assert!(
        lines[2].starts_with("   └─ #3 shop.shipment.scheduled  id=s-1"),
        "{tree}"
    );

    // A group takes two events and acks them.
    let out = node.ok(&[
        "subscribe",
        "shop.>",
        "--group",
        "audit",
        "--from",
        "earliest",
        "--count",
        "2",
    ]);
    assert_eq!(out.lines().count(), 2);
    let groups = node.ok(&["groups", "list"]);
    let row: Vec<&str> = groups.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["audit", "shop.>", "2", "1"], "{groups}");
    let seeked = node.ok(&["groups", "seek", "audit", "--to", "earliest"]);
    assert!(
        seeked.lines().nth(1).unwrap().starts_with("audit"),
        "{seeked}"
    );

    // Dead letters of a group with none.
    let list = node.ok(&["dlq", "list", "audit"]);
    assert_eq!(list.lines().count(), 1, "only the header: {list}");
    assert_eq!(node.ok(&["dlq", "redrive", "audit"]).trim(), "redriven 0");
    assert_eq!(
        node.ok(&["dlq", "purge", "audit", "--seq", "1"]).trim(),
        "purged 0"
    );

    // Errors: one line, non-zero.
    one_line_error(
        &node.run(&[
            "publish",
            "--type",
            "Bad",
            "--message",
            "m.M",
            "--payload-file",
            payload,
        ]),
        "event.type",
    );
    one_line_error(&node.run(&["dlq", "list", "nobody"]), "NotFound");
    one_line_error(&node.run(&["chain", "nobody"]), "no events");
    one_line_error(
        &node.run(&["subscribe", "shop.>", "--from", "yesterday"]),
        "--from",
    );
    one_line_error(
        &node.run(&[
            "publish",
            "--type",
            "a.b",
            "--message",
            "m.M",
            "--payload-file",
            "/nonexistent",
        ]),
        "--payload-file",
    );

    let status = node.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");

    // Everything acked is there after a restart.
    let node = Served::start(&dir.path().join("data"));
    let out = node.ok(&["chain", "o-1", "--output", "json"]);
    assert_eq!(out.lines().count(), 3);
    assert!(node.terminate().success());
}

#[test]
fn unreachable_server_is_one_line() {
    let out = Command::new(BIN)
        .args(["--server", "127.0.0.1:1", "groups", "list"])
        .output()
        .unwrap();
    one_line_error(&out, "cannot reach a node at http://127.0.0.1:1");
    let out = Command::new(BIN)
        .args(["--server", "not a url", "groups", "list"])
        .output()
        .unwrap();
    one_line_error(&out, "--server");
}

#[test]
fn serve_refuses_a_bad_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let stderr = support::serve_refused(dir.path(), &["--listen", &addr]);
    assert!(
        stderr.contains(&format!("evmesh: cannot listen on {addr}")),
        "{stderr}"
    );
}

/// SIGKILL while publishers stream: every event that was acked is in the log after
/// a restart, at the sequence it was acked with.
#[test]
fn nothing_acked_is_lost_on_sigkill() {
    use evmesh_tests::v1 as pb;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = Served::start(&data);
    let url = format!("http://{}", node.addr);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let acked: Vec<(String, u64)> = runtime.block_on(async {
        let mut tasks = Vec::new();
        for stream in 0..4 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = pb::mesh_client::MeshClient::connect(url).await.unwrap();
                let (tx, rx) = tokio::sync::mpsc::channel(256);
                let mut responses = client
                    .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                tokio::spawn(async move {
                    for i in 0.. {
                        let e = evmesh_tests::event_with_id(
                            "crash.test.event",
                            &format!("s{stream}-{i}"),
                        );
                        if tx
                            .send(pb::PublishRequest { event: Some(e) })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
                let mut acked = Vec::new();
                // Until the node dies under us.
                while let Ok(Some(r)) = responses.message().await {
                    let a = evmesh_tests::ack_of(&r);
                    acked.push((a.event_id.clone(), a.sequence));
                }
                acked
            }));
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let mut node = node;
        node.child.kill().unwrap(); // SIGKILL
        node.child.wait().unwrap();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert!(acked.len() > 100, "publishers got going: {}", acked.len());

    let node = Served::start(&data);
    let url = format!("http://{}", node.addr);
    runtime.block_on(async {
        let mut client = pb::mesh_client::MeshClient::connect(url).await.unwrap();
        let mut sub = evmesh_tests::Sub::open(
            &mut client,
            pb::SubscribeOpen {
                auto_ack: true,
                max_in_flight: 10_000,
                ..evmesh_tests::open(&["crash.>"])
            },
        )
        .await
        .unwrap();
        let mut stored = std::collections::HashMap::new();
        while let Some(d) = sub.try_next(Duration::from_millis(500)).await {
            stored.insert(d.event.unwrap().id, d.sequence);
        }
        for (id, seq) in &acked {
            assert_eq!(
                stored.get(id),
                Some(seq),
                "acked event {id} at {seq} is in the log"
            );
        }
    });
    drop(node);
}

#[test]
fn schema_register_check_list_show_and_json_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let protos = dir.path().join("protos");
    std::fs::create_dir_all(protos.join("shop/v1")).unwrap();
    std::fs::write(
        protos.join("shop/v1/money.proto"),
        "syntax = \"proto3\";\npackage shop.v1;\nmessage Money { int64 cents = 1; string currency = 2; }\n",
    )
    .unwrap();
    let order = |extra: &str| {
        std::fs::write(
            protos.join("shop/v1/order.proto"),
            format!(
                "syntax = \"proto3\";\npackage shop.v1;\nimport \"shop/v1/money.proto\";\n\
                 message OrderPlaced {{ string order_id = 1; Money total = 2; {extra} }}\n"
            ),
        )
        .unwrap();
    };
    order("");
    let node = Served::start_with(&dir.path().join("data"), &[]);
    let include = protos.to_str().unwrap();
    let schema = |verb: &str, more: &[&str]| -> Output {
        let mut args = vec![
            "schema",
            verb,
            "shop/v1/order.proto",
            "-I",
            include,
            "--type",
            "shop.order.placed",
            "--message",
            "shop.v1.OrderPlaced",
        ];
        args.extend_from_slice(more);
        node.run(&args)
    };
    let stdout = |out: &Output| String::from_utf8_lossy(&out.stdout).into_owned();

    let out = schema("register", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout(&out).trim(),
        "registered shop.order.placed 1.0.0 (shop.v1.OrderPlaced)"
    );
    let out = schema("register", &[]);
    assert_eq!(
        stdout(&out).trim(),
        "already registered shop.order.placed 1.0.0 (shop.v1.OrderPlaced)"
    );

    order("string note = 3;");
    let out = schema("check", &["--version", "1.0.1"]);
    let table = stdout(&out);
    assert!(
        table.contains("FIELD_ADDED")
            && table.contains("shop.v1.OrderPlaced.note")
            && table.contains("MINOR"),
        "{table}"
    );
    one_line_error(&out, "use 1.1.0");
    let out = schema("check", &["--output", "json"]);
    assert!(out.status.success());
    let verdict: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(verdict["version"], "1.1.0");
    assert_eq!(verdict["required_bump"], "MINOR");
    assert_eq!(verdict["changes"][0]["rule"], "FIELD_ADDED");
    let out = schema("register", &["--output", "json"]);
    let registered: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (
            registered["version"].as_str(),
            registered["created"].as_bool()
        ),
        (Some("1.1.0"), Some(true))
    );
    // A version too small is refused by register too, with one line.
    order("string note = 3; string coupon = 4;");
    one_line_error(
        &schema("register", &["--version", "1.1.1"]),
        "FIELD_ADDED shop.v1.OrderPlaced.coupon",
    );
    one_line_error(
        &node.run(&[
            "schema",
            "register",
            "shop/v1/order.proto",
            "-I",
            include,
            "--type",
            "shop.order.placed",
            "--message",
            "shop.v1.Nope",
        ]),
        "shop.v1.Nope",
    );
    // Usage errors are one line too.
    one_line_error(
        &schema("register", &["--message", "shop.v1.Twice"]),
        "--message",
    );

    let listed = node.ok(&["schema", "list", "--output", "json"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let shown = node.ok(&["schema", "show", "shop.order.placed"]);
    assert!(
        shown.starts_with("shop.order.placed 1.1.0 (shop.v1.OrderPlaced)"),
        "{shown}"
    );
    assert!(
        shown.contains("  shop.v1.Money total = 2;") && shown.contains("message shop.v1.Money {"),
        "{shown}"
    );
    let shown = node.ok(&["schema", "show", "shop.order.placed", "--version", "1.0.0"]);
    assert!(!shown.contains("note"), "{shown}");
    // The files as .proto source, the payload's first.
    let source = node.ok(&["schema", "show", "shop.order.placed", "--output", "proto"]);
    assert!(
        source.starts_with("// shop/v1/order.proto\nsyntax = \"proto3\";")
            && source.contains("import \"shop/v1/money.proto\";")
            && source.contains("  Money total = 2;\n  string note = 3;")
            && source.contains("// shop/v1/money.proto"),
        "{source}"
    );
    // A diff of two registered versions, with the checker's verdict.
    let diff = node.ok(&["schema", "diff", "shop.order.placed", "1.0.0", "1.1.0"]);
    assert!(
        diff.starts_with(
            "shop.order.placed 1.0.0 -> 1.1.0: changes need MINOR, the step declares MINOR; allowed"
        ) && diff.contains("FIELD_ADDED")
            && diff.contains("shop.v1.OrderPlaced.note"),
        "{diff}"
    );
    let diff = node.ok(&[
        "schema",
        "diff",
        "shop.order.placed",
        "1.0.0",
        "1.1.0",
        "--output",
        "json",
    ]);
    let diff: serde_json::Value = serde_json::from_str(&diff).unwrap();
    assert_eq!(diff["required_bump"], "MINOR");
    assert_eq!(diff["compatible"], true);
    one_line_error(
        &node.run(&["schema", "diff", "shop.order.placed", "1.1.0", "1.0.0"]),
        "from_version 1.1.0 must be below to_version 1.0.0",
    );
    one_line_error(
        &node.run(&["schema", "diff", "shop.order.placed", "1.0.0", "3.0.0"]),
        "version 3.0.0 of shop.order.placed is not registered; registered: 1.0.0, 1.1.0",
    );

    // JSON payloads in, JSON payloads out.
    let ack = node.ok(&[
        "publish",
        "--type",
        "shop.order.placed",
        "--json",
        r#"{"orderId": "o-1", "total": {"cents": "500", "currency": "EUR"}, "note": "gift"}"#,
    ]);
    let ack: serde_json::Value = serde_json::from_str(&ack).unwrap();
    assert_eq!(ack["sequence"], 1);
    let pinned = node.ok(&[
        "publish",
        "--type",
        "shop.order.placed",
        "--schema-version",
        "1.0.0",
        "--json",
        r#"{"orderId": "o-2"}"#,
    ]);
    assert!(pinned.contains("\"sequence\":2"), "{pinned}");
    one_line_error(
        &node.run(&[
            "publish",
            "--type",
            "shop.order.placed",
            "--json",
            r#"{"orderNumber": 1}"#,
        ]),
        "--json",
    );
    one_line_error(
        &node.run(&["publish", "--type", "shop.order.unknown", "--json", "{}"]),
        "no schema is registered",
    );
    let bytes = dir.path().join("junk.bin");
    std::fs::write(&bytes, [0x48, 0x01]).unwrap();
    one_line_error(
        &node.run(&[
            "publish",
            "--type",
            "shop.order.placed",
            "--message",
            "shop.v1.OrderPlaced",
            "--payload-file",
            bytes.to_str().unwrap(),
        ]),
        "field number 9",
    );
    let out = node.ok(&["subscribe", "shop.>", "--from", "earliest", "--count", "2"]);
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["schema_version"], "1.1.0");
    assert_eq!(events[0]["payload"]["orderId"], "o-1");
    assert_eq!(events[0]["payload"]["total"]["cents"], "500");
    assert_eq!(
        events[0]["payload"]["@type"],
        "type.googleapis.com/shop.v1.OrderPlaced"
    );
    assert_eq!(events[1]["schema_version"], "1.0.0");
    assert_eq!(events[1]["payload"]["orderId"], "o-2");
    assert!(node.terminate().success());
}

/// A log of 2,000 events of one correlation id, stopped cleanly, with pages in its
/// middle overwritten.
fn damaged_log(data: &Path) {
    use evmesh_store::Store;
    use evmesh_store::sqlite::{Config, DB_FILE, SqliteStore};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = SqliteStore::open(Config::new(data)).await.unwrap();
        let events = (0..2000)
            .map(|i| evmesh_proto::v1::Event {
                id: format!("e-{i}"),
                r#type: "damaged.event".into(),
                correlation_id: "damaged".into(),
                payload: Some(prost_types::Any {
                    type_url: "type.googleapis.com/d.v1.D".into(),
                    value: vec![0x5a; 1000],
                }),
                ..Default::default()
            })
            .collect();
        store.append(events).await.unwrap();
        store.shutdown().await.unwrap();
    });
    let path = data.join(DB_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let page = 16 * 1024;
    let pages = bytes.len() / page;
    for p in pages * 2 / 5..pages * 3 / 5 {
        bytes[p * page..p * page + 64].fill(0xff);
    }
    std::fs::write(&path, bytes).unwrap();
}

/// Robustness issue, item 10: a damaged log is refused at start, with what to do;
/// started anyway, what reaches the damage ends with DATA_LOSS, not a stall.
#[test]
fn a_damaged_log_is_refused_then_data_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    damaged_log(&data);
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("EVMESH_DATA", &data)
        .output()
        .unwrap();
    one_line_error(&out, "failed its integrity check");
    let node = Served::start_with(&data, &["--allow-unregistered", "--skip-integrity-check"]);
    let subscribe = node.run(&[
        "subscribe",
        "damaged.>",
        "--from",
        "earliest",
        "--count",
        "2000",
    ]);
    one_line_error(&subscribe, "the log is damaged at or after sequence");
    let chain = node.run(&["chain", "damaged"]);
    one_line_error(&chain, "the log is damaged");
}

/// `serve --nats`: the node keeps its events and groups on NATS JetStream. What a
/// node published, a second node on the same server serves (the chain, a group from
/// earliest); an unreachable NATS is one line and a non-zero exit.
#[test]
fn serve_on_nats() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let nats = runtime.block_on(evmesh_tests::NatsServer::start());
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload.bin");
    std::fs::write(&payload, b"\x0a\x03o-1").unwrap();
    let payload = payload.to_str().unwrap();
    let url = nats.url();
    let first = Served::start_with(
        &dir.path().join("one"),
        &["--allow-unregistered", "--nats", &url],
    );
    for (id, causation) in [("o-1", ""), ("p-1", "o-1")] {
        let placed: serde_json::Value = serde_json::from_str(&first.ok(&[
            "publish",
            "--message",
            "shop.v1.OrderPlaced",
            "--payload-file",
            payload,
            "--type",
            "shop.order.placed",
            "--id",
            id,
            "--correlation-id",
            "o-1",
            "--causation-id",
            causation,
        ]))
        .unwrap();
        assert_eq!(placed["duplicate"], false);
    }
    drop(first);
    let second = Served::start_with(
        &dir.path().join("two"),
        &["--allow-unregistered", "--nats", &url],
    );
    let tree = second.ok(&["chain", "o-1"]);
    assert!(
        tree.lines().count() == 2 && tree.contains("id=p-1"),
        "{tree}"
    );
    let out = second.ok(&[
        "subscribe",
        "shop.>",
        "--group",
        "audit",
        "--from",
        "earliest",
        "--count",
        "2",
    ]);
    assert_eq!(out.lines().count(), 2, "{out}");

    let down = format!("nats://127.0.0.1:{}", support::free_port());
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--nats", &down])
        .env("EVMESH_DATA", dir.path().join("three"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    one_line_error(&out, &format!("evmesh: cannot use NATS at {down}"));
}

/// `evmesh subscribe … | head -1`: once the reader is gone, the next line ends the
/// command quietly (141, as a SIGPIPE would), not with a panic.
#[test]
fn a_reader_that_goes_away_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let node = Served::start(&dir.path().join("data"));
    let payload = dir.path().join("payload.bin");
    std::fs::write(&payload, b"\x0a\x01x").unwrap();
    let publish = || {
        node.ok(&[
            "publish",
            "--type",
            "app.thing.done",
            "--message",
            "app.v1.Thing",
            "--payload-file",
            payload.to_str().unwrap(),
        ])
    };
    publish();
    let mut child = std::process::Command::new(BIN)
        .args(["subscribe", "app.>", "--from", "earliest"])
        .env("EVMESH_SERVER", &node.addr)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.contains("app.thing.done"), "{first}");
    // The reader is gone (dropped above); the next event's line meets a closed pipe.
    publish();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = std::process::Command::new("kill")
                .args(["-9", &child.id().to_string()])
                .status();
            panic!("evmesh subscribe went on writing to a closed pipe");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
