//! Shadow targets: the HTTP/1.x requests a session sees are replayed to a mirror service, whose
//! answers are read and dropped (or, with `compare`, compared with the live ones). The kernel puts
//! the session's copies into the ring whole ([`mirror_common::SessionMeta::whole_frames`]); the
//! ring drain hands them to a [`ShadowSink`], which puts each connection's streams back together
//! ([`tcp`]), reads requests and answers out of them ([`http`], [`flows`]) and hands each request
//! to the replay side ([`replay`], on the agent's runtime) as it comes, body streamed. Every request
//! seen ends up replayed or lost with a reason ([`LostRequests`]); nothing waits for the shadow.
mod compare;
mod flows;
mod h2;
mod http;
mod replay;
mod tcp;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mirror_common::{MAX_RING_CHUNKS, MAX_RING_COPY, RING_AFTER_LOSS, RING_CHUNK_SHIFT};
use serde::{Deserialize, Serialize};

pub use self::compare::Difference;
use self::{flows::Flows, http::Head, replay::Replayer};
pub use super::latency::{LATENCY_BUCKETS, Latency};
use super::{
    observe::Observed,
    ring::{RingCopy, SessionCounters, Sink},
};

/// `shadow = { url = "http://HOST:PORT", … }`: what a shadow target says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Where requests are replayed: `http://HOST[:PORT]` (plain HTTP; the host a name or an
    /// address). Nothing else is ever sent anywhere.
    pub url: String,
    /// Compare each shadow answer with the live one (status, headers, body).
    #[serde(default)]
    pub compare: bool,
    /// The `Host` header the shadow gets: `"shadow"` (its URL's) or `"keep"` (the client's).
    #[serde(default)]
    pub host: HostHeader,
    /// A header added to every replayed request, `"name: value"`; `""` for none.
    #[serde(default = "default_mark")]
    pub mark: String,
    /// Headers left out of replayed requests (`Authorization`, `Cookie`…).
    #[serde(default)]
    pub strip_headers: Vec<String>,
    /// Only these methods are replayed (all when empty).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Only paths under one of these prefixes, or matching one of these globs (`*` in it), are
    /// replayed (all when empty).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Only requests with each of these headers: `"name"` (present) or `"name: value"` (equal).
    #[serde(default)]
    pub headers: Vec<String>,
    /// Replay this share of the connections (each connection wholly or not at all), 1-100.
    #[serde(default = "default_percent")]
    pub percent: u8,
    /// At most this many requests a second are replayed.
    pub requests_per_second: Option<u32>,
    /// A replayed request that has no whole answer after this long is lost (`timeout`).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests handed to the shadow and not answered yet, at most; more are lost (`busy`).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Connections followed at once; a new one past it ends the longest idle (`evicted`).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Bytes held per connection: segments out of order, and request bytes queued for the
    /// shadow. Past it the stream skips ahead (a gap) or the request is lost (`busy`).
    #[serde(default = "default_max_connection_bytes")]
    pub max_connection_bytes: u32,
    /// Request bytes queued for the shadow over all connections, at most.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: u64,
    /// A connection with no packet for this long is forgotten (`evicted`).
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u32,
    /// Headers that compare ignores besides the ones that differ in every exchange (`Date`,
    /// `Server`, request and trace ids…).
    #[serde(default)]
    pub ignore_headers: Vec<String>,
    /// JSON fields (object keys, at any depth) that compare ignores.
    #[serde(default)]
    pub ignore_fields: Vec<String>,
    /// Body bytes compare reads of each answer; longer bodies compare by length and these bytes.
    #[serde(default = "default_compare_body_bytes")]
    pub compare_body_bytes: u32,
}

/// [`ShadowConfig::host`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostHeader {
    #[default]
    Shadow,
    Keep,
}

