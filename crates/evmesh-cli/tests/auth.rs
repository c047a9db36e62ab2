//! `evmesh serve --auth FILE`: tokens and mTLS identities mapped to principals,
//! per-subject permissions on every read path, SIGHUP narrowing what streams
//! already open may do, and per-principal caps; through the CLI, real grpcurl and
//! raw gRPC. Every node is stopped by its PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use evmesh_node::auth::token_line;
use evmesh_tests::v1 as pb;
use tokio_stream::StreamExt as _;

mod support;

use support::{BIN, Served, assert_ok};

const ORDERS: &str = "evm_orders-test-token-0123456789";
const ADMIN: &str = "evm_admin-test-token-0123456789";
const CAPPED: &str = "evm_capped-test-token-0123456789";

fn auth_file(orders_subscribe: &str) -> String {
    format!(
        r#"
[[principal]]
name = "orders"
{}
publish = ["sec.order.>"]
subscribe = [{orders_subscribe}]
deny_subscribe = ["sec.payment.card.>"]
groups = ["orders", "orders-*"]
registry = "read"

[[principal]]
name = "admin"
{}
publish = [">"]
subscribe = [">"]
groups = ["*"]
registry = "write"
admin = true

[[principal]]
name = "capped"
{}
subscribe = ["sec.>"]
groups = ["*"]
max_subscriptions = 1
max_publish_streams = 1
"#,
        token_line(ORDERS),
        token_line(ADMIN),
        token_line(CAPPED)
    )
}

const PROTOS: [(&str, &str); 2] = [
    (
        "sec/v1/order.proto",
        "syntax = \"proto3\";\npackage sec.v1;\nmessage OrderPlaced { string id = 1; }\nmessage PaymentTaken { string id = 1; }\n",
    ),
    (
        "sec/v1/card.proto",
        "syntax = \"proto3\";\npackage sec.v1;\nmessage CardCharged { string id = 1; }\n",
    ),
];

