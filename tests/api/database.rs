//! The database layer when the request that runs its statements goes away mid-way: a client
//! that hangs up drops its request, and with it whatever the request was awaiting.

use std::{future::Future, pin::pin, task::Poll, time::Duration};

use ferry::uploads::types::UploadId;
use sqlx::Connection;

use crate::helpers::{Backend, fresh_database};

crate::db_backend_tests!(a_transaction_dropped_at_its_begin_leaves_no_connection_inside_it);

/// Polls `future` once, as far as it gets before it first waits (for a transaction on an idle
/// connection: its BEGIN sent, the answer not read), then drops it.
async fn drop_after_first_poll(future: impl Future) {
    let mut future = pin!(future);
    std::future::poll_fn(|cx| {
        let _ = future.as_mut().poll(cx);
        Poll::Ready(())
    })
    .await;
}

/// Whether a connection of its own sees the secret `name` committed.
async fn committed(backend: Backend, url: &str, name: &str) -> bool {
    let query = "SELECT count(*) FROM secrets WHERE name = $1";
    let count: i64 = match backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
            sqlx::query_scalar(query).bind(name).fetch_one(&mut conn).await.unwrap()
        }
        _ => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query_scalar(query).bind(name).fetch_one(&mut conn).await.unwrap()
        }
    };
    count == 1
}

/// A connection whose transaction was dropped while its BEGIN was on the wire must not go back
/// to the pool inside that transaction: the statements of whoever takes it next would run in it,
/// hold their locks and never commit.
async fn a_transaction_dropped_at_its_begin_leaves_no_connection_inside_it(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(backend, dir.path()).await;
    let repo = ferry::repo::connect(&url, Duration::from_secs(5)).await.unwrap();
    repo.migrate().await.unwrap();
    for round in 0..20 {
        // A transaction that would change nothing (there is no such upload).
        drop_after_first_poll(repo.terminate(UploadId::new(), 0, &[])).await;
        // A statement that commits on its own, on whatever connection the pool gives.
        let name = format!("probe {round}");
        repo.secret(&name, b"value", 0).await.unwrap();
        assert!(committed(backend, &url, &name).await, "round {round}: a write after a dropped BEGIN did not commit");
    }
}
