//! `evmesh-bench --quick` runs every scenario end to end. It proves the harness
//! works; it asserts no speed.
#![allow(clippy::expect_used)]

/// Runs the bench with `args`, writing JSON to a temporary file; returns what it
/// printed and its rows, after asserting it succeeded.
fn run(args: &[&str]) -> (String, Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("figures.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_evmesh-bench"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run evmesh-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid json");
    let rows = figures.as_array().expect("an array of rows").clone();
    (stdout, rows)
}

#[test]
fn quick_run_prints_every_scenario_and_writes_json() {
    let (stdout, rows) = run(&["--quick"]);
    for scenario in [
        "evmesh durable publish, 1 stream(s)",
        "evmesh durable publish, 16 stream(s)",
        "ceiling: bare tonic echo, 4 stream(s)",
        "JetStream async publish, 16 conn(s)",
        "JetStream async publish with a msg id each, 4 conn(s)",
        "JetStream async publish as evmesh publishes",
        "JetStream publish-to-delivery at",
        "publish-to-delivery at",
        "fan-out to 100",
        "consumer with inbox and outbox",
        "stalled subscriber",
        "start-up to SERVING, 10000 events",
        "schema check, 200 messages",
        "schema versions of",
        "abuse, a client at",
        "fairness, a publisher at",
        "durable publish, 16 stream(s), metrics on and off",
        "while retention deletes",
    ] {
        assert!(
            stdout.contains(scenario),
            "{scenario} missing from\n{stdout}"
        );
    }
    assert_eq!(rows.len(), 33);
    // Each validated publish row is set beside both references.
    let publish: Vec<_> = rows
        .iter()
        .filter(|r| {
            r["scenario"].as_str().is_some_and(|s| {
                s.starts_with("evmesh durable publish") && !s.contains("no validation")
            })
        })
        .collect();
    assert_eq!(publish.len(), 3);
    for row in publish {
        assert!(
            row["figures"]["vs ceiling"]
                .as_f64()
                .is_some_and(|r| r > 0.0),
            "{row}"
        );
        for reference in ["vs JetStream", "vs JetStream as evmesh"] {
            assert!(
                row["figures"][reference].as_f64().is_some_and(|r| r > 0.0),
                "{reference} missing from {row}"
            );
        }
    }
    assert!(
        rows.iter()
            .all(|r| r["figures"].as_object().is_some_and(|f| !f.is_empty()))
    );
}

/// The scenarios that run on the JetStream backend, on a nats-server of the run's
/// own with `sync_interval: always`, each evmesh row beside JetStream driven
/// directly on the same settings.
#[test]
fn quick_run_on_the_jetstream_backend() {
    let (stdout, rows) = run(&[
        "--quick",
        "--backend",
        "jetstream",
        "--nats-sync",
        "always",
        "--scenarios",
        "publish,jetstream,latency,fanout,stall,mesh",
    ]);
    let on_node: Vec<_> = rows
        .iter()
        .filter(|r| {
            r["scenario"]
                .as_str()
                .is_some_and(|s| s.ends_with("[JetStream backend, R1, sync always]"))
        })
        .collect();
    // Four publish rows, three latency, two fan-out, one stalled subscriber; and
    // through nodes of one mesh, three publish rows, three latency and a group's move.
    assert_eq!(on_node.len(), 17, "{stdout}");
    for nodes in ["1 node", "2 nodes", "3 nodes"] {
        for prefix in [
            "mesh: durable publish through",
            "mesh: publish-to-delivery at",
        ] {
            assert!(
                on_node
                    .iter()
                    .any(|r| r["scenario"].as_str().is_some_and(
                        |s| s.starts_with(prefix) && s.contains(&format!("through {nodes}"))
                    )),
                "{prefix} {nodes} missing from {stdout}"
            );
        }
    }
    let moved = on_node
        .iter()
        .find_map(|r| r["figures"]["moved in s"].as_f64())
        .expect("the group's move measured");
    assert!(moved > 0.0, "{stdout}");
    let beside = |figure: &str, prefix: &str| {
        on_node
            .iter()
            .filter(|r| {
                r["scenario"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(prefix))
            })
            .filter(|r| r["figures"][figure].as_f64().is_some_and(|v| v > 0.0))
            .count()
    };
    assert_eq!(
        beside("vs JetStream", "evmesh durable publish"),
        3,
        "{stdout}"
    );
    assert_eq!(
        beside("p99 vs JetStream", "publish-to-delivery"),
        1,
        "{stdout}"
    );

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_evmesh-bench"))
        .args([
            "--quick",
            "--backend",
            "jetstream",
            "--scenarios",
            "startup",
        ])
        .output()
        .expect("run evmesh-bench");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("measures the embedded log only"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// The processes whose parent is `parent` and whose name is `name`.
fn children(parent: u32, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; the name may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        if &stat[open + 1..close] == name && ppid == Some(parent.to_string().as_str()) {
            found.push(pid);
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn signal(pid: u32, name: &str) {
    let _ = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status();
}

/// A run stopped with SIGTERM (or Ctrl-C) stops the nats-servers it started
/// instead of leaving them running.
#[test]
fn an_interrupted_run_stops_its_nats_servers() {
    let mut bench = std::process::Command::new(env!("CARGO_BIN_EXE_evmesh-bench"))
        .args([
            "--backend",
            "jetstream",
            "--scenarios",
            "publish",
            "--events",
            "100000000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run evmesh-bench");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let servers = loop {
        let servers = children(bench.id(), "nats-server");
        if !servers.is_empty() {
            break servers;
        }
        if std::time::Instant::now() > deadline
            || bench.try_wait().expect("poll the bench").is_some()
        {
            signal(bench.id(), "KILL");
            panic!("the bench started no nats-server");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    signal(bench.id(), "TERM");
    let out = bench.wait_with_output().expect("the bench ends");
    let left: Vec<_> = servers.iter().copied().filter(|&pid| alive(pid)).collect();
    for &pid in &left {
        signal(pid, "KILL");
    }
    assert!(left.is_empty(), "nats-servers left running: {left:?}");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interrupted by SIGTERM"), "{stderr}");
}
