//! Backing chains in the graph, on images `qemu-img` makes: opened from
//! the image's header, read-only, never probed, loops and missing files
//! refused with one line. (Beside `tests.rs`, which holds the rest of the
//! graph's tests, to keep each file to one subject.)

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::lock::Locking;

/// A fresh folder of images, removed at the end.
struct Folder(PathBuf);

impl Folder {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("block-backing-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// `qemu-img create` in this folder (so relative backing names are
    /// relative to it), `-u`: the backing file need not exist.
    fn qemu_img(&self, args: &[&str]) {
        let out = Command::new("qemu-img")
            .arg("create")
            .arg("-q")
            .args(args)
            .current_dir(&self.0)
            .output()
            .expect("qemu-img is needed for these tests (Debian: qemu-utils)");
        assert!(
            out.status.success(),
            "qemu-img create {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn raw(&self, name: &str) -> PathBuf {
        self.qemu_img(&["-f", "raw", name, "1M"]);
        self.path(name)
    }

    /// A qcow2 image over `backing` of `format`; with no format, the
    /// image records none (`qemu-img` no longer makes such images, so the
    /// backing format extension's type is overwritten with an unknown one,
    /// which readers skip).
    fn qcow2(&self, name: &str, backing: Option<(&str, Option<&str>)>) -> PathBuf {
        let mut args = vec!["-f", "qcow2", "-u"];
        if let Some((file, format)) = backing {
            args.extend(["-b", file, "-F", format.unwrap_or("raw")]);
        }
        args.extend([name, "1M"]);
        self.qemu_img(&args);
        let path = self.path(name);
        if let Some((_, None)) = backing {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let mut be = [0u8; 4];
            f.read_exact_at(&mut be, 100).unwrap();
            let ext = u64::from(u32::from_be_bytes(be));
            f.read_exact_at(&mut be, ext).unwrap();
            assert_eq!(u32::from_be_bytes(be), 0xe279_2aca, "the first extension");
            f.write_all_at(&0x7e57_0000u32.to_be_bytes(), ext).unwrap();
        }
        path
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn qcow2(name: &str, file: &Path, read_only: bool, backing: BackingOptions) -> NodeOptions {
    NodeOptions {
        node_name: Some(name.into()),
        read_only,
        driver: DriverOptions::Qcow2 {
            file: ChildOptions::Inline(Box::new(NodeOptions {
                node_name: None,
                read_only,
                driver: DriverOptions::File(FileOptions::new(file.to_path_buf())),
            })),
            backing,
        },
    }
}

fn node<'a>(nodes: &'a [NodeInfo], name: &str) -> &'a NodeInfo {
    nodes.iter().find(|n| n.name == name).unwrap()
}

fn child(n: &NodeInfo, role: &str) -> String {
    n.children
        .iter()
        .find(|(r, _)| *r == role)
        .unwrap()
        .1
        .clone()
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn a_chain_opens_from_the_headers_read_only_with_relative_names() {
    let dir = Folder::new("chain");
    let base = dir.raw("base.raw");
    let mid = dir.qcow2("mid.qcow2", Some(("base.raw", Some("raw"))));
    let top = dir.qcow2("top.qcow2", Some(("mid.qcow2", Some("qcow2"))));
    let graph = Graph::new();
    graph
        .add_image(
            "top",
            false,
            FileOptions::new(top.clone()),
            ImageFormat::Qcow2,
        )
        .unwrap();
    let nodes = graph.nodes();
    // qcow2 + file for top and mid, raw + file for the base.
    assert_eq!(nodes.len(), 6, "{:?}", names(&graph));
    let t = node(&nodes, "top");
    assert_eq!((t.driver, t.read_only, t.size), ("qcow2", false, 1 << 20));
    assert_eq!(t.backing_file.as_deref(), Some(show(&mid).as_str()));
    assert_eq!(t.backing_file_depth, 2);
    let m = node(&nodes, &child(t, "backing"));
    assert_eq!(
        (m.driver, m.read_only, m.filename.clone()),
        ("qcow2", true, show(&mid))
    );
    assert_eq!(m.backing_file_depth, 1);
    assert!(node(&nodes, &child(m, "file")).read_only);
    let b = node(&nodes, &child(m, "backing"));
    assert_eq!(
        (b.driver, b.read_only, b.filename.clone()),
        ("raw", true, show(&base))
    );
    assert!(node(&nodes, &child(b, "file")).read_only);
    assert_eq!(b.backing_file, None);

    // The image chain, as QEMU's ImageInfo shows it.
    let image = &t.image;
    assert_eq!((image.format, image.virtual_size), ("qcow2", 1 << 20));
    let details = image.details.as_ref().unwrap();
    assert_eq!(details.cluster_size, 65536);
    assert_eq!(details.backing_filename.as_deref(), Some("mid.qcow2"));
    assert_eq!(details.backing_format.as_deref(), Some("qcow2"));
    assert_eq!(image.full_backing_filename, Some(show(&mid)));
    let FormatSpecific::Qcow2(q) = details.specific.clone().unwrap();
    assert_eq!(
        (
            q.compat.as_str(),
            q.refcount_bits,
            q.corrupt,
            q.lazy_refcounts
        ),
        ("1.1", 16, Some(false), Some(false))
    );
    let mid_image = image.backing.as_ref().unwrap();
    assert_eq!(mid_image.filename, show(&mid));
    let base_image = mid_image.backing.as_ref().unwrap();
    assert_eq!(
        (base_image.format, base_image.details.clone()),
        ("raw", None)
    );
    assert!(base_image.backing.is_none());

    // `flat` leaves the chain out, as QEMU's does.
    let flat = graph.nodes_flat(true);
    let t = node(&flat, "top");
    assert!(t.image.backing.is_none());
    assert_eq!(t.backing_file_depth, 0);

    // The base is read by the chain: another reader may share it, a
    // writer may not.
    let reader = NodeOptions {
        node_name: Some("reader".into()),
        read_only: true,
        driver: DriverOptions::File(FileOptions::new(base.clone())),
    };
    graph.add(reader).unwrap();
    let writer = NodeOptions {
        node_name: Some("writer".into()),
        read_only: false,
        driver: DriverOptions::File(FileOptions::new(base.clone())),
    };
    let err = graph.add(writer).unwrap_err().to_string();
    assert!(err.starts_with("Failed to get \"write\" lock"), "{err}");

    // Dropping the user's name closes the whole chain.
    graph.remove("reader").unwrap();
    graph.remove("top").unwrap();
    assert!(graph.nodes().is_empty(), "{:?}", names(&graph));
}

#[test]
fn a_version_2_image_shows_qemus_compat_fields() {
    let dir = Folder::new("v2");
    dir.qemu_img(&[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4096",
        "old.qcow2",
        "1M",
    ]);
    let graph = Graph::new();
    graph
        .add_image(
            "old",
            true,
            FileOptions::new(dir.path("old.qcow2")),
            ImageFormat::Qcow2,
        )
        .unwrap();
    let nodes = graph.nodes();
    let details = node(&nodes, "old").image.details.clone().unwrap();
    assert_eq!(details.cluster_size, 4096);
    let FormatSpecific::Qcow2(q) = details.specific.unwrap();
    assert_eq!(q.compat, "0.10");
    assert_eq!(
        (q.lazy_refcounts, q.corrupt, q.extended_l2),
        (None, None, None)
    );
}

#[test]
fn backing_file_options_follow_the_overlays() {
    let dir = Folder::new("opts");
    dir.raw("base.raw");
    let top = dir.qcow2("top.qcow2", Some(("base.raw", Some("raw"))));
    let graph = Graph::new();
    let file = FileOptions {
        locking: Locking::Off,
        aio: crate::Aio::Sync,
        ..FileOptions::new(top)
    };
    graph
        .add_image("top", false, file, ImageFormat::Qcow2)
        .unwrap();
    let nodes = graph.nodes();
    let base = child(node(&nodes, "top"), "backing");
    let base_file = child(node(&nodes, &base), "file");
    let base_file = graph.get(&base_file, Holder::Monitor).unwrap();
    let options = base_file.driver().file_options().unwrap();
    assert_eq!(
        (options.locking, options.aio),
        (Locking::Off, crate::Aio::Sync)
    );
    assert_eq!(options.filename, dir.path("base.raw"));
}

#[test]
fn an_unrecorded_backing_format_is_refused_not_probed() {
    let dir = Folder::new("nofmt");
    dir.raw("base.raw");
    let top = dir.qcow2("top.qcow2", Some(("base.raw", None)));
    let graph = Graph::new();
    let err = graph
        .add_image(
            "top",
            false,
            FileOptions::new(top.clone()),
            ImageFormat::Qcow2,
        )
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "Node 'top': image '{t}' records backing file 'base.raw' but not its format, which is never probed; record it with 'qemu-img rebase -u -b base.raw -F raw|qcow2 {t}'",
            t = show(&top)
        )
    );
    assert!(graph.nodes().is_empty(), "{:?}", names(&graph));
}

#[test]
fn a_missing_backing_file_is_named() {
    let dir = Folder::new("missing");
    let top = dir.qcow2("top.qcow2", Some(("gone.raw", Some("raw"))));
    let graph = Graph::new();
    let err = graph
        .add_image("top", false, FileOptions::new(top), ImageFormat::Qcow2)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "Node 'top': cannot open backing file '{}': No such file or directory (os error 2)",
            show(&dir.path("gone.raw"))
        )
    );
    assert!(graph.nodes().is_empty(), "{:?}", names(&graph));
}

