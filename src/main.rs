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
    /// Print the manual page (roff) generated from this command line.
    #[command(hide = true)]
    Man,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve(args) => cli::serve::run(args),
        Command::Man => cli::man::run(Cli::command()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
            panic!("not serve")
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
            panic!("not serve")
        };
        assert_eq!(args.backing_path(), PathBuf::from(DEFAULT_BACKING));
        assert_eq!(args.create_size(), Some(DEFAULT_BACKING_SIZE));
        assert_eq!(ServeConfig::from(args).serial, DEFAULT_BACKING);
    }
}
