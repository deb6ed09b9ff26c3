// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors opening or creating a backing image. Per-request I/O errors are plain `io::Error`s.

use std::io;
use std::path::PathBuf;

#[derive(thiserror::Error, Debug)]
pub enum BackingError {
    #[error("cannot open backing image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create backing image {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing to create backing image {}: it already exists", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("backing image {} is neither a regular file nor a block device", path.display())]
    NotFileOrBlockDevice { path: PathBuf },
    #[error(
        "backing image {} is {size} bytes; its size must be a positive multiple of 512",
        path.display()
    )]
    BadSize { path: PathBuf, size: u64 },
    #[error("cannot query {what} of backing image {}", path.display())]
    Query {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up an io_uring for backing image {}", path.display())]
    Ring {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
