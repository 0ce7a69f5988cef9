//! External snapshots: a new overlay goes on top of a node, which becomes
//! its read-only backing node.
//!
//! ```text
//!  before:  device ─► [top] ─ file ─► image          [overlay] (backing: null)
//!  after:   device ─► [overlay] ─ backing ─► [top, read-only] ─ file ─► image
//! ```
//!
//! The graph puts the overlay in place and gives up the top's writes; the
//! caller (the monitor) then moves the devices that served the top to the
//! overlay, while the returned [`Appended`] still holds the top's lease,
//! so no dataplane can start on the old top in between.

use std::fs::OpenOptions;
use std::path::Path;

use base::sync::lock;

use super::{
    image_options, BackingOptions, ChildOptions, DriverOptions, FileOptions, Graph, Holder,
    ImageFormat, Lease, NodeOptions, NodeRef,
};
use crate::driver::qcow2::create::{self, CreateOptions};
use crate::driver::Qcow2;
use crate::error::BlockError;

/// An overlay just put in place.
pub struct Appended {
    /// The new overlay, referenced for the caller.
    pub overlay: NodeRef,
    /// The lease on the old top (and the chain below it), held until the
    /// caller has moved its devices.
    _lease: Lease,
}

impl Graph {
    /// `blockdev-snapshot`: puts the qcow2 node `overlay` (added by the
    /// user with no backing node, and used by nobody else) above the node
    /// `top`, as QEMU's `bdrv_append` does. Refused at once, naming the
    /// holder, while someone holds `top`'s lease (a running dataplane).
    /// `holder` names the caller in leases and references.
    pub fn append_overlay(
        &self,
        top: &str,
        overlay: &str,
        holder: Holder,
    ) -> Result<Appended, BlockError> {
        let top_ref = self.get(top, holder.clone())?;
        let over = self.get(overlay, holder.clone())?;
        // A parent would keep reading the old top directly, under the
        // overlay's writes; QEMU refuses this too.
        if let Some(Holder::Parent { node, child }) = top_ref
            .holders()
            .into_iter()
            .find(|h| matches!(h, Holder::Parent { .. }))
        {
            return Err(BlockError::ChildOfParent {
                node: top.into(),
                parent: node,
                child: if child == "backing" {
                    "backing hd".into()
                } else {
                    format!("'{child}' child")
                },
            });
        }
        if top_ref.same_node(&over) {
            return Err(BlockError::OverlayCycle {
                overlay: overlay.into(),
            });
        }
        // Only the user's name may hold it: a device or a parent would see
        // it change under them.
        let mut others = over.holders();
        if let Some(at) = others.iter().position(|h| *h == holder) {
            others.remove(at);
        }
        let named = others.iter().position(|h| *h == Holder::Monitor);
        if let Some(at) = named {
            others.remove(at);
        }
        if named.is_none() || !others.is_empty() {
            return Err(BlockError::OverlayInUse {
                overlay: overlay.into(),
                holders: others.iter().map(|h| h.to_string()).collect(),
            });
        }
        let driver = over.driver();
        if driver.name() != "qcow2" {
            return Err(BlockError::OverlayNoBacking {
                overlay: overlay.into(),
            });
        }
        if driver.backing().is_some() {
            return Err(BlockError::OverlayHasBacking {
                overlay: overlay.into(),
            });
        }
        let (over_size, top_size) = (driver.size(), top_ref.driver().size());
        if over_size != top_size {
            return Err(BlockError::OverlaySize {
                overlay: overlay.into(),
                size: over_size,
                node: top.into(),
                node_size: top_size,
            });
        }
        let Some((_, file)) = driver.children().into_iter().find(|(r, _)| *r == "file") else {
            return Err(BlockError::OverlayNoBacking {
                overlay: overlay.into(),
            });
        };
        let depth = 1 + file.depth().max(top_ref.depth());
        if depth > super::MAX_DEPTH {
            return Err(BlockError::TooDeep {
                node: overlay.into(),
                depth,
            });
        }
        // Nobody may use either while they change: a dataplane on the top
        // is the refusal the mission asks for, at once and by name.
        let lease = top_ref.take_lease(holder.clone())?;
        let over_lease = over.take_lease(holder.clone())?;
        let parent = |child| Holder::Parent {
            node: overlay.to_string(),
            child,
        };
        let file = file.clone_for(parent("file"));
        let read_only = over.read_only();

        // The old overlay node closes before the new one opens on the same
        // image, so that whatever it cached is written back first.
        drop(over_lease);
        drop(over);
        let old = lock(&self.named).remove(overlay);
        drop(old);

        let backing = top_ref.clone_for(parent("backing"));
        let opened = Qcow2::open(
            overlay,
            file.clone_for(parent("file")),
            Some(backing),
            read_only,
        )
        .and_then(|d| {
            self.register(
                overlay.into(),
                read_only,
                Box::new(d),
                None,
                Holder::Monitor,
            )
        });
        let node = match opened {
            Ok(node) => node,
            Err(e) => {
                // Put the overlay back as it was, alone.
                let restored = Qcow2::open(overlay, file, None, read_only).and_then(|d| {
                    self.register(
                        overlay.into(),
                        read_only,
                        Box::new(d),
                        None,
                        Holder::Monitor,
                    )
                });
                match restored {
                    Ok(node) => {
                        lock(&self.named).insert(overlay.into(), node);
                    }
                    Err(again) => log::error!("node '{overlay}' could not be reopened: {again}"),
                }
                return Err(e);
            }
        };
        drop(file);
        let overlay_ref = node.clone_for(holder);
        lock(&self.named).insert(overlay.into(), node);
        // The overlay is the image's one writer now.
        for n in top_ref.node.subtree() {
            n.give_up_write()?;
        }
        Ok(Appended {
            overlay: overlay_ref,
            _lease: lease,
        })
    }
}

