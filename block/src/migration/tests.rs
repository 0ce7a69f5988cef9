//! Block migration without KVM: a source graph and a destination graph
//! (two "processes") in one test, the stream being the chunks handed
//! from one to the other.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::driver::qcow2::create::{create, CreateOptions};
use crate::graph::{FileOptions, Graph, Holder, Host, ImageFormat, Lease, NodeRef};

/// Not a whole number of chunks: the last chunk is short.
const SIZE: u64 = (3 << 20) + (64 << 10);

pub(crate) struct Files(pub(crate) Vec<PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub(crate) fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("block-migration-{}-{name}", std::process::id()))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed | 1)
        .collect()
}

/// Where the test disks have data; the rest are holes.
const DATA: [(u64, usize, u8); 3] = [
    (0, 4096, 1),
    ((1 << 20) + 512, 70_000, 2),
    (SIZE - 8192, 8192, 3),
];

/// A new raw image of `size` bytes: holes, or data at [`DATA`].
pub(crate) fn raw_image(name: &str, size: u64, data: bool) -> PathBuf {
    let path = temp(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    if data {
        for (offset, len, seed) in DATA {
            f.write_all_at(&pattern(len, seed), offset).unwrap();
        }
    }
    path
}

/// A new, empty qcow2 image of `size` bytes.
pub(crate) fn qcow2_image(name: &str, size: u64) -> PathBuf {
    let path = temp(name);
    let f = std::fs::File::create(&path).unwrap();
    create(&f, &CreateOptions::new(size)).unwrap();
    path
}

pub(crate) fn add(graph: &Graph, name: &str, path: &std::path::Path, format: ImageFormat) {
    graph
        .add_image(name, false, FileOptions::new(path.to_path_buf()), format)
        .unwrap();
}

fn settle(io: &mut dyn crate::io::AsyncIo) -> i32 {
    io.submit().unwrap();
    wait(io, OP_TAG, IO_TIMEOUT)
        .unwrap()
        .expect("the operation completed")
}

const OP_TAG: u64 = 1;

/// Writes `data` at `offset` through `lease`.
pub(crate) fn write_at(lease: &Lease, offset: u64, data: &[u8]) {
    let mut io = lease.open_io(2).unwrap();
    let iov = [libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    }];
    // SAFETY: `data` and `iov` outlive the wait in `settle`.
    unsafe { io.write_vectored(offset, &iov, OP_TAG).unwrap() };
    assert_eq!(settle(io.as_mut()), data.len() as i32);
}

/// Everything the node reads, through a lease of its own.
pub(crate) fn contents(node: &NodeRef) -> Vec<u8> {
    let lease = node.take_lease(Holder::Monitor).unwrap();
    let mut io = lease.open_io(2).unwrap();
    let size = node.driver().size() as usize;
    let mut out = vec![0u8; size];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(1 << 20);
        let iov = [libc::iovec {
            iov_base: out[at..].as_mut_ptr().cast(),
            iov_len: n,
        }];
        // SAFETY: `out` and `iov` outlive the wait in `settle`.
        unsafe { io.read_vectored(at as u64, &iov, OP_TAG).unwrap() };
        assert_eq!(settle(io.as_mut()), n as i32);
        at += n;
    }
    out
}

#[test]
fn both_sides_move_to_the_migration_thread() {
    fn send<T: Send>() {}
    send::<BlockMigration>();
    send::<BlockSink>();
}

/// A graph holding one raw image `name` of random data as node "d0",
/// the image's path and the node; the guard removes the file.
fn one_raw_disk(name: &str) -> (Files, PathBuf, Graph, NodeRef) {
    let path = raw_image(name, SIZE, true);
    let files = Files(vec![path.clone()]);
    let graph = Graph::new();
    add(&graph, "d0", &path, ImageFormat::Raw);
    let node = graph.get("d0", Holder::Monitor).unwrap();
    (files, path, graph, node)
}

