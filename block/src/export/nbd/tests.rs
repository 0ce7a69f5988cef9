//! The protocol against a real server on a Unix socket, spoken by hand:
//! every malformed input gets the protocol's error or a closed
//! connection, and the server goes on serving others.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proto::*;
use crate::export::{DelMode, ExportError, ExportOptions, Exports, NbdAddr};
use crate::graph::{FileOptions, Graph, Holder};

const SIZE: u64 = 4 << 20;

struct Server {
    exports: Exports,
    socket: PathBuf,
    file: PathBuf,
    deleted: Arc<Mutex<Vec<String>>>,
    graph: Graph,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A server with a read-only export `ro` of a file whose first MiB is
/// data (0x5a) and the rest a hole, and a writable export `rw` of a
/// second file.
fn server(name: &str) -> Server {
    let dir = std::env::temp_dir();
    let tag = format!("nbd-{}-{name}", std::process::id());
    let file = dir.join(format!("{tag}.raw"));
    let rw_file = dir.join(format!("{tag}-rw.raw"));
    {
        let mut f = std::fs::File::create(&file).unwrap();
        f.write_all(&vec![0x5a; 1 << 20]).unwrap();
        f.set_len(SIZE).unwrap();
        std::fs::File::create(&rw_file)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
    }
    let graph = Graph::new();
    graph
        .add_disk("ro", true, FileOptions::new(file.clone()))
        .unwrap();
    graph
        .add_disk("rw", false, FileOptions::new(rw_file.clone()))
        .unwrap();
    let deleted = Arc::new(Mutex::new(Vec::new()));
    let seen = deleted.clone();
    let exports = Exports::new(Arc::new(move |id| seen.lock().unwrap().push(id.into())));
    let socket = dir.join(format!("{tag}.sock"));
    exports.start_nbd(NbdAddr::Unix(socket.clone()), 0).unwrap();
    for (id, writable) in [("ro", false), ("rw", true)] {
        let node = graph.get(id, Holder::Export { id: id.into() }).unwrap();
        let options = ExportOptions {
            id: id.into(),
            name: id.into(),
            description: Some(format!("the {id} export")),
            writable,
            bitmaps: Vec::new(),
        };
        exports.add(options, &node).unwrap();
    }
    let _ = std::fs::remove_file(&rw_file);
    Server {
        exports,
        socket,
        file,
        deleted,
        graph,
    }
}

struct Client(UnixStream);

impl Client {
    /// Connected, past the server's greeting.
    fn connect(s: &Server) -> Self {
        let mut c = Client(UnixStream::connect(&s.socket).unwrap());
        c.0.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(c.u64(), NBDMAGIC);
        assert_eq!(c.u64(), IHAVEOPT);
        assert_eq!(c.u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c
    }

    /// Connected with fixed newstyle and no zeroes.
    fn hello(s: &Server) -> Self {
        let mut c = Self::connect(s);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }

    /// Sends what a server may already have hung up on (after a byte it
    /// refuses): a broken pipe is the answer then, not a failure.
    fn send_after_refusal(&mut self, b: &[u8]) {
        match self.0.write_all(b) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => panic!("send: {e}"),
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: its type and data.
    fn reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), REPLY_MAGIC);
        assert_eq!(self.u32(), option);
        let kind = self.u32();
        let len = self.u32() as usize;
        (kind, self.bytes(len))
    }

