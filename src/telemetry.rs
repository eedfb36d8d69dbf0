//! Prometheus metrics, one registry per service instance (so tests in one process stay apart).

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub uploads_created: Counter,
    pub uploads_completed: Counter,
    pub uploads_terminated: Counter,
    pub uploads_expired: Counter,
    pub bytes_received: Counter,
    requests: Histograms,
    store_operations: Histograms,
    pool_connections: Gauge,
    pool_idle: Gauge,
    memory_budget: Gauge,
    memory_in_use: Gauge,
    store_free: Gauge,
    store_reserve: Gauge,
}

/// Values read when the metrics are rendered.
pub struct Readings {
    pub pool_connections: u32,
    pub pool_idle: usize,
    /// `--memory-budget` and how much of it appends hold now.
    pub memory_budget: u64,
    pub memory_in_use: u64,
    /// The local store's volume: its space and `--min-free-space` in bytes.
    pub store_space: Option<(crate::store::Space, u64)>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("ferry");
        let metrics = Self {
            uploads_created: Counter::default(),
            uploads_completed: Counter::default(),
            uploads_terminated: Counter::default(),
            uploads_expired: Counter::default(),
            bytes_received: Counter::default(),
            requests: Histograms::new_with_constructor(duration_histogram),
            store_operations: Histograms::new_with_constructor(duration_histogram),
            pool_connections: Gauge::default(),
            pool_idle: Gauge::default(),
            memory_budget: Gauge::default(),
            memory_in_use: Gauge::default(),
            store_free: Gauge::default(),
            store_reserve: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("uploads_created", "Uploads created", metrics.uploads_created.clone());
        registry.register("uploads_completed", "Uploads whose bytes are all stored", metrics.uploads_completed.clone());
        registry.register("uploads_terminated", "Uploads deleted by their clients", metrics.uploads_terminated.clone());
        registry.register(
            "uploads_expired",
            "Incomplete uploads expired by the sweeper",
            metrics.uploads_expired.clone(),
        );
        registry.register("received_bytes", "Upload bytes received and committed", metrics.bytes_received.clone());
        registry.register(
            "http_request_duration_seconds",
            "HTTP request duration by route, method and status",
            metrics.requests.clone(),
        );
        registry.register(
            "store_operation_duration_seconds",
            "Object store operation duration by operation and outcome",
            metrics.store_operations.clone(),
        );
        registry.register("db_pool_connections", "Database connections open", metrics.pool_connections.clone());
        registry.register("db_pool_idle_connections", "Database connections idle", metrics.pool_idle.clone());
        registry.register(
            "append_memory_budget_bytes",
            "Memory all appends of this instance may hold at once (--memory-budget)",
            metrics.memory_budget.clone(),
        );
        registry.register(
            "append_memory_in_use_bytes",
            "Memory appends hold now: bytes received and not yet stored and hashed",
            metrics.memory_in_use.clone(),
        );
        registry.register(
            "store_free_bytes",
            "Free space on the local store's volume (0 on object stores, which have no volume)",
            metrics.store_free.clone(),
        );
        registry.register(
            "store_min_free_bytes",
            "Free space the local store's volume keeps (--min-free-space); below it bodies get 507",
            metrics.store_reserve.clone(),
        );
        Arc::new(Self { registry, ..metrics })
    }

    pub fn observe_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let labels = vec![("route", route.to_string()), ("method", method.to_string()), ("status", status.to_string())];
        self.requests.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    pub fn observe_store(&self, operation: &'static str, ok: bool, elapsed: Duration) {
        let labels =
            vec![("operation", operation.to_string()), ("outcome", if ok { "ok" } else { "error" }.to_string())];
        self.store_operations.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// The metrics in the Prometheus text format, with the gauges read now.
    pub fn render(&self, now: Readings) -> String {
        self.pool_connections.set(i64::from(now.pool_connections));
        self.pool_idle.set(now.pool_idle as i64);
        self.memory_budget.set(now.memory_budget as i64);
        self.memory_in_use.set(now.memory_in_use as i64);
        if let Some((space, reserve)) = now.store_space {
            self.store_free.set(space.available as i64);
            self.store_reserve.set(reserve as i64);
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
