//! The command line's subcommands, one file each.

pub mod serve;
pub mod size;
