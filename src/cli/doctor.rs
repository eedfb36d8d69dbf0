//! `ferry doctor URL`: checks the way from a client to ferry the way uploads travel it, through
//! every proxy in front, and says what to change.
//!
//! It asks OPTIONS what the tus server offers and whether the IETF draft "Resumable Uploads for
//! HTTP" is spoken too (then a tiny upload is created through the proxies, to see its `201`, its
//! `Location`, its `Upload-Complete` and whether the `104` interim response got through, and is
//! deleted again), then uses ferry's probe endpoint
//! (`POST {URL}probe`, which reads and discards a body and says when the bytes arrived) to find
//! the largest body the proxies let through (bisection to within 1 %), to see whether a proxy
//! buffers request bodies (a slowly sent body that reaches ferry all at once, after the client has
//! finished, was buffered), and to measure latency and throughput. From that it recommends a chunk
//! size and `--max-append-size`, and prints the nginx, ingress-nginx and gunicorn settings that
//! end the 413 / 504 / 502 story, each with the reason.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures_util::stream;
use serde::Serialize;

use crate::cli::upload::{
    policy::UploadLimit,
    protocol::{INTEROP_HEADER, INTEROP_VERSION, Ietf, Protocol},
};
use crate::http::probe::{PROBE_HEADER, SEGMENT};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The smallest probe body: anything refusing it is not a body limit but a broken path.
const SMALLEST_PROBE: u64 = KIB;
/// The bisection stops once the refused size is within this fraction above the passing one.
pub const TOLERANCE: f64 = 0.01;
/// What the recommended chunk keeps below the measured limit.
const MARGIN: f64 = 0.05;
/// Body of the buffering test: sent in [`PACED_PIECES`] pieces over [`PACED_DURATION`].
const PACED_SIZE: u64 = 512 * KIB;
const PACED_PIECES: u32 = 16;
const PACED_DURATION: Duration = Duration::from_secs(2);
/// Latency samples (OPTIONS requests) and throughput samples (probe POSTs).
const LATENCY_SAMPLES: usize = 5;
const THROUGHPUT_SAMPLES: u32 = 3;
/// Throughput is measured with chunks of at most this size.
const THROUGHPUT_MAX_SIZE: u64 = 16 * MIB;
/// A chunk should take about this long at the measured throughput (when no limit is smaller).
const CHUNK_SECONDS: f64 = 5.0;
/// Without measurements: the largest body nginx lets through by default.
const DEFAULT_CHUNK: u64 = MIB;
/// Proxy timeouts recommended (seconds), and gunicorn's, kept below them.
const PROXY_TIMEOUT_SECONDS: u64 = 300;
const GUNICORN_TIMEOUT_SECONDS: u64 = 120;
/// How long the doctor waits in total for ferry's probe limits (429) before it gives up.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// The tus endpoint as clients see it, e.g. `https://app.example/files/`.
    pub url: String,

    /// An upload token, sent as `Authorization: Bearer` (needed when ferry checks tokens).
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Print the findings as JSON instead of a report.
    #[arg(long)]
    pub json: bool,
}

/// Runs the checks and prints the report; fails (non-zero exit) when the URL is not a reachable
/// tus server.
pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let doctor = Doctor::new(&args)?;
    match doctor.examine().await {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render_report(&report));
            }
            Ok(())
        }
        Err(problem) => {
            if args.json {
                let failed = serde_json::json!({"url": doctor.endpoint, "ok": false, "error": format!("{problem:#}")});
                println!("{}", serde_json::to_string_pretty(&failed)?);
            }
            Err(problem)
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Findings

/// Everything the doctor found, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub ok: bool,
    pub tus: TusInfo,
    /// The IETF draft, through the proxies.
    pub ietf: IetfInfo,
    /// Median round trip of an OPTIONS request.
    pub latency_ms: f64,
    pub probe: ProbeStatus,
    /// The largest body that passes every proxy; absent when the probe could not be used.
    pub limit: Option<LimitFinding>,
    pub buffering: Option<BufferingFinding>,
    pub throughput: Option<Throughput>,
    pub recommendation: Recommendation,
    pub advice: Advice,
    /// What needs attention, one sentence each.
    pub warnings: Vec<String>,
    pub requests: u32,
    pub elapsed_ms: f64,
}

/// What OPTIONS says.
#[derive(Debug, Clone, Serialize)]
pub struct TusInfo {
    pub version: String,
    pub extensions: Vec<String>,
    /// `Tus-Max-Size`.
    pub max_size: Option<u64>,
    /// `Upload-Limit: max-append-size=N`, what ferry currently asks clients to stay below.
    pub max_append_size: Option<u64>,
    pub checksum_algorithms: Vec<String>,
}

/// What the endpoint does in the IETF draft's terms (asked with interop version
/// [`INTEROP_VERSION`]).
#[derive(Debug, Clone, Serialize)]
pub struct IetfInfo {
    pub interop_version: u64,
    /// OPTIONS with `Upload-Draft-Interop-Version` answered `Upload-Limit`, which the draft asks
    /// of every server taking resumable uploads.
    pub offered: bool,
    /// That `Upload-Limit`.
    pub upload_limit: Option<String>,
    /// The test upload; absent when the draft is not offered.
    pub creation: Option<IetfCreation>,
}

