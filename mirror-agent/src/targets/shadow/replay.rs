//! The replay side: one task per client connection on the agent's runtime, with one keep-alive
//! connection to the shadow (hyper), so that a client's requests reach the shadow in its order.
//! An HTTP/2 client connection gets one HTTP/2 connection to the shadow, and each of its streams
//! a task of its own on it, as the client multiplexed them.
//! The flows hand requests over through an unbounded queue whose bytes are counted against the
//! limits, so the drain never waits, and a shadow that is slow or down only loses requests
//! (counted), never slows the capture.
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::future;
use http_body_util::{BodyExt as _, Either, Empty, channel::Channel};
use hyper::{
    HeaderMap, Request,
    header::{HeaderName, HeaderValue},
};
use tokio::{
    sync::mpsc,
    time::{Instant, timeout_at},
};

use super::{
    Reason, ShadowTarget, Shared,
    compare::{self, Answer, Ignore},
    flows::Replay,
    http::{Framing, Head, Side, Version},
};

type ReplayBody = Either<Empty<Bytes>, Channel<Bytes>>;
type Fields = Vec<(String, Vec<u8>)>;

/// What a connection's task is told, in the order the flows saw it.
#[derive(Debug)]
enum Command {
    Start { id: u64, head: Head },
    Body { id: u64, data: Bytes },
    End { id: u64, trailers: Fields },
    Abort { id: u64, why: Reason },
    Live { id: u64, answer: Answer },
}

/// What every task of a session shares.
#[derive(Debug)]
struct Settings {
    host: String,
    port: u16,
    authority: HeaderValue,
    keep_host: bool,
    mark: Option<(HeaderName, HeaderValue)>,
    strip: Vec<HeaderName>,
    timeout: Duration,
    max_in_flight: usize,
    max_connection_bytes: usize,
    max_queued_bytes: usize,
    compare: bool,
    compare_body_bytes: usize,
    ignore: Ignore,
    stats: Shared,
    /// Requests handed over and not finished, and request bytes queued, all connections.
    in_flight: AtomicUsize,
    queued: AtomicUsize,
}

/// A connection's queue to its task.
#[derive(Debug)]
struct Queue {
    commands: mpsc::UnboundedSender<Command>,
    /// Request bytes queued for it.
    queued: Arc<AtomicUsize>,
}

/// The replay side of one shadow session.
#[derive(Debug)]
pub struct Replayer {
    /// The shadow's own runtime, so that replays never wait on the agent's control tasks (nor
    /// those on them), and a stop can let them finish; gone once stopped.
    runtime: Option<tokio::runtime::Runtime>,
    settings: Arc<Settings>,
    queues: HashMap<u64, Queue>,
}

/// Headers that belong to one hop, never replayed as they are.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "host",
];

