use crate::lock::Locking;
use std::path::PathBuf;

use super::*;

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, len: u64) -> Self {
        let path = std::env::temp_dir().join(format!("block-graph-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn dataplane(id: &str) -> Holder {
    Holder::Dataplane {
        kind: "virtio-blk",
        id: id.into(),
    }
}

fn device(id: &str) -> Holder {
    Holder::Device {
        kind: "virtio-blk",
        id: id.into(),
    }
}

fn job(id: &str) -> Holder {
    Holder::Job { id: id.into() }
}

fn names(graph: &Graph) -> Vec<String> {
    graph.nodes().into_iter().map(|n| n.name).collect()
}

/// Open file descriptors of this process pointing at `path`.
fn fds_on(path: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|target| target == path)
        .count()
}

#[test]
fn a_disk_is_a_named_raw_node_over_an_unnamed_file_node() {
    let file = TempFile::new("disk", 1 << 20);
    let graph = Graph::new();
    graph
        .add_disk("drive0", false, FileOptions::new(file.0.clone()))
        .unwrap();
    let nodes = graph.nodes();
    assert_eq!(nodes.len(), 2);
    let raw = nodes.iter().find(|n| n.name == "drive0").unwrap();
    assert_eq!(raw.driver, "raw");
    assert_eq!(raw.size, 1 << 20);
    assert_eq!(raw.filename, file.0.display().to_string());
    assert_eq!(raw.references, vec![Holder::Monitor]);
    let (role, child) = &raw.children[0];
    assert_eq!(*role, "file");
    assert!(child.starts_with("#block"), "{child}");
    let file_node = nodes.iter().find(|n| &n.name == child).unwrap();
    assert_eq!(file_node.driver, "file");
    assert_eq!(
        file_node.references,
        vec![Holder::Parent {
            node: "drive0".into(),
            child: "file"
        }]
    );
}

#[test]
fn a_node_lives_while_any_reference_does_and_closes_with_the_last() {
    let file = TempFile::new("life", 1 << 20);
    let graph = Graph::new();
    graph
        .add_disk("drive0", false, FileOptions::new(file.0.clone()))
        .unwrap();
    assert_eq!(fds_on(&file.0), 1);
    let held = graph.get("drive0", device("vda")).unwrap();
    // The user's name goes once nobody else holds the node; here a device does.
    let err = graph.remove("drive0").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Node 'drive0' is in use by virtio-blk device 'vda'"
    );
    assert_eq!(
        names(&graph).len(),
        2,
        "a refused blockdev-del closes nothing"
    );
    drop(held);
    graph.remove("drive0").unwrap();
    assert!(
        names(&graph).is_empty(),
        "both nodes closed with the last reference"
    );
    assert_eq!(fds_on(&file.0), 0, "the host file is closed");
    // The name is free again.
    graph
        .add_disk("drive0", false, FileOptions::new(file.0.clone()))
        .unwrap();
}

#[test]
fn a_reference_outlives_the_users_name() {
    let file = TempFile::new("outlive", 1 << 20);
    let graph = Graph::new();
    graph
        .add(NodeOptions {
            node_name: Some("f0".into()),
            read_only: false,
            driver: DriverOptions::File(FileOptions::new(file.0.clone())),
        })
        .unwrap();
    graph
        .add(NodeOptions {
            node_name: Some("r0".into()),
            read_only: false,
            driver: DriverOptions::Raw {
                file: ChildOptions::Node("f0".into()),
            },
        })
        .unwrap();
    let err = graph.remove("f0").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Node 'f0' is in use by node 'r0' (as its 'file' child)"
    );
    graph.remove("r0").unwrap();
    // r0 is gone; f0 lost its parent and can go now.
    graph.remove("f0").unwrap();
    assert!(names(&graph).is_empty());
}

#[test]
fn blockdev_del_of_unknown_or_unnamed_nodes_is_refused() {
    let file = TempFile::new("del", 1 << 20);
    let graph = Graph::new();
    graph
        .add_disk("drive0", false, FileOptions::new(file.0.clone()))
        .unwrap();
    assert_eq!(
        graph.remove("nope").unwrap_err().to_string(),
        "Cannot find device='nope' nor node-name='nope'"
    );
    let child = graph.nodes()[0].name.clone();
    assert!(child.starts_with('#'));
    assert_eq!(
        graph.remove(&child).unwrap_err().to_string(),
        format!("Node '{child}' is not owned by the monitor")
    );
}

