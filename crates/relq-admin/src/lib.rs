//! relq's admin surface over HTTP: the admin API (`/api/...`, JSON, RFC 9457 problem details,
//! bearer tokens with a role, an audit log of every change), Prometheus metrics (`/metrics`),
//! health (`/healthz`, `/readyz`) and the OpenAPI document (`/openapi.json`), as one axum
//! [`Router`]. `relq serve` runs it; a service that runs consumers can mount it, or only
//! [`metrics_router`], to export its own runtime metrics.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = relq::Broker::open("/var/lib/relq")?;
//! let metrics = relq_admin::install_recorder();
//! let app = relq_admin::Admin::new(broker).metrics(metrics).router();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs, missing_debug_implementations)]

mod api;
mod audit;
mod auth;
mod console;
mod exporter;
mod extract;
mod jobs;
mod latency;
mod problem;
mod views;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use relq::{Broker, TokenEntry};
use serde::Serialize;
use utoipa::OpenApi;

pub use audit::{audit_entries, record_action, AuditEntry, AUDIT_TOPIC};
pub use exporter::{install_recorder, render};
pub use metrics_exporter_prometheus::PrometheusHandle;
pub use problem::Problem;

/// The state every handler shares.
pub(crate) struct Shared {
    pub(crate) broker: Broker,
    pub(crate) tokens: auth::Tokens,
    pub(crate) metrics: Option<PrometheusHandle>,
    pub(crate) jobs: jobs::Jobs,
    pub(crate) prometheus: Option<latency::Prometheus>,
    /// The routes of the configuration (`[[routes]]`), shown by `GET /api/routes`.
    pub(crate) routes: Vec<relq::RouteSection>,
}

/// The admin server's router, built from a broker and options.
#[derive(Debug)]
pub struct Admin {
    broker: Broker,
    tokens: Vec<TokenEntry>,
    metrics: Option<PrometheusHandle>,
    cors_origins: Vec<String>,
    max_body: usize,
    prometheus_url: Option<String>,
    routes: Vec<relq::RouteSection>,
}

impl Admin {
    /// An unauthenticated admin router over `broker` (add tokens with [`tokens`](Self::tokens)).
    pub fn new(broker: Broker) -> Admin {
        Admin {
            broker,
            tokens: Vec::new(),
            metrics: None,
            cors_origins: Vec::new(),
            max_body: 4 << 20,
            prometheus_url: None,
            routes: Vec::new(),
        }
    }

    /// The options of a `[server]` configuration section: tokens, CORS origins, body limit,
    /// the Prometheus server asked for latency.
    pub fn configure(mut self, server: &relq::ServerSection) -> Admin {
        self.tokens = server.tokens.clone();
        self.prometheus_url = server.prometheus_url.clone();
        self.cors_origins = server.cors_origins.clone();
        self.max_body = usize::try_from(server.max_body_bytes).unwrap_or(usize::MAX);
        self
    }

    /// The routes `GET /api/routes` shows with their progress (the configuration's
    /// `[[routes]]`, which `relq route` processes run).
    pub fn routes(mut self, routes: Vec<relq::RouteSection>) -> Admin {
        self.routes = routes;
        self
    }

    /// The bearer tokens accepted. With none, every request is allowed (keep such a server on
    /// loopback).
    pub fn tokens(mut self, tokens: Vec<TokenEntry>) -> Admin {
        self.tokens = tokens;
        self
    }

    /// The handle whose runtime metrics `/metrics` exports (from [`install_recorder`]).
    pub fn metrics(mut self, handle: Option<PrometheusHandle>) -> Admin {
        self.metrics = handle;
        self
    }

    /// The router: `/api/...`, `/metrics`, `/healthz`, `/readyz`, `/openapi.json`.
    pub fn router(self) -> Router {
        let shared = Arc::new(Shared {
            broker: self.broker,
            tokens: auth::Tokens::new(self.tokens),
            metrics: self.metrics,
            jobs: jobs::Jobs::default(),
            routes: self.routes,
            prometheus: self.prometheus_url.as_deref().and_then(|u| {
                let p = latency::Prometheus::new(u);
                if p.is_none() {
                    tracing::error!(
                        url = u,
                        "server.prometheus_url is not an http:// address; no latency chart"
                    );
                }
                p
            }),
        });
        let api = Router::new()
            .route("/api/topics", get(api::list_topics))
            .route(
                "/api/topics/{topic}",
                get(api::get_topic).delete(api::terminate),
            )
            .route("/api/topics/{topic}/cleanup", post(api::cleanup))
            .route(
                "/api/topics/{topic}/groups",
                get(api::list_groups).post(api::create_group),
            )
            .route(
                "/api/topics/{topic}/groups/{group}",
                axum::routing::delete(api::delete_group),
            )
            .route(
                "/api/topics/{topic}/groups/{group}/move",
                post(api::move_group),
            )
            .route(
                "/api/topics/{topic}/messages",
                get(api::browse).post(api::publish),
            )
            .route("/api/topics/{topic}/messages/{id}", get(api::get_message))
            .route("/api/topics/{topic}/messages/{id}/groups", get(api::locate))
            .route("/api/topics/{topic}/messages/{id}/stop", post(api::stop))
            .route(
                "/api/topics/{topic}/messages/{id}/resume",
                post(api::resume),
            )
            .route(
                "/api/topics/{topic}/dead-letters",
                get(api::list_dead_letters),
            )
            .route(
                "/api/topics/{topic}/dead-letters/groups",
                get(api::failure_groups),
            )
            .route(
                "/api/topics/{topic}/dead-letters/stats",
                get(api::dead_letter_stats),
            )
            .route("/api/topics/{topic}/dead-letters/replay", post(api::replay))
            .route(
                "/api/topics/{topic}/dead-letters/delete",
                post(api::delete_dead_letters),
            )
            .route(
                "/api/topics/{topic}/dead-letters/purge",
                post(api::purge_dead_letters),
            )
            .route(
                "/api/topics/{topic}/dead-letters/{id}",
                get(api::get_dead_letter),
            )
            .route(
                "/api/topics/{topic}/dead-letters/{id}/replay",
                post(api::replay_edited),
            )
            .route("/api/routes", get(api::list_routes))
            .route("/api/whoami", get(api::whoami))
            .route("/api/latency", get(api::latency))
            .route("/api/audit", get(api::audit_log))
            .route("/api/jobs", get(api::list_jobs))
            .route("/api/jobs/{id}", get(api::get_job).delete(api::cancel_job))
            .route("/metrics", get(metrics))
            .route_layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                auth::authenticate,
            ));
        let mut router = Router::new()
            .merge(api)
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/openapi.json", get(openapi_json))
            .route("/", get(console::index))
            .route("/console/app.js", get(console::script))
            .route("/console/app.css", get(console::style))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(self.max_body))
            .with_state(shared);
        if !self.cors_origins.is_empty() {
            let origins: Vec<HeaderValue> = self
                .cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect();
            router = router.layer(
                tower_http::cors::CorsLayer::new()
                    .allow_origin(origins)
                    .allow_methods([Method::GET, Method::POST, Method::DELETE])
                    .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
            );
        }
        router
    }
}

