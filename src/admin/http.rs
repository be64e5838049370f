//! The admin HTTP endpoint (axum): `/health`, `/status`, `/clusters/<name>/primary`,
//! `/replica` and `/read-only` (Patroni-style 200/503 for external load balancers),
//! `POST /clusters/<name>/switchover`, `/metrics`, and the live status page at `/`.

use std::sync::Arc;

use axum::extract::Query;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::cluster::routing::{self, Endpoint};
use crate::cluster::topology::Role;
use crate::proxy::shared::Shared;

const PAGE: &str = include_str!("status.html");

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    // What shows or changes the cluster needs the token when `admin.token` is set; the
    // page itself (no data in it), `/health` and the role checks load balancers poll
    // do not.
    let protected = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/queries", get(queries))
        .route("/clusters/{name}/switchover", post(switchover))
        .route("/upgrade", post(upgrade))
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), require_token));
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/clusters/{name}/primary", get(primary))
        .route("/clusters/{name}/replica", get(replica))
        .route("/clusters/{name}/read-only", get(read_only))
        .merge(protected)
        .with_state(shared.clone());
    // Ends with the process, when a successor took the listener (it has its copy), or
    // when a reload moved or removed it (`stop`; requests in flight finish).
    let mut leaving = shared.leaving.clone();
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = leaving.wait_for(|l| *l) => {}
                _ = stop.changed() => {}
            }
        })
        .await;
}

/// `POST /upgrade`: start the binary now at this executable's path and hand over to it
/// (as SIGUSR2). 200 with the new pid once it serves; 500 with the reason otherwise
/// (this process then serves on).
async fn upgrade(State(shared): State<Arc<Shared>>) -> (StatusCode, Json<serde_json::Value>) {
    match shared.upgrade().await {
        Ok(pid) => (
            StatusCode::OK,
            Json(serde_json::json!({ "upgraded": true, "pid": pid })),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "upgraded": false, "error": e })),
        ),
    }
}

/// With `admin.token` set: `Authorization: Bearer <token>` or 401.
async fn require_token(
    State(shared): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = shared.config().admin.token.as_deref() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "this endpoint needs the admin token: Authorization: Bearer <admin.token>\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
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

/// OpenMetrics for a scraper that asks for it (Prometheus does), else the Prometheus
/// text format 0.0.4 (curl, `promtool check metrics`, older scrapers).
async fn metrics(State(shared): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    shared.metrics.set_digests(shared.digests.counts());
    shared.metrics.set_query_places(shared.digests.place_rows());
    if let Some(t) = shared.digests.tracer.get() {
        shared.metrics.set_traces(&t.counts);
    }
    let body = shared
        .metrics
        .render(&shared.cluster_snapshots(), &crate::admin::pool_rows(&shared));
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            crate::obs::metrics::prometheus_text(&body),
        )
            .into_response()
    }
}

/// `GET /queries?cluster=NAME&order=total_time&limit=N&by=node|query`: the query
/// digests as a JSON array (`obs::digest::Row`), 400 naming a wrong parameter.
async fn queries(State(shared): State<Arc<Shared>>, Query(ask): Query<crate::admin::QueriesAsk>) -> Response {
    match crate::admin::query_rows(&shared, &ask) {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
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

/// Patroni's meaning: 200 only when a healthy standby within lag can serve reads.
async fn replica(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    role_check(&shared, &name, Endpoint::ReadOnly, true)
}

/// 200 when the ro endpoint can serve, also by falling back to the primary.
async fn read_only(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    role_check(&shared, &name, Endpoint::ReadOnly, false)
}

async fn primary(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    role_check(&shared, &name, Endpoint::ReadWrite, false)
}

/// 200 with the node a new session would get (`standby_only`: the first standby among
/// them), 503 with the reason when there is none.
fn role_check(shared: &Shared, cluster: &str, endpoint: Endpoint, standby_only: bool) -> Response {
    let Some(ctx) = shared.cluster(cluster) else {
        return (StatusCode::NOT_FOUND, format!("no cluster named \"{cluster}\"\n")).into_response();
    };
    let snap = ctx.state.snapshot();
    let chosen = routing::route(endpoint, &snap, 0).map_err(|e| e.to_string()).and_then(|candidates| {
        candidates
            .iter()
            .copied()
            .find(|&i| !standby_only || snap.nodes[i].role == Role::Standby)
            .ok_or_else(|| {
                format!("no standby of cluster \"{cluster}\" can serve reads (reads fall back to the primary); node states: {}", snap.describe_nodes())
            })
    });
    match chosen {
        Ok(i) => {
            let n = &snap.nodes[i];
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
