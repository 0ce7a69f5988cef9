//! Where a migration goes or comes from: QEMU's `unix:PATH`,
//! `tcp:HOST:PORT` and `file:PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// A Unix stream socket.
    Unix(PathBuf),
    /// A TCP connection to (or a listener on) `host:port`.
    Tcp { host: String, port: u16 },
    /// A state file: written by `migrate`, read by `--incoming`.
    File(PathBuf),
}

/// Why a URI was refused, in QEMU's terms where it has them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// A scheme we do not speak (`exec:`, `fd:`, `rdma:`...).
    #[error("unknown migration protocol: {0}")]
    Scheme(String),
    /// The part after the scheme is empty or malformed.
    #[error("invalid migration URI '{uri}': {reason}")]
    Malformed { uri: String, reason: &'static str },
}

impl FromStr for MigrationUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        let bad = |reason| UriError::Malformed {
            uri: uri.to_string(),
            reason,
        };
        if let Some(path) = uri.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("the socket path is empty"));
            }
            return Ok(Self::Unix(path.into()));
        }
        if let Some(path) = uri.strip_prefix("file:") {
            if path.is_empty() {
                return Err(bad("the file path is empty"));
            }
            return Ok(Self::File(path.into()));
        }
        if let Some(rest) = uri.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or(bad("a TCP address is HOST:PORT"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(bad("the host is empty"));
            }
            let port = port
                .parse()
                .map_err(|_| bad("the port is not a number from 0 to 65535"))?;
            return Ok(Self::Tcp {
                host: host.to_string(),
                port,
            });
        }
        Err(UriError::Scheme(uri.to_string()))
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_three_uri_forms_parse_and_print_back() {
        for uri in [
            "unix:/tmp/m.sock",
            "tcp:127.0.0.1:4444",
            "file:/tmp/vm.state",
            "tcp:[::1]:80",
        ] {
            let parsed: MigrationUri = uri.parse().unwrap();
            assert_eq!(parsed.to_string(), uri);
        }
        assert_eq!(
            "tcp:localhost:1".parse(),
            Ok(MigrationUri::Tcp {
                host: "localhost".into(),
                port: 1
            })
        );
    }

    #[test]
    fn other_schemes_and_malformed_addresses_are_refused() {
        assert_eq!(
            "exec:cat".parse::<MigrationUri>().unwrap_err().to_string(),
            "unknown migration protocol: exec:cat"
        );
        for bad in [
            "unix:",
            "file:",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "tcp:h:x",
        ] {
            assert!(
                matches!(bad.parse::<MigrationUri>(), Err(UriError::Malformed { .. })),
                "{bad}"
            );
        }
    }
}