/// The disk list of a one-disk migration: device "vda" on node "d0".
fn vda_on_d0() -> [(String, String); 1] {
    [("vda".to_string(), "d0".to_string())]
}

fn migration() -> Holder {
    Holder::Migration
}

/// Hands every chunk from `source` to `sink`; the chunks sent.
fn pump(source: &mut BlockMigration, sink: &mut BlockSink) -> Vec<Chunk> {
    let mut buf = Vec::new();
    let mut sent = Vec::new();
    while let Some(chunk) = source.next_chunk(&mut buf).unwrap() {
        assert_eq!(buf.len(), if chunk.zero { 0 } else { chunk.len as usize });
        sink.write(&chunk, &buf).unwrap();
        sent.push(chunk);
    }
    sent
}

fn sink_disks(source: &BlockMigration, nodes: &[&str]) -> Vec<(String, String, u64)> {
    source
        .disks()
        .into_iter()
        .zip(nodes)
        .map(|((device, size), node)| (device, node.to_string(), size))
        .collect()
}

#[test]
fn raw_and_qcow2_disks_migrate_byte_for_byte_and_holes_cost_nothing() {
    let src_raw = raw_image("src.raw", SIZE, true);
    let src_q = qcow2_image("src.qcow2", SIZE);
    let ro = raw_image("ro.raw", SIZE, true);
    // The destination's raw disk starts full of garbage: the source's
    // holes must become zeros there too.
    let dst_raw = temp("dst.raw");
    std::fs::write(&dst_raw, vec![0xa5u8; SIZE as usize]).unwrap();
    let dst_q = qcow2_image("dst.qcow2", SIZE);
    let _files = Files(vec![
        src_raw.clone(),
        src_q.clone(),
        ro.clone(),
        dst_raw.clone(),
        dst_q.clone(),
    ]);

    let src = Graph::new();
    add(&src, "d0", &src_raw, ImageFormat::Raw);
    add(&src, "d1", &src_q, ImageFormat::Qcow2);
    src.add_image("d2", true, FileOptions::new(ro.clone()), ImageFormat::Raw)
        .unwrap();
    let d1 = src.get("d1", Holder::Monitor).unwrap();
    {
        let lease = d1.take_lease(Holder::Monitor).unwrap();
        for (offset, len, seed) in DATA {
            write_at(&lease, offset, &pattern(len, seed ^ 0x40));
        }
    }
    let dst = Graph::new();
    add(&dst, "t0", &dst_raw, ImageFormat::Raw);
    add(&dst, "t1", &dst_q, ImageFormat::Qcow2);

    let disks = [
        ("vda".to_string(), "d0".to_string()),
        ("vdb".to_string(), "d1".to_string()),
        ("vdc".to_string(), "d2".to_string()),
    ];
    let mut source = BlockMigration::start(&src, &disks, migration()).unwrap();
    assert_eq!(
        source.disks(),
        vec![("vda".to_string(), SIZE), ("vdb".to_string(), SIZE)],
        "a read-only node is not copied"
    );
    assert_eq!(source.total(), 2 * SIZE);
    assert_eq!(source.remaining(), 2 * SIZE);
    assert!(!source.is_hosted(0), "a free node is leased");
    let mut sink = BlockSink::open(&dst, &sink_disks(&source, &["t0", "t1"]), migration()).unwrap();
    let sent = pump(&mut source, &mut sink);
    assert_eq!(source.remaining(), 0);
    assert_eq!(source.transferred(), 2 * SIZE);
    assert_eq!(sink.received(), 2 * SIZE);
    sink.finish().unwrap();
    let data: u64 = sent
        .iter()
        .filter(|c| !c.zero)
        .map(|c| u64::from(c.len))
        .sum();
    assert!(sent.iter().any(|c| c.zero));
    assert!(
        data <= 2 * 3 * u64::from(CHUNK),
        "only chunks holding data carry bytes ({data})"
    );
    drop(source);

    for (s, t) in [("d0", "t0"), ("d1", "t1")] {
        let a = contents(&src.get(s, Holder::Monitor).unwrap());
        let b = contents(&dst.get(t, Holder::Monitor).unwrap());
        assert!(a == b, "{t} differs from {s}");
        assert!(a.iter().any(|&x| x != 0));
    }
    // The qcow2 destination wrote its own format: a sparse image.
    assert!(std::fs::metadata(&dst_q).unwrap().len() < SIZE);
}