fn default_mark() -> String {
    "x-mirror-shadow: 1".into()
}
fn default_percent() -> u8 {
    100
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_max_in_flight() -> u32 {
    1_024
}
fn default_max_connections() -> u32 {
    4_096
}
fn default_max_connection_bytes() -> u32 {
    32 << 20
}
fn default_max_queued_bytes() -> u64 {
    256 << 20
}
fn default_idle_timeout_s() -> u32 {
    120
}
fn default_compare_body_bytes() -> u32 {
    1 << 20
}

impl ShadowConfig {
    /// The config with only a URL (the quick form's `--shadow URL`).
    pub fn of_url(url: &str) -> Self {
        toml::from_str(&format!("url = {}", toml::Value::from(url)))
            .expect("a URL alone is a whole config")
    }

    /// The checked target; the message says what is wrong.
    pub fn resolve(&self) -> Result<super::Target, String> {
        self.checked()
            .map(|target| super::Target::Shadow(Box::new(target)))
    }

    /// The config checked, as a target of its own.
    pub fn checked(&self) -> Result<ShadowTarget, String> {
        let (host, port) = parse_url(&self.url)?;
        if !(1..=100).contains(&self.percent) {
            return Err(format!("percent = {}: a share from 1 to 100", self.percent));
        }
        for (what, value) in [
            ("timeout_ms", self.timeout_ms),
            ("max_in_flight", u64::from(self.max_in_flight)),
            ("max_connections", u64::from(self.max_connections)),
            ("max_connection_bytes", u64::from(self.max_connection_bytes)),
            ("max_queued_bytes", self.max_queued_bytes),
            ("idle_timeout_s", u64::from(self.idle_timeout_s)),
        ] {
            if value == 0 {
                return Err(format!("{what} = 0: it must be at least 1"));
            }
        }
        if self.requests_per_second == Some(0) {
            return Err("requests_per_second = 0: leave it out for no limit".into());
        }
        if !self.mark.is_empty() {
            header_line(&self.mark).map_err(|e| format!("mark = {:?}: {e}", self.mark))?;
        }
        for name in self.strip_headers.iter().chain(&self.ignore_headers) {
            hyper::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
        }
        for line in &self.headers {
            match line.split_once(':') {
                Some(_) => header_line(line).map(|_| ()),
                None => hyper::header::HeaderName::from_bytes(line.trim().as_bytes())
                    .map(|_| ())
                    .map_err(|_| "not a header name".to_owned()),
            }
            .map_err(|e| format!("headers: {line:?}: {e}"))?;
        }
        for method in &self.methods {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!(
                    "methods: {method:?} is not a method (upper case, like \"GET\")"
                ));
            }
        }
        for path in &self.paths {
            if !path.starts_with('/') {
                return Err(format!("paths: {path:?} must start with /"));
            }
            glob::Pattern::new(path).map_err(|e| format!("paths: {path:?}: {e}"))?;
        }
        Ok(ShadowTarget {
            config: self.clone(),
            observe: None,
            authority: if port == 80 {
                host.clone()
            } else {
                format!("{host}:{port}")
            },
            host,
            port,
        })
    }
}

/// `http://HOST[:PORT][/]`: the host and port.
fn parse_url(url: &str) -> Result<(String, u16), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("url = {url:?}: not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "url = {url:?}: the shadow speaks plain HTTP (no TLS): shadow where the traffic \
                 is plaintext, and give an http:// URL"
            ));
        }
        _ => return Err(format!("url = {url:?}: give an http://HOST:PORT URL")),
    }
    if uri.path() != "/" || uri.query().is_some() {
        return Err(format!(
            "url = {url:?}: requests keep their own paths: give only http://HOST:PORT"
        ));
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("url = {url:?}: no host"))?;
    Ok((host.to_owned(), uri.port_u16().unwrap_or(80)))
}

/// `name: value`, checked.
fn header_line(
    line: &str,
) -> Result<(hyper::header::HeaderName, hyper::header::HeaderValue), String> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| "give \"name: value\"".to_owned())?;
    let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("{:?} is not a header name", name.trim()))?;
    let value = hyper::header::HeaderValue::from_str(value.trim())
        .map_err(|_| format!("{:?} is not a header value", value.trim()))?;
    Ok((name, value))
}

/// A shadow target, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowTarget {
    pub config: ShadowConfig,
    /// The session's `observe`: its exchanges are also counted by service.
    pub observe: Option<super::observe::ObserveConfig>,
    /// The URL's host and port, and the two as a `Host` header.
    pub host: String,
    pub port: u16,
    pub authority: String,
}

impl ShadowTarget {
    pub fn url(&self) -> String {
        format!("http://{}", self.authority)
    }
}

