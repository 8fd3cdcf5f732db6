//! The HTTP API (axum): query, ingest, health, metrics, and the console's page and data.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use sluice_core::Shutdown;
use sluice_ingest::http::{HttpIngest, IngestError, IngestReport};
use sluice_sinks::query::{Format, QueryEngine};

use crate::tokens::Tokens;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) ingest: HttpIngest,
    pub(crate) query: QueryEngine,
    /// Where queries run (below ingest's priority).
    pub(crate) query_runtime: Arc<crate::queries::QueryRuntime>,
    pub(crate) metrics: PrometheusHandle,
    /// The console's overview and event streams.
    pub(crate) console: Arc<crate::console::Console>,
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
    // Each route that takes a body has an intake of its own, so clients holding one
    // (slow queries' bodies) cannot shut the other (ingest).
    let intake =
        |held| axum::middleware::from_fn_with_state(Intake::new(max_body, held), admit_body);
    Router::new()
        .route("/", get(console_page))
        .route("/favicon.ico", get(favicon))
        .route("/console/{file}", get(crate::console::asset))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/tables", get(tables))
        .route("/api/tables/{table}", get(table_schema))
        .route("/api/cluster", get(cluster))
        .route("/api/overview", get(crate::console::overview))
        .route("/api/events", get(crate::console::events))
        .route("/api/tap/{name}", get(crate::console::tap::tap))
        .route(
            "/api/query",
            post(query).route_layer(intake(Held::WhileRead)),
        )
        .route(
            "/api/ingest/{stream}",
            post(ingest).route_layer(intake(Held::UntilAnswered)),
        )
        .route("/api/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state)
}

/// The scope a request's path needs (`None`: open to all: `/health`, the console's
/// page and files, and this API's description).
fn scope_of(path: &str) -> Option<String> {
    if path.starts_with("/console/") {
        return None;
    }
    match path {
        "/health" | "/" | "/favicon.ico" | "/api/openapi.json" => None,
        "/api/query" | "/api/tables" => Some("query".into()),
        _ if path.starts_with("/api/tables/") => Some("query".into()),
        _ if path.starts_with("/api/tap/") => Some("tap".into()),
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
    let token = match presented.map(|t| state.tokens.authenticate(t)) {
        Some(Ok(token)) => token,
        refused => {
            metrics::counter!("sluice_http_refused_total", "status" => "401").increment(1);
            let why = match refused {
                Some(Err(why)) => why,
                _ => "this endpoint wants an API token: Authorization: Bearer <token>".into(),
            };
            let mut refused = error(StatusCode::UNAUTHORIZED, why);
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return refused;
        }
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

/// The OpenAPI description of this API, generated from the handlers below.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Sluice HTTP API",
        description = "Query the lake with SQL, ingest events over HTTP, and watch the service. With [[http.tokens]] or [http.jwt] configured, every path but /health, / and /api/openapi.json wants `Authorization: Bearer <token>` with the path's scope."
    ),
    paths(health, metrics, tables, table_schema, cluster, query, ingest, openapi, crate::console::overview, crate::console::events, crate::console::tap::tap),
    components(schemas(ErrorBody, Health, TableList, TableSchema, ColumnSchema, QueryBody, ResultFormat, IngestReport)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

/// Declares the bearer scheme the tokens and JWTs use.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every error response: one sentence saying what went wrong.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Only its schema is used: errors are built with `error`.
pub(crate) struct ErrorBody {
    error: String,
}

/// The answers of the token check in front of every route but the open ones.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Only its description is used: `authorize` builds the answers.
pub(crate) enum AuthRefusals {
    /// No valid token.
    #[response(status = 401, description = "No valid token")]
    Unauthorized(ErrorBody),
    /// A token without the route's scope.
    #[response(status = 403, description = "The token lacks the scope")]
    Forbidden(ErrorBody),
}

/// `GET /health`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Only its schema is used.
struct Health {
    /// Always `ok`.
    status: String,
}

/// `GET /api/tables`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Only its schema is used.
struct TableList {
    /// Every table of the lake.
    tables: Vec<String>,
}

#[utoipa::path(get, path = "/api/openapi.json", tag = "service", security(()),
    responses((status = 200, description = "This description (OpenAPI 3.1)", content_type = "application/json")))]
async fn openapi() -> impl IntoResponse {
    use utoipa::OpenApi;
    axum::Json(ApiDoc::openapi())
}

/// Liveness.
#[utoipa::path(get, path = "/health", tag = "service", security(()),
    responses(
        (status = 200, description = "The service is up", body = Health),
        (status = 503, description = "The service is still starting: recovering the lake, or waiting for its repartition topic's brokers (any answer means the process is alive)", body = Health),
    ))]
