//! Configuration: embedded defaults, then a TOML file, then `BALLAST_*` environment
//! variables, then command-line flags (each beats the one before).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The server's settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory.
    pub data: PathBuf,
    /// Seconds a client may take to send a request's headers.
    pub header_timeout_secs: u64,
    /// Seconds a request body may stall without a byte arriving.
    pub body_idle_timeout_secs: u64,
    /// Seconds an upload session may stay unfinished before it is removed.
    pub upload_max_age_secs: u64,
    /// Seconds in-flight requests get to finish at shutdown.
    pub shutdown_grace_secs: u64,
    /// Largest manifest accepted, in bytes.
    pub manifest_bytes_max: usize,
    /// Segment size of the storage engine, in bytes.
    pub segment_bytes_max: u64,
    /// Seconds between scheduled garbage collections (0: never on a schedule).
    pub gc_interval_secs: u64,
    /// Blob links, manifests and segments younger than this are never collected.
    pub gc_grace_secs: u64,
    /// Scheduled collections also remove manifests that no tag reaches.
    pub gc_delete_untagged: bool,
    /// Log filter (tracing `EnvFilter` syntax).
    pub log: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            data: PathBuf::from("./ballast-data"),
            header_timeout_secs: 30,
            body_idle_timeout_secs: 60,
            upload_max_age_secs: 24 * 3600,
            shutdown_grace_secs: 30,
            manifest_bytes_max: 4 << 20,
            segment_bytes_max: 64 << 20,
            gc_interval_secs: 3600,
            gc_grace_secs: 3600,
            gc_delete_untagged: false,
            log: "info".into(),
        }
    }
}

/// The names of the settings, as in the config file.
pub const SETTINGS: &[&str] = &[
    "listen",
    "data",
    "header_timeout_secs",
    "body_idle_timeout_secs",
    "upload_max_age_secs",
    "shutdown_grace_secs",
    "manifest_bytes_max",
    "segment_bytes_max",
    "gc_interval_secs",
    "gc_grace_secs",
    "gc_delete_untagged",
    "log",
];

impl Config {
    /// Timeout for request headers.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }
    /// Idle timeout for request bodies.
    pub fn body_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.body_idle_timeout_secs)
    }

    /// Builds the effective config: defaults, then `file`, then the environment.
    pub fn load(
        file: Option<&Path>,
        env: impl Iterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => Config::default(),
        };
        for (key, value) in env {
            let Some(name) = key.strip_prefix("BALLAST_") else {
                continue;
            };
            let name = name.to_ascii_lowercase();
            if !SETTINGS.contains(&name.as_str()) {
                // Other tools share the prefix (BALLAST_BENCH_*); a typo still gets a word.
                eprintln!("warning: ignoring environment variable {key}: not a server setting");
                continue;
            }
            config
                .set(&name, &value)
                .with_context(|| format!("environment variable {key}"))?;
        }
        Ok(config)
    }

    /// Sets one field by its config name.
    pub fn set(&mut self, name: &str, value: &str) -> anyhow::Result<()> {
        fn num<T: std::str::FromStr>(v: &str) -> anyhow::Result<T>
        where
            T::Err: std::fmt::Display,
        {
            v.parse()
                .map_err(|e| anyhow::anyhow!("{v:?} is not a valid number: {e}"))
        }
        match name {
            "listen" => {
                self.listen = value
                    .parse()
                    .with_context(|| format!("{value:?} is not an address like 127.0.0.1:5000"))?
            }
            "data" => self.data = PathBuf::from(value),
            "header_timeout_secs" => self.header_timeout_secs = num(value)?,
            "body_idle_timeout_secs" => self.body_idle_timeout_secs = num(value)?,
            "upload_max_age_secs" => self.upload_max_age_secs = num(value)?,
            "shutdown_grace_secs" => self.shutdown_grace_secs = num(value)?,
            "manifest_bytes_max" => self.manifest_bytes_max = num(value)?,
            "segment_bytes_max" => self.segment_bytes_max = num(value)?,
            "gc_interval_secs" => self.gc_interval_secs = num(value)?,
            "gc_grace_secs" => self.gc_grace_secs = num(value)?,
            "gc_delete_untagged" => {
                self.gc_delete_untagged = value
                    .parse()
                    .with_context(|| format!("{value:?} is not true or false"))?
            }
            "log" => self.log = value.to_owned(),
            other => bail!("unknown setting {other:?}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_beat_each_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:6000\"\ndata = \"/from/file\"\n",
        )
        .expect("write");
        let env = vec![
            ("BALLAST_DATA".to_owned(), "/from/env".to_owned()),
            ("HOME".to_owned(), "x".to_owned()),
        ];
        let c = Config::load(Some(&file), env.into_iter()).expect("load");
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.data, PathBuf::from("/from/env"));
        // Unknown BALLAST_* variables are ignored with a warning; bad values are errors.
        assert!(Config::load(
            None,
            vec![("BALLAST_BENCH_MB".into(), "1".into())].into_iter()
        )
        .is_ok());
        assert!(Config::load(
            None,
            vec![("BALLAST_LISTEN".into(), "nope".into())].into_iter()
        )
        .is_err());
        std::fs::write(&file, "bogus = 1\n").expect("write");
        assert!(Config::load(Some(&file), std::iter::empty()).is_err());
    }
}