/// A dataplane-like holder on its own thread: serves hosted reads, and
/// carries out the writes it is sent, marking the node's bitmaps as each
/// completes (as the virtio-blk dataplane does).
struct Dataplane {
    writes: mpsc::Sender<(u64, Vec<u8>, mpsc::Sender<()>)>,
    stop: Arc<AtomicBool>,
    /// Whether it carries out hosted reads (it leaves them queued if not).
    reads: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Lease>>,
}

impl Dataplane {
    fn start(node: &NodeRef, hosting: bool) -> Self {
        let lease = node.take_lease(dataplane()).unwrap();
        let host = hosting.then(|| lease.offer_hosting().unwrap());
        let (writes, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let reads = Arc::new(AtomicBool::new(true));
        let serving = reads.clone();
        let thread = std::thread::spawn(move || serve(lease, host, rx, stopped, serving));
        Self {
            writes,
            stop,
            reads,
            thread: Some(thread),
        }
    }

    /// Stops carrying out hosted reads (they stay queued).
    fn ignore_reads(&self) {
        self.reads.store(false, Ordering::Release);
    }

    fn write(&self, offset: u64, data: Vec<u8>) {
        let (ack, done) = mpsc::channel();
        self.writes.send((offset, data, ack)).unwrap();
        done.recv_timeout(Duration::from_secs(20))
            .expect("the dataplane wrote");
    }

    fn stop(mut self) -> Lease {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn dataplane() -> Holder {
    Holder::Dataplane {
        kind: "virtio-blk",
        id: "vda".into(),
    }
}

type WriteRequest = (u64, Vec<u8>, mpsc::Sender<()>);

fn serve(
    lease: Lease,
    host: Option<Arc<Host>>,
    writes: mpsc::Receiver<WriteRequest>,
    stop: Arc<AtomicBool>,
    serving: Arc<AtomicBool>,
) -> Lease {
    let mut io = lease.open_io(8).unwrap();
    let mut reads = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let host = host.as_ref().filter(|_| serving.load(Ordering::Acquire));
        if let Some(host) = host.filter(|h| h.has_work()) {
            host.take_reads(&mut reads);
            for read in reads.drain(..) {
                // SAFETY: the reader keeps its buffers until it has the
                // completion, handed back once the engine is done.
                unsafe { io.read_vectored(read.offset, &read.iovecs, 7).unwrap() };
                let result = {
                    io.submit().unwrap();
                    wait(io.as_mut(), 7, IO_TIMEOUT).unwrap().unwrap()
                };
                read.reply.complete(read.user_data, result);
            }
        }
        if let Ok((offset, data, ack)) = writes.try_recv() {
            let iov = [libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: data.len(),
            }];
            // SAFETY: `data` outlives the wait.
            unsafe { io.write_vectored(offset, &iov, 8).unwrap() };
            io.submit().unwrap();
            assert_eq!(
                wait(io.as_mut(), 8, IO_TIMEOUT).unwrap(),
                Some(data.len() as i32)
            );
            lease.node().bitmaps().mark(offset, data.len() as u64);
            ack.send(()).unwrap();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    drop(io);
    lease
}

#[test]
fn writes_a_hosting_holder_completes_during_the_bulk_pass_are_sent_again_raw() {
    live_migration(ImageFormat::Raw);
}

#[test]
fn writes_a_hosting_holder_completes_during_the_bulk_pass_are_sent_again_qcow2() {
    live_migration(ImageFormat::Qcow2);
}

/// A disk of `format` with data at [`DATA`], and its path.
fn source_image(name: &str, format: ImageFormat) -> PathBuf {
    match format {
        ImageFormat::Raw => raw_image(name, SIZE, true),
        ImageFormat::Qcow2 => {
            let path = qcow2_image(name, SIZE);
            let g = Graph::new();
            add(&g, "n", &path, format);
            let lease = g
                .get("n", Holder::Monitor)
                .unwrap()
                .take_lease(Holder::Monitor)
                .unwrap();
            for (offset, len, seed) in DATA {
                write_at(&lease, offset, &pattern(len, seed));
            }
            path
        }
    }
}

/// A guest writing through its hosting dataplane during and after the
/// bulk pass, a source disk of `format` into a destination of the same.
fn live_migration(format: ImageFormat) {
    let src_path = source_image(&format!("live-src.{}", format.name()), format);
    let dst_path = match format {
        ImageFormat::Raw => raw_image("live-dst.raw", SIZE, false),
        ImageFormat::Qcow2 => qcow2_image("live-dst.qcow2", SIZE),
    };
    let _files = Files(vec![src_path.clone(), dst_path.clone()]);
    let src = Graph::new();
    add(&src, "d0", &src_path, format);
    let dst = Graph::new();
    add(&dst, "t0", &dst_path, format);
    let node = src.get("d0", Holder::Monitor).unwrap();
    let dp = Dataplane::start(&node, true);

    let disks = vda_on_d0();
    let mut source = BlockMigration::start(&src, &disks, migration()).unwrap();
    assert!(source.is_hosted(0), "the running guest's holder hosts it");
    assert_eq!(src.info(&node).hosted, vec![Holder::Migration]);
    let mut sink = BlockSink::open(&dst, &sink_disks(&source, &["t0"]), migration()).unwrap();
    assert!(
        node.bitmaps().info().is_empty(),
        "its dirty tracking is not the user's bitmap"
    );
    let mut buf = Vec::new();
    let first = source.next_chunk(&mut buf).unwrap().unwrap();
    assert_eq!((first.offset, first.len, first.zero), (0, CHUNK, false));
    sink.write(&first, &buf).unwrap();
    // The guest writes where the bulk pass has been and where it has not.
    dp.write(4096, pattern(8192, 9));
    dp.write(SIZE - 4096, pattern(4096, 10));
    // The write ahead of the bulk pass is not counted twice: the bulk
    // pass reads that range anyway.
    assert_eq!(source.remaining(), SIZE - u64::from(CHUNK) + 65536);
    let sent = pump(&mut source, &mut sink);
    // The three bulk chunks left, then the one granule written behind
    // the bulk pass: the bulk pass itself copied the write ahead of it.
    let bulk = SIZE.div_ceil(u64::from(CHUNK)) as usize - 1;
    assert!(sent[..bulk].iter().all(|c| c.offset >= u64::from(CHUNK)));
    let again: Vec<(u64, u32)> = sent[bulk..].iter().map(|c| (c.offset, c.len)).collect();
    assert_eq!(again, vec![(0, 65536)]);
    assert_eq!(source.remaining(), 0);
    // A write after the passes makes more.
    dp.write(2 << 20, pattern(512, 11));
    let late = pump(&mut source, &mut sink);
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].offset, 2 << 20);
    sink.finish().unwrap();
    drop(source);
    assert!(src.info(&node).hosted.is_empty());
    let lease = dp.stop();
    drop(lease);
    let a = contents(&node);
    let b = contents(&dst.get("t0", Holder::Monitor).unwrap());
    assert!(a == b, "the destination differs from the source");
    assert_eq!(&a[4096..4096 + 8192], &pattern(8192, 9)[..]);
}

#[test]
fn a_holder_that_does_not_host_refuses_at_once_and_nothing_is_kept() {
    let a = raw_image("refuse-a.raw", SIZE, true);
    let b = raw_image("refuse-b.raw", SIZE, true);
    let _files = Files(vec![a.clone(), b.clone()]);
    let src = Graph::new();
    add(&src, "d0", &a, ImageFormat::Raw);
    add(&src, "d1", &b, ImageFormat::Raw);
    let d0 = src.get("d0", Holder::Monitor).unwrap();
    let d1 = src.get("d1", Holder::Monitor).unwrap();
    let dp = Dataplane::start(&d1, false);
    let disks = [
        ("vda".to_string(), "d0".to_string()),
        ("vdb".to_string(), "d1".to_string()),
    ];
    let err = BlockMigration::start(&src, &disks, migration())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        "Node 'd1' is busy: block device is in use by virtio-blk dataplane of device 'vda'"
    );
    // The first disk was leased and tracked before the refusal: both gone.
    assert_eq!(src.info(&d0).lease, None);
    assert!(!d0.bitmaps().is_recording());
    assert!(!d1.bitmaps().is_recording());
    assert!(src
        .info(&d0)
        .references
        .iter()
        .all(|h| *h != Holder::Migration));
    // The holder goes on as before.
    dp.write(0, pattern(512, 5));
    let lease = dp.stop();
    drop(lease);
    assert_eq!(&contents(&d1)[..512], &pattern(512, 5)[..]);
}