fn evmesh(node: &Served, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .args(["--server", &node.url()])
        .env_remove("EVMESH_SERVER")
        .env_remove("EVMESH_TOKEN");
    if let Some(token) = token {
        command.args(["--token", token]);
    }
    command.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn refused(out: &Output, expected: &[&str]) {
    assert!(!out.status.success(), "not refused: {}", stdout(out));
    let message = stderr(out);
    assert_eq!(message.lines().count(), 1, "{message}");
    for e in expected {
        assert!(message.contains(e), "{e:?} not in {message}");
    }
    for secret in [ORDERS, ADMIN, CAPPED] {
        assert!(!message.contains(secret), "a token in {message}");
    }
}

fn publish(node: &Served, token: &str, ty: &str, id: &str, correlation: &str) -> Output {
    let json = format!("{{\"id\": \"{id}\"}}");
    evmesh(
        node,
        Some(token),
        &[
            "publish",
            "--type",
            ty,
            "--json",
            &json,
            "--id",
            id,
            "--correlation-id",
            correlation,
        ],
    )
}

fn register(node: &Served, token: &str, dir: &Path, file: &str, ty: &str, message: &str) -> Output {
    let include = dir.display().to_string();
    evmesh(
        node,
        Some(token),
        &[
            "schema",
            "register",
            file,
            "-I",
            &include,
            "--type",
            ty,
            "--message",
            message,
        ],
    )
}

/// The types of a chain's events, as `evmesh chain --output json` shows them.
fn chain_types(node: &Served, token: &str, correlation: &str) -> Vec<String> {
    let out = evmesh(
        node,
        Some(token),
        &["chain", correlation, "--output", "json"],
    );
    assert_ok(&out);
    stdout(&out)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["type"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn start(dir: &Path, auth: &Path) -> Served {
    Served::start_with(&dir.join("data"), &["--auth", auth.to_str().unwrap()])
}

fn protos(dir: &Path) {
    for (name, text) in PROTOS {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

#[test]
fn principals_see_and_do_only_what_the_auth_file_grants_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.toml");
    std::fs::write(&auth, auth_file("\"sec.>\"")).unwrap();
    protos(dir.path());
    let node = start(dir.path(), &auth);

    // No credentials, or a token the file does not know: UNAUTHENTICATED.
    refused(
        &evmesh(&node, None, &["groups", "list"]),
        &["Unauthenticated", "no credentials"],
    );
    refused(
        &evmesh(&node, Some("evm_not-a-known-token"), &["groups", "list"]),
        &["Unauthenticated", "not one the auth file knows"],
    );
    assert!(
        !stderr(&evmesh(
            &node,
            Some("evm_not-a-known-token"),
            &["groups", "list"]
        ))
        .contains("evm_not")
    );
    // Health stays open.
    assert_ok(&evmesh(&node, None, &["health"]));

    // The registry: read for orders, write for admin.
    let d = dir.path();
    refused(
        &register(
            &node,
            ORDERS,
            d,
            "sec/v1/order.proto",
            "sec.order.placed",
            "sec.v1.OrderPlaced",
        ),
        &[
            "PermissionDenied",
            "principal \"orders\" may not register schemas",
        ],
    );
    for (file, ty, message) in [
        (
            "sec/v1/order.proto",
            "sec.order.placed",
            "sec.v1.OrderPlaced",
        ),
        (
            "sec/v1/order.proto",
            "sec.payment.taken",
            "sec.v1.PaymentTaken",
        ),
        (
            "sec/v1/card.proto",
            "sec.payment.card.charged",
            "sec.v1.CardCharged",
        ),
    ] {
        assert_ok(&register(&node, ADMIN, d, file, ty, message));
    }
    assert!(stdout(&evmesh(&node, Some(ORDERS), &["schema", "list"])).contains("sec.order.placed"));

    // Publish: within its patterns only, refused by name, never by token.
    assert_ok(&publish(&node, ORDERS, "sec.order.placed", "o-1", "wf-1"));
    refused(
        &publish(&node, ORDERS, "sec.payment.taken", "p-0", "wf-1"),
        &[
            "PermissionDenied",
            "principal \"orders\" may not publish sec.payment.taken",
        ],
    );
    assert_ok(&publish(&node, ADMIN, "sec.payment.taken", "p-1", "wf-1"));
    assert_ok(&publish(
        &node,
        ADMIN,
        "sec.payment.card.charged",
        "c-1",
        "wf-1",
    ));

    // GetChain leaves out what orders may not read.
    assert_eq!(
        chain_types(&node, ADMIN, "wf-1"),
        [
            "sec.order.placed",
            "sec.payment.taken",
            "sec.payment.card.charged"
        ]
    );
    assert_eq!(
        chain_types(&node, ORDERS, "wf-1"),
        ["sec.order.placed", "sec.payment.taken"]
    );

    // Subscribe: a pattern beyond its subscribe is refused; an ephemeral one passes
    // over denied types; a group whose patterns reach them is refused.
    refused(
        &evmesh(
            &node,
            Some(ORDERS),
            &["subscribe", ">", "--from", "earliest", "--count", "1"],
        ),
        &["PermissionDenied", "may not subscribe to >"],
    );
    let out = evmesh(
        &node,
        Some(ORDERS),
        &["subscribe", "sec.>", "--from", "earliest", "--count", "2"],
    );
    assert_ok(&out);
    let seen: Vec<String> = stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(seen, ["sec.order.placed", "sec.payment.taken"]);
    refused(
        &evmesh(
            &node,
            Some(ORDERS),
            &["subscribe", "sec.>", "--group", "orders", "--count", "1"],
        ),
        &["PermissionDenied", "sec.payment.card.>"],
    );
    refused(
        &evmesh(
            &node,
            Some(ORDERS),
            &[
                "subscribe",
                "sec.order.*",
                "--group",
                "billing",
                "--count",
                "1",
            ],
        ),
        &["PermissionDenied", "may not use group \"billing\""],
    );

    // Dead letters: admin makes some in group orders-all; orders lists them without
    // the card payment, and may not purge (it is not admin).
    let out = evmesh(
        &node,
        Some(ADMIN),
        &[
            "subscribe",
            "sec.>",
            "--group",
            "orders-all",
            "--from",
            "earliest",
            "--nack",
            "no",
            "--max-deliveries",
            "1",
            "--count",
            "3",
        ],
    );
    assert_ok(&out);
    let dead = |token: &str| -> Vec<String> {
        let out = evmesh(
            &node,
            Some(token),
            &["dlq", "list", "orders-all", "--output", "json"],
        );
        assert_ok(&out);
        stdout(&out)
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["event"]["type"]
                    .as_str()
                    .or(v["type"].as_str())
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(evmesh_tests::eventually("three dead letters", || async {
        (dead(ADMIN).len() == 3).then_some(())
    }));
    let mut seen = dead(ORDERS);
    seen.sort();
    assert_eq!(seen, ["sec.order.placed", "sec.payment.taken"]);
    refused(
        &evmesh(&node, Some(ORDERS), &["dlq", "purge", "orders-all"]),
        &[
            "PermissionDenied",
            "may not purge dead letters of group \"orders-all\" (it is not admin)",
        ],
    );
    refused(
        &evmesh(
            &node,
            Some(ORDERS),
            &["groups", "seek", "orders-all", "--to", "earliest"],
        ),
        &["PermissionDenied", "may not seek"],
    );
    // ListGroups shows the groups a principal may use.
    assert!(stdout(&evmesh(&node, Some(ORDERS), &["groups", "list"])).contains("orders-all"));

    // Reflection: grpcurl sees the payload types orders may read, not the card's.
    let grpcurl = evmesh_tests::require_tool("grpcurl");
    let describe = |token: &str, symbol: &str| {
        Command::new(&grpcurl)
            .args([
                "-plaintext",
                "-H",
                &format!("authorization: Bearer {token}"),
                &node.addr,
                "describe",
                symbol,
            ])
            .output()
            .unwrap()
    };
    assert_ok(&describe(ORDERS, "sec.v1.OrderPlaced"));
    assert!(!describe(ORDERS, "sec.v1.CardCharged").status.success());
    assert_ok(&describe(ADMIN, "sec.v1.CardCharged"));
    let out = Command::new(&grpcurl)
        .args(["-plaintext", &node.addr, "list"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "reflection without a token");

    // Backup holds every event: only for an admin that reads everything.
    refused(
        &evmesh(
            &node,
            Some(ORDERS),
            &[
                "backup",
                "--output",
                dir.path().join("b.db").to_str().unwrap(),
            ],
        ),
        &["PermissionDenied", "backup"],
    );

    // Nothing secret in the node's log.
    let logged = node.all_logged();
    assert!(!logged.is_empty());
    for line in logged {
        let line = line.to_string();
        for secret in [ORDERS, ADMIN, CAPPED] {
            assert!(!line.contains(secret), "a token in the log: {line}");
        }
    }
    assert!(node.terminate().success());
}

/// A raw gRPC client with `token`.
async fn client(addr: &str, token: &str) -> pb::mesh_client::MeshClient<evmesh_client::Transport> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let credentials = evmesh_client::Credentials::default().token(token).unwrap();
    pb::mesh_client::MeshClient::new(credentials.authorize(channel))
}

/// What keeps a subscription open: its two streams.
type Held = (
    tokio::sync::mpsc::Sender<pb::SubscribeRequest>,
    Option<tonic::Streaming<pb::SubscribeResponse>>,
);

/// An ephemeral subscription with `token`: what keeps it open, and its first
/// answer, `Subscribed` or the status it was refused with.
async fn subscription(
    addr: &str,
    token: &str,
    pattern: &str,
) -> (Held, Result<pb::SubscribeResponse, tonic::Status>) {
    let mut client = client(addr, token).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Open(evmesh_tests::open(&[
            pattern,
        ]))),
    })
    .await
    .unwrap();
    match client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(response) => {
            let mut responses = response.into_inner();
            let first = match responses.message().await {
                Ok(Some(first)) => Ok(first),
                Ok(None) => Err(tonic::Status::unknown("ended")),
                Err(status) => Err(status),
            };
            ((tx, Some(responses)), first)
        }
        Err(status) => ((tx, None), Err(status)),
    }
}

/// A raw publish stream with `token`.
async fn publish_stream(
    addr: &str,
    token: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::PublishRequest>,
    tonic::Streaming<pb::PublishResponse>,
) {
    let mut client = client(addr, token).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let responses = client
        .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

fn event(ty: &str, id: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        event: Some(evmesh_tests::event_with_id(ty, id)),
    }
}

#[test]
fn sighup_narrows_what_open_streams_may_do_and_caps_hold_per_principal() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.toml");
    std::fs::write(&auth, auth_file("\"sec.>\"")).unwrap();
    let node = Served::start_with(
        &dir.path().join("data"),
        &["--auth", auth.to_str().unwrap(), "--allow-unregistered"],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // An open subscription of orders to sec.payment.>, as a CLI process.
    let mut subscriber = Command::new(BIN)
        .args([
            "subscribe",
            "sec.payment.>",
            "--server",
            &node.url(),
            "--token",
            ORDERS,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // An open publish stream of admin.
    let (tx, mut acks) = runtime.block_on(publish_stream(&node.addr, ADMIN));
    runtime.block_on(async {
        tx.send(event("sec.order.placed", "before")).await.unwrap();
        let first = acks.message().await.unwrap().unwrap();
        assert!(
            matches!(first.result, Some(pb::publish_response::Result::Ack(_))),
            "{first:?}"
        );
    });

    // Caps: capped may hold one subscription and one publish stream.
    runtime.block_on(async {
        let (_held, first) = subscription(&node.addr, CAPPED, "sec.>").await;
        assert!(first.is_ok(), "{first:?}");
        let (_refused, second) = subscription(&node.addr, CAPPED, "sec.>").await;
        let status = second.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("max_subscriptions"), "{status:?}");
        let (_tx1, _first) = publish_stream(&node.addr, CAPPED).await;
        let mut client = client(&node.addr, CAPPED).await;
        let (_tx2, rx2) = tokio::sync::mpsc::channel(1);
        let status = client
            .publish(tokio_stream::wrappers::ReceiverStream::new(rx2))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("max_publish_streams"),
            "{status:?}"
        );
    });
    // What a principal holds is given back when its streams end.
    runtime.block_on(evmesh_tests::eventually(
        "capped subscribes again",
        || async {
            let (_held, first) = subscription(&node.addr, CAPPED, "sec.>").await;
            first.ok()
        },
    ));

    // Narrow orders to sec.order.> and drop admin's token: SIGHUP.
    let narrowed = auth_file("\"sec.order.>\"").replace(&token_line(ADMIN), "tokens = []");
    std::fs::write(&auth, narrowed).unwrap();
    node.hangup();

    // The open subscription ends, PERMISSION_DENIED; the open publish stream ends,
    // UNAUTHENTICATED; new calls are refused.
    let status = wait(&mut subscriber, Duration::from_secs(10)).expect("the subscription ended");
    assert!(!status.success());
    let mut message = String::new();
    std::io::Read::read_to_string(subscriber.stderr.as_mut().unwrap(), &mut message).unwrap();
    assert!(
        message.contains("PermissionDenied") && message.contains("sec.payment.>"),
        "{message}"
    );
    runtime.block_on(async {
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match acks.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(status)) => return Some(status),
                    None => return None,
                }
            }
        })
        .await
        .expect("the publish stream ended");
        let status = ended.expect("ended with a status");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    });
    refused(
        &evmesh(&node, Some(ADMIN), &["groups", "list"]),
        &["Unauthenticated"],
    );
    assert!(!node.logged("auth file read again").is_empty());

    // A file that does not check is refused and the principals stay.
    std::fs::write(&auth, "[[principal]]\nname = 1\n").unwrap();
    node.hangup();
    runtime.block_on(evmesh_tests::eventually("the bad file logged", || async {
        (!node
            .logged("SIGHUP: the auth file is refused; the principals stay as they were")
            .is_empty())
        .then_some(())
    }));
    assert_ok(&evmesh(&node, Some(ORDERS), &["groups", "list"]));
    drop(tx);
}

