// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user-pcache: the command line. Each subcommand lives in `cli/`; this file only
//! parses and dispatches.

mod cli;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
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
    /// Ask a running daemon (started with --control-socket) for its status, statistics or
    /// metrics, change gc_percent, flush, drain or undrain it.
    Ctl(cli::ctl::CtlArgs),
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
    /// Bind a cache to its backing image after the image's identity changed (copied to new
    /// storage, re-created): offline; changes nothing but the recorded identity.
    Rebind(cli::rebind::RebindArgs),
    /// Print the manual page (roff) generated from this command line.
    #[command(hide = true)]
    Man,
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
        Command::Rebind(args) => done(cli::rebind::run(args)),
        Command::Ctl(args) => done(cli::ctl::run(args)),
        Command::Man => done(cli::man::run(Cli::command())),
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

    fn serve_args(argv: &[&str]) -> cli::serve::ServeArgs {
        let cli = Cli::parse_from(["vhost-user-pcache", "serve"].iter().chain(argv));
        let Command::Serve(args) = cli.command else {
            panic!("serve parsed as another command");
        };
        args
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vm.toml");
        std::fs::write(
            &file,
            "socket = \"/run/file.sock\"\nqueues = 2\nqueue-size = 256\ngc-percent = 40\n\
             serial = \"from-file\"\ncontrol-socket = \"/run/file.ctl\"\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let args = serve_args(&["--config", file, "--gc-percent", "50", "--serial", "flag"])
            .with_config_file()
            .expect("valid config");
        let config = ServeConfig::from(&args);
        assert_eq!(config.socket, PathBuf::from("/run/file.sock"));
        assert_eq!(config.num_queues, 2);
        assert_eq!(config.max_queue_size, 256);
        assert_eq!(config.serial, "flag");
        assert_eq!(args.gc_percent(), Some(50));
        assert_eq!(
            args.control_socket(),
            Some(std::path::Path::new("/run/file.ctl"))
        );

        let args = serve_args(&[
            "--config",
            file,
            "--socket",
            "/run/flag.sock",
            "--queues",
            "3",
        ])
        .with_config_file()
        .unwrap();
        let config = ServeConfig::from(&args);
        assert_eq!(config.socket, PathBuf::from("/run/flag.sock"));
        assert_eq!(config.num_queues, 3);
        assert_eq!(args.gc_percent(), Some(40));
    }

    #[test]
    fn config_file_errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "queues = 2\ncache-sise = \"1G\"\n").unwrap();
        let e = serve_args(&["--config", file.to_str().unwrap()])
            .with_config_file()
            .expect_err("unknown key accepted");
        let e = format!("{e:#}");
        assert!(e.contains("bad.toml") && e.contains("`cache-sise`"), "{e}");
        let missing = serve_args(&["--config", "/nonexistent/x.toml"]).with_config_file();
        assert!(format!("{:#}", missing.expect_err("missing file")).contains("x.toml"));
    }
}
