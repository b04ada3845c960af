//! Bearer tokens with a role, compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use relq::{TokenEntry, TokenRole};
use subtle::ConstantTimeEq;

use crate::problem::Problem;
use crate::Shared;

/// Who made a request: the token's name and role (`anonymous` / admin when no token is
/// configured).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) name: String,
    pub(crate) role: TokenRole,
}

/// The configured tokens.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tokens(Vec<TokenEntry>);

impl Tokens {
    pub(crate) fn new(tokens: Vec<TokenEntry>) -> Tokens {
        Tokens(tokens)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The token matching `secret`. Every configured token is compared, each in constant time,
    /// so the time taken says nothing about which one (or how much of one) matched.
    fn find(&self, secret: &[u8]) -> Option<&TokenEntry> {
        let mut found = None;
        for t in &self.0 {
            if bool::from(t.token.as_bytes().ct_eq(secret)) {
                found = Some(t);
            }
        }
        found
    }
}

fn unauthorized(detail: &str) -> Response {
    let mut res = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail).into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"relq\""),
    );
    res
}

/// What a request needs: reading, or operating.
fn needs(method: &Method) -> TokenRole {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        TokenRole::Read
    } else {
        TokenRole::Admin
    }
}

/// The authentication middleware: sets the [`Caller`] or refuses the request.
pub(crate) async fn authenticate(
    State(shared): State<Arc<Shared>>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = if shared.tokens.is_empty() {
        Caller {
            name: "anonymous".into(),
            role: TokenRole::Admin,
        }
    } else {
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return unauthorized("this server needs a bearer token: Authorization: Bearer <token>");
        };
        let secret = value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| value.as_bytes().strip_prefix(b"bearer "));
        let Some(entry) = secret.and_then(|s| shared.tokens.find(s.trim_ascii())) else {
            return unauthorized("the bearer token is not valid");
        };
        Caller {
            name: entry.name.clone(),
            role: entry.role,
        }
    };
    if caller.role < needs(req.method()) {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} is read-only; this operation needs an admin token",
                caller.name
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}
