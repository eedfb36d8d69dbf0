//! A store wrapper that times every operation into the metrics.

use std::{ops::Range, sync::Arc, time::Duration, time::Instant};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    AppendContext, AppendOutcome, Appender, ByteStream, Download, Part, Result, Staged, StagedObject, Store,
    StoreUpload,
};
use crate::{model::types::UploadId, telemetry::Metrics};

pub struct Instrumented {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

async fn timed<T>(metrics: &Metrics, operation: &'static str, work: impl Future<Output = Result<T>>) -> Result<T> {
    let started = Instant::now();
    let result = work.await;
    metrics.observe_store(operation, result.is_ok(), started.elapsed());
    result
}

#[async_trait]
impl Store for Instrumented {
    async fn create(
        &self,
        id: UploadId,
        key_prefix: Option<String>,
        max_length: u64,
        empty: bool,
    ) -> Result<StoreUpload> {
        timed(&self.metrics, "create", self.inner.create(id, key_prefix, max_length, empty)).await
    }

    async fn append(&self, context: AppendContext) -> Result<Box<dyn Appender>> {
        let inner = timed(&self.metrics, "append_open", self.inner.append(context)).await?;
        Ok(Box::new(InstrumentedAppender { inner, metrics: self.metrics.clone() }))
    }

    fn completes_in_place(&self) -> bool {
        self.inner.completes_in_place()
    }

    async fn complete(&self, id: UploadId, upload: &StoreUpload, parts: &[Part]) -> Result<()> {
        timed(&self.metrics, "complete", self.inner.complete(id, upload, parts)).await
    }

    async fn read(&self, id: UploadId, upload: &StoreUpload, range: Option<Range<u64>>) -> Result<Download> {
        timed(&self.metrics, "read", self.inner.read(id, upload, range)).await
    }

    async fn write_stream(&self, id: UploadId, upload: &StoreUpload, stream: ByteStream) -> Result<u64> {
        timed(&self.metrics, "write_stream", self.inner.write_stream(id, upload, stream)).await
    }

    async fn delete(&self, id: UploadId, upload: &StoreUpload, staged: &[Staged]) -> Result<()> {
        timed(&self.metrics, "delete", self.inner.delete(id, upload, staged)).await
    }

    async fn staged_objects(&self) -> Result<Vec<StagedObject>> {
        timed(&self.metrics, "list_staged", self.inner.staged_objects()).await
    }

    async fn delete_staged(&self, key: &str) -> Result<()> {
        timed(&self.metrics, "delete_staged", self.inner.delete_staged(key)).await
    }

    async fn presign(&self, id: UploadId, upload: &StoreUpload, expires_in: Duration) -> Result<Option<String>> {
        timed(&self.metrics, "presign", self.inner.presign(id, upload, expires_in)).await
    }

    fn location(&self, id: UploadId, upload: &StoreUpload) -> String {
        self.inner.location(id, upload)
    }

    async fn ping(&self) -> Result<()> {
        timed(&self.metrics, "ping", self.inner.ping()).await
    }

    fn largest_part(&self, max_length: u64) -> Option<u64> {
        self.inner.largest_part(max_length)
    }

    fn space(&self) -> Option<super::Space> {
        self.inner.space()
    }
}

struct InstrumentedAppender {
    inner: Box<dyn Appender>,
    metrics: Arc<Metrics>,
}

impl Appender for InstrumentedAppender {
    fn write(&mut self, data: Vec<Bytes>) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.write(data);
        self.metrics.observe_store("append_write", result.is_ok(), started.elapsed());
        result
    }

    fn finish(self: Box<Self>, last: bool) -> Result<AppendOutcome> {
        let Self { inner, metrics } = *self;
        let started = Instant::now();
        let result = inner.finish(last);
        metrics.observe_store("append_finish", result.is_ok(), started.elapsed());
        result
    }

    fn holds_until(&self) -> Option<u64> {
        self.inner.holds_until()
    }
}
