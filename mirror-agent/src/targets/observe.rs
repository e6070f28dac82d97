//! `observe = "http"`: the HTTP/1.x exchanges in a session's copies of both directions become
//! service metrics (requests by service, method and status class; their durations), with nothing
//! added to the pods. A session with `observe` and no `target` is observed only (its copies go to
//! the agent whole, as a shadow's, and nowhere else); a shadow session with `observe` counts the
//! exchanges it reads for the shadow. The streams are read by the shadow's flows
//! ([`super::shadow`]); this file holds what is counted and how its labels stay bounded.
use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize, de};

use super::shadow::Latency;

/// What `observe` reads: HTTP/1.x alone for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
}

/// `observe = "http"`, or `observe = { protocol = "http", routes = […], max_series = N }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveConfig {
    pub protocol: Protocol,
    /// Route templates (`/users/{id}/orders`: `{…}` stands for one path segment): with any, each
    /// request is labelled with the first that matches its path, or `other`. Paths themselves
    /// never become labels.
    pub routes: Vec<String>,
    /// Request series (service × method × status class × route) kept per session; the exchanges
    /// of services past it are counted under the service `other`.
    pub max_series: u32,
}

/// [`ObserveConfig::max_series`]'s default.
const DEFAULT_MAX_SERIES: u32 = 1_000;

/// The table form's keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObserveTable {
    protocol: Protocol,
    #[serde(default)]
    routes: Vec<String>,
    #[serde(default = "default_max_series")]
    max_series: u32,
}

fn default_max_series() -> u32 {
    DEFAULT_MAX_SERIES
}

impl ObserveConfig {
    /// `observe = "http"` (the quick form's `--observe http`).
    pub fn of(protocol: Protocol) -> Self {
        ObserveConfig {
            protocol,
            routes: Vec::new(),
            max_series: DEFAULT_MAX_SERIES,
        }
    }

    /// The config checked; the message says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.max_series == 0 {
            return Err("max_series = 0: it must be at least 1".into());
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(format!(
                "{} routes: at most {MAX_ROUTES} (each is a label value)",
                self.routes.len()
            ));
        }
        for route in &self.routes {
            if !route.starts_with('/') {
                return Err(format!("routes: {route:?} must start with /"));
            }
            if let Some(segment) = route
                .split('/')
                .find(|s| s.contains(['{', '}']) && !is_placeholder(s))
            {
                return Err(format!(
                    "routes: {route:?}: {segment:?} must be a whole segment `{{name}}`"
                ));
            }
        }
        Ok(())
    }

    /// The first route whose template matches `path` (query left out), when routes are set:
    /// `Some("other")` for none of them.
    fn route_of(&self, path: &str) -> Option<String> {
        if self.routes.is_empty() {
            return None;
        }
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let matches = |route: &str| {
            let mut want = route.split('/');
            let mut got = path.split('/');
            loop {
                match (want.next(), got.next()) {
                    (None, None) => return true,
                    (Some(w), Some(g)) if w == g || is_placeholder(w) && !g.is_empty() => {}
                    _ => return false,
                }
            }
        };
        Some(
            self.routes
                .iter()
                .find(|r| matches(r))
                .map_or_else(|| OTHER.to_owned(), Clone::clone),
        )
    }
}

/// Route templates per session, at most: each is a label value.
const MAX_ROUTES: usize = 256;

/// The label value of what is not named: a method, a route or a service past the cap.
const OTHER: &str = "other";

fn is_placeholder(segment: &str) -> bool {
    segment.len() > 2 && segment.starts_with('{') && segment.ends_with('}')
}

