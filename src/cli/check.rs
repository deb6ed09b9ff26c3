// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `check`: verify a cache offline and grade what is wrong with it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::offline;
use vhost_user_pcache::cache::check::{self, CheckReport, Severity};

/// Exit status when the cache could not be checked at all.
const CANNOT_CHECK: u8 = 3;

#[derive(Args, Debug)]
#[command(after_long_help = "\
Exit status:
  0  clean: nothing wrong
  1  repairable: damage the daemon works around and repairs by itself, e.g. one replica of a
     metadata record is bad (the next update of that record rewrites it), or a clean cached
     extent fails its CRC (the backing image holds the data)
  2  corrupt: data or metadata is lost or unusable: no valid replica of a record (e.g. both
     key_tail copies), an inconsistent key log, a dirty extent failing its CRC, a damaged
     superblock
  3  could not check: I/O error, lock held by a running daemon, not a cache, or the cache
     belongs to another backing image than the one given")]
pub struct CheckArgs {
    /// Cache media
    #[arg(long, value_name = "PATH")]
    cache: PathBuf,

    /// Backing image, to check that the cache belongs to it
    #[arg(long, value_name = "IMAGE")]
    backing: Option<PathBuf>,

    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

/// Runs the check and turns every outcome into the documented exit status.
pub fn run(args: &CheckArgs) -> ExitCode {
    match check(args) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        log::error!("encoding the report: {e}");
                        return ExitCode::from(CANNOT_CHECK);
                    }
                }
            } else {
                print!("{}", render(args, &report));
            }
            ExitCode::from(report.verdict.exit_code())
        }
        Err(e) => {
            log::error!("cannot check cache {}: {e:#}", args.cache.display());
            ExitCode::from(CANNOT_CHECK)
        }
    }
}

fn check(args: &CheckArgs) -> Result<CheckReport> {
    let _locks = offline::lock(&args.cache, args.backing.as_deref(), false)?;
    let found = offline::image_backing_id(args.backing.as_deref())?;
    let media = offline::open_cache(&args.cache)?;
    Ok(check::check(&*media, found.as_ref())?)
}

fn render(args: &CheckArgs, r: &CheckReport) -> String {
    let mut out = String::new();
    for f in &r.findings {
        let tag = match f.severity {
            Severity::Repairable => "repairable",
            Severity::Corrupt => "CORRUPT",
        };
        out.push_str(&format!("{tag}: {}\n", f.message));
    }
    out.push_str(&format!(
        "{}: {}: {} metadata records, {} ksets, {} keys, {} cached extents CRC-verified\n",
        args.cache.display(),
        format!("{:?}", r.verdict).to_lowercase(),
        r.records_checked,
        r.ksets,
        r.keys,
        r.extents_verified
    ));
    out
}