#[test]
fn backing_loops_are_refused_naming_the_file() {
    let dir = Folder::new("loop");
    let a = dir.qcow2("a.qcow2", Some(("b.qcow2", Some("qcow2"))));
    dir.qcow2("b.qcow2", Some(("a.qcow2", Some("qcow2"))));
    let graph = Graph::new();
    let err = graph
        .add_image("a", true, FileOptions::new(a.clone()), ImageFormat::Qcow2)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "Node 'a': image '{}' has backing file '{}', which is already in this backing chain (a loop)",
            show(&dir.path("b.qcow2")),
            show(&a)
        )
    );
    // An image naming itself, through a link to it.
    let own = dir.qcow2("own.qcow2", Some(("link.qcow2", Some("qcow2"))));
    std::os::unix::fs::symlink(&own, dir.path("link.qcow2")).unwrap();
    let err = graph
        .add_image(
            "own",
            true,
            FileOptions::new(own.clone()),
            ImageFormat::Qcow2,
        )
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "Node 'own': image '{}' has backing file '{}', which is already in this backing chain (a loop)",
            show(&own),
            show(&dir.path("link.qcow2"))
        )
    );
    assert!(graph.nodes().is_empty(), "{:?}", names(&graph));
}

#[test]
fn a_chain_longer_than_the_cap_is_refused() {
    let dir = Folder::new("deep");
    dir.raw("l0");
    for i in 1..=MAX_DEPTH {
        let below = format!("l{}", i - 1);
        let format = if i == 1 { "raw" } else { "qcow2" };
        dir.qcow2(&format!("l{i}"), Some((&below, Some(format))));
    }
    let graph = Graph::new();
    let top = dir.path(&format!("l{MAX_DEPTH}"));
    let err = graph
        .add_image("deep", true, FileOptions::new(top), ImageFormat::Qcow2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("at most {MAX_DEPTH} nodes may be stacked")),
        "{err}"
    );
    assert!(graph.nodes().is_empty(), "{:?}", names(&graph));
    // A chain that fits opens.
    let fits = dir.path("l4");
    graph
        .add_image("fits", true, FileOptions::new(fits), ImageFormat::Qcow2)
        .unwrap();
    assert_eq!(node(&graph.nodes(), "fits").backing_file_depth, 4);
}

