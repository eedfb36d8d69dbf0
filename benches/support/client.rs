//! The measuring client: minimal tus over one keep-alive HTTP/1.1 connection per upload, bodies
//! sliced from a file held in memory (no copy), the same for every server measured.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;

pub type Body = BoxBody<Bytes, Infallible>;

/// One client connection to a server.
pub struct Conn {
    sender: SendRequest<Body>,
    host: String,
}

/// An answer with its body read.
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Self { sender, host: addr.to_string() }
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(&mut self, method: &str, path: &str, headers: &[(&str, String)], body: Body) -> Answer {
        let mut request = Request::builder().method(method).uri(path).header("host", &self.host);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request.body(body).unwrap();
        self.sender.ready().await.expect("connection ready");
        let response: Response<Incoming> = self.sender.send_request(request).await.expect("request sent");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("answer body").to_bytes();
        Answer { status: parts.status, headers: parts.headers, body }
    }
}

/// The path of a `Location` (servers answer with an absolute URL or a path).
fn path_of(location: &str) -> String {
    match location.find("://") {
        Some(scheme) => {
            let rest = &location[scheme + 3..];
            rest.find('/').map_or("/".to_string(), |slash| rest[slash..].to_string())
        }
        None => location.to_string(),
    }
}

const TUS: (&str, &str) = ("tus-resumable", "1.0.0");

fn tus() -> (&'static str, String) {
    (TUS.0, TUS.1.to_string())
}

/// POST: creates an upload of `length` bytes; returns its path.
pub async fn create(conn: &mut Conn, base_path: &str, length: usize) -> String {
    try_create(conn, base_path, length).await.unwrap_or_else(|refused| panic!("create: {refused}"))
}

/// POST: creates an upload of `length` bytes; returns its path, or the status and message of a
/// refusal.
pub async fn try_create(conn: &mut Conn, base_path: &str, length: usize) -> Result<String, String> {
    let answer = conn.send("POST", base_path, &[tus(), ("upload-length", length.to_string())], empty()).await;
    if answer.status != StatusCode::CREATED {
        return Err(format!("{} {}", answer.status, String::from_utf8_lossy(&answer.body)));
    }
    Ok(path_of(answer.header("location").expect("a Location")))
}

/// PATCH: appends `body` at `offset`; returns the new offset.
pub async fn patch(conn: &mut Conn, path: &str, offset: usize, len: usize, body: Body) -> usize {
    let headers = [
        tus(),
        ("upload-offset", offset.to_string()),
        ("content-type", "application/offset+octet-stream".to_string()),
        ("content-length", len.to_string()),
    ];
    let answer = conn.send("PATCH", path, &headers, body).await;
    assert_eq!(answer.status, 204, "PATCH at {offset}: {}", String::from_utf8_lossy(&answer.body));
    answer.header("upload-offset").and_then(|o| o.parse().ok()).expect("an Upload-Offset")
}

/// HEAD: the upload's offset and, when the server reports it, its `Repr-Digest`.
pub async fn head(conn: &mut Conn, path: &str) -> (usize, Option<String>) {
    let answer = conn.send("HEAD", path, &[tus()], empty()).await;
    assert!(answer.status.is_success(), "HEAD {path}: {}", answer.status);
    let offset = answer.header("upload-offset").and_then(|o| o.parse().ok()).expect("an Upload-Offset");
    (offset, answer.header("repr-digest").map(str::to_string))
}

/// DELETE: terminates the upload (so that finished uploads do not pile up between measurements).
pub async fn terminate(conn: &mut Conn, path: &str) {
    let answer = conn.send("DELETE", path, &[tus()], empty()).await;
    assert!(answer.status.is_success(), "DELETE {path}: {}", answer.status);
}

/// Uploads `data` in `chunk`-sized PATCHes over one connection; returns the time from the POST
/// to the last PATCH's answer. The upload is terminated afterwards, outside the timing.
pub async fn timed_upload(addr: SocketAddr, base_path: &str, data: &Bytes, chunk: usize) -> Duration {
    let mut conn = Conn::open(addr).await;
    let started = std::time::Instant::now();
    let path = create(&mut conn, base_path, data.len()).await;
    let mut offset = 0;
    while offset < data.len() {
        let len = chunk.min(data.len() - offset);
        let next = patch(&mut conn, &path, offset, len, full(data.slice(offset..offset + len))).await;
        assert_eq!(next, offset + len, "the server kept {next} of {}", offset + len);
        offset = next;
    }
    let took = started.elapsed();
    terminate(&mut conn, &path).await;
    took
}

/// A body that sends `data` in pieces of `piece` bytes, one every `every`.
pub fn paced(data: Bytes, piece: usize, every: Duration) -> Body {
    let stream =
        futures_util::stream::unfold((data, tokio::time::interval(every)), move |(mut rest, mut tick)| async move {
            if rest.is_empty() {
                return None;
            }
            tick.tick().await;
            let frame = rest.split_to(piece.min(rest.len()));
            Some((Ok::<_, Infallible>(hyper::body::Frame::data(frame)), (rest, tick)))
        });
    http_body_util::StreamBody::new(stream).boxed()
}
