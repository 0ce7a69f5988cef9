//! QEMU's rule for the names a user gives: node-names, job ids, device ids
//! (QEMU's `id_wellformed`). One rule, so a name one command takes another
//! accepts too.

/// The longest node-name QEMU takes (its `BlockDriverState.node_name` is
/// 32 bytes with the NUL).
pub const MAX_NODE_NAME: usize = 31;

/// Whether `name` is well formed: a letter, then letters, digits, '-', '.'
/// and '_'. Each caller words its own error and adds its own length limit.
pub fn wellformed(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_as_qemu_does() {
        for good in ["j0", "a", "backup-1.2_x", "Z9"] {
            assert!(wellformed(good), "{good}");
        }
        for bad in ["", "1bad", "-x", "_x", ".x", "a b", "a/b", "é", "aé"] {
            assert!(!wellformed(bad), "{bad}");
        }
    }
}