#[test]
fn leases_are_exclusive_and_name_their_holder() {
    let file = TempFile::new("lease", 1 << 20);
    let graph = Graph::new();
    graph
        .add_disk("drive0", false, FileOptions::new(file.0.clone()))
        .unwrap();
    let node = graph.get("drive0", device("vda")).unwrap();
    let lease = node.take_lease(dataplane("vda")).unwrap();
    let err = node.take_lease(job("job0")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Node 'drive0' is busy: block device is in use by virtio-blk dataplane of device 'vda'"
    );
    let info = graph.info(&node);
    assert_eq!(info.lease, Some(dataplane("vda")));
    // The lease covers the child too: nobody writes under the dataplane.
    let child = graph.get(&info.children[0].1, job("job0")).unwrap();
    let err = child.take_lease(job("job0")).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("is busy: block device is in use by virtio-blk dataplane of device 'vda'"),
        "{err}"
    );
    drop(lease);
    assert_eq!(graph.info(&node).lease, None, "released on drop");
    let lease = child.take_lease(job("job0")).unwrap();
    // A lease below blocks a lease above.
    let err = node.take_lease(dataplane("vda")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Node '{}' is busy: block device is in use by block job 'job0'",
            child.name()
        )
    );
    drop(lease);
    node.take_lease(dataplane("vda")).unwrap();
}

#[test]
fn a_held_lease_keeps_its_node_alive() {
    let file = TempFile::new("alive", 1 << 20);
    let graph = Graph::new();
    graph
        .add_disk("drive0", false, FileOptions::new(file.0.clone()))
        .unwrap();
    let node = graph.get("drive0", job("job0")).unwrap();
    let lease = node.take_lease(job("job0")).unwrap();
    drop(node);
    // The lease holder's reference is there for blockdev-del to see.
    assert_eq!(
        graph.remove("drive0").unwrap_err().to_string(),
        "Node 'drive0' is in use by block job 'job0'"
    );
    assert!(lease.open_io(4).is_ok());
    drop(lease);
    graph.remove("drive0").unwrap();
    assert!(names(&graph).is_empty());
}

#[test]
fn releasing_a_lease_never_closes_a_node() {
    let file = TempFile::new("release", 1 << 20);
    let graph = Graph::new();
    graph
        .add_disk("drive0", false, FileOptions::new(file.0.clone()))
        .unwrap();
    let node = graph.get("drive0", device("vda")).unwrap();
    drop(node.take_lease(dataplane("vda")).unwrap());
    assert_eq!(names(&graph).len(), 2);
    assert_eq!(fds_on(&file.0), 1);
}

