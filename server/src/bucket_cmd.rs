//! The bucket's offline commands. `ballast restore --config FILE DIR` rebuilds a data
//! directory from the checkpoints the config's `[bucket]` holds (after the host's disk is
//! lost), then verifies it with fsck; `ballast fsck DIR --config FILE` also checks the bucket.
//! The work is the bucket crate's (`ballast_bucket::{restore, verify}`); these are the
//! commands around it: output, the audit line, exit codes.

use std::io::Write;
use std::path::Path;

use ballast_tools::{printable, EXIT_FAILED, EXIT_FINDINGS, EXIT_OK};

use crate::audit::{self, Event};
use crate::Config;

/// What `ballast restore` was asked.
pub struct RestoreArgs<'a> {
    /// The data directory to create (absent or empty).
    pub dir: &'a Path,
    /// The checkpoint; the newest when `None`.
    pub checkpoint: Option<u64>,
    /// Only list the bucket's checkpoints.
    pub list: bool,
    /// Do not run fsck on the result.
    pub skip_fsck: bool,
    /// Fetch every segment even with tiering on.
    pub fetch_all: bool,
    /// Machine-readable output.
    pub json: bool,
}

/// The bucket's client and a runtime to drive it, or why not.
fn connect(cfg: &Config) -> Result<(ballast_bucket::Bucket, tokio::runtime::Runtime), String> {
    let Some(bcfg) = &cfg.bucket else {
        return Err(
            "the config has no [bucket] table: name the config the server shipped \
                    with (--config FILE)"
                .into(),
        );
    };
    bcfg.check().map_err(|e| format!("{e:#}"))?;
    let bucket = ballast_bucket::Bucket::connect(bcfg).map_err(|e| format!("{e:#}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    Ok((bucket, runtime))
}

/// `ballast fsck DIR --config FILE`, after the data directory's own check: checks the
/// bucket (every kept checkpoint's objects, by length and SHA-256; objects none names), and
/// with `repair` deletes the unreferenced objects of Ballast's layout. Exit code as fsck's.
pub fn fsck(cfg: &Config, repair: bool, json: bool, out: &mut dyn Write) -> i32 {
    let (bucket, runtime) = match connect(cfg) {
        Ok(c) => c,
        Err(msg) => {
            let _ = writeln!(out, "fsck: {}", printable(&msg));
            return EXIT_FAILED;
        }
    };
    let report = match runtime.block_on(ballast_bucket::verify::verify(&bucket, repair)) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("checking the bucket: {e:#}");
            let _ = if json {
                writeln!(out, "{}", serde_json::json!({ "bucket_error": msg }))
            } else {
                writeln!(out, "fsck: {}", printable(&msg))
            };
            return EXIT_FAILED;
        }
    };
    if json {
        let _ = writeln!(out, "{}", serde_json::json!({ "bucket": report }));
    } else {
        let _ = writeln!(
            out,
            "bucket {}: {} checkpoints, {} objects ({} bytes) checked{}",
            report.bucket,
            report.checkpoints,
            report.objects_checked,
            report.bytes_checked,
            if report.removed > 0 {
                format!(", {} unreferenced objects deleted", report.removed)
            } else {
                String::new()
            }
        );
        for f in &report.findings {
            let _ = writeln!(
                out,
                "{}: {}: {}",
                f.kind,
                printable(&f.object),
                printable(&f.detail)
            );
        }
        let _ = writeln!(
            out,
            "{}",
            if report.is_clean() {
                "bucket clean"
            } else {
                "bucket has problems"
            }
        );
    }
    if report.is_clean() {
        EXIT_OK
    } else {
        EXIT_FINDINGS
    }
}