impl<'de> Deserialize<'de> for ObserveConfig {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = ObserveConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"http\", or a table `{ protocol = \"http\", routes, max_series }`")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ObserveConfig, E> {
                Protocol::deserialize(de::value::StrDeserializer::<E>::new(text))
                    .map(ObserveConfig::of)
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<ObserveConfig, A::Error> {
                let table = ObserveTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ObserveConfig {
                    protocol: table.protocol,
                    routes: table.routes,
                    max_series: table.max_series,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The method label: the methods of RFC 9110 and PATCH by name, any other as `other` (a client
/// could send a new one with every request).
fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    KNOWN
        .into_iter()
        .find(|known| *known == method)
        .unwrap_or(OTHER)
}

/// The status class label: `2xx`…, or `unanswered` when no whole answer was seen.
fn status_class(status: Option<u16>) -> &'static str {
    match status {
        None => "unanswered",
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => OTHER,
    }
}

/// One request series: its count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSeries {
    pub method: String,
    pub status_class: String,
    /// The route template that matched (with routes set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// gRPC calls: the method (`/package.Service/Method`) and the status code's name (`OK`,
    /// `NOT_FOUND`, …; `none` when the answer had no `grpc-status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_code: Option<String>,
    pub count: u64,
}

impl RequestSeries {
    /// Its labels besides the service, for telling series apart.
    fn key(&self) -> SeriesKey<'_> {
        (
            &self.method,
            &self.status_class,
            self.route.as_deref(),
            self.grpc_method.as_deref(),
            self.grpc_code.as_deref(),
        )
    }
}

type SeriesKey<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

/// What one service answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceView {
    /// The destination: `IP:port`, or `other` for the services past the series cap.
    pub service: String,
    pub requests: Vec<RequestSeries>,
    /// From a request's first byte to its answer's last, as the wire saw them (answered
    /// requests only).
    pub duration: Latency,
}

impl ServiceView {
    /// Requests of any outcome.
    pub fn total(&self) -> u64 {
        self.requests.iter().map(|r| r.count).sum()
    }

    /// Its counts on one line of `name=value` fields: requests, by status class, and the median
    /// and 99th percentile of the durations in milliseconds.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut line = format!("{}  requests={}", self.service, self.total());
        let mut classes: Vec<(&str, u64)> = Vec::new();
        for series in &self.requests {
            match classes.iter_mut().find(|(c, _)| *c == series.status_class) {
                Some((_, n)) => *n += series.count,
                None => classes.push((&series.status_class, series.count)),
            }
        }
        classes.sort_unstable();
        for (class, n) in classes {
            let _ = write!(line, " {class}={n}");
        }
        for (name, q) in [("p50_ms", 0.5), ("p99_ms", 0.99)] {
            if let Some(seconds) = self.duration.quantile(q) {
                let _ = write!(line, " {name}={:.3}", seconds * 1e3);
            }
        }
        line
    }

    /// Requests answered 5xx, or not answered at all.
    pub fn errors(&self) -> u64 {
        self.requests
            .iter()
            .filter(|r| matches!(r.status_class.as_str(), "5xx" | "unanswered"))
            .map(|r| r.count)
            .sum()
    }
}

/// What an observed session counted, by service (sorted by name).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpStats {
    pub services: Vec<ServiceView>,
    /// Exchanges counted under the service `other` because the series cap was reached.
    pub over_cap: u64,
    /// Requests known only by the bytes they left missing, so of no service: their bytes never
    /// reached the agent (`ring_full`: the ring refused their copies; `gap`: lost before the
    /// hook, or before the agent joined the connection) or could not be read as HTTP/1.x
    /// (`unreadable`).
    pub unread: Unread,
}

/// [`HttpStats::unread`], by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Unread {
    pub ring_full: u64,
    pub gap: u64,
    pub unreadable: u64,
    /// HTTP/2 requests on a connection whose header compression state is unknown.
    pub undecodable: u64,
}

impl Unread {
    pub fn total(&self) -> u64 {
        self.ring_full + self.gap + self.unreadable + self.undecodable
    }
}

impl HttpStats {
    /// Adds what an earlier configuration of the same session counted.
    pub fn absorb(&mut self, earlier: &HttpStats) {
        for service in &earlier.services {
            let at = self
                .services
                .iter()
                .position(|s| s.service == service.service)
                .unwrap_or_else(|| {
                    self.services.push(ServiceView {
                        service: service.service.clone(),
                        ..ServiceView::default()
                    });
                    self.services.len() - 1
                });
            let mine = &mut self.services[at];
            for series in &service.requests {
                match mine.requests.iter_mut().find(|r| r.key() == series.key()) {
                    Some(r) => r.count += series.count,
                    None => mine.requests.push(series.clone()),
                }
            }
            mine.duration.absorb(&service.duration);
        }
        self.over_cap += earlier.over_cap;
        self.unread.ring_full += earlier.unread.ring_full;
        self.unread.gap += earlier.unread.gap;
        self.unread.unreadable += earlier.unread.unreadable;
        self.unread.undecodable += earlier.unread.undecodable;
        self.services.sort_by(|a, b| a.service.cmp(&b.service));
    }
}

