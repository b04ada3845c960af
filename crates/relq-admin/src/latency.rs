//! The p99 publish-to-handled latency the console charts, asked of a Prometheus server.
//!
//! The latency is measured where messages are handled: every consumer process records
//! `relq_publish_to_handled_seconds` (a histogram) and exports it on its own `/metrics`. The
//! admin server sees none of those processes, so it asks the Prometheus that scrapes them
//! (`server.prometheus_url`), as Asynqmon does: one `query_range` over plain HTTP/1.1.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::HOST;
use hyper::Request;
use hyper_util::rt::TokioIo;

/// How long one question to Prometheus may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read.
const MAX_ANSWER: usize = 8 << 20;

/// The quantile charted.
pub(crate) const QUANTILE: f64 = 0.99;

/// The rate window for points `step` seconds apart: at least 2 minutes, so a Prometheus
/// scraping every minute (its default) still has two samples in it, and at least four steps.
pub(crate) fn window(step: u64) -> u64 {
    step.saturating_mul(4).max(120)
}

/// The PromQL of the chart: the p99 over every consumer process, per topic.
pub(crate) fn query(window: u64) -> String {
    format!(
        "histogram_quantile({QUANTILE}, sum by (le, topic) (rate(relq_publish_to_handled_seconds_bucket[{window}s])))"
    )
}

/// A Prometheus server's address, from `http://host:port[/prefix]` (checked by the config).
#[derive(Clone, Debug)]
pub(crate) struct Prometheus {
    url: String,
    authority: String,
    prefix: String,
}

/// One topic's points: unix milliseconds and seconds (`None` where nothing was handled).
pub(crate) type Points = Vec<(u64, Option<f64>)>;

impl Prometheus {
    pub(crate) fn new(url: &str) -> Option<Prometheus> {
        let rest = url.strip_prefix("http://")?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return None;
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.ends_with(']'))
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Some(Prometheus {
            url: url.to_owned(),
            authority,
            prefix: prefix.to_owned(),
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The p99 per topic from `start` to `end` (unix seconds) every `step` seconds.
    pub(crate) async fn latency(
        &self,
        start: u64,
        end: u64,
        step: u64,
    ) -> Result<Vec<(String, Points)>, String> {
        let path = format!(
            "{}/api/v1/query_range?query={}&start={start}&end={end}&step={step}",
            self.prefix,
            form_encode(&query(window(step)))
        );
        let body = tokio::time::timeout(TIMEOUT, self.get(&path))
            .await
            .map_err(|_| format!("no answer within {} s", TIMEOUT.as_secs()))??;
        parse(&body)
    }

    async fn get(&self, path: &str) -> Result<Bytes, String> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        // The connection is driven until the answer is read (one request per connection), and
        // stopped however this returns (a timeout drops this future).
        struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _driver = AbortOnDrop(tokio::spawn(conn));
        let req = Request::get(path)
            .header(HOST, &self.authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let result = async {
            let res = sender
                .send_request(req)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            let status = res.status();
            let body = Limited::new(res.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body);
                return Err(format!(
                    "answered {status}: {}",
                    text.chars().take(300).collect::<String>()
                ));
            }
            Ok(body)
        }
        .await;
        result
    }
}

/// Percent-encodes a query-string value (everything but RFC 3986's unreserved characters).
fn form_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len() * 3);
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads a `query_range` answer (a matrix) into points per topic.
fn parse(body: &[u8]) -> Result<Vec<(String, Points)>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not a Prometheus answer: {e}"))?;
    if v["status"] != "success" {
        return Err(format!(
            "query failed: {}",
            v["error"].as_str().unwrap_or("no error text")
        ));
    }
    let result = v["data"]["result"]
        .as_array()
        .ok_or("the answer has no data.result")?;
    let mut series = Vec::new();
    for s in result {
        let topic = s["metric"]["topic"].as_str().unwrap_or("").to_owned();
        let values = s["values"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let points = values
            .iter()
            .filter_map(|p| {
                let at = p[0].as_f64()?;
                // Seconds as text; "NaN" where no message was handled in the window.
                let v = p[1].as_str()?.parse::<f64>().ok().filter(|v| v.is_finite());
                Some(((at * 1000.0).round() as u64, v))
            })
            .collect();
        series.push((topic, points));
    }
    series.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_answers_are_read() {
        let p = Prometheus::new("http://prom.internal/base/").unwrap();
        assert_eq!(
            (p.authority.as_str(), p.prefix.as_str()),
            ("prom.internal:80", "/base")
        );
        let p = Prometheus::new("http://127.0.0.1:9090").unwrap();
        assert_eq!(
            (p.authority.as_str(), p.prefix.as_str()),
            ("127.0.0.1:9090", "")
        );
        assert_eq!(form_encode("a b(c)[1m]"), "a%20b%28c%29%5B1m%5D");
        let answer = br#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"topic":"orders"},"values":[[1700000000,"0.25"],[1700000002.5,"NaN"]]}]}}"#;
        let s = parse(answer).unwrap();
        assert_eq!(
            s,
            [(
                "orders".to_owned(),
                vec![(1_700_000_000_000, Some(0.25)), (1_700_000_002_500, None)]
            )]
        );
        assert!(parse(br#"{"status":"error","error":"bad query"}"#)
            .unwrap_err()
            .contains("bad query"));
        assert!(parse(b"<html>").is_err());
    }
}
