//! Many instances, one database, one store (issue 3): real `ferry serve` processes sharing one
//! PostgreSQL database and either one local folder or one S3 bucket (Garage, started by
//! tests/run). Clients move between instances chunk by chunk, race each other, lose connections,
//! and see instances killed or stopped under them; the bytes must always come out exact.
//!
//! Every test runs on both stores: `cluster::local::*` and `cluster::s3::*`. The S3 ones need
//! the `FERRY_TEST_S3_*` settings (see `tests/garage`) and fail without them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::{Method, Response};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

use crate::helpers::{
    Answer, Cluster, Node, Storage, assert_same_bytes, header, random_bytes, read_answer, upload_id, wait_for,
};

const MIB: usize = 1 << 20;

/// One `#[tokio::test]` per store for each listed `async fn name(storage: Storage)`.
macro_rules! cluster_tests {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::helpers::Storage::Local).await })*
        }
        mod s3 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::helpers::Storage::S3).await })*
        }
    };
}

/// A PATCH whose body the test feeds piece by piece, running in a task of its own.
struct Streaming {
    body: Option<mpsc::Sender<Bytes>>,
    response: JoinHandle<reqwest::Result<Response>>,
}

impl Streaming {
    /// Starts a PATCH of `length` bytes at `offset` through `node`.
    fn start(node: &Node, url: &str, offset: u64, length: usize) -> Self {
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok::<_, std::io::Error>);
        let request = node
            .patch_request(url, offset)
            .header("Content-Length", length.to_string())
            .body(reqwest::Body::wrap_stream(stream));
        Streaming { body: Some(tx), response: tokio::spawn(request.send()) }
    }

    /// Sends `data` in 64 KiB pieces; returns once the client has taken all of it.
    async fn send(&self, data: &[u8]) {
        let body = self.body.as_ref().expect("the body is still open");
        for piece in data.chunks(64 * 1024) {
            if body.send(Bytes::copy_from_slice(piece)).await.is_err() {
                return; // the request already ended; its outcome tells why
            }
        }
    }

    /// Ends the body and waits for the outcome (an answer, or the transport error).
    async fn finish(mut self, limit: Duration) -> reqwest::Result<Response> {
        self.body.take();
        self.outcome(limit).await
    }

    /// Waits for the outcome while the body stays open.
    async fn outcome(self, limit: Duration) -> reqwest::Result<Response> {
        let Streaming { body, response } = self;
        let outcome = tokio::time::timeout(limit, response).await;
        drop(body);
        match outcome {
            Ok(joined) => joined.expect("request task"),
            Err(_) => panic!("the request got no answer within {limit:?}"),
        }
    }
}

/// Opens a raw connection to `node` and sends a PATCH's headers (announcing `content_length`
/// bytes) and `first` of its body, then leaves the request hanging.
async fn raw_patch(node: &Node, url: &str, offset: u64, content_length: usize, first: &[u8]) -> TcpStream {
    let path = node.at(url).strip_prefix(&node.base).expect("URL on the node").to_string();
    let mut socket = TcpStream::connect(node.addr).await.expect("connect");
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n\
         Content-Type: application/offset+octet-stream\r\nContent-Length: {content_length}\r\n\r\n",
        node.addr
    );
    socket.write_all(head.as_bytes()).await.expect("send headers");
    socket.write_all(first).await.expect("send the first bytes");
    socket.flush().await.expect("flush");
    socket
}

/// A whole PATCH on a connection of its own. The answer is read even when the server answered
/// before the body was through and stopped reading it (HTTP clients such as reqwest give up on
/// the answer when sending the body fails).
async fn raw_patch_answer(node: &Node, url: &str, offset: u64, body: &[u8]) -> Option<Answer> {
    let path = node.at(url).strip_prefix(&node.base).expect("URL on the node").to_string();
    let mut socket = TcpStream::connect(node.addr).await.expect("connect");
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n\
         Content-Type: application/offset+octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        node.addr,
        body.len()
    );
    if socket.write_all(head.as_bytes()).await.is_ok() {
        let _ = socket.write_all(body).await;
    }
    read_answer(&mut socket, Duration::from_secs(30)).await
}

