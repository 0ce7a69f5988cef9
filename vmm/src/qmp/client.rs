//! One connected client: its socket, its protocol state and the replies
//! and events waiting to be written to it.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::protocol::Session;

/// A client connection (its socket is non-blocking).
pub struct Client {
    /// The connection.
    pub stream: UnixStream,
    /// Where the client is in the protocol.
    pub session: Session,
    /// Bytes not yet written: replies and events, in order.
    out: VecDeque<u8>,
    /// Most bytes `out` may hold; past it the client is too slow a reader
    /// and is dropped rather than letting it grow our memory.
    max_out: usize,
    /// The client shut its side: no more input, but what it is owed still
    /// goes out (a script may send a command, shut down and read).
    pub read_closed: bool,
    /// What epoll watches for now.
    pub interest: EventSet,
    /// One of its commands runs on another thread: its next input waits
    /// (unread) until that reply is queued, so replies keep their order.
    pub busy: bool,
    /// When it connected (un-negotiated clients get a time limit).
    pub connected: Instant,
}

/// Why a client is being dropped.
#[derive(Debug)]
pub enum Gone {
    /// Its output passed the bound: it does not read what it is sent.
    TooSlow,
    /// Its socket failed.
    Io(io::Error),
}

impl Client {
    /// A client whose first message, the greeting, is waiting to go out.
    pub fn new(stream: UnixStream, max_out: usize) -> Self {
        let mut client = Self {
            stream,
            session: Session::new(),
            out: VecDeque::new(),
            max_out,
            read_closed: false,
            interest: EventSet::empty(),
            busy: false,
            connected: Instant::now(),
        };
        client.out.extend(Session::greeting());
        client
    }

    /// Queues a message.
    pub fn queue(&mut self, message: &[u8]) -> Result<(), Gone> {
        if self.out.len() + message.len() > self.max_out {
            return Err(Gone::TooSlow);
        }
        self.out.extend(message);
        Ok(())
    }

    /// Whether anything waits to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes what the socket takes now.
    pub fn flush(&mut self) -> Result<(), Gone> {
        while !self.out.is_empty() {
            let (a, b) = self.out.as_slices();
            // sendmsg with MSG_NOSIGNAL: a client that has gone away is an
            // EPIPE to handle, never a SIGPIPE that would kill the VMM.
            match self.stream.send_with_fds(&[a, b], &[]) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.errno() == libc::EAGAIN => return Ok(()),
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(Gone::Io(e.into())),
            }
        }
        // Give back what a burst of output grew.
        self.out.shrink_to(64 * 1024);
        Ok(())
    }

    /// Reads what has arrived into `buf`: `Ok(0)` at end of input, `None`
    /// if nothing is there after all.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, Gone> {
        match self.stream.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(Gone::Io(e)),
        }
    }

    /// What epoll should watch for: input until the client shuts its side
    /// (not while a command of its runs elsewhere), room to write while
    /// output waits.
    pub fn wanted(&self) -> EventSet {
        let mut set = EventSet::empty();
        if !self.read_closed && !self.busy {
            set |= EventSet::IN;
        }
        if self.has_output() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether nothing more will happen on this connection.
    pub fn is_done(&self) -> bool {
        self.read_closed && !self.busy && !self.has_output()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greets_then_writes_in_order() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut c = Client::new(ours, 1 << 20);
        assert_eq!(c.wanted(), EventSet::IN | EventSet::OUT);
        c.queue(b"a\r\n").unwrap();
        c.flush().unwrap();
        assert!(!c.has_output());
        assert_eq!(c.wanted(), EventSet::IN);
        drop(c);
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        let mut want = Session::greeting();
        want.extend(b"a\r\n");
        assert_eq!(got, want);
    }

    #[test]
    fn output_is_bounded() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut c = Client::new(ours, Session::greeting().len() + 10);
        assert!(matches!(c.queue(&[b'x'; 11]), Err(Gone::TooSlow)));
        c.queue(&[b'x'; 10]).unwrap();
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        drop(theirs);
        let mut c = Client::new(ours, 1 << 20);
        assert!(matches!(c.flush(), Err(Gone::Io(_))));
        let mut buf = [0u8; 8];
        assert_eq!(c.read(&mut buf).unwrap(), Some(0));
    }
}
