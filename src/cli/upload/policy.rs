//! The pure decisions of the upload loop: how large the next chunk is, how long to wait before a
//! retry, and how to read the server's limits. No I/O here, so every rule is unit-tested.

use std::time::{Duration, SystemTime};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// No chunk is made smaller than this: a proxy that refuses 64 KiB bodies is misconfigured, and
/// smaller chunks would spend more time on round trips than on bytes.
pub const MIN_CHUNK: u64 = 64 * KIB;
/// The first chunk's size when neither the server nor `--chunk-size` says otherwise.
pub const DEFAULT_CHUNK: u64 = 8 * MIB;

/// The chunk size of one file's upload. It starts at the first size asked for (never above the
/// ceiling), doubles while chunks take well under the target time, shrinks when they take longer,
/// and halves on a proxy's 413, whose size then becomes the new ceiling.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkPolicy {
    size: u64,
    floor: u64,
    ceiling: u64,
    target: Duration,
}

/// A proxy refused even the smallest chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtFloor {
    pub floor: u64,
}

impl ChunkPolicy {
    /// `start`: the first chunk's size; `ceiling`: never larger (the server's advertised
    /// `max-append-size` or `--max-chunk-size`, whichever is smaller); `target`: how long one
    /// chunk's transfer should take at most.
    pub fn new(start: u64, ceiling: u64, target: Duration) -> Self {
        let ceiling = ceiling.max(1);
        let floor = MIN_CHUNK.min(ceiling);
        Self { size: start.clamp(floor, ceiling), floor, ceiling, target }
    }

    /// The size of the next chunk.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn ceiling(&self) -> u64 {
        self.ceiling
    }

    /// Lowers the ceiling (a limit learned by another file's upload through the same proxy).
    pub fn cap(&mut self, ceiling: u64) {
        if ceiling < self.ceiling {
            self.ceiling = ceiling.max(self.floor);
            self.size = self.size.min(self.ceiling);
        }
    }

    /// A chunk of `bytes` went through in `elapsed`: grow while a chunk twice as large would still
    /// take under half the target time; shrink while the current size would take longer than the
    /// target. The rate is measured, so a short last chunk counts as much as a full one.
    pub fn sent(&mut self, bytes: u64, elapsed: Duration) {
        if bytes == 0 {
            return;
        }
        let rate = bytes as f64 / elapsed.as_secs_f64().max(0.001);
        let time_for = |size: u64| Duration::from_secs_f64(size as f64 / rate);
        if time_for(self.size.saturating_mul(2)) <= self.target / 2 {
            self.size = self.size.saturating_mul(2).min(self.ceiling);
            return;
        }
        while self.size > self.floor && time_for(self.size) > self.target {
            self.size = (self.size / 2).max(self.floor);
        }
    }

    /// A chunk timed out: the link is slower than measured, halve.
    pub fn timed_out(&mut self) {
        self.size = (self.size / 2).max(self.floor);
    }

    /// A proxy answered 413 to a body of `bytes`: halve below it and never grow back to it.
    /// Fails when the body was already as small as chunks may get.
    pub fn too_large(&mut self, bytes: u64) -> Result<u64, AtFloor> {
        if bytes <= self.floor {
            return Err(AtFloor { floor: self.floor });
        }
        let smaller = (bytes.min(self.size) / 2).max(self.floor);
        self.ceiling = smaller;
        self.size = smaller;
        Ok(smaller)
    }
}

/// Exponential backoff with jitter: the `attempt`th retry (1-based) waits `first * 2^(attempt-1)`,
/// at most `cap`, scaled by a random factor between 0.5 and 1 (`jitter` in 0..1), so that many
/// clients cut off together do not come back together.
pub fn backoff(attempt: u32, first: Duration, cap: Duration, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let delay = first.saturating_mul(1u32 << exponent).min(cap);
    delay.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// The longest `Retry-After` honoured; a server asking for more is retried after this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// `Retry-After` in seconds or as an HTTP date, relative to `now`; at most [`MAX_RETRY_AFTER`].
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value).ok()?.duration_since(now).unwrap_or(Duration::ZERO),
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// `Upload-Limit` (a Structured Fields dictionary such as `max-size=1000, max-append-size=10`):
/// the limits a server of either protocol announces. ferry sends it to tus clients too, with
/// `max-append-size` alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadLimit {
    pub max_size: Option<u64>,
    pub min_size: Option<u64>,
    pub max_append_size: Option<u64>,
    pub min_append_size: Option<u64>,
    /// Seconds the upload (or one created now) has left.
    pub max_age: Option<u64>,
}