fn wait(child: &mut std::process::Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

#[test]
fn mtls_identities_map_to_principals() {
    let pki = evmesh_testkit::Pki::new("evmesh test CA");
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        r#"
[[principal]]
name = "orders"
certificates = ["CN=orders"]
publish = ["sec.order.>"]
subscribe = ["sec.>"]

[[principal]]
name = "billing"
certificates = ["DNS:billing.svc"]
publish = ["sec.billing.>"]
"#,
    )
    .unwrap();
    let server = pki.server();
    let node = Served::start_with(
        &dir.path().join("data"),
        &[
            "--allow-unregistered",
            "--auth",
            auth.to_str().unwrap(),
            "--tls-cert",
            server.cert.to_str().unwrap(),
            "--tls-key",
            server.key.to_str().unwrap(),
            "--tls-client-ca",
            pki.ca_cert.to_str().unwrap(),
        ],
    );
    let https = format!("https://{}", node.addr);
    let payload = dir.path().join("payload.bin");
    std::fs::write(&payload, [10, 1, b'x']).unwrap();
    let as_client = |issued: &evmesh_testkit::Issued, ty: &str| {
        Command::new(BIN)
            .args([
                "publish",
                "--type",
                ty,
                "--message",
                "sec.v1.X",
                "--payload-file",
                payload.to_str().unwrap(),
                "--server",
                &https,
                "--ca",
                pki.ca_cert.to_str().unwrap(),
                "--cert",
                issued.cert.to_str().unwrap(),
                "--key",
                issued.key.to_str().unwrap(),
            ])
            .env_remove("EVMESH_TOKEN")
            .output()
            .unwrap()
    };
    let orders = pki.client("orders", &[]);
    let billing = pki.client("billing-7", &["billing.svc"]);
    let stranger = pki.client("stranger", &[]);
    assert_ok(&as_client(&orders, "sec.order.placed"));
    refused(
        &as_client(&orders, "sec.billing.sent"),
        &[
            "PermissionDenied",
            "principal \"orders\" may not publish sec.billing.sent",
        ],
    );
    assert_ok(&as_client(&billing, "sec.billing.sent"));
    refused(
        &as_client(&billing, "sec.order.placed"),
        &["PermissionDenied", "principal \"billing\""],
    );
    refused(
        &as_client(&stranger, "sec.order.placed"),
        &[
            "Unauthenticated",
            "no principal of the auth file has certificate CN=stranger",
        ],
    );
}

