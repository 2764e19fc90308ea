//! `tandem sync`: one pass (`--once`) or continuous (`--watch`) sync of a device store with a
//! relay, with a progress bar on a terminal and plain lines otherwise.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use tandem::client::{connect, sync_once, SyncConfig};
use tandem::{Direction, Event, Repo};

use super::store::open;
use super::{Cli, CmdResult, Failure, EXIT_USAGE};

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["once", "watch"])))]
pub struct SyncArgs {
    /// Relay URL: ws://host:port (the client adds /v1) or a full URL. Repeat or comma-separate
    /// for fallbacks.
    #[arg(long, env = "TANDEM_RELAY", value_delimiter = ',', required = true)]
    pub relay: Vec<String>,
    /// Access token (JWT).
    #[arg(long, env = "TANDEM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Push everything pending, pull everything new, then exit.
    #[arg(long)]
    pub once: bool,
    /// Keep syncing in the background until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Give up a --once pass after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

fn config(args: &SyncArgs) -> SyncConfig {
    let mut cfg = SyncConfig::new(&args.relay.join(","));
    if let Some(t) = &args.token {
        cfg = cfg.token(t);
    }
    cfg
}

/// Shows progress events: a bar on a terminal, a line per 10% otherwise.
fn progress_printer(repo: &Repo) -> tokio::task::JoinHandle<()> {
    let mut rx = repo.subscribe();
    let tty = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {pos}/{len} changes {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let mut last_decile = [u64::MAX; 2];
        loop {
            let e = match rx.recv().await {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            };
            let Event::Progress {
                direction,
                changes_done,
                changes_total,
                bytes_done,
                ..
            } = e
            else {
                continue;
            };
            let name = match direction {
                Direction::Download => "download",
                Direction::Upload => "upload",
            };
            match &bar {
                Some(b) => {
                    b.set_prefix(name);
                    b.set_length(changes_total);
                    b.set_position(changes_done);
                    b.set_message(format!("{:.1} MB", bytes_done as f64 / 1e6));
                }
                None => {
                    let decile = (changes_done * 10).checked_div(changes_total).unwrap_or(10);
                    let slot = &mut last_decile[direction as usize];
                    if *slot != decile {
                        *slot = decile;
                        eprintln!(
                            "{name}: {changes_done}/{changes_total} changes, {bytes_done} bytes"
                        );
                    }
                }
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    })
}

pub fn run(cli: &Cli, args: &SyncArgs) -> CmdResult {
    if args.relay.iter().all(|r| r.trim().is_empty()) {
        return Err(Failure::new(EXIT_USAGE, "give --relay ws://host:port"));
    }
    let repo = open(cli)?;
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| Failure::new(1, format!("starting the runtime: {e}")))?;
    rt.block_on(async move {
        let printer = progress_printer(&repo);
        let cfg = config(args);
        if args.once {
            let result = sync_once(&repo, cfg, Duration::from_secs(args.timeout)).await;
            printer.abort();
            let report = result.map_err(|e| Failure::new(e.exit_code(), e.to_string()))?;
            for issue in &report.issues {
                eprintln!(
                    "tandem: {}: {}",
                    issue.doc.map(|d| d.to_string()).unwrap_or_else(|| "relay".into()),
                    issue.message
                );
            }
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "relay": report.relay,
                        "docs_pushed": report.docs_pushed, "changes_pushed": report.changes_pushed, "bytes_pushed": report.bytes_pushed,
                        "docs_pulled": report.docs_pulled, "changes_pulled": report.changes_pulled, "bytes_pulled": report.bytes_pulled,
                        "issues": report.issues.len(),
                    }))
                    .unwrap_or_default()
                );
            } else {
                println!(
                    "pushed {} changes ({} documents), pulled {} changes ({} documents)",
                    report.changes_pushed, report.docs_pushed, report.changes_pulled, report.docs_pulled
                );
            }
            if !report.issues.is_empty() {
                return Err(Failure::new(1, format!("{} document(s) could not be synced", report.issues.len())));
            }
            return Ok(());
        }
        let handle = connect(&repo, cfg);
        let mut rx = repo.subscribe();
        eprintln!("syncing with {}; Ctrl-C to stop", args.relay.join(", "));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                e = rx.recv() => match e {
                    Ok(Event::Connection(state)) => eprintln!("{}", serde_json::to_string(&state).unwrap_or_default().trim_matches('"')),
                    Ok(Event::Changed { doc, origin: tandem::Origin::Remote, .. }) => println!("{doc} changed"),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                },
            }
        }
        handle.stop().await;
        printer.abort();
        Ok(())
    })
}
