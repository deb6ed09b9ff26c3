//! The command line's subcommands, one file each.

pub mod config;
pub mod ctl;
pub mod serve;
pub mod size;
