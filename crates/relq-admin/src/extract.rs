//! Axum's extractors with their rejections answered as problem details.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// A JSON body.
pub(crate) struct Body<T>(pub(crate) T);
/// The query string.
pub(crate) struct Query<T>(pub(crate) T);
/// Path parameters.
pub(crate) struct Path<T>(pub(crate) T);

fn rejected(status: axum::http::StatusCode, text: String) -> Problem {
    let kind = if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        "payload-too-large"
    } else {
        "bad-request"
    };
    Problem::new(status, kind, text)
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        // Read as a JSON value first: a body must be an object (serde would otherwise fill a
        // struct from an array).
        match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) if !v.is_object() => Err(rejected(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "the request body must be a JSON object".into(),
            )),
            Ok(axum::Json(v)) => T::deserialize(v).map(Body).map_err(|e| {
                rejected(
                    axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                    format!("the request body does not match the expected shape: {e}"),
                )
            }),
            Err(r @ JsonRejection::MissingJsonContentType(_)) => Err(rejected(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                r.body_text(),
            )),
            Err(r) => Err(rejected(r.status(), r.body_text())),
        }
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|r: QueryRejection| rejected(r.status(), r.body_text()))
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|r: PathRejection| rejected(r.status(), r.body_text()))
    }
}
