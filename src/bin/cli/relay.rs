//! `tandem relay` and `tandem token`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use tandem::relay::auth::{mint, Secret};
use tandem::relay::{start, Auth, RelayConfig};

use super::{Cli, CmdResult, Failure, EXIT_USAGE};

#[derive(Args, Debug)]
pub struct RelayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// HS256 secret for verifying tokens (trailing whitespace is trimmed).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_no_auth")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Accept every connection without a token (local development only).
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Most simultaneous connections.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Largest frame either way, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_frame_bytes: u64,
    /// Most changes in one push.
    #[arg(long, default_value_t = 1000)]
    pub max_changes_per_push: u32,
    /// Largest single change, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_change_bytes: u64,
    /// Most documents one connection may subscribe to by id.
    #[arg(long, default_value_t = 10_000)]
    pub max_docs_per_connection: u32,
    /// Seconds a new connection has to send its hello.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Seconds of silence after which a connection is closed.
    #[arg(long, default_value_t = 90)]
    pub idle_timeout: u64,
    /// Compact a document's log after this many changes.
    #[arg(long, default_value_t = 10_000)]
    pub compact_after: u64,
    /// Presence updates one connection may send per second (the excess is dropped).
    #[arg(long, default_value_t = 20)]
    pub presence_per_sec: u32,
    /// Presence updates one connection may send at once before the rate applies.
    #[arg(long, default_value_t = 40)]
    pub presence_burst: u32,
    /// sled's page cache for the data folder, in MiB (pages as stored; resident memory is
    /// about twice that). Raise it when the documents in use at once outgrow it.
    #[arg(long, default_value_t = tandem::relay::log::DEFAULT_CACHE_BYTES >> 20)]
    pub cache_mb: u64,
    /// Give the relay a new identity before starting (after restoring an older backup):
    /// devices then re-push what the backup lacks instead of trusting cursors it never had.
    #[arg(long)]
    pub new_identity: bool,
    /// Keep the change log and feeds in this PostgreSQL database (e.g.
    /// postgres://tandem@db:5432/tandem) instead of the `--data` folder, so that several
    /// relay nodes can share them. See docs/scaling.md.
    #[arg(long, value_name = "URL", env = "TANDEM_RELAY_POSTGRES")]
    pub postgres: Option<String>,
    /// With --postgres: the Redis (redis://host:port) that carries live changes across nodes.
    /// Without it, nodes still converge, by polling the feeds.
    #[arg(
        long,
        value_name = "URL",
        requires = "postgres",
        env = "TANDEM_RELAY_REDIS"
    )]
    pub redis: Option<String>,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The relay's data folder (the relay must be stopped).
    #[arg(long, value_name = "DIR")]
    pub from_sled: PathBuf,
    /// The empty PostgreSQL database to move it into.
    #[arg(long, value_name = "URL")]
    pub postgres: String,
}

/// `tandem migrate-relay`: copy, then compare both sides; exit 1 unless they match.
pub fn migrate(cli: &Cli, args: &MigrateArgs) -> CmdResult {
    let from = tandem::relay::log::RelayLog::open(&args.from_sled)
        .map_err(|e| Failure::new(1, format!("{}: {e}", args.from_sled.display())))?;
    let mut to = tandem::relay::postgres::PgLog::connect(&args.postgres)
        .map_err(|e| Failure::new(1, format!("postgres: {e}")))?;
    let r = tandem::relay::migrate::sled_to_postgres(&from, &mut to)
        .map_err(|e| Failure::new(1, format!("migration: {e}")))?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({
                "documents": r.documents,
                "changes": r.changes,
                "feed_entries": r.feed_entries,
                "digest": r.digest,
                "verified": true,
            })
        );
    } else {
        println!(
            "migrated and verified {} documents, {} changes, {} feed entries (digest {})",
            r.documents, r.changes, r.feed_entries, r.digest
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The secret the relay verifies with.
    #[arg(long, value_name = "FILE")]
    pub jwt_secret_file: PathBuf,
    /// Who the token is for.
    #[arg(long)]
    pub sub: String,
    /// Namespace(s) the token grants (repeat or comma-separate).
    #[arg(long = "ns", value_delimiter = ',', required = true)]
    pub ns: Vec<String>,
    /// Grant write (and so read); otherwise read only.
    #[arg(long)]
    pub write: bool,
    /// Lifetime: 30s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
}

/// Parse `90`, `30s`, `15m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, Failure> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| {
        Failure::new(
            EXIT_USAGE,
            format!("'{s}' is not a duration (try 30s, 15m, 1h, 7d)"),
        )
    })?;
    let unit_secs: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(Failure::new(
                EXIT_USAGE,
                format!("'{s}': unknown unit '{unit}' (use s, m, h or d)"),
            ))
        }
    };
    let secs = n
        .checked_mul(unit_secs)
        .ok_or_else(|| Failure::new(EXIT_USAGE, format!("'{s}' is too long a duration")))?;
    Ok(Duration::from_secs(secs))
}

