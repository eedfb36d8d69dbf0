//! Progress on stderr: a bar per file (bytes, percentage, rate, time left) when stderr is a
//! terminal, a plain line per file every few seconds when it is not (logs, CI), nothing with
//! `--quiet`. Notes (resuming, retrying, adapting the chunk size) go the same way; errors are
//! always shown.

use std::{
    io::IsTerminal,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::policy::{human_bytes, human_duration};

/// How often plain progress lines are written.
const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Inner>,
}

enum Mode {
    Bars(MultiProgress),
    Plain,
    Quiet,
}

struct Inner {
    mode: Mode,
    files: Mutex<Vec<Arc<FileProgress>>>,
}

/// One file's progress, shared by the upload loop and the display.
pub struct FileProgress {
    name: String,
    total: u64,
    position: AtomicU64,
    /// Where this run started and when, for the rate of plain lines.
    started: Mutex<(Instant, u64)>,
    done: AtomicBool,
    bar: Option<ProgressBar>,
}

impl Reporter {
    pub fn new(quiet: bool) -> Self {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)))
        } else {
            Mode::Plain
        };
        let reporter = Self { inner: Arc::new(Inner { mode, files: Mutex::new(Vec::new()) }) };
        if matches!(reporter.inner.mode, Mode::Plain) {
            let weak = Arc::downgrade(&reporter.inner);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(PLAIN_INTERVAL);
                ticks.tick().await;
                loop {
                    ticks.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    let files: Vec<_> = inner.files.lock().expect("progress lock").clone();
                    for file in files.iter().filter(|f| !f.done.load(Ordering::Relaxed)) {
                        eprintln!("{}", file.plain_line());
                    }
                }
            });
        }
        reporter
    }

    /// Starts showing a file of `total` bytes.
    pub fn file(&self, name: &str, total: u64) -> Arc<FileProgress> {
        let bar = match &self.inner.mode {
            Mode::Bars(multi) => {
                let style = ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {percent:>3}% \
                     {binary_bytes_per_sec} {eta} left {msg}",
                )
                .expect("a valid progress template")
                .progress_chars("=> ");
                let bar = multi.add(ProgressBar::new(total).with_style(style).with_prefix(name.to_string()));
                Some(bar)
            }
            _ => None,
        };
        let file = Arc::new(FileProgress {
            name: name.to_string(),
            total,
            position: AtomicU64::new(0),
            started: Mutex::new((Instant::now(), 0)),
            done: AtomicBool::new(false),
            bar,
        });
        self.inner.files.lock().expect("progress lock").push(file.clone());
        file
    }

    /// A note about one file (not shown with `--quiet`).
    pub fn note(&self, name: &str, message: &str) {
        let line = format!("{name}: {message}");
        match &self.inner.mode {
            Mode::Bars(multi) => {
                let _ = multi.println(line);
            }
            Mode::Plain => eprintln!("{line}"),
            Mode::Quiet => {}
        }
    }

    /// An error: always shown.
    pub fn error(&self, line: &str) {
        match &self.inner.mode {
            Mode::Bars(multi) => multi.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }

    /// Removes every bar from the screen (before the closing messages).
    pub fn clear(&self) {
        if let Mode::Bars(multi) = &self.inner.mode {
            let _ = multi.clear();
        }
    }
}

impl FileProgress {
    /// The upload now stands at `offset` (as the server says): the starting point of the rate.
    pub fn restart_at(&self, offset: u64) {
        self.position.store(offset, Ordering::Relaxed);
        *self.started.lock().expect("progress lock") = (Instant::now(), offset);
        if let Some(bar) = &self.bar {
            bar.set_position(offset);
            bar.reset_eta();
        }
    }

    /// `bytes` more went out.
    pub fn advance(&self, bytes: u64) {
        self.position.fetch_add(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    /// The server holds `offset` bytes (after a failed chunk, what was sent but not kept is
    /// taken back).
    pub fn set(&self, offset: u64) {
        self.position.store(offset, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_position(offset);
        }
    }

    pub fn finish(&self, message: &str) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.finish_with_message(message.to_string());
        }
    }

    pub fn abandon(&self, message: &str) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.abandon_with_message(message.to_string());
        }
    }

    fn plain_line(&self) -> String {
        let position = self.position.load(Ordering::Relaxed).min(self.total);
        let (since, from) = *self.started.lock().expect("progress lock");
        let elapsed = since.elapsed().as_secs_f64().max(0.001);
        let rate = position.saturating_sub(from) as f64 / elapsed;
        let percent = if self.total == 0 { 100.0 } else { position as f64 * 100.0 / self.total as f64 };
        let left = if rate >= 1.0 {
            human_duration(Duration::from_secs_f64((self.total - position) as f64 / rate))
        } else {
            "?".into()
        };
        format!(
            "{}: {} of {} ({percent:.0}%), {}/s, {left} left",
            self.name,
            human_bytes(position),
            human_bytes(self.total),
            human_bytes(rate as u64)
        )
    }
}
