//! HTTP peers for the shadow tests: a recording origin (the shadow, or the live service) that
//! answers every request and keeps what it received, byte for byte; and nginx, a real origin.
use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use super::Netns;

/// A request as an origin received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub method: String,
    pub target: String,
    /// Lowercase names, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A recording HTTP/1.1 origin in a namespace, stopped on drop. It answers `200` with a JSON
/// body naming the path (`"v2"` in it where the path starts with `/changed`, when `changed` is
/// set), after `delay`; but `/status/204` gets `204 No Content`, and `/status/304` gets `304 Not
/// Modified` with the `Content-Length` a `200` would have had, as RFC 9110 lets it, and no body.
#[derive(Debug)]
pub struct Origin {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
}

impl Origin {
    pub fn start(ns: &Netns, addr: SocketAddr, changed: bool, delay: Duration) -> Self {
        let listener = ns.enter(move || TcpListener::bind(addr).expect("origin bind"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (kept, stopping) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let kept = kept.clone();
                std::thread::spawn(move || serve(stream, &kept, changed, delay));
            }
        });
        Origin {
            addr,
            received,
            stop,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("received").clone()
    }

    /// This origin, a shadow, got the `live` origin's requests: each the same but the headers
    /// the replay rewrites (`Host` to this origin's address, and its mark `x-mirror-shadow: 1`)
    /// and those of the live connection's own hop.
    pub fn assert_replayed_from(&self, live: &Origin) {
        // The URL's authority, without HTTP's default port.
        let host = match self.addr.port() {
            80 => self.addr.ip().to_string(),
            _ => self.addr.to_string(),
        };
        let mut got = self.received();
        for r in &mut got {
            assert_eq!(r.header("x-mirror-shadow"), Some("1"), "{r:?}");
            assert_eq!(r.header("host"), Some(host.as_str()), "{r:?}");
            r.headers.retain(|(n, _)| {
                !matches!(n.as_str(), "x-mirror-shadow" | "host" | "transfer-encoding")
            });
        }
        // The replay's connection to the shadow is its own: it repeats none of these.
        let mut sent = live.received();
        for r in &mut sent {
            r.headers.retain(|(n, _)| {
                !matches!(
                    n.as_str(),
                    "host" | "transfer-encoding" | "connection" | "keep-alive"
                )
            });
        }
        // Connections run at once (ab's four): order within each connection is what matters,
        // and the multiset of requests must be the same.
        let key = |r: &Received| (r.target.clone(), r.method.clone(), r.body.len());
        got.sort_by_key(key);
        sent.sort_by_key(key);
        assert_eq!(got.len(), sent.len());
        for (got, sent) in got.iter().zip(&sent) {
            assert_eq!(got, sent);
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread (the listener lives in its namespace; a refused connect
        // from here is fine: the flag is read at the next one anyway).
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

fn serve(stream: TcpStream, kept: &Mutex<Vec<Received>>, changed: bool, delay: Duration) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut words = line.split_whitespace();
        let (Some(method), Some(target)) = (words.next(), words.next()) else {
            return;
        };
        let (method, target) = (method.to_owned(), target.to_owned());
        let http10 = words.next() == Some("HTTP/1.0");
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        if header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
            let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let keep_alive_asked =
            header("connection").is_some_and(|c| c.eq_ignore_ascii_case("keep-alive"));
        let mut body = Vec::new();
        if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            // A client that gives up mid-body (the replay of a lost request) ends its exchange.
            match read_chunked(&mut reader) {
                Some(whole) => body = whole,
                None => return,
            }
        } else if let Some(len) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
            body.resize(len, 0);
            // A client that gives up mid-body (the replay of a lost request) ends its exchange.
            if reader.read_exact(&mut body).is_err() {
                return;
            }
        }
        kept.lock().expect("received").push(Received {
            method: method.clone(),
            target: target.clone(),
            headers,
            body,
        });
        std::thread::sleep(delay);
        let version = if changed && target.starts_with("/changed") {
            "v2"
        } else {
            "v1"
        };
        let json = format!("{{\"path\":\"{target}\",\"version\":\"{version}\"}}");
        let (status, head_only) = match target.as_str() {
            "/status/204" => ("204 No Content", true),
            "/status/304" => ("304 Not Modified", true),
            _ => ("200 OK", method == "HEAD"),
        };
        // HTTP/1.0 keeps the connection only when asked to (ab -k), and says so.
        let keep = !http10 || keep_alive_asked;
        let connection = match (http10, keep) {
            (true, true) => "Connection: keep-alive\r\n",
            (_, false) => "Connection: close\r\n",
            (false, true) => "",
        };
        let length = if status.starts_with("204") {
            String::new()
        } else {
            format!("Content-Length: {}\r\n", json.len())
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{length}{connection}X-Origin: test\r\n\r\n{}",
            if head_only { "" } else { &json }
        );
        if writer.write_all(answer.as_bytes()).is_err() || !keep {
            return;
        }
    }
}

/// A chunked body, trailers read and dropped; `None` if the message breaks off or is malformed.
fn read_chunked(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).ok()?;
        let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).ok()? == 0 {
                    return None;
                }
                if line.trim_end().is_empty() {
                    return Some(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).ok()?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
}

/// nginx (Debian's nginx-light, from `cargo xtask setup`) in a namespace: its master process,
/// stopped with SIGTERM on drop, so that it ends its workers too (a killed master leaves them
/// running).
#[derive(Debug)]
pub struct Nginx(Child);

impl Nginx {
    /// Starts nginx in `ns` with `http` (its `http { … }` block) after a preamble that keeps it
    /// in the foreground with its pid and error log in `dir`/`name`; waits until it accepts
    /// connections at each of `listening` (addresses in `ns`).
    pub fn start(
        ns: &Netns,
        dir: &Path,
        name: &str,
        http: &str,
        listening: &[SocketAddr],
    ) -> std::io::Result<Self> {
        let prefix = dir.join(name);
        std::fs::create_dir_all(&prefix)?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nworker_processes auto;\npid {}/nginx.pid;\nevents {{ worker_connections 4096; }}\n{http}",
                prefix.display()
            ),
        )?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "nginx", "-p"])
            .arg(format!("{}/", prefix.display()))
            .arg("-e")
            .arg(prefix.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()?;
        let nginx = Nginx(child);
        for &address in listening {
            super::wait_for("nginx to listen", || {
                ns.enter(move || TcpStream::connect(address).is_ok())
            });
        }
        Ok(nginx)
    }

    /// Its master's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid (`ip netns exec` runs nginx in its place).
        unsafe { libc::kill(self.0.id().cast_signed(), libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
