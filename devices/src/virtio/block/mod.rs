//! virtio-blk: the device, its request parser and its io_uring dataplane.

pub(crate) mod dataplane;
pub mod device;
mod hosting;
mod poll;
pub mod request;
pub mod slot;
pub mod stats;
pub mod throttle;

pub use device::{
    dataplane_holder, device_holder, Block, BlockConfig, DEFAULT_SUBMIT_BATCH, MAX_QUEUES,
    MAX_QUEUE_SIZE,
};
pub use slot::NodeSlot;
pub use stats::BlockStats;
pub use throttle::ThrottleControl;