impl UploadLimit {
    /// Unknown keys are skipped; a known key with a value that is not a non-negative Integer
    /// makes the whole field ignored (None), as the draft asks.
    pub fn parse(value: &str) -> Option<Self> {
        let dictionary = sfv::Parser::new(value).parse::<sfv::Dictionary>().ok()?;
        let mut limit = Self::default();
        for (key, entry) in &dictionary {
            let slot = match key.as_str() {
                "max-size" => &mut limit.max_size,
                "min-size" => &mut limit.min_size,
                "max-append-size" => &mut limit.max_append_size,
                "min-append-size" => &mut limit.min_append_size,
                "max-age" => &mut limit.max_age,
                _ => continue,
            };
            let sfv::ListEntry::Item(item) = entry else { return None };
            let number = i64::from(item.bare_item.as_integer()?);
            *slot = Some(u64::try_from(number).ok()?);
        }
        Some(limit)
    }
}

/// `max-append-size` from `Upload-Limit`, when it is a usable chunk size (not 0).
pub fn max_append_size(value: &str) -> Option<u64> {
    UploadLimit::parse(value)?.max_append_size.filter(|n| *n > 0)
}

/// A byte count for people: `512 B`, `64 KiB`, `1.5 MiB`, `2.00 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < KIB {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / KIB as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else if value < 10.0 {
        format!("{value:.2} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration for people: `45s`, `3m05s`, `2h10m`.
pub fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, (seconds % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_secs(10);

    #[test]
    fn starts_at_the_size_asked_for_but_never_above_the_ceiling() {
        assert_eq!(ChunkPolicy::new(8 * MIB, 64 * MIB, TARGET).size(), 8 * MIB);
        assert_eq!(ChunkPolicy::new(8 * MIB, MIB, TARGET).size(), MIB);
        // Never below the floor, unless the ceiling itself is lower.
        assert_eq!(ChunkPolicy::new(1000, 64 * MIB, TARGET).size(), MIN_CHUNK);
        assert_eq!(ChunkPolicy::new(8 * MIB, 1000, TARGET).size(), 1000);
    }

    #[test]
    fn grows_while_chunks_are_quick_up_to_the_ceiling() {
        let mut policy = ChunkPolicy::new(MIB, 16 * MIB, TARGET);
        // 1 MiB in 100 ms: 10 MiB/s, 2 MiB would take 0.2 s, well under half of 10 s.
        policy.sent(MIB, Duration::from_millis(100));
        assert_eq!(policy.size(), 2 * MIB);
        for _ in 0..10 {
            let size = policy.size();
            policy.sent(size, Duration::from_millis(100));
        }
        assert_eq!(policy.size(), 16 * MIB, "the ceiling holds");
    }

    #[test]
    fn stops_growing_where_a_chunk_would_take_too_long() {
        let mut policy = ChunkPolicy::new(MIB, 1024 * MIB, TARGET);
        // 1 MiB/s: grows while twice the size takes at most 5 s.
        for _ in 0..20 {
            let size = policy.size();
            policy.sent(size, Duration::from_secs_f64(size as f64 / MIB as f64));
        }
        assert_eq!(policy.size(), 4 * MIB, "8 MiB would take 8 s, more than half the target");
        let time_of_next = policy.size() as f64 / MIB as f64;
        assert!(time_of_next <= TARGET.as_secs_f64());
    }

    #[test]
    fn shrinks_when_the_link_slows_down() {
        let mut policy = ChunkPolicy::new(32 * MIB, 64 * MIB, TARGET);
        // 32 MiB took 64 s (0.5 MiB/s): at that rate the chunk must be at most 5 MiB.
        policy.sent(32 * MIB, Duration::from_secs(64));
        assert_eq!(policy.size(), 4 * MIB);
        // Extremely slow: down to the floor, not below.
        policy.sent(MIB, Duration::from_secs(1000));
        assert_eq!(policy.size(), MIN_CHUNK);
    }

    #[test]
    fn a_middling_chunk_keeps_its_size() {
        let mut policy = ChunkPolicy::new(8 * MIB, 64 * MIB, TARGET);
        policy.sent(8 * MIB, Duration::from_secs(4));
        assert_eq!(policy.size(), 8 * MIB);
    }

    #[test]
    fn a_proxy_413_halves_and_caps_growth() {
        let mut policy = ChunkPolicy::new(8 * MIB, 64 * MIB, TARGET);
        assert_eq!(policy.too_large(8 * MIB), Ok(4 * MIB));
        assert_eq!(policy.too_large(4 * MIB), Ok(2 * MIB));
        assert_eq!(policy.too_large(2 * MIB), Ok(MIB));
        // 1 MiB gets through quickly: it must not grow back into the proxy's limit.
        policy.sent(MIB, Duration::from_millis(10));
        assert_eq!(policy.size(), MIB);
        assert_eq!(policy.ceiling(), MIB);
    }

    #[test]
    fn a_413_on_a_short_last_chunk_halves_that_chunk() {
        let mut policy = ChunkPolicy::new(8 * MIB, 64 * MIB, TARGET);
        assert_eq!(policy.too_large(3 * MIB), Ok(3 * MIB / 2));
    }

    #[test]
    fn a_413_at_the_floor_gives_up() {
        let mut policy = ChunkPolicy::new(256 * KIB, 64 * MIB, TARGET);
        assert_eq!(policy.too_large(256 * KIB), Ok(128 * KIB));
        assert_eq!(policy.too_large(128 * KIB), Ok(64 * KIB));
        assert_eq!(policy.too_large(64 * KIB), Err(AtFloor { floor: MIN_CHUNK }));
    }

    #[test]
    fn a_timeout_halves() {
        let mut policy = ChunkPolicy::new(8 * MIB, 64 * MIB, TARGET);
        policy.timed_out();
        assert_eq!(policy.size(), 4 * MIB);
    }

    #[test]
    fn a_limit_learned_elsewhere_caps_the_size() {
        let mut policy = ChunkPolicy::new(8 * MIB, 64 * MIB, TARGET);
        policy.cap(MIB);
        assert_eq!((policy.size(), policy.ceiling()), (MIB, MIB));
        policy.cap(32 * MIB);
        assert_eq!(policy.ceiling(), MIB, "a cap never raises the ceiling");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let first = Duration::from_millis(500);
        let cap = Duration::from_secs(30);
        assert_eq!(backoff(1, first, cap, 1.0), first);
        assert_eq!(backoff(1, first, cap, 0.0), first / 2);
        assert_eq!(backoff(3, first, cap, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(20, first, cap, 1.0), cap);
        assert_eq!(backoff(u32::MAX, first, cap, 0.5), cap.mul_f64(0.75));
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(retry_after("3", now), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(20));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(20)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(20));
        assert_eq!(retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn upload_limit_dictionary() {
        assert_eq!(max_append_size("max-append-size=1048576"), Some(MIB));
        assert_eq!(max_append_size("max-size=100000000, max-append-size=65536"), Some(64 * KIB));
        assert_eq!(max_append_size("max-size=100"), None);
        assert_eq!(max_append_size("max-append-size=0"), None);
        assert_eq!(max_append_size("max-append-size=lots"), None);
    }

    #[test]
    fn upload_limit_of_the_ietf_draft() {
        let ferry = UploadLimit::parse("max-size=107374182400, max-append-size=1048576, max-age=86399").unwrap();
        assert_eq!(
            ferry,
            UploadLimit {
                max_size: Some(100 << 30),
                max_append_size: Some(MIB),
                max_age: Some(86399),
                ..UploadLimit::default()
            }
        );
        // A server with no limits says so with min-size=0; unknown keys do not matter.
        assert_eq!(UploadLimit::parse("min-size=0, future-key=?1").unwrap().min_size, Some(0));
        // A known key of the wrong type voids the whole field, and so does a negative size.
        assert_eq!(UploadLimit::parse("max-size=10, max-append-size=\"5\""), None);
        assert_eq!(UploadLimit::parse("max-size=-1"), None);
        assert_eq!(UploadLimit::parse("max-size=1, ,"), None, "not a dictionary");
    }

    #[test]
    fn sizes_and_durations_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 * KIB), "64 KiB");
        assert_eq!(human_bytes(3 * MIB / 2), "1.50 MiB");
        assert_eq!(human_bytes(100 * MIB + MIB / 2), "100.5 MiB");
        assert_eq!(human_duration(Duration::from_secs(45)), "45s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(human_duration(Duration::from_secs(7800)), "2h10m");
    }
}
