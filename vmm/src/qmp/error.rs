//! The errors a QMP client sees: a class it can match on and a sentence
//! for people, sent as `{"error": {"class": ..., "desc": ...}}`.

use serde_json::{json, Value};

/// The error classes QEMU still uses; clients match on these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Anything without a class of its own (most errors).
    GenericError,
    /// The command does not exist, or may not run yet.
    CommandNotFound,
    /// A named device, node or job does not exist.
    DeviceNotFound,
    /// The device exists but cannot do this now.
    DeviceNotActive,
    /// KVM lacks a capability the command needs.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// A failed command, as the client will read it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// What kind of failure, for programs.
    pub class: ErrorClass,
    /// What went wrong, for people.
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `DeviceNotActive` error.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }

    /// A `KVMMissingCap` error.
    pub fn kvm_missing_cap(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::KVMMissingCap, desc)
    }

    /// The error as QMP sends it: `{"class": ..., "desc": ...}`.
    pub fn to_json(&self) -> Value {
        json!({ "class": self.class.name(), "desc": self.desc })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_keep_qemu_names() {
        let all = [
            (ErrorClass::GenericError, "GenericError"),
            (ErrorClass::CommandNotFound, "CommandNotFound"),
            (ErrorClass::DeviceNotFound, "DeviceNotFound"),
            (ErrorClass::DeviceNotActive, "DeviceNotActive"),
            (ErrorClass::KVMMissingCap, "KVMMissingCap"),
        ];
        for (class, name) in all {
            assert_eq!(class.name(), name);
        }
    }

    #[test]
    fn serialises_as_class_and_desc() {
        let e = QmpError::device_not_found("Device 'vdz' not found");
        assert_eq!(
            e.to_json(),
            json!({"class": "DeviceNotFound", "desc": "Device 'vdz' not found"})
        );
        assert_eq!(e.to_string(), "Device 'vdz' not found");
        assert_eq!(QmpError::generic("x").class, ErrorClass::GenericError);
        assert_eq!(
            QmpError::kvm_missing_cap("x").class,
            ErrorClass::KVMMissingCap
        );
    }
}
