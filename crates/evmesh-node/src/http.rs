//! The node's HTTP listener (`evmesh serve --http-listen`): `/metrics` (OpenMetrics
//! text), `/healthz` (the process is up), `/readyz` (the node accepts
//! publishes: its store can take them and it is not stopping), and the web console
//! ([`crate::console`]) at `/`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use evmesh_store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

struct Shared<S> {
    store: S,
    metrics: Arc<Metrics>,
    down: watch::Receiver<bool>,
}

/// Serves the HTTP routes on `listener` until the node goes down.
pub(crate) async fn serve<S: Store>(
    listener: TcpListener,
    store: S,
    metrics: Arc<Metrics>,
    down: watch::Receiver<bool>,
    console: Option<Arc<crate::gateway::Gateway>>,
) {
    let mut stopping = down.clone();
    let shared = Arc::new(Shared {
        store,
        metrics,
        down,
    });
    let app = axum::Router::new()
        .route("/metrics", get(scrape::<S>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready::<S>))
        .with_state(shared);
    let app = match console {
        Some(gateway) => app.merge(crate::console::router(gateway)),
        None => app,
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stopping.wait_for(|&d| d).await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the HTTP listener failed");
    }
}

async fn scrape<S: Store>(State(shared): State<Arc<Shared<S>>>) -> impl IntoResponse {
    shared.metrics.refresh(&shared.store).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
}

async fn ready<S: Store>(State(shared): State<Arc<Shared<S>>>) -> impl IntoResponse {
    if *shared.down.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n");
    }
    if !*shared.store.serving().borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the store cannot take publishes (its connection is lost)\n",
        );
    }
    (StatusCode::OK, "ready\n")
}
