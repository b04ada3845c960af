//! The admin router without a socket (`oneshot`): every endpoint, authentication and roles,
//! bad input answered as problem details, and the audit log.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use relq::{
    Backoff, Broker, HandlerError, Message, NewMessage, StartPosition, TokenEntry, TokenRole,
};
use serde_json::{json, Value};
use tower::ServiceExt;

const ADMIN: &str = "admin-secret-0123456789";
const READER: &str = "reader-secret-0123456789";

fn tokens() -> Vec<TokenEntry> {
    vec![
        TokenEntry::new("ops", ADMIN, TokenRole::Admin),
        TokenEntry::new("grafana", READER, TokenRole::Read),
    ]
}

struct Reply {
    status: StatusCode,
    content_type: String,
    body: Value,
    text: String,
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    raw(app, req).await
}

async fn raw(app: &Router, req: Request<Body>) -> Reply {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let content_type = res
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        content_type,
        body,
        text,
    }
}

/// A problem answer: the status, problem+json, and its detail.
fn problem(r: &Reply, status: StatusCode) -> String {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.content_type, "application/problem+json", "{}", r.text);
    assert_eq!(r.body["status"], status.as_u16());
    assert!(r.body["type"]
        .as_str()
        .unwrap()
        .starts_with("https://relq.dev/problems/"));
    r.body["detail"].as_str().unwrap().to_owned()
}

/// A broker with topic `orders`: 5 messages of which 3 are dead letters (two categories).
async fn broker_with_failures() -> Broker {
    broker_with_more_failures(0).await
}