/// A creation with `Upload-Complete: ?0` and no content, through the proxies.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IetfCreation {
    /// The final status; absent when no answer came.
    pub status: Option<u16>,
    pub location: Option<String>,
    /// The final answer's `Upload-Complete` (`?0` expected).
    pub upload_complete: Option<String>,
    /// Whether `104 Upload Resumption Supported` arrived before the final answer; absent when
    /// it cannot be seen (over https the doctor's HTTP client hides interim responses).
    pub interim_104: Option<bool>,
    /// The `104`'s `Location`, which must be the final answer's.
    pub interim_location: Option<String>,
    /// The `DELETE` of the test upload answered 204.
    pub deleted: bool,
    /// What went wrong, when something did.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeStatus {
    pub url: String,
    pub available: bool,
    /// Why the probe could not be used.
    pub problem: Option<String>,
    /// The largest body ferry's probe takes.
    pub max_size: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LimitFinding {
    /// Whether some body up to the probe's maximum was refused on the way.
    pub found: bool,
    /// The largest body that reached ferry.
    pub largest_passing: u64,
    /// The smallest body refused on the way (within 1 % of `largest_passing` when found).
    pub smallest_refused: Option<u64>,
    /// Who refused it and how, e.g. `413 from a proxy (nginx/1.22.1)`.
    pub refused_by: Option<String>,
    /// How many probe requests the search took.
    pub requests: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Buffering {
    /// The body reached ferry as the client sent it.
    Streaming,
    /// The body reached ferry all at once, after the client had finished.
    Buffered,
    /// Neither clearly (partly buffered, or the measurement was disturbed).
    Unclear,
}

#[derive(Debug, Clone, Serialize)]
pub struct BufferingFinding {
    pub verdict: Buffering,
    pub bytes: u64,
    /// From the first to the last piece the client sent.
    pub client_send_ms: f64,
    /// From the first to the last byte ferry read.
    pub server_read_span_ms: f64,
    pub server_first_byte_ms: Option<f64>,
    pub server_read_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub bytes_per_second: f64,
    pub request_size: u64,
    pub requests: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Recommendation {
    /// The chunk size clients should use.
    pub chunk_size: u64,
    /// What to give ferry's `--max-append-size` (advertised as `Upload-Limit`).
    pub max_append_size: u64,
    pub why: String,
}

/// Settings for the proxies and the application server, each with its reason.
#[derive(Debug, Clone, Serialize)]
pub struct Advice {
    /// Directives for every nginx in front of ferry, in the location that proxies the tus path.
    pub nginx: Vec<Setting>,
    /// Annotations of the Ingress in front of ferry (ingress-nginx).
    pub ingress_nginx: Vec<Setting>,
    /// gunicorn settings of the Python application (for its own requests, not ferry's).
    pub gunicorn: Vec<Setting>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    pub name: String,
    pub value: String,
    pub why: String,
}

impl Setting {
    fn new(name: &str, value: impl Into<String>, why: &str) -> Self {
        Self { name: name.into(), value: value.into(), why: why.into() }
    }
}

// ------------------------------------------------------------------------------------------------
// The pure parts: the search, the verdict, the recommendation, the advice.

/// Bisection on a logarithmic scale between a size known to pass and one known to be refused,
/// until the refused one is within [`TOLERANCE`] of the passing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSearch {
    pub passing: u64,
    pub refused: u64,
}

impl LimitSearch {
    pub fn new(passing: u64, refused: u64) -> Self {
        Self { passing, refused }
    }

    /// The next size to try, or None once the limit is pinned down.
    pub fn next_size(&self) -> Option<u64> {
        let (low, high) = (self.passing, self.refused);
        if high <= low + 1 || high as f64 <= low as f64 * (1.0 + TOLERANCE) {
            return None;
        }
        let middle = ((low.max(1) as f64) * (high as f64)).sqrt().round() as u64;
        Some(middle.clamp(low + 1, high - 1))
    }

    pub fn record(&mut self, size: u64, passed: bool) {
        if passed {
            self.passing = self.passing.max(size);
        } else {
            self.refused = self.refused.min(size);
        }
    }
}

/// Streaming or buffered, from how long the client took to send a paced body and how long ferry
/// took to read it: a buffering proxy hands the body over in one go after the client finished.
pub fn buffering_verdict(client_send: Duration, server_read_span: Duration) -> Buffering {
    let sent = client_send.as_secs_f64();
    if sent < 0.5 {
        return Buffering::Unclear;
    }
    let ratio = server_read_span.as_secs_f64() / sent;
    if ratio >= 0.5 {
        Buffering::Streaming
    } else if ratio <= 0.2 {
        Buffering::Buffered
    } else {
        Buffering::Unclear
    }
}

/// A chunk size safely below a measured body limit: 5 % under it, rounded down to 64 KiB (or
/// 1 KiB for small limits).
pub fn chunk_below(limit: u64) -> u64 {
    let target = (limit as f64 * (1.0 - MARGIN)) as u64;
    let unit = if target >= 256 * KIB {
        64 * KIB
    } else if target >= 4 * KIB {
        KIB
    } else {
        1
    };
    (target / unit * unit).max(1)
}

/// The chunk size that takes about [`CHUNK_SECONDS`] at `bytes_per_second`: a power of two
/// MiB between 1 MiB and 64 MiB.
pub fn chunk_for_throughput(bytes_per_second: f64) -> u64 {
    let target = bytes_per_second * CHUNK_SECONDS;
    let mut chunk = MIB;
    while chunk < 64 * MIB && ((chunk * 2) as f64) <= target {
        chunk *= 2;
    }
    chunk
}

/// The chunk size to use and why: below the proxies' limit, and no longer than a few seconds'
/// worth at the measured throughput.
pub fn recommend(limit: Option<&LimitFinding>, throughput: Option<f64>) -> Recommendation {
    let by_limit = limit.filter(|l| l.found).map(|l| (chunk_below(l.largest_passing), l.largest_passing));
    let by_speed = throughput.filter(|t| *t > 0.0).map(chunk_for_throughput);
    let (chunk_size, why) = match (by_limit, by_speed) {
        (Some((below, _)), Some(speed)) if speed < below => (
            speed,
            format!(
                "about {CHUNK_SECONDS:.0} s per chunk at the measured throughput (below the proxies' limit): \
                 a failed chunk costs little to send again"
            ),
        ),
        (Some((below, limit)), _) => (
            below,
            format!(
                "{}% below the largest body the proxies let through ({}), so every chunk passes them",
                (MARGIN * 100.0) as u32,
                human_size(limit)
            ),
        ),
        (None, Some(speed)) => (
            speed,
            format!(
                "no proxy limit in the way; about {CHUNK_SECONDS:.0} s per chunk at the measured throughput, \
                 so a failed chunk costs little to send again"
            ),
        ),
        (None, None) => {
            (DEFAULT_CHUNK, "nothing could be measured: 1 MiB passes nginx's default client_max_body_size".to_string())
        }
    };
    Recommendation { chunk_size, max_append_size: chunk_size, why }
}

/// A size in nginx's syntax, rounded up to whole megabytes (or gigabytes when exact).
pub fn nginx_size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}g", bytes >> 30)
    } else {
        format!("{}m", bytes.div_ceil(MIB).max(1))
    }
}

/// The settings for the proxies and gunicorn. `tus_max_size` is ferry's `Tus-Max-Size`: whole
/// files up to it may pass the proxies, since ferry enforces it itself.
pub fn advice(tus_max_size: Option<u64>) -> Advice {
    let body_size = tus_max_size.map(nginx_size).unwrap_or_else(|| "0".into());
    let body_why = match tus_max_size {
        Some(max) => format!(
            "larger bodies get nginx's 413 before reaching ferry; let whole files through, ferry refuses \
             uploads over its Tus-Max-Size ({}) itself",
            human_size(max)
        ),
        None => "larger bodies get nginx's 413 before reaching ferry; 0 lets whole files through, ferry \
                 enforces its own Tus-Max-Size"
            .into(),
    };
    let buffering_why = "stream bodies to ferry as they arrive: it saves progress while the client sends, \
                         instead of nginx spooling the whole body to disk first";
    let version_why = "without HTTP/1.1 to ferry, nginx buffers bodies sent without Content-Length \
                       (chunked) whatever proxy_request_buffering says";
    let read_why = "nginx answers 504 after this long without a byte of ferry's answer; ferry answers \
                    promptly, this leaves room for a slow store";
    let send_why = "nginx gives up after this long unable to write to ferry; ferry reads as fast as its \
                    store takes bytes";
    let timeout = format!("{PROXY_TIMEOUT_SECONDS}s");
    let nginx = vec![
        Setting::new("client_max_body_size", body_size.clone(), &body_why),
        Setting::new("proxy_request_buffering", "off", buffering_why),
        Setting::new("proxy_http_version", "1.1", version_why),
        Setting::new("proxy_read_timeout", timeout.clone(), read_why),
        Setting::new("proxy_send_timeout", timeout, send_why),
    ];
    let seconds = PROXY_TIMEOUT_SECONDS.to_string();
    let ingress_nginx = vec![
        Setting::new("nginx.ingress.kubernetes.io/proxy-body-size", body_size, &body_why),
        Setting::new("nginx.ingress.kubernetes.io/proxy-request-buffering", "off", buffering_why),
        Setting::new("nginx.ingress.kubernetes.io/proxy-http-version", "1.1", version_why),
        Setting::new("nginx.ingress.kubernetes.io/proxy-read-timeout", seconds.clone(), read_why),
        Setting::new("nginx.ingress.kubernetes.io/proxy-send-timeout", seconds, send_why),
    ];
    let gunicorn_why = format!(
        "sync workers silent longer than this are killed (the 502); ferry's hooks need under 10 s, so raise \
         it only for the app's own large requests, and keep it below proxy_read_timeout ({PROXY_TIMEOUT_SECONDS} s)"
    );
    let gunicorn = vec![Setting::new("timeout", GUNICORN_TIMEOUT_SECONDS.to_string(), &gunicorn_why)];
    Advice { nginx, ingress_nginx, gunicorn }
}

