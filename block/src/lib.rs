//! The block graph (nodes, drivers, leases, jobs). Filled in by the virtio-blk and block-graph work.