#[test]
fn auth_token_prints_a_token_and_the_line_that_holds_its_digest_and_check_reads_the_file() {
    let out = Command::new(BIN).args(["auth", "token"]).output().unwrap();
    assert_ok(&out);
    let text = stdout(&out);
    let mut lines = text.lines();
    let token = lines.next().unwrap();
    let secret = token.strip_prefix("evm_").expect("the evm_ prefix");
    // 256 random bits in unpadded base64url: 43 characters.
    assert_eq!(secret.len(), 43, "{token}");
    assert!(
        secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    let line = lines.find(|l| l.starts_with("tokens = ")).unwrap();
    assert_eq!(line, token_line(token));
    let again = Command::new(BIN).args(["auth", "token"]).output().unwrap();
    assert_ne!(stdout(&again).lines().next().unwrap(), token);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(&file, auth_file("\"sec.>\"")).unwrap();
    let out = Command::new(BIN)
        .args(["auth", "check", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(
        stdout(&out).contains("orders: 1 token(s)"),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains("sha256"));
    std::fs::write(
        &file,
        "[[principal]]\nname = \"a\"\ntokens = [\"evm_plain\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["auth", "check", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("auth.toml:1: principal \"a\": tokens[0] is not sha256:"),
        "{}",
        stderr(&out)
    );
    // serve refuses it the same way, in one line.
    let message = support::serve_refused(
        &dir.path().join("data"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "off",
            "--auth",
            file.to_str().unwrap(),
        ],
    );
    assert!(message.contains("tokens[0] is not sha256:"), "{message}");
    assert_eq!(message.trim().lines().count(), 1, "{message}");
}

/// A principal that floods the node with publishes and with streams it opens and
/// drops waits for its own rate and is refused beyond its caps, while another
/// principal's publishes are all answered. (How fast they are answered is a
/// bench figure: `evmesh-bench --scenarios fairness`.)
#[test]
fn a_flooding_principal_is_held_to_its_caps_while_another_publishes() {
    const RATE: u64 = 500;
    const FLOOD: &str = "evm_flood-test-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[[principal]]\nname = \"calm\"\n{}\npublish = [\"sec.calm.>\"]\n\n\
             [[principal]]\nname = \"flood\"\n{}\npublish = [\"sec.flood.>\"]\nsubscribe = [\"sec.>\"]\n\
             max_publish_streams = 2\nmax_subscriptions = 2\npublish_rate = {RATE}\n",
            token_line(ORDERS),
            token_line(FLOOD)
        ),
    )
    .unwrap();
    let node = Served::start_with(
        &dir.path().join("data"),
        &["--auth", auth.to_str().unwrap(), "--allow-unregistered"],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood_acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let began = std::time::Instant::now();
    let mut flooders = Vec::new();
    for task in 0..4 {
        let (stop, acked, refused, addr) = (
            stop.clone(),
            flood_acked.clone(),
            refused.clone(),
            node.addr.clone(),
        );
        flooders.push(runtime.spawn(async move {
            let mut client = client(&addr, FLOOD).await;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (tx, rx) = tokio::sync::mpsc::channel(256);
                let Ok(response) = client
                    .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                else {
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Opened and refused: open the next at once.
                    let _ = subscription(&addr, FLOOD, "sec.flood.>").await;
                    continue;
                };
                let mut acks = response.into_inner();
                let sender = tokio::spawn(async move {
                    loop {
                        n += 1;
                        let e = event("sec.flood.burst", &format!("f{task}-{n}"));
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                });
                while let Ok(Some(_)) = acks.message().await {
                    acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                }
                sender.abort();
                n += 1_000_000;
            }
        }));
    }
    // The calm principal: 300 publishes, one at a time, every one acked.
    runtime.block_on(async {
        let mut calm = client(&node.addr, ORDERS).await;
        for i in 0..300 {
            let ack = calm
                .publish_event(event("sec.calm.tick", &format!("calm-{i}")))
                .await
                .expect("the calm principal is answered")
                .into_inner();
            assert!(
                matches!(ack.result, Some(pb::publish_response::Result::Ack(_))),
                "{ack:?}"
            );
        }
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let elapsed = began.elapsed().as_secs_f64();
    for f in flooders {
        runtime.block_on(f).unwrap();
    }
    let flooded = flood_acked.load(std::sync::atomic::Ordering::Relaxed) as f64;
    // At most its rate over the run, one burst and one batch in flight per stream.
    let most = RATE as f64 * (elapsed + 1.0) + 2.0 * 1024.0;
    assert!(
        flooded <= most,
        "the flood got {flooded} acks in {elapsed:.1}s"
    );
    assert!(flooded > 0.0, "the flood published nothing");
    assert!(
        refused.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no stream was refused"
    );
}