/// Waits (30 s at most, with a sweep every second) until the store holds the objects of these
/// completed uploads, of the given sizes, and nothing else: no staged chunks, no unfinished
/// multipart uploads; on local disk, the uploads' lock files may stay.
pub(crate) async fn store_holds_only(cluster: &Cluster, uploads: &[(String, usize)]) {
    let wanted: Vec<String> = uploads.iter().map(|(url, len)| format!("uploads/{} ({len})", upload_id(url))).collect();
    let allowed = |line: &String| {
        wanted.contains(line)
            || (cluster.storage == Storage::Local
                && uploads.iter().any(|(url, _)| line.starts_with(&format!("uploads/{}.lock ", upload_id(url)))))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let inventory = cluster.store_inventory().await;
        if inventory.iter().all(allowed) && wanted.iter().all(|w| inventory.contains(w)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "30 s on, with a sweep every second, the store should hold {wanted:#?} and nothing else, \
             but holds {inventory:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until an append to `url` has begun on some instance since the generation `since`.
async fn wait_for_append(cluster: &Cluster, url: &str, since: i64) {
    wait_for("the append to begin", Duration::from_secs(20), || async { cluster.write_generation(url).await > since })
        .await;
}

/// A client alternates between two instances chunk by chunk, with chunks below the store's
/// minimum part size (1 MiB) and at the default part size (8 MiB). Instance B serves downloads
/// with `--download redirect`: on S3 a redirect to a presigned URL of the object, on Azure to a
/// SAS URL of the blob.
pub(crate) async fn alternating_chunks(storage: Storage) {
    let cluster = Cluster::start_nodes(storage, &[&[], &["--download", "redirect"]]).await;
    let len = 24 * MIB + 333_333;
    for (chunk, seed) in [(MIB, 1), (8 * MIB, 2)] {
        let data = random_bytes(len, seed);
        let url = cluster.nodes[0].create(len as u64).await;
        let mut offset = 0;
        for (i, piece) in data.chunks(chunk).enumerate() {
            let node = &cluster.nodes[i % 2];
            let response = node.patch(&url, offset as u64, piece.to_vec()).await;
            let status = response.status();
            assert_eq!(
                status,
                204,
                "chunk {i} ({} bytes at {offset}) through {}: {}",
                piece.len(),
                node.name,
                response.text().await.unwrap_or_default()
            );
            offset += piece.len();
            assert_eq!(header(&response, "upload-offset"), offset.to_string());
        }
        cluster.assert_complete(&url, &data).await;

        let b = &cluster.nodes[1];
        let plain = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let response = plain.get(b.at(&url)).send().await.expect("GET through B");
        match storage {
            Storage::S3 => {
                assert_eq!(response.status(), 302, "GET through B (--download redirect)");
                let location = header(&response, "location");
                let endpoint = cluster.bucket.as_ref().unwrap().endpoint.clone();
                assert!(location.starts_with(&endpoint), "redirected to {location}, not to the S3 endpoint {endpoint}");
                // Garage checks the presigned URL's signature (an unsigned GET is refused).
                let signed =
                    plain.get(&location).header("Range", "bytes=100-199").send().await.expect("GET the presigned URL");
                assert_eq!(
                    signed.status(),
                    206,
                    "a range through the presigned URL: {}",
                    signed.text().await.unwrap_or_default()
                );
                assert_same_bytes("a range through the presigned URL", &signed.bytes().await.unwrap(), &data[100..200]);
            }
            Storage::Azure => {
                assert_eq!(response.status(), 302, "GET through B (--download redirect)");
                let location = header(&response, "location");
                let endpoint = cluster.container.as_ref().unwrap().endpoint.clone();
                assert!(location.starts_with(&endpoint), "redirected to {location}, not to Azurite at {endpoint}");
                let signed =
                    plain.get(&location).header("Range", "bytes=100-199").send().await.expect("GET the SAS URL");
                assert_eq!(
                    signed.status(),
                    206,
                    "a range through the SAS URL: {}",
                    signed.text().await.unwrap_or_default()
                );
                assert_same_bytes("a range through the SAS URL", &signed.bytes().await.unwrap(), &data[100..200]);
            }
            // A local store has no URL of its own: ferry streams.
            Storage::Local => assert_eq!(response.status(), 200, "GET through B (--download redirect)"),
        }
    }
}

/// Two clients append to one upload at the same offset at the same time, one through each
/// instance: per offset exactly one wins (204) and the other gets 409, and every byte range holds
/// the winner's bytes only.
async fn concurrent_appends_one_wins(storage: Storage) {
    let cluster = Cluster::start(storage, 2, &[]).await;
    let sizes = [MIB, 6 * MIB, MIB + 4321, 300_000];
    let total: usize = sizes.iter().sum();
    let theirs = [random_bytes(total, 10), random_bytes(total, 11)];
    let url = cluster.nodes[0].create(total as u64).await;
    let mut expected = Vec::with_capacity(total);
    let mut offset = 0;
    for size in sizes {
        let range = offset..offset + size;
        let send = |i: usize| raw_patch_answer(&cluster.nodes[i], &url, offset as u64, &theirs[i][range.clone()]);
        let (a, b) = tokio::join!(send(0), send(1));
        let answers = [a, b];
        let statuses: Vec<Option<u16>> = answers.iter().map(|a| a.as_ref().map(|a| a.status)).collect();
        let winners: Vec<usize> = (0..2).filter(|i| statuses[*i] == Some(204)).collect();
        assert_eq!(winners.len(), 1, "at offset {offset} exactly one append must win: {answers:#?}");
        let winner = winners[0];
        assert_eq!(statuses[1 - winner], Some(409), "at offset {offset} the loser must get 409: {answers:#?}");
        let new_offset = answers[winner].as_ref().and_then(|a| a.header("upload-offset"));
        assert_eq!(new_offset, Some((offset + size).to_string().as_str()), "the winner's Upload-Offset");
        expected.extend_from_slice(&theirs[winner][range]);
        offset += size;
        for node in &cluster.nodes {
            assert_eq!(node.offset(&url).await, offset as u64, "offset through {} after a race", node.name);
        }
    }
    cluster.assert_complete(&url, &expected).await;
}

/// A client's connection to instance A dies mid-PATCH, once left hanging (the server cannot tell)
/// and once closed. The client resumes through instance B at once: HEAD and the next PATCH succeed
/// within 2 seconds, and what A received is kept whole or dropped whole, never half-counted.
pub(crate) async fn dropped_connection_resumes_elsewhere(storage: Storage) {
    let cluster = Cluster::start(storage, 2, &[]).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let len = 3 * MIB + 5555;
    let sent = MIB + 1234;
    let mut uploads = Vec::new();
    for closed in [false, true] {
        let what = if closed { "closed" } else { "hanging" };
        let data = random_bytes(len, 20 + closed as u64);
        let url = a.create(len as u64).await;
        let generation = cluster.write_generation(&url).await;
        let mut socket = raw_patch(a, &url, 0, len, &data[..sent]).await;
        wait_for_append(&cluster, &url, generation).await;
        if storage == Storage::Local {
            wait_for("A to write what it received", Duration::from_secs(20), || async {
                cluster.stored_object(&url).await.is_some_and(|bytes| bytes.len() >= MIB)
            })
            .await;
        }
        if closed {
            socket.shutdown().await.expect("close the connection");
        }

        let started = Instant::now();
        let mut offset = b.offset(&url).await as usize;
        assert!(
            offset == 0 || offset == sent,
            "{what}: HEAD through B says {offset}; A had received {sent} bytes, which count whole or not at all"
        );
        let mut response = b.patch(&url, offset as u64, data[offset..].to_vec()).await;
        if closed && offset == 0 && response.status() == 409 {
            // A kept what it received between B's HEAD and PATCH: look again, as a tus client does.
            offset = b.offset(&url).await as usize;
            assert_eq!(offset, sent, "{what}: after the 409, the offset must be what A received");
            response = b.patch(&url, offset as u64, data[offset..].to_vec()).await;
        }
        let elapsed = started.elapsed();
        let status = response.status();
        assert_eq!(
            status,
            204,
            "{what}: resuming through B at {offset}: {}",
            response.text().await.unwrap_or_default()
        );
        assert!(elapsed < Duration::from_secs(2), "{what}: resuming through B took {elapsed:?}");

        if !closed {
            // The hanging request comes back to life with other bytes and is then cut off: they
            // must be neither stored nor counted, and it must not be told they were.
            let garbage = random_bytes((len - sent) / 2, 99);
            let _ = socket.write_all(&garbage).await;
            let _ = socket.shutdown().await;
            let answer = read_answer(&mut socket, Duration::from_secs(10)).await.map(|a| a.status);
            assert!(
                matches!(answer, None | Some(409)),
                "the superseded request on A must lose (409) or be closed, not get {answer:?}"
            );
        }
        drop(socket);
        cluster.assert_complete(&url, &data).await;
        uploads.push((url, len));
    }
    // Once the sweeper has run, nothing is left but the two objects: on S3, what A staged for a
    // request that lost to B's is an orphan the sweeper must reclaim.
    store_holds_only(&cluster, &uploads).await;
}

/// An instance is killed (SIGKILL) while it receives appends to two uploads; clients resume
/// through the other instance. One upload completes byte-exact, the other is terminated; once the
/// sweeper has run, the store holds the completed upload's object and nothing else: no staged
/// chunks, no unfinished multipart uploads, nothing of the terminated upload.
pub(crate) async fn sigkill_mid_patch(storage: Storage) {
    let mut cluster = Cluster::start(storage, 2, &[]).await;
    let len = 14 * MIB + 77;
    let kept = random_bytes(len, 30);
    let terminated = random_bytes(len, 31);
    let keep_url = cluster.nodes[1].create(len as u64).await;
    let drop_url = cluster.nodes[1].create(len as u64).await;
    // A first chunk below S3's minimum part size, through B (staged, on S3).
    for (url, data) in [(&keep_url, &kept), (&drop_url, &terminated)] {
        let response = cluster.nodes[1].patch(url, 0, data[..MIB].to_vec()).await;
        assert_eq!(response.status(), 204);
    }

    // A receives 9 MiB of each (past an 8 MiB part boundary) and is killed before the bodies end.
    let before = cluster.store_inventory().await;
    let mut requests = Vec::new();
    for (url, data) in [(&keep_url, &kept), (&drop_url, &terminated)] {
        let generation = cluster.write_generation(url).await;
        let request = Streaming::start(&cluster.nodes[0], url, MIB as u64, len - MIB);
        request.send(&data[MIB..10 * MIB]).await;
        wait_for_append(&cluster, url, generation).await;
        requests.push(request);
    }
    // Only kill A once it has stored something of each upload (a part on S3).
    wait_for("A to write into the store for both uploads", Duration::from_secs(20), || async {
        let now = cluster.store_inventory().await;
        [&keep_url, &drop_url].iter().all(|url| {
            let id = upload_id(url);
            let mine = |lines: &[String]| lines.iter().filter(|l| l.contains(id)).cloned().collect::<Vec<_>>();
            mine(&now) != mine(&before)
        })
    })
    .await;
    cluster.nodes[0].sigkill().await;
    for request in requests {
        if let Ok(response) = request.outcome(Duration::from_secs(10)).await {
            assert_ne!(response.status(), 204, "a request to a killed instance cannot have succeeded");
        }
    }

    let b = &cluster.nodes[1];
    let offset = b.offset(&keep_url).await as usize;
    assert!((MIB..=10 * MIB).contains(&offset), "HEAD through B says {offset}");
    let mut at = offset;
    for piece in kept[offset..].chunks(5 * MIB) {
        let response = b.patch(&keep_url, at as u64, piece.to_vec()).await;
        assert_eq!(response.status(), 204, "resuming at {at}: {}", response.text().await.unwrap_or_default());
        at += piece.len();
    }
    cluster.assert_complete(&keep_url, &kept).await;

    let response = b.tus(Method::DELETE, &drop_url).send().await.expect("DELETE");
    assert_eq!(response.status(), 204, "terminating the other upload");
    let status = b.head(&drop_url).await.status();
    assert!(status == 404 || status == 410, "HEAD after DELETE: {status}");

    // Once the sweeper has run, nothing is left but the completed upload's object.
    store_holds_only(&cluster, &[(keep_url, len)]).await;
}

/// SIGTERM to an instance while it receives three appends: one that goes on to the end of its
/// body, one that trickles on past the shutdown grace period (3 s) and one that stalls. The
/// instance stops accepting connections; every request gets an answer (no reset): the first
/// succeeds, the other two are ended at the grace period keeping what arrived; the process exits
/// 0, and the clients finish through the other instance.
async fn sigterm_lets_requests_finish(storage: Storage) {
    let grace = Duration::from_secs(3);
    let mut cluster = Cluster::start(storage, 2, &["--shutdown-grace", "3s", "--idle-timeout", "30s"]).await;
    let len = 6 * MIB + 999;
    let chunk = 4 * MIB;
    let data: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(len, 40 + i)).collect();
    let mut urls = Vec::new();
    for _ in 0..3 {
        urls.push(cluster.nodes[0].create(len as u64).await);
    }
    let [moving, trickling, stalled] = [0, 1, 2].map(|i| Streaming::start(&cluster.nodes[0], &urls[i], 0, chunk));
    for (request, bytes) in [(&moving, &data[0]), (&trickling, &data[1]), (&stalled, &data[2])] {
        request.send(&bytes[..MIB]).await;
    }
    for url in &urls {
        wait_for_append(&cluster, url, 0).await;
    }

    let a = &cluster.nodes[0];
    a.sigterm();
    let stopping = Instant::now();
    wait_for("A to stop accepting connections", Duration::from_secs(10), || async {
        TcpStream::connect(a.addr).await.is_err()
    })
    .await;

    // The trickling client goes on at 640 KiB/s: its chunk would take longer than the grace period.
    let trickle = tokio::spawn({
        let body = trickling.body.clone().expect("open body");
        let rest = data[1][MIB..chunk].to_vec();
        async move {
            let mut sent = MIB;
            for piece in rest.chunks(32 * 1024) {
                if body.send(Bytes::copy_from_slice(piece)).await.is_err() {
                    break;
                }
                sent += piece.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            sent
        }
    });
    // The moving client sends the rest of its chunk at once and succeeds.
    moving.send(&data[0][MIB..chunk]).await;
    let response = moving
        .finish(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("the moving request got no answer from the stopping instance: {e}"));
    assert_eq!(response.status(), 204, "the moving request: {}", response.text().await.unwrap_or_default());
    assert_eq!(header(&response, "upload-offset"), chunk.to_string());

    // The other two are ended once the grace period is over, and told so.
    for (what, request) in [("trickling", trickling), ("stalled", stalled)] {
        let response = request
            .outcome(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("the {what} request got no answer from the stopping instance: {e}"));
        let status = response.status();
        let waited = stopping.elapsed();
        assert!(!status.is_success(), "the {what} request's body stopped short: it must not succeed ({status})");
        assert!(
            waited < grace + Duration::from_secs(5),
            "the {what} request was answered {waited:?} after SIGTERM, with a grace period of {grace:?}"
        );
    }
    let trickled = trickle.await.expect("trickle task");
    assert!(trickled < chunk, "the trickling client finished its chunk within the grace period: make it slower");

    let exit = cluster.nodes[0].wait_exit(Duration::from_secs(30)).await;
    assert!(exit.success(), "instance A exited with {exit} after SIGTERM:\n{}", cluster.nodes[0].log_tail(30));

    // Through B: each upload is where A left it, with all that arrived kept, and finishes.
    let b = &cluster.nodes[1];
    let offsets = [b.offset(&urls[0]).await, b.offset(&urls[1]).await, b.offset(&urls[2]).await].map(|o| o as usize);
    assert_eq!(offsets[0], chunk, "the moving upload");
    assert!((MIB..=trickled).contains(&offsets[1]), "the trickling upload is at {}: it sent {trickled}", offsets[1]);
    assert_eq!(offsets[2], MIB, "the stalled upload keeps the bytes that arrived");
    for ((url, bytes), offset) in urls.iter().zip(&data).zip(offsets) {
        let response = b.patch(url, offset as u64, bytes[offset..].to_vec()).await;
        assert_eq!(response.status(), 204, "finishing through B: {}", response.text().await.unwrap_or_default());
    }
    for (url, bytes) in urls.iter().zip(&data) {
        cluster.assert_complete(url, bytes).await;
    }
}

/// A TCP proxy to `upstream` that forwards what clients send at `bytes_per_second` (answers
/// flow back at full speed) and counts the bytes it forwarded upstream.
struct SlowProxy {
    addr: std::net::SocketAddr,
    forwarded: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl SlowProxy {
    async fn start(upstream: std::net::SocketAddr, bytes_per_second: u64) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let forwarded = Arc::new(AtomicU64::new(0));
        let counter = forwarded.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut piece = vec![0u8; 16 * 1024];
                    let pause = Duration::from_secs_f64(piece.len() as f64 / bytes_per_second as f64);
                    loop {
                        let n = match client_read.read(&mut piece).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if server_write.write_all(&piece[..n]).await.is_err() {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        tokio::time::sleep(pause).await;
                    }
                    let _ = server_write.shutdown().await;
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
            }
        });
        SlowProxy { addr, forwarded, task }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// S3 only: a superseded writer whose part upload was already under way when a newer request
/// took over must not replace the newer writer's part. Instance B reaches S3 through a slow
/// link: it receives a whole part from one client, checks that it is still the newest writer and
/// starts uploading the part; meanwhile another client sends other bytes for the same range
/// through A, which wins (204) and stores the same part number first. When B's upload lands
/// later, S3 keeps B's bytes under that part number, and the upload must still complete with the
/// winner's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_late_part_upload_of_a_superseded_writer() {
    let part = 5 * MIB;
    let mut cluster = Cluster::start(Storage::S3, 1, &["--part-size", "5MiB"]).await;
    let endpoint = cluster.bucket.as_ref().unwrap().endpoint.clone();
    let upstream = endpoint.trim_start_matches("http://").parse().expect("the S3 endpoint is http://IP:PORT");
    let proxy = SlowProxy::start(upstream, 2 * MIB as u64).await;
    let slow_endpoint = format!("http://{}", proxy.addr);
    cluster.add_node(&["--part-size", "5MiB"], &[("AWS_ENDPOINT", &slow_endpoint)]).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    let len = 2 * part;
    let winner = random_bytes(len, 50);
    let loser = random_bytes(part, 51);
    let url = a.create(len as u64).await;

    // B gets a whole part and starts uploading it over the slow link.
    let slow = Streaming::start(b, &url, 0, part);
    slow.send(&loser).await;
    let before = proxy.forwarded.load(Ordering::Relaxed);
    wait_for("B to start uploading its part", Duration::from_secs(20), || async {
        proxy.forwarded.load(Ordering::Relaxed) > before + MIB as u64
    })
    .await;

    // A newer request through A takes over the same range and wins.
    let response = a.patch(&url, 0, winner[..part].to_vec()).await;
    assert_eq!(response.status(), 204, "the newer request: {}", response.text().await.unwrap_or_default());
    let outcome = slow.finish(Duration::from_secs(30)).await.expect("an answer for the older request");
    assert_eq!(outcome.status(), 409, "the older request must lose");

    let response = a.patch(&url, part as u64, winner[part..].to_vec()).await;
    assert_eq!(response.status(), 204, "the last part: {}", response.text().await.unwrap_or_default());
    cluster.assert_complete(&url, &winner).await;
}

cluster_tests!(
    alternating_chunks,
    concurrent_appends_one_wins,
    dropped_connection_resumes_elsewhere,
    sigkill_mid_patch,
    sigterm_lets_requests_finish,
    ietf_uploads_move_between_instances,
    concatenation_across_instances,
);

/// Two partial uploads of more than 64 MiB, each sent through another instance in 8 MiB chunks,
/// and a final upload created on the second: complete on both instances right after the 201
/// (offset == length, nothing copied), GET and a Range across the partials' boundary byte-exact
/// everywhere, the SHA-256 the file's once the background job has computed it. Terminating a
/// partial leaves the final upload whole; deleting the final upload then frees that partial's
/// bytes and leaves the other partial's.
pub(crate) async fn concatenation_across_instances(storage: Storage) {
    let cluster = Cluster::start(storage, 2, &[]).await;
    let parts = [random_bytes(64 * MIB + 1_234, 31), random_bytes(64 * MIB - 77, 32)];
    let whole: Vec<u8> = parts.concat();
    let mut partials = Vec::new();
    for (node, data) in cluster.nodes.iter().zip(&parts) {
        let url = node.create_partial(data.len() as u64).await;
        let mut offset = 0;
        for chunk in data.chunks(8 * MIB) {
            let response = node.patch(&url, offset as u64, chunk.to_vec()).await;
            assert_eq!(response.status(), 204, "{}", response.text().await.unwrap_or_default());
            offset += chunk.len();
        }
        partials.push(url);
    }
    let node = &cluster.nodes[1];
    let response = node
        .client
        .post(&node.files)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Concat", format!("final;{} {}", partials[0], partials[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap_or_default());
    let url = header(&response, "location");
    let boundary = parts[0].len();
    for node in &cluster.nodes {
        assert_eq!(node.offset(&url).await, whole.len() as u64, "complete at once on {}", node.name);
        let across = node
            .client
            .get(node.at(&url))
            .header("Range", format!("bytes={}-{}", boundary - 3000, boundary + 2999))
            .send()
            .await
            .unwrap();
        assert_eq!(across.status(), 206);
        assert!(
            across.bytes().await.unwrap().as_ref() == &whole[boundary - 3000..boundary + 3000],
            "range on {}",
            node.name
        );
        assert_same_bytes("the final upload", &node.download(&url).await, &whole);
    }
    let want = format!("sha-256=:{}:", crate::helpers::sha256_b64(&whole));
    wait_for("the final upload's SHA-256", Duration::from_secs(60), || async {
        node.head(&url).await.headers().get("repr-digest").is_some_and(|d| d.to_str().unwrap() == want)
    })
    .await;

    let first = &cluster.nodes[0];
    assert_eq!(first.tus(Method::DELETE, &partials[0]).send().await.unwrap().status(), 204);
    assert_same_bytes("the final upload after its partial was terminated", &first.download(&url).await, &whole);
    assert_eq!(first.tus(Method::DELETE, &url).send().await.unwrap().status(), 204);
    // The DELETE frees them, and so may a sweeper that found them deletable meanwhile; on Azure
    // a deletion in flight shows an empty blob (its block list dropped, the blob not yet
    // deleted) until it ends.
    let terminated = upload_id(&partials[0]).to_string();
    wait_for("the terminated partial's bytes to be freed with the final upload", Duration::from_secs(30), || async {
        !cluster.store_inventory().await.iter().any(|line| line.contains(&terminated))
    })
    .await;
    let inventory = cluster.store_inventory().await;
    let kept = |id: &str| inventory.iter().any(|line| line.contains(id));
    assert!(kept(upload_id(&partials[1])), "the live partial keeps its bytes: {inventory:?}");
    assert_same_bytes("the other partial", &first.download(&partials[1]).await, &parts[1]);
}

/// An upload created with the IETF draft on one instance is resumed on the other (HEAD, PATCH
/// alternate), completes byte-exact, and a tus client on either sees the same upload.
async fn ietf_uploads_move_between_instances(storage: Storage) {
    let cluster = Cluster::start(storage, 2, &[]).await;
    let data = random_bytes(20 * MIB + 77, 60);
    let draft = |node: &Node, method: reqwest::Method, target: &str| {
        node.client.request(method, target).header("Upload-Draft-Interop-Version", "9")
    };
    let a = &cluster.nodes[0];
    let created = draft(a, reqwest::Method::POST, &a.files)
        .header("Upload-Complete", "?0")
        .header("Upload-Length", data.len().to_string())
        .body(data[..MIB].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let url = header(&created, "location");
    let mut offset = MIB;
    for (i, piece) in data[MIB..].chunks(8 * MIB).enumerate() {
        let node = &cluster.nodes[(i + 1) % 2];
        let head = draft(node, reqwest::Method::HEAD, &node.at(&url)).send().await.unwrap();
        assert_eq!(head.status(), 204, "HEAD through {}", node.name);
        assert_eq!(header(&head, "upload-offset"), offset.to_string(), "HEAD through {}", node.name);
        let last = offset + piece.len() == data.len();
        let response = draft(node, reqwest::Method::PATCH, &node.at(&url))
            .header("Content-Type", "application/partial-upload")
            .header("Upload-Offset", offset.to_string())
            .header("Upload-Complete", if last { "?1" } else { "?0" })
            .body(piece.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), if last { 200 } else { 204 }, "PATCH through {}", node.name);
        offset += piece.len();
        assert_eq!(header(&response, "upload-complete"), if last { "?1" } else { "?0" });
    }
    cluster.assert_complete(&url, &data).await;
    for node in &cluster.nodes {
        assert_eq!(node.offset(&url).await as usize, data.len(), "tus HEAD through {}", node.name);
    }
}

/// A download link made by one instance opens on another, and after every instance has
/// restarted: its key is the database's, made once by whichever instance started first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_links_open_on_every_instance() {
    let mut cluster = Cluster::start(Storage::Local, 2, &[]).await;
    let data = random_bytes(100_000, 41);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let url = a.create(data.len() as u64).await;
    assert_eq!(a.patch(&url, 0, data.clone()).await.status(), 204);
    let answer = a.client.get(format!("{}/link", a.at(&url))).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    let link = body["url"].as_str().unwrap().to_string();
    let (_, query) = link.split_once('?').unwrap();
    // The signature covers the upload and the expiry, not the address ferry is reached at.
    let on_b = format!("{}?{query}", b.at(&url));
    let opened = b.client.get(&on_b).send().await.unwrap();
    assert_eq!(opened.status(), 200, "{on_b}");
    assert_same_bytes("through the other instance", &opened.bytes().await.unwrap(), &data);
    let forged = format!("{}?{}", b.at(&url), query.replace("expires=", "expires=1"));
    assert_eq!(b.client.get(&forged).send().await.unwrap().status(), 403);

    cluster.restart(0).await;
    cluster.restart(1).await;
    for node in &cluster.nodes {
        let again = node.client.get(format!("{}?{query}", node.at(&url))).send().await.unwrap();
        assert_eq!(again.status(), 200, "after the restarts, on {}", node.name);
    }
}
