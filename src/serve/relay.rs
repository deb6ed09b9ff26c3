// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user messages between the frontend and the vhost-user-backend daemon pass through
//! here, so the few the daemon crate refuses (GET_INFLIGHT_FD, SET_INFLIGHT_FD) can be answered
//! by this project instead. Every other message, with its file descriptors, is forwarded
//! unchanged in both directions; the frontend waits for each reply, so order is kept.
//!
//! The relay also keeps the frontend's dirty log applied to memory regions mapped after it
//! was set (see [`LogBaseReplay`]).
//!
//! The relay also owns the frontend's connection, which gives the serve loop one place to end
//! it: when the frontend leaves, or after a graceful stop has completed every request.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::log_base::LogBaseReplay;
use crate::poll::poll_readable;

/// The vhost-user header: request, flags, payload size (all little-endian u32).
const HEADER_LEN: usize = 12;
/// Largest payload a vhost-user message may carry (the vhost crate's limit).
const MAX_PAYLOAD: usize = 0x1000;
/// Most file descriptors one message carries (SET_MEM_TABLE: one per region, 8 at most).
const MAX_FDS: usize = 32;

pub(super) const FLAG_VERSION: u32 = 0x1;
pub(super) const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One vhost-user message.
pub struct Message {
    pub request: u32,
    pub flags: u32,
    pub body: Vec<u8>,
    pub files: Vec<File>,
}

impl Message {
    /// Whether the frontend asked for an acknowledgement (REPLY_ACK).
    pub fn needs_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// A reply to `self` carrying `body` and `files`.
    pub fn reply(&self, body: Vec<u8>, files: Vec<File>) -> Message {
        Message {
            request: self.request,
            flags: FLAG_VERSION | FLAG_REPLY,
            body,
            files,
        }
    }

    /// The REPLY_ACK answer: 0 for success, anything else for failure.
    pub fn ack(&self, ok: bool) -> Message {
        self.reply(u64::from(!ok).to_le_bytes().to_vec(), Vec::new())
    }
}

/// Reads one message; `None` when the peer closed the connection between messages.
pub fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points to `header`, which is writable for its whole length.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let files: Vec<File> = fds[..nfds]
        .iter()
        // SAFETY: recvmsg just gave these descriptors to this process; nothing else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut reader = sock;
    reader.read_exact(&mut header[n..])?;
    let word = |i: usize| u32::from_le_bytes(header[i * 4..i * 4 + 4].try_into().unwrap());
    let (request, flags, size) = (word(0), word(1), word(2) as usize);
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message {request} with a {size}-byte payload"),
        ));
    }
    let mut body = vec![0u8; size];
    reader.read_exact(&mut body)?;
    Ok(Some(Message {
        request,
        flags,
        body,
        files,
    }))
}