    /// Whether the server closed the connection (reads end).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return true,
            }
        }
    }

    /// `NBD_OPT_GO` for `name`; replies up to ACK.
    fn go(&mut self, name: &str) -> Vec<(u32, Vec<u8>)> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &data);
        let mut replies = Vec::new();
        loop {
            let r = self.reply(OPT_GO);
            let end = r.0 != REP_INFO;
            replies.push(r);
            if end {
                return replies;
            }
        }
    }

    fn structured(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    }

    fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, Vec<u8>)> {
        self.meta(OPT_SET_META_CONTEXT, export, queries)
    }

    /// `NBD_OPT_SET_META_CONTEXT` or `_LIST_`; replies up to the last.
    fn meta(&mut self, option: u32, export: &str, queries: &[&str]) -> Vec<(u32, Vec<u8>)> {
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        self.option(option, &data);
        let mut replies = Vec::new();
        loop {
            let r = self.reply(option);
            let end = r.0 != REP_META_CONTEXT;
            replies.push(r);
            if end {
                return replies;
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32, cookie: u64) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.send(&r.encode());
    }

    /// A simple reply: error and cookie.
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }

    /// A structured chunk: flags, type, cookie, payload.
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC);
        let flags = self.u16();
        let kind = self.u16();
        let cookie = self.u64();
        let len = self.u32() as usize;
        (flags, kind, cookie, self.bytes(len))
    }
}

/// Waits until the server has no connections left.
fn settles(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.exports.connections() > 0 {
        assert!(Instant::now() < deadline, "connections did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A plain read on a fresh client still works: the server carries on.
fn still_serves(s: &Server) {
    let mut c = Client::hello(s);
    let replies = c.go("ro");
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    c.request(CMD_READ, 0, 0, 512, 9);
    assert_eq!(c.simple(), (0, 9));
    assert_eq!(c.bytes(512), vec![0x5a; 512]);
}

#[test]
fn a_socket_path_something_listens_on_is_refused_and_a_stale_one_replaced() {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("nbd-{}-taken.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let exports = Exports::new(Arc::new(|_: &str| {}));
    let err = exports
        .start_nbd(NbdAddr::Unix(path.clone()), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("something already listens there"), "{err}");
    // The listener that was there still is, and still takes connections.
    UnixStream::connect(&path).unwrap();
    live.accept().unwrap();
    // Once it is gone, its file is stale: the server takes the path.
    drop(live);
    exports.start_nbd(NbdAddr::Unix(path.clone()), 0).unwrap();
    UnixStream::connect(&path).unwrap();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn old_clients_unknown_flags_and_wrong_magic_are_closed() {
    let s = server("closed");
    let mut old = Client::connect(&s);
    old.send(&0u32.to_be_bytes());
    assert!(old.closed(), "a client without fixed newstyle");
    let mut odd = Client::connect(&s);
    odd.send(&(FLAG_C_FIXED_NEWSTYLE | 1 << 7).to_be_bytes());
    assert!(odd.closed(), "unknown client flags");
    let mut magic = Client::hello(&s);
    magic.send(&0x1122_3344_5566_7788u64.to_be_bytes());
    magic.send_after_refusal(&[0u8; 8]);
    assert!(magic.closed(), "wrong option magic");
    settles(&s);
    still_serves(&s);
}

#[test]
fn unknown_options_starttls_and_bad_lengths_get_errors_and_haggling_goes_on() {
    let s = server("options");
    let mut c = Client::hello(&s);
    c.option(0x77, b"whatever");
    assert_eq!(c.reply(0x77).0, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply(OPT_STARTTLS).0, REP_ERR_POLICY);
    c.option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.reply(OPT_STRUCTURED_REPLY).0, REP_ERR_INVALID);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.reply(OPT_LIST).0, REP_ERR_INVALID);
    // GO whose name length points past the data.
    c.option(OPT_GO, &[0, 0, 0, 9, b'r', b'o']);
    assert_eq!(c.reply(OPT_GO).0, REP_ERR_INVALID);
    // Meta contexts before structured replies.
    c.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
    let (kind, msg) = c.go("nope").pop().unwrap();
    assert_eq!(kind, REP_ERR_UNKNOWN);
    assert_eq!(msg, b"export 'nope' not present");
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (kind, data) = c.reply(OPT_LIST);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["ro", "rw"]);
    // After all that, GO still works.
    let replies = c.go("ro");
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    let export = replies
        .iter()
        .find(|(k, d)| *k == REP_INFO && d[..2] == INFO_EXPORT.to_be_bytes())
        .unwrap();
    assert_eq!(
        u64::from_be_bytes(export.1[2..10].try_into().unwrap()),
        SIZE
    );
    let flags = u16::from_be_bytes(export.1[10..12].try_into().unwrap());
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    assert_eq!(flags & FLAG_SEND_TRIM, 0);
}

#[test]
fn an_oversized_option_is_refused_and_the_connection_closed() {
    let s = server("big");
    let mut c = Client::hello(&s);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&(MAX_OPTION + 1).to_be_bytes());
    c.send(&b);
    assert_eq!(c.reply(OPT_GO).0, REP_ERR_TOO_BIG);
    assert!(c.closed());
    settles(&s);
    still_serves(&s);
}

#[test]
fn short_reads_anywhere_in_the_handshake_end_only_that_client() {
    let s = server("short");
    // The full handshake of a GO, cut after each byte in turn.
    let mut full = (FLAG_C_FIXED_NEWSTYLE).to_be_bytes().to_vec();
    let mut go = IHAVEOPT.to_be_bytes().to_vec();
    go.extend_from_slice(&OPT_GO.to_be_bytes());
    go.extend_from_slice(&8u32.to_be_bytes());
    go.extend_from_slice(&[0, 0, 0, 2, b'r', b'o', 0, 0]);
    full.extend_from_slice(&go);
    for cut in 0..full.len() {
        let mut c = Client::connect(&s);
        c.send(&full[..cut]);
        drop(c);
    }
    settles(&s);
    still_serves(&s);
}

#[test]
fn random_handshake_bytes_never_take_the_server_down() {
    let s = server("fuzz");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..64 {
        let mut c = Client::connect(&s);
        let mut bytes = Vec::new();
        // Start well framed half the time, so options get parsed.
        if round % 2 == 0 {
            bytes.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
            bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        }
        for _ in 0..(seed % 200) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            bytes.push(seed as u8);
        }
        let _ = c.0.write_all(&bytes);
        let _ = c.0.shutdown(std::net::Shutdown::Write);
        assert!(c.closed(), "round {round}");
    }
    settles(&s);
    still_serves(&s);
}

