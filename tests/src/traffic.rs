//! Traffic generators: a numbered UDP loop and a TCP stream.
use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::{FrameSender, Lab, SINK_V4, pin_to_first_cpu};

/// Frames sent one after another from a thread until stopped (or a bound is reached): frame `n`
/// is `frame(n)`. Sends at most `max` frames, in bursts of 8 with a millisecond between them (about
/// 8,000 frames per second), so that the captures of a test keep every frame.
#[derive(Debug)]
pub struct TrafficLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl TrafficLoop {
    pub fn start(
        sender: FrameSender,
        max: u32,
        frame: impl Fn(u32) -> Vec<u8> + Send + 'static,
    ) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_mins(1);
            let mut sent = 0;
            while sent < max && Instant::now() < deadline && !stopping.load(Ordering::Relaxed) {
                sender.send(&frame(sent));
                sent += 1;
                if sent % 8 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            sent
        });
        TrafficLoop {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the loop and returns how many frames it sent.
    pub fn finish(mut self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("traffic thread")
    }
}

impl Drop for TrafficLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends `data` over a TCP connection from src to sink port 7000 and checks it arrived whole.
pub fn send_tcp_stream(lab: &Lab, data: &[u8]) {
    let listener = lab
        .sink
        .enter(|| TcpListener::bind((SINK_V4, 7000)).expect("listen"));
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut received = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut received).expect("read");
        received
    });
    let to_send = data.to_vec();
    lab.src.enter(move || {
        pin_to_first_cpu();
        let mut stream = TcpStream::connect((SINK_V4, 7000)).expect("connect");
        stream.write_all(&to_send).expect("write");
    });
    assert!(
        server.join().expect("server") == data,
        "the primary path carried the stream"
    );
}