mirror_common::counters! {
    /// Requests a shadow session saw and did not replay, by reason.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(default)]
    pub struct LostRequests {
        /// The ring refused copies of the session, and this request was in them.
        ring_full => "shadow_lost_ring_full",
        /// Bytes of the request never reached the agent (lost before the hook, or the agent joined the connection in the middle of it).
        gap => "shadow_lost_gap",
        /// Its connection was forgotten (idle, too many connections, or the agent stopped) before it was whole, or the agent stopped before the shadow answered it.
        evicted => "shadow_lost_evicted",
        /// The session's methods, paths or headers did not select it.
        filtered_out => "shadow_lost_filtered_out",
        /// Its connection is not in the session's `percent`.
        sampled_out => "shadow_lost_sampled_out",
        /// Over `requests_per_second`.
        rate_limited => "shadow_lost_rate_limited",
        /// Over `max_in_flight`, or its bytes over what may be queued for the shadow.
        busy => "shadow_lost_busy",
        /// The shadow did not answer it whole within `timeout_ms`.
        timeout => "shadow_lost_timeout",
        /// The shadow could not be reached, or broke the exchange.
        shadow_error => "shadow_lost_shadow_error",
        /// It upgraded the connection to another protocol (WebSocket, h2c), or was a CONNECT.
        upgrade => "shadow_lost_upgrade",
        /// It could not be read as HTTP/1.x, or its HTTP/2 header list was over the bound.
        unreadable => "shadow_lost_unreadable",
        /// Its HTTP/2 stream was reset (`RST_STREAM`), or answered and closed, before the request was whole.
        reset => "shadow_lost_reset",
        /// An HTTP/2 request on a connection whose header compression state is unknown (first seen in the middle, or bytes of it lost): counted by its frames, never guessed at.
        undecodable => "shadow_lost_undecodable",
    }
}

/// A reason a request was lost: one of [`LostRequests`]'s fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    RingFull,
    Gap,
    Evicted,
    FilteredOut,
    SampledOut,
    RateLimited,
    Busy,
    Timeout,
    ShadowError,
    Upgrade,
    Unreadable,
    Reset,
    Undecodable,
}

impl LostRequests {
    fn count(&mut self, why: Reason) {
        *match why {
            Reason::RingFull => &mut self.ring_full,
            Reason::Gap => &mut self.gap,
            Reason::Evicted => &mut self.evicted,
            Reason::FilteredOut => &mut self.filtered_out,
            Reason::SampledOut => &mut self.sampled_out,
            Reason::RateLimited => &mut self.rate_limited,
            Reason::Busy => &mut self.busy,
            Reason::Timeout => &mut self.timeout,
            Reason::ShadowError => &mut self.shadow_error,
            Reason::Upgrade => &mut self.upgrade,
            Reason::Unreadable => &mut self.unreadable,
            Reason::Reset => &mut self.reset,
            Reason::Undecodable => &mut self.undecodable,
        } += 1;
    }

    pub fn total(&self) -> u64 {
        self.values().sum()
    }
}

/// What compare found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Compared {
    pub same: u64,
    pub differ: u64,
    /// Replayed exchanges that could not be compared: the live answer was not seen whole.
    pub errors: u64,
}

/// Differing exchanges kept for `status`.
const MAX_SAMPLES: usize = 16;

/// What a shadow session counted, in this configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShadowStats {
    /// The shadow's URL.
    pub url: String,
    /// Requests seen: `replayed + lost + in_flight`.
    pub requests: u64,
    /// Requests the shadow answered (whatever its status).
    pub replayed: u64,
    pub lost: LostRequests,
    /// Handed to the shadow, not answered yet.
    pub in_flight: u64,
    pub compared: Compared,
    /// The first differing exchanges (method, path, what differed).
    pub differences: Vec<Difference>,
    /// Connections followed; of them, joined in the middle (their first requests may be lost
    /// as `gap`); and forgotten before they ended.
    pub connections: u64,
    pub joined_mid_stream: u64,
    pub evicted_connections: u64,
    /// From a request's last byte to its answer's first, on the wire and from the shadow.
    pub live_latency: Latency,
    pub shadow_latency: Latency,
}

