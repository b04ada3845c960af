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

/// Whether the request's `Host` names this machine's loopback (or there is none).
fn loopback_host(req: &Request) -> bool {
    let Some(value) = req.headers().get(header::HOST) else {
        return true;
    };
    let Ok(host) = value.to_str() else {
        return false;
    };
    // Strip the port: `[::1]:8080`, `127.0.0.1:8080`, `localhost:8080`.
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The authentication middleware: sets the [`Caller`] or refuses the request.
pub(crate) async fn authenticate(
    State(shared): State<Arc<Shared>>,
    mut req: Request,
    next: Next,
) -> Response {
    // Unauthenticated, a browser would send some cross-site requests without asking first (a
    // POST without a body, or with a form's content type). A change must carry a JSON content
    // type or a bearer token, which a page on another site can only send after a CORS
    // preflight this server refuses (unless configured). With tokens, a request without one is
    // refused anyway (401): browsers never attach bearer tokens on their own.
    let changes = needs(req.method()) == TokenRole::Admin;
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if shared.tokens.is_empty()
        && changes
        && !json
        && !req.headers().contains_key(header::AUTHORIZATION)
    {
        return Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad-request",
            "a request that changes state needs Content-Type: application/json (or a bearer token)",
        )
        .into_response();
    }
    let caller = if shared.tokens.is_empty() {
        // Unauthenticated (loopback only): a name another site's page could resolve to this
        // address (DNS rebinding) is refused; only loopback names and addresses are served.
        if !loopback_host(&req) {
            return Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this unauthenticated server answers only requests addressed to localhost or a loopback address",
            )
            .into_response();
        }
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
