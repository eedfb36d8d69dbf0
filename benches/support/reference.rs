//! The reference receivers: the least a tus server on local disk has to do, run as a process of
//! its own (the benchmark binary started with `--reference-server`), so that its CPU and memory
//! are measured the same way as every other server's.
//!
//! Each PATCH body is streamed to the upload's file as it arrives, on the request task, with one
//! `fdatasync` per request and nothing else: no database, no checksums, no limits. With `--sha`,
//! every received frame also goes through SHA-256 on the request task before it is written (the
//! straightforward way to keep a whole-file hash). Uploads are numbered; their offsets and hash
//! states live in memory.

use std::{
    collections::HashMap,
    convert::Infallible,
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

struct Upload {
    offset: u64,
    hash: Option<Sha256>,
}

struct State {
    dir: PathBuf,
    sha: bool,
    uploads: Mutex<HashMap<u64, Upload>>,
    next: Mutex<u64>,
}

fn answer(status: StatusCode, headers: &[(&str, String)]) -> Response<Full<Bytes>> {
    let mut response = Response::builder().status(status).header("tus-resumable", "1.0.0");
    for (name, value) in headers {
        response = response.header(*name, value);
    }
    response.body(Full::new(Bytes::new())).unwrap()
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    let id: Option<u64> = path.strip_prefix("/files/").and_then(|s| s.parse().ok());
    let response = match (request.method().as_str(), id) {
        ("POST", _) => {
            let id = {
                let mut next = state.next.lock().unwrap();
                *next += 1;
                *next
            };
            std::fs::File::create(state.dir.join(id.to_string())).unwrap();
            let hash = state.sha.then(Sha256::new);
            state.uploads.lock().unwrap().insert(id, Upload { offset: 0, hash });
            answer(StatusCode::CREATED, &[("location", format!("/files/{id}"))])
        }
        ("PATCH", Some(id)) => {
            let offset: u64 = request.headers()["upload-offset"].to_str().unwrap().parse().unwrap();
            let Some(mut upload) = state.uploads.lock().unwrap().remove(&id) else {
                return Ok(answer(StatusCode::NOT_FOUND, &[]));
            };
            if upload.offset != offset {
                let current = upload.offset;
                state.uploads.lock().unwrap().insert(id, upload);
                return Ok(answer(StatusCode::CONFLICT, &[("upload-offset", current.to_string())]));
            }
            let mut file = std::fs::OpenOptions::new().append(true).open(state.dir.join(id.to_string())).unwrap();
            let mut body = request.into_body();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(data) = frame.into_data() {
                    if let Some(hash) = upload.hash.as_mut() {
                        hash.update(&data);
                    }
                    file.write_all(&data).unwrap();
                    upload.offset += data.len() as u64;
                }
            }
            file.sync_data().unwrap();
            let offset = upload.offset;
            state.uploads.lock().unwrap().insert(id, upload);
            answer(StatusCode::NO_CONTENT, &[("upload-offset", offset.to_string())])
        }
        ("HEAD", Some(id)) => match state.uploads.lock().unwrap().get(&id) {
            Some(upload) => answer(StatusCode::OK, &[("upload-offset", upload.offset.to_string())]),
            None => answer(StatusCode::NOT_FOUND, &[]),
        },
        ("DELETE", Some(id)) => {
            state.uploads.lock().unwrap().remove(&id);
            let _ = std::fs::remove_file(state.dir.join(id.to_string()));
            answer(StatusCode::NO_CONTENT, &[])
        }
        _ => answer(StatusCode::NOT_FOUND, &[]),
    };
    Ok(response)
}

/// Serves until killed; prints `listening <port>` once bound.
pub fn serve(dir: PathBuf, sha: bool) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening {}", listener.local_addr().unwrap().port());
        let state = Arc::new(State { dir, sha, uploads: Mutex::default(), next: Mutex::new(0) });
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| handle(state.clone(), request));
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
}