impl ShadowStats {
    /// Adds what an earlier configuration of the same session counted (`earlier`) to these.
    pub fn absorb(&mut self, earlier: &ShadowStats) {
        self.requests += earlier.requests;
        self.replayed += earlier.replayed;
        self.lost += earlier.lost;
        self.in_flight += earlier.in_flight;
        self.compared.same += earlier.compared.same;
        self.compared.differ += earlier.compared.differ;
        self.compared.errors += earlier.compared.errors;
        // The first differing exchanges: the earlier ones first.
        let later = std::mem::replace(&mut self.differences, earlier.differences.clone());
        self.differences.extend(later);
        self.differences.truncate(MAX_SAMPLES);
        self.connections += earlier.connections;
        self.joined_mid_stream += earlier.joined_mid_stream;
        self.evicted_connections += earlier.evicted_connections;
        self.live_latency.absorb(&earlier.live_latency);
        self.shadow_latency.absorb(&earlier.shadow_latency);
    }

    /// The counts on one line of `name=count` fields, for a summary on exit.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut line = format!(
            "shadow {}  requests={} replayed={} in_flight={} lost={}",
            self.url,
            self.requests,
            self.replayed,
            self.in_flight,
            self.lost.total()
        );
        for (field, n) in self.lost.named() {
            let _ = write!(line, " {}={n}", field.name);
        }
        let Compared {
            same,
            differ,
            errors,
        } = self.compared;
        let _ = write!(line, "  same={same} differ={differ} errors={errors}");
        line
    }
}

/// A session's [`ShadowStats`], shared by its sink, its replay tasks and the API.
#[derive(Debug, Clone, Default)]
pub struct Shared(Arc<Mutex<ShadowStats>>);

impl Shared {
    pub fn read(&self) -> ShadowStats {
        let mut stats = self.lock().clone();
        stats.in_flight = stats
            .requests
            .saturating_sub(stats.replayed + stats.lost.total());
        stats
    }

    fn update(&self, f: impl FnOnce(&mut ShadowStats)) {
        f(&mut self.lock());
    }

    fn lost(&self, why: Reason) {
        self.lock().lost.count(why);
    }

