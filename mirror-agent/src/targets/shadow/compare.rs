//! Comparing a shadow's answer with the live one: the status, the headers that do not differ in
//! every exchange anyway, and the body (JSON by field, anything else by bytes).
use serde::{Deserialize, Serialize};

/// Headers that differ between two servers' answers to the same request whatever the code does
/// (times, server names, request and trace ids, framing), ignored unless the config names others.
pub const NOISY_HEADERS: &[&str] = &[
    "date",
    "server",
    "age",
    "expires",
    "last-modified",
    "etag",
    "set-cookie",
    "x-request-id",
    "request-id",
    "x-correlation-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-envoy-upstream-service-time",
    "via",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
];

/// Differences kept per exchange.
const MAX_DIFFERENCES: usize = 4;

/// An answer: its status, headers and the first bytes of its body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The body's whole length (more than `body` holds when it was longer than the limit).
    pub body_len: u64,
}

impl Answer {
    pub fn new(status: u16, headers: Vec<(String, Vec<u8>)>) -> Self {
        Answer {
            status,
            headers,
            ..Answer::default()
        }
    }

    /// Body bytes, of which the first `limit` are kept.
    pub fn add_body(&mut self, data: &[u8], limit: usize) {
        self.body_len += data.len() as u64;
        let room = limit.saturating_sub(self.body.len());
        self.body.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn header(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

/// A differing exchange, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    pub method: String,
    pub path: String,
    /// The first differences, in words.
    pub differences: Vec<String>,
}

/// What to leave out of a comparison.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    /// Header names, lowercase.
    pub headers: Vec<String>,
    /// JSON object keys, at any depth.
    pub fields: Vec<String>,
}

/// The differences between the live answer and the shadow's, in words; empty when they agree.
pub fn differences(live: &Answer, shadow: &Answer, ignore: &Ignore) -> Vec<String> {
    let mut out = Vec::new();
    if live.status != shadow.status {
        out.push(format!("status {} (shadow {})", live.status, shadow.status));
    }
    let mut names: Vec<String> = live
        .headers
        .iter()
        .chain(&shadow.headers)
        .map(|(n, _)| n.to_ascii_lowercase())
        .filter(|n| !NOISY_HEADERS.contains(&n.as_str()) && !ignore.headers.contains(n))
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let (a, b) = (live.header(&name), shadow.header(&name));
        if a != b {
            out.push(format!(
                "header {name}: {} (shadow {})",
                words(&a),
                words(&b)
            ));
        }
    }
    out.extend(body_differences(live, shadow, ignore));
    out.truncate(MAX_DIFFERENCES);
    out
}

fn words(values: &[&[u8]]) -> String {
    if values.is_empty() {
        return "absent".into();
    }
    values
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

fn body_differences(live: &Answer, shadow: &Answer, ignore: &Ignore) -> Vec<String> {
    let whole =
        live.body_len == live.body.len() as u64 && shadow.body_len == shadow.body.len() as u64;
    let json = |a: &Answer| {
        a.header("content-type").first().is_some_and(|t| {
            String::from_utf8_lossy(t)
                .to_ascii_lowercase()
                .contains("json")
        })
    };
    if whole
        && json(live)
        && json(shadow)
        && let (Ok(a), Ok(b)) = (
            serde_json::from_slice::<serde_json::Value>(&live.body),
            serde_json::from_slice::<serde_json::Value>(&shadow.body),
        )
    {
        let mut out = Vec::new();
        json_differences("", &a, &b, ignore, &mut out);
        return out;
    }
    if live.body_len != shadow.body_len {
        return vec![format!(
            "body of {} bytes (shadow {})",
            live.body_len, shadow.body_len
        )];
    }
    match live.body.iter().zip(&shadow.body).position(|(a, b)| a != b) {
        Some(at) => vec![format!("body differs from byte {at}")],
        None => Vec::new(),
    }
}

/// Differences between two JSON values, by path (`/a/0/b`).
fn json_differences(
    path: &str,
    live: &serde_json::Value,
    shadow: &serde_json::Value,
    ignore: &Ignore,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    if out.len() >= MAX_DIFFERENCES {
        return;
    }
    match (live, shadow) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                if ignore.fields.contains(key) {
                    continue;
                }
                let at = format!("{path}/{key}");
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => json_differences(&at, x, y, ignore, out),
                    (Some(_), None) => out.push(format!("body {at}: absent in the shadow's")),
                    (None, _) => out.push(format!("body {at}: only in the shadow's")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (index, (x, y)) in a.iter().zip(b).enumerate() {
                json_differences(&format!("{path}/{index}"), x, y, ignore, out);
            }
        }
        (a, b) if a != b => {
            let path = if path.is_empty() { "/" } else { path };
            out.push(format!("body {path}: {a} (shadow {b})"));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Answer {
        let mut answer = Answer::new(
            status,
            headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        );
        answer.add_body(body.as_bytes(), 1 << 20);
        answer
    }

    #[test]
    fn answers_compare_by_status_headers_and_body() {
        let json = [("Content-Type", "application/json")];
        let ignore = Ignore {
            headers: vec!["x-version".into()],
            fields: vec!["took_ms".into()],
        };
        let cases = [
            (
                answer(
                    200,
                    &[("Date", "Mon"), ("Server", "a"), ("X-Version", "1")],
                    "same",
                ),
                answer(200, &[("Date", "Tue"), ("X-Version", "2")], "same"),
                vec![],
            ),
            (
                answer(200, &[], "x"),
                answer(503, &[], "x"),
                vec!["status 200 (shadow 503)".to_owned()],
            ),
            (
                answer(200, &[("Cache-Control", "no-store")], ""),
                answer(200, &[], ""),
                vec!["header cache-control: no-store (shadow absent)".to_owned()],
            ),
            (
                answer(200, &json, r#"{"a":1,"b":[1,2],"took_ms":3}"#),
                answer(200, &json, r#"{"b":[1,2],"a":1,"took_ms":9}"#),
                vec![],
            ),
            (
                answer(200, &json, r#"{"a":1,"b":{"c":"x"}}"#),
                answer(200, &json, r#"{"a":2,"b":{"c":"x","d":0}}"#),
                vec![
                    "body /a: 1 (shadow 2)".to_owned(),
                    "body /b/d: only in the shadow's".to_owned(),
                ],
            ),
            (
                answer(200, &[], "hello"),
                answer(200, &[], "help!"),
                vec!["body differs from byte 3".to_owned()],
            ),
            (
                answer(200, &[], "hello"),
                answer(200, &[], "hi"),
                vec!["body of 5 bytes (shadow 2)".to_owned()],
            ),
        ];
        for (live, shadow, expected) in cases {
            assert_eq!(differences(&live, &shadow, &ignore), expected, "{live:?}");
        }
    }

    #[test]
    fn bodies_are_kept_up_to_the_limit() {
        let mut answer = Answer::default();
        answer.add_body(b"abcdef", 4);
        answer.add_body(b"gh", 4);
        assert_eq!((answer.body.as_slice(), answer.body_len), (&b"abcd"[..], 8));
    }
}
