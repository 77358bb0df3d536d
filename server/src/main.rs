//! The `ballast` binary: the registry server and the offline admin tools.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use ballast_server::{cli, Config, Server};
use clap::{Parser, Subcommand};

/// Ballast: an OCI container registry with its own storage engine.
#[derive(Parser)]
#[command(name = "ballast", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the registry.
    Serve {
        /// Address to listen on (default 127.0.0.1:5000).
        #[arg(long)]
        listen: Option<String>,
        /// Data directory (default ./ballast-data, created if absent).
        #[arg(long)]
        data: Option<PathBuf>,
        /// TOML config file; environment variables BALLAST_<SETTING> override it, flags
        /// override both.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Verifies a data directory offline: every record checksum, every chunk against its
    /// BLAKE3 id, every blob against its digest, indexes against segments, the catalog.
    /// Exit status: 0 clean, 1 problems found, 2 could not run.
    Fsck {
        /// The data directory (the server must not be running on it).
        dir: PathBuf,
        /// Rebuild the indexes (derived data) from the segments first.
        #[arg(long)]
        repair: bool,
        /// Machine-readable output (with --config and a [bucket], the bucket's report follows
        /// as a second JSON document).
        #[arg(long)]
        json: bool,
        /// The server's config: with a [bucket] table, the bucket is checked too (every kept
        /// checkpoint's objects by length and SHA-256, and objects none names, which
        /// --repair deletes).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Collects garbage offline: drops blob links no manifest references (and, with
    /// --delete-untagged, manifests no tag reaches) once older than the grace period, then
    /// compacts segments that are mostly dead.
    Gc {
        /// The data directory (the server must not be running on it).
        dir: PathBuf,
        /// Report what would be freed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep links, manifests and segments younger than this many seconds.
        #[arg(long, default_value_t = 3600)]
        grace: u64,
        /// Also remove manifests that no tag, index or subject reaches.
        #[arg(long)]
        delete_untagged: bool,
        /// Compact a segment when at least this fraction of it is dead. Offline nothing
        /// competes for the disk, so the default takes back nearly every dead byte (the
        /// server's schedule uses `gc_min_dead_fraction`, 0.5 by default).
        #[arg(long, default_value_t = 0.01, value_parser = fraction)]
        min_dead_fraction: f64,
        /// Fold sealed segments smaller than this many MiB together when there are at least
        /// four (0: never; a registry that shipped to a bucket has one per checkpoint).
        #[arg(long, default_value_t = 0)]
        fold_below_mb: u64,
        /// Remove unfinished upload sessions started more than this many seconds ago (the
        /// server's `upload_max_age_secs` does the same while it runs).
        #[arg(long, default_value_t = ballast_server::config::UPLOAD_MAX_AGE_SECS_DEFAULT)]
        upload_max_age: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks the storage under a directory: engine ingest, reads, small commits, open,
    /// fsck and GC, each next to the hardware's own baseline measured in the same run.
    Bench {
        /// A directory on the storage to measure (a scratch subdirectory is made and removed).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Small sizes (64 MB instead of 1 GB): about a minute.
        #[arg(long)]
        quick: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Keep the scratch directory afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Manages robot accounts (long random tokens for CI), kept in DIR/auth/robots.json.
    /// Changes take effect on a running server within a second.
    Robot {
        #[command(subcommand)]
        command: RobotCommand,
    },
    /// Sets a user's password in an htpasswd file (bcrypt, as `htpasswd -B` writes),
    /// reading it from standard input; or removes the user with --delete.
    Passwd {
        /// The htpasswd file (created if absent).
        file: PathBuf,
        /// The user name.
        user: String,
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
        /// Audit log to record the change in (e.g. DIR/audit/audit.log).
        #[arg(long)]
        audit_log: Option<PathBuf>,
        /// bcrypt cost (work factor, 4 to 31): each step doubles the time a login takes.
        #[arg(long, default_value_t = 10)]
        cost: u32,
    },
    /// Queries the audit log (the data directory's, or a log file) and its rotated files.
    Audit {
        /// The data directory, or an audit log file.
        path: PathBuf,
        /// Only this actor (user:NAME, robot:NAME, anonymous, system, cli:NAME).
        #[arg(long)]
        actor: Option<String>,
        /// Only this action; a trailing '.' matches a family (manifest.).
        #[arg(long)]
        action: Option<String>,
        /// Only this repository.
        #[arg(long)]
        repository: Option<String>,
        /// Only this outcome (ok, denied, failed).
        #[arg(long)]
        outcome: Option<String>,
        /// Only events since a time (2026-11-28T10:00:00Z) or for a duration back (2h).
        #[arg(long)]
        since: Option<String>,
        /// Print the JSON lines as stored.
        #[arg(long)]
        json: bool,
    },
    /// Shows what a data directory holds: stored against logical bytes, live and dead bytes,
    /// per repository.
    Inspect {
        /// The data directory (the server must not be running on it).
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Config file: with [[quotas]], also each namespace's usage against its limits
        /// (as GET /admin/usage?detail=true shows it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Applies the config's retention rules to a data directory (server stopped): deletes
    /// the tags no rule keeps and the manifests nothing reaches any more, and tells what a
    /// garbage collection would then free. Exit 0 done, 2 could not run.
    Retention {
        /// The data directory.
        dir: PathBuf,
        /// Config file with the [[retention.rules]] (and [[immutable_tags]]).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Report what would go; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Webhook dead letters: events an endpoint gave up on (server stopped; on a running
    /// server use GET /admin/webhooks/dead and POST /admin/webhooks/dead/redeliver).
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Rebuilds a data directory from the checkpoints the config's [bucket] holds (after the
    /// host's disk is lost), then runs fsck on it. Exit 0 restored and clean, 1 restored but
    /// fsck found problems, 2 could not run (DIR was not created).
    Restore {
        /// The data directory to create (must not exist, or be empty).
        dir: PathBuf,
        /// The config file the server shipped with (its [bucket] table; BALLAST_* and the
        /// AWS_* environment variables apply as they do to serve).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The checkpoint to restore (see --list); the newest by default.
        #[arg(long)]
        checkpoint: Option<u64>,
        /// List the bucket's checkpoints; restore nothing.
        #[arg(long)]
        list: bool,
        /// Do not verify the restored directory with fsck.
        #[arg(long)]
        skip_fsck: bool,
        /// Fetch every segment even with cache_bytes_max set (which otherwise leaves them
        /// in the bucket and fetches only the catalog and the index files).
        #[arg(long)]
        fetch_all: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Names a stored manifest again under REPOSITORY:TAG, linking the blobs it references
    /// (after catalog damage: fsck lists such manifests as `manifest_unnamed`). Exit 0
    /// tagged, 1 refused (not a stored manifest, blobs missing), 2 could not run.
    Tag {
        /// The data directory (the server must not be running on it).
        dir: PathBuf,
        /// Where to name it: REPOSITORY:TAG.
        target: String,
        /// The manifest's digest.
        digest: String,
        /// Config file, for the audit log's place (else the data directory's).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum WebhooksCommand {
    /// Lists the dead letters (exit 0, or 2 when it could not run).
    Dead {
        /// The data directory.
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Puts dead letters back for delivery when the server next runs: those named by --id,
    /// or all.
    Redeliver {
        /// The data directory.
        dir: PathBuf,
        /// A dead letter's id (repeatable); none: all of them.
        #[arg(long = "id")]
        ids: Vec<u64>,
        /// Config file, for the audit log's place (else the data directory's).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum RobotCommand {
    /// Creates a robot and prints its token once.
    Create {
        /// The data directory.
        dir: PathBuf,
        /// The robot's name (its login user name).
        name: String,
        /// What the robot is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Robots file, when the config names another than DIR/auth/robots.json.
        #[arg(long)]
        robots: Option<PathBuf>,
        /// The server's config file: its `[auth] robots` and `audit_log` settings (and the
        /// BALLAST_* environment) are used.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Revokes a robot: its token, and every token issued to it, stop working.
    Revoke {
        /// The data directory.
        dir: PathBuf,
        /// The robot's name.
        name: String,
        /// Robots file, when the config names another than DIR/auth/robots.json.
        #[arg(long)]
        robots: Option<PathBuf>,
        /// The server's config file: its `[auth] robots` and `audit_log` settings (and the
        /// BALLAST_* environment) are used.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Lists robots (never their tokens).
    List {
        /// The data directory.
        dir: PathBuf,
        /// Robots file, when the config names another than DIR/auth/robots.json.
        #[arg(long)]
        robots: Option<PathBuf>,
        /// The server's config file: its `[auth] robots` and `audit_log` settings (and the
        /// BALLAST_* environment) are used.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Fsck {
            dir,
            repair,
            json,
            config,
        } => {
            let code = ballast_tools::fsck(&dir, repair, json, &mut std::io::stdout());
            let Some(config) = config else {
                std::process::exit(code)
            };
            let mut cfg = Config::load(Some(&config), std::env::vars())?;
            cfg.data = dir;
            if code == 2 || cfg.bucket.is_none() {
                std::process::exit(code)
            }
            let bucket =
                ballast_server::bucket_cmd::fsck(&cfg, repair, json, &mut std::io::stdout());
            std::process::exit(code.max(bucket))
        }
        Command::Gc {
            dir,
            dry_run,
            grace,
            delete_untagged,
            min_dead_fraction,
            fold_below_mb,
            upload_max_age,
            json,
        } => {
            let opts = ballast_engine::gc::GcOptions {
                grace_secs: grace,
                delete_untagged,
                dead_fraction_min: min_dead_fraction,
                dry_run,
                // Offline: no pushes to make room for.
                pace_bytes_per_sec: 0,
                fold_below_bytes: fold_below_mb << 20,
            };
            std::process::exit(ballast_tools::gc(
                &dir,
                &opts,
                upload_max_age,
                json,
                &mut std::io::stdout(),
            ))
        }
        Command::Tag {
            dir,
            target,
            digest,
            config,
        } => {
            let mut cfg = Config::load(config.as_deref(), std::env::vars())?;
            cfg.data = dir.clone();
            std::process::exit(ballast_server::tag::run(
                &dir,
                &target,
                &digest,
                &cfg.audit_path(),
                &mut std::io::stdout(),
            ))
        }
        Command::Restore {
            dir,
            config,
            checkpoint,
            list,
            skip_fsck,
            fetch_all,
            json,
        } => {
            let mut cfg = Config::load(config.as_deref(), std::env::vars())?;
            cfg.data = dir.clone();
            let args = ballast_server::bucket_cmd::RestoreArgs {
                dir: &dir,
                checkpoint,
                list,
                skip_fsck,
                fetch_all,
                json,
            };
            std::process::exit(ballast_server::bucket_cmd::run(
                &cfg,
                &args,
                &mut std::io::stdout(),
            ))
        }
        Command::Retention {
            dir,
            config,
            dry_run,
            json,
        } => {
            let mut cfg = Config::load(config.as_deref(), std::env::vars())?;
            cfg.data = dir.clone();
            std::process::exit(ballast_server::governance::retention::offline(
                &dir,
                &cfg,
                dry_run,
                json,
                &mut std::io::stdout(),
            ))
        }
        Command::Webhooks { command } => match command {
            WebhooksCommand::Dead { dir, json } => std::process::exit(
                ballast_server::webhooks::offline::dead(&dir, json, &mut std::io::stdout()),
            ),
            WebhooksCommand::Redeliver { dir, ids, config } => {
                let mut cfg = Config::load(config.as_deref(), std::env::vars())?;
                cfg.data = dir.clone();
                std::process::exit(ballast_server::webhooks::offline::redeliver(
                    &dir,
                    &ids,
                    &cfg.audit_path(),
                    &mut std::io::stdout(),
                ))
            }
        },
        Command::Inspect { dir, json, config } => {
            let code = ballast_tools::inspect(&dir, json, &mut std::io::stdout());
            if code != 0 || config.is_none() {
                std::process::exit(code)
            }
            let cfg = Config::load(config.as_deref(), std::env::vars())?;
            std::process::exit(ballast_server::governance::quota::offline_report(
                &dir,
                &cfg.quotas,
                json,
                &mut std::io::stdout(),
            ))
        }
        Command::Bench {
            dir,
            quick,
            json,
            keep,
        } => {
            let opts = ballast_tools::bench::BenchOptions { dir, quick, keep };
            std::process::exit(ballast_tools::bench(&opts, json, &mut std::io::stdout()))
        }
        Command::Robot { command } => {
            // The robots file and the audit log as the server finds them: its config file
            // and environment, with DIR as the data directory; --robots wins.
            let paths = |dir: PathBuf, config: Option<PathBuf>, robots: Option<PathBuf>| {
                let mut cfg = Config::load(config.as_deref(), std::env::vars())?;
                cfg.data = dir;
                anyhow::Ok((
                    robots.unwrap_or_else(|| cfg.robots_path()),
                    cfg.audit_path(),
                ))
            };
            match command {
                RobotCommand::Create {
                    dir,
                    name,
                    description,
                    robots,
                    config,
                } => {
                    let (robots, audit) = paths(dir, config, robots)?;
                    cli::robot_create(&robots, &audit, &name, &description, &mut std::io::stdout())
                }
                RobotCommand::Revoke {
                    dir,
                    name,
                    robots,
                    config,
                } => {
                    let (robots, audit) = paths(dir, config, robots)?;
                    cli::robot_revoke(&robots, &audit, &name)
                }
                RobotCommand::List {
                    dir,
                    robots,
                    config,
                    json,
                } => {
                    let (robots, _) = paths(dir, config, robots)?;
                    cli::robot_list(&robots, json, &mut std::io::stdout())
                }
            }
        }
        Command::Passwd {
            file,
            user,
            delete,
            audit_log,
            cost,
        } => cli::passwd(
            &file,
            audit_log.as_deref(),
            &user,
            delete,
            cost,
            &mut std::io::stdin().lock(),
        ),
        Command::Audit {
            path,
            actor,
            action,
            repository,
            outcome,
            since,
            json,
        } => {
            let log = if path.is_dir() {
                ballast_server::config::default_audit_path(&path)
            } else {
                path
            };
            let filter = ballast_server::audit::query::Filter {
                actor,
                action,
                repository,
                outcome,
                since: since
                    .map(|s| ballast_server::audit::query::parse_time(&s, "--since"))
                    .transpose()?,
                until: None,
            };
            cli::audit_query(&log, &filter, json, &mut std::io::stdout()).map(|_| ())
        }
        Command::Serve {
            listen,
            data,
            config,
        } => {
            let mut cfg = Config::load(config.as_deref(), std::env::vars())?;
            if let Some(l) = listen {
                cfg.set("listen", &l).context("--listen")?;
            }
            if let Some(d) = data {
                cfg.data = d;
            }
            serve(cfg, config)
        }
    }
}

/// A fraction from 0 to 1 (`--min-dead-fraction`).
fn fraction(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("{s:?} is not a fraction from 0 to 1"))
}

fn serve(cfg: Config, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    // Log lines are gathered in memory and written by a background thread (logbuf.rs), so a
    // request never waits on stderr; the guard flushes what is left when the server stops.
    // Colours only on a terminal, never in a log file.
    let stderr = std::io::stderr();
    let ansi = stderr.is_terminal();
    let (log_writer, _flush_logs) = ballast_server::logbuf::batched(stderr);
    // Request lines skip tracing's formatting (a tenth of a small request's CPU); they keep
    // its layout, without colours.
    log_writer.take_request_lines();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cfg.log).context("log filter")?)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(log_writer)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // Signals are taken before the server starts, so one that arrives while it starts (or
        // just after it said it listens) still stops it cleanly.
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let server = tokio::select! {
            s = Server::start(cfg.clone()) => s?,
            _ = int.recv() => anyhow::bail!("interrupted while starting: stopped before serving"),
            _ = term.recv() => anyhow::bail!("SIGTERM while starting: stopped before serving"),
        };
        println!(
            "ballast {} listening on {}://{} with data in {}",
            env!("CARGO_PKG_VERSION"),
            if cfg.tls() { "https" } else { "http" },
            server.addr(),
            cfg.data.display()
        );
        if let Some(m) = server.metrics_addr() {
            println!("metrics on http://{m}/metrics");
        }
        tracing::info!(listen = %server.addr(), data = %cfg.data.display(), "serving");
        loop {
            tokio::select! {
                _ = int.recv() => {
                    tracing::info!("interrupt: shutting down");
                    break;
                }
                _ = term.recv() => {
                    tracing::info!("SIGTERM: shutting down");
                    break;
                }
                _ = hup.recv() => {
                    // The policies of the config file (and environment) as they are now.
                    let reloaded = Config::load(config_file.as_deref(), std::env::vars());
                    match server.reload(reloaded).await {
                        Ok(()) => tracing::info!("SIGHUP: policies reloaded"),
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: reload refused; the policies before stay in force"),
                    }
                }
            }
        }
        server.shutdown().await
    })
}
