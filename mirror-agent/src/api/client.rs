//! The agent's own client for its API socket: `status`, `stats`, `reload` on the command line.
use std::path::Path;

use anyhow::Context as _;

/// `GET path` on the agent's socket; the body, or an error naming the socket.
pub async fn get_from(socket: &Path, path: &str) -> anyhow::Result<String> {
    body_of(request(socket, hyper::Method::GET, path).await?).await
}

/// `POST path` on the agent's socket; the body, or an error with the agent's answer.
pub async fn post_to(socket: &Path, path: &str) -> anyhow::Result<String> {
    body_of(request(socket, hyper::Method::POST, path).await?).await
}

async fn body_of(response: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<String> {
    use http_body_util::BodyExt as _;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Sends a request to the agent's socket; the response, once its status says success.
async fn request(
    socket: &Path,
    method: hyper::Method,
    path: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    use http_body_util::BodyExt as _;
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "connecting to {} (is the agent running? --api-socket sets the path; quick-form \
                 runs answer on sockets of their own: `mirror-agent status --all` lists them)",
                socket.display()
            )
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("HTTP handshake with the agent")?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "agent")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.into_body().collect().await?.to_bytes();
    anyhow::bail!(
        "the agent answered {status}: {}",
        String::from_utf8_lossy(&body)
    )
}

/// `GET path` on the agent's socket, handing each line of the body to `line` until it returns
/// false or the agent ends the stream.
pub async fn stream_from(
    socket: &Path,
    path: &str,
    mut line: impl FnMut(&str) -> bool,
) -> anyhow::Result<()> {
    let mut pending = Vec::new();
    bytes_from(socket, path, |data| {
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let text: Vec<u8> = pending.drain(..=end).collect();
            if !line(String::from_utf8_lossy(&text).trim_end()) {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await
}

/// `GET path` on the agent's socket, handing the body's bytes to `chunk` as they come until it
/// returns false (or fails) or the agent ends the stream.
pub async fn bytes_from(
    socket: &Path,
    path: &str,
    mut chunk: impl FnMut(&[u8]) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    use http_body_util::BodyExt as _;
    let mut response = request(socket, hyper::Method::GET, path).await?;
    while let Some(frame) = response.body_mut().frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if !chunk(&data)? {
            break;
        }
    }
    Ok(())
}