pub fn token(_cli: &Cli, args: &TokenArgs) -> CmdResult {
    let secret =
        Secret::from_file(&args.jwt_secret_file).map_err(|e| Failure::new(1, e.to_string()))?;
    let ttl = parse_duration(&args.ttl)?;
    let (read, write) = if args.write {
        (vec![], args.ns.clone())
    } else {
        (args.ns.clone(), vec![])
    };
    println!(
        "{}",
        mint(&secret, &args.sub, &read, &write, ttl, SystemTime::now())
    );
    Ok(())
}

pub fn run(cli: &Cli, args: &RelayArgs) -> CmdResult {
    // Before anything with an effect, reading the secret included: the relay may start again
    // from here.
    tandem::relay::memory::reexec_without_thread_caches();
    let auth = match (&args.jwt_secret_file, args.insecure_no_auth) {
        (Some(f), false) => Auth::Jwt(Arc::new(Secret::from_file(f).map_err(|e| Failure::new(1, e.to_string()))?)),
        (None, true) => Auth::InsecureNoAuth,
        _ => {
            return Err(Failure::new(
                EXIT_USAGE,
                "choose how clients authenticate: --jwt-secret-file FILE, or --insecure-no-auth for local development",
            ))
        }
    };
    let data = cli.data_dir("TANDEM_RELAY_DATA", "./tandem-relay");
    if args.new_identity && args.postgres.is_some() {
        let url = args.postgres.clone().unwrap_or_default();
        let mut log = tandem::relay::postgres::PgLog::connect(&url)
            .map_err(|e| Failure::new(1, format!("postgres: {e}")))?;
        let id = log
            .new_identity()
            .map_err(|e| Failure::new(1, e.to_string()))?;
        eprintln!("new relay identity {}", hex::encode(id));
    } else if args.new_identity {
        let mut log = tandem::relay::log::RelayLog::open(&data)
            .map_err(|e| Failure::new(1, format!("{}: {e}", data.display())))?;
        let id = log
            .new_identity()
            .map_err(|e| Failure::new(1, e.to_string()))?;
        eprintln!("new relay identity {}", hex::encode(id));
    }
    let on_sled = args.postgres.is_none().then(|| data.clone());
    let mut cfg = RelayConfig::new(args.listen, Some(data), auth);
    cfg.max_connections = args.max_connections;
    cfg.limits.max_frame_bytes = args.max_frame_bytes;
    cfg.limits.max_changes_per_push = args.max_changes_per_push;
    cfg.limits.max_change_bytes = args.max_change_bytes;
    cfg.limits.max_docs_per_connection = args.max_docs_per_connection;
    cfg.handshake_timeout = Duration::from_secs(args.handshake_timeout);
    cfg.idle_timeout = Duration::from_secs(args.idle_timeout);
    cfg.compact_after = args.compact_after;
    cfg.presence_per_sec = args.presence_per_sec;
    cfg.presence_burst = args.presence_burst;
    cfg.postgres = args.postgres.clone();
    cfg.redis = args.redis.clone();
    cfg.cache_bytes = args.cache_mb.saturating_mul(1 << 20).max(1 << 20);
    // A relay process hands back what a burst of work leaves free (docs/operations.md).
    cfg.trim_memory = true;
    tandem::relay::memory::tune_allocator();
    tandem::relay::memory::map_code_sparsely();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let served = rt.block_on(async move {
        let handle = start(cfg)
            .await
            .map_err(|e| Failure::new(1, format!("relay: {e}")))?;
        // Scripts and tests read the bound address (useful with port 0) from stdout.
        println!("listening on {}", handle.addr);
        shutdown_signal().await;
        tracing::info!("shutting down: finishing accepted work");
        handle.shutdown().await.context("relay shutdown")?;
        Ok(())
    });
    // Every task goes with the runtime, the storage with them: closed cleanly, the log empty.
    drop(rt);
    if let (Ok(()), Some(data)) = (&served, on_sled) {
        let t0 = std::time::Instant::now();
        match tandem::store::SledBackend::checkpoint_closed(&data) {
            Ok(()) => {
                tracing::info!(took = ?t0.elapsed(), "storage checkpointed for the next start")
            }
            Err(e) => {
                tracing::warn!(error = %e, "storage not checkpointed; the next start replays more")
            }
        }
    }
    served
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
