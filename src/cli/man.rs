// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `man` (hidden): the manual page, generated from the command-line definition so it cannot
//! drift from `--help`. The committed copy is `packaging/man/vhost-user-pcache.1`; a test fails
//! when it is out of date.

use std::io::Write;

use anyhow::{Context, Result};
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

/// Writes the page for `cmd` (the whole CLI) to stdout as roff.
pub fn run(cmd: clap::Command) -> Result<()> {
    let page = render(cmd).context("rendering the manual page")?;
    std::io::stdout()
        .lock()
        .write_all(&page)
        .context("writing the manual page")
}

/// One page: the program, then a section per visible subcommand with its synopsis and options
/// (rather than one page per subcommand, so `man vhost-user-pcache` shows everything), then
/// where the packaged files live.
pub fn render(mut cmd: clap::Command) -> std::io::Result<Vec<u8>> {
    cmd.build();
    let man = Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    let subcommands: Vec<_> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .collect();
    let mut list = Roff::default();
    list.control("SH", ["COMMANDS"]);
    for sub in &subcommands {
        list.control("TP", []);
        list.text([bold(sub.get_name())]);
        list.text([roman(
            sub.get_about().map(|a| a.to_string()).unwrap_or_default(),
        )]);
    }
    list.to_writer(&mut page)?;
    for sub in subcommands {
        let mut body = Vec::new();
        let mut heading = Roff::default();
        heading.control("SH", [sub.get_name().to_uppercase().as_str()]);
        heading.to_writer(&mut body)?;
        let man = Man::new(sub.clone());
        let mut section = Vec::new();
        man.render_description_section(&mut section)?;
        man.render_synopsis_section(&mut section)?;
        man.render_options_section(&mut section)?;
        body.extend(demote_sections(&section));
        page.extend(body);
    }
    files_section().to_writer(&mut page)?;
    Ok(without_repeated_preamble(&page))
}

/// The quote-string definition roff writes at the start of every rendered piece is needed
/// once, at the top of the page.
fn without_repeated_preamble(roff: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(roff);
    let mut seen = false;
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        if line.starts_with(".ie \\n(.g .ds Aq") {
            if seen {
                // Skip the `.el` half of the same definition.
                lines.next_if(|l| l.starts_with(".el .ds Aq"));
                continue;
            }
            seen = true;
        }
        out.push_str(line);
    }
    out.into_bytes()
}

/// Turns a subcommand's `.SH` headings into `.SS`, so they nest under its own section.
fn demote_sections(roff: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(roff);
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        match line.strip_prefix(".SH ") {
            Some(title) => {
                out.push_str(".SS ");
                out.push_str(&title_case(title));
            }
            None => out.push_str(line),
        }
    }
    out.into_bytes()
}

fn title_case(heading: &str) -> String {
    let mut chars = heading.chars();
    match chars.next() {
        Some(first) => first.to_string() + &chars.as_str().to_lowercase(),
        None => String::new(),
    }
}

fn files_section() -> Roff {
    let mut roff = Roff::default();
    roff.control("SH", ["FILES"]);
    for (path, what) in [
        (
            "/etc/vhost-user-pcache/NAME.toml",
            "configuration of the disk NAME, read by the vhost-user-pcache@NAME service",
        ),
        (
            "/run/vhost-user-pcache/",
            "where the packaged service puts its vhost-user sockets",
        ),
        (
            "/var/lib/vhost-user-pcache/",
            "the service's state directory, for caches and images the operator puts there",
        ),
        (
            "/usr/share/doc/vhost-user-pcache/examples/example.toml",
            "every configuration key, commented",
        ),
    ] {
        roff.control("TP", []);
        roff.text([bold(path)]);
        roff.text([roman(what)]);
    }
    roff
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn page_documents_every_visible_serve_flag() {
        let page = String::from_utf8(render(crate::Cli::command()).unwrap()).unwrap();
        let serve = crate::Cli::command()
            .find_subcommand("serve")
            .expect("serve subcommand")
            .clone();
        for arg in serve.get_arguments().filter(|a| !a.is_hide_set()) {
            let long = arg.get_long().expect("serve flags are long flags");
            // roff escapes the dashes of option names.
            let escaped = format!("\\-\\-{}", long.replace('-', "\\-"));
            assert!(page.contains(&escaped), "--{long} missing from the page");
        }
        assert!(page.contains(".SH SERVE"));
        assert_eq!(page.matches(".ds Aq").count(), 2, "one .ie/.el preamble");
    }

    #[test]
    fn demotes_only_section_headings() {
        let out = demote_sections(b".SH OPTIONS\n.TP\ntext .SH not a heading\n");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            ".SS Options\n.TP\ntext .SH not a heading\n"
        );
    }
}
