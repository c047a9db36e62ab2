//! `evmesh-bench --quick` runs every scenario end to end. It proves the harness
//! works; it asserts no speed.

#[test]
fn quick_run_prints_every_scenario_and_writes_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("figures.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_evmesh-bench"))
        .args(["--quick", "--json"])
        .arg(&json)
        .output()
        .expect("run evmesh-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for scenario in [
        "evmesh durable publish, 1 stream(s)",
        "evmesh durable publish, 16 stream(s)",
        "ceiling: bare tonic echo, 4 stream(s)",
        "JetStream async publish, 16 conn(s)",
        "publish-to-delivery at",
        "fan-out to 100",
        "consumer with inbox and outbox",
        "stalled subscriber",
        "start-up to SERVING, 10000 events",
        "schema check, 200 messages",
        "schema versions of",
        "abuse, a client at",
    ] {
        assert!(
            stdout.contains(scenario),
            "{scenario} missing from\n{stdout}"
        );
    }
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid json");
    let rows = figures.as_array().expect("an array of rows");
    assert_eq!(rows.len(), 22);
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
        assert!(
            row["figures"]["vs JetStream"]
                .as_f64()
                .is_some_and(|r| r > 0.0),
            "{row}"
        );
    }
    assert!(
        rows.iter()
            .all(|r| r["figures"].as_object().is_some_and(|f| !f.is_empty()))
    );
}