#[test]
fn the_destination_refuses_other_sizes_and_chunks_outside_its_disks() {
    let t = raw_image("sink.raw", SIZE, false);
    let _files = Files(vec![t.clone()]);
    let dst = Graph::new();
    add(&dst, "t0", &t, ImageFormat::Raw);
    let err = BlockSink::open(
        &dst,
        &[("vda".into(), "t0".into(), SIZE + 512)],
        migration(),
    )
    .err()
    .unwrap()
    .to_string();
    assert_eq!(
        err,
        format!(
            "Block migration: disk 'vda' (node 't0') is {SIZE} bytes here, but {} bytes on the source",
            SIZE + 512
        )
    );
    let node = dst.get("t0", Holder::Monitor).unwrap();
    assert_eq!(dst.info(&node).lease, None, "a refused sink keeps nothing");

    let mut sink =
        BlockSink::open(&dst, &[("vda".into(), "t0".into(), SIZE)], migration()).unwrap();
    let chunk = |disk, offset, len, zero| Chunk {
        disk,
        offset,
        len,
        zero,
    };
    let refuse =
        |sink: &mut BlockSink, c: Chunk, data: &[u8]| sink.write(&c, data).unwrap_err().to_string();
    assert_eq!(
        refuse(&mut sink, chunk(0, SIZE - 512, 1024, false), &[7; 1024]),
        format!("Block migration: a chunk of 1024 bytes at offset {} lies outside disk 'vda' ({SIZE} bytes)", SIZE - 512)
    );
    assert!(refuse(&mut sink, chunk(0, u64::MAX - 10, 512, true), &[])
        .contains("lies outside disk 'vda'"));
    assert_eq!(
        refuse(&mut sink, chunk(3, 0, 512, true), &[]),
        "Block migration: the stream names disk 3, but only 1 disks are migrated"
    );
    assert_eq!(
        refuse(&mut sink, chunk(0, 0, 512, false), &[1; 100]),
        "Block migration: a chunk for disk 'vda' says 512 bytes but carries 100"
    );
    assert!(refuse(&mut sink, chunk(0, 0, CHUNK + 512, false), &[])
        .contains("longer than the 1048576 bytes"));
    // Nothing of that was written; a good chunk still is.
    sink.write(&chunk(0, SIZE - 512, 512, false), &[9; 512])
        .unwrap();
    sink.finish().unwrap();
    let bytes = std::fs::read(&t).unwrap();
    assert!(bytes[..(SIZE - 512) as usize].iter().all(|&b| b == 0));
    assert!(bytes[(SIZE - 512) as usize..].iter().all(|&b| b == 9));
}

