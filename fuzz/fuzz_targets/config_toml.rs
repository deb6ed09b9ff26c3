// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `serve --config` file parser on arbitrary text: it must accept or refuse with an error,
//! never panic, and what it accepts must hold only values the flags accept.
#![no_main]
// The daemon's CLI modules are compiled in here as they are in the binary, which uses more of
// them than this target does.
#![allow(dead_code, unused_imports)]

#[path = "../../src/cli/config.rs"]
mod config;
#[path = "../../src/cli/serve.rs"]
mod serve;
#[path = "../../src/cli/size.rs"]
mod size;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = config::parse(text) {
        if let Some(p) = c.gc_percent {
            assert!(p <= vhost_user_pcache::cache::format::MAX_GC_PERCENT);
        }
        for p in [&c.socket, &c.backing, &c.control_socket]
            .into_iter()
            .flatten()
        {
            assert!(!p.as_os_str().is_empty(), "an empty path accepted: {c:?}");
        }
    }
});
