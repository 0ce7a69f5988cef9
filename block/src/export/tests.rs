//! The registry and the one access path: leases, holders, refusals.

use std::sync::Arc;

use super::*;
use crate::graph::{FileOptions, Graph};

fn options(id: &str, writable: bool) -> ExportOptions {
    ExportOptions {
        id: id.into(),
        name: id.into(),
        description: None,
        writable,
        bitmaps: Vec::new(),
    }
}

#[test]
fn an_export_holds_its_nodes_lease_and_a_reference_naming_it() {
    let path = std::env::temp_dir().join(format!("export-lease-{}", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let graph = Graph::new();
    graph
        .add_disk("d0", false, FileOptions::new(path.clone()))
        .unwrap();
    let exports = Exports::new(Arc::new(|_| ()));
    let node = graph.get("d0", Holder::Monitor).unwrap();
    // No server yet: QEMU's words.
    assert_eq!(
        exports
            .add(options("e0", false), &node)
            .unwrap_err()
            .to_string(),
        "NBD server not running"
    );
    let socket = std::env::temp_dir().join(format!("export-lease-{}.sock", std::process::id()));
    exports.start_nbd(NbdAddr::Unix(socket.clone()), 0).unwrap();
    assert!(matches!(
        exports.start_nbd(NbdAddr::Unix(socket.clone()), 0),
        Err(ExportError::ServerRunning)
    ));
    // Someone else (a running guest's dataplane) holds the lease.
    let dataplane = Holder::Dataplane {
        kind: "virtio-blk",
        id: "vda".into(),
    };
    let lease = node.take_lease(dataplane).unwrap();
    assert_eq!(
        exports
            .add(options("e0", false), &node)
            .unwrap_err()
            .to_string(),
        "Node 'd0' is busy: block device is in use by virtio-blk dataplane of device 'vda'"
    );
    drop(lease);
    exports.add(options("e0", false), &node).unwrap();
    assert_eq!(
        node.lease_holder(),
        Some(Holder::Export { id: "e0".into() })
    );
    assert!(node.holders().contains(&Holder::Export { id: "e0".into() }));
    assert_eq!(
        Holder::Export { id: "e0".into() }.to_string(),
        "block export 'e0'"
    );
    assert!(matches!(
        exports.add(options("e0", false), &node),
        Err(ExportError::DuplicateId { .. })
    ));
    let mut same_name = options("e1", false);
    same_name.name = "e0".into();
    assert_eq!(
        exports.add(same_name, &node).unwrap_err().to_string(),
        "NBD server already has export named 'e0'"
    );
    // Stopping the server deletes its exports and lets the node go.
    exports.stop_nbd().unwrap();
    assert!(exports.list().is_empty());
    assert_eq!(node.lease_holder(), None);
    assert!(!node.holders().contains(&Holder::Export { id: "e0".into() }));
    assert!(!socket.exists(), "the socket's name goes with the server");
    assert!(matches!(
        exports.stop_nbd(),
        Err(ExportError::ServerNotRunning)
    ));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_writable_export_of_a_read_only_node_is_refused() {
    let path = std::env::temp_dir().join(format!("export-ro-{}", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let graph = Graph::new();
    graph
        .add_disk("d0", true, FileOptions::new(path.clone()))
        .unwrap();
    let node = graph.get("d0", Holder::Monitor).unwrap();
    let holder = Holder::Export { id: "e".into() };
    assert_eq!(
        ExportAccess::open(&node, holder.clone(), true)
            .err()
            .unwrap()
            .to_string(),
        "Cannot export read-only node as writable"
    );
    assert!(ExportAccess::open(&node, holder, false).is_ok());
    std::fs::remove_file(path).unwrap();
}

/// A file of `len` bytes that goes with the value.
struct Temp(std::path::PathBuf);

impl Temp {
    fn new(tag: &str, len: u64) -> Self {
        let path = std::env::temp_dir().join(format!("export-{tag}-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        Temp(path)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn with_bitmaps(id: &str, writable: bool, specs: Vec<BitmapSpec>) -> ExportOptions {
    ExportOptions {
        bitmaps: specs,
        ..options(id, writable)
    }
}

fn local(name: &str) -> BitmapSpec {
    BitmapSpec::Local(name.into())
}

fn busy(node: &NodeRef, name: &str) -> bool {
    node.bitmaps()
        .info()
        .iter()
        .any(|b| b.name.as_deref() == Some(name) && b.busy)
}

#[test]
fn exported_bitmaps_are_found_checked_and_busy_while_the_export_lives() {
    use crate::driver::qcow2::create::{create, CreateOptions};
    use crate::graph::{BackingOptions, ChildOptions, DriverOptions, NodeOptions};

    const SIZE: u64 = 1 << 20;
    let disk = Temp::new("bm-disk", SIZE);
    let base = Temp::new("bm-base", SIZE);
    let over = Temp::new("bm-over", 0);
    create(
        &std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&over.0)
            .unwrap(),
        &CreateOptions::new(SIZE),
    )
    .unwrap();
    let graph = Graph::new();
    graph
        .add_disk("d0", false, FileOptions::new(disk.0.clone()))
        .unwrap();
    let other = Temp::new("bm-other", SIZE);
    graph
        .add_disk("d1", false, FileOptions::new(other.0.clone()))
        .unwrap();
    graph
        .add_disk("base", true, FileOptions::new(base.0.clone()))
        .unwrap();
    graph
        .add(NodeOptions {
            node_name: Some("over".into()),
            read_only: false,
            driver: DriverOptions::Qcow2 {
                file: ChildOptions::Inline(Box::new(NodeOptions {
                    node_name: None,
                    read_only: false,
                    driver: DriverOptions::File(FileOptions::new(over.0.clone())),
                })),
                backing: BackingOptions::Child(ChildOptions::Node("base".into())),
            },
        })
        .unwrap();
    let d0 = graph.get("d0", Holder::Monitor).unwrap();
    let base_node = graph.get("base", Holder::Monitor).unwrap();
    let over_node = graph.get("over", Holder::Monitor).unwrap();
    d0.bitmaps().add("on", SIZE, 65536, false, false).unwrap();
    d0.bitmaps().add("off", SIZE, 65536, false, true).unwrap();
    base_node
        .bitmaps()
        .add("deep", SIZE, 65536, false, false)
        .unwrap();
    let exports = Exports::new(Arc::new(|_| ()));
    let socket = std::env::temp_dir().join(format!("export-bm-{}.sock", std::process::id()));
    exports.start_nbd(NbdAddr::Unix(socket), 0).unwrap();
    let refused = |o: ExportOptions, node: &NodeRef| exports.add(o, node).unwrap_err().to_string();

    // QEMU's refusals, each leaving the node and bitmaps as they were.
    assert_eq!(
        refused(with_bitmaps("e", false, vec![local("nope")]), &d0),
        "Bitmap 'nope' is not found"
    );
    assert_eq!(
        refused(with_bitmaps("e", false, vec![local("on")]), &d0),
        "Enabled bitmap 'on' incompatible with readonly export"
    );
    let ext = |node: &str, name: &str, bitmaps: Option<&NodeRef>| BitmapSpec::External {
        node: node.into(),
        name: name.into(),
        bitmaps: bitmaps.map(|n| n.bitmaps().clone()),
    };
    assert_eq!(
        refused(with_bitmaps("e", false, vec![ext("nope", "on", None)]), &d0),
        "Node 'nope' not found"
    );
    assert_eq!(
        refused(
            with_bitmaps("e", false, vec![ext("d0", "nope", Some(&d0))]),
            &d0
        ),
        "Dirty bitmap 'nope' not found"
    );
    // A bitmap of the file below a format is not the node's (as in QEMU).
    assert_eq!(
        refused(with_bitmaps("e", false, vec![local("off")]), &over_node),
        "Bitmap 'off' is not found"
    );
    assert_eq!(d0.lease_holder(), None, "a refused export lets the node go");
    assert!(!busy(&d0, "off"));

    // Accepted: a disabled bitmap read-only, a name twice, an enabled one
    // named by node (QEMU checks only names), down the backing chain.
    exports
        .add(
            with_bitmaps("e0", false, vec![local("off"), local("off")]),
            &d0,
        )
        .unwrap();
    assert!(busy(&d0, "off"));
    assert_eq!(
        d0.bitmaps().remove("off").unwrap_err().to_string(),
        "Bitmap 'off' is currently in use by another operation and cannot be used"
    );
    exports
        .add(with_bitmaps("e1", false, vec![local("deep")]), &over_node)
        .unwrap();
    assert!(busy(&base_node, "deep"));
    exports.del("e1", DelMode::Safe).unwrap();
    assert!(!busy(&base_node, "deep"));
    exports.del("e0", DelMode::Safe).unwrap();
    assert!(!busy(&d0, "off"));
    exports
        .add(
            with_bitmaps("e2", true, vec![ext("d0", "on", Some(&d0))]),
            &d0,
        )
        .unwrap();
    exports
        .add(
            with_bitmaps("e3", false, vec![local("deep"), local("deep")]),
            &over_node,
        )
        .unwrap();
    // Busy: another export of a bitmap an export offers.
    let d1 = graph.get("d1", Holder::Monitor).unwrap();
    assert_eq!(
        refused(
            with_bitmaps("e4", false, vec![ext("base", "deep", Some(&base_node))]),
            &d1
        ),
        "Bitmap 'deep' is currently in use by another operation and cannot be used"
    );
    exports.stop_nbd().unwrap();
    assert!(!busy(&d0, "on") && !busy(&base_node, "deep"));
}
