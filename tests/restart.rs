// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's connection life cycle against the real binary: one frontend at a time, and a
//! stop that finishes the requests in flight.

use std::sync::mpsc;
use std::time::Duration;

mod common;

use common::{pattern, Client, Daemon, TestDir};

const DISK: u64 = 64 << 20;

#[test]
fn a_second_frontend_is_refused_while_one_is_connected() {
    let dir = TestDir::new();
    let image = dir.create_image(DISK);
    let daemon = Daemon::start(
        &dir.socket(),
        &["--backing", image.to_str().unwrap(), "--cache", "none"],
    );
    let mut first = Client::connect(daemon.socket(), 1, false).expect("first frontend connects");
    first.queues[0].write(0, &pattern(1, 4096)).unwrap();

    // The second one must fail, and fail promptly: before the refusal it waited forever for
    // its first reply.
    let socket = daemon.socket().to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let outcome = Client::connect(&socket, 1, false).map(|_| ());
        let _ = tx.send(outcome.map_err(|e| e.to_string()));
    });
    let outcome = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the second frontend got no answer within 20 s");
    assert!(
        outcome.is_err(),
        "a second frontend was accepted while the first was connected"
    );

    // The first connection is unharmed.
    assert_eq!(first.queues[0].read(0, 4096).unwrap(), pattern(1, 4096));
    drop(first);
    // Once it is gone, a new frontend is served.
    let mut next = Client::connect(daemon.socket(), 1, false).expect("next frontend connects");
    assert_eq!(next.queues[0].read(0, 4096).unwrap(), pattern(1, 4096));
    drop(next);
    assert!(daemon.terminate().success());
}
