//! TLS and mTLS on `evmesh serve`, through the CLI, the client crate and real
//! grpcurl: certificates from a test CA, every node stopped by its PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use evmesh_testkit::{Issued, Pki};

mod support;

use support::{BIN, Served, assert_ok, place_order};

fn tls_node(pki: &Pki, data: &std::path::Path, client_ca: bool) -> Served {
    let server = pki.server();
    let mut args = vec![
        "--allow-unregistered".to_owned(),
        "--tls-cert".into(),
        server.cert.display().to_string(),
        "--tls-key".into(),
        server.key.display().to_string(),
    ];
    if client_ca {
        args.push("--tls-client-ca".into());
        args.push(pki.ca_cert.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Served::start_with(data, &args)
}

/// `evmesh ARGS` against `server` with these TLS flags, nothing from the
/// environment.
fn evmesh(server: &str, tls: &[&str], args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--server", server])
        .args(tls)
        .env_remove("EVMESH_SERVER")
        .env_remove("EVMESH_CA")
        .env_remove("EVMESH_CERT")
        .env_remove("EVMESH_KEY")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `evmesh publish` of an opaque `tls.test` event with this id (the node runs
/// with --allow-unregistered).
fn publish(server: &str, tls: &[&str], id: &str) -> Output {
    let payload = std::env::temp_dir().join("evmesh-tls-test-payload");
    std::fs::write(&payload, [8, 1]).unwrap();
    let payload = payload.display().to_string();
    let args = [
        "publish",
        "--type",
        "tls.test",
        "--message",
        "tls.Test",
        "--payload-file",
        &payload,
        "--id",
        id,
    ];
    evmesh(server, tls, &args)
}

fn client_flags(issued: &Issued, ca: &str) -> Vec<String> {
    vec![
        "--ca".into(),
        ca.into(),
        "--cert".into(),
        issued.cert.display().to_string(),
        "--key".into(),
        issued.key.display().to_string(),
    ]
}

#[test]
fn a_tls_node_serves_the_cli_grpcurl_and_the_client_and_tells_a_plaintext_client_to_use_https() {
    let pki = Pki::new("evmesh test CA");
    let dir = tempfile::tempdir().unwrap();
    let node = tls_node(&pki, &dir.path().join("data"), false);
    let https = format!("https://{}", node.addr);
    let ca = pki.ca_cert.display().to_string();

    // The CLI, trusting the CA.
    let out = publish(&https, &["--ca", &ca], "tls-1");
    assert_ok(&out);
    let out = evmesh(
        &https,
        &["--ca", &ca],
        &["chain", "--output", "json", "tls-1"],
    );
    // The chain is keyed by correlation id, which is the event's id here.
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("tls-1"));

    // Real grpcurl over TLS.
    let grpcurl = evmesh_tests::require_tool("grpcurl");
    let out = Command::new(&grpcurl)
        .args(["-cacert", &ca, &node.addr, "grpc.health.v1.Health/Check"])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));

    // The client crate, with the CA in its credentials.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let credentials = evmesh_client::Credentials::default()
            .ca_file(&pki.ca_cert)
            .unwrap();
        let mesh = evmesh_client::Mesh::connect_with(
            &https,
            evmesh_client::ConnectOptions::default().credentials(credentials),
        )
        .await
        .unwrap();
        mesh.register::<evmesh_tests::shop::OrderPlaced>()
            .await
            .unwrap();
        let ack = place_order(&mesh, 1).await;
        assert!(ack.sequence > 0);
    });

    // A plaintext URL towards the TLS node: told to use https.
    let out = publish(&format!("http://{}", node.addr), &[], "tls-2");
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(
        message.contains("TLS only") && message.contains("https://"),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");

    // https without the CA: the system's roots do not know the test CA.
    let out = publish(&https, &[], "tls-3");
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(message.contains("certificate"), "{message}");
    assert!(message.contains("--ca"), "{message}");

    // A CA file given with a plaintext URL is a mistake, said at once.
    let out = publish(&format!("http://{}", node.addr), &["--ca", &ca], "tls-4");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("use https://"), "{}", stderr(&out));

    // None of the refused publishes was stored.
    for id in ["tls-2", "tls-3", "tls-4"] {
        let out = evmesh(&https, &["--ca", &ca], &["chain", "--output", "json", id]);
        assert!(stderr(&out).contains("no events"), "{}", stderr(&out));
    }
}

#[test]
fn an_mtls_node_refuses_clients_without_a_certificate_it_trusts() {
    let pki = Pki::new("evmesh test CA");
    let other = Pki::new("another CA");
    let dir = tempfile::tempdir().unwrap();
    let node = tls_node(&pki, &dir.path().join("data"), true);
    let https = format!("https://{}", node.addr);
    let ca = pki.ca_cert.display().to_string();

    // A certificate from the node's CA: served.
    let good = client_flags(&pki.client("orders", &["orders.svc"]), &ca);
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    assert_ok(&publish(&https, &good, "m-1"));

    // No certificate, one from another CA, an expired one: refused, nothing stored.
    let unsigned = client_flags(&other.client("orders", &[]), &ca);
    let expired = client_flags(&pki.expired_client("orders"), &ca);
    for (what, flags) in [
        ("no certificate", vec!["--ca".to_owned(), ca.clone()]),
        ("another CA's certificate", unsigned),
        ("an expired certificate", expired),
    ] {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let out = publish(&https, &flags, &format!("refused-{}", what.len()));
        assert!(!out.status.success(), "{what}: served");
        let message = stderr(&out);
        assert_eq!(message.lines().count(), 1, "{what}: {message}");
        assert!(message.contains("--cert and --key"), "{what}: {message}");
    }
    let out = evmesh(&https, &good, &["chain", "--output", "json", "refused-14"]);
    assert!(stderr(&out).contains("no events"), "{}", stderr(&out));

    // grpcurl with the client certificate.
    let grpcurl = evmesh_tests::require_tool("grpcurl");
    let client = pki.client("grpcurl", &[]);
    let out = Command::new(&grpcurl)
        .args([
            "-cacert",
            &ca,
            "-cert",
            &client.cert.display().to_string(),
            "-key",
            &client.key.display().to_string(),
            &node.addr,
            "grpc.health.v1.Health/Check",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let out = Command::new(&grpcurl)
        .args(["-cacert", &ca, &node.addr, "grpc.health.v1.Health/Check"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "grpcurl without a certificate served"
    );
}

#[test]
fn serve_refuses_tls_files_it_cannot_use_in_one_line() {
    let pki = Pki::new("evmesh test CA");
    let dir = tempfile::tempdir().unwrap();
    let server = pki.server();
    let missing = dir.path().join("missing.pem");
    let (cert, key) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
    );
    let ca = pki.ca_cert.display().to_string();
    let data = dir.path().join("data");
    for (args, expected) in [
        (
            vec!["--tls-cert", missing.to_str().unwrap(), "--tls-key", &key],
            "missing.pem",
        ),
        (
            vec!["--tls-cert", &key, "--tls-key", &key],
            "no PEM certificate",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &cert],
            "no PEM private key",
        ),
        (vec!["--tls-cert", &cert], "--tls-key"),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &key,
            ],
            "--tls-client-ca",
        ),
        (vec!["--tls-client-ca", &ca], "--tls-cert"),
    ] {
        let mut all = vec!["--listen", "127.0.0.1:0", "--http-listen", "off"];
        all.extend(args.iter().copied());
        let message = support::serve_refused(&data, &all);
        assert!(message.contains(expected), "{args:?}: {message}");
        assert_eq!(message.trim().lines().count(), 1, "{args:?}: {message}");
    }
}