impl Replayer {
    pub fn new(target: &ShadowTarget, stats: Shared) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mirror-shadow")
            .enable_all()
            .build()?;
        let config = &target.config;
        let names = |list: &[String]| -> Vec<HeaderName> {
            list.iter()
                .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
                .collect()
        };
        let settings = Settings {
            host: target.host.clone(),
            port: target.port,
            authority: HeaderValue::from_str(&target.authority)
                .unwrap_or(HeaderValue::from_static("shadow")),
            keep_host: config.host == super::HostHeader::Keep,
            mark: super::header_line(&config.mark).ok(),
            strip: names(&config.strip_headers),
            timeout: Duration::from_millis(config.timeout_ms),
            max_in_flight: config.max_in_flight as usize,
            max_connection_bytes: config.max_connection_bytes as usize,
            max_queued_bytes: usize::try_from(config.max_queued_bytes).unwrap_or(usize::MAX),
            compare: config.compare,
            compare_body_bytes: config.compare_body_bytes as usize,
            ignore: Ignore {
                headers: names(&config.ignore_headers)
                    .iter()
                    .map(|n| n.as_str().to_owned())
                    .collect(),
                fields: config.ignore_fields.clone(),
            },
            stats,
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
        };
        Ok(Replayer {
            runtime: Some(runtime),
            settings: Arc::new(settings),
            queues: HashMap::new(),
        })
    }

    /// Waits (this thread) up to `limit` for the requests in flight to finish, then ends the
    /// replays: those still unanswered are lost, `evicted`.
    pub fn stop(&mut self, limit: Duration) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        self.queues.clear();
        let deadline = std::time::Instant::now() + limit;
        while self.settings.in_flight.load(Ordering::Acquire) != 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            // Not the drain's thread: a sink dropped before it ran, with nothing in flight.
            runtime.shutdown_background();
        } else {
            // Tasks are dropped at their next await; the worker is gone when this returns.
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
        let unanswered = self.settings.in_flight.swap(0, Ordering::AcqRel) as u64;
        if unanswered != 0 {
            self.settings.stats.update(|s| s.lost.evicted += unanswered);
        }
    }

    fn send(&self, conn: u64, command: Command) {
        if let Some(queue) = self.queues.get(&conn) {
            let _ = queue.commands.send(command);
        }
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

impl Replay for Replayer {
    fn start(&mut self, conn: u64, id: u64, head: &Head) -> bool {
        let settings = &self.settings;
        if settings.in_flight.load(Ordering::Acquire) >= settings.max_in_flight {
            return false;
        }
        let Some(runtime) = &self.runtime else {
            return false;
        };
        let queue = self.queues.entry(conn).or_insert_with(|| {
            let (commands, receiver) = mpsc::unbounded_channel();
            let queued = Arc::new(AtomicUsize::new(0));
            let settings = Arc::clone(&self.settings);
            match head.version {
                Version::Http1(_) => {
                    runtime.spawn(connection(receiver, settings, Arc::clone(&queued)))
                }
                Version::Http2 { .. } => {
                    runtime.spawn(multiplexed(receiver, settings, Arc::clone(&queued)))
                }
            };
            Queue { commands, queued }
        });
        settings.in_flight.fetch_add(1, Ordering::AcqRel);
        if queue
            .commands
            .send(Command::Start {
                id,
                head: head.clone(),
            })
            .is_err()
        {
            settings.in_flight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn body(&mut self, conn: u64, id: u64, data: &[u8]) -> bool {
        let settings = &self.settings;
        let Some(queue) = self.queues.get(&conn) else {
            return false;
        };
        let len = data.len();
        if queue.queued.load(Ordering::Acquire) + len > settings.max_connection_bytes
            || settings.queued.load(Ordering::Acquire) + len > settings.max_queued_bytes
        {
            return false;
        }
        queue.queued.fetch_add(len, Ordering::AcqRel);
        settings.queued.fetch_add(len, Ordering::AcqRel);
        let data = Bytes::copy_from_slice(data);
        if queue.commands.send(Command::Body { id, data }).is_err() {
            queue.queued.fetch_sub(len, Ordering::AcqRel);
            settings.queued.fetch_sub(len, Ordering::AcqRel);
        }
        true
    }

    fn end(&mut self, conn: u64, id: u64, trailers: Fields) {
        self.send(conn, Command::End { id, trailers });
    }

    fn abort(&mut self, conn: u64, id: u64, why: Reason) {
        self.send(conn, Command::Abort { id, why });
    }

    fn live_answer(&mut self, conn: u64, id: u64, answer: Answer) {
        self.send(conn, Command::Live { id, answer });
    }

    fn close(&mut self, conn: u64) {
        self.queues.remove(&conn);
    }
}

/// A request's end as the task saw it.
enum Outcome {
    Answered(Answer),
    Lost(Reason),
}

/// The task of one client connection: its requests, one after the other, to its own connection
/// to the shadow; then compares answers, when asked to.
async fn connection(
    mut commands: mpsc::UnboundedReceiver<Command>,
    settings: Arc<Settings>,
    queued: Arc<AtomicUsize>,
) {
    let mut task = Task {
        settings: &settings,
        queued: &queued,
        shadow: None,
        shadow_answers: HashMap::new(),
        live_answers: HashMap::new(),
        heads: HashMap::new(),
    };
    let mut next = None;
    loop {
        let command = match next.take() {
            Some(command) => command,
            None => match commands.recv().await {
                Some(command) => command,
                None => break,
            },
        };
        match command {
            Command::Start { id, head } => {
                let outcome = task.exchange(id, &head, &mut commands, &mut next).await;
                task.finished(id, head, outcome);
            }
            Command::Live { id, answer } => task.live(id, answer),
            Command::Body { data, .. } => task.dequeued(data.len()),
            Command::End { .. } | Command::Abort { .. } => {}
        }
    }
    task.unmatched();
}

/// The task of an HTTP/2 client connection: one HTTP/2 connection to the shadow, made when the
/// first request comes (again once it closed), and each request on a [`stream`] task of its
/// own, which gets the commands of its request as the flows saw them.
async fn multiplexed(
    mut commands: mpsc::UnboundedReceiver<Command>,
    settings: Arc<Settings>,
    queued: Arc<AtomicUsize>,
) {
    let mut shadow: Option<Http2Sender> = None;
    let mut streams: HashMap<u64, mpsc::UnboundedSender<Command>> = HashMap::new();
    let dequeued = |len: usize| {
        queued.fetch_sub(len, Ordering::AcqRel);
        settings.queued.fetch_sub(len, Ordering::AcqRel);
    };
    while let Some(command) = commands.recv().await {
        let id = match command {
            Command::Start { id, head } => {
                streams.retain(|_, stream| !stream.is_closed());
                match connect_http2(&settings, &mut shadow).await {
                    Ok(sender) => {
                        let (to_stream, stream_commands) = mpsc::unbounded_channel();
                        streams.insert(id, to_stream);
                        tokio::spawn(stream(
                            stream_commands,
                            Arc::clone(&settings),
                            Arc::clone(&queued),
                            sender,
                            id,
                            head,
                        ));
                    }
                    Err(why) => {
                        // Its later commands find no stream, and are dropped.
                        settings.in_flight.fetch_sub(1, Ordering::AcqRel);
                        settings.stats.lost(why);
                    }
                }
                continue;
            }
            Command::Body { id, .. }
            | Command::End { id, .. }
            | Command::Abort { id, .. }
            | Command::Live { id, .. } => id,
        };
        let unsent = match streams.get(&id) {
            Some(stream) => stream.send(command).err().map(|e| e.0),
            None => Some(command),
        };
        if let Some(Command::Body { data, .. }) = unsent {
            dequeued(data.len());
        }
    }
}

/// The HTTP/2 connection to the shadow, made (again) when there is none or it closed.
async fn connect_http2(
    settings: &Settings,
    shadow: &mut Option<Http2Sender>,
) -> Result<Http2Sender, Reason> {
    if let Some(sender) = shadow.as_ref().filter(|s| !s.is_closed()) {
        return Ok(sender.clone());
    }
    let deadline = Instant::now() + settings.timeout;
    let stream = connect_tcp(settings, deadline).await?;
    let handshake = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    );
    let (sender, connection) = match timeout_at(deadline, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(_)) => return Err(Reason::ShadowError),
        Err(_) => return Err(Reason::Timeout),
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("shadow connection: {e}");
        }
    });
    Ok(shadow.insert(sender).clone())
}

