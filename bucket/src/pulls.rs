//! Pulls served by read replicas, counted where retention reads them: on the primary. A
//! replica never writes its primary's objects; it puts reports of its own
//! (`pulls/<replica>-<millis:020>.json`, docs/format.md) every `pull_flush_secs`, and the
//! primary takes them in: it reads every report, commits the counts to its catalog in one
//! batch (`Op::Pulled`, as its own pulls), and then deletes the reports. A primary killed
//! between the commit and the deletes counts those pulls again at its next pass (counts
//! are at least once; last-pull times are exact).

use anyhow::Context;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::client::Bucket;

/// Where reports lie under the prefix.
pub const PREFIX: &str = "pulls/";

/// The version of the report this build writes and reads.
pub const FORMAT: u32 = 1;

/// Pulls of one manifest in one repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pull {
    /// The repository.
    pub repo: String,
    /// The manifest's digest (`sha256:<hex>`).
    pub digest: String,
    /// Pulls counted.
    pub count: u64,
    /// The last one (Unix seconds).
    pub at: u64,
}

/// One report (`pulls/<replica>-<millis>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// [`FORMAT`].
    pub format: u32,
    /// The replica's identity (as its `DIR/bucket/owner` holds it).
    pub replica: String,
    /// What it counted since its last report.
    pub pulls: Vec<Pull>,
}

/// The object name of a report from `replica` put at `millis` (Unix milliseconds): only
/// letters, digits, `-`, `_` and `.` of the identity are kept.
pub fn report_name(replica: &str, millis: u64) -> String {
    let safe: String = replica
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{PREFIX}{safe}-{millis:020}.json")
}

/// True when `name` is a report's object name.
pub fn is_report(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|n| n.strip_suffix(".json"))
        .is_some_and(|n| !n.is_empty() && !n.contains('/'))
}

/// Puts a report of `pulls` from `replica` (nothing when there are none).
pub async fn send(bucket: &Bucket, replica: &str, pulls: Vec<Pull>) -> anyhow::Result<()> {
    if pulls.is_empty() {
        return Ok(());
    }
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let report = Report {
        format: FORMAT,
        replica: replica.to_owned(),
        pulls,
    };
    let body = serde_json::to_vec(&report).context("encoding a pull report")?;
    bucket
        .put(&report_name(replica, millis), Bytes::from(body))
        .await
}

/// Every report in the bucket: their names (to delete once taken in) and their pulls. A
/// report that cannot be read as one is named in the second list and left alone.
pub async fn gather(bucket: &Bucket) -> anyhow::Result<(Vec<String>, Vec<Pull>, Vec<String>)> {
    let (mut names, mut pulls, mut bad) = (Vec::new(), Vec::new(), Vec::new());
    for (name, _) in bucket.list(PREFIX).await? {
        if !is_report(&name) {
            continue;
        }
        // (One another primary's pass took in since the listing is skipped.)
        let Some(bytes) = bucket.get(&name).await? else {
            continue;
        };
        match serde_json::from_slice::<Report>(&bytes) {
            Ok(r) if r.format == FORMAT => {
                pulls.extend(r.pulls);
                names.push(name);
            }
            _ => bad.push(name),
        }
    }
    Ok((names, pulls, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_are_safe_and_recognised() {
        let n = report_name("host-1:0000beef", 1_796_275_580_123);
        assert_eq!(n, "pulls/host-1_0000beef-00000001796275580123.json");
        assert!(is_report(&n));
        assert!(!is_report("pulls/a/b.json"));
        assert!(!is_report("pulls/.json"));
        assert!(!is_report("segments/00000000000000000001.seg"));
        let odd = report_name("../x y", 1);
        assert!(odd.starts_with("pulls/.._x_y-") && is_report(&odd), "{odd}");
    }
}
