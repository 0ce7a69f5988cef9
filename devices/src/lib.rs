//! Guest-visible devices and the bus that routes guest accesses to them.
//!
//! A vCPU thread that gets a port-I/O or MMIO exit looks the address up on a
//! [`Bus`] and hands the access to the device found there. Devices never know
//! about KVM: they see an offset into their own range and the bytes, and they
//! may answer a write with a [`GuestRequest`] (end the VM, reset, power off)
//! that the VMM acts on.

pub mod bus;
pub mod dirty;
#[doc(hidden)]
pub mod fuzzing;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, GuestRequest};