#[test]
fn a_migration_dropped_half_way_leaves_the_source_intact_and_its_holder_serving() {
    let (_files, src_raw, src, node) = one_raw_disk("cancel.raw");
    let before = std::fs::read(&src_raw).unwrap();
    let dp = Dataplane::start(&node, true);
    let disks = vda_on_d0();
    let mut source = BlockMigration::start(&src, &disks, migration()).unwrap();
    let mut buf = Vec::new();
    source.next_chunk(&mut buf).unwrap().unwrap();
    dp.write(0, pattern(512, 4));
    assert!(source.remaining() > 0);
    drop(source);
    assert!(src.info(&node).hosted.is_empty(), "the migration left");
    assert!(!node.bitmaps().is_recording(), "its bitmap is gone");
    assert!(node.bitmaps().info().is_empty());
    // The holder still serves its guest.
    let deadline = Instant::now() + Duration::from_secs(5);
    dp.write(1 << 20, pattern(512, 6));
    assert!(Instant::now() < deadline);
    let lease = dp.stop();
    drop(lease);
    let after = std::fs::read(&src_raw).unwrap();
    let mut expected = before;
    expected[..512].copy_from_slice(&pattern(512, 4));
    expected[1 << 20..(1 << 20) + 512].copy_from_slice(&pattern(512, 6));
    assert!(
        after == expected,
        "only the guest's writes changed the source"
    );
    // Free again: a new migration takes the lease itself.
    let again = BlockMigration::start(&src, &disks, migration()).unwrap();
    assert!(!again.is_hosted(0));
}

