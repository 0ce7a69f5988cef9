//! Fleecing without KVM: a writer on the source's holder thread (as a
//! dataplane with live-jobs=on would be) writes all the time, a backup
//! with sync=none keeps the old data of what it overwrites in an overlay
//! whose backing node is the source, and a reader of the overlay through
//! the job (as an export would be) must only ever see the source as it
//! was when the job started. Reads and writes aim at the same few ranges,
//! so that a read of a range from the backing node and a write to it meet
//! as often as they can.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::driver::qcow2::create::{create, CreateOptions};
use crate::graph::{
    BackingOptions, ChildOptions, DriverOptions, FileOptions, Graph, Host, NodeOptions,
};
use crate::job::{JobManager, JobOptions};

const SIZE: u64 = 4 << 20;

use base::xorshift::XorShift64 as Rng;

struct Files(Vec<PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("block-fleece-{}-{name}", std::process::id()))
}

/// Waits for `n` completions of `io`.
fn wait(io: &mut dyn AsyncIo, n: usize) -> Vec<crate::io::Completion> {
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < n {
        assert!(Instant::now() < deadline, "completions did not arrive");
        match io.next_completion() {
            Some(c) => done.push(c),
            None => {
                let _ = io.submit_and_wait(1, Duration::from_millis(5));
                let _ = io.notifier().read();
            }
        }
    }
    done
}

/// The holder's thread: carries out hosted reads, and writes random data
/// to the few hot ranges, each write held until the hooks let it go.
fn holder(lease: Lease, host: Arc<Host>, stop: Arc<AtomicBool>, hot: Vec<u64>) -> u64 {
    let mut engine = lease.open_io(64).unwrap();
    let mut rng = Rng(0x5eed);
    let mut writes = 0;
    let mut held: Option<(u64, Vec<u8>, Vec<u64>)> = None;
    let mut released = Vec::new();
    let mut reads = Vec::new();
    while !stop.load(Ordering::Acquire) {
        // Hosted reads first, as the dataplane serves them between its own.
        if host.has_work() {
            host.take_released(&mut released);
            host.take_reads(&mut reads);
            for (k, read) in reads.iter().enumerate() {
                // SAFETY: the reader keeps its buffers until it has the
                // completion, handed back below after the engine is done.
                unsafe {
                    engine
                        .read_vectored(read.offset, &read.iovecs, k as u64)
                        .unwrap()
                };
            }
            engine.submit().unwrap();
            for c in wait(engine.as_mut(), reads.len()) {
                let read = &reads[c.user_data as usize];
                read.reply.complete(read.user_data, c.result);
            }
            reads.clear();
        }
        if let Some((_, _, tickets)) = held.as_mut() {
            tickets.retain(|t| !released.contains(t));
            released.clear();
            if !tickets.is_empty() {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            let (offset, data, _) = held.take().unwrap();
            let iov = [libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: data.len(),
            }];
            // SAFETY: `data` outlives the wait.
            unsafe { engine.write_vectored(offset, &iov, 1 << 40).unwrap() };
            engine.submit().unwrap();
            assert!(wait(engine.as_mut(), 1)[0].result > 0);
            writes += 1;
            continue;
        }
        let offset = hot[(rng.next() % hot.len() as u64) as usize] + (rng.next() % 16) * 4096;
        let data = vec![(rng.next() | 1) as u8; 4096];
        let mut tickets = Vec::new();
        host.before_write(offset, 4096, &mut tickets);
        held = Some((offset, data, tickets));
    }
    writes
}

#[test]
fn a_fleecing_reader_sees_the_source_as_it_was_while_a_writer_races_it() {
    let src_path = temp("src.raw");
    let fleece_path = temp("fleece.qcow2");
    let _files = Files(vec![src_path.clone(), fleece_path.clone()]);
    let mut rng = Rng(7);
    let reference: Vec<u8> = (0..SIZE).map(|_| rng.next() as u8).collect();
    std::fs::write(&src_path, &reference).unwrap();
    let fleece_file = std::fs::File::create(&fleece_path).unwrap();
    let mut options = CreateOptions::new(SIZE);
    options.backing = Some((src_path.display().to_string(), "raw".into()));
    create(&fleece_file, &options).unwrap();
    drop(fleece_file);

    let graph = Graph::new();
    graph
        .add(NodeOptions {
            node_name: Some("src".into()),
            read_only: false,
            driver: DriverOptions::File(FileOptions::new(src_path.clone())),
        })
        .unwrap();
    graph
        .add(NodeOptions {
            node_name: Some("fleece".into()),
            read_only: false,
            driver: DriverOptions::Qcow2 {
                file: ChildOptions::Inline(Box::new(NodeOptions {
                    node_name: None,
                    read_only: false,
                    driver: DriverOptions::File(FileOptions::new(fleece_path.clone())),
                })),
                backing: BackingOptions::Child(ChildOptions::Node("src".into())),
            },
        })
        .unwrap();
    // The guest's holder, hosting.
    let src = graph.get("src", Holder::Monitor).unwrap();
    let dataplane = Holder::Dataplane {
        kind: "virtio-blk",
        id: "vda".into(),
    };
    let lease = src.take_lease(dataplane).unwrap();
    let host = lease.offer_hosting().unwrap();

    let job = Holder::Job {
        id: "fleece0".into(),
    };
    let source = graph.get("src", job.clone()).unwrap();
    let target = graph.get("fleece", job).unwrap();
    let backup = Backup::live("fleece0", &source, &target, SyncMode::None, None).unwrap();
    let jobs = JobManager::new();
    let events: crate::job::EventSink = Arc::new(|_| {});
    jobs.create("fleece0", Box::new(backup), JobOptions::default(), events)
        .unwrap();
    jobs.start("fleece0").unwrap();

    // The reader: an export of the overlay, hosted by the job.
    let export = Holder::Job {
        id: "export".into(),
    };
    let fleece = graph.get("fleece", Holder::Monitor).unwrap();
    let access = fleece.take_access(export, true).unwrap();
    assert!(
        matches!(access, Access::Hosted(_)),
        "the job hosts the reader"
    );
    let mut reader = access.open_io(8).unwrap();

    let hot: Vec<u64> = (0..6).map(|k| k * (640 << 10)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (host, stop, hot) = (host.clone(), stop.clone(), hot.clone());
        std::thread::spawn(move || holder(lease, host, stop, hot))
    };
    let seen = Arc::new(Mutex::new(0u64));
    let started = Instant::now();
    let mut reads = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let offset = hot[(rng.next() % hot.len() as u64) as usize] + (rng.next() % 8) * 8192;
        let len = 4096 * (1 + rng.next() % 32) as usize;
        let len = len.min((SIZE - offset) as usize);
        let mut buf = vec![0u8; len];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        }];
        // SAFETY: `buf` outlives the wait.
        unsafe { reader.read_vectored(offset, &iov, 1).unwrap() };
        reader.submit().unwrap();
        let c = wait(reader.as_mut(), 1);
        assert_eq!(c[0].result, len as i32);
        assert!(
            buf == reference[offset as usize..offset as usize + len],
            "read {reads} at {offset}+{len} differs from the source at the job's start"
        );
        reads += 1;
    }
    *seen.lock().unwrap() = reads;
    stop.store(true, Ordering::Release);
    let writes = writer.join().unwrap();
    jobs.cancel("fleece0").unwrap();
    assert!(writes > 100, "the writer wrote ({writes})");
    assert!(reads > 100, "the reader read ({reads})");
    let now = std::fs::read(&src_path).unwrap();
    assert!(now != reference, "the source changed under the reader");
}