/// Runs the command; returns the exit code: 0 restored (and fsck clean), 1 restored but fsck
/// found problems, 2 could not run (nothing was created).
pub fn run(cfg: &Config, args: &RestoreArgs<'_>, out: &mut dyn Write) -> i32 {
    let fail = |out: &mut dyn Write, msg: String| {
        let _ = writeln!(out, "restore: {}", printable(&msg));
        EXIT_FAILED
    };
    let (bucket, runtime) = match connect(cfg) {
        Ok(c) => c,
        Err(msg) => return fail(out, msg),
    };
    if args.list {
        return match runtime.block_on(ballast_bucket::restore::list(&bucket)) {
            Ok(list) if args.json => {
                let _ = writeln!(out, "{}", serde_json::json!({ "checkpoints": list }));
                EXIT_OK
            }
            Ok(list) => {
                if list.is_empty() {
                    let _ = writeln!(out, "{} holds no checkpoint", bucket.describe());
                }
                for c in list {
                    let _ = writeln!(
                        out,
                        "checkpoint {:>6}  taken {}  {} repositories, {} segments, {} bytes",
                        c.seq,
                        when(c.taken_at),
                        c.repos,
                        c.segments,
                        c.bytes
                    );
                }
                EXIT_OK
            }
            Err(e) => fail(out, format!("{e:#}")),
        };
    }
    let opts = cfg.engine_options();
    let restored = runtime.block_on(ballast_bucket::restore::restore(
        &bucket,
        args.dir,
        args.checkpoint,
        tiered(cfg) && !args.fetch_all,
        opts,
    ));
    drop(runtime);
    let report = match restored {
        Ok(r) => r,
        Err(e) => {
            return fail(
                out,
                format!("{e:#}; {} was not created", args.dir.display()),
            )
        }
    };
    let audit_warning = audit_restore(cfg, &crate::cli::cli_actor(), &bucket, &report);
    if args.json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::json!({ "restored": report, "audit_warning": audit_warning })
        );
    } else {
        let _ = writeln!(
            out,
            "restored checkpoint {} (taken {}) into {}: {} repositories, {} segments ({} left \
             in the bucket), {} bytes fetched in {} ms",
            report.seq,
            when(report.taken_at),
            args.dir.display(),
            report.repos,
            report.segments,
            report.segments_remote,
            report.bytes,
            report.ms
        );
        for w in report.warnings.iter().chain(audit_warning.iter()) {
            let _ = writeln!(out, "warning: {}", printable(w));
        }
    }
    if args.skip_fsck {
        return EXIT_OK;
    }
    match ballast_tools::fsck(args.dir, false, args.json, out) {
        EXIT_OK => EXIT_OK,
        EXIT_FINDINGS => EXIT_FINDINGS,
        _ => EXIT_FAILED,
    }
}

/// True when the bucket may hold more than the local disk (`cache_bytes_max` is set): a
/// restore then leaves the segments there.
fn tiered(cfg: &Config) -> bool {
    cfg.bucket
        .as_ref()
        .is_some_and(|b| b.cache_bytes_max.is_some())
}

/// Audits a restore as `bucket.restore` by `actor`; says why it could not.
fn audit_restore(
    cfg: &Config,
    actor: &str,
    bucket: &ballast_bucket::Bucket,
    report: &ballast_bucket::restore::RestoreReport,
) -> Option<String> {
    let mut e = Event::new(actor, "bucket.restore");
    e.reason = Some(format!(
        "checkpoint {} of {} (taken {}): {} repositories, {} segments ({} left in the \
         bucket), {} bytes fetched",
        report.seq,
        bucket.describe(),
        when(report.taken_at),
        report.repos,
        report.segments,
        report.segments_remote,
        report.bytes
    ));
    // (`cfg.data` is the restored directory: the audit log is its own unless the config
    // puts it elsewhere.)
    let audit_path = cfg.audit_path();
    audit::append(&audit_path, &e).err().map(|err| {
        format!(
            "could not write the audit log {}: {err}",
            audit_path.display()
        )
    })
}

/// `serve` with a bucket, before the store opens: an empty (or absent) data directory is
/// restored from the bucket's newest checkpoint (unless `restore_empty = false`), audited
/// as `bucket.restore` by `system`. Nothing happens when the bucket holds no checkpoint.
pub(crate) async fn restore_if_empty(cfg: &Config) -> anyhow::Result<()> {
    let Some(bcfg) = cfg.bucket.as_ref().filter(|b| b.restore_empty) else {
        return Ok(());
    };
    let bucket = ballast_bucket::Bucket::connect(bcfg)?;
    let Some(report) = ballast_bucket::restore::restore_if_empty(
        &bucket,
        &cfg.data,
        tiered(cfg),
        cfg.engine_options(),
    )
    .await?
    else {
        return Ok(());
    };
    tracing::info!(
        checkpoint = report.seq,
        taken_at = %when(report.taken_at),
        repositories = report.repos,
        segments = report.segments,
        segments_in_bucket = report.segments_remote,
        bytes = report.bytes,
        ms = report.ms,
        "the data directory was empty: restored the bucket's newest checkpoint (pushes after \
         its cut are not in it)"
    );
    for w in &report.warnings {
        tracing::warn!("{w}");
    }
    if let Some(w) = audit_restore(cfg, "system", &bucket, &report) {
        tracing::warn!("{w}");
    }
    Ok(())
}

/// Unix seconds as RFC 3339 (UTC).
fn when(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}