    fn differ(&self, head: &Head, differences: Vec<String>) {
        let mut stats = self.lock();
        stats.compared.differ += 1;
        if stats.differences.len() < MAX_SAMPLES {
            tracing::info!(
                "shadow {}: {} {} differs: {}",
                stats.url,
                head.method,
                head.target,
                differences.join("; ")
            );
            stats.differences.push(Difference {
                method: head.method.clone(),
                path: head.target.clone(),
                differences,
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ShadowStats> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The limits and selections the flows apply, from the config.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests go to a shadow (false: the session is observed only).
    pub replays: bool,
    pub compare: bool,
    pub compare_body_bytes: usize,
    pub max_connections: usize,
    pub max_connection_bytes: usize,
    pub idle_timeout: Duration,
    pub requests_per_second: Option<u32>,
    percent: u8,
    methods: Vec<String>,
    paths: Vec<glob::Pattern>,
    prefixes: Vec<String>,
    headers: Vec<(String, Option<String>)>,
}

impl Limits {
    fn of(config: &ShadowConfig) -> Self {
        let (globs, prefixes): (Vec<_>, Vec<_>) = config
            .paths
            .iter()
            .partition(|p| p.contains(['*', '?', '[']));
        Limits {
            replays: true,
            compare: config.compare,
            compare_body_bytes: config.compare_body_bytes as usize,
            max_connections: config.max_connections as usize,
            max_connection_bytes: config.max_connection_bytes as usize,
            idle_timeout: Duration::from_secs(u64::from(config.idle_timeout_s)),
            requests_per_second: config.requests_per_second,
            percent: config.percent,
            methods: config.methods.clone(),
            paths: globs
                .into_iter()
                .filter_map(|g| glob::Pattern::new(g).ok())
                .collect(),
            prefixes: prefixes.into_iter().cloned().collect(),
            headers: config
                .headers
                .iter()
                .map(|line| match line.split_once(':') {
                    Some((name, value)) => (name.trim().to_owned(), Some(value.trim().to_owned())),
                    None => (line.trim().to_owned(), None),
                })
                .collect(),
        }
    }

    /// An observed session's without a shadow: every connection and request is read, within the
    /// shadow's default bounds.
    fn observing() -> Self {
        Limits {
            replays: false,
            compare: false,
            compare_body_bytes: 0,
            max_connections: default_max_connections() as usize,
            max_connection_bytes: default_max_connection_bytes() as usize,
            idle_timeout: Duration::from_secs(u64::from(default_idle_timeout_s())),
            requests_per_second: None,
            percent: 100,
            methods: Vec::new(),
            paths: Vec::new(),
            prefixes: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Whether a connection from `client` is in the session's share: by a hash of the client's
    /// address and port, so that a connection is replayed wholly or not at all.
    pub fn selects(&self, client: SocketAddr) -> bool {
        use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
        self.percent >= 100
            || BuildHasherDefault::<DefaultHasher>::default().hash_one(client) % 100
                < u64::from(self.percent)
    }

    /// Whether a request is one the session replays (methods, paths, headers).
    pub fn matches(&self, head: &Head) -> bool {
        let path = head.target.split('?').next().unwrap_or_default();
        (self.methods.is_empty() || self.methods.contains(&head.method))
            && (self.paths.is_empty() && self.prefixes.is_empty()
                || self.prefixes.iter().any(|p| path.starts_with(p.as_str()))
                || self.paths.iter().any(|g| g.matches(path)))
            && self
                .headers
                .iter()
                .all(|(name, value)| match (head.header(name), value) {
                    (Some(got), Some(want)) => got.trim_ascii() == want.as_bytes(),
                    (Some(_), None) => true,
                    (None, _) => false,
                })
    }
}

/// A frame longer than one ring record, being joined from its chunks.
#[derive(Debug)]
struct Partial {
    /// The frame's wall-clock timestamp and interface, shared by its chunks.
    key: (Duration, u64),
    frame: Vec<u8>,
    orig_len: u32,
    /// When its first chunk was read.
    since: Instant,
}

/// Partial frames held at once (chunks of frames from other CPUs come between a frame's own).
const MAX_PARTIALS: usize = 8;

/// How long a frame's first chunks wait for the rest before it goes on cut. The kernel writes a
/// frame's chunks one after another, so a drain that finds the ring empty may be between two of
/// them: only a frame whose later chunks the ring refused waits this long.
const CHUNK_WAIT: Duration = Duration::from_millis(200);

/// The frames being joined from their chunks.
#[derive(Debug, Default)]
struct Chunks(Vec<Partial>);

impl Chunks {
    /// Takes chunk `chunk` of a frame (`whole` bytes in all): the frames done, whole or (the
    /// oldest, when too many are held) cut.
    fn push(
        &mut self,
        copy: &RingCopy<'_>,
        chunk: u32,
        whole: usize,
        now: Instant,
    ) -> Vec<Partial> {
        let key = (copy.timestamp, copy.interface);
        let mut done = Vec::new();
        if chunk == 0 {
            if self.0.len() == MAX_PARTIALS {
                done.push(self.0.remove(0));
            }
            self.0.push(Partial {
                key,
                frame: copy.frame.to_vec(),
                orig_len: copy.orig_len,
                since: now,
            });
            return done;
        }
        // A chunk whose first ones were lost is dropped: the frame's headers went with them.
        if let Some(at) = self.0.iter().position(|p| p.key == key) {
            let partial = &mut self.0[at];
            if partial.frame.len() == chunk as usize * MAX_RING_COPY as usize {
                partial.frame.extend_from_slice(copy.frame);
            }
            if partial.frame.len() >= whole {
                done.push(self.0.remove(at));
            }
        }
        done
    }

    /// The frames whose later chunks have not come within [`CHUNK_WAIT`] (all of them with
    /// `everything`), oldest first.
    fn overdue(&mut self, now: Instant, everything: bool) -> Vec<Partial> {
        let (due, waiting) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|p| everything || now.duration_since(p.since) >= CHUNK_WAIT);
        self.0 = waiting;
        due
    }
}

/// The ring drain's side of a shadow session, or of an observed one (`replay` is `None`).
#[derive(Debug)]
pub struct ShadowSink {
    flows: Flows,
    replay: Option<Replayer>,
    chunks: Chunks,
}

impl ShadowSink {
    /// A sink replaying to `target` from tasks on a runtime of its own, and counting the
    /// exchanges as services' with `observed`.
    pub fn open(
        target: &ShadowTarget,
        stats: Shared,
        observed: Option<Observed>,
    ) -> anyhow::Result<Self> {
        stats.update(|s| s.url = target.url());
        Ok(ShadowSink {
            flows: Flows::new(Limits::of(&target.config), stats.clone(), observed),
            replay: Some(Replayer::new(target, stats).context("starting the shadow's runtime")?),
            chunks: Chunks::default(),
        })
    }

    /// A sink that only counts the exchanges as services' (an observed session without a
    /// shadow).
    pub fn observing(observed: Observed) -> Self {
        ShadowSink {
            flows: Flows::new(Limits::observing(), Shared::default(), Some(observed)),
            replay: None,
            chunks: Chunks::default(),
        }
    }

    /// Takes one frame (Ethernet first; `orig_len` its length on the wire) seen at `at`.
    pub fn frame(&mut self, frame: &[u8], orig_len: u32, at: Duration) {
        if let Some(segment) = tcp::segment(frame, orig_len) {
            self.flows.segment(&segment, at, &mut self.replay);
        }
    }

    /// Frames joined from chunks (cut when some never came).
    fn frames(&mut self, joined: Vec<Partial>) {
        for partial in joined {
            self.frame(&partial.frame, partial.orig_len, partial.key.0);
        }
    }

    /// Ends the connections idle for longer than the idle timeout; call it at least once a
    /// second.
    pub fn sweep(&mut self) {
        self.flows.sweep(&mut self.replay);
    }
}

/// A frame's length in the ring, all chunks together.
fn whole_len(orig_len: u32) -> usize {
    orig_len.min(MAX_RING_COPY * MAX_RING_CHUNKS) as usize
}

impl Sink for ShadowSink {
    fn push(&mut self, copy: &RingCopy<'_>, counters: &SessionCounters) {
        counters.sent(1);
        if copy.flags & RING_AFTER_LOSS != 0 {
            self.flows.ring_lost();
        }
        let chunk = (copy.flags >> RING_CHUNK_SHIFT) & 0xff;
        let whole = whole_len(copy.orig_len);
        if chunk == 0 && copy.frame.len() >= whole {
            self.frame(copy.frame, copy.orig_len, copy.timestamp);
            return;
        }
        let done = self.chunks.push(copy, chunk, whole, Instant::now());
        self.frames(done);
    }

    fn lost_at_end(&mut self) {
        self.flows.ring_lost_at_end();
    }

    fn flush(&mut self, _counters: &SessionCounters) {
        let due = self.chunks.overdue(Instant::now(), false);
        self.frames(due);
        self.sweep();
    }
}

impl Drop for ShadowSink {
    /// The session ends: connections are closed and requests in flight get a moment to finish.
    fn drop(&mut self) {
        let held = self.chunks.overdue(Instant::now(), true);
        self.frames(held);
        self.flows.finish(&mut self.replay);
        if let Some(replay) = &mut self.replay {
            replay.stop(Duration::from_secs(3));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_configs_are_checked() {
        let ok = ShadowConfig::of_url("http://checkout-v2.shop:8080");
        let Ok(super::super::Target::Shadow(target)) = ok.resolve() else {
            panic!("a good URL");
        };
        assert_eq!(
            (target.host.as_str(), target.port),
            ("checkout-v2.shop", 8080)
        );
        assert_eq!(target.url(), "http://checkout-v2.shop:8080");
        assert_eq!(ok.mark, "x-mirror-shadow: 1");
        for (url, message) in [
            ("https://a:443", "no TLS"),
            ("ftp://a", "give an http://HOST:PORT URL"),
            ("http://a:8080/v2", "requests keep their own paths"),
            ("not a url", "not a URL"),
        ] {
            let error = ShadowConfig::of_url(url).resolve().expect_err(url);
            assert!(error.contains(message), "{url}: {error}");
        }
        let with = |text: &str| {
            toml::from_str::<ShadowConfig>(&format!("url = \"http://a:1\"\n{text}"))
                .map_err(|e| e.to_string())
                .and_then(|c| c.resolve().map(|_| ()))
        };
        for (text, message) in [
            ("percent = 0", "a share from 1 to 100"),
            ("methods = [\"get\"]", "upper case"),
            ("paths = [\"api\"]", "must start with /"),
            ("mark = \"nocolon\"", "name: value"),
            ("headers = [\"bad name: 1\"]", "not a header name"),
            ("timeout_ms = 0", "at least 1"),
            ("retries = 3", "unknown field `retries`"),
        ] {
            let error = with(text).expect_err(text);
            assert!(error.contains(message), "{text}: {error}");
        }
        assert_eq!(
            with("paths = [\"/api/\", \"/v*/orders\"]\nheaders = [\"x-canary\"]"),
            Ok(())
        );
    }

    #[test]
    fn requests_are_selected_by_method_path_and_header() {
        let config: ShadowConfig = toml::from_str(
            "url = \"http://a:1\"\nmethods = [\"GET\", \"POST\"]\npaths = [\"/api/\", \"/v*/orders\"]\nheaders = [\"x-tenant: blue\"]",
        )
        .expect("config");
        let limits = Limits::of(&config);
        let head = |method: &str, target: &str, tenant: Option<&str>| Head {
            method: method.into(),
            target: target.into(),
            headers: tenant
                .map(|t| ("X-Tenant".to_owned(), t.as_bytes().to_vec()))
                .into_iter()
                .collect(),
            ..Head::default()
        };
        assert!(limits.matches(&head("GET", "/api/cart?x=1", Some("blue"))));
        assert!(limits.matches(&head("POST", "/v2/orders", Some("blue"))));
        assert!(!limits.matches(&head("DELETE", "/api/cart", Some("blue"))));
        assert!(!limits.matches(&head("GET", "/health", Some("blue"))));
        assert!(!limits.matches(&head("GET", "/api/cart", Some("green"))));
        assert!(!limits.matches(&head("GET", "/api/cart", None)));
    }

    #[test]
    fn percent_keeps_about_that_share_of_connections() {
        let config: ShadowConfig =
            toml::from_str("url = \"http://a:1\"\npercent = 30").expect("config");
        let limits = Limits::of(&config);
        let kept = (0..2000u16)
            .filter(|port| limits.selects(SocketAddr::from(([10, 0, 0, 1], 20000 + port))))
            .count();
        assert!((450..750).contains(&kept), "{kept} of 2000");
        let client = SocketAddr::from(([10, 0, 0, 1], 40000));
        assert_eq!(limits.selects(client), limits.selects(client));
    }

    #[test]
    fn a_frame_is_joined_from_its_chunks_across_an_empty_ring() {
        let chunk_len = MAX_RING_COPY as usize;
        let frame: Vec<u8> = (0..chunk_len * 2 + 100).map(|i| (i % 251) as u8).collect();
        let whole = frame.len();
        let copy = |at: u64, chunk: usize| RingCopy {
            frame: &frame[chunk * chunk_len..((chunk + 1) * chunk_len).min(whole)],
            orig_len: u32::try_from(whole).expect("length"),
            flow_hash: 0,
            interface: 1,
            interface_name: &String::new,
            timestamp: Duration::from_secs(at),
            flags: 0,
        };
        let start = Instant::now();
        let mut chunks = Chunks::default();
        assert!(chunks.push(&copy(1, 0), 0, whole, start).is_empty());
        // The drain finds the ring empty between two chunks: nothing is due yet.
        assert!(chunks.overdue(start, false).is_empty());
        assert!(chunks.push(&copy(1, 1), 1, whole, start).is_empty());
        let done = chunks.push(&copy(1, 2), 2, whole, start);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].frame, frame);
        // A frame whose last chunk the ring refused goes on cut once it waited long enough...
        assert!(chunks.push(&copy(2, 0), 0, whole, start).is_empty());
        assert!(chunks.push(&copy(2, 1), 1, whole, start).is_empty());
        assert!(chunks.overdue(start + CHUNK_WAIT / 2, false).is_empty());
        let cut = chunks.overdue(start + CHUNK_WAIT, false);
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].frame, frame[..chunk_len * 2]);
        // ...and a chunk whose first was refused is dropped.
        assert!(chunks.push(&copy(3, 1), 1, whole, start).is_empty());
        assert!(chunks.overdue(start, true).is_empty());
    }
}