/// A router with only `GET /metrics` (no authentication): for a service that runs consumers
/// and wants Prometheus to scrape its runtime metrics and the backend's gauges.
pub fn metrics_router(broker: Broker, handle: Option<PrometheusHandle>) -> Router {
    let shared = Arc::new(Shared {
        broker,
        tokens: auth::Tokens::default(),
        metrics: handle,
        jobs: jobs::Jobs::default(),
        prometheus: None,
        routes: Vec::new(),
    });
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// The OpenAPI 3.1 document of the API, as pretty JSON (what `/openapi.json` serves, and what
/// `docs/openapi.json` holds).
pub fn openapi() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc.to_pretty_json().unwrap_or_default()
}

#[derive(OpenApi)]
#[openapi(
    info(title = "relq admin API", description = "Operate relq: topics, messages, dead letters, the audit log. Every request but /healthz, /readyz and /openapi.json needs `Authorization: Bearer <token>` when the server has tokens; a read-only token may only GET."),
    paths(
        api::list_topics, api::get_topic, api::terminate, api::cleanup,
        api::list_groups, api::create_group, api::move_group, api::delete_group,
        api::publish, api::browse, api::get_message, api::locate, api::stop, api::resume,
        api::list_dead_letters, api::failure_groups, api::dead_letter_stats, api::get_dead_letter,
        api::replay, api::delete_dead_letters, api::purge_dead_letters, api::audit_log,
        api::list_jobs, api::get_job, api::cancel_job, api::replay_edited, api::whoami, api::latency, api::list_routes,
        healthz, readyz, metrics,
    ),
    components(schemas(Problem, HealthView)),
    modifiers(&Security),
    security(("bearer" = [])),
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi_json() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        openapi(),
    )
        .into_response()
}

async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such endpoint; see /openapi.json",
    )
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this endpoint does not take that method; see /openapi.json",
    )
}

/// Health: the backend's checks.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct HealthView {
    /// `ok` or `unavailable`.
    pub(crate) status: String,
    /// The backend's name.
    pub(crate) backend: String,
    /// Every check made.
    pub(crate) checks: Vec<CheckView>,
    /// How full a bounded backend is, 0 to 1.
    pub(crate) usage_ratio: Option<f64>,
}

/// One health check.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct CheckView {
    /// What was checked.
    pub(crate) name: String,
    /// Whether it passed.
    pub(crate) ok: bool,
    /// What was found.
    pub(crate) detail: String,
}

/// Alive: the server answers (says nothing about the backend).
#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, body = HealthView)))]
async fn healthz(State(s): State<Arc<Shared>>) -> Json<HealthView> {
    Json(HealthView {
        status: "ok".into(),
        backend: s.broker.backend().name().to_owned(),
        checks: Vec::new(),
        usage_ratio: None,
    })
}

/// Ready: the backend is reachable, not poisoned, with room (Redis: no evicting memory policy).
#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, body = HealthView), (status = 503, body = HealthView)))]
async fn readyz(State(s): State<Arc<Shared>>) -> (StatusCode, Json<HealthView>) {
    let h = s.broker.health().await;
    let ready = h.ready();
    let view = HealthView {
        status: if ready { "ok" } else { "unavailable" }.into(),
        backend: h.backend.clone(),
        checks: h
            .checks
            .iter()
            .map(|c| CheckView {
                name: c.name.clone(),
                ok: c.ok,
                detail: c.detail.clone(),
            })
            .collect(),
        usage_ratio: h.usage_ratio,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(view))
}

/// Prometheus metrics: the runtime's counters and histograms of this process, and gauges read
/// from the backend at scrape time.
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String),
        (status = "default", body = Problem, content_type = "application/problem+json")))]
async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let text = exporter::render(&s.broker, s.metrics.as_ref()).await;
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}