#[test]
fn names_follow_qemus_rules_and_are_unique() {
    let file = TempFile::new("names", 1 << 20);
    let graph = Graph::new();
    for bad in ["0drive", "#block001", "", "a b", &"x".repeat(32)] {
        let err = graph
            .add_disk(bad, false, FileOptions::new(file.0.clone()))
            .unwrap_err();
        assert!(
            matches!(
                err,
                BlockError::InvalidName { .. } | BlockError::NameTooLong { .. }
            ),
            "{bad}: {err}"
        );
    }
    graph
        .add_disk("d", false, FileOptions::new(file.0.clone()))
        .unwrap();
    let err = graph
        .add(NodeOptions {
            node_name: Some("d".into()),
            read_only: false,
            driver: DriverOptions::Null { size: 4096 },
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "Duplicate nodes with node-name='d'");
    // A refused node opens nothing: the file is open once, by 'd'.
    assert_eq!(fds_on(&file.0), 1);
    let err = graph
        .add(NodeOptions {
            node_name: None,
            read_only: false,
            driver: DriverOptions::Null { size: 4096 },
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("'node-name' must be specified"),
        "{err}"
    );
}

#[test]
fn a_raw_node_refuses_writes_it_cannot_pass_down() {
    let file = TempFile::new("ro", 1 << 20);
    let graph = Graph::new();
    graph
        .add(NodeOptions {
            node_name: Some("f0".into()),
            read_only: true,
            driver: DriverOptions::File(FileOptions::new(file.0.clone())),
        })
        .unwrap();
    let err = graph
        .add(NodeOptions {
            node_name: Some("r0".into()),
            read_only: false,
            driver: DriverOptions::Raw {
                file: ChildOptions::Node("f0".into()),
            },
        })
        .unwrap_err();
    assert!(err.to_string().contains("child 'f0' is read-only"), "{err}");
    assert_eq!(names(&graph), vec!["f0".to_string()]);
}

#[test]
fn missing_children_and_files_are_named() {
    let graph = Graph::new();
    let err = graph
        .add(NodeOptions {
            node_name: Some("r0".into()),
            read_only: false,
            driver: DriverOptions::Raw {
                file: ChildOptions::Node("ghost".into()),
            },
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Cannot find device='ghost' nor node-name='ghost'"
    );
    let err = graph
        .add_disk("d", false, FileOptions::new("/nonexistent/x.img".into()))
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot open disk '/nonexistent/x.img'"),
        "{err}"
    );
    assert!(names(&graph).is_empty());
}

#[test]
fn null_nodes_read_zeros_through_their_lease() {
    let graph = Graph::new();
    graph
        .add(NodeOptions {
            node_name: Some("n0".into()),
            read_only: false,
            driver: DriverOptions::Null { size: 1 << 30 },
        })
        .unwrap();
    let node = graph.get("n0", job("bench")).unwrap();
    let info = graph.info(&node);
    assert_eq!((info.driver, info.size), ("null-co", 1 << 30));
    assert_eq!(info.filename, "null-co://");
    let lease = node.take_lease(job("bench")).unwrap();
    let mut io = lease.open_io(8).unwrap();
    let mut buf = vec![1u8; 512];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the buffer outlives the completion reaped below.
    unsafe { io.read_vectored(0, &iov, 1).unwrap() };
    io.submit().unwrap();
    assert_eq!(io.next_completion().unwrap().result, 512);
    assert!(buf.iter().all(|&b| b == 0));
    assert!(matches!(
        Graph::new().add(NodeOptions {
            node_name: Some("odd".into()),
            read_only: false,
            driver: DriverOptions::Null { size: 1000 },
        }),
        Err(BlockError::Options { .. })
    ));
}

fn file_options(name: &str, path: &std::path::Path, read_only: bool) -> NodeOptions {
    NodeOptions {
        node_name: Some(name.into()),
        read_only,
        driver: DriverOptions::File(FileOptions {
            locking: Locking::Off,
            ..FileOptions::new(path.to_path_buf())
        }),
    }
}

/// The found defect: a second node on the image a disk serves let a job
/// write the live disk. With image locks off, only the graph's own claim
/// stands in the way, and it names the node that has the file open.
#[test]
fn a_second_node_on_an_image_in_use_is_refused_naming_the_node() {
    let file = TempFile::new("twice", 1 << 20);
    let link = file.0.with_extension("link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&file.0, &link).unwrap();
    let graph = Graph::new();
    graph
        .add_disk(
            "drive0",
            false,
            FileOptions {
                locking: Locking::Off,
                ..FileOptions::new(file.0.clone())
            },
        )
        .unwrap();
    let err = graph.add(file_options("tgt", &link, false)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Failed to get \"write\" lock: image '{}' is already open in node '#block001', held by node 'drive0' (as its 'file' child)",
            link.display()
        )
    );
    // Reading an image someone writes is refused too, also inline.
    let err = graph
        .add(NodeOptions {
            node_name: Some("r".into()),
            read_only: true,
            driver: DriverOptions::Raw {
                file: ChildOptions::Inline(Box::new(file_options("f", &file.0, true))),
            },
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Failed to get shared \"write\" lock: image"),
        "{err}"
    );
    assert_eq!(names(&graph).len(), 2, "nothing was left open");
    // Once the disk's nodes close, the image is free; readers share it and
    // keep a writer out.
    graph.remove("drive0").unwrap();
    graph.add(file_options("ro1", &file.0, true)).unwrap();
    graph.add(file_options("ro2", &link, true)).unwrap();
    let err = graph.add(file_options("rw", &file.0, false)).unwrap_err();
    assert!(
        matches!(&err, BlockError::ImageInUse { node, shared: false, .. } if node == "ro1"),
        "{err}"
    );
    graph.remove("ro1").unwrap();
    graph.remove("ro2").unwrap();
    graph.add(file_options("rw", &file.0, false)).unwrap();
    std::fs::remove_file(&link).unwrap();
}

/// With image locks on (the default), our own second open is still named
/// as ours, not blamed on "another process".
#[test]
fn image_locks_do_not_hide_which_node_has_the_file() {
    let file = TempFile::new("locked", 1 << 20);
    let graph = Graph::new();
    graph
        .add_disk("drive0", false, FileOptions::new(file.0.clone()))
        .unwrap();
    let mut options = file_options("tgt", &file.0, false);
    options.driver = DriverOptions::File(FileOptions {
        locking: Locking::On,
        ..FileOptions::new(file.0.clone())
    });
    let err = graph.add(options).unwrap_err();
    assert!(
        err.to_string()
            .contains("is already open in node '#block001'"),
        "{err}"
    );
    // Another graph in this process is another user of the image, as a
    // second process would be: only the image locks see it.
    let other = Graph::new();
    let err = other
        .add_disk("d", false, FileOptions::new(file.0.clone()))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Failed to get \"write\" lock: Is another process using the image [{}]?",
            file.0.display()
        )
    );
    // Closing the node lets its locks go at once, even after an io_uring
    // had the file registered (the kernel drops a ring's files later).
    let node = graph.get("drive0", job("j")).unwrap();
    let lease = node.take_lease(job("j")).unwrap();
    let io = lease.open_io(4).unwrap();
    drop((io, lease, node));
    graph.remove("drive0").unwrap();
    other
        .add_disk("d", false, FileOptions::new(file.0.clone()))
        .unwrap();
}

