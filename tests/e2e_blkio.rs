// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End to end: the real daemon binary on a real socket, driven by libblkio's
//! virtio-blk-vhost-user driver.

mod common;

use std::os::unix::fs::FileExt;

use common::{pattern, Client, Daemon, TestDir, QUEUE_BUFFER};

const IMAGE_SIZE: u64 = 64 << 20;

fn start(dir: &TestDir, extra: &[&str]) -> Daemon {
    let image = dir.create_image(IMAGE_SIZE);
    let mut args = vec!["--backing", image.to_str().unwrap()];
    args.extend_from_slice(extra);
    Daemon::start(&dir.socket(), &args)
}

#[test]
fn reports_capacity_block_size_and_queues() {
    let dir = TestDir::new();
    let daemon = start(&dir, &["--queues", "3"]);
    let client = Client::connect(daemon.socket(), 1, false).expect("connect");
    assert_eq!(client.capacity(), IMAGE_SIZE);
    assert_eq!(client.get_i32("request-alignment"), 512);
    assert_eq!(client.get_i32("max-queues"), 3);
}

#[test]
fn patterned_writes_read_back_on_every_queue_at_once() {
    let dir = TestDir::new();
    let daemon = start(&dir, &["--queues", "4"]);
    let mut client = Client::connect(daemon.socket(), 4, false).expect("connect");
    assert_eq!(client.queues.len(), 4);
    let area = IMAGE_SIZE / 4;
    std::thread::scope(|s| {
        for (q, queue) in client.queues.iter_mut().enumerate() {
            s.spawn(move || {
                let base = q as u64 * area;
                let mut offset = base;
                for (i, len) in [512usize, 4096, 65536, 4096 * 3 + 512, QUEUE_BUFFER]
                    .into_iter()
                    .enumerate()
                {
                    let data = pattern((q * 100 + i) as u64, len);
                    queue.write(offset, &data).expect("write");
                    assert_eq!(
                        queue.read(offset, len).expect("read"),
                        data,
                        "queue {q} write {i}"
                    );
                    offset += len as u64;
                }
            });
        }
    });
    // Every queue's data is visible from another queue.
    for q in 0..4u64 {
        let got = client.queues[((q + 1) % 4) as usize]
            .read(q * area, 512)
            .expect("cross-queue read");
        assert_eq!(got, pattern(q * 100, 512));
    }
}

#[test]
fn without_cache_flush_puts_data_on_the_image() {
    let dir = TestDir::new();
    let daemon = start(&dir, &["--cache", "none"]);
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    let data = pattern(7, 8192);
    client.queues[0].write(1 << 20, &data).expect("write");
    client.queues[0].flush().expect("flush");
    let mut on_disk = vec![0u8; data.len()];
    std::fs::File::open(dir.image())
        .unwrap()
        .read_exact_at(&mut on_disk, 1 << 20)
        .unwrap();
    assert_eq!(on_disk, data);
}

#[test]
fn write_zeroes_and_discard() {
    let dir = TestDir::new();
    let daemon = start(&dir, &[]);
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    let q = &mut client.queues[0];
    for (i, may_unmap) in [false, true].into_iter().enumerate() {
        let offset = (i as u64 + 1) << 20;
        q.write(offset, &pattern(i as u64 + 1, 65536))
            .expect("write");
        q.write_zeroes(offset + 4096, 32768, may_unmap)
            .expect("write zeroes");
        let got = q.read(offset, 65536).expect("read");
        assert!(
            got[4096..4096 + 32768].iter().all(|&b| b == 0),
            "not zeroed"
        );
        assert_eq!(&got[..4096], &pattern(i as u64 + 1, 65536)[..4096]);
        assert_eq!(&got[36864..], &pattern(i as u64 + 1, 65536)[36864..]);
    }
    q.write(8 << 20, &pattern(9, 65536)).expect("write");
    q.discard(8 << 20, 65536).expect("discard");
    // Discarded data may read as anything, but the rest of the disk is untouched.
    assert_eq!(q.read(1 << 20, 4096).expect("read"), pattern(1, 4096));
}

#[test]
fn read_only_device_refuses_writes() {
    let dir = TestDir::new();
    let image = dir.create_image(IMAGE_SIZE);
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all_at(&pattern(3, 4096), 0)
        .unwrap();
    let daemon = Daemon::start(
        &dir.socket(),
        &["--backing", image.to_str().unwrap(), "--read-only"],
    );
    let mut client = Client::connect(daemon.socket(), 1, true).expect("connect read-only");
    let q = &mut client.queues[0];
    assert_eq!(q.read(0, 4096).expect("read"), pattern(3, 4096));
    assert!(q.write(0, &pattern(4, 4096)).is_err(), "write accepted");
    assert!(
        q.write_zeroes(0, 4096, false).is_err(),
        "write zeroes accepted"
    );
    assert_eq!(q.read(0, 4096).expect("read"), pattern(3, 4096));
}

#[test]
fn out_of_range_requests_fail() {
    let dir = TestDir::new();
    let daemon = start(&dir, &[]);
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    let q = &mut client.queues[0];
    assert!(q.read(IMAGE_SIZE, 512).is_err());
    assert!(q.read(IMAGE_SIZE - 512, 1024).is_err());
    assert!(q.write(IMAGE_SIZE - 512, &[1u8; 1024]).is_err());
    // The device still works afterwards.
    q.write(IMAGE_SIZE - 512, &[1u8; 512])
        .expect("last sector write");
    assert_eq!(q.read(IMAGE_SIZE - 512, 512).expect("read"), vec![1u8; 512]);
}