/// Writes one message with its file descriptors.
pub fn write_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + msg.body.len());
    bytes.extend_from_slice(&msg.request.to_le_bytes());
    bytes.extend_from_slice(&msg.flags.to_le_bytes());
    bytes.extend_from_slice(&(msg.body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&msg.body);
    let fds: Vec<RawFd> = msg.files.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = sock
        .send_with_fds(&[&bytes[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let mut writer = sock;
    writer.write_all(&bytes[sent..])
}

/// What the relay asks of the rest of the daemon.
pub trait Intercept {
    /// Answers a frontend message itself (returning the reply to send, if any), or returns
    /// `Err(msg)` to have it forwarded to the daemon.
    fn intercept(&self, msg: Message) -> Result<Option<Message>, Message>;
}

/// Why the relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The frontend closed its connection (or it broke).
    FrontendLeft,
    /// `stop` became readable.
    Stopped,
}

/// Relays between `frontend` and `daemon` until the frontend leaves or `stop_fd` becomes
/// readable.
pub fn relay(
    frontend: &UnixStream,
    daemon: &UnixStream,
    stop_fd: RawFd,
    intercept: &dyn Intercept,
) -> io::Result<Ended> {
    let mut log_base = LogBaseReplay::default();
    loop {
        match poll_readable(&[stop_fd, frontend.as_raw_fd(), daemon.as_raw_fd()], -1) {
            Some(0) => return Ok(Ended::Stopped),
            Some(1) => {
                let Some(msg) = read_message(frontend)? else {
                    return Ok(Ended::FrontendLeft);
                };
                match intercept.intercept(msg) {
                    Ok(Some(reply)) => write_message(frontend, &reply)?,
                    Ok(None) => {}
                    Err(msg) => {
                        write_message(daemon, &msg)?;
                        if let Some(again) = log_base.after_forwarding(&msg) {
                            write_message(daemon, &again)?;
                        }
                    }
                }
            }
            Some(2) => {
                let Some(msg) = read_message(daemon)? else {
                    // The daemon ended the connection (it refused a message): so does the relay.
                    return Ok(Ended::FrontendLeft);
                };
                if !log_base.swallow(&msg) {
                    write_message(frontend, &msg)?;
                }
            }
            _ => return Ok(Ended::FrontendLeft),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    struct AnswerRequest(u32);

    impl Intercept for AnswerRequest {
        fn intercept(&self, msg: Message) -> Result<Option<Message>, Message> {
            if msg.request == self.0 {
                Ok(Some(msg.reply(vec![7; 3], Vec::new())))
            } else {
                Err(msg)
            }
        }
    }

    #[test]
    fn messages_and_descriptors_pass_both_ways_and_intercepted_ones_are_answered() {
        let (front_peer, front) = UnixStream::pair().unwrap();
        let (daemon, daemon_peer) = UnixStream::pair().unwrap();
        let stop = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        std::thread::scope(|scope| {
            let relayed =
                scope.spawn(|| relay(&front, &daemon, stop.as_raw_fd(), &AnswerRequest(31)));

            let mut file = tempfile::tempfile().unwrap();
            file.write_all(b"region").unwrap();
            let msg = Message {
                request: 5,
                flags: FLAG_VERSION | FLAG_NEED_REPLY,
                body: vec![1, 2, 3, 4],
                files: vec![file],
            };
            write_message(&front_peer, &msg).unwrap();
            let got = read_message(&daemon_peer).unwrap().unwrap();
            assert_eq!(
                (got.request, got.flags, &got.body[..]),
                (5, msg.flags, &[1, 2, 3, 4][..])
            );
            let mut passed = got.files.into_iter().next().expect("the descriptor passed");
            let mut text = String::new();
            passed.rewind().unwrap();
            passed.read_to_string(&mut text).unwrap();
            assert_eq!(text, "region");
            write_message(&daemon_peer, &got_ack(5)).unwrap();
            let ack = read_message(&front_peer).unwrap().unwrap();
            assert_eq!((ack.request, ack.body), (5, 0u64.to_le_bytes().to_vec()));

            // Intercepted: answered by the relay, never seen by the daemon.
            write_message(
                &front_peer,
                &Message {
                    request: 31,
                    flags: FLAG_VERSION,
                    body: vec![0; 24],
                    files: Vec::new(),
                },
            )
            .unwrap();
            let answer = read_message(&front_peer).unwrap().unwrap();
            assert_eq!(
                (answer.request, answer.flags, answer.body),
                (31, FLAG_VERSION | FLAG_REPLY, vec![7; 3])
            );

            drop(front_peer);
            assert_eq!(relayed.join().unwrap().unwrap(), Ended::FrontendLeft);
        });
        daemon_peer.set_nonblocking(true).unwrap();
        let mut rest = [0u8; 1];
        assert!(
            (&daemon_peer).read(&mut rest).is_err(),
            "an intercepted message reached the daemon"
        );
    }

    fn got_ack(request: u32) -> Message {
        Message {
            request,
            flags: FLAG_VERSION,
            body: Vec::new(),
            files: Vec::new(),
        }
        .ack(true)
    }
}