#[test]
fn backing_can_be_none_a_read_only_node_or_inline() {
    let dir = Folder::new("explicit");
    let base = dir.raw("base.raw");
    let top = dir.qcow2("top.qcow2", Some(("base.raw", Some("raw"))));
    let graph = Graph::new();
    graph
        .add(qcow2("alone", &top, false, BackingOptions::None))
        .unwrap();
    let nodes = graph.nodes();
    let alone = node(&nodes, "alone");
    assert_eq!(
        (alone.backing_file.clone(), alone.children.len()),
        (None, 1)
    );
    // It still shows what the image records.
    assert_eq!(alone.image.full_backing_filename, Some(show(&base)));
    graph.remove("alone").unwrap();

    let base_node = |read_only| NodeOptions {
        node_name: Some("base".into()),
        read_only,
        driver: DriverOptions::Raw {
            file: ChildOptions::Inline(Box::new(NodeOptions {
                node_name: None,
                read_only,
                driver: DriverOptions::File(FileOptions::new(base.clone())),
            })),
        },
    };
    // A writable node may be a backing node, as in QEMU (fleecing puts
    // an overlay over a running guest's disk); the overlay only reads it.
    graph.add(base_node(false)).unwrap();
    let named = BackingOptions::Child(ChildOptions::Node("base".into()));
    graph.add(qcow2("top", &top, false, named.clone())).unwrap();
    assert!(
        !graph
            .nodes()
            .iter()
            .find(|n| n.name == "base")
            .unwrap()
            .read_only
    );
    graph.remove("top").unwrap();
    graph.remove("base").unwrap();
    graph.add(base_node(true)).unwrap();
    graph.add(qcow2("top", &top, false, named)).unwrap();
    let nodes = graph.nodes();
    assert_eq!(child(node(&nodes, "top"), "backing"), "base");
    assert_eq!(
        node(&nodes, "base").references,
        vec![
            Holder::Monitor,
            Holder::Parent {
                node: "top".into(),
                child: "backing"
            }
        ]
    );
    graph.remove("top").unwrap();
    graph.remove("base").unwrap();

    // Inline, the backing node opens read-only whatever it asks.
    let mut inline = base_node(false);
    inline.node_name = Some("inl".into());
    let backing = BackingOptions::Child(ChildOptions::Inline(Box::new(inline)));
    graph.add(qcow2("top", &top, false, backing)).unwrap();
    assert!(node(&graph.nodes(), "inl").read_only);
}

