//! Building the kernel command line: the user's, plus the parameters the
//! VMM adds, which must go before any `--` (what follows it is init's).

use crate::error::{Error, Result};

/// Linux on x86 reads at most this many bytes, the terminating NUL included.
pub const MAX_LEN: usize = 2048;

/// The user's command line with `extra` parameters added before any `--`.
pub fn compose(user: &str, extra: &[&str]) -> Result<String> {
    let tokens: Vec<&str> = user.split_ascii_whitespace().collect();
    let split = tokens
        .iter()
        .position(|t| *t == "--")
        .unwrap_or(tokens.len());
    let (kernel, init) = tokens.split_at(split);
    let mut out: Vec<&str> = kernel.to_vec();
    out.extend(extra.iter().filter(|p| !kernel.contains(p)));
    out.extend(init);
    let line = out.join(" ");
    validate(&line)?;
    Ok(line)
}

fn validate(line: &str) -> Result<()> {
    if let Some(c) = line.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(Error::Cmdline(format!(
            "it contains the character {c:?}; only printable ASCII is allowed"
        )));
    }
    if line.len() >= MAX_LEN {
        return Err(Error::Cmdline(format!(
            "it is {} bytes long (with the VMM's own parameters); the limit is {}",
            line.len(),
            MAX_LEN - 1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extras_go_before_init_arguments() {
        assert_eq!(
            compose("console=ttyS0 -- exit 3", &["noxsave"]).unwrap(),
            "console=ttyS0 noxsave -- exit 3"
        );
        assert_eq!(compose("-- sh", &["a", "b"]).unwrap(), "a b -- sh");
        assert_eq!(compose("console=ttyS0", &["a"]).unwrap(), "console=ttyS0 a");
        assert_eq!(compose("", &[]).unwrap(), "");
    }

    #[test]
    fn parameters_the_user_already_gave_are_not_repeated() {
        assert_eq!(
            compose("noxsave quiet", &["noxsave"]).unwrap(),
            "noxsave quiet"
        );
    }

    #[test]
    fn overlong_or_binary_command_lines_are_refused() {
        let long = "x".repeat(MAX_LEN);
        assert!(compose(&long, &[])
            .unwrap_err()
            .to_string()
            .contains("limit is 2047"));
        assert!(compose("a\u{7}b", &[]).is_err());
        assert!(compose("caf\u{e9}", &[]).is_err());
    }
}