/// A client in transmission with `ro` or `rw`, simple replies.
fn transmission(s: &Server, export: &str) -> Client {
    let mut c = Client::hello(s);
    assert_eq!(c.go(export).last().unwrap().0, REP_ACK);
    c
}

#[test]
fn bad_requests_get_the_protocols_errors_and_the_connection_goes_on() {
    let s = server("requests");
    let mut c = transmission(&s, "ro");
    c.request(CMD_READ, 0, SIZE - 512, 1024, 1);
    assert_eq!(c.simple(), (EINVAL, 1), "read past the end");
    c.request(CMD_WRITE, 0, 0, 512, 2);
    c.send(&[1u8; 512]);
    assert_eq!(c.simple(), (EPERM, 2), "write to a read-only export");
    c.request(CMD_READ, 0, 0, MAX_REQUEST + 512, 3);
    assert_eq!(c.simple(), (EINVAL, 3), "read over the maximum");
    c.request(99, 0, 0, 0, 4);
    assert_eq!(c.simple(), (EINVAL, 4), "unknown command");
    c.request(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512, 5);
    assert_eq!(c.simple(), (EINVAL, 5), "a flag READ does not take");
    c.request(CMD_BLOCK_STATUS, 0, 0, 512, 6);
    assert_eq!(c.simple(), (EINVAL, 6), "block status without a context");
    // Unaligned reads are widened and cut back.
    c.request(CMD_READ, 0, (1 << 20) - 3, 6, 7);
    assert_eq!(c.simple(), (0, 7));
    assert_eq!(c.bytes(6), [0x5a, 0x5a, 0x5a, 0, 0, 0]);

    let mut w = transmission(&s, "rw");
    w.request(CMD_WRITE, 0, SIZE, 512, 10);
    w.send(&[1u8; 512]);
    assert_eq!(w.simple(), (ENOSPC, 10), "write past the end");
    w.request(CMD_WRITE, 0, 1, 512, 11);
    w.send(&[1u8; 512]);
    assert_eq!(w.simple(), (EINVAL, 11), "unaligned write");
    // Over the maximum: the payload is read and dropped, so the next
    // request is still understood.
    let big = MAX_REQUEST + 4096;
    w.request(CMD_WRITE, 0, 0, big, 12);
    w.send(&vec![7u8; big as usize]);
    assert_eq!(w.simple(), (EINVAL, 12), "write over the maximum");
    w.request(CMD_WRITE, CMD_FLAG_FUA, 4096, 4096, 13);
    w.send(&[3u8; 4096]);
    assert_eq!(w.simple(), (0, 13));
    w.request(CMD_READ, 0, 4096, 4096, 14);
    assert_eq!(w.simple(), (0, 14));
    assert_eq!(w.bytes(4096), vec![3u8; 4096]);
    // A zero range that may be a hole, and a fast one: both cheap here.
    w.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 4096, 4096, 15);
    assert_eq!(w.simple(), (0, 15));
    w.request(CMD_READ, 0, 4096, 512, 16);
    assert_eq!(w.simple(), (0, 16));
    assert_eq!(w.bytes(512), vec![0u8; 512]);

    // A wrong request magic loses the stream: closed.
    c.send(&[0u8; REQUEST_LEN]);
    assert!(c.closed());
    w.request(CMD_DISC, 0, 0, 0, 0);
    assert!(w.closed());
    settles(&s);
}

