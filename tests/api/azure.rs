//! Azure Blob Storage, on Azurite (started by tests/run): real `ferry serve` processes with
//! `--store az://<container>/ferry`, configured with `--store-option` pairs. An append's full
//! parts are Put Block calls, smaller rests are staged as blobs of their own, and completing is
//! one Put Block List. These tests need `FERRY_TEST_AZURE_ENDPOINT` and fail without it.

use std::time::Duration;

use reqwest::Method;

use crate::cluster::{alternating_chunks, dropped_connection_resumes_elsewhere, sigkill_mid_patch, store_holds_only};
use crate::helpers::{Cluster, Node, Storage, assert_same_bytes, header, random_bytes, upload_id, wait_for};

const MIB: usize = 1 << 20;

/// Uploads `data` through `node` in chunks of `chunk` bytes; returns the upload's URL.
async fn upload_in_chunks(node: &Node, data: &[u8], chunk: usize) -> String {
    let url = node.create(data.len() as u64).await;
    let mut offset = 0;
    for piece in data.chunks(chunk) {
        let response = node.patch(&url, offset as u64, piece.to_vec()).await;
        let status = response.status();
        assert_eq!(status, 204, "PATCH at {offset}: {}", response.text().await.unwrap_or_default());
        offset += piece.len();
        assert_eq!(header(&response, "upload-offset"), offset.to_string());
    }
    url
}

/// 1 MiB chunks (staged as blobs until they fill an 8 MiB block) and 8 MiB chunks (a block
/// each): both uploads come out byte-exact, with the SHA-256 ferry reports in `Repr-Digest`;
/// afterwards the container holds the two blobs and nothing else (no staged chunk, no
/// uncommitted block).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_uploads_are_byte_exact() {
    let cluster = Cluster::start(Storage::Azure, 1, &[]).await;
    let len = 20 * MIB + 12_345;
    let mut uploads = Vec::new();
    for (chunk, seed) in [(MIB, 1), (8 * MIB, 2)] {
        let data = random_bytes(len, seed);
        let url = upload_in_chunks(&cluster.nodes[0], &data, chunk).await;
        cluster.assert_complete(&url, &data).await;
        uploads.push((url, len));
    }
    store_holds_only(&cluster, &uploads).await;
}

/// Two instances, one container: a client alternates between them chunk by chunk (1 MiB and
/// 8 MiB chunks); the instance with `--download redirect` sends the client to a SAS URL of the
/// blob, signed with the account key, which Azurite serves (with a range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_alternate() {
    alternating_chunks(Storage::Azure).await;
}

/// A connection dies mid-PATCH on one instance; the client resumes through the other at once,
/// and what the first received counts whole or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_dropped_connection() {
    dropped_connection_resumes_elsewhere(Storage::Azure).await;
}

/// An instance killed mid-append leaves blocks and staged chunks behind; once the other
/// instance has completed one upload and terminated the other, nothing but the completed blob
/// is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_leaves_nothing_behind() {
    sigkill_mid_patch(Storage::Azure).await;
}

/// Ranges of a completed upload, streamed by ferry (within a block, across the boundary of two
/// blocks, a suffix, an open end) and through `--download redirect`, where the client follows
/// the redirect to Azurite with its `Range` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_downloads() {
    let cluster = Cluster::start_nodes(Storage::Azure, &[&[], &["--download", "redirect"]]).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let len = 9 * MIB + 777;
    let data = random_bytes(len, 3);
    let url = upload_in_chunks(a, &data, 4 * MIB).await;
    cluster.assert_complete(&url, &data).await;

    let boundary = 8 * MIB;
    let cases = [
        ("bytes=0-0".to_string(), 0..1),
        (format!("bytes={}-{}", boundary - 100, boundary + 99), boundary - 100..boundary + 100),
        ("bytes=-100".to_string(), len - 100..len),
        (format!("bytes={}-", len - 5000), len - 5000..len),
    ];
    for (range, expected) in cases {
        let response = a.client.get(a.at(&url)).header("Range", &range).send().await.expect("GET through A");
        assert_eq!(response.status(), 206, "{range} through A");
        let content_range = format!("bytes {}-{}/{len}", expected.start, expected.end - 1);
        assert_eq!(header(&response, "content-range"), content_range, "{range} through A");
        assert_same_bytes(&format!("{range} through A"), &response.bytes().await.unwrap(), &data[expected]);
    }

    let range = format!("bytes={}-{}", boundary - 10, boundary + 9);
    let response = b.client.get(b.at(&url)).header("Range", &range).send().await.expect("GET through B");
    assert_eq!(response.status(), 206, "{range} through B, redirected to Azurite");
    assert!(response.url().as_str().starts_with(&cluster.container.as_ref().unwrap().endpoint));
    assert_same_bytes("a range through B", &response.bytes().await.unwrap(), &data[boundary - 10..boundary + 10]);
}