impl Graph {
    /// Opens a disk as `--disk ...,snapshot=on` does (QEMU's `-snapshot`):
    /// the image of `format` read-only, under a throwaway qcow2 overlay
    /// named `name` that takes the writes. The overlay is made in `folder`
    /// and unlinked as soon as it is open, so nothing is left behind
    /// however the VMM ends; the image itself is never written.
    pub fn add_snapshot_image(
        &self,
        name: &str,
        file: FileOptions,
        format: ImageFormat,
        folder: &Path,
    ) -> Result<(), BlockError> {
        let absolute = std::fs::canonicalize(&file.filename).unwrap_or(file.filename.clone());
        let base = self.open(
            image_options(None, true, file.clone(), format),
            Holder::Parent {
                node: name.into(),
                child: "backing",
            },
        )?;
        let size = base.driver().size();
        let fail = |path: &Path, reason: String| BlockError::TempOverlay {
            node: name.into(),
            path: path.display().to_string(),
            reason,
        };
        let (path, overlay) = temp_file(folder, name).map_err(|(p, e)| fail(&p, e.to_string()))?;
        let options = CreateOptions {
            backing: Some((absolute.display().to_string(), format.name().into())),
            ..CreateOptions::new(size)
        };
        if let Err(e) = create::create(&overlay, &options) {
            let _ = std::fs::remove_file(&path);
            return Err(fail(&path, e.to_string()));
        }
        drop(overlay);
        let added = self.add(NodeOptions {
            node_name: Some(name.into()),
            read_only: false,
            driver: DriverOptions::Qcow2 {
                file: ChildOptions::Inline(Box::new(NodeOptions {
                    node_name: None,
                    read_only: false,
                    driver: DriverOptions::File(FileOptions {
                        filename: path.clone(),
                        ..file
                    }),
                })),
                backing: BackingOptions::Child(ChildOptions::Node(base.name().into())),
            },
        });
        // Open or not, the name goes now: the open file is all we need.
        let _ = std::fs::remove_file(&path);
        added
    }
}

/// A new file in `folder` for node `name`'s overlay, never one that exists.
fn temp_file(
    folder: &Path,
    name: &str,
) -> Result<(std::path::PathBuf, std::fs::File), (std::path::PathBuf, std::io::Error)> {
    let mut n = 0u32;
    loop {
        let path = folder.join(format!(
            "vmm-snapshot-{}-{name}-{n}.qcow2",
            std::process::id()
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err((path, e)),
        }
    }
}