/// A TCP connection to the shadow, by `deadline`.
async fn connect_tcp(
    settings: &Settings,
    deadline: Instant,
) -> Result<tokio::net::TcpStream, Reason> {
    let connect = tokio::net::TcpStream::connect((settings.host.as_str(), settings.port));
    let stream = match timeout_at(deadline, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!("shadow {}:{}: {e}", settings.host, settings.port);
            return Err(Reason::ShadowError);
        }
        Err(_) => return Err(Reason::Timeout),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// One request of an HTTP/2 client connection, on the connection's shadow connection; then,
/// with compare on, its live answer.
async fn stream(
    mut commands: mpsc::UnboundedReceiver<Command>,
    settings: Arc<Settings>,
    queued: Arc<AtomicUsize>,
    shadow: Http2Sender,
    id: u64,
    head: Head,
) {
    let mut task = Task {
        settings: &settings,
        queued: &queued,
        shadow: Some(Shadow::Http2(shadow)),
        shadow_answers: HashMap::new(),
        live_answers: HashMap::new(),
        heads: HashMap::new(),
    };
    let mut next = None;
    let outcome = task.exchange(id, &head, &mut commands, &mut next).await;
    let waits = settings.compare && matches!(outcome, Outcome::Answered(_));
    task.finished(id, head, outcome);
    // The live answer, or word that it will not come whole (an abort).
    while waits && !task.shadow_answers.is_empty() {
        match commands.recv().await {
            Some(Command::Live { id, answer }) => task.live(id, answer),
            Some(Command::Body { data, .. }) => task.dequeued(data.len()),
            Some(Command::Abort { .. }) | None => break,
            Some(_) => {}
        }
    }
    task.unmatched();
}

/// Live answers or shadow answers waiting for the other, at most, per connection.
const MAX_WAITING: usize = 256;

type Http1Sender = hyper::client::conn::http1::SendRequest<ReplayBody>;
type Http2Sender = hyper::client::conn::http2::SendRequest<ReplayBody>;

/// A task's connection to the shadow.
enum Shadow {
    Http1(Http1Sender),
    /// Shared with the connection's other streams; made by [`multiplexed`].
    Http2(Http2Sender),
}

struct Task<'a> {
    settings: &'a Settings,
    queued: &'a AtomicUsize,
    shadow: Option<Shadow>,
    /// With compare on: answers waiting for the other side's, by request.
    shadow_answers: HashMap<u64, Answer>,
    live_answers: HashMap<u64, Answer>,
    heads: HashMap<u64, Head>,
}