/// DELETE and expiry leave nothing in the container: neither the staged chunks nor the blocks
/// already put. Azure cannot abort a block upload (object_store's abort does nothing, and the
/// blocks would stay for a week): ferry commits an empty block list, which discards them, and
/// deletes the empty blob. A block a late writer puts after that (one that was already sending
/// when the upload was deleted) is dropped by the sweeper's second deletion, `--orphan-age`
/// later. Instance A keeps idle uploads for 24 h, B for 2 s: an append through B lets its upload
/// expire 2 s after it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_and_expire_leave_nothing() {
    let cluster = Cluster::start_nodes(
        Storage::Azure,
        &[&["--orphan-age", "2s"], &["--expire-after", "2s", "--orphan-age", "2s"]],
    )
    .await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let kept = random_bytes(3 * MIB + 5, 60);
    let kept_url = upload_in_chunks(a, &kept, kept.len()).await;
    cluster.assert_complete(&kept_url, &kept).await;

    // One 9 MiB PATCH each: an 8 MiB block and a staged 1 MiB chunk.
    let len = 20 * MIB;
    let terminated = a.create(len as u64).await;
    let expiring = a.create(len as u64).await;
    let response = a.patch(&terminated, 0, random_bytes(9 * MIB, 61)).await;
    assert_eq!(response.status(), 204, "PATCH: {}", response.text().await.unwrap_or_default());
    let inventory = cluster.store_inventory().await;
    let id = upload_id(&terminated);
    assert!(
        inventory.contains(&format!("blocks uploads/{id} (1 uncommitted)")),
        "upload {id} should have one uncommitted block: {inventory:#?}"
    );
    assert!(
        inventory.iter().any(|line| line.starts_with(&format!("staging/{id}/"))),
        "upload {id} should have a staged chunk: {inventory:#?}"
    );
    let response = b.patch(&expiring, 0, random_bytes(9 * MIB, 62)).await;
    assert_eq!(response.status(), 204, "PATCH: {}", response.text().await.unwrap_or_default());

    let response = a.tus(Method::DELETE, &terminated).send().await.expect("DELETE");
    assert_eq!(response.status(), 204, "terminating");
    assert_eq!(a.head(&terminated).await.status(), 410);
    let container = cluster.container.as_ref().unwrap();
    let terminated_key = format!("ferry/uploads/{id}");
    let late_blocks = || async {
        container.uncommitted_blocks().await.into_iter().filter(|(name, _)| *name == terminated_key).count()
    };
    container.put_block(&terminated_key).await;
    assert_eq!(late_blocks().await, 1, "the late writer's block is there before the sweeper's second pass");
    wait_for("the sweeper to drop the late block", Duration::from_secs(30), || async { late_blocks().await == 0 })
        .await;
    wait_for("the idle upload to expire", Duration::from_secs(30), || async {
        a.head(&expiring).await.status() == 410
    })
    .await;
    store_holds_only(&cluster, &[(kept_url, kept.len())]).await;

    // The blocks are gone, not only out of sight: a new block put on the same blob finds none
    // of the old ones beside it.
    for url in [&terminated, &expiring] {
        let key = format!("ferry/uploads/{}", upload_id(url));
        container.put_block(&key).await;
        let blocks: Vec<_> =
            container.uncommitted_blocks().await.into_iter().filter(|(name, _)| *name == key).collect();
        assert_eq!(blocks, vec![(key.clone(), 1)], "uncommitted blocks of {key} after one more was put");
    }
}

/// `--download redirect` with credentials that cannot sign URLs (a SAS token) is refused at
/// start with a message that says why, instead of failing every download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_without_signing_credentials_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let endpoint = crate::helpers::azure_endpoint();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--data-dir", dir.path().to_str().unwrap()])
        .args(["--store", "az://any/ferry", "--download", "redirect"])
        .args(["--store-option", "azure_storage_account_name=devstoreaccount1"])
        .args(["--store-option", &format!("azure_storage_endpoint={endpoint}/devstoreaccount1")])
        .args(["--store-option", "azure_allow_http=true"])
        .args(["--store-option", "azure_storage_sas_key=sv=2021-08-06&ss=b&srt=sco&sp=r&sig=abc"])
        .env_clear()
        .env("FERRY_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("ferry should exit at once")
        .expect("run ferry");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "ferry started with --download redirect and a SAS token:\n{stderr}");
    assert!(
        stderr.contains("--download redirect") && stderr.contains("--download stream"),
        "the error should name the flag and the way out:\n{stderr}"
    );
}

/// Concatenation on Azure: the final upload is read from the partials' blobs, on both instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concatenation_reads_the_partials() {
    crate::cluster::concatenation_across_instances(Storage::Azure).await;
}
