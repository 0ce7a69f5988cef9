//! Image activation with two graphs on one image, as two processes of a
//! migration on shared storage would have it.

use super::*;
use crate::migration::tests::{add, contents, qcow2_image, raw_image, temp, write_at, Files};

const SIZE: u64 = 1 << 20;

fn lock_error(path: &Path) -> String {
    format!(
        "Failed to get \"write\" lock: Is another process using the image [{}]?",
        path.display()
    )
}

/// Whether the 4 KiB at `at` all hold `value`.
fn filled(bytes: &[u8], at: u64, value: u8) -> bool {
    bytes[at as usize..at as usize + 4096]
        .iter()
        .all(|&b| b == value)
}

#[test]
fn the_image_goes_from_source_to_destination_and_never_to_both() {
    let path = raw_image("activate.raw", SIZE, false);
    let _files = Files(vec![path.clone()]);
    let source = Graph::new();
    add(&source, "d0", &path, ImageFormat::Raw);
    assert!(source.is_active());

    // An ordinary second open is kept out by the source's lock...
    let other = Graph::new();
    let err = other
        .add_image(
            "d0",
            false,
            FileOptions::new(path.clone()),
            ImageFormat::Raw,
        )
        .unwrap_err();
    assert_eq!(err.to_string(), lock_error(&path));
    // ...a destination opening inactive takes no lock.
    let dest = Graph::new();
    dest.inactivate_images().unwrap();
    add(&dest, "d0", &path, ImageFormat::Raw);
    assert!(!dest.is_active());
    let node = dest.get("d0", Holder::Monitor).unwrap();
    assert_eq!(
        node.take_lease(Holder::Monitor).unwrap_err().to_string(),
        "Node 'd0' is inactive: its image is handed over to the other side of a migration until the images are activated again"
    );
    assert_eq!(
        dest.activate_images().unwrap_err().to_string(),
        lock_error(&path),
        "the source still writes it"
    );
    assert!(!dest.is_active());
    assert!(node.take_lease(Holder::Monitor).is_err());

    // The source lets go only once nobody does I/O on it.
    let src_node = source.get("d0", Holder::Monitor).unwrap();
    let lease = src_node.take_lease(Holder::Job { id: "j".into() }).unwrap();
    assert_eq!(
        source.inactivate_images().unwrap_err().to_string(),
        "Cannot inactivate the images: node 'd0' is in use by block job 'j'"
    );
    assert!(source.is_active());
    write_at(&lease, 0, &[7; 512]);
    drop(lease);
    source.inactivate_images().unwrap();
    assert!(src_node.take_lease(Holder::Monitor).is_err());

    dest.activate_images().unwrap();
    assert!(dest.is_active());
    assert_eq!(&contents(&node)[..512], &[7; 512]);
    let lease = node.take_lease(Holder::Monitor).unwrap();
    write_at(&lease, 512, &[8; 512]);
    drop(lease);

    // Now the source cannot have it back (QEMU's `cont` after migrating).
    assert_eq!(
        source.activate_images().unwrap_err().to_string(),
        lock_error(&path)
    );
    assert!(!source.is_active());
    assert!(src_node.take_lease(Holder::Monitor).is_err());
    // Once the destination lets go, it can.
    dest.inactivate_images().unwrap();
    source.activate_images().unwrap();
    assert_eq!(
        &contents(&src_node)[..1024],
        &[[7u8; 512], [8; 512]].concat()[..]
    );
}

#[test]
fn a_read_only_node_takes_back_a_shared_lock_only() {
    let path = raw_image("activate-ro.raw", SIZE, false);
    let _files = Files(vec![path.clone()]);
    let a = Graph::new();
    a.add_image("d0", true, FileOptions::new(path.clone()), ImageFormat::Raw)
        .unwrap();
    a.inactivate_images().unwrap();
    a.activate_images().unwrap();
    // Another reader shares the image with it; a writer does not.
    let b = Graph::new();
    b.add_image("d0", true, FileOptions::new(path.clone()), ImageFormat::Raw)
        .unwrap();
    let c = Graph::new();
    assert!(c
        .add_image(
            "d0",
            false,
            FileOptions::new(path.clone()),
            ImageFormat::Raw
        )
        .is_err());
}

#[test]
fn a_qcow2_destination_reads_the_tables_the_source_wrote_after_it_opened() {
    let path = qcow2_image("activate.qcow2", 4 * SIZE);
    let copy = temp("activate-copy.qcow2");
    let _files = Files(vec![path.clone(), copy]);
    let source = Graph::new();
    add(&source, "d0", &path, ImageFormat::Qcow2);
    let dest = Graph::new();
    dest.inactivate_images().unwrap();
    add(&dest, "d0", &path, ImageFormat::Qcow2);
    let len_before = std::fs::metadata(&path).unwrap().len();

    // The source allocates clusters the destination's open never saw.
    let src_node = source.get("d0", Holder::Monitor).unwrap();
    let lease = src_node.take_lease(Holder::Monitor).unwrap();
    write_at(&lease, 3 * SIZE, &[5; 4096]);
    write_at(&lease, 0, &[6; 4096]);
    drop(lease);
    source.inactivate_images().unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() > len_before);

    dest.activate_images().unwrap();
    let node = dest.get("d0", Holder::Monitor).unwrap();
    let seen = contents(&node);
    assert!(filled(&seen, 3 * SIZE, 5));
    assert!(filled(&seen, 0, 6));
    // And it writes on from there without clobbering the source's clusters.
    let lease = node.take_lease(Holder::Monitor).unwrap();
    write_at(&lease, SIZE, &[9; 4096]);
    drop(lease);
    drop(node);
    drop(dest);
    drop(src_node);
    drop(source);
    let again = Graph::new();
    add(&again, "d0", &path, ImageFormat::Qcow2);
    let seen = contents(&again.get("d0", Holder::Monitor).unwrap());
    assert!(filled(&seen, 0, 6));
    assert!(filled(&seen, SIZE, 9));
    assert!(filled(&seen, 3 * SIZE, 5));
}
