//! Offline admin tools over a data directory: `fsck`, `gc` and `inspect`. A thin layer over
//! the engine's `verify`, `gc` and `inspect` modules: opening, progress, output, exit codes.

pub mod bench;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use ballast_engine::storage::{OverlayStorage, RealStorage, Storage};
use ballast_engine::{clock, gc, inspect, verify, Error, Options, Store};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Exit code: clean (fsck) or success.
pub const EXIT_OK: i32 = 0;
/// Exit code: fsck found problems.
pub const EXIT_FINDINGS: i32 = 1;
/// Exit code: the tool could not run (locked, missing, unreadable).
pub const EXIT_FAILED: i32 = 2;

/// Opens a data directory for an offline tool: it must exist and be a Ballast directory, and
/// no server may hold it.
pub fn open_offline(dir: &Path, opts: Options) -> Result<Store, String> {
    open_offline_on(Arc::new(RealStorage), dir, opts)
}

/// [`open_offline`] on a given storage (fsck without `--repair` reads through an overlay
/// that keeps every change in memory).
pub fn open_offline_on(
    storage: Arc<dyn Storage>,
    dir: &Path,
    opts: Options,
) -> Result<Store, String> {
    if !dir.join("segments").is_dir() {
        return Err(format!(
            "{} is not a Ballast data directory (no segments/ in it)",
            dir.display()
        ));
    }
    let store = Store::open_on(storage, dir, opts).map_err(|e| match e {
        Error::Locked { holder, .. } => format!(
            "{} is in use by another process ({holder}); stop the server first (offline tools need the directory to themselves)",
            dir.display()
        ),
        other if other.is_corruption() => format!(
            "cannot open {dir}: {other}. `ballast fsck --repair {dir}` opens it anyway: it \
             rebuilds the indexes from the segments, indexes every readable record around \
             damage, and sets damaged records and the blobs that need them aside in \
             quarantine.json (nothing is deleted; a re-push heals a quarantined blob)",
            dir = dir.display()
        ),
        other => format!("cannot open {}: {other}", dir.display()),
    })?;
    Ok(store)
}

/// What opening mended (a damaged index file rebuilt), on stderr: fsck reports it in its
/// own output instead.
fn warn_about_open(store: &Store) {
    for w in store.open_warnings() {
        eprintln!("warning: {}", printable(w));
    }
}