/// `1048576` -> `1 MiB`, `1040000` -> `1015.62 KiB`.
pub fn human_size(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", MIB), ("KiB", KIB)] {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {unit}", bytes / size)
            } else {
                format!("{:.2} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}

/// A size as ferry's flags take it, exactly: `983040` -> `960KiB`.
pub fn flag_size(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", MIB), ("KiB", KIB)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

fn rate(bytes_per_second: f64) -> String {
    format!("{:.1} MB/s", bytes_per_second / 1e6)
}

/// The human-readable report.
pub fn render_report(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "ferry doctor {}\n", report.url);
    let tus = &report.tus;
    let mut spoken = vec![format!("tus {}", tus.version)];
    if report.ietf.offered {
        spoken.push(format!("the IETF draft (interop {})", report.ietf.interop_version));
    }
    let _ = writeln!(w, "  protocols     {}", spoken.join(" and "));
    let _ = writeln!(w, "  tus server    tus {} with {}", tus.version, tus.extensions.join(", "));
    let max = tus.max_size.map_or("not advertised".into(), human_size);
    let limit = tus.max_append_size.map_or("not advertised".into(), |n| format!("max-append-size={n}"));
    let _ = writeln!(w, "                Tus-Max-Size {max}; Upload-Limit {limit}");
    for (i, line) in ietf_lines(&report.ietf).iter().enumerate() {
        let _ = writeln!(w, "  {:<12}  {line}", if i == 0 { "IETF draft" } else { "" });
    }
    let _ = writeln!(w, "  latency       {:.1} ms (median of {LATENCY_SAMPLES} OPTIONS)", report.latency_ms);
    match (&report.limit, report.probe.available) {
        (Some(found), _) if found.found => {
            let refused = found.smallest_refused.map(human_size).unwrap_or_default();
            let by = found.refused_by.as_deref().unwrap_or("refused");
            let _ = writeln!(
                w,
                "  body limit    bodies of {} pass, of {refused} do not: {by} ({} probes)",
                human_size(found.largest_passing),
                found.requests
            );
        }
        (Some(found), _) => {
            let _ = writeln!(
                w,
                "  body limit    none: {} (the probe's maximum) reached ferry; no proxy limit below {}",
                human_size(found.largest_passing),
                human_size(found.largest_passing)
            );
        }
        (None, _) => {
            let problem = report.probe.problem.as_deref().unwrap_or("not measured");
            let _ = writeln!(w, "  body limit    not measured: {problem}");
        }
    }
    if let Some(b) = &report.buffering {
        let verdict = match b.verdict {
            Buffering::Streaming => format!(
                "streaming: {} sent over {:.1} s reached ferry as it was sent (read over {:.1} s)",
                human_size(b.bytes),
                b.client_send_ms / 1e3,
                b.server_read_span_ms / 1e3
            ),
            Buffering::Buffered => format!(
                "BUFFERED: {} sent over {:.1} s reached ferry in one go after the client finished (read in {:.0} ms)",
                human_size(b.bytes),
                b.client_send_ms / 1e3,
                b.server_read_span_ms
            ),
            Buffering::Unclear => format!(
                "unclear: {} sent over {:.1} s were read by ferry over {:.1} s",
                human_size(b.bytes),
                b.client_send_ms / 1e3,
                b.server_read_span_ms / 1e3
            ),
        };
        let _ = writeln!(w, "  buffering     {verdict}");
    }
    if let Some(t) = &report.throughput {
        let _ = writeln!(
            w,
            "  throughput    {} ({} x {} to the probe)",
            rate(t.bytes_per_second),
            t.requests,
            human_size(t.request_size)
        );
    }
    let _ = writeln!(w, "  took          {:.1} s, {} requests", report.elapsed_ms / 1e3, report.requests);

    if !report.warnings.is_empty() {
        let _ = writeln!(w, "\nAttention");
        for warning in &report.warnings {
            let _ = writeln!(w, "  - {warning}");
        }
    }

    let r = &report.recommendation;
    let _ = writeln!(w, "\nRecommendation");
    let _ = writeln!(w, "  chunk size    {} ({} bytes): {}", human_size(r.chunk_size), r.chunk_size, r.why);
    let _ = writeln!(
        w,
        "  ferry         --max-append-size {}   (advertised as Upload-Limit: ferry's own clients and any \
         client that reads it size their chunks below it)",
        flag_size(r.max_append_size)
    );
    let limited = report.limit.as_ref().is_some_and(|l| l.found);
    let buffered = report.buffering.as_ref().is_some_and(|b| b.verdict != Buffering::Streaming);
    let intro = if limited || buffered {
        "\nChunks of the recommended size get through the proxies as they are. So that clients sending a whole \
         file\nin one request (curl, a plain creation-with-upload POST) get through too, and no proxy holds \
         bodies back,\nset these on every proxy in front of ferry, then reload it:"
    } else {
        "\nNothing in the way needs changing. For reference, what every proxy in front of ferry should have:"
    };
    let _ = writeln!(w, "{intro}");
    out.push_str(&render_snippets(&report.advice, &path_of(&report.url)));
    out
}

/// The report's lines on the IETF draft: what OPTIONS said, and how the test upload went.
pub fn ietf_lines(ietf: &IetfInfo) -> Vec<String> {
    let version = ietf.interop_version;
    let Some(limit) = ietf.upload_limit.as_deref().filter(|_| ietf.offered) else {
        return vec![format!(
            "not offered: OPTIONS with Upload-Draft-Interop-Version: {version} answered no Upload-Limit"
        )];
    };
    let mut lines = vec![format!("interop {version}; Upload-Limit {limit}")];
    let Some(creation) = &ietf.creation else { return lines };
    let Some(status) = creation.status else {
        let problem = creation.problem.as_deref().unwrap_or("no answer");
        lines.push(format!("test upload failed: {problem}"));
        return lines;
    };
    let mut parts = vec![format!("test upload: {status}")];
    if (200..300).contains(&status) {
        parts.push(if creation.location.is_some() { "Location".into() } else { "no Location".into() });
        parts.push(match &creation.upload_complete {
            Some(value) => format!("Upload-Complete: {value}"),
            None => "no Upload-Complete".into(),
        });
        parts.push(
            match creation.interim_104 {
                Some(true) => "104 passed",
                Some(false) => "104 not passed by the proxies",
                None => "104 not checked (https)",
            }
            .into(),
        );
        parts.push(if creation.deleted { "deleted".into() } else { "NOT deleted".into() });
    } else if let Some(problem) = &creation.problem {
        parts.push(problem.clone());
    }
    lines.push(parts.join(", "));
    lines
}

/// What needs attention in the draft's test upload.
pub fn ietf_warnings(ietf: &IetfInfo) -> Vec<String> {
    let mut warnings = Vec::new();
    let Some(creation) = ietf.creation.as_ref().filter(|_| ietf.offered) else { return warnings };
    match creation.status {
        Some(status) if (200..300).contains(&status) => {}
        status => {
            let problem = creation.problem.as_deref().unwrap_or("no answer");
            let status = status.map(|s| format!(" with {s}")).unwrap_or_default();
            warnings.push(format!(
                "the server offers the IETF draft, but creating an upload that way through the proxies failed\
                 {status}: {problem}"
            ));
            return warnings;
        }
    }
    if creation.location.is_none() {
        warnings.push("the IETF draft's creation was answered without Location: its clients cannot go on".into());
    }
    if creation.upload_complete.as_deref() != Some("?0") {
        warnings.push(format!(
            "the IETF draft's creation was answered with {}, not Upload-Complete: ?0",
            creation
                .upload_complete
                .as_deref()
                .map_or("no Upload-Complete".into(), |v| format!("Upload-Complete: {v}"))
        ));
    }
    if creation.interim_104 == Some(false) {
        warnings.push(
            "104 not passed by the proxies: clients of the IETF draft learn an upload's URL only from the final \
             answer, so a creation that carries the file and breaks off cannot be resumed (uploads created \
             empty and sent in appends are not affected; nginx drops interim responses)"
                .into(),
        );
    }
    if let (Some(interim), Some(location)) = (&creation.interim_location, &creation.location)
        && interim != location
    {
        warnings.push(format!(
            "the 104's Location ({interim}) differs from the final answer's ({location}): the draft wants them equal"
        ));
    }
    if !creation.deleted {
        warnings.push(format!(
            "the doctor's test upload{} could not be deleted{}; it expires on its own",
            creation.location.as_deref().map(|l| format!(" {l}")).unwrap_or_default(),
            creation.problem.as_deref().map(|p| format!(" ({p})")).unwrap_or_default()
        ));
    }
    warnings
}

fn path_of(url: &str) -> String {
    url::Url::parse(url).map(|u| u.path().to_string()).unwrap_or_else(|_| "/files/".into())
}

/// The advice as configuration snippets, a comment line with the reason above each setting.
pub fn render_snippets(advice: &Advice, path: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "\n# nginx (the host's, and any other nginx in front of ferry)\nlocation {path} {{");
    let _ = writeln!(w, "    # (keep your proxy_pass and proxy_set_header lines)");
    for s in &advice.nginx {
        let _ = writeln!(w, "    # {}\n    {} {};", s.why, s.name, s.value);
    }
    let _ = writeln!(w, "}}\n\n# ingress-nginx: annotations of the Ingress that routes {path} to ferry");
    let _ = writeln!(w, "metadata:\n  annotations:");
    for s in &advice.ingress_nginx {
        let _ = writeln!(w, "    # {}\n    {}: \"{}\"", s.why, s.name, s.value);
    }
    let _ = writeln!(w, "\n# gunicorn.conf.py of the Python application");
    for s in &advice.gunicorn {
        let _ = writeln!(w, "# {}\n{} = {}", s.why, s.name, s.value);
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Talking to ferry

/// How often a probe that failed for a reason unrelated to its size (a 502, 504, 408) is sent again
/// before the failure counts as a refusal of that size.
const TRANSIENT_RETRIES: u32 = 2;

/// What one probe request came back with.
#[derive(Debug, Clone)]
enum Outcome {
    /// The body reached ferry.
    Passed(ProbeAnswer),
    /// Refused on the way (or by ferry's own size limit, `by_ferry`).
    Refused { by: String, by_ferry: bool },
    /// ferry's own rate limits: try again after this long.
    Wait(Duration),
    /// A failure that says nothing about body sizes (a 5xx or 408 on the way): worth another try.
    Transient(String),
    /// The probe cannot be used at all.
    Unusable(String),
}

#[derive(Debug, Clone, serde::Deserialize)]
struct ProbeAnswer {
    received: u64,
    first_byte_ms: Option<f64>,
    read_ms: f64,
    max_size: u64,
}

struct Doctor {
    client: reqwest::Client,
    /// The tus endpoint, ending in `/`.
    endpoint: String,
    probe_url: String,
    token: Option<String>,
    requests: std::sync::atomic::AtomicU32,
}

impl Doctor {
    fn new(args: &DoctorArgs) -> anyhow::Result<Self> {
        let mut endpoint = args.url.trim().to_string();
        let parsed = url::Url::parse(&endpoint).with_context(|| format!("'{endpoint}' is not a URL"))?;
        anyhow::ensure!(matches!(parsed.scheme(), "http" | "https"), "'{endpoint}' is not an http:// or https:// URL");
        if !endpoint.ends_with('/') {
            endpoint.push('/');
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ferry-doctor/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            probe_url: format!("{endpoint}{SEGMENT}"),
            endpoint,
            token: args.token.clone(),
            requests: Default::default(),
        })
    }

    /// A tus request.
    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.plain_request(method, url).header("Tus-Resumable", "1.0.0")
    }

    /// A request of no protocol yet (ferry takes one with `Tus-Resumable` for tus).
    fn plain_request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = self.client.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn examine(&self) -> anyhow::Result<Report> {
        let started = Instant::now();
        let tus = self.options().await?;
        let ietf = self.ietf().await;
        let latency_ms = self.latency().await?;
        let mut warnings = Vec::new();

        let (probe, limit) = self.find_limit().await;
        let mut buffering = None;
        let mut throughput = None;
        if let Some(found) = &limit {
            buffering = self.buffering(found.largest_passing).await.unwrap_or_else(|e| {
                warnings.push(format!("the buffering test failed: {e}"));
                None
            });
            let size = if found.found { chunk_below(found.largest_passing) } else { 8 * MIB };
            let size = size.min(THROUGHPUT_MAX_SIZE).min(found.largest_passing);
            throughput = self.throughput(size).await.unwrap_or_else(|e| {
                warnings.push(format!("the throughput test failed: {e}"));
                None
            });
        }
        let recommendation = match (&limit, &throughput) {
            (None, _) if tus.max_append_size.is_some() => Recommendation {
                chunk_size: tus.max_append_size.unwrap_or(DEFAULT_CHUNK),
                max_append_size: tus.max_append_size.unwrap_or(DEFAULT_CHUNK),
                why: "nothing could be measured: what ferry already advertises".into(),
            },
            _ => recommend(limit.as_ref(), throughput.as_ref().map(|t| t.bytes_per_second)),
        };

        if let Some(problem) = &probe.problem {
            warnings.push(format!("the proxies could not be measured: {problem}"));
        }
        if let Some(found) = limit.as_ref().filter(|l| l.found) {
            warnings.push(format!(
                "bodies over {} are refused before they reach ferry, {}: a client sending larger chunks, or a \
                 whole file in one request, fails",
                human_size(found.largest_passing),
                found.refused_by.as_deref().unwrap_or("refused")
            ));
            match tus.max_append_size {
                Some(advertised) if advertised > found.largest_passing => warnings.push(format!(
                    "ferry advertises Upload-Limit max-append-size={advertised}, more than passes the proxies: \
                     clients that follow it get 413; set --max-append-size {}",
                    flag_size(recommendation.max_append_size)
                )),
                None => warnings.push(format!(
                    "ferry does not advertise the limit: set --max-append-size {} so that clients know it",
                    flag_size(recommendation.max_append_size)
                )),
                Some(_) => {}
            }
        }
        match buffering.as_ref().map(|b| b.verdict) {
            Some(Buffering::Buffered) => warnings.push(
                "a proxy buffers request bodies: ferry sees nothing until the client has sent the whole chunk, so \
                 an interrupted request saves nothing and large bodies wait in the proxy's temp files"
                    .into(),
            ),
            Some(Buffering::Unclear) => warnings.push(
                "bodies reach ferry neither clearly as sent nor all at once: some proxy may buffer part of them".into(),
            ),
            _ => {}
        }
        for extension in ["creation", "creation-with-upload", "termination", "checksum"] {
            if !tus.extensions.iter().any(|e| e == extension) {
                warnings.push(format!("the server does not offer the tus extension {extension}"));
            }
        }
        warnings.extend(ietf_warnings(&ietf));

        Ok(Report {
            url: self.endpoint.clone(),
            ok: probe.available,
            advice: advice(tus.max_size),
            tus,
            ietf,
            latency_ms,
            probe,
            limit,
            buffering,
            throughput,
            recommendation,
            warnings,
            requests: self.requests.load(std::sync::atomic::Ordering::Relaxed),
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// OPTIONS: is this a tus server, and what does it offer.
    async fn options(&self) -> anyhow::Result<TusInfo> {
        let response = self
            .request(reqwest::Method::OPTIONS, &self.endpoint)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.endpoint))?;
        let status = response.status();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let Some(version) = header("tus-version") else {
            anyhow::bail!(
                "{} is not a tus server: OPTIONS answered {status} without Tus-Version{}",
                self.endpoint,
                header("server").map(|s| format!(" (server: {s})")).unwrap_or_default()
            );
        };
        anyhow::ensure!(status.is_success(), "{}: OPTIONS answered {status}", self.endpoint);
        anyhow::ensure!(
            version.split(',').any(|v| v.trim() == "1.0.0"),
            "{} speaks tus {version}, not 1.0.0",
            self.endpoint
        );
        let list = |value: Option<String>| -> Vec<String> {
            value
                .map(|v| v.split(',').map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect())
                .unwrap_or_default()
        };
        let max_append_size = header("upload-limit").as_deref().and_then(crate::cli::upload::policy::max_append_size);
        Ok(TusInfo {
            version,
            extensions: list(header("tus-extension")),
            max_size: header("tus-max-size").and_then(|v| v.parse().ok()),
            max_append_size,
            checksum_algorithms: list(header("tus-checksum-algorithm")),
        })
    }

    /// The IETF draft: OPTIONS with the interop version, then, when the draft is offered, a test
    /// upload through the proxies, deleted again.
    async fn ietf(&self) -> IetfInfo {
        let mut info =
            IetfInfo { interop_version: INTEROP_VERSION, offered: false, upload_limit: None, creation: None };
        let options = Ietf.speak(self.plain_request(reqwest::Method::OPTIONS, &self.endpoint));
        if let Ok(response) = options.timeout(Duration::from_secs(30)).send().await {
            info.upload_limit =
                response.headers().get("upload-limit").and_then(|v| v.to_str().ok()).map(str::to_string);
        }
        info.offered = info.upload_limit.as_deref().and_then(UploadLimit::parse).is_some();
        if info.offered {
            info.creation = Some(self.ietf_creation().await);
        }
        info
    }

    /// `POST` with `Upload-Complete: ?0` and no content: the smallest upload there is. Over
    /// plain http it is sent on a socket of its own, where the interim responses can be seen.
    async fn ietf_creation(&self) -> IetfCreation {
        let mut creation = IetfCreation::default();
        let plain = url::Url::parse(&self.endpoint).is_ok_and(|u| u.scheme() == "http");
        let answer = if plain { self.raw_creation().await } else { self.client_creation().await };
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                creation.problem = Some(format!("{e:#}"));
                return creation;
            }
        };
        let last = &answer.last;
        creation.status = Some(last.status);
        creation.location = last.header("location");
        creation.upload_complete = last.header("upload-complete");
        if let Some(interim) = &answer.interim {
            let announced = interim.iter().find(|head| head.status == 104);
            creation.interim_104 = Some(announced.is_some());
            creation.interim_location = announced.and_then(|head| head.header("location"));
        }
        if !(200..300).contains(&last.status) {
            let said = crate::cli::upload::retry::message_in(&answer.body, last.is_problem());
            creation.problem = Some(match (last.status, said) {
                (401, _) if self.token.is_none() => "it needs an upload token: pass --token or set FERRY_TOKEN".into(),
                (_, Some(said)) => said,
                (_, None) => "no reason given".into(),
            });
            return creation;
        }
        let Some(location) = creation.location.clone() else { return creation };
        let url = match url::Url::parse(&self.endpoint).and_then(|base| base.join(&location)) {
            Ok(url) => url,
            Err(e) => {
                creation.problem = Some(format!("the Location '{location}' is not a URL: {e}"));
                return creation;
            }
        };
        let delete = Ietf.terminate(self.plain_request(reqwest::Method::DELETE, url.as_str()));
        match delete.timeout(Duration::from_secs(30)).send().await {
            Ok(response) if response.status() == reqwest::StatusCode::NO_CONTENT => creation.deleted = true,
            Ok(response) => creation.problem = Some(format!("DELETE answered {}", response.status())),
            Err(e) => creation.problem = Some(format!("DELETE failed: {e}")),
        }
        creation
    }

    /// The test creation written by hand on a connection of its own, reading every response head
    /// up to the final one (HTTP clients hand over only the final one).
    async fn raw_creation(&self) -> anyhow::Result<RawAnswer> {
        let url = url::Url::parse(&self.endpoint)?;
        let host = match url.host() {
            Some(url::Host::Ipv6(address)) => address.to_string(),
            Some(host) => host.to_string(),
            None => anyhow::bail!("{} has no host", self.endpoint),
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let authority = &url[url::Position::BeforeHost..url::Position::AfterPort];
        let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
        let mut head = format!(
            "POST {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ferry-doctor/{}\r\n\
             {INTEROP_HEADER}: {INTEROP_VERSION}\r\nUpload-Complete: ?0\r\nContent-Length: 0\r\nConnection: close\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(token) = &self.token {
            anyhow::ensure!(token.bytes().all(|b| b.is_ascii_graphic()), "the token is not a valid header value");
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let exchange = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .with_context(|| format!("cannot reach {}", self.endpoint))?;
            stream.write_all(head.as_bytes()).await?;
            let mut buffer = Vec::new();
            let mut interim = Vec::new();
            let mut piece = vec![0u8; 16 * KIB as usize];
            loop {
                match next_head(&buffer) {
                    Some(Ok((head, used))) => {
                        buffer.drain(..used);
                        if (100..200).contains(&head.status) {
                            interim.push(head);
                            continue;
                        }
                        // The body says why a refusal was made; the connection closes after it.
                        let wanted = head.header("content-length").and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
                        let wanted = wanted.min(64 * KIB as usize);
                        while buffer.len() < wanted {
                            let read = stream.read(&mut piece).await?;
                            if read == 0 {
                                break;
                            }
                            buffer.extend_from_slice(&piece[..read]);
                        }
                        let body = String::from_utf8_lossy(&buffer).into_owned();
                        return Ok(RawAnswer { interim: Some(interim), last: head, body });
                    }
                    Some(Err(e)) => return Err(e),
                    None => {
                        let read = stream.read(&mut piece).await?;
                        anyhow::ensure!(read > 0, "the connection closed before the answer was complete");
                        buffer.extend_from_slice(&piece[..read]);
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 30 s"))?
    }

    /// The test creation through the HTTP client (https), which hides interim responses.
    async fn client_creation(&self) -> anyhow::Result<RawAnswer> {
        let request = Ietf
            .speak(self.plain_request(reqwest::Method::POST, &self.endpoint))
            .header("upload-complete", "?0")
            .header(reqwest::header::CONTENT_LENGTH, 0);
        let response = request
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.endpoint))?;
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str().to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect();
        let last = ResponseHead { status: response.status().as_u16(), headers };
        Ok(RawAnswer { interim: None, last, body: response.text().await.unwrap_or_default() })
    }

    /// The median round trip of a few OPTIONS requests.
    async fn latency(&self) -> anyhow::Result<f64> {
        let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
        for _ in 0..LATENCY_SAMPLES {
            let started = Instant::now();
            let response = self
                .request(reqwest::Method::OPTIONS, &self.endpoint)
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .with_context(|| format!("cannot reach {}", self.endpoint))?;
            let _ = response.bytes().await;
            samples.push(started.elapsed().as_secs_f64() * 1e3);
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[samples.len() / 2])
    }

    /// Sends `body` (of `size` bytes, announced in Content-Length) to the probe.
    async fn send_probe(&self, size: u64, body: reqwest::Body) -> Outcome {
        let sent = self
            .request(reqwest::Method::POST, &self.probe_url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .timeout(Duration::from_secs(600))
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                return Outcome::Refused { by: format!("connection broke: {e}"), by_ferry: false };
            }
        };
        let status = response.status().as_u16();
        let marker = response.headers().get(PROBE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let server = response.headers().get("server").and_then(|v| v.to_str().ok()).map(str::to_string);
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::cli::upload::policy::retry_after(v, std::time::SystemTime::now()));
        let text = response.text().await.unwrap_or_default();
        match (status, marker.as_deref()) {
            (200, Some(_)) => match serde_json::from_str::<ProbeAnswer>(&text) {
                Ok(answer) => Outcome::Passed(answer),
                Err(e) => Outcome::Unusable(format!("the probe answered something unexpected: {e}")),
            },
            (413, Some(_)) => Outcome::Refused { by: "ferry's probe limit".into(), by_ferry: true },
            (429, _) => Outcome::Wait(retry_after.unwrap_or(Duration::from_secs(1)).max(Duration::from_secs(1))),
            (401, _) => Outcome::Unusable(if self.token.is_some() {
                "the probe refused the upload token (401)".into()
            } else {
                "the probe needs an upload token: pass --token or set FERRY_TOKEN".into()
            }),
            (404 | 405, None) => Outcome::Unusable(format!(
                "{} answered {status}: this ferry has no probe endpoint (older than `ferry doctor`, or started \
                 with --no-probe), or the proxies do not route it",
                self.probe_url
            )),
            (_, _) => {
                let who = match (&marker, &server) {
                    (Some(_), _) => "ferry".to_string(),
                    (None, Some(server)) => format!("a proxy ({server})"),
                    (None, None) if text.contains("nginx") => "a proxy (nginx)".into(),
                    (None, None) => "a proxy".into(),
                };
                let by = format!("{status} from {who}");
                if status == 408 || (500..600).contains(&status) {
                    Outcome::Transient(by)
                } else {
                    Outcome::Refused { by, by_ferry: false }
                }
            }
        }
    }

    /// A probe of `size` bytes sent as fast as possible, waiting out ferry's rate limits.
    async fn probe(&self, size: u64) -> Outcome {
        self.probe_with(size, || filler_body(size)).await
    }

    /// A probe with a body from `body` (made again for each attempt), waiting out ferry's rate
    /// limits for up to [`MAX_RETRY_WAIT`] in all; never answers [`Outcome::Wait`].
    async fn probe_with(&self, size: u64, mut body: impl FnMut() -> reqwest::Body) -> Outcome {
        let mut waited = Duration::ZERO;
        let mut transient = 0;
        loop {
            match self.send_probe(size, body()).await {
                Outcome::Transient(_) if transient < TRANSIENT_RETRIES => {
                    transient += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                // Failing again and again at this size: count it as refused.
                Outcome::Transient(by) => return Outcome::Refused { by, by_ferry: false },
                Outcome::Wait(wait) if waited + wait <= MAX_RETRY_WAIT => {
                    tokio::time::sleep(wait).await;
                    waited += wait;
                }
                Outcome::Wait(wait) => {
                    return Outcome::Unusable(format!(
                        "ferry's probe is busy or its byte budget is spent (retry in {} s)",
                        wait.as_secs()
                    ));
                }
                outcome => return outcome,
            }
        }
    }

    /// The largest body that passes: the smallest probe first (is the probe there at all?), then
    /// the probe's maximum, then bisection between the two.
    async fn find_limit(&self) -> (ProbeStatus, Option<LimitFinding>) {
        let mut status = ProbeStatus { url: self.probe_url.clone(), available: false, problem: None, max_size: None };
        let mut requests = 1;
        let max_size = match self.probe(SMALLEST_PROBE).await {
            Outcome::Passed(answer) => answer.max_size,
            Outcome::Refused { by, .. } => {
                status.problem = Some(format!("even a {} body is refused: {by}", human_size(SMALLEST_PROBE)));
                return (status, None);
            }
            Outcome::Unusable(problem) => {
                status.problem = Some(problem);
                return (status, None);
            }
            Outcome::Wait(_) | Outcome::Transient(_) => {
                unreachable!("probe() waits out 429s and retries or settles transient failures")
            }
        };
        status.available = true;
        status.max_size = Some(max_size);
        let mut search = LimitSearch::new(SMALLEST_PROBE, max_size + 1);
        let mut refused_by = None;
        let mut next = Some(max_size);
        while let Some(size) = next {
            requests += 1;
            match self.probe(size).await {
                Outcome::Passed(answer) => {
                    if answer.received != size {
                        status.problem = Some(format!(
                            "{size} bytes were sent, {} reached ferry: a proxy alters bodies",
                            answer.received
                        ));
                    }
                    search.record(size, true);
                }
                Outcome::Refused { by, by_ferry, .. } => {
                    if by_ferry {
                        // Only past ferry's own maximum, which the search never exceeds.
                        status.problem = Some(format!("ferry refused {size} bytes with its own limit"));
                    }
                    refused_by = Some(by);
                    search.record(size, false);
                }
                Outcome::Unusable(problem) => {
                    status.problem = Some(problem);
                    break;
                }
                Outcome::Wait(_) | Outcome::Transient(_) => {
                    unreachable!("probe() waits out 429s and retries or settles transient failures")
                }
            }
            next = search.next_size();
        }
        let found = search.refused <= max_size;
        let finding = LimitFinding {
            found,
            largest_passing: search.passing,
            smallest_refused: found.then_some(search.refused),
            refused_by: if found { refused_by } else { None },
            requests,
        };
        (status, Some(finding))
    }

    /// Sends a body slowly, in pieces, and compares how long the client took with how long ferry
    /// took to read it.
    async fn buffering(&self, largest_passing: u64) -> anyhow::Result<Option<BufferingFinding>> {
        let size = PACED_SIZE.min(largest_passing * 9 / 10).max(u64::from(PACED_PIECES));
        let times = Arc::new(Mutex::new((None, None)));
        let outcome = self
            .probe_with(size, || {
                *times.lock().unwrap_or_else(|e| e.into_inner()) = (None, None);
                paced_body(size, times.clone())
            })
            .await;
        let (first, last) = *times.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Outcome::Passed(answer) => {
                let (Some(first), Some(last)) = (first, last) else {
                    anyhow::bail!("the body was not sent");
                };
                let client_send: Duration = last - first;
                let span_ms = (answer.read_ms - answer.first_byte_ms.unwrap_or(answer.read_ms)).max(0.0);
                let verdict = buffering_verdict(client_send, Duration::from_secs_f64(span_ms / 1e3));
                Ok(Some(BufferingFinding {
                    verdict,
                    bytes: answer.received,
                    client_send_ms: client_send.as_secs_f64() * 1e3,
                    server_read_span_ms: span_ms,
                    server_first_byte_ms: answer.first_byte_ms,
                    server_read_ms: answer.read_ms,
                }))
            }
            Outcome::Refused { by, .. } => anyhow::bail!("a paced body of {size} bytes was refused: {by}"),
            Outcome::Unusable(problem) => anyhow::bail!(problem),
            Outcome::Wait(_) | Outcome::Transient(_) => {
                unreachable!("probe_with() waits and settles transient failures")
            }
        }
    }

    /// Bytes per second over a few probe requests of `size` bytes.
    async fn throughput(&self, size: u64) -> anyhow::Result<Option<Throughput>> {
        let mut elapsed = Duration::ZERO;
        for _ in 0..THROUGHPUT_SAMPLES {
            let started = Instant::now();
            match self.probe(size).await {
                Outcome::Passed(_) => elapsed += started.elapsed(),
                Outcome::Refused { by, .. } => anyhow::bail!("{size} bytes were refused: {by}"),
                Outcome::Unusable(problem) => anyhow::bail!(problem),
                Outcome::Wait(_) | Outcome::Transient(_) => {
                    unreachable!("probe() waits out 429s and retries or settles transient failures")
                }
            }
        }
        let bytes = (size * u64::from(THROUGHPUT_SAMPLES)) as f64;
        Ok(Some(Throughput {
            bytes_per_second: bytes / elapsed.as_secs_f64().max(1e-6),
            request_size: size,
            requests: THROUGHPUT_SAMPLES,
        }))
    }
}

/// One response head: the status and the header fields (names in lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResponseHead {
    status: u16,
    headers: Vec<(String, String)>,
}

impl ResponseHead {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }

    fn is_problem(&self) -> bool {
        self.header("content-type")
            .is_some_and(|t| t.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/problem+json"))
    }
}

/// An exchange: the interim heads when they could be seen, the final head and its body.
struct RawAnswer {
    interim: Option<Vec<ResponseHead>>,
    last: ResponseHead,
    body: String,
}

/// The first response head in `buffer` and the bytes it takes; None while it is incomplete.
fn next_head(buffer: &[u8]) -> Option<anyhow::Result<(ResponseHead, usize)>> {
    let end = buffer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let parse = || {
        let text = std::str::from_utf8(&buffer[..end - 4]).context("a response head that is not text")?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("not an HTTP/1.x status line: {status_line:?}"))?;
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        Ok((ResponseHead { status, headers }, end))
    };
    Some(parse())
}