/// The same with `extra` more dead letters (payload `bad-1`).
async fn broker_with_more_failures(extra: usize) -> Broker {
    let b = Broker::memory();
    let c = b
        .consumer("orders", "billing")
        .start(StartPosition::Earliest)
        .retry(Backoff::fixed(Duration::from_millis(1)).max_attempts(1))
        .handler("order", |m: Message| async move {
            match &m.payload[..] {
                b"bad-1" | b"bad-2" => Err(HandlerError::permanent(std::io::Error::other(
                    format!("amount {} is negative", m.id.seq),
                ))
                .category("validation")),
                b"slow" => Err(HandlerError::retryable(std::io::Error::other("db timeout"))
                    .category("database")),
                _ => Ok(()),
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let extras = std::iter::repeat_n("bad-1", extra);
    for p in ["ok-1", "bad-1", "bad-2", "slow", "ok-2"]
        .into_iter()
        .chain(extras)
    {
        b.publish("orders", NewMessage::new("order", p))
            .await
            .unwrap();
    }
    for _ in 0..2000 {
        let n = b.topic_info("orders").await.unwrap().dead_letters;
        let g = &b.topic_info("orders").await.unwrap().groups[0];
        if n == 3 + extra as u64 && g.pending == 0 && g.lag == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        b.topic_info("orders").await.unwrap().dead_letters,
        3 + extra as u64
    );
    b
}

fn app(b: &Broker) -> Router {
    relq_admin::Admin::new(b.clone()).tokens(tokens()).router()
}

#[tokio::test]
async fn tokens_and_roles_are_enforced() {
    let b = broker_with_failures().await;
    let app = app(&b);
    let r = call(&app, Method::GET, "/api/topics", None, None).await;
    problem(&r, StatusCode::UNAUTHORIZED);
    let r = call(
        &app,
        Method::GET,
        "/api/topics",
        Some("wrong-secret-0123456789"),
        None,
    )
    .await;
    problem(&r, StatusCode::UNAUTHORIZED);
    let r = call(&app, Method::GET, "/metrics", None, None).await;
    problem(&r, StatusCode::UNAUTHORIZED);
    // Read-only: reads, never changes.
    let r = call(&app, Method::GET, "/api/topics", Some(READER), None).await;
    assert_eq!(r.status, StatusCode::OK);
    for (method, uri, body) in [
        (
            Method::POST,
            "/api/topics/orders/messages",
            json!({"type": "t", "payload": "x"}),
        ),
        (
            Method::POST,
            "/api/topics/orders/dead-letters/replay",
            json!({"all": true}),
        ),
        (
            Method::POST,
            "/api/topics/orders/dead-letters/purge",
            json!({"older_than": "0s"}),
        ),
        (
            Method::DELETE,
            "/api/topics/orders?confirm=orders",
            json!(null),
        ),
    ] {
        let r = call(&app, method, uri, Some(READER), Some(body)).await;
        let d = problem(&r, StatusCode::FORBIDDEN);
        assert!(d.contains("read-only"), "{d}");
    }
    let info = b.topic_info("orders").await.unwrap();
    assert_eq!((info.length, info.dead_letters), (5, 3), "nothing changed");
    // Health and the document need no token.
    for uri in ["/healthz", "/readyz", "/openapi.json"] {
        assert_eq!(
            call(&app, Method::GET, uri, None, None).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
}

/// A publish's time to live becomes the expiry header, stamped at publish.
#[tokio::test]
async fn a_published_time_to_live_is_stamped_on_the_message() {
    let b = broker_with_failures().await;
    let app = app(&b);
    let before = relq::Timestamp::now();
    let r = call(
        &app,
        Method::POST,
        "/api/topics/ttl-demo/messages",
        Some(ADMIN),
        Some(json!({"type": "order", "payload": "x", "ttl": "10m"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id: relq::MessageId = r.body["id"].as_str().unwrap().parse().unwrap();
    let m = b.message("ttl-demo", id).await.unwrap();
    let at = m.expires_at().expect("an expiry");
    assert!(
        at >= before.plus(std::time::Duration::from_secs(600)),
        "{at:?}"
    );
    assert!(
        at <= relq::Timestamp::now().plus(std::time::Duration::from_secs(600)),
        "{at:?}"
    );
}

/// A publish with `compress` is stored compressed; the API's reads show it decompressed.
#[tokio::test]
async fn a_compressed_publish_is_stored_compressed_and_read_whole() {
    let b = broker_with_failures().await;
    let app = app(&b);
    let doc = format!(
        "[{}]",
        vec![r#"{"sku":"KB-1","qty":2,"currency":"EUR"}"#; 80].join(",")
    );
    let r = call(
        &app,
        Method::POST,
        "/api/topics/packed/messages",
        Some(ADMIN),
        Some(json!({"type": "order", "payload": doc, "compress": "gzip"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id: relq::MessageId = r.body["id"].as_str().unwrap().parse().unwrap();
    let raw = b
        .backend()
        .browse("packed", &relq::Browse::oldest())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(raw[0].id, id);
    assert_eq!(raw[0].header(relq::HEADER_ENCODING), Some("gzip"));
    assert!(
        raw[0].payload.len() * 5 < doc.len(),
        "{}",
        raw[0].payload.len()
    );
    let r = call(
        &app,
        Method::GET,
        &format!("/api/topics/packed/messages/{id}"),
        Some(READER),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["payload"], doc.as_str(), "{}", r.text);
    let r = call(
        &app,
        Method::POST,
        "/api/topics/packed/messages",
        Some(ADMIN),
        Some(json!({"type": "order", "payload": "x", "compress": "brotli"})),
    )
    .await;
    // A body of the wrong shape, as for any other field.
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.text.contains("brotli"), "{}", r.text);
}

#[tokio::test]
async fn topics_messages_stop_resume_and_terminate() {
    let b = broker_with_failures().await;
    let app = app(&b);
    let r = call(&app, Method::GET, "/api/topics", Some(READER), None).await;
    let topics = r.body.as_array().unwrap();
    assert_eq!(topics.len(), 1, "the audit topic is not listed: {}", r.text);
    assert_eq!(topics[0]["name"], "orders");
    assert_eq!(topics[0]["dead_letters"], 3);
    assert_eq!(topics[0]["groups"][0]["name"], "billing");

    // Publish with headers and a hex payload; browse both ways; get one.
    let r = call(&app, Method::POST, "/api/topics/orders/messages", Some(ADMIN),
        Some(json!({"type": "order", "payload": "00ff", "payload_encoding": "hex", "headers": {"tenant": "acme"}}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = call(
        &app,
        Method::GET,
        "/api/topics/orders/messages?limit=2",
        Some(READER),
        None,
    )
    .await;
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["payload"], "ok-1");
    let next = r.body["next"].as_str().unwrap();
    let r = call(
        &app,
        Method::GET,
        &format!("/api/topics/orders/messages?after={next}&limit=1000"),
        Some(READER),
        None,
    )
    .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 4);
    assert!(r.body["next"].is_null());
    let r = call(
        &app,
        Method::GET,
        "/api/topics/orders/messages?order=newest&limit=1",
        Some(READER),
        None,
    )
    .await;
    assert_eq!(r.body["items"][0]["id"], id.as_str());
    let r = call(
        &app,
        Method::GET,
        &format!("/api/topics/orders/messages/{id}"),
        Some(READER),
        None,
    )
    .await;
    assert_eq!(r.body["payload"], "00ff");
    assert_eq!(r.body["payload_encoding"], "hex");
    assert_eq!(r.body["headers"]["tenant"], "acme");

    let r = call(
        &app,
        Method::GET,
        &format!("/api/topics/orders/messages/{id}/groups"),
        Some(READER),
        None,
    )
    .await;
    assert_eq!(
        (r.body[0]["group"].as_str(), r.body[0]["state"].as_str()),
        (Some("billing"), Some("unread")),
        "{}",
        r.text
    );
    let first = items[0]["id"].as_str().unwrap();
    let r = call(
        &app,
        Method::GET,
        &format!("/api/topics/orders/messages/{first}/groups"),
        Some(READER),
        None,
    )
    .await;
    assert_eq!(r.body[0]["state"], "done", "{}", r.text);

    // Stop and resume.
    let r = call(
        &app,
        Method::POST,
        &format!("/api/topics/orders/messages/{id}/stop"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let info = b.topic_info("orders").await.unwrap();
    assert_eq!(
        info.stopped
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![id.clone()]
    );
    let r = call(
        &app,
        Method::POST,
        &format!("/api/topics/orders/messages/{id}/resume"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.body["changed"], true);
    assert!(b.topic_info("orders").await.unwrap().stopped.is_empty());

    // A dry run counts and changes nothing (and is not audited).
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/cleanup",
        Some(ADMIN),
        Some(json!({"min_age": "0s", "max_len": 0, "dry_run": true})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["dry_run"], true);
    let length = b.topic_info("orders").await.unwrap().length;
    assert!(length > 0);
    assert_eq!(
        r.body["removed"].as_u64().unwrap() + r.body["trimmed_unacknowledged"].as_u64().unwrap(),
        length,
        "{}",
        r.text
    );
    // Cleanup keeps what the group has not acknowledged.
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/cleanup",
        Some(ADMIN),
        Some(json!({"min_age": "0s"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["trimmed_unacknowledged"], 0);

    // Terminate needs the name typed again.
    let r = call(
        &app,
        Method::DELETE,
        "/api/topics/orders",
        Some(ADMIN),
        None,
    )
    .await;
    assert!(problem(&r, StatusCode::BAD_REQUEST).contains("confirm=orders"));
    let r = call(
        &app,
        Method::DELETE,
        "/api/topics/orders?confirm=order",
        Some(ADMIN),
        None,
    )
    .await;
    problem(&r, StatusCode::BAD_REQUEST);
    assert!(b.topic_info("orders").await.is_ok());
    let r = call(
        &app,
        Method::DELETE,
        "/api/topics/orders?confirm=orders",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.body["existed"].clone()),
        (StatusCode::OK, json!(true))
    );
    let r = call(&app, Method::GET, "/api/topics/orders", Some(READER), None).await;
    problem(&r, StatusCode::NOT_FOUND);
    // The audit log cannot be terminated through the API.
    let r = call(
        &app,
        Method::DELETE,
        "/api/topics/_relq-audit?confirm=_relq-audit",
        Some(ADMIN),
        None,
    )
    .await;
    problem(&r, StatusCode::FORBIDDEN);

    // Every change is in the audit log, newest first, by token name.
    let r = call(&app, Method::GET, "/api/audit", Some(READER), None).await;
    let actions: Vec<(String, String, u64)> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = [
        ("terminate", "ops", 200),
        ("cleanup", "ops", 200),
        ("resume", "ops", 200),
        ("stop", "ops", 200),
        ("publish", "ops", 200),
    ]
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c));
    assert_eq!(actions, want, "{}", r.text);
}

#[tokio::test]
async fn dead_letters_list_group_replay_delete_and_purge() {
    let b = broker_with_failures().await;
    let app = app(&b);
    let r = call(
        &app,
        Method::GET,
        "/api/topics/orders/dead-letters?category=validation",
        Some(READER),
        None,
    )
    .await;
    let items = r.body["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2, "{}", r.text);
    assert_eq!(items[0]["reason"], "permanent");
    let handler = items[0]["handler"].as_str().unwrap().to_owned();
    let r = call(
        &app,
        Method::GET,
        &format!("/api/topics/orders/dead-letters?category=validation&handler={handler}"),
        Some(READER),
        None,
    )
    .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2, "{}", r.text);
    let r = call(
        &app,
        Method::GET,
        "/api/topics/orders/dead-letters?handler=no-such-handler",
        Some(READER),
        None,
    )
    .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 0, "{}", r.text);
    assert!(
        items[0]["suggestion"]["check"].as_str().is_some(),
        "{}",
        r.text
    );
    let r = call(
        &app,
        Method::GET,
        "/api/topics/orders/dead-letters?limit=1",
        Some(READER),
        None,
    )
    .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    assert!(r.body["next"].is_string());

    // Two fingerprints: "amount <n> is negative" (2) and "db timeout" (1).
    let r = call(
        &app,
        Method::GET,
        "/api/topics/orders/dead-letters/groups",
        Some(READER),
        None,
    )
    .await;
    let groups = r.body.as_array().unwrap();
    assert_eq!(groups.len(), 2, "{}", r.text);
    assert_eq!(groups[0]["count"], 2);
    assert_eq!(groups[0]["categories"]["validation"], 2);
    let r = call(
        &app,
        Method::GET,
        "/api/topics/orders/dead-letters/stats",
        Some(READER),
        None,
    )
    .await;
    assert_eq!(r.body["total"], 3);
    assert_eq!(r.body["by_category"]["database"], 1);

    let one = items[0]["id"].as_str().unwrap();
    let r = call(
        &app,
        Method::GET,
        &format!("/api/topics/orders/dead-letters/{one}"),
        Some(READER),
        None,
    )
    .await;
    assert!(
        r.body["message"]["payload"]
            .as_str()
            .is_some_and(|p| p.starts_with("bad-")),
        "{}",
        r.text
    );
    assert_eq!(r.body["failures"].as_array().unwrap().len(), 1);

    // A dry run changes nothing; then the filtered set is replayed at a rate.
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/dead-letters/replay",
        Some(ADMIN),
        Some(json!({"filter": {"category": "validation"}, "dry_run": true})),
    )
    .await;
    assert_eq!(
        (r.body["dry_run"].clone(), r.body["matched"].clone()),
        (json!(true), json!(2)),
        "{}",
        r.text
    );
    assert_eq!(b.topic_info("orders").await.unwrap().dead_letters, 3);
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/dead-letters/replay",
        Some(ADMIN),
        Some(json!({"filter": {"category": "validation"}, "rate": 50})),
    )
    .await;
    assert_eq!(
        r.body["replayed"].as_array().unwrap().len(),
        2,
        "{}",
        r.text
    );
    let info = b.topic_info("orders").await.unwrap();
    assert_eq!((info.dead_letters, info.length), (1, 7));
    // Replay needs exactly one way of choosing.
    for body in [
        json!({}),
        json!({"all": true, "ids": ["1-0"]}),
        json!({"filter": {}}),
    ] {
        let r = call(
            &app,
            Method::POST,
            "/api/topics/orders/dead-letters/replay",
            Some(ADMIN),
            Some(body),
        )
        .await;
        problem(&r, StatusCode::BAD_REQUEST);
    }
    // Delete by id, then purge the rest.
    let purge = |body: Value| {
        call(
            &app,
            Method::POST,
            "/api/topics/orders/dead-letters/purge",
            Some(ADMIN),
            Some(body),
        )
    };
    let left = call(
        &app,
        Method::GET,
        "/api/topics/orders/dead-letters",
        Some(READER),
        None,
    )
    .await;
    let last = left.body["items"][0]["id"].as_str().unwrap().to_owned();
    // A dry run counts what a purge would delete and deletes nothing.
    for (age, want) in [
        ("0s", left.body["items"].as_array().unwrap().len()),
        ("3650d", 0),
    ] {
        let r = purge(json!({"older_than": age, "dry_run": true})).await;
        assert_eq!(r.body["removed"], want, "{age}: {}", r.text);
    }
    let again = call(
        &app,
        Method::GET,
        "/api/topics/orders/dead-letters",
        Some(READER),
        None,
    )
    .await;
    assert_eq!(again.body["items"], left.body["items"]);
    for body in [
        json!({"dry_run": true}),
        json!({"older_than": "1s", "before": "2026-01-01T00:00:00Z", "dry_run": true}),
        json!({"before": "yesterday", "dry_run": true}),
    ] {
        let r = purge(body.clone()).await;
        problem(&r, StatusCode::BAD_REQUEST);
    }
    // A dry run's cutoff, given back as `before`, counts the same.
    let dry = purge(json!({"older_than": "0s", "dry_run": true})).await;
    let again = purge(json!({"before": dry.body["before"], "dry_run": true})).await;
    assert_eq!(
        (
            &again.body["removed"],
            &again.body["before"],
            &again.body["dry_run"]
        ),
        (&dry.body["removed"], &dry.body["before"], &json!(true)),
        "{}",
        again.text
    );
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/dead-letters/delete",
        Some(ADMIN),
        Some(json!({"ids": [last]})),
    )
    .await;
    assert_eq!(r.body["removed"], 1);
    let r = purge(json!({"older_than": "0s"})).await;
    assert_eq!(r.body["removed"], 0);
    let r = call(&app, Method::GET, "/api/audit?limit=2", Some(READER), None).await;
    let e = &r.body["items"];
    assert_eq!(
        (e[0]["action"].as_str(), e[1]["action"].as_str()),
        (Some("purge"), Some("delete"))
    );
    assert_eq!(e[1]["params"]["ids"][0], last.as_str());
    assert!(r.body["next"].is_string());
}

#[tokio::test]
async fn bad_input_is_a_problem_never_a_server_error() {
    let b = broker_with_failures().await;
    let app = app(&b);
    let cases: Vec<(Method, &str, Option<Value>, StatusCode)> = vec![
        (
            Method::GET,
            "/api/topics/bad%20name",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (Method::GET, "/api/topics/nope", None, StatusCode::NOT_FOUND),
        (
            Method::GET,
            "/api/topics/orders/messages/not-an-id",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/api/topics/orders/messages/1-0",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/api/topics/orders/messages?limit=0",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/api/topics/orders/messages?limit=abc",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/api/topics/orders/messages?order=sideways",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/api/topics/orders/dead-letters?reason=bored",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/api/topics/orders/dead-letters?since=yesterday",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/api/topics/orders/dead-letters/99-0",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/api/nothing-here",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::PUT,
            "/api/topics",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::POST,
            "/api/topics/orders/messages",
            Some(json!({"type": "t"})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::POST,
            "/api/topics/orders/messages",
            Some(json!({"type": "t", "payload": "x", "extra": 1})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::POST,
            "/api/topics/orders/messages",
            Some(json!({"type": "t", "payload": "0g", "payload_encoding": "hex"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/api/topics/orders/messages",
            Some(json!({"type": "t", "payload": "x", "headers": {"relq-x": "1"}})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/api/topics/orders/messages",
            Some(json!({"type": "t", "payload": "x", "delay": "soon"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/api/topics/orders/messages",
            Some(json!({"type": "t", "payload": "x", "delay": "99999999999999999d"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/api/topics/orders/messages",
            Some(json!({"type": "t", "payload": "x", "ttl": "a while"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/api/topics/orders/dead-letters/replay",
            Some(json!({"all": true, "rate": 0})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/api/topics/orders/dead-letters/delete",
            Some(json!({"ids": []})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/api/topics/orders/dead-letters/purge",
            Some(json!({"older_than": "forever"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/api/topics/orders/messages/1-0/stop",
            None,
            StatusCode::OK,
        ),
    ];
    for (method, uri, body, want) in cases {
        let r = call(&app, method.clone(), uri, Some(ADMIN), body).await;
        if want == StatusCode::OK {
            assert_eq!(r.status, want, "{method} {uri}: {}", r.text);
        } else {
            problem(&r, want);
        }
    }
    // Not JSON, and too large.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/topics/orders/messages")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
        .body(Body::from("type=t"))
        .unwrap();
    problem(&raw(&app, req).await, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = relq_admin::Admin::new(b.clone()).configure(&{
        let mut s = relq::ServerSection::default();
        s.max_body_bytes = 2048;
        s
    });
    let big = big.router();
    let payload = "x".repeat(4096);
    let r = call(
        &big,
        Method::POST,
        "/api/topics/orders/messages",
        None,
        Some(json!({"type": "t", "payload": payload})),
    )
    .await;
    problem(&r, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        b.topic_info("orders").await.unwrap().length,
        5,
        "nothing was published"
    );
}

#[tokio::test]
async fn metrics_health_and_the_openapi_document() {
    let b = broker_with_failures().await;
    let app = relq_admin::Admin::new(b.clone()).router();
    let r = call(&app, Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.content_type.starts_with("text/plain"),
        "{}",
        r.content_type
    );
    for line in [
        "relq_up 1",
        "relq_ready 1",
        "relq_topic_messages{topic=\"orders\"} 5",
        "relq_topic_dead_letters{topic=\"orders\"} 3",
        "relq_group_lag{topic=\"orders\",group=\"billing\"} 0",
        "relq_group_pending{topic=\"orders\",group=\"billing\"} 0",
        "relq_group_consumers{topic=\"orders\",group=\"billing\"} 1",
        "relq_group_oldest_unread_age_seconds{topic=\"orders\",group=\"billing\"} 0",
    ] {
        assert!(
            r.text.lines().any(|l| l == line),
            "missing {line:?} in\n{}",
            r.text
        );
    }
    let r = call(&app, Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    assert_eq!(r.body["backend"], "memory");
    let r = call(&app, Method::GET, "/openapi.json", None, None).await;
    assert_eq!(r.body["openapi"], "3.1.0");
    assert!(r.body["paths"]["/api/topics/{topic}/dead-letters/replay"]["post"].is_object());
    let committed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json"),
    )
    .unwrap_or_default();
    assert!(
        committed.trim_end() == relq_admin::openapi().trim_end(),
        "docs/openapi.json is not what the code generates: run `cargo run --bin relq -- serve --print-openapi > docs/openapi.json`"
    );
}

#[tokio::test]
async fn long_replays_run_as_jobs_that_report_progress_and_can_be_cancelled() {
    let b = broker_with_more_failures(3).await;
    let app = app(&b);
    let url = "/api/topics/orders/dead-letters/replay";
    // Six at 1/s take longer than a request may: refused unless in the background.
    let six = json!({"all": true, "rate": 1});
    let r = call(&app, Method::POST, url, Some(ADMIN), Some(six)).await;
    assert!(problem(&r, StatusCode::BAD_REQUEST).contains("background"));

    // At 1/s the job replays one, then waits: cancelled there, it stops with one done.
    let r = call(
        &app,
        Method::POST,
        url,
        Some(ADMIN),
        Some(json!({"all": true, "rate": 1, "background": true})),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let job = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (r.body["state"].as_str(), r.body["total"].as_u64()),
        (Some("running"), Some(6))
    );
    let poll = |job: String| {
        let app = app.clone();
        async move {
            for _ in 0..2000 {
                let r = call(
                    &app,
                    Method::GET,
                    &format!("/api/jobs/{job}"),
                    Some(READER),
                    None,
                )
                .await;
                if r.body["done"].as_u64() >= Some(1) {
                    return r.body;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("job {job} made no progress");
        }
    };
    poll(job.clone()).await;
    let r = call(
        &app,
        Method::DELETE,
        &format!("/api/jobs/{job}"),
        Some(READER),
        None,
    )
    .await;
    problem(&r, StatusCode::FORBIDDEN);
    let r = call(
        &app,
        Method::DELETE,
        &format!("/api/jobs/{job}"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let mut state = String::new();
    let mut done = 0;
    for _ in 0..2000 {
        let r = call(
            &app,
            Method::GET,
            &format!("/api/jobs/{job}"),
            Some(READER),
            None,
        )
        .await;
        state = r.body["state"].as_str().unwrap().to_owned();
        done = r.body["done"].as_u64().unwrap();
        if state != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Cancelled a second before its next batch was due (two, on a machine that stalled).
    assert_eq!(state, "cancelled");
    assert!(done == 1 || done == 2, "{done}");
    assert_eq!(b.topic_info("orders").await.unwrap().dead_letters, 6 - done);

    // Without a rate it runs to the end.
    let r = call(
        &app,
        Method::POST,
        url,
        Some(ADMIN),
        Some(json!({"all": true, "background": true})),
    )
    .await;
    let job2 = r.body["id"].as_str().unwrap().to_owned();
    let mut body = Value::Null;
    for _ in 0..2000 {
        body = call(
            &app,
            Method::GET,
            &format!("/api/jobs/{job2}"),
            Some(READER),
            None,
        )
        .await
        .body;
        if body["state"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        (
            body["state"].as_str(),
            body["done"].as_u64(),
            body["total"].as_u64()
        ),
        (Some("finished"), Some(6 - done), Some(6 - done)),
        "{body}"
    );
    assert_eq!(b.topic_info("orders").await.unwrap().dead_letters, 0);
    let r = call(&app, Method::GET, "/api/jobs", Some(READER), None).await;
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    let r = call(&app, Method::GET, "/api/jobs/99", Some(READER), None).await;
    problem(&r, StatusCode::NOT_FOUND);
    // The audit log has the cancel and both jobs' ends.
    let r = call(&app, Method::GET, "/api/audit", Some(READER), None).await;
    let actions: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["replay", "replay", "cancel"], "{}", r.text);
}

#[tokio::test]
async fn an_unauthenticated_server_refuses_other_sites_and_duplicate_ids_replay_once() {
    let b = broker_with_failures().await;
    let app = relq_admin::Admin::new(b.clone()).router();
    // DNS rebinding: a page of another site reaching 127.0.0.1 under its own name.
    let req = Request::builder()
        .uri("/api/topics")
        .header(header::HOST, "evil.example:8080")
        .body(Body::empty())
        .unwrap();
    problem(&raw(&app, req).await, StatusCode::FORBIDDEN);
    for host in ["localhost:8080", "127.0.0.1:8080", "[::1]:8080"] {
        let req = Request::builder()
            .uri("/api/topics")
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap();
        assert_eq!(raw(&app, req).await.status, StatusCode::OK, "{host}");
    }
    // A cross-site "simple" POST (no JSON content type, no token) changes nothing.
    let first = b
        .dead_letters("orders")
        .list(&relq::DeadLetterQuery::all())
        .await
        .unwrap()[0]
        .id
        .to_string();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("/api/topics/orders/messages/{first}/stop"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::empty())
        .unwrap();
    problem(&raw(&app, req).await, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(b.topic_info("orders").await.unwrap().stopped.is_empty());
    // The same id twice is one replay.
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/dead-letters/replay",
        None,
        Some(json!({"ids": [first.clone(), first.clone()]})),
    )
    .await;
    assert_eq!(
        r.body["replayed"].as_array().map(Vec::len),
        Some(1),
        "{}",
        r.text
    );
    assert_eq!(b.topic_info("orders").await.unwrap().dead_letters, 2);
    let too_many: Vec<String> = (0..10_001).map(|i| format!("1-{i}")).collect();
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/dead-letters/replay",
        None,
        Some(json!({"ids": too_many})),
    )
    .await;
    problem(&r, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn groups_are_listed_created_moved_and_deleted() {
    let b = Broker::memory();
    let app = app(&b);
    let ids = b
        .publish_batch(
            "orders",
            (0..3)
                .map(|i| NewMessage::new("order", format!("o{i}")))
                .collect(),
        )
        .await
        .unwrap();
    let create = |name: &str, start: Option<&str>| {
        let mut body = json!({ "name": name });
        if let Some(s) = start {
            body["start"] = json!(s);
        }
        body
    };
    // Created at a start position; again: unchanged.
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/groups",
        Some(ADMIN),
        Some(create("all", Some("earliest"))),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        (r.body["created"].clone(), r.body["group"]["lag"].clone()),
        (json!(true), json!(3))
    );
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/groups",
        Some(ADMIN),
        Some(create("all", None)),
    )
    .await;
    assert_eq!(r.body["created"], false, "{}", r.text);
    let from = ids[1].to_string();
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/groups",
        Some(ADMIN),
        Some(create("mid", Some(&from))),
    )
    .await;
    assert_eq!(r.body["group"]["lag"], 2, "{}", r.text);
    // Bad input: a bad position, a bad name, unknown fields; a reader may not create.
    for (body, status) in [
        (create("x", Some("yesterday")), StatusCode::BAD_REQUEST),
        (create("bad name", None), StatusCode::BAD_REQUEST),
        (
            json!({ "name": "x", "extra": 1 }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let r = call(
            &app,
            Method::POST,
            "/api/topics/orders/groups",
            Some(ADMIN),
            Some(body),
        )
        .await;
        problem(&r, status);
    }
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/groups",
        Some(READER),
        Some(create("x", None)),
    )
    .await;
    problem(&r, StatusCode::FORBIDDEN);
    let r = call(
        &app,
        Method::GET,
        "/api/topics/orders/groups",
        Some(READER),
        None,
    )
    .await;
    let names: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["all", "mid"], "{}", r.text);

    // Moved to the end and back.
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/groups/all/move",
        Some(ADMIN),
        Some(json!({ "to": "latest" })),
    )
    .await;
    assert_eq!(
        (
            r.body["before"]["lag"].clone(),
            r.body["after"]["lag"].clone()
        ),
        (json!(3), json!(0)),
        "{}",
        r.text
    );
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/groups/all/move",
        Some(ADMIN),
        Some(json!({ "to": from })),
    )
    .await;
    assert_eq!(r.body["after"]["lag"], 2, "{}", r.text);
    let r = call(
        &app,
        Method::POST,
        "/api/topics/orders/groups/none/move",
        Some(ADMIN),
        Some(json!({ "to": "earliest" })),
    )
    .await;
    problem(&r, StatusCode::NOT_FOUND);

    // Deleting needs the name typed again.
    let r = call(
        &app,
        Method::DELETE,
        "/api/topics/orders/groups/mid",
        Some(ADMIN),
        None,
    )
    .await;
    assert!(problem(&r, StatusCode::BAD_REQUEST).contains("confirm=mid"));
    let r = call(
        &app,
        Method::DELETE,
        "/api/topics/orders/groups/mid?confirm=mid",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = call(
        &app,
        Method::DELETE,
        "/api/topics/orders/groups/mid?confirm=mid",
        Some(ADMIN),
        None,
    )
    .await;
    problem(&r, StatusCode::NOT_FOUND);
    let names: Vec<String> = b
        .topic_info("orders")
        .await
        .unwrap()
        .groups
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, ["all"]);

    // Each change is audited, failures too.
    let r = call(&app, Method::GET, "/api/audit", Some(READER), None).await;
    let actions: Vec<(String, u64)> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = [
        ("group.delete", 404),
        ("group.delete", 200),
        ("group.move", 200),
        ("group.move", 200),
        ("group.create", 200),
        ("group.create", 200),
        ("group.create", 200),
    ]
    .map(|(a, s)| (a.to_owned(), s));
    assert_eq!(actions, want, "{}", r.text);
}

#[tokio::test]
async fn the_console_is_served_without_a_token_under_a_strict_policy() {
    let b = broker_with_failures().await;
    let app = app(&b);
    for (path, kind) in [
        ("/", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let req = Request::builder().uri(path).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let h = res.headers();
        assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(kind));
        let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
    // Nothing in the page is loaded from another origin.
    let r = call(&app, Method::GET, "/", None, None).await;
    for needle in ["http://", "https://", "//cdn"] {
        assert!(!r.text.contains(needle), "{needle} in the page");
    }
    // No inline script: every script element loads a file of this server.
    for tag in r.text.split("<script").skip(1) {
        let tag = &tag[..tag.find('>').unwrap()];
        assert!(
            tag.contains("src=\"/console/"),
            "inline or foreign script: {tag}"
        );
    }
    // The page learns the role from /api/whoami.
    let r = call(&app, Method::GET, "/api/whoami", Some(READER), None).await;
    assert_eq!(
        (
            r.body["name"].clone(),
            r.body["role"].clone(),
            r.body["authenticated"].clone()
        ),
        (json!("grafana"), json!("read"), json!(true))
    );
    let r = call(&app, Method::GET, "/api/whoami", None, None).await;
    problem(&r, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_dead_letter_is_replayed_with_an_edited_payload_and_the_edit_is_audited() {
    let b = broker_with_failures().await;
    let app = app(&b);
    let dl = b
        .dead_letters("orders")
        .list(&relq::DeadLetterQuery::all())
        .await
        .unwrap()
        .remove(0);
    let path = format!("/api/topics/orders/dead-letters/{}/replay", dl.id);
    // A reader may not; a bad encoding is a bad request; both change nothing.
    let r = call(
        &app,
        Method::POST,
        &path,
        Some(READER),
        Some(json!({"payload": "x"})),
    )
    .await;
    problem(&r, StatusCode::FORBIDDEN);
    let r = call(
        &app,
        Method::POST,
        &path,
        Some(ADMIN),
        Some(json!({"payload": "zz", "payload_encoding": "hex"})),
    )
    .await;
    problem(&r, StatusCode::BAD_REQUEST);
    let r = call(
        &app,
        Method::POST,
        &path,
        Some(ADMIN),
        Some(json!({"payload": "{\"fixed\":true}"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id: relq::MessageId = r.body["id"].as_str().unwrap().parse().unwrap();
    let m = b.message("orders", id).await.unwrap();
    assert_eq!(&m.payload[..], b"{\"fixed\":true}");
    assert_eq!(m.kind, dl.message.kind);
    assert_eq!(m.header(relq::HEADER_EDITED), Some("true"));
    assert_eq!(
        m.header(relq::HEADER_REPLAY_OF),
        Some(dl.id.to_string().as_str())
    );
    assert!(matches!(
        b.dead_letters("orders").get(dl.id).await,
        Err(relq::Error::NotFound(_))
    ));
    // Again: it is gone.
    let r = call(
        &app,
        Method::POST,
        &path,
        Some(ADMIN),
        Some(json!({"payload": "y"})),
    )
    .await;
    problem(&r, StatusCode::NOT_FOUND);
    let r = call(&app, Method::GET, "/api/audit", Some(READER), None).await;
    let e = &r.body["items"][0];
    assert_eq!(e["action"], "dead_letter.replay_edited", "{}", r.text);
    assert_eq!(e["params"]["edited"], true);
    assert_eq!(e["status"], 200);
}

#[tokio::test]
async fn messages_are_browsed_by_type_header_and_time() {
    let b = Broker::memory();
    let app = app(&b);
    for i in 0..30 {
        let kind = if i % 3 == 0 { "refund" } else { "order" };
        let mut m = NewMessage::new(kind, format!("{i}"));
        if i % 10 == 0 {
            m = m.header("tenant", "acme");
        }
        b.publish("orders", m).await.unwrap();
    }
    let get = |q: &str| {
        let app = app.clone();
        let uri = format!("/api/topics/orders/messages?{q}");
        async move { call(&app, Method::GET, &uri, Some(READER), None).await }
    };
    let payloads = |r: &Reply| -> Vec<String> {
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["payload"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = get("type=refund").await;
    assert_eq!(payloads(&r).len(), 10, "{}", r.text);
    assert!(r.body["next"].is_null());
    let r = get("header=tenant%3Dacme").await;
    assert_eq!(payloads(&r), ["0", "10", "20"], "{}", r.text);
    let r = get("header=tenant&type=refund").await;
    assert_eq!(payloads(&r), ["0"], "{}", r.text);
    // Paged: a filtered page of 2, then on from its `next`.
    let r = get("type=refund&limit=2&order=newest").await;
    assert_eq!(payloads(&r), ["27", "24"], "{}", r.text);
    let next = r.body["next"].as_str().unwrap().to_owned();
    let r = get(&format!("type=refund&limit=2&order=newest&before={next}")).await;
    assert_eq!(payloads(&r), ["21", "18"], "{}", r.text);
    // A time range: all of them were published before the year 2100, none after.
    let r = get("since=2100-01-01T00:00:00Z").await;
    assert!(payloads(&r).is_empty(), "{}", r.text);
    let r = get("until=2100-01-01T00:00:00Z&limit=1000").await;
    assert_eq!(payloads(&r).len(), 30, "{}", r.text);
    let r = get("since=yesterday").await;
    problem(&r, StatusCode::BAD_REQUEST);
}

/// `GET /api/routes` lists the configuration's routes with their group on each topic the
/// pattern matches (none yet where no `relq route` joined); a publish with an idempotency key
/// repeated answers the first id and stores once.
#[tokio::test]
async fn routes_are_listed_with_their_progress_and_a_keyed_publish_stores_once() {
    let b = Broker::memory();
    for (topic, n) in [("orders.eu", 2), ("orders.us", 1), ("other", 1)] {
        for i in 0..n {
            b.publish(topic, relq::NewMessage::new("job", format!("m{i}")))
                .await
                .unwrap();
        }
    }
    b.create_group("orders.eu", "route.fanout", relq::StartPosition::Earliest)
        .await
        .unwrap();
    let route: relq::RouteSection =
        serde_json::from_value(json!({"name": "fanout", "from": "orders.*", "to": ["all"]}))
            .unwrap();
    let app = relq_admin::Admin::new(b.clone())
        .tokens(tokens())
        .routes(vec![route])
        .router();
    let r = call(&app, Method::GET, "/api/routes", Some(READER), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let routes = r.body.as_array().unwrap();
    assert_eq!(routes.len(), 1, "{}", r.text);
    assert_eq!(routes[0]["group"], "route.fanout");
    assert_eq!(routes[0]["to"], json!(["all"]));
    let sources = routes[0]["sources"].as_array().unwrap();
    let topics: Vec<&str> = sources
        .iter()
        .map(|s| s["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics.len(), 2, "{}", r.text);
    assert!(topics.contains(&"orders.eu") && topics.contains(&"orders.us"));
    for s in sources {
        match s["topic"].as_str().unwrap() {
            "orders.eu" => assert_eq!(s["group"]["lag"], 2, "{s}"),
            _ => assert!(s["group"].is_null(), "{s}"),
        }
    }
    let publish = json!({"type": "job", "payload": "x", "idempotency_key": "order-42"});
    let first = call(
        &app,
        Method::POST,
        "/api/topics/keyed/messages",
        Some(ADMIN),
        Some(publish.clone()),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let again = call(
        &app,
        Method::POST,
        "/api/topics/keyed/messages",
        Some(ADMIN),
        Some(publish),
    )
    .await;
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(b.topic_info("keyed").await.unwrap().length, 1);
    let bad = call(
        &app,
        Method::POST,
        "/api/topics/keyed/messages",
        Some(ADMIN),
        Some(json!({"type": "job", "payload": "x", "idempotency_key": ""})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text);
}
