use clap::Parser;
use ferry::config::{Cli, Command, EventStateArg, EventsCommand};
use ferry::repo::EventState;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(async_workers()).enable_all().build()?;
    runtime.block_on(run())
}

/// Threads of the async runtime: one per core but one (at least one), unless
/// `FERRY_WORKER_THREADS` says otherwise. The async side only moves bytes between sockets and
/// queues; hashing and writing run on threads of their own (one of each per upload receiving),
/// and a core left to them keeps the runtime from fighting its own stages for it (on two cores,
/// 0.6 s less CPU per GiB with 1 MiB chunks, measured with `FERRY_BENCH_TARGET`).
fn async_workers() -> usize {
    std::env::var("FERRY_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1)))
        .max(1)
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Migrate(args)) => {
            ferry::server::open_database(&args).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Some(Command::Serve(args)) => serve(*args).await,
        Some(Command::Events { command }) => events(command).await,
        Some(Command::Upload(args)) => std::process::exit(ferry::cli::upload::run(*args).await),
        Some(Command::Doctor(args)) => ferry::cli::doctor::run(args).await,
        None => serve(cli.serve).await,
    }
}

/// Frames of request bodies (up to a few hundred KiB each) are allocated by the thread that reads
/// the connection and freed by the threads that hash and write them. glibc's defaults would map
/// many of them fresh from the kernel and give them back soon after, so that every byte received
/// also paid for a page fault and zeroing (a third of the CPU an upload cost, in a profile). Keep
/// such buffers in the heap and freed memory there for reuse instead; the memory budget bounds
/// what the appends hold.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (it takes the allocator's own locks).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

async fn serve(args: ferry::config::ServeArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    ferry::launch(args, listener, shutdown_signal()).await
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes sends before stopping a pod).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn events(command: EventsCommand) -> anyhow::Result<()> {
    match command {
        EventsCommand::List { database, state, limit } => {
            let repo = ferry::server::open_database(&database).await?;
            let state = state.map(|s| match s {
                EventStateArg::Pending => EventState::Pending,
                EventStateArg::Delivered => EventState::Delivered,
                EventStateArg::Dead => EventState::Dead,
            });
            println!("{:<36} {:<18} {:<32} {:<9} {:>8}  last error", "id", "type", "upload", "state", "attempts");
            for event in repo.list_events(state, limit).await? {
                let state = match event.state() {
                    EventState::Pending => "pending",
                    EventState::Delivered => "delivered",
                    EventState::Dead => "dead",
                };
                println!(
                    "{:<36} {:<18} {:<32} {:<9} {:>8}  {}",
                    event.id,
                    event.event_type,
                    event.upload_id,
                    state,
                    event.attempts,
                    event.last_error.unwrap_or_default()
                );
            }
            Ok(())
        }
        EventsCommand::Retry { database, id, dead } => {
            let repo = ferry::server::open_database(&database).await?;
            let target = if dead { None } else { id.as_deref() };
            let count = repo.retry_events(target, ferry::uploads::now_ms()).await?;
            println!("{count} event(s) due for delivery again");
            if count == 0 && target.is_some() {
                anyhow::bail!("no undelivered event with that id");
            }
            Ok(())
        }
    }
}