/// `size` filler bytes as a stream of shared 64 KiB pieces (nothing of the size is allocated).
fn filler_body(size: u64) -> reqwest::Body {
    let piece = Bytes::from(vec![b'f'; (64 * KIB) as usize]);
    let pieces = stream::unfold(0u64, move |sent| {
        let piece = piece.clone();
        async move {
            if sent >= size {
                return None;
            }
            let len = (size - sent).min(piece.len() as u64);
            Some((Ok::<_, std::io::Error>(piece.slice(..len as usize)), sent + len))
        }
    });
    reqwest::Body::wrap_stream(pieces)
}

/// `size` bytes in [`PACED_PIECES`] pieces spread over [`PACED_DURATION`]; records when the first
/// and the last piece went out.
fn paced_body(size: u64, times: Arc<Mutex<(Option<Instant>, Option<Instant>)>>) -> reqwest::Body {
    let pieces = u64::from(PACED_PIECES);
    let piece_size = size / pieces;
    let pause = PACED_DURATION / (PACED_PIECES - 1);
    let body = stream::unfold(0u64, move |index| {
        let times = times.clone();
        async move {
            if index >= pieces {
                return None;
            }
            if index > 0 {
                tokio::time::sleep(pause).await;
            }
            let len = if index + 1 == pieces { size - piece_size * (pieces - 1) } else { piece_size };
            {
                let mut times = times.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                times.0.get_or_insert(now);
                times.1 = Some(now);
            }
            Some((Ok::<_, std::io::Error>(Bytes::from(vec![b'p'; len as usize])), index + 1))
        }
    });
    reqwest::Body::wrap_stream(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search against a path that passes bodies up to `limit`.
    fn search(limit: u64, max: u64) -> (LimitSearch, u32) {
        let mut search = LimitSearch::new(SMALLEST_PROBE, max + 1);
        let mut steps = 0;
        let mut next = Some(max);
        while let Some(size) = next {
            steps += 1;
            search.record(size, size <= limit);
            next = search.next_size();
        }
        (search, steps)
    }

    #[test]
    fn the_search_pins_the_limit_within_one_percent() {
        let max = 64 * MIB;
        for limit in [KIB + 1, 10 * KIB, 1000 * KIB, MIB, MIB + 1, 8 * MIB - 3, 50 * MIB, max - 1] {
            let (found, steps) = search(limit, max);
            assert!(found.passing <= limit && found.refused > limit, "{limit}: {found:?}");
            assert!(found.refused as f64 <= found.passing as f64 * 1.01 || found.refused == found.passing + 1);
            assert!(steps <= 14, "{limit} took {steps} probes");
        }
        let (nothing, steps) = search(u64::MAX, max);
        assert_eq!((nothing.passing, nothing.refused, steps), (max, max + 1, 1), "one probe when all pass");
    }

    #[test]
    fn buffering_is_told_by_how_the_body_arrived() {
        let two = Duration::from_secs(2);
        assert_eq!(buffering_verdict(two, Duration::from_millis(1900)), Buffering::Streaming);
        assert_eq!(buffering_verdict(two, Duration::from_millis(3)), Buffering::Buffered);
        assert_eq!(buffering_verdict(two, Duration::from_millis(700)), Buffering::Unclear);
        assert_eq!(buffering_verdict(Duration::from_millis(100), Duration::ZERO), Buffering::Unclear);
    }

    #[test]
    fn chunks_stay_below_the_limit_with_a_margin() {
        assert_eq!(chunk_below(MIB), 960 * KIB);
        assert_eq!(chunk_below(1_040_000), 960 * KIB);
        assert_eq!(chunk_below(100 * KIB), 95 * KIB);
        assert!(chunk_below(3) >= 1);
        assert_eq!(chunk_for_throughput(0.1e6), MIB);
        assert_eq!(chunk_for_throughput(1e6), 4 * MIB);
        assert_eq!(chunk_for_throughput(12e6), 32 * MIB);
        assert_eq!(chunk_for_throughput(1e9), 64 * MIB);
    }

    #[test]
    fn the_recommendation_respects_the_limit_and_the_speed() {
        let limit = LimitFinding {
            found: true,
            largest_passing: MIB,
            smallest_refused: Some(MIB + 10_000),
            refused_by: None,
            requests: 12,
        };
        let fast = recommend(Some(&limit), Some(1e9));
        assert_eq!((fast.chunk_size, fast.max_append_size), (960 * KIB, 960 * KIB));
        assert!(fast.why.contains("below the largest body"), "{}", fast.why);
        let open = LimitFinding { found: false, largest_passing: 64 * MIB, smallest_refused: None, ..limit };
        assert_eq!(recommend(Some(&open), Some(2e6)).chunk_size, 8 * MIB);
        assert_eq!(recommend(None, None).chunk_size, MIB);
    }

    #[test]
    fn the_advice_lets_whole_files_through_and_says_why() {
        let advice = advice(Some(100 << 30));
        let nginx: Vec<String> = advice.nginx.iter().map(|s| format!("{} {};", s.name, s.value)).collect();
        assert_eq!(
            nginx,
            [
                "client_max_body_size 100g;",
                "proxy_request_buffering off;",
                "proxy_http_version 1.1;",
                "proxy_read_timeout 300s;",
                "proxy_send_timeout 300s;"
            ]
        );
        assert!(advice.nginx.iter().chain(&advice.ingress_nginx).chain(&advice.gunicorn).all(|s| s.why.len() > 40));
        assert_eq!(advice.ingress_nginx[0].name, "nginx.ingress.kubernetes.io/proxy-body-size");
        assert_eq!(advice.ingress_nginx[0].value, "100g");
        assert_eq!(super::advice(None).nginx[0].value, "0");
        assert_eq!(nginx_size(256 * MIB + 1), "257m");

        let text = render_snippets(&advice, "/files/");
        assert!(text.contains("location /files/ {\n"), "{text}");
        assert!(text.contains("    proxy_request_buffering off;\n"), "{text}");
        assert!(text.contains("    nginx.ingress.kubernetes.io/proxy-request-buffering: \"off\"\n"), "{text}");
        assert!(text.contains("\ntimeout = 120\n"), "{text}");
        // Every setting has its reason on the line above it.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let setting = line.trim_start();
            if setting.starts_with("proxy_") || setting.starts_with("client_") || setting.starts_with("nginx.ingress") {
                assert!(lines[i - 1].trim_start().starts_with("# "), "no reason above {setting}");
            }
        }
    }

    #[test]
    fn response_heads_are_read_one_by_one() {
        let exchange = b"HTTP/1.1 104 Upload Resumption Supported\r\nupload-draft-interop-version: 9\r\n\
            Location: http://a/files/1\r\n\r\nHTTP/1.1 201 Created\r\nlocation: http://a/files/1\r\n\
            Upload-Complete: ?0\r\n\r\n";
        let (interim, used) = next_head(exchange).unwrap().unwrap();
        assert_eq!(interim.status, 104);
        assert_eq!(interim.header("location").as_deref(), Some("http://a/files/1"), "names in lower case");
        let (last, _) = next_head(&exchange[used..]).unwrap().unwrap();
        assert_eq!((last.status, last.header("upload-complete").as_deref()), (201, Some("?0")));
        assert!(next_head(b"HTTP/1.1 201 Created\r\nlocation: x\r\n").is_none(), "not complete yet");
        assert!(next_head(b"SSH-2.0-OpenSSH\r\n\r\n").unwrap().is_err());
    }

    #[test]
    fn the_ietf_findings_read_well_and_warn_of_a_lost_104() {
        let mut ietf = IetfInfo {
            interop_version: 9,
            offered: true,
            upload_limit: Some("max-size=1000, max-age=60".into()),
            creation: Some(IetfCreation {
                status: Some(201),
                location: Some("http://a/files/1".into()),
                upload_complete: Some("?0".into()),
                interim_104: Some(true),
                interim_location: Some("http://a/files/1".into()),
                deleted: true,
                problem: None,
            }),
        };
        assert_eq!(
            ietf_lines(&ietf),
            [
                "interop 9; Upload-Limit max-size=1000, max-age=60",
                "test upload: 201, Location, Upload-Complete: ?0, 104 passed, deleted"
            ]
        );
        assert!(ietf_warnings(&ietf).is_empty());

        let creation = ietf.creation.as_mut().unwrap();
        creation.interim_104 = Some(false);
        creation.interim_location = None;
        assert!(ietf_lines(&ietf)[1].contains("104 not passed by the proxies"));
        let warnings = ietf_warnings(&ietf);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("104 not passed by the proxies"));

        // Over https the 104 cannot be seen: said, without a warning.
        ietf.creation.as_mut().unwrap().interim_104 = None;
        assert!(ietf_lines(&ietf)[1].contains("104 not checked (https)"));
        assert!(ietf_warnings(&ietf).is_empty());

        let creation = ietf.creation.as_mut().unwrap();
        creation.interim_104 = Some(true);
        creation.interim_location = Some("http://elsewhere/files/1".into());
        creation.deleted = false;
        creation.upload_complete = None;
        let warnings = ietf_warnings(&ietf);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("differs from the final answer's")));
        assert!(warnings.iter().any(|w| w.contains("could not be deleted")));
        assert!(warnings.iter().any(|w| w.contains("not Upload-Complete: ?0")));

        ietf.creation =
            Some(IetfCreation { status: Some(502), problem: Some("bad gateway".into()), ..Default::default() });
        assert_eq!(ietf_lines(&ietf)[1], "test upload: 502, bad gateway");
        assert!(ietf_warnings(&ietf)[0].ends_with("through the proxies failed with 502: bad gateway"));

        let not_offered = IetfInfo { interop_version: 9, offered: false, upload_limit: None, creation: None };
        assert!(ietf_lines(&not_offered)[0].starts_with("not offered"));
        assert!(ietf_warnings(&not_offered).is_empty());
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(MIB), "1 MiB");
        assert_eq!(human_size(1_040_000), "1015.62 KiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(flag_size(960 * KIB), "960KiB");
        assert_eq!(flag_size(8 * MIB), "8MiB");
        assert_eq!(flag_size(1_000_001), "1000001");
    }
}