#[test]
fn a_client_vanishing_mid_request_leaves_the_others_served() {
    let s = server("vanish");
    let mut w = transmission(&s, "rw");
    w.request(CMD_WRITE, 0, 0, 65536, 1);
    w.send(&[1u8; 1000]);
    drop(w);
    let mut r = transmission(&s, "ro");
    // Many reads in flight, then gone without reading a reply.
    for i in 0..32 {
        r.request(CMD_READ, 0, i * 65536, 65536, i);
    }
    drop(r);
    settles(&s);
    still_serves(&s);
}

#[test]
fn structured_reads_and_block_status_of_base_allocation() {
    let s = server("structured");
    let mut c = Client::hello(&s);
    c.structured();
    let replies = c.set_meta("ro", &["base:allocation", "qemu:nothing"]);
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].0, REP_META_CONTEXT);
    assert_eq!(&replies[0].1[4..], b"base:allocation");
    let id = u32::from_be_bytes(replies[0].1[..4].try_into().unwrap());
    assert_eq!(c.go("ro").last().unwrap().0, REP_ACK);
    c.request(CMD_READ, 0, 512, 512, 1);
    let (flags, kind, cookie, data) = c.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1)
    );
    assert_eq!(u64::from_be_bytes(data[..8].try_into().unwrap()), 512);
    assert_eq!(&data[8..], &[0x5a; 512][..]);
    c.request(CMD_BLOCK_STATUS, 0, 0, SIZE as u32, 2);
    let (flags, kind, cookie, data) = c.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 2)
    );
    let extents: Vec<(u32, u32)> = data[4..]
        .chunks(8)
        .map(|e| {
            (
                u32::from_be_bytes(e[..4].try_into().unwrap()),
                u32::from_be_bytes(e[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), id);
    assert_eq!(
        extents,
        [
            (1 << 20, 0),
            ((SIZE - (1 << 20)) as u32, STATE_HOLE | STATE_ZERO)
        ]
    );
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, SIZE as u32, 3);
    let (_, _, _, data) = c.chunk();
    assert_eq!(data.len(), 4 + 8, "one extent");
    // Errors come as error chunks now.
    c.request(CMD_READ, 0, SIZE, 512, 4);
    let (flags, kind, cookie, data) = c.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 4)
    );
    assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), EINVAL);
}

