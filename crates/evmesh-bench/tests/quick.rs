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
        "durable publish, 1 stream(s)",
        "durable publish, 16 stream(s)",
        "publish-to-delivery at",
    ] {
        assert!(
            stdout.contains(scenario),
            "{scenario} missing from\n{stdout}"
        );
    }
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid json");
    let rows = figures.as_array().expect("an array of rows");
    assert_eq!(rows.len(), 11);
    assert!(
        rows.iter()
            .all(|r| r["figures"].as_object().is_some_and(|f| !f.is_empty()))
    );
}