async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// Prometheus metrics (scope `admin`).
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        AuthRefusals,
    ))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// The lake's tables (scope `query`).
#[utoipa::path(get, path = "/api/tables", tag = "query",
    responses(
        (status = 200, description = "The table names", body = TableList),
        AuthRefusals,
        (status = 503, description = "The lake cannot be listed", body = ErrorBody),
    ))]
async fn tables(State(state): State<AppState>) -> impl IntoResponse {
    match state.query.tables().await {
        Ok(tables) => (StatusCode::OK, axum::Json(json!({"tables": tables}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": format!("cannot list the lake's tables: {e}")})),
        ),
    }
}

/// `GET /api/tables/{table}`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Only its schema is used.
struct TableSchema {
    table: String,
    /// Every column as queries see it, partition columns included.
    columns: Vec<ColumnSchema>,
}

/// A column of [`TableSchema`].
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Only its schema is used.
struct ColumnSchema {
    name: String,
    /// The Arrow type, as DataFusion names it (`Utf8`, `Float64`, `Timestamp(…)`).
    r#type: String,
    nullable: bool,
}

/// A table's columns (scope `query`).
#[utoipa::path(get, path = "/api/tables/{table}", tag = "query",
    params(("table" = String, Path, description = "A table of the lake", example = "telemetry")),
    responses(
        (status = 200, description = "The table's columns", body = TableSchema),
        (status = 400, description = "A table the query engine refuses (a lake in the old layout)", body = ErrorBody),
        AuthRefusals,
        (status = 404, description = "No such table", body = ErrorBody),
        (status = 503, description = "The table cannot be read", body = ErrorBody),
    ))]
async fn table_schema(State(state): State<AppState>, Path(table): Path<String>) -> Response {
    match state.query.schema(&table).await {
        Ok(Some(schema)) => {
            let columns: Vec<_> = schema
                .fields()
                .iter()
                .map(|f| json!({"name": f.name(), "type": f.data_type().to_string(), "nullable": f.is_nullable()}))
                .collect();
            axum::Json(json!({"table": table, "columns": columns})).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no table {table:?} in the lake"),
        ),
        Err(e) if e.is_user_error() => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read table {table:?}: {e}"),
        ),
    }
}

/// The nodes of the cluster sharing this lake, as each last reported itself (scope
/// `admin`).
#[utoipa::path(get, path = "/api/cluster", tag = "service",
    responses(
        (status = 200, description = "The nodes and the partitions each owns", content_type = "application/json"),
        AuthRefusals,
        (status = 503, description = "The nodes' status cannot be read", body = ErrorBody),
    ))]
async fn cluster(State(state): State<AppState>) -> impl IntoResponse {
    match crate::cluster_view(state.query.location()).await {
        Ok(view) => (StatusCode::OK, axum::Json(view)),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": format!("cannot read the nodes' status: {e}")})),
        ),
    }
}

/// `POST /api/query`'s body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct QueryBody {
    /// One read-only SQL statement (DataFusion's dialect).
    sql: String,
}

/// `POST /api/query`'s parameters, as described; read from the raw pairs (see
/// [`query`]), so a bad or repeated one gets a JSON error like every other.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Only its description is used.
struct QueryParams {
    /// `json` (an array of row objects, the default) or `csv`.
    #[param(value_type = Option<ResultFormat>)]
    format: Option<String>,
}

/// The formats of `POST /api/query`'s result.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Only its schema is used.
enum ResultFormat {
    Json,
    Csv,
}

