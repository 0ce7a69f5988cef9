//! Listening Unix sockets whose path appears only once they listen.
//!
//! `bind` creates the socket's file before `listen` makes it accept: a
//! client that waits for the file (as scripts, tests and QEMU's own tools
//! do) and connects at once can land between the two and be refused. So
//! the socket is bound and listening under a temporary name beside the
//! path, then hard-linked to the path (which, unlike a rename, fails if
//! something is already there), and the temporary name is removed.

use std::ffi::OsString;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;

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
    use std::os::unix::net::UnixStream;

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
}
