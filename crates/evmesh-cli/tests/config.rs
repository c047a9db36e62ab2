//! `evmesh serve --config FILE`: keys checked with their lines, flags over the
//! environment over the file over the defaults, `--print-config` with sources and
//! secrets redacted, and SIGHUP applying a new log level and retention to a running
//! node. Every process is stopped by its PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use support::{BIN, Served, get, sample};

fn evmesh(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("EVMESH_LISTEN")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_names_the_key_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let good = file(
        "good.toml",
        "# a node\nlisten = \"127.0.0.1:6000\"\nmax-connections = 10\nallow-unregistered = true\nnats = [\"nats://a:4222\", \"nats://b:4222\"]\nretention-max-age = \"7d\"\n",
    );
    let (ok, out, err) = evmesh(&["config", "check", &good], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("5 setting(s), valid"), "{out}");
    for (name, text, says) in [
        (
            "unknown.toml",
            "listen = \"127.0.0.1:1\"\n\nlisen = 1\n",
            ":3: unknown key \"lisen\"",
        ),
        (
            "value.toml",
            "data = \"d\"\nmax-payload-bytes = \"lots\"\n",
            ":2: max-payload-bytes: invalid value 'lots'",
        ),
        (
            "zero.toml",
            "max-connections = 0\n",
            ":1: max-connections: --max-connections must be at least 1",
        ),
        (
            "flag.toml",
            "allow-unregistered = \"yes\"\n",
            ":1: allow-unregistered is true or false",
        ),
        ("syntax.toml", "listen = \n", ":1: "),
        ("needs.toml", "nats-replicas = 3\n", "--nats"),
        (
            "size.toml",
            "\nretention-max-bytes = \"12\"\n",
            ":2: retention-max-bytes: invalid value '12'",
        ),
    ] {
        let path = file(name, text);
        let (ok, _, err) = evmesh(&["config", "check", &path], &[]);
        assert!(!ok, "{name} passed");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(name) && err.contains(says), "{name}: {err}");
        // serve refuses it the same way, before it starts anything.
        let (ok, _, served) = evmesh(
            &["serve", "--config", &path],
            &[("EVMESH_DATA", dir.path().join("d").to_str().unwrap())],
        );
        assert!(!ok);
        assert!(served.contains(says), "{name}: {served}");
    }
}

#[test]
fn flags_win_over_the_environment_over_the_file_over_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:6001\"\ndata = \"from-file\"\nmax-connections = 10\nnats = [\"nats://a:4222\"]\nnats-token = \"s3cret-token\"\nretention-max-events = 5000\n",
    )
    .unwrap();
    let (ok, out, err) = evmesh(
        &[
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--print-config",
            "--max-connections",
            "20",
        ],
        &[("EVMESH_DATA", "from-env")],
    );
    assert!(ok, "{err}");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} ")))
            .unwrap_or_else(|| panic!("{key} missing from\n{out}"))
            .to_owned()
    };
    let at = |n: usize| format!("# {}:{n}", path.display());
    assert!(
        line("max-connections").starts_with("max-connections = \"20\"")
            && line("max-connections").ends_with("# flag")
    );
    assert!(
        line("data").starts_with("data = \"from-env\"")
            && line("data").ends_with("# env EVMESH_DATA")
    );
    assert!(
        line("listen").starts_with("listen = \"127.0.0.1:6001\"")
            && line("listen").ends_with(&at(1))
    );
    assert!(line("retention-max-events").ends_with(&at(6)));
    assert!(line("max-payload-bytes").ends_with("# default"));
    assert!(line("nats-token").starts_with("nats-token = \"<redacted>\""));
    assert!(!out.contains("s3cret"), "{out}");
    // What it prints is a config file that checks.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out).unwrap();
    let (ok, _, err) = evmesh(&["config", "check", printed.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
}

#[test]
fn sighup_applies_a_new_log_level_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, "allow-unregistered = true\nlog-level = \"info\"\n").unwrap();
    let node = Served::start_with(
        &dir.path().join("data"),
        &["--config", path.to_str().unwrap()],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let acks = runtime.block_on(async {
        let mut client = evmesh_tests::v1::mesh_client::MeshClient::connect(node.url())
            .await
            .unwrap();
        let events = (0..300)
            .map(|i| evmesh_tests::event_with_id("cfg.test", &format!("c-{i}")))
            .collect();
        evmesh_tests::publish_stream(&mut client, events).await
    });
    let head = evmesh_tests::ack_of(acks.last().unwrap()).sequence;
    let hup = || node.hangup();
    let wait_for = |message: &str, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = node.logged(message);
            if lines.len() >= n {
                return lines;
            }
            assert!(Instant::now() < deadline, "no {message:?} in the log");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // A bad file is refused; the node keeps its settings and serves on.
    std::fs::write(
        &path,
        "allow-unregistered = true\nlog-level = \"info\"\nmax-connections = 0\n",
    )
    .unwrap();
    hup();
    let refused = wait_for(
        "SIGHUP: the config file is refused; the node keeps its settings",
        1,
    );
    assert!(
        refused[0]["fields"]["error"]
            .as_str()
            .unwrap()
            .contains(":3: max-connections"),
        "{refused:?}"
    );

    std::fs::write(
        &path,
        "allow-unregistered = true\nlog-level = \"debug\"\nretention-max-events = 100\nmax-connections = 7\nmax-payload-bytes = 2048\n",
    )
    .unwrap();
    hup();
    let read = wait_for("configuration read again", 1);
    let changed = read[0]["fields"]["changed"].as_str().unwrap().to_owned();
    assert!(
        changed.contains("log-level") && changed.contains("retention-max-events"),
        "{read:?}"
    );
    assert!(changed.contains("max-connections"), "{read:?}");
    assert!(
        read[0]["fields"]["needs_restart"]
            .as_str()
            .unwrap()
            .contains("max-payload-bytes"),
        "{read:?}"
    );
    // Retention now holds the log to 100 events, and says so at debug level.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sample(&get(&node.http, "/metrics").2, "evmesh_log_first_sequence")
        != Some((head - 99) as f64)
    {
        assert!(Instant::now() < deadline, "retention did not apply");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for("retention", 1);
    // The new connection cap holds: with 7 open, an 8th is closed.
    let held: Vec<std::net::TcpStream> = (0..7)
        .map(|_| std::net::TcpStream::connect(&node.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!node.run(&["health"]).status.success());
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.run(&["health"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the node did not take connections again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(node.terminate().success());
}