/// The query parameter `name` of a request's raw pairs (read by hand, so a bad or
/// repeated one gets a JSON error like every other); a JSON 400 if it is given twice.
pub(crate) fn param<'a>(
    params: &'a [(String, String)],
    name: &str,
) -> Result<Option<&'a str>, Box<Response>> {
    let mut values = params.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
    match (values.next(), values.next()) {
        (_, Some(_)) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("{name} is given more than once"),
        ))),
        (value, None) => Ok(value.map(String::as_str)),
    }
}

pub(crate) fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({"error": message.to_string()}))).into_response()
}

/// Runs a read-only SQL query over the lake (scope `query`), under the query limits.
#[utoipa::path(post, path = "/api/query", tag = "query", params(QueryParams), request_body = QueryBody,
    responses(
        (status = 200, description = "The rows: a JSON array of objects, or CSV", content(
            (Vec<serde_json::Map<String, serde_json::Value>> = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "Not a read-only query, or a bad request", body = ErrorBody),
        AuthRefusals,
        (status = 413, description = "Over query_memory, query_max_rows, query_max_bytes or query_max_join_pairs", body = ErrorBody),
        (status = 429, description = "Over query_concurrency; see Retry-After", body = ErrorBody),
        (status = 503, description = "The process is over query_rss_limit (see Retry-After), or the service is stopping", body = ErrorBody),
        (status = 504, description = "Over query_timeout", body = ErrorBody),
    ))]
