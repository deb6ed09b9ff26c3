//! The command line's subcommands, one file each.

pub mod man;
pub mod serve;
pub mod size;
