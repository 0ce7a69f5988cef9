//! A qcow2 node's request path allocates nothing once warm, for clusters
//! already allocated: a burst of reads and writes through its engine is
//! counted by a global allocator that tallies this thread's allocations.

use std::time::{Duration, Instant};

use base::alloc_count::{allocations, Counting};
use block::driver::qcow2::Qcow2;
use block::driver::{Child, Driver, File, FileOptions};
use block::{AsyncIo, Locking};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A child node without a graph around it.
struct Node {
    name: String,
    driver: Box<dyn Driver<Node>>,
}

impl Child for Node {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &dyn Driver<Node> {
        self.driver.as_ref()
    }
}

/// `rounds` bursts of 32 requests (4 KiB reads and writes over the first
/// MiB), each burst waited for.
fn bursts(io: &mut dyn AsyncIo, bufs: &mut [Vec<u8>], iovs: &mut [[libc::iovec; 1]], rounds: u64) {
    for round in 0..rounds {
        for (k, (buf, iov)) in bufs.iter_mut().zip(iovs.iter_mut()).enumerate() {
            iov[0] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let off = ((k as u64 * 7 + round * 13) % 256) * 4096;
            // SAFETY: the buffers and iovecs outlive the wait below.
            unsafe {
                if k % 2 == 0 {
                    io.read_vectored(off, &iov[..], k as u64).unwrap();
                } else {
                    io.write_vectored(off, &iov[..], k as u64).unwrap();
                }
            }
        }
        io.submit().unwrap();
        let mut done = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while done < bufs.len() {
            assert!(Instant::now() < deadline, "completions did not arrive");
            match io.next_completion() {
                Some(c) => {
                    assert_eq!(c.result, 4096);
                    done += 1;
                }
                None => {
                    let _ = io.notifier().read();
                }
            }
        }
    }
}

#[test]
fn reads_and_writes_of_allocated_clusters_allocate_nothing() {
    let path = std::env::temp_dir().join(format!("qcow2-noalloc-{}.qcow2", std::process::id()));
    let status = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
        ])
        .arg(&path)
        .arg("4M")
        .status()
        .expect("qemu-img runs (scripts/test.sh installs qemu-utils)");
    assert!(status.success());
    let mut options = FileOptions::new(path.clone());
    options.locking = Locking::Off;
    let file = Node {
        name: "file".into(),
        driver: Box::new(File::open("file", &options, false).unwrap()),
    };
    let q = Qcow2::open("disk", file, None, false).unwrap();
    let notifier = block::io::new_notifier("test").unwrap();
    let mut io = q.open_io("disk", 64, &notifier).unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|k| vec![k as u8; 4096]).collect();
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut iovs = vec![[empty]; 32];
    // Warm: every cluster touched once, every list grown to its size.
    bursts(io.as_mut(), &mut bufs, &mut iovs, 16);
    let ((), n) = allocations(|| bursts(io.as_mut(), &mut bufs, &mut iovs, 8));
    assert_eq!(n, 0, "256 requests made {n} allocations");
    drop(io);
    drop(q);
    std::fs::remove_file(&path).unwrap();
}
