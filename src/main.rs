//! vhost-user-pcache: the command line. Each subcommand lives in `cli/`; this file only
//! parses and dispatches.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use log::error;

#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a block device to one vhost-user-blk frontend (QEMU, Cloud Hypervisor, libblkio)
    /// at a time, until SIGINT or SIGTERM.
    Serve(cli::serve::ServeArgs),
    /// Format a cache media for a backing image (offline; refuses to overwrite a cache
    /// without --force).
    Format(cli::format::FormatArgs),
    /// Show what a cache holds: options, tails, segment map, log summary, dirty bytes
    /// (offline, read-only).
    Inspect(cli::inspect::InspectArgs),
    /// Verify a cache: every metadata replica, the key log, every key, and cached data CRCs
    /// (offline, read-only). Exit status 0 clean, 1 repairable, 2 corrupt, 3 could not check.
    Check(cli::check::CheckArgs),
    /// Write all dirty data of a cache back to its backing image (offline), so the cache can
    /// be retired.
    Drain(cli::drain::DrainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its life; the tools print reports and only log problems.
    let level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = match &cli.command {
        Command::Serve(args) => done(cli::serve::run(args)),
        Command::Format(args) => done(cli::format::run(args)),
        Command::Inspect(args) => cli::inspect::run(args),
        Command::Check(args) => return cli::check::run(args),
        Command::Drain(args) => done(cli::drain::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cli::serve::{DEFAULT_BACKING, DEFAULT_BACKING_SIZE};
    use std::path::PathBuf;
    use vhost_user_pcache::serve::ServeConfig;

    #[test]
    fn serial_defaults_to_the_image_file_name() {
        let cli = Cli::parse_from([
            "vhost-user-pcache",
            "serve",
            "--socket",
            "/run/x.sock",
            "--backing",
            "/images/vm1-disk.img",
        ]);
        let Command::Serve(args) = &cli.command else {
            panic!("parsed as another subcommand")
        };
        let config = ServeConfig::from(args);
        assert_eq!(config.serial, "vm1-disk.img");
        assert_eq!(config.num_queues, 4);
        assert_eq!(config.max_queue_size, 1024);
        assert_eq!(args.create_size(), None);
    }

    #[test]
    fn default_backing_may_be_created() {
        let cli = Cli::parse_from(["vhost-user-pcache", "serve", "--socket", "s"]);
        let Command::Serve(args) = &cli.command else {
            panic!("parsed as another subcommand")
        };
        assert_eq!(args.backing_path(), PathBuf::from(DEFAULT_BACKING));
        assert_eq!(args.create_size(), Some(DEFAULT_BACKING_SIZE));
        assert_eq!(ServeConfig::from(args).serial, DEFAULT_BACKING);
    }
}