#[test]
fn a_read_its_holder_never_serves_fails_the_migration_and_nothing_is_freed_under_it() {
    let (_files, _, src, node) = one_raw_disk("stall.raw");
    // The holder, on this thread, does not serve until told.
    let lease = node.take_lease(dataplane()).unwrap();
    let host = lease.offer_hosting().unwrap();
    let disks = vda_on_d0();
    let mut source = BlockMigration::start(&src, &disks, migration()).unwrap();
    source.set_timeout(Duration::from_millis(100));
    let mut buf = Vec::new();
    let err = source.next_chunk(&mut buf).unwrap_err().to_string();
    assert_eq!(
        err,
        "Block migration: reading disk 'vda' (node 'd0') did not complete within 100 ms"
    );
    assert_eq!(source.remaining(), SIZE, "nothing counts as sent");
    assert!(
        source.next_chunk(&mut buf).is_err(),
        "no read goes where the lost one may still land"
    );
    drop(source);
    assert!(src.info(&node).hosted.is_empty());
    // The holder gets to the read late: it lands in memory still there.
    let mut reads = Vec::new();
    host.take_reads(&mut reads);
    assert_eq!(reads.len(), 1);
    let mut io = lease.open_io(2).unwrap();
    for read in reads {
        // SAFETY: the migration left its buffer allocated for good.
        unsafe { io.read_vectored(read.offset, &read.iovecs, 7).unwrap() };
        io.submit().unwrap();
        let result = wait(io.as_mut(), 7, IO_TIMEOUT).unwrap().unwrap();
        assert_eq!(result, CHUNK as i32);
        read.reply.complete(read.user_data, result);
    }
    drop(io);
    drop(lease);
    assert!(!node.bitmaps().is_recording());
    assert!(node.take_lease(Holder::Monitor).is_ok());
}

#[test]
fn a_dirty_range_whose_read_fails_stays_dirty() {
    let (_files, _, src, node) = one_raw_disk("dirty-fail.raw");
    let dp = Dataplane::start(&node, true);
    let disks = vda_on_d0();
    let mut source = BlockMigration::start(&src, &disks, migration()).unwrap();
    let mut buf = Vec::new();
    while source.next_chunk(&mut buf).unwrap().is_some() {}
    dp.write(2 << 20, pattern(4096, 12));
    assert_eq!(source.remaining(), 65536);
    dp.ignore_reads();
    source.set_timeout(Duration::from_millis(100));
    assert!(source.next_chunk(&mut buf).is_err());
    assert_eq!(
        source.remaining(),
        65536,
        "the range it could not copy is still to copy"
    );
    drop(source);
    let lease = dp.stop();
    drop(lease);
    assert!(node.take_lease(Holder::Monitor).is_ok());
}