/// An exchange being read: what its labels need, and when its request began.
#[derive(Debug, Clone)]
pub struct Exchange {
    method: &'static str,
    route: Option<String>,
    /// A gRPC call's method, and its status code once the answer's trailers told it.
    grpc: Option<(String, Option<u32>)>,
    began: Duration,
}

impl Exchange {
    /// The exchange is a gRPC call (its path is the method).
    pub fn grpc(mut self, path: &str) -> Self {
        self.grpc = Some((path.to_owned(), None));
        self
    }

    /// The answer's `grpc-status`.
    pub fn grpc_status(&mut self, code: u32) {
        if let Some((_, status)) = &mut self.grpc {
            *status = Some(code);
        }
    }

    fn grpc_labels(&self) -> (Option<String>, Option<String>) {
        match &self.grpc {
            Some((method, code)) => (
                Some(method.clone()),
                Some(code.map_or_else(|| "none".to_owned(), grpc_code_name)),
            ),
            None => (None, None),
        }
    }
}

/// gRPC's status codes by name, as its docs spell them; others by number.
fn grpc_code_name(code: u32) -> String {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| code.to_string(), |name| (*name).to_owned())
}

/// The counts of one observed session, shared by its sink (which counts) and the API (which
/// reads them).
#[derive(Debug, Clone)]
pub struct Observed(Arc<Mutex<Tally>>);

#[derive(Debug)]
struct Tally {
    config: ObserveConfig,
    stats: HttpStats,
    /// Where each service is in `stats.services`.
    at: HashMap<String, usize>,
    /// Request series counted so far (all services).
    series: usize,
}

impl Observed {
    pub fn new(config: &ObserveConfig) -> Self {
        Observed(Arc::new(Mutex::new(Tally {
            config: config.clone(),
            stats: HttpStats::default(),
            at: HashMap::new(),
            series: 0,
        })))
    }

    /// The counts now, services sorted by name.
    pub fn read(&self) -> HttpStats {
        let mut stats = self.lock().stats.clone();
        stats.services.sort_by(|a, b| a.service.cmp(&b.service));
        stats
    }

    /// A request whose head was read at `began` (its first byte's time, as the wire saw it).
    pub fn request(&self, method: &str, target: &str, began: Duration) -> Exchange {
        Exchange {
            method: method_label(method),
            route: self.lock().config.route_of(target),
            grpc: None,
            began,
        }
    }

    /// A request no exchange holds was lost for `why` (see [`HttpStats::unread`]).
    pub fn unread(&self, why: super::shadow::Reason) {
        use super::shadow::Reason;
        let unread = &mut self.lock().stats.unread;
        *match why {
            Reason::RingFull => &mut unread.ring_full,
            Reason::Unreadable => &mut unread.unreadable,
            Reason::Undecodable => &mut unread.undecodable,
            // The rest are the replay's; a gap is what remains.
            _ => &mut unread.gap,
        } += 1;
    }

