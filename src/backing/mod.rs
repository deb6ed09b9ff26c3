// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backing image: the only code that does I/O on it.
//!
//! [`BackingImage`] opens a raw image file or a block device (O_DIRECT by default, buffered as a
//! fallback); tests also get synchronous helpers on it. [`BackingQueue`] is one thread's
//! asynchronous path to it: an io_uring whose completions ring an eventfd. Requests whose offset, length or
//! memory do not meet [`BackingImage::alignment`] go through aligned bounce buffers; those whose
//! offset or length is unaligned become read-modify-write cycles, serialised per block.

#[cfg(test)]
mod blockdev_tests;
mod bounce;
mod error;
pub mod identity;
mod image;
#[cfg(test)]
mod image_tests;
mod job;
mod queue;
#[cfg(test)]
mod queue_tests;
mod rmw;
#[cfg(any(test, feature = "test-util"))]
mod sync_io;
mod sys;
#[cfg(test)]
pub(crate) mod testutil;

pub use error::BackingError;
pub use image::{BackingIdentity, BackingImage, BackingOptions};
pub use queue::{BackingQueue, WORKER_SUBMIT_GROUP};
