//! Errors as RFC 9457 problem details (`application/problem+json`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use relq::{BackendErrorKind, Error};
use serde::Serialize;
use utoipa::ToSchema;

/// A failed request, as RFC 9457 problem details.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`about:blank` when the status says it all).
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong in this request, for a human.
    pub detail: String,
}

/// The problem types relq answers with; each is documented in docs/operations.md.
const TYPE_BASE: &str = "https://relq.dev/problems/";

impl Problem {
    /// A problem with status `status`, of kind `kind` (a path under relq's problem types).
    pub(crate) fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: format!("{TYPE_BASE}{kind}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
        }
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    pub(crate) fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// The HTTP status an error answers with.
pub(crate) fn status_of(e: &Error) -> StatusCode {
    classify(e).0
}

fn classify(e: &Error) -> (StatusCode, &'static str) {
    match e {
        Error::Name(_)
        | Error::Config(_)
        | Error::InvalidId(_)
        | Error::ReservedHeader(_)
        | Error::InvalidHeader { .. }
        | Error::Encode(_)
        | Error::UnsupportedUrl { .. } => (StatusCode::BAD_REQUEST, "bad-request"),
        Error::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large"),
        Error::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
        Error::Terminated(_) => (StatusCode::CONFLICT, "terminated"),
        Error::Full { .. } => (StatusCode::SERVICE_UNAVAILABLE, "backend-full"),
        Error::Backend(b) => match b.kind {
            BackendErrorKind::Unavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "backend-unavailable")
            }
            BackendErrorKind::Full => (StatusCode::SERVICE_UNAVAILABLE, "backend-full"),
            BackendErrorKind::Terminated => (StatusCode::CONFLICT, "terminated"),
            BackendErrorKind::GroupDeleted => (StatusCode::CONFLICT, "group-deleted"),
            BackendErrorKind::Invalid => (StatusCode::BAD_REQUEST, "bad-request"),
            BackendErrorKind::Corrupt => (StatusCode::INTERNAL_SERVER_ERROR, "backend-corrupt"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "backend-failed"),
        },
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<Error> for Problem {
    fn from(e: Error) -> Problem {
        let detail = e.to_string();
        let (status, kind) = classify(&e);
        if status.is_server_error() {
            tracing::warn!(error = %detail, "admin request failed");
        }
        Problem::new(status, kind, detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut res = (status, axum::Json(self)).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        res
    }
}

/// The result of a handler.
pub(crate) type ApiResult<T> = Result<T, Problem>;