    /// `exchange` ended: answered by `server` with `status` at `ended`, or (`None`) not answered.
    pub fn ended(&self, server: SocketAddr, exchange: Exchange, answer: Option<(u16, Duration)>) {
        let mut tally = self.lock();
        let Tally {
            config,
            stats,
            at,
            series,
        } = &mut *tally;
        let class = status_class(answer.map(|(status, _)| status));
        let name = server.to_string();
        let (grpc_method, grpc_code) = exchange.grpc_labels();
        let key = (
            exchange.method,
            class,
            exchange.route.as_deref(),
            grpc_method.as_deref(),
            grpc_code.as_deref(),
        );
        let find = |service: &ServiceView| service.requests.iter().position(|r| r.key() == key);
        let known = at
            .get(&name)
            .is_some_and(|&i| find(&stats.services[i]).is_some());
        // A new series past the cap goes to `other`, whose own series are bounded by the
        // methods, classes and routes.
        let over = !known && *series >= config.max_series as usize;
        let name = if over {
            stats.over_cap += 1;
            OTHER.to_owned()
        } else {
            name
        };
        let index = *at.entry(name.clone()).or_insert_with(|| {
            stats.services.push(ServiceView {
                service: name,
                ..ServiceView::default()
            });
            stats.services.len() - 1
        });
        let service = &mut stats.services[index];
        if let Some(i) = find(service) {
            service.requests[i].count += 1;
        } else {
            if !over {
                *series += 1;
            }
            service.requests.push(RequestSeries {
                method: exchange.method.to_owned(),
                status_class: class.to_owned(),
                route: exchange.route,
                grpc_method,
                grpc_code,
                count: 1,
            });
        }
        if let Some((_, ended)) = answer {
            service
                .duration
                .observe(ended.saturating_sub(exchange.began));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<ObserveConfig, String> {
        #[derive(Deserialize)]
        struct Session {
            observe: ObserveConfig,
        }
        toml::from_str::<Session>(text)
            .map_err(|e| e.to_string())
            .and_then(|s| s.observe.check().map(|()| s.observe))
    }

    #[test]
    fn observe_is_a_protocol_or_a_table() {
        assert_eq!(
            config("observe = \"http\""),
            Ok(ObserveConfig::of(Protocol::Http))
        );
        let table =
            config("observe = { protocol = \"http\", routes = [\"/users/{id}\"], max_series = 5 }")
                .expect("a table");
        assert_eq!((table.routes.len(), table.max_series), (1, 5));
        for (text, message) in [
            ("observe = \"grpc\"", "unknown variant `grpc`"),
            ("observe = 1", "\"http\", or a table"),
            (
                "observe = { protocol = \"http\", route = [] }",
                "unknown field `route`",
            ),
            (
                "observe = { protocol = \"http\", max_series = 0 }",
                "at least 1",
            ),
            (
                "observe = { protocol = \"http\", routes = [\"users\"] }",
                "must start with /",
            ),
            (
                "observe = { protocol = \"http\", routes = [\"/u/x{id}\"] }",
                "a whole segment",
            ),
        ] {
            let error = config(text).expect_err(text);
            assert!(error.contains(message), "{text}: {error}");
        }
    }

    #[test]
    fn routes_match_whole_segments() {
        let mut config = ObserveConfig::of(Protocol::Http);
        assert_eq!(config.route_of("/users/7"), None, "no routes: no label");
        config.routes = vec![
            "/users/{id}".into(),
            "/users/{id}/orders".into(),
            "/".into(),
        ];
        for (path, route) in [
            ("/users/7", "/users/{id}"),
            ("/users/7?full=1", "/users/{id}"),
            ("/users/7/orders", "/users/{id}/orders"),
            ("/", "/"),
            ("/users/", OTHER),
            ("/users/7/orders/9", OTHER),
            ("/admin", OTHER),
        ] {
            assert_eq!(config.route_of(path).as_deref(), Some(route), "{path}");
        }
    }

    #[test]
    fn series_past_the_cap_go_to_other() {
        let config = ObserveConfig {
            max_series: 4,
            ..ObserveConfig::of(Protocol::Http)
        };
        let observed = Observed::new(&config);
        let at = |ms| Duration::from_millis(ms);
        let unanswered = observed.request("GET", "/", at(0));
        observed.ended(SocketAddr::from(([10, 0, 0, 1], 1)), unanswered, None);
        for port in 1..=10u16 {
            let server = SocketAddr::from(([10, 0, 0, 1], port));
            for method in ["GET", "BREW"] {
                let exchange = observed.request(method, "/x", at(0));
                observed.ended(server, exchange, Some((200, at(3))));
            }
        }
        let stats = observed.read();
        let names: Vec<&str> = stats.services.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(names, ["10.0.0.1:1", "10.0.0.1:2", OTHER]);
        // Port 1's unanswered GET, its GET, its BREW (as `other`), port 2's GET; the rest is over.
        assert_eq!(stats.over_cap, 17);
        let other = &stats.services[2];
        assert_eq!(other.total(), 17);
        assert_eq!(other.requests.len(), 2, "{:?}", other.requests);
        let first = &stats.services[0];
        assert_eq!((first.total(), first.errors()), (3, 1));
        assert_eq!(first.duration.count, 2, "answered ones only");
        assert_eq!(
            stats.services.iter().map(ServiceView::total).sum::<u64>(),
            21
        );
        let mut twice = stats.clone();
        twice.absorb(&stats);
        assert_eq!(twice.services[2].total(), 34);
        assert_eq!(twice.services[0].duration.count, 4);
        assert_eq!(twice.over_cap, 34);
    }
}
