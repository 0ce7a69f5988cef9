//! Listening Unix sockets whose path appears only once they listen, and
//! taking over the path of one whose server is gone.
//!
//! `bind` creates the socket's file before `listen` makes it accept: a
//! client that waits for the file (as scripts, tests and QEMU's own tools
//! do) and connects at once can land between the two and be refused. So
//! the socket is bound and listening under a temporary name beside the
//! path, then hard-linked to the path (which, unlike a rename, fails if
//! something is already there), and the temporary name is removed.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Why a socket path cannot be taken over.
#[derive(Debug, thiserror::Error)]
pub enum StaleError {
    /// Something other than a socket is there; it is left alone.
    #[error("the path exists and is not a socket")]
    NotASocket,
    /// Something listens on the socket there.
    #[error("something already listens there")]
    InUse,
    /// The path could not be examined.
    #[error("cannot examine the path: {0}")]
    Probe(#[source] io::Error),
    /// The stale socket could not be removed.
    #[error("cannot remove the stale socket: {0}")]
    Remove(#[source] io::Error),
}

/// Removes a socket at `path` that nobody listens on any more (left by a
/// server that is gone), so that [`listen_unix`] can take the path. Only a
/// refused connection proves a socket stale: a live server keeps its
/// socket, and a file that is not a socket is never removed.
pub fn remove_stale(path: &Path) -> Result<(), StaleError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StaleError::Probe(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(StaleError::NotASocket);
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(StaleError::InUse),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(StaleError::Remove)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StaleError::Probe(e)),
    }
}

/// Listens on a Unix socket at `path`, which must not exist; the path
/// appears only once the socket accepts connections. A path too long for
/// the temporary name beside it is bound directly.
pub fn listen_unix(path: &Path) -> io::Result<UnixListener> {
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{}' names no file", path.display()),
        ));
    };
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let _ = std::fs::remove_file(&temp);
    let listener = match UnixListener::bind(&temp) {
        Ok(listener) => listener,
        // sun_path holds 108 bytes: the longer name may not fit.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => return UnixListener::bind(path),
        Err(e) => return Err(e),
    };
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    linked.map(|()| listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("base-socket-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_path_accepts_connections_as_soon_as_it_exists_and_nothing_else_is_left() {
        let d = dir("ok");
        let path = d.join("s.sock");
        let listener = listen_unix(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"], "a temporary name was left behind");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_existing_file_is_an_error_and_left_alone() {
        let d = dir("exists");
        let path = d.join("s.sock");
        std::fs::write(&path, b"mine").unwrap();
        let err = listen_unix(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_path_too_long_for_the_temporary_name_is_bound_directly() {
        let d = dir("long");
        // 107 bytes fit sun_path; the temporary name would not.
        let room = 107 - d.as_os_str().len() - 1;
        let path = d.join("x".repeat(room));
        let listener = listen_unix(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_a_socket_nobody_listens_on_is_removed() {
        let d = dir("stale");
        let path = d.join("s.sock");
        assert!(remove_stale(&path).is_ok(), "no file: nothing to do");
        let live = UnixListener::bind(&path).unwrap();
        assert!(matches!(remove_stale(&path), Err(StaleError::InUse)));
        assert!(path.exists());
        drop(live);
        remove_stale(&path).unwrap();
        assert!(!path.exists(), "the stale socket is gone");
        std::fs::write(&path, b"mine").unwrap();
        assert!(matches!(remove_stale(&path), Err(StaleError::NotASocket)));
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