#[test]
fn inline_nesting_through_backing_counts_towards_the_cap() {
    let mut options = NodeOptions {
        node_name: None,
        read_only: true,
        driver: DriverOptions::Null { size: 1 << 20 },
    };
    for _ in 0..MAX_DEPTH {
        options = NodeOptions {
            node_name: None,
            read_only: true,
            driver: DriverOptions::Qcow2 {
                file: ChildOptions::Node("nowhere".into()),
                backing: BackingOptions::Child(ChildOptions::Inline(Box::new(options))),
            },
        };
    }
    options.node_name = Some("deep".into());
    let err = Graph::new().add(options).unwrap_err();
    assert!(
        matches!(err, BlockError::TooDeep { depth, .. } if depth == MAX_DEPTH + 1),
        "{err}"
    );
}

fn names(graph: &Graph) -> Vec<String> {
    graph.nodes().into_iter().map(|n| n.name).collect()
}

fn raw_node(name: &str, file: &Path, read_only: bool) -> NodeOptions {
    NodeOptions {
        node_name: Some(name.into()),
        read_only,
        driver: DriverOptions::Raw {
            file: ChildOptions::Inline(Box::new(NodeOptions {
                node_name: None,
                read_only,
                driver: DriverOptions::File(FileOptions::new(file.to_path_buf())),
            })),
        },
    }
}

/// Whether `qemu-img convert` (a reader that lets nobody write) may open
/// `path` beside us.
fn qemu_img_can_read(path: &Path) -> bool {
    let copy = path.with_extension("copy");
    Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(path)
        .arg(copy)
        .output()
        .expect("qemu-img")
        .status
        .success()
}

#[test]
fn an_overlay_goes_on_top_and_the_old_top_gives_up_writing() {
    let dir = Folder::new("append");
    let base = dir.raw("base.raw");
    let over = dir.qcow2("over.qcow2", Some(("base.raw", Some("raw"))));
    let graph = Graph::new();
    graph.add(raw_node("base", &base, false)).unwrap();
    graph
        .add(qcow2("over", &over, false, BackingOptions::None))
        .unwrap();
    assert!(
        !qemu_img_can_read(&base),
        "we write it: others may not read"
    );

    // While a dataplane holds the top, refused at once, naming it.
    let dev = graph.get("base", device("vda")).unwrap();
    let lease = dev.take_lease(dataplane("vda")).unwrap();
    let err = graph
        .append_overlay("base", "over", Holder::Monitor)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "Node 'base' is busy: block device is in use by virtio-blk dataplane of device 'vda'"
    );
    drop(lease);

    let appended = graph
        .append_overlay("base", "over", Holder::Monitor)
        .unwrap();
    // The top's lease is held until the caller has moved its devices.
    let err = dev.take_lease(dataplane("vda")).unwrap_err().to_string();
    assert!(err.contains("in use by the monitor"), "{err}");
    drop(appended);
    let nodes = graph.nodes();
    let o = node(&nodes, "over");
    assert_eq!(child(o, "backing"), "base");
    assert!(!o.read_only);
    assert_eq!(o.backing_file_depth, 1);
    let b = node(&nodes, "base");
    assert!(b.read_only);
    assert!(node(&nodes, &child(b, "file")).read_only);
    // The image has one writer no more: readers may share it, in this
    // graph and in other processes.
    graph.add(raw_node("reader", &base, true)).unwrap();
    assert!(qemu_img_can_read(&base));
    // And the device, moved over, may lease the overlay (and so the chain).
    drop(dev);
    let dev = graph.get("over", device("vda")).unwrap();
    dev.take_lease(dataplane("vda")).unwrap();
}

