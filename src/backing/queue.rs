//! Asynchronous io_uring path to a backing image (in progress).

pub struct BackingQueue;
