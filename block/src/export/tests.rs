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