impl Task<'_> {
    /// Replayed exchanges whose live answer never came whole cannot be compared.
    fn unmatched(&self) {
        let unmatched = self.shadow_answers.len() as u64;
        if unmatched != 0 {
            self.settings
                .stats
                .update(|s| s.compared.errors += unmatched);
        }
    }

    fn dequeued(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::AcqRel);
        self.settings.queued.fetch_sub(len, Ordering::AcqRel);
    }

    /// Counts a request's outcome, and compares it once both answers are in.
    fn finished(&mut self, id: u64, head: Head, outcome: Outcome) {
        let stats = &self.settings.stats;
        self.settings.in_flight.fetch_sub(1, Ordering::AcqRel);
        match outcome {
            Outcome::Lost(why) => {
                stats.lost(why);
                self.live_answers.remove(&id);
            }
            Outcome::Answered(answer) => {
                stats.update(|s| s.replayed += 1);
                if !self.settings.compare {
                    return;
                }
                match self.live_answers.remove(&id) {
                    Some(live) => self.compare(&head, &live, &answer),
                    None if self.shadow_answers.len() < MAX_WAITING => {
                        self.shadow_answers.insert(id, answer);
                        self.heads.insert(id, head);
                    }
                    None => stats.update(|s| s.compared.errors += 1),
                }
            }
        }
    }

    fn live(&mut self, id: u64, live: Answer) {
        match (self.shadow_answers.remove(&id), self.heads.remove(&id)) {
            (Some(shadow), Some(head)) => self.compare(&head, &live, &shadow),
            _ if self.live_answers.len() < MAX_WAITING => {
                self.live_answers.insert(id, live);
            }
            _ => {}
        }
    }

    fn compare(&self, head: &Head, live: &Answer, shadow: &Answer) {
        let differences = compare::differences(live, shadow, &self.settings.ignore);
        if differences.is_empty() {
            self.settings.stats.update(|s| s.compared.same += 1);
        } else {
            self.settings.stats.differ(head, differences);
        }
    }

    /// Replays one request: its head now, its body as the flows read it, then its answer, all
    /// within the timeout.
    #[expect(
        clippy::too_many_lines,
        reason = "one exchange's phases, each ending in its outcome, read best in order"
    )]
    async fn exchange(
        &mut self,
        id: u64,
        head: &Head,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        next: &mut Option<Command>,
    ) -> Outcome {
        let deadline = Instant::now() + self.settings.timeout;
        let has_body = match head.version {
            Version::Http1(_) => !matches!(head.framing(Side::Request), Ok(Framing::Length(0))),
            Version::Http2 { body } => body,
        };
        let (mut body, request_body) = if has_body {
            let (sender, body) = Channel::new(8);
            (Some(sender), Either::Right(body))
        } else {
            (None, Either::Left(Empty::new()))
        };
        let request = match self.request(head, request_body) {
            Ok(request) => request,
            Err(e) => {
                tracing::debug!("shadow: {} {}: {e}", head.method, head.target);
                return self
                    .skip_request(id, commands, next, Reason::Unreadable)
                    .await;
            }
        };
        let response = match self.ready(deadline).await {
            Ok(Shadow::Http1(sender)) => future::Either::Left(sender.send_request(request)),
            Ok(Shadow::Http2(sender)) => future::Either::Right(sender.send_request(request)),
            Err(why) => return self.skip_request(id, commands, next, why).await,
        };
        tokio::pin!(response);
        // A request without a body is whole once sent: its answer may come before the flows'
        // end of it reaches this task, and is no early answer then.
        let mut ended = (!has_body).then(Instant::now);
        // The body, as it comes, until its end (or an early answer).
        let answer = loop {
            if ended.is_some() {
                break timeout_at(deadline, &mut response).await;
            }
            tokio::select! {
                answer = &mut response => break Ok(answer),
                () = tokio::time::sleep_until(deadline) => {
                    self.shadow = None;
                    return Outcome::Lost(Reason::Timeout);
                }
                command = commands.recv() => match command {
                    Some(Command::Body { id: of, data }) if of == id => {
                        self.dequeued(data.len());
                        if let Some(sender) = body.as_mut() {
                            let sent = timeout_at(deadline, sender.send_data(data)).await;
                            if !matches!(sent, Ok(Ok(()))) {
                                self.shadow = None;
                                return Outcome::Lost(if sent.is_err() { Reason::Timeout } else { Reason::ShadowError });
                            }
                        }
                    }
                    Some(Command::End { id: end, trailers }) if end == id => {
                        if let Some(mut sender) = body.take()
                            && !trailers.is_empty()
                        {
                            let _ = sender.send_trailers(header_map(&trailers)).await;
                        }
                        ended = Some(Instant::now());
                    }
                    Some(Command::Abort { id: aborted, why }) if aborted == id => {
                        self.shadow = None;
                        return Outcome::Lost(why);
                    }
                    Some(other) => {
                        self.aside(other, next);
                        if next.is_some() {
                            self.shadow = None;
                            return Outcome::Lost(Reason::Gap);
                        }
                    }
                    None => {
                        self.shadow = None;
                        return Outcome::Lost(Reason::Evicted);
                    }
                },
            }
        };
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                tracing::debug!("shadow {}: {e}", self.settings.host);
                self.shadow = None;
                return Outcome::Lost(Reason::ShadowError);
            }
            Err(_) => {
                self.shadow = None;
                return Outcome::Lost(Reason::Timeout);
            }
        };
        if let Some(ended) = ended {
            self.settings
                .stats
                .update(|s| s.shadow_latency.observe(ended.elapsed()));
        }
        let mut answer = Answer::new(
            response.status().as_u16(),
            response
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
        );
        let mut body = response.into_body();
        loop {
            match timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        answer.add_body(data, self.keep_body());
                    }
                    // Trailers (gRPC's status) are compared as headers are.
                    if let Some(trailers) = frame.trailers_ref() {
                        answer.headers.extend(
                            trailers
                                .iter()
                                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())),
                        );
                    }
                }
                Ok(None) => break,
                Ok(Some(Err(_))) => {
                    self.shadow = None;
                    return Outcome::Lost(Reason::ShadowError);
                }
                Err(_) => {
                    self.shadow = None;
                    return Outcome::Lost(Reason::Timeout);
                }
            }
        }
        // The rest of the request (an answer that came early) is not the shadow's any more.
        if ended.is_none() {
            self.shadow = None;
            self.drain_request(id, commands, next).await;
        }
        Outcome::Answered(answer)
    }

    fn keep_body(&self) -> usize {
        if self.settings.compare {
            self.settings.compare_body_bytes
        } else {
            0
        }
    }

    /// A command that is not the current request's: a live answer kept for compare, a later
    /// request's start kept for after this one.
    fn aside(&mut self, command: Command, next: &mut Option<Command>) {
        match command {
            Command::Live { id, answer } => self.live(id, answer),
            Command::Body { data, .. } => self.dequeued(data.len()),
            Command::Start { .. } => *next = Some(command),
            Command::End { .. } | Command::Abort { .. } => {}
        }
    }

    /// Reads the current request's commands up to its end, dropping them.
    async fn drain_request(
        &mut self,
        id: u64,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        next: &mut Option<Command>,
    ) {
        while next.is_none() {
            match commands.recv().await {
                Some(Command::End { id: end, .. } | Command::Abort { id: end, .. })
                    if end == id =>
                {
                    return;
                }
                Some(other) => self.aside(other, next),
                None => return,
            }
        }
    }

    /// The request cannot be sent: its commands are dropped and it is lost as `why`.
    async fn skip_request(
        &mut self,
        id: u64,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        next: &mut Option<Command>,
        why: Reason,
    ) -> Outcome {
        self.drain_request(id, commands, next).await;
        Outcome::Lost(why)
    }

    /// The connection to the shadow, ready for a request: an HTTP/1 one is made (again) when
    /// there is none or it closed; an HTTP/2 one is the client connection's ([`multiplexed`]).
    async fn ready(&mut self, deadline: Instant) -> Result<&mut Shadow, Reason> {
        let ready = match self.shadow.as_mut() {
            Some(Shadow::Http1(sender)) => timeout_at(deadline, sender.ready()).await,
            Some(Shadow::Http2(sender)) => timeout_at(deadline, sender.ready()).await,
            None => Ok(Ok(())),
        };
        match (&self.shadow, ready) {
            (Some(_), Ok(Ok(()))) => return self.shadow.as_mut().ok_or(Reason::ShadowError),
            (Some(Shadow::Http2(_)), Ok(Err(_))) => return Err(Reason::ShadowError),
            (Some(Shadow::Http2(_)), Err(_)) => return Err(Reason::Timeout),
            _ => {}
        }
        self.shadow = None;
        let settings = self.settings;
        let stream = connect_tcp(settings, deadline).await?;
        let handshake = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream));
        let (sender, connection) = match timeout_at(deadline, handshake).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(_)) => return Err(Reason::ShadowError),
            Err(_) => return Err(Reason::Timeout),
        };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("shadow connection: {e}");
            }
        });
        Ok(self.shadow.insert(Shadow::Http1(sender)))
    }

    /// The request the shadow gets: the live one's method, target and headers, but the hop's own
    /// headers, the stripped ones and the `Host` (rewritten unless kept), plus the mark.
    fn request(&self, head: &Head, body: ReplayBody) -> Result<Request<ReplayBody>, String> {
        let settings = self.settings;
        // An absolute-form target (a request to a proxy) keeps its path and query.
        let target = match head.target.parse::<hyper::Uri>() {
            Ok(uri) if uri.scheme().is_some() => uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), ToString::to_string),
            _ => head.target.clone(),
        };
        let host = match head.header("host") {
            Some(host) if settings.keep_host => {
                HeaderValue::from_bytes(host).map_err(|e| e.to_string())?
            }
            _ => settings.authority.clone(),
        };
        let http2 = matches!(head.version, Version::Http2 { .. });
        // HTTP/2 names the authority in the target (`:authority`), not in a Host header.
        let target = if http2 {
            let host = host.to_str().map_err(|e| e.to_string())?;
            format!("http://{host}{target}")
        } else {
            target
        };
        let mut request = Request::builder()
            .method(head.method.as_str())
            .uri(target)
            .version(if http2 {
                hyper::Version::HTTP_2
            } else {
                hyper::Version::HTTP_11
            })
            .body(body)
            .map_err(|e| e.to_string())?;
        let headers = request.headers_mut();
        for (name, value) in &head.headers {
            let lower = name.to_ascii_lowercase();
            // HTTP/2 keeps one value of TE, `trailers`: gRPC requires it.
            let trailers_te = http2 && lower == "te" && value.eq_ignore_ascii_case(b"trailers");
            if HOP_BY_HOP.contains(&lower.as_str()) && !trailers_te {
                continue;
            }
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) else {
                return Err(format!("header {name:?} cannot be replayed"));
            };
            if settings.strip.contains(&name) {
                continue;
            }
            headers.append(name, value);
        }
        if !http2 {
            headers.insert(hyper::header::HOST, host);
        }
        if let Some((name, value)) = &settings.mark {
            headers.insert(name.clone(), value.clone());
        }
        Ok(request)
    }
}

