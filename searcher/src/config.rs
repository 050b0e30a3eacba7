//! Configuration: command-line flags, `SHOPLENS_*` environment variables and an optional
//! TOML file, in that order of precedence, over built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::Deserialize;

use crate::upload::UploadLimits;

/// Flags (each with its environment variable). Defaults live in [`Config::default`], so
/// that a value from the file is not mistaken for a user's flag.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Store directory written by `indexer build`.
    #[arg(long, env = "SHOPLENS_DB")]
    pub db: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "SHOPLENS_BIND")]
    pub bind: Option<SocketAddr>,
    /// TOML file with any of these settings (flags and environment win).
    #[arg(long, env = "SHOPLENS_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP worker threads [default: 2] (they never run models).
    #[arg(long, env = "SHOPLENS_WORKERS")]
    pub workers: Option<usize>,
    /// Threads running searches [default: the CPU cores].
    #[arg(long, env = "SHOPLENS_SEARCH_THREADS")]
    pub search_threads: Option<usize>,
    /// Searches waiting for a thread before the server answers 503 [default: 8 per thread].
    #[arg(long, env = "SHOPLENS_QUEUE")]
    pub queue: Option<usize>,
    /// Largest upload in bytes [default: 20 MiB].
    #[arg(long, env = "SHOPLENS_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Seconds an upload may take from its first byte to its last [default: 30].
    #[arg(long, env = "SHOPLENS_BODY_TIMEOUT_SECONDS")]
    pub body_timeout_seconds: Option<f64>,
    /// Longest silence in seconds between two chunks of an upload [default: 10].
    #[arg(long, env = "SHOPLENS_BODY_IDLE_SECONDS")]
    pub body_idle_seconds: Option<f64>,
    /// Bytes that all uploads in flight may hold together; over it, 503 [default: 256 MiB].
    #[arg(long, env = "SHOPLENS_UPLOAD_MEMORY_BYTES")]
    pub upload_memory_bytes: Option<usize>,
    /// Open connections per HTTP worker; more wait to be accepted [default: 1024].
    #[arg(long, env = "SHOPLENS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Largest photo in pixels (decompression bombs) [default: 40 million].
    #[arg(long, env = "SHOPLENS_MAX_PIXELS")]
    pub max_pixels: Option<u64>,
    /// Detector weights [default: models/detector-lite0.safetensors].
    #[arg(long, env = "SHOPLENS_DETECTOR")]
    pub detector: Option<PathBuf>,
    /// Embedder weights [default: models/embedder-lite0.safetensors].
    #[arg(long, env = "SHOPLENS_EMBEDDER")]
    pub embedder: Option<PathBuf>,
    /// Seconds between checks for a newly published generation [default: 2].
    #[arg(long, env = "SHOPLENS_RELOAD_SECONDS")]
    pub reload_seconds: Option<f64>,
}

/// The settled configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub db: PathBuf,
    pub bind: SocketAddr,
    pub workers: usize,
    pub search_threads: usize,
    pub queue: usize,
    pub max_body_bytes: usize,
    pub body_timeout_seconds: f64,
    pub body_idle_seconds: f64,
    pub upload_memory_bytes: usize,
    pub max_connections: usize,
    pub max_pixels: u64,
    pub detector: PathBuf,
    pub embedder: PathBuf,
    pub reload_seconds: f64,
}

impl Default for Config {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            db: PathBuf::from("shoplens-db"),
            bind: "127.0.0.1:8080".parse().expect("valid address"),
            workers: 2,
            search_threads: cores,
            queue: 8 * cores,
            max_body_bytes: 20 << 20,
            body_timeout_seconds: 30.0,
            body_idle_seconds: 10.0,
            upload_memory_bytes: 256 << 20,
            max_connections: 1024,
            max_pixels: 40_000_000,
            detector: PathBuf::from("models/detector-lite0.safetensors"),
            embedder: PathBuf::from("models/embedder-lite0.safetensors"),
            reload_seconds: 2.0,
        }
    }
}

impl Config {
    pub fn upload_limits(&self) -> UploadLimits {
        UploadLimits { max_bytes: self.max_body_bytes, deadline: Duration::from_secs_f64(self.body_timeout_seconds), idle: Duration::from_secs_f64(self.body_idle_seconds) }
    }

    /// Defaults, then the file, then environment and flags (clap merges those two).
    pub fn resolve(args: &ServeArgs, matches: Option<&ArgMatches>) -> Result<Self> {
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        // A value counts when clap got it from the command line or the environment.
        let given = |id: &str| matches.is_none_or(|m| matches!(m.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)));
        macro_rules! take {
            ($field:ident) => {
                if let Some(v) = &args.$field {
                    if given(stringify!($field)) {
                        config.$field = v.clone();
                    }
                }
            };
        }
        take!(db);
        take!(bind);
        take!(workers);
        take!(search_threads);
        take!(queue);
        take!(max_body_bytes);
        take!(body_timeout_seconds);
        take!(body_idle_seconds);
        take!(upload_memory_bytes);
        take!(max_connections);
        take!(max_pixels);
        take!(detector);
        take!(embedder);
        take!(reload_seconds);
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: not a valid searcher configuration", path.display()))
    }

    fn validate(&self) -> Result<()> {
        if self.workers == 0 || self.search_threads == 0 {
            bail!("workers and search_threads must be at least 1");
        }
        if self.max_body_bytes < 1024 {
            bail!("max_body_bytes {} is too small for any photo", self.max_body_bytes);
        }
        for (name, seconds) in [("reload_seconds", self.reload_seconds), ("body_timeout_seconds", self.body_timeout_seconds), ("body_idle_seconds", self.body_idle_seconds)] {
            if !(seconds.is_finite() && seconds > 0.0 && seconds < 1e6) {
                bail!("{name} must be a positive number of seconds, got {seconds}");
            }
        }
        if self.upload_memory_bytes < self.max_body_bytes {
            bail!("upload_memory_bytes {} must hold at least one upload of max_body_bytes {}", self.upload_memory_bytes, self.max_body_bytes);
        }
        if self.max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn resolve(argv: &[&str]) -> Result<Config> {
        let matches = Cli::command().try_get_matches_from(argv)?;
        let cli = Cli::from_arg_matches(&matches)?;
        Config::resolve(&cli.serve, Some(&matches))
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("searcher.toml");
        std::fs::write(&file, "db = \"/srv/db\"\nbind = \"0.0.0.0:9000\"\nqueue = 3\n").unwrap();
        let f = file.to_str().unwrap();
        let c = resolve(&["searcher", "--config", f, "--queue", "5"]).unwrap();
        assert_eq!(c.db, PathBuf::from("/srv/db"));
        assert_eq!(c.bind.to_string(), "0.0.0.0:9000");
        assert_eq!(c.queue, 5);
        assert_eq!(c.max_body_bytes, 20 << 20);
        assert_eq!(resolve(&["searcher"]).unwrap().bind.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "colour = 3\n").unwrap();
        let err = resolve(&["searcher", "--config", file.to_str().unwrap()]).unwrap_err();
        assert!(format!("{err:#}").contains("colour"), "{err:#}");
        assert!(resolve(&["searcher", "--workers", "0"]).is_err());
        assert!(resolve(&["searcher", "--body-timeout-seconds", "0"]).is_err());
        assert!(resolve(&["searcher", "--upload-memory-bytes", "1000000", "--max-body-bytes", "2000000"]).is_err());
    }
}