#[test]
fn second_connection_sees_the_first_ones_data() {
    let dir = TestDir::new();
    let daemon = start(&dir, &[]);
    let data = pattern(11, 65536);
    {
        let mut first = Client::connect(daemon.socket(), 2, false).expect("first connect");
        first.queues[1].write(3 << 20, &data).expect("write");
    }
    let mut second = Client::connect(daemon.socket(), 4, false).expect("second connect");
    assert_eq!(second.queues[3].read(3 << 20, 65536).expect("read"), data);
}

#[test]
fn flushed_writes_survive_sigkill_and_restart_with_the_cache() {
    let dir = TestDir::new();
    let daemon = start(&dir, &[]);
    let data = pattern(31, 3 * 65536);
    let mut client = Client::connect(daemon.socket(), 2, false).expect("connect");
    client.queues[0]
        .write(7 << 20, &data[..65536])
        .expect("write");
    client.queues[1]
        .write((7 << 20) + 65536, &data[65536..])
        .expect("write");
    client.queues[1].flush().expect("flush");
    let status = daemon.stop_with(libc::SIGKILL);
    assert!(!status.success());
    drop(client);
    assert!(
        dir.image().with_extension("img.pcache").exists(),
        "the default cache sits beside the image"
    );
    let daemon = Daemon::start(&dir.socket(), &["--backing", dir.image().to_str().unwrap()]);
    let mut client = Client::connect(daemon.socket(), 1, false).expect("reconnect");
    let mut got = Vec::new();
    for part in 0..3u64 {
        got.extend(
            client.queues[0]
                .read((7 << 20) + part * 65536, 65536)
                .expect("read"),
        );
    }
    assert!(got == data, "flushed data lost across SIGKILL and restart");
}

#[test]
fn pmem_persistence_path_survives_sigkill() {
    // No DAX device here: the emulation runs the cache-line write-back code on a file.
    std::env::set_var("VHOST_USER_PCACHE_EMULATE_PMEM", "1");
    let dir = TestDir::new();
    let daemon = start(&dir, &["--persistence", "pmem", "--data-crc"]);
    let data = pattern(51, 131072);
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    client.queues[0]
        .write(11 << 20, &data[..65536])
        .expect("write");
    client.queues[0]
        .write((11 << 20) + 65536, &data[65536..])
        .expect("write");
    client.queues[0].flush().expect("flush");
    daemon.stop_with(libc::SIGKILL);
    drop(client);
    let image = dir.image();
    let args = [
        "--backing",
        image.to_str().unwrap(),
        "--persistence",
        "pmem",
    ];
    let daemon = Daemon::start(&dir.socket(), &args);
    let mut client = Client::connect(daemon.socket(), 1, false).expect("reconnect");
    let mut got = client.queues[0].read(11 << 20, 65536).expect("read");
    got.extend(
        client.queues[0]
            .read((11 << 20) + 65536, 65536)
            .expect("read"),
    );
    assert!(got == data, "flushed data lost across SIGKILL in pmem mode");
}

#[test]
fn pmem_persistence_on_a_file_without_dax_is_refused_with_one_clear_message() {
    let dir = TestDir::new();
    let image = dir.create_image(IMAGE_SIZE);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-user-pcache"))
        .arg("serve")
        .arg("--socket")
        .arg(dir.socket())
        .arg("--backing")
        .arg(&image)
        .args(["--persistence", "pmem"])
        // Another test of this binary sets it for the whole process.
        .env_remove("VHOST_USER_PCACHE_EMULATE_PMEM")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run vhost-user-pcache serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "pmem on a plain file was accepted:\n{stderr}"
    );
    let reason = "not on a DAX filesystem (MAP_SYNC refused); use msync";
    assert_eq!(
        stderr.matches(reason).count(),
        1,
        "the reason should be given once:\n{stderr}"
    );
}

#[test]
fn cache_serves_what_the_image_already_holds() {
    let dir = TestDir::new();
    let image = dir.create_image(IMAGE_SIZE);
    let data = pattern(41, 65536);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all_at(&data, 9 << 20)
        .unwrap();
    let daemon = Daemon::start(&dir.socket(), &["--backing", image.to_str().unwrap()]);
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    // A miss, then the same range again, now from the cache.
    assert_eq!(client.queues[0].read(9 << 20, 65536).expect("read"), data);
    assert_eq!(client.queues[0].read(9 << 20, 65536).expect("read"), data);
}

#[test]
fn sigterm_with_drain_on_exit_leaves_the_data_on_the_image() {
    let dir = TestDir::new();
    let daemon = start(&dir, &["--drain-on-exit"]);
    let data = pattern(21, 4096);
    let client = {
        let mut c = Client::connect(daemon.socket(), 1, false).expect("connect");
        c.queues[0].write(5 << 20, &data).expect("write");
        c
    };
    let status = daemon.terminate();
    assert!(status.success(), "daemon exit status {status}");
    drop(client);
    let mut on_disk = vec![0u8; data.len()];
    std::fs::File::open(dir.image())
        .unwrap()
        .read_exact_at(&mut on_disk, 5 << 20)
        .unwrap();
    assert_eq!(on_disk, data);
}

#[test]
fn sigterm_exits_zero_when_idle() {
    let dir = TestDir::new();
    let daemon = start(&dir, &[]);
    let status = daemon.terminate();
    assert!(status.success(), "daemon exit status {status}");
}