#[test]
fn overlays_that_cannot_go_on_top_are_refused_in_qemus_words() {
    let dir = Folder::new("append-bad");
    let base = dir.raw("base.raw");
    let over = dir.qcow2("over.qcow2", Some(("base.raw", Some("raw"))));
    let other = dir.raw("other.raw");
    let big = dir.path("big.qcow2");
    dir.qemu_img(&["-f", "qcow2", "big.qcow2", "2M"]);
    let graph = Graph::new();
    graph.add(raw_node("base", &base, false)).unwrap();
    graph.add(raw_node("other", &other, false)).unwrap();
    graph
        .add(qcow2("big", &big, false, BackingOptions::None))
        .unwrap();
    let err = |top: &str, overlay: &str| {
        graph
            .append_overlay(top, overlay, Holder::Monitor)
            .err()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        err("base", "other"),
        "The overlay does not support backing images"
    );
    assert_eq!(
        err("base", "nope"),
        "Cannot find device='nope' nor node-name='nope'"
    );
    assert_eq!(
        err("base", "big"),
        "The overlay 'big' is 2097152 bytes, but node 'base' it would cover is 1048576"
    );
    assert_eq!(
        err("big", "big"),
        "Making 'big' a backing child of itself would create a cycle"
    );
    // An overlay with a backing node already, or that a device uses.
    let null = NodeOptions {
        node_name: None,
        read_only: true,
        driver: DriverOptions::Null { size: 1 << 20 },
    };
    let backing = BackingOptions::Child(ChildOptions::Inline(Box::new(null)));
    graph.add(qcow2("chained", &over, true, backing)).unwrap();
    assert_eq!(
        err("other", "chained"),
        "The overlay already has a backing image"
    );
    graph.remove("chained").unwrap();
    graph
        .add(qcow2("over", &over, false, BackingOptions::None))
        .unwrap();
    let used = graph.get("over", device("vdb")).unwrap();
    assert_eq!(
        err("base", "over"),
        "The overlay is already in use, held by virtio-blk device 'vdb'"
    );
    drop(used);
    // A node under a parent cannot be covered: the parent would not see it.
    let base_file = child(node(&graph.nodes(), "base"), "file");
    assert_eq!(
        err(&base_file, "over"),
        format!("Node '{base_file}' is busy: node is used as 'file' child of 'base'")
    );
    // Nothing changed on the way.
    let nodes = graph.nodes();
    assert!(!node(&nodes, "base").read_only);
    assert_eq!(node(&nodes, "over").children.len(), 1);
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

#[test]
fn snapshot_on_reads_the_image_under_a_throwaway_overlay_that_leaves_no_file() {
    let dir = Folder::new("throwaway");
    let base = dir.raw("base.raw");
    let tmp = dir.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let graph = Graph::new();
    graph
        .add_snapshot_image(
            "vda",
            FileOptions::new(base.clone()),
            ImageFormat::Raw,
            &tmp,
        )
        .unwrap();
    // The overlay's name is gone at once; its open file is all there is.
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    let nodes = graph.nodes();
    let top = node(&nodes, "vda");
    assert_eq!(
        (top.driver, top.read_only, top.size),
        ("qcow2", false, 1 << 20)
    );
    let b = node(&nodes, &child(top, "backing"));
    assert_eq!((b.driver, b.read_only), ("raw", true));
    assert!(node(&nodes, &child(b, "file")).read_only);
    // The overlay records the image by its absolute path and format.
    let details = top.image.details.clone().unwrap();
    assert_eq!(details.backing_filename, Some(show(&base)));
    assert_eq!(details.backing_format.as_deref(), Some("raw"));
    // Others may read the image meanwhile: we never write it.
    assert!(qemu_img_can_read(&base));
    graph.remove("vda").unwrap();
    assert!(graph.nodes().is_empty());

    // A folder it cannot write: one line, nothing left open.
    let err = graph
        .add_snapshot_image(
            "vdb",
            FileOptions::new(base),
            ImageFormat::Raw,
            &dir.path("nope"),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("Node 'vdb': cannot create the temporary overlay")
            && err.ends_with("No such file or directory (os error 2)"),
        "{err}"
    );
    assert!(graph.nodes().is_empty(), "{:?}", names(&graph));
}