async fn query(
    State(state): State<AppState>,
    Query(params): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Response {
    let format = match param(&params, "format") {
        Err(refused) => return *refused,
        Ok(None | Some("json")) => Format::Json,
        Ok(Some("csv")) => Format::Csv,
        Ok(Some(other)) => {
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
                metrics::counter!("sluice_queries_refused_total", "reason" => "concurrency")
                    .increment(1);
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
    // On the queries' own runtime, below ingest's priority. Dropping this future
    // cancels the query: the task is aborted, and DataFusion aborts what it spawned.
    let engine = state.query.clone();
    let run = state.query_runtime.run(async move {
        engine
            .query(&request.sql)
            .await
            .and_then(|r| r.render(format))
    });
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
    let result = match result {
        Ok(result) => result,
        Err(stopped @ crate::queries::Stopped::OverMemory { .. }) => {
            let unavailable = error(StatusCode::SERVICE_UNAVAILABLE, stopped);
            return retry_after(unavailable, Duration::from_secs(1));
        }
        Err(stopped) => return error(StatusCode::INTERNAL_SERVER_ERROR, stopped),
    };
    match result {
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

/// Ingests events into a stream (scope `ingest:<stream>`): one JSON object per line.
#[utoipa::path(post, path = "/api/ingest/{stream}", tag = "ingest",
    params(
        ("stream" = String, Path, description = "A stream of the config", example = "telemetry"),
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters, e.g. a UUID. A body sent again under the same key within [http] idempotency_ttl gets its first answer back, marked duplicate, and is not taken twice (a write-ahead log, [http] durable_acks, keeps this across restarts)"),
    ),
    request_body(content = String, content_type = "text/plain", description = "One JSON object per line (NDJSON; any content type is read the same)"),
    responses(
        (status = 200, description = "What became of the lines (with `duplicate: true`: of this body's first sending under its Idempotency-Key, and nothing was taken again)", body = IngestReport),
        (status = 400, description = "An empty body, or a bad Idempotency-Key", body = ErrorBody),
        AuthRefusals,
        (status = 404, description = "No such stream", body = ErrorBody),
        (status = 413, description = "Larger than the stream's burst, or than max_body_size", body = ErrorBody),
        (status = 422, description = "The Idempotency-Key came before with another body", body = ErrorBody),
        (status = 429, description = "Over the stream's rate limit; see Retry-After", body = ErrorBody),
        (status = 503, description = "The pipeline is behind (see Retry-After) or stopping", body = ErrorBody),
    ))]
async fn ingest(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "the body is empty: send one JSON object per line",
        );
    }
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) => Some(key),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, IngestError::BadKey),
    };
    match state.ingest.ingest(&stream, body, key).await {
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
        Err(e @ (IngestError::BadKey | IngestError::KeysOff)) => error(StatusCode::BAD_REQUEST, e),
        Err(e @ IngestError::KeyReused) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

/// The bytes of one route's request bodies being received at once: each request holds its
/// `Content-Length` (or `max_body_size` when it sends none) from before its body is
/// read, for as long as [`Held`] says. Without it, a thousand clients each sending a
/// body of `max_body_size` would make the service hold them all (16 GB at the default).
#[derive(Clone)]
pub(crate) struct Intake {
    /// In KiB: `acquire_many` counts in `u32`.
    kib: Arc<tokio::sync::Semaphore>,
    max_body: usize,
    held: Held,
}

/// How long a request holds its room in the [`Intake`].
#[derive(Clone, Copy)]
pub(crate) enum Held {
    /// Until it is answered: an ingest body is in memory until it is decoded (or,
    /// with a write-ahead log, logged).
    UntilAnswered,
    /// While its body is read: a query's body is a few bytes of SQL, and its run is
    /// bounded by the query limits, not by the intake.
    WhileRead,
}

/// How many bodies of `max_body_size` are received at once, at most (smaller bodies
/// share the same bytes).
pub(crate) const INTAKE_BODIES: usize = 8;

impl Intake {
    fn new(max_body: usize, held: Held) -> Self {
        let kib = (max_body.div_ceil(1024).max(1)).saturating_mul(INTAKE_BODIES);
        Self {
            kib: Arc::new(tokio::sync::Semaphore::new(
                kib.min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            max_body,
            held,
        }
    }
}

/// Admits a request once its body fits in its route's [`Intake`]; after
/// [`QUEUE_WAIT`](sluice_ingest::http::QUEUE_WAIT) without room, 503 with
/// `Retry-After`, as when the stream's queue is full.
async fn admit_body(
    State(intake): State<Intake>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let bytes = declared
        .unwrap_or(intake.max_body)
        .clamp(1, intake.max_body);
    let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
    let wait = sluice_ingest::http::QUEUE_WAIT;
    match tokio::time::timeout(wait, intake.kib.clone().acquire_many_owned(kib)).await {
        Ok(Ok(room)) => match intake.held {
            Held::UntilAnswered => {
                let response = next.run(request).await;
                drop(room);
                response
            }
            Held::WhileRead => {
                let (parts, body) = request.into_parts();
                let body = match axum::body::to_bytes(body, intake.max_body).await {
                    Ok(body) => body,
                    Err(e) => {
                        let status = if std::error::Error::source(&e)
                            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                        {
                            StatusCode::PAYLOAD_TOO_LARGE
                        } else {
                            StatusCode::BAD_REQUEST
                        };
                        return error(status, format!("cannot read the request body: {e}"));
                    }
                };
                drop(room);
                next.run(axum::extract::Request::from_parts(parts, body.into()))
                    .await
            }
        },
        _ => {
            metrics::counter!("sluice_http_refused_total", "status" => "503", "reason" => "intake_full")
                .increment(1);
            retry_after(
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many request bodies are being received at once; retry after the Retry-After seconds",
                ),
                wait,
            )
        }
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

/// The console page.
async fn console_page(request: axum::http::HeaderMap) -> Response {
    crate::console::serve_file("index.html", &request)
}

/// Browsers ask for it whatever the page says; a 404 would be a console error.
async fn favicon(request: axum::http::HeaderMap) -> Response {
    crate::console::serve_file("favicon.svg", &request)
}

/// What the HTTP listener serves from the moment it is bound: until the service's
/// router is [set](Front::set), every request is answered 503 `{"status":
/// "starting"}`, so a node that is recovering its lake or waiting for its repartition
/// brokers is seen to be alive but not ready, rather than not answering.
#[derive(Clone, Default)]
pub(crate) struct Front(Arc<std::sync::OnceLock<Router>>);

impl Front {
    /// Hands every request from now on to `app`.
    pub(crate) fn set(&self, app: Router) {
        let _ = self.0.set(app);
    }

    /// The router to serve.
    pub(crate) fn router(&self) -> Router {
        let front = self.clone();
        Router::new().fallback(move |request: axum::extract::Request| {
            let front = front.clone();
            async move {
                match front.0.get() {
                    Some(app) => match tower::ServiceExt::oneshot(app.clone(), request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    },
                    None => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::RETRY_AFTER, "1")],
                        axum::Json(json!({"status": "starting"})),
                    )
                        .into_response(),
                }
            }
        })
    }
}