fn raw_over(name: &str, child: &str) -> NodeOptions {
    NodeOptions {
        node_name: Some(name.into()),
        read_only: false,
        driver: DriverOptions::Raw {
            file: ChildOptions::Node(child.into()),
        },
    }
}

#[test]
fn node_chains_stop_at_the_depth_cap() {
    let graph = Graph::new();
    graph
        .add(NodeOptions {
            node_name: Some("r1".into()),
            read_only: false,
            driver: DriverOptions::Null { size: 4096 },
        })
        .unwrap();
    for i in 2..=MAX_DEPTH {
        graph
            .add(raw_over(&format!("r{i}"), &format!("r{}", i - 1)))
            .unwrap();
    }
    let top = graph.get(&format!("r{MAX_DEPTH}"), job("j")).unwrap();
    assert_eq!(top.depth(), MAX_DEPTH);
    let err = graph
        .add(raw_over("deep", &format!("r{MAX_DEPTH}")))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Node 'deep' would be 17 nodes deep; at most 16 nodes may be stacked"
    );
    // An inline nesting is refused before any of it opens.
    let mut nested = NodeOptions {
        node_name: None,
        read_only: false,
        driver: DriverOptions::Null { size: 4096 },
    };
    for _ in 0..MAX_DEPTH {
        nested = NodeOptions {
            node_name: None,
            read_only: false,
            driver: DriverOptions::Raw {
                file: ChildOptions::Inline(Box::new(nested)),
            },
        };
    }
    nested.node_name = Some("inline".into());
    let before = names(&graph).len();
    let err = graph.add(nested).unwrap_err();
    assert!(
        matches!(err, BlockError::TooDeep { ref node, depth: 17 } if node == "inline"),
        "{err}"
    );
    assert_eq!(names(&graph).len(), before);
}

/// A lookup that upgrades a node's weak entry while holding the registry's
/// lock would, if the other owners let go meanwhile, close the node under
/// that lock; closing takes the same lock, so the thread would hang.
#[test]
fn lookups_racing_the_last_reference_never_hang() {
    use std::sync::mpsc;
    use std::time::Duration;

    let graph = Arc::new(Graph::new());
    let null = |name: &str| NodeOptions {
        node_name: Some(name.into()),
        read_only: false,
        driver: DriverOptions::Null { size: 4096 },
    };
    let (done, finished) = mpsc::channel();
    let mut threads = Vec::new();
    for t in 0..2 {
        let graph = graph.clone();
        let done = done.clone();
        threads.push(std::thread::spawn(move || {
            for _ in 0..200_000 {
                if t == 0 {
                    // Make and close the node, over and over.
                    let _ = graph.add(null("n"));
                    let _ = graph.remove("n");
                } else {
                    // Look it up every way the graph does.
                    let _ = graph.add(null("n"));
                    let _ = graph.remove("n");
                    let _ = graph.get("n", job("j"));
                    let _ = graph.nodes();
                    let _ = graph.remove("m");
                }
            }
            done.send(()).unwrap();
        }));
    }
    for _ in 0..2 {
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("a thread hung: a node was closed under the registry lock");
    }
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_raw_disk_must_be_whole_sectors_but_its_file_need_not() {
    let odd = TempFile::new("odd", 1000);
    let graph = Graph::new();
    let err = graph
        .add_disk("drive0", false, FileOptions::new(odd.0.clone()))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "disk '{}' is 1000 bytes, not a whole number of 512-byte sectors",
            odd.0.display()
        )
    );
    assert!(names(&graph).is_empty(), "nothing is left open");
}

#[test]
fn the_node_with_a_file_open_is_found_by_any_path_to_it() {
    let file = TempFile::new("with-file", 1 << 20);
    let other = TempFile::new("with-file-other", 1 << 20);
    let link = file.0.with_extension("link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&file.0, &link).unwrap();
    let graph = Graph::new();
    graph
        .add_disk("drive0", false, FileOptions::new(file.0.clone()))
        .unwrap();
    let file_node = graph
        .nodes()
        .into_iter()
        .find(|n| n.driver == "file")
        .unwrap()
        .name;
    assert_eq!(graph.node_with_file(&file.0), Some(file_node.clone()));
    assert_eq!(graph.node_with_file(&link), Some(file_node));
    assert_eq!(graph.node_with_file(&other.0), None);
    assert_eq!(
        graph.node_with_file(std::path::Path::new("/nonexistent")),
        None
    );
    std::fs::remove_file(&link).unwrap();
}
