//! The HTTP API (axum): query, ingest, health, metrics and the dashboard page.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use sluice_core::Shutdown;
use sluice_ingest::http::{HttpIngest, IngestError};
use sluice_sinks::query::{Format, QueryEngine};

use crate::tokens::Tokens;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) ingest: HttpIngest,
    pub(crate) query: QueryEngine,
    pub(crate) metrics: PrometheusHandle,
    /// `[http] query_timeout` (`None`: no limit).
    pub(crate) query_timeout: Option<Duration>,
    /// Ends running queries at shutdown (the server waits for its requests).
    pub(crate) shutdown: Shutdown,
    /// `[http] query_concurrency` permits (`None`: no limit).
    pub(crate) queries: Option<Arc<tokio::sync::Semaphore>>,
    /// `[[http.tokens]]`: none, and the API is open.
    pub(crate) tokens: Arc<Tokens>,
}

/// Counts a query in `sluice_queries_running` while it lives: dropped when the query
/// ends, fails, times out, or its client goes away (the server drops the handler).
struct Running;

impl Running {
    fn start() -> Self {
        metrics::gauge!("sluice_queries_running").increment(1.0);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        metrics::gauge!("sluice_queries_running").decrement(1.0);
    }
}

pub(crate) fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/tables", get(tables))
        .route("/api/cluster", get(cluster))
        .route("/api/query", post(query))
        .route("/api/ingest/{stream}", post(ingest))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state)
}

/// The scope a request's path needs (`None`: open to all: `/health` and the page).
fn scope_of(path: &str) -> Option<String> {
    match path {
        "/health" | "/" => None,
        "/api/query" | "/api/tables" => Some("query".into()),
        _ => match path.strip_prefix("/api/ingest/") {
            Some(stream) => Some(format!("ingest:{stream}")),
            // /metrics, /api/cluster, and whatever comes.
            None => Some("admin".into()),
        },
    }
}

/// With tokens configured, lets a request through only with `Authorization: Bearer`
/// of a token that has the path's scope: 401 without a valid token, 403 with one
/// that lacks the scope.
async fn authorize(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if state.tokens.is_empty() {
        return next.run(request).await;
    }
    let Some(scope) = scope_of(request.uri().path()) else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = presented.and_then(|t| state.tokens.find(t)) else {
        metrics::counter!("sluice_http_refused_total", "status" => "401").increment(1);
        let mut refused = error(
            StatusCode::UNAUTHORIZED,
            "this endpoint wants an API token: Authorization: Bearer <token>",
        );
        refused.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return refused;
    };
    if !token.allows(&scope) {
        metrics::counter!("sluice_http_refused_total", "status" => "403").increment(1);
        return error(
            StatusCode::FORBIDDEN,
            format!("token {:?} lacks the scope {scope:?}", token.name),
        );
    }
    next.run(request).await
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn tables(State(state): State<AppState>) -> impl IntoResponse {
    match state.query.tables().await {
        Ok(tables) => (StatusCode::OK, axum::Json(json!({"tables": tables}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": format!("cannot list the lake's tables: {e}")})),
        ),
    }
}

/// The nodes of the cluster sharing this lake, as each last reported itself.
async fn cluster(State(state): State<AppState>) -> impl IntoResponse {
    match crate::cluster_view(state.query.location()).await {
        Ok(view) => (StatusCode::OK, axum::Json(view)),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": format!("cannot read the nodes' status: {e}")})),
        ),
    }
}

#[derive(Debug, Deserialize)]
struct QueryBody {
    sql: String,
}

#[derive(Debug, Deserialize)]
struct QueryParams {
    format: Option<String>,
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({"error": message.to_string()}))).into_response()
}

async fn query(
    State(state): State<AppState>,
    Query(params): Query<QueryParams>,
    body: Bytes,
) -> Response {
    let format = match params.format.as_deref() {
        None | Some("json") => Format::Json,
        Some("csv") => Format::Csv,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("format {other:?} is not json or csv"),
            );
        }
    };
    let request: QueryBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"sql\": \"...\"}}: {e}"),
            );
        }
    };
    let _permit = match &state.queries {
        Some(queries) => match queries.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                metrics::counter!("sluice_queries_refused_total").increment(1);
                let busy = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many queries running ([http] query_concurrency); retry shortly",
                );
                return retry_after(busy, Duration::from_secs(1));
            }
        },
        None => None,
    };
    let _running = Running::start();
    // Dropping the query future cancels it: DataFusion aborts the tasks it spawned.
    let run = state.query.query(&request.sql);
    let limited = async {
        match state.query_timeout {
            Some(limit) => tokio::time::timeout(limit, run).await.ok(),
            None => Some(run.await),
        }
    };
    let result = tokio::select! {
        r = limited => r,
        () = state.shutdown.wait() => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "the service is stopping; the query was cancelled");
        }
    };
    let Some(result) = result else {
        metrics::counter!("sluice_query_timeouts_total").increment(1);
        let limit = state.query_timeout.unwrap_or_default();
        return error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the query ran longer than [http] query_timeout ({limit:?}) and was cancelled"),
        );
    };
    match result.and_then(|r| r.render(format)) {
        Ok(bytes) => {
            let content_type = match format {
                Format::Csv => "text/csv",
                _ => "application/json",
            };
            ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
        }
        Err(e) if e.is_over_limit() => error(StatusCode::PAYLOAD_TOO_LARGE, e),
        Err(e) if e.is_user_error() => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn ingest(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    body: Bytes,
) -> Response {
    match state.ingest.ingest(&stream, body).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e @ IngestError::UnknownStream(_)) => error(StatusCode::NOT_FOUND, e),
        Err(e @ IngestError::Closed) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e @ IngestError::RateLimited(wait)) => {
            retry_after(error(StatusCode::TOO_MANY_REQUESTS, e), wait)
        }
        Err(e @ IngestError::Busy) => retry_after(
            error(StatusCode::SERVICE_UNAVAILABLE, e),
            sluice_ingest::http::QUEUE_WAIT,
        ),
        Err(e @ IngestError::OverBurst { .. }) => error(StatusCode::PAYLOAD_TOO_LARGE, e),
    }
}

/// `response` with a `Retry-After` of `wait`, in whole seconds (at least 1).
fn retry_after(mut response: Response, wait: Duration) -> Response {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    if let Ok(value) = header::HeaderValue::from_str(&seconds.max(1).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}
