// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line's subcommands, one file each.

pub mod check;
pub mod config;
pub mod ctl;
pub mod drain;
pub mod format;
pub mod inspect;
pub mod man;
pub mod offline;
pub mod rebind;
pub mod serve;
pub mod size;
