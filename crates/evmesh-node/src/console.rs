//! The web console: its pages and assets, embedded in the binary and served on the
//! HTTP listener at `/`, and the JSON API they call ([`crate::gateway`]).
//!
//! Every page is the same document; the script reads the address and draws the page
//! it names, so that each page has a URL of its own that can be shared.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::gateway::{self, Gateway};

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/app.js");
const STYLE: &str = include_str!("../console/app.css");
const ICON: &str = include_str!("../console/icon.svg");

/// The page loads nothing but the node's own assets and API.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's routes: the pages, their assets and the JSON API.
pub(crate) fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/api/evmesh.v1.Mesh/Subscribe", post(gateway::tail))
        .route("/api/{service}/{method}", post(gateway::unary))
        .route("/", get(page))
        .route("/schemas", get(page))
        .route("/schemas/{*rest}", get(page))
        .route("/tail", get(page))
        .route("/groups", get(page))
        .route("/groups/{*rest}", get(page))
        .route("/chains/{*rest}", get(page))
        .route("/nodes", get(page))
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/console/icon.svg",
            get(|| async { asset("image/svg+xml", ICON) }),
        )
        .layer(DefaultBodyLimit::max(gateway::MAX_REQUEST_BYTES))
        .with_state(gateway)
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Assets change with the binary; a browser asks again rather than keep a stale one.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}