fn header_map(fields: &Fields) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in fields {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// A shadow on loopback that answers `requests` requests without bodies, then ends; it
    /// returns how many connections they came on.
    fn shadow(requests: usize) -> (u16, std::thread::JoinHandle<usize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = std::thread::spawn(move || {
            let (mut answered, mut connections) = (0, 0);
            while answered < requests {
                let (mut stream, _) = listener.accept().expect("accept");
                connections += 1;
                let mut seen = Vec::new();
                let mut buffer = [0; 4096];
                while answered < requests {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buffer[..n]),
                    }
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        answered += 1;
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    }
                }
            }
            connections
        });
        (port, server)
    }

    fn replayed(stats: &Shared, count: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while stats.read().replayed < count {
            assert!(std::time::Instant::now() < deadline, "{:?}", stats.read());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_request_without_a_body_is_answered_before_its_end_is_read() {
        let (port, server) = shadow(2);
        let config = super::super::ShadowConfig::of_url(&format!("http://127.0.0.1:{port}"));
        let Ok(crate::targets::Target::Shadow(target)) = config.resolve() else {
            panic!("a good URL");
        };
        let stats = Shared::default();
        let mut replayer = Replayer::new(&target, stats.clone()).expect("runtime");
        let get = |target: &str| Head {
            method: "GET".into(),
            target: target.into(),
            ..Head::default()
        };
        // The flows' end of the first request comes only after the shadow answered it: the
        // answer counts, with its latency, and the connection to the shadow is kept.
        assert!(replayer.start(1, 1, &get("/a")));
        replayed(&stats, 1);
        replayer.end(1, 1, Vec::new());
        assert!(replayer.start(1, 2, &get("/b")));
        replayer.end(1, 2, Vec::new());
        replayed(&stats, 2);
        replayer.stop(Duration::from_secs(1));
        let stats = stats.read();
        assert_eq!((stats.shadow_latency.count, stats.lost.total()), (2, 0));
        assert_eq!(server.join().expect("server"), 1);
    }
}