#[test]
fn safe_delete_is_refused_while_a_client_is_there_and_hard_delete_drops_it() {
    let s = server("delete");
    let mut c = transmission(&s, "ro");
    assert!(matches!(
        s.exports.del("ro", DelMode::Safe),
        Err(ExportError::InUse { .. })
    ));
    assert_eq!(
        s.exports.del("ro", DelMode::Safe).unwrap_err().to_string(),
        "export 'ro' still in use"
    );
    s.exports.del("ro", DelMode::Hard).unwrap();
    assert!(c.closed());
    settles(&s);
    assert_eq!(*s.deleted.lock().unwrap(), ["ro"]);
    assert_eq!(s.exports.list().len(), 1);
    // An export without clients goes at once, safely.
    s.exports.del("rw", DelMode::Safe).unwrap();
    assert_eq!(*s.deleted.lock().unwrap(), ["ro", "rw"]);
    assert!(matches!(
        s.exports.del("rw", DelMode::Safe),
        Err(ExportError::NotFound { .. })
    ));
}

/// The contexts of META_CONTEXT replies, as (id, name).
fn contexts(replies: &[(u32, Vec<u8>)]) -> Vec<(u32, String)> {
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    replies[..replies.len() - 1]
        .iter()
        .map(|(kind, data)| {
            assert_eq!(*kind, REP_META_CONTEXT);
            (
                u32::from_be_bytes(data[..4].try_into().unwrap()),
                String::from_utf8(data[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

/// One BLOCK_STATUS request's chunks: (context id, [(length, flags)]).
fn block_status(c: &mut Client, offset: u64, len: u32, cookie: u64) -> Vec<(u32, Vec<(u32, u32)>)> {
    c.request(CMD_BLOCK_STATUS, 0, offset, len, cookie);
    let mut out = Vec::new();
    loop {
        let (flags, kind, got, data) = c.chunk();
        assert_eq!((kind, got), (REPLY_TYPE_BLOCK_STATUS, cookie));
        let extents = data[4..]
            .chunks(8)
            .map(|e| {
                (
                    u32::from_be_bytes(e[..4].try_into().unwrap()),
                    u32::from_be_bytes(e[4..].try_into().unwrap()),
                )
            })
            .collect();
        out.push((u32::from_be_bytes(data[..4].try_into().unwrap()), extents));
        if flags & REPLY_FLAG_DONE != 0 {
            return out;
        }
    }
}

#[test]
fn dirty_bitmap_contexts_report_the_bitmap_and_writes_mark_it() {
    use crate::export::BitmapSpec;
    const K64: u64 = 64 << 10;
    let s = server("bitmap");
    let path = std::env::temp_dir().join(format!("nbd-{}-bitmap-bm.raw", std::process::id()));
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    s.graph
        .add_disk("bm", false, FileOptions::new(path.clone()))
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let node = s
        .graph
        .get("bm", Holder::Export { id: "bm".into() })
        .unwrap();
    node.bitmaps().add("b0", SIZE, K64, false, false).unwrap();
    node.bitmaps().add("b1", SIZE, K64, false, true).unwrap();
    node.bitmaps().mark(K64 + 1, 1);
    node.bitmaps().mark(1 << 20, 2 * K64);
    let options = ExportOptions {
        id: "bm".into(),
        name: "bm".into(),
        description: None,
        writable: true,
        bitmaps: vec![
            BitmapSpec::Local("b0".into()),
            BitmapSpec::Local("b1".into()),
        ],
    };
    s.exports.add(options, &node).unwrap();

    let mut c = Client::hello(&s);
    c.structured();
    let bitmaps = |ids: [u32; 2]| {
        vec![
            (ids[0], "qemu:dirty-bitmap:b0".to_string()),
            (ids[1], "qemu:dirty-bitmap:b1".to_string()),
        ]
    };
    // Listing: by namespace, by prefix, everything; never on other exports.
    for q in [&["qemu:"][..], &["qemu:dirty-bitmap:"]] {
        assert_eq!(
            contexts(&c.meta(OPT_LIST_META_CONTEXT, "bm", q)),
            bitmaps([0, 0])
        );
    }
    let mut all = vec![(0, "base:allocation".to_string())];
    all.extend(bitmaps([0, 0]));
    assert_eq!(contexts(&c.meta(OPT_LIST_META_CONTEXT, "bm", &[])), all);
    assert_eq!(
        contexts(&c.meta(OPT_LIST_META_CONTEXT, "rw", &["qemu:"])),
        []
    );
    // A prefix selects nothing when setting; a full name does.
    assert_eq!(contexts(&c.set_meta("bm", &["qemu:dirty-bitmap:"])), []);
    assert_eq!(
        contexts(&c.set_meta(
            "bm",
            &[
                "qemu:dirty-bitmap:b1",
                "qemu:dirty-bitmap:b0",
                "qemu:dirty-bitmap:b9"
            ]
        )),
        [
            (1, "qemu:dirty-bitmap:b1".to_string()),
            (2, "qemu:dirty-bitmap:b0".to_string())
        ]
    );
    assert_eq!(c.go("bm").last().unwrap().0, REP_ACK);
    let b0_before = [
        (K64 as u32, 0),
        (K64 as u32, STATE_DIRTY),
        ((1 << 20) - 2 * K64 as u32, 0),
        (2 * K64 as u32, STATE_DIRTY),
        ((SIZE - (1 << 20) - 2 * K64) as u32, 0),
    ];
    assert_eq!(
        block_status(&mut c, 0, SIZE as u32, 1),
        [(1, vec![(SIZE as u32, 0)]), (2, b0_before.to_vec())]
    );
    // Cut to the request, from the middle of a granule.
    assert_eq!(
        block_status(&mut c, K64 + 512, K64 as u32, 2)[1],
        (2, vec![((K64 - 512) as u32, STATE_DIRTY), (512, 0)])
    );

    // A write, a trim and zeroes mark b0 (enabled) when they complete,
    // not b1 (disabled).
    c.request(CMD_WRITE, 0, 3 << 20, 4096, 3);
    c.send(&[1u8; 4096]);
    assert_eq!(c.simple(), (0, 3));
    c.request(CMD_TRIM, CMD_FLAG_FUA, 2 << 20, K64 as u32, 4);
    assert_eq!(c.simple(), (0, 4));
    c.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE,
        (2 << 20) + 2 * K64,
        512,
        5,
    );
    assert_eq!(c.simple(), (0, 5));
    let dirty: Vec<(u64, u64)> = node.bitmaps().snapshot("b0").unwrap().extents().collect();
    assert_eq!(
        dirty,
        [
            (K64, K64),
            (1 << 20, 2 * K64),
            (2 << 20, K64),
            ((2 << 20) + 2 * K64, K64),
            (3 << 20, K64)
        ]
    );
    assert!(node.bitmaps().snapshot("b1").unwrap().is_clean());
    assert_eq!(
        block_status(&mut c, 3 << 20, SIZE as u32 - (3 << 20), 6)[1],
        (
            2,
            vec![
                (K64 as u32, STATE_DIRTY),
                ((SIZE - (3 << 20) - K64) as u32, 0)
            ]
        )
    );
    // Busy while exported; free once the export is gone.
    assert!(node.bitmaps().remove("b0").is_err());
    c.request(CMD_DISC, 0, 0, 0, 0);
    assert!(c.closed());
    settles(&s);
    s.exports.del("bm", DelMode::Safe).unwrap();
    node.bitmaps().remove("b0").unwrap();
}