fn progress_bar() -> ProgressBar {
    // Drawn on stderr only when it is a terminal.
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Writes a report as pretty JSON (`--json`) or in its human form.
fn write_output<T: serde::Serialize>(
    out: &mut dyn Write,
    json: bool,
    value: &T,
    human: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    if json {
        let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
        writeln!(out, "{text}")
    } else {
        human(out)
    }
}

/// Text as a terminal can show it without being steered by it: control characters (line
/// breaks, carriage returns, escape sequences) and bidirectional overrides are written as
/// escapes (`\n`, `\u{1b}`). Every human-readable output of a name, path or message that
/// did not come from this program goes through it (fsck, gc, inspect, `ballast audit`).
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let steers = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(steers) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if steers(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A path as [`printable`] text.
fn shown(p: &Path) -> String {
    printable(&p.display().to_string()).into_owned()
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// `ballast fsck DIR [--repair] [--json]`; returns the exit code.
pub fn fsck(dir: &Path, repair: bool, json: bool, out: &mut dyn Write) -> i32 {
    // Every chunk record's BLAKE3 id is checked once while the segments are scanned; the
    // blob pass then only needs the CRCs and the digests. Damage in a segment replayed at
    // open does not stop the check (it is what the check reports). Without --repair nothing
    // on disk changes: the directory is read through an overlay that keeps what opening
    // mends (a torn tail cut, ...) in memory.
    let opts = Options {
        rebuild_indexes: repair,
        salvage: true,
        ..Options::default()
    };
    let storage: Arc<dyn Storage> = if repair {
        Arc::new(RealStorage)
    } else {
        Arc::new(OverlayStorage::new())
    };
    let store = match open_offline_on(storage, dir, opts) {
        Ok(s) => s,
        Err(msg) => {
            let _ = writeln!(
                out,
                "{}",
                if json {
                    serde_json::json!({ "error": msg }).to_string()
                } else {
                    format!("fsck: {}", printable(&msg))
                }
            );
            return EXIT_FAILED;
        }
    };
    let bar = progress_bar();
    let check = |store: &Store| {
        let r = verify::fsck(store, &|phase, done, total| {
            bar.set_message(phase.to_owned());
            bar.set_length(total);
            bar.set_position(done);
        });
        bar.finish_and_clear();
        r
    };
    let mut report = check(&store);
    let mut summary = None;
    let open_warnings = store.open_warnings().to_vec();
    if repair && !report.is_clean() {
        // Set aside what is damaged, then check again: what remains is what repair could
        // not fix.
        // The active segment is sealed too (its index written): damage salvaged in it would
        // otherwise stop the next open, which replays the active segment.
        // Checksum fields of sound records are rewritten first (nothing of theirs is set
        // aside).
        let repaired = verify::repair_checksums(&store, &report).and_then(|crcs| {
            let (records, blobs) = verify::quarantine_damage(&store, &report, clock::now_secs())?;
            // Sealing also ends what the active segment recorded about the catalog: a journal
            // cut short is then taken as it is.
            store.seal_active()?;
            store.accept_catalog_damage();
            Ok((crcs, records, blobs))
        });
        match repaired {
            Ok((crcs, records, blobs)) => {
                summary = Some(RepairSummary {
                    findings_before: report.findings.len(),
                    checksums_rewritten: crcs,
                    records_quarantined: records,
                    blobs_quarantined: blobs,
                });
                report = check(&store);
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "fsck: the repair could not write: {}",
                    printable(&e.to_string())
                );
                return EXIT_FAILED;
            }
        }
    }
    drop(store);
    let output = FsckOutput {
        repair: summary,
        warnings: open_warnings.into_iter().chain(loose_modes(dir)).collect(),
        report: &report,
    };
    let written = write_output(out, json, &output, |out| {
        for w in &output.warnings {
            writeln!(out, "warning: {}", printable(w))?;
        }
        write_report(out, dir, repair, summary.as_ref(), &report)
    });
    if written.is_err() {
        return EXIT_FAILED;
    }
    if report.is_clean() {
        EXIT_OK
    } else {
        EXIT_FINDINGS
    }
}

/// A warning when the data directory or anything in it is open to other users (images may
/// be private; the engine creates everything 0750/0640, but a directory made by hand or by
/// an older version may be 0755/0644).
fn loose_modes(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut open = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.file_type().is_symlink() {
            continue;
        }
        if m.mode() & 0o007 != 0 {
            open.push((p.clone(), m.mode() & 0o7777));
        }
        if m.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    if open.is_empty() {
        return Vec::new();
    }
    open.sort();
    let examples: Vec<String> = open
        .iter()
        .take(3)
        .map(|(p, mode)| format!("{} ({mode:o})", p.display()))
        .collect();
    vec![format!(
        "{} files and directories are open to other users, e.g. {}: any local user may read \
         the images; `chmod -R o-rwx {}` closes them",
        open.len(),
        examples.join(", "),
        dir.display()
    )]
}

/// What `fsck --repair` did beyond rebuilding the indexes.
#[derive(Clone, Copy, serde::Serialize)]
struct RepairSummary {
    /// Findings of the first pass.
    findings_before: usize,
    /// Records whose damaged checksum field was rewritten (their content was sound).
    checksums_rewritten: usize,
    /// Damaged records newly set aside.
    records_quarantined: usize,
    /// Blobs newly quarantined.
    blobs_quarantined: usize,
}

#[derive(serde::Serialize)]
struct FsckOutput<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    repair: Option<RepairSummary>,
    /// What is not damage but should be fixed (permissions); no effect on the exit code.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
    #[serde(flatten)]
    report: &'a verify::Report,
}

fn write_report(
    out: &mut dyn Write,
    dir: &Path,
    repair: bool,
    summary: Option<&RepairSummary>,
    r: &verify::Report,
) -> std::io::Result<()> {
    if repair {
        writeln!(out, "repair: indexes rebuilt from the segments")?;
    }
    if let Some(s) = summary {
        writeln!(
            out,
            "repair: the first pass found {} problems; {} damaged checksums rewritten (their records \
             were sound), {} damaged records and {} blobs set aside in the quarantine (nothing \
             deleted); second pass below",
            s.findings_before, s.checksums_rewritten, s.records_quarantined, s.blobs_quarantined
        )?;
    }
    if !r.quarantined_blobs.is_empty() || r.quarantined_records > 0 {
        writeln!(
            out,
            "quarantined: {} damaged records, {} blobs answered as missing until pushed again:",
            r.quarantined_records,
            r.quarantined_blobs.len()
        )?;
        for d in &r.quarantined_blobs {
            writeln!(out, "  {d}")?;
        }
    }
    writeln!(
        out,
        "fsck {}: {} segments ({}), {} chunks, {} blobs ({}), {} index entries, {} repositories checked",
        shown(dir),
        r.segments,
        human_bytes(r.segment_bytes),
        r.chunks,
        r.blobs,
        human_bytes(r.blob_bytes),
        r.index_entries,
        r.repositories
    )?;
    if r.remote_segments > 0 {
        writeln!(
            out,
            "{} segments ({}) are kept in the bucket: not scanned here (`--config` checks their \
             objects in the bucket); {} blobs stored there not reassembled",
            r.remote_segments,
            human_bytes(r.remote_segment_bytes),
            r.blobs_unchecked
        )?;
    }
    if r.is_clean() {
        return writeln!(out, "clean");
    }
    for f in &r.findings {
        let place = match (&f.file, f.offset) {
            (Some(file), Some(off)) => format!(" {}@{off}", shown(file)),
            (Some(file), None) => format!(" {}", shown(file)),
            _ => String::new(),
        };
        writeln!(
            out,
            "{:?} {}{place}: {}\n  hint: {}",
            f.severity,
            f.code,
            printable(&f.message),
            printable(f.hint)
        )?;
    }
    writeln!(out, "{} problem(s) found", r.findings.len())
}

/// `ballast inspect DIR [--json]`; returns the exit code.
pub fn inspect(dir: &Path, json: bool, out: &mut dyn Write) -> i32 {
    let store = match open_offline(dir, Options::default()) {
        Ok(s) => s,
        Err(msg) => {
            let _ = writeln!(out, "inspect: {}", printable(&msg));
            return EXIT_FAILED;
        }
    };
    warn_about_open(&store);
    let i = match inspect::inspect(&store) {
        Ok(i) => i,
        Err(e) => {
            let _ = writeln!(out, "inspect: {}", printable(&e.to_string()));
            return EXIT_FAILED;
        }
    };
    let written = write_output(out, json, &i, |out| write_inspection(out, dir, &i));
    if written.is_err() {
        EXIT_FAILED
    } else {
        EXIT_OK
    }
}

fn write_inspection(
    out: &mut dyn Write,
    dir: &Path,
    i: &inspect::Inspection,
) -> std::io::Result<()> {
    writeln!(out, "{}", shown(dir))?;
    writeln!(
        out,
        "  segments        {} files, {}; {} index files",
        i.segments,
        human_bytes(i.segment_bytes),
        i.index_files
    )?;
    writeln!(
        out,
        "  chunks          {} ({} compressed), raw {}, stored {}",
        i.chunks,
        i.chunks_compressed,
        human_bytes(i.chunk_raw_bytes),
        human_bytes(i.chunk_stored_bytes)
    )?;
    writeln!(
        out,
        "  blobs           {} distinct, {}",
        i.blobs,
        human_bytes(i.blob_bytes)
    )?;
    writeln!(
        out,
        "  recipes         {} ({} compressed), stored {}",
        i.recipes,
        i.recipes_compressed,
        human_bytes(i.recipe_stored_bytes)
    )?;
    writeln!(
        out,
        "  logical         {} linked by repositories; stored {} ({:.2}x reduction)",
        human_bytes(i.logical_bytes),
        human_bytes(i.segment_bytes),
        i.reduction_ratio
    )?;
    writeln!(
        out,
        "  live / dead     {} / {} (dead bytes are reclaimable by gc)",
        human_bytes(i.live_bytes),
        human_bytes(i.dead_bytes)
    )?;
    writeln!(
        out,
        "  uploads         {} unfinished, {} received",
        i.upload_sessions,
        human_bytes(i.upload_bytes)
    )?;
    if !i.repositories.is_empty() {
        writeln!(
            out,
            "  {:<40} {:>6} {:>9} {:>12} {:>12}",
            "repository", "tags", "manifests", "logical", "unique"
        )?;
    }
    for (name, r) in &i.repositories {
        let name = printable(name);
        writeln!(
            out,
            "  {name:<40} {:>6} {:>9} {:>12} {:>12}",
            r.tags,
            r.manifests,
            human_bytes(r.logical_bytes),
            human_bytes(r.unique_bytes)
        )?;
    }
    Ok(())
}

/// What `ballast gc` reports: the collection, and the upload sessions it expired.
#[derive(Serialize)]
struct GcOutput {
    #[serde(flatten)]
    report: gc::GcReport,
    /// Unfinished upload sessions removed (or that would be, with `--dry-run`).
    uploads_expired: u64,
    /// Bytes those sessions had received (their chunks go with the collection that follows).
    upload_bytes_freed: u64,
}

/// `ballast gc DIR [--dry-run] [--grace SECONDS] [--delete-untagged] [--upload-max-age
/// SECONDS] [--json]`; returns the exit code (0 done, 2 could not run).
pub fn gc(
    dir: &Path,
    opts: &gc::GcOptions,
    upload_max_age_secs: u64,
    json: bool,
    out: &mut dyn Write,
) -> i32 {
    let store = match open_offline(dir, Options::default()) {
        Ok(s) => s,
        Err(msg) => {
            let _ = writeln!(out, "gc: {}", printable(&msg));
            return EXIT_FAILED;
        }
    };
    warn_about_open(&store);
    let now = clock::now_secs();
    // Abandoned uploads first: their chunks are garbage once their sessions are gone.
    let uploads = ballast_engine::Uploads::new(&store);
    let cutoff = now.saturating_sub(upload_max_age_secs);
    let old = match uploads.started_before(cutoff) {
        Ok(old) => old,
        Err(e) => {
            let _ = writeln!(
                out,
                "gc: listing upload sessions: {}",
                printable(&e.to_string())
            );
            return EXIT_FAILED;
        }
    };
    if !opts.dry_run {
        if let Err(e) = uploads.expire(cutoff) {
            let _ = writeln!(
                out,
                "gc: removing old upload sessions: {}",
                printable(&e.to_string())
            );
            return EXIT_FAILED;
        }
    }
    let report = match gc::collect(&store, opts, now) {
        Ok(r) => GcOutput {
            report: r,
            uploads_expired: old.len() as u64,
            upload_bytes_freed: old.iter().map(|(_, len)| len).sum(),
        },
        Err(e) => {
            let _ = writeln!(out, "gc: {}", printable(&e.to_string()));
            return EXIT_FAILED;
        }
    };
    if let Err(e) = store.close() {
        let _ = writeln!(out, "gc: closing the store: {}", printable(&e.to_string()));
        return EXIT_FAILED;
    }
    let written = write_output(out, json, &report, |out| {
        let r = &report.report;
        let verb = if r.dry_run { "would free" } else { "freed" };
        writeln!(
            out,
            "gc {}: {verb} {} ({} of {} segments compacted, {} live moved); {} blob links and {} manifests {}; {} unfinished uploads ({}) {}",
            shown(dir),
            human_bytes(r.bytes_reclaimed),
            r.segments_compacted,
            r.segments_examined,
            human_bytes(r.bytes_moved),
            r.blob_links_removed,
            r.manifests_removed,
            if r.dry_run { "would be removed" } else { "removed" },
            report.uploads_expired,
            human_bytes(report.upload_bytes_freed),
            if r.dry_run { "would expire" } else { "expired" },
        )?;
        if r.segments_folded > 0 {
            writeln!(
                out,
                "folded: {} small segments (below {}) {} into one",
                r.segments_folded,
                human_bytes(opts.fold_below_bytes),
                if r.dry_run {
                    "would be copied"
                } else {
                    "copied"
                },
            )?;
        }
        if r.dead_bytes_left_young + r.dead_bytes_left_below_fraction > 0 {
            writeln!(
                out,
                "left dead: {} in segments younger than the grace period ({} s), {} in segments \
                 less dead than the threshold ({}); lower --grace or --min-dead-fraction to \
                 take them too",
                human_bytes(r.dead_bytes_left_young),
                opts.grace_secs,
                human_bytes(r.dead_bytes_left_below_fraction),
                opts.dead_fraction_min
            )?;
        }
        Ok(())
    });
    if written.is_err() {
        EXIT_FAILED
    } else {
        EXIT_OK
    }
}

/// `ballast bench`: runs the suite and prints a table or JSON. Exit 0, or 2 when it could not
/// run.
pub fn bench(opts: &bench::BenchOptions, json: bool, out: &mut dyn Write) -> i32 {
    match bench::run(opts) {
        Ok(report) => {
            let written = write_output(out, json, &report, |o| bench::print_table(&report, o));
            if written.is_err() {
                return EXIT_FAILED;
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("ballast bench: {e}");
            EXIT_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_steers_a_terminal() {
        assert!(matches!(
            printable("team-a/api sha256:ab"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(printable("a\nb\rc\u{1b}[2J"), "a\\nb\\rc\\u{1b}[2J");
        assert_eq!(printable("x\u{202e}y\tz"), "x\\u{202e}y\\tz");
        assert_eq!(printable("é ü 名前"), "é ü 名前");
    }
}
