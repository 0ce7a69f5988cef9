//! virtio-blk: the device, its request parser and its io_uring dataplane.

pub mod request;
