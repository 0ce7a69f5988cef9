//! The qcow2 format: its header, image creation and compressed clusters.

pub mod compressed;
pub mod create;
pub mod header;
