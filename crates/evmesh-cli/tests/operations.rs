//! The node's HTTP listener: `/healthz`, `/readyz` and `/metrics` (OpenMetrics),
//! checked against known publishes, rejections, a group's deliveries and acks;
//! and the same figures scraped by a real Prometheus and read back through its
//! query API. Every process is stopped by its PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use evmesh_tests::{Sub, event_with_id, open, publish, v1 as pb};

mod support;

use support::{Served, get, sample};

/// Five events stored, one repeated, one refused; a member of group `ops` that got
/// all five and acked one.
fn load(node: &Served, runtime: &tokio::runtime::Runtime) -> Sub {
    runtime.block_on(async {
        let mut client = pb::mesh_client::MeshClient::connect(node.url())
            .await
            .unwrap();
        let mut sub = Sub::open(
            &mut client,
            pb::SubscribeOpen {
                group: "ops".into(),
                ..open(&["ops.>"])
            },
        )
        .await
        .unwrap();
        for i in 0..5 {
            publish(&mut client, event_with_id("ops.test", &format!("o-{i}"))).await;
        }
        let again = publish(&mut client, event_with_id("ops.test", "o-0")).await;
        assert!(again.duplicate);
        let refused = client
            .publish_event(pb::PublishRequest {
                event: Some(event_with_id("Not A Type", "bad")),
            })
            .await;
        assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
        let first = sub.next().await;
        let _second = sub.next().await;
        sub.ack(&[first.sequence]).await;
        sub
    })
}

#[test]
fn the_http_listener_serves_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let node = Served::start(dir.path());
    let (status, _, body) = get(&node.http, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = get(&node.http, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _member = load(&node, &runtime);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (status, head, metrics) = get(&node.http, "/metrics");
        assert_eq!(status, 200);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        // The member holds all five (its credit is 256) and acked one; the ack
        // reaches the group a moment after it is sent.
        if sample(&metrics, r#"evmesh_group_pending{group="ops"}"#) == Some(4.0) {
            break metrics;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for (series, expected) in [
        (
            r#"evmesh_publish_events_total{type="ops.test",result="stored"}"#,
            5.0,
        ),
        (
            r#"evmesh_publish_events_total{type="ops.test",result="duplicate"}"#,
            1.0,
        ),
        (
            r#"evmesh_publish_events_total{type="",result="rejected"}"#,
            1.0,
        ),
        (
            r#"evmesh_publish_rejections_total{code="INVALID_ARGUMENT"}"#,
            1.0,
        ),
        ("evmesh_publish_duration_seconds_count", 6.0),
        (r#"evmesh_group_lag{group="ops"}"#, 4.0),
        (r#"evmesh_group_members{group="ops"}"#, 1.0),
        (r#"evmesh_group_dead_letters{group="ops"}"#, 0.0),
        ("evmesh_subscriptions", 1.0),
        ("evmesh_log_head_sequence", 5.0),
        ("evmesh_log_first_sequence", 1.0),
        (r#"evmesh_deliveries_total{group="ops"}"#, 5.0),
        (r#"evmesh_redeliveries_total{group="ops"}"#, 0.0),
        (r#"evmesh_acks_total{group="ops"}"#, 1.0),
        (r#"evmesh_nacks_total{group="ops"}"#, 0.0),
        (r#"evmesh_dead_letters_total{group="ops"}"#, 0.0),
    ] {
        assert_eq!(
            sample(&metrics, series),
            Some(expected),
            "{series} in\n{metrics}"
        );
    }
    assert!(
        sample(
            &metrics,
            r#"evmesh_group_oldest_unacked_age_seconds{group="ops"}"#
        )
        .is_some_and(|age| age > 0.0 && age < 60.0),
        "{metrics}"
    );
    for series in [
        "evmesh_log_bytes",
        "evmesh_connections",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        assert!(
            sample(&metrics, series).is_some_and(|v| v > 0.0),
            "{series} in\n{metrics}"
        );
    }
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
}

#[test]
fn the_http_listener_can_be_off_and_refuses_a_bad_address() {
    let dir = tempfile::tempdir().unwrap();
    let node = Served::start_with(dir.path(), &["--http-listen", "off"]);
    assert_eq!(node.http, "off");
    drop(node);
    let stderr = support::serve_refused(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--http-listen", "nope"],
    );
    assert!(
        stderr.contains("--http-listen") && stderr.contains("nope"),
        "{stderr}"
    );
    // A port taken: one line that names it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let stderr = support::serve_refused(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--http-listen", &addr],
    );
    assert!(
        stderr.contains(&format!("cannot listen for HTTP on {addr}")),
        "{stderr}"
    );
}

/// A query's value through Prometheus's HTTP API, once it has one.
fn query(prometheus: &str, expr: &str) -> Option<f64> {
    let encoded: String = expr
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, _, body) = get(prometheus, &format!("/api/v1/query?query={encoded}"));
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// A real Prometheus (Debian's, started here on loopback) scrapes the node every
/// second; what it reads back through its query API is what the node did.
#[test]
fn prometheus_scrapes_the_node() {
    let binary = evmesh_tests::require_tool("prometheus");
    let dir = tempfile::tempdir().unwrap();
    let node = Served::start(&dir.path().join("node"));
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: evmesh\n    static_configs:\n      - targets: ['{}']\n",
            node.http
        ),
    )
    .unwrap();
    let port = support::free_port();
    let web = format!("127.0.0.1:{port}");
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // Stopped by its PID when the test ends, however it ends.
    let mut prometheus = Stop(
        std::process::Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _member = load(&node, &runtime);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (expr, expected) in [
        (r#"evmesh_group_pending{group="ops"}"#, 4.0),
        (r#"evmesh_group_lag{group="ops"}"#, 4.0),
        (
            r#"evmesh_publish_events_total{type="ops.test",result="stored"}"#,
            5.0,
        ),
        (
            r#"evmesh_publish_rejections_total{code="INVALID_ARGUMENT"}"#,
            1.0,
        ),
        ("evmesh_log_head_sequence", 5.0),
    ] {
        loop {
            if let Some(status) = prometheus.0.try_wait().unwrap() {
                panic!("prometheus exited with {status}");
            }
            let value = std::net::TcpStream::connect(&web)
                .ok()
                .and_then(|_| query(&web, expr));
            if value == Some(expected) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Prometheus reads {expr} as {value:?}, not {expected}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    drop(prometheus);
}

/// The alert rules OPERATIONS.md gives: `promtool check rules` accepts them, and
/// every evmesh metric they name is one a node serves.
#[test]
fn the_alert_rules_check_and_name_served_metrics() {
    let promtool = evmesh_tests::require_tool("promtool");
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ops/evmesh-alerts.yml");
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    support::assert_ok(&out);
    let text = std::fs::read_to_string(&rules).unwrap();
    let named: std::collections::BTreeSet<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("evmesh_"))
        .collect();
    assert!(named.len() >= 4, "{named:?}");
    let dir = tempfile::tempdir().unwrap();
    let node = Served::start(dir.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _member = load(&node, &runtime);
    let (_, _, metrics) = get(&node.http, "/metrics");
    for name in named {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "{name} is named by the alert rules but not served:\n{metrics}"
        );
    }
}
