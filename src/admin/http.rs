//! The admin HTTP endpoint (axum): `/health`, `/status`, `/clusters/<name>/primary` and
//! `/replica` (Patroni-style 200/503 for external load balancers), `/metrics`, and the
//! live status page at `/`.

use std::sync::Arc;

use axum::extract::Query;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::cluster::routing::{self, Endpoint};
use crate::frontend::shared::Shared;

const PAGE: &str = include_str!("status.html");

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/clusters/{name}/primary", get(primary))
        .route("/clusters/{name}/replica", get(replica))
        .route("/clusters/{name}/switchover", post(switchover))
        .with_state(shared.clone());
    let mut shutdown = shared.shutdown.clone();
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
}

/// 200 while the proxy serves; 503 once it is shutting down.
async fn health(State(shared): State<Arc<Shared>>) -> Response {
    if *shared.shutdown.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    Json(crate::admin::status::build(&shared)).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let body = shared
        .metrics
        .render(&shared.cluster_snapshots(), &crate::admin::pool_rows(&shared));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct SwitchoverTo {
    to: String,
}

/// `POST /clusters/<name>/switchover?to=<node>`: 200 with the steps, 409 with the step
/// that failed.
async fn switchover(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(q): Query<SwitchoverTo>,
) -> Response {
    match crate::ha::switchover::switchover(&shared, &name, &q.to).await {
        Ok(r) => (StatusCode::OK, Json(r)).into_response(),
        Err(e) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"cluster": name, "step": e.step, "error": e.to_string()})),
        )
            .into_response(),
    }
}

async fn primary(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    role_check(&shared, &name, Endpoint::ReadWrite)
}

async fn replica(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    role_check(&shared, &name, Endpoint::ReadOnly)
}

/// 200 with the node a new session would get, 503 with the reason when there is none.
fn role_check(shared: &Shared, cluster: &str, endpoint: Endpoint) -> Response {
    let Some(ctx) = shared.clusters.get(cluster) else {
        return (StatusCode::NOT_FOUND, format!("no cluster named \"{cluster}\"\n")).into_response();
    };
    let snap = ctx.state.snapshot();
    match routing::route(endpoint, &snap, 0) {
        Ok(candidates) => {
            let n = &snap.nodes[candidates[0]];
            let body =
                serde_json::json!({"cluster": cluster, "node": n.name, "addr": n.addr, "role": n.role.to_string()});
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"cluster": cluster, "error": e.to_string()})),
        )
            .into_response(),
    }
}
