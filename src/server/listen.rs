//! Where the server listens: a loopback TCP address or a unix socket, nothing else.
//! Exposure beyond the machine is the reverse proxy's job (TLS, rate limits, access
//! rules); a server that could bind 0.0.0.0 would one day be deployed that way.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "refusing to listen on {host}: qilin serves only loopback addresses (127.0.0.0/8, ::1) \
         or a unix socket (--uds). To reach it from other machines, put the reverse proxy in \
         front of it (README, \"Deployment\": nginx with TLS forwarding to 127.0.0.1)"
    )]
    NotLoopback { host: String },
    #[error("cannot resolve --host {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Tcp { addr: String, source: io::Error },
    #[error("cannot listen on unix socket {path}: {message}")]
    Unix { path: PathBuf, message: String },
}

/// The loopback address `host` names (an IP, or a name such as `localhost` whose every
/// address is loopback).
pub fn loopback_addr(host: &str, port: u16) -> Result<SocketAddr, BindError> {
    let not_loopback = || BindError::NotLoopback { host: host.to_string() };
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return if is_loopback(ip) { Ok(SocketAddr::new(ip, port)) } else { Err(not_loopback()) };
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|source| BindError::Resolve { host: host.to_string(), source })?
        .collect();
    match addrs.first() {
        Some(first) if addrs.iter().all(|a| is_loopback(a.ip())) => Ok(*first),
        _ => Err(not_loopback()),
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix { listener: UnixListener, path: PathBuf },
}

impl Listener {
    pub fn bind_tcp(host: &str, port: u16) -> Result<Listener, BindError> {
        let addr = loopback_addr(host, port)?;
        TcpListener::bind(addr)
            .map(Listener::Tcp)
            .map_err(|source| BindError::Tcp { addr: addr.to_string(), source })
    }

    /// Binds `path` (replacing a stale socket file, never any other kind of file) with
    /// mode 0660 so that only the service's user and group (nginx's) can connect.
    pub fn bind_unix(path: &Path) -> Result<Listener, BindError> {
        let fail = |message: String| BindError::Unix { path: path.to_path_buf(), message };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(fail("the path exists and is not a socket".into()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(fail("another server is listening there".into()));
            }
            std::fs::remove_file(path).map_err(|e| fail(e.to_string()))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| fail(e.to_string()))?;
        Ok(Listener::Unix { listener, path: path.to_path_buf() })
    }

    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Small SSE events must leave at once, not wait for Nagle.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
            Listener::Unix { listener, .. } => listener.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    /// What the startup line prints: `http://127.0.0.1:8000` or `unix:/run/qilin.sock`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("http://{addr}"),
                Err(_) => "http://(unknown)".into(),
            },
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }

    /// What wakes a thread blocked in this listener's `accept`, for another thread to
    /// hold while the accepting one owns (and at shutdown closes) the listener.
    pub fn waker(&self) -> Waker {
        match self {
            Listener::Tcp(l) => Waker::Tcp(l.local_addr().ok()),
            Listener::Unix { path, .. } => Waker::Unix(path.clone()),
        }
    }
}

/// Where a listener can be reached (`Listener::waker`).
pub enum Waker {
    Tcp(Option<SocketAddr>),
    Unix(PathBuf),
}

impl Waker {
    /// Opens (and drops) a connection to the listener so a thread blocked in `accept`
    /// wakes up and sees that the server is shutting down; nothing once it is closed.
    pub fn wake(&self) {
        match self {
            Waker::Tcp(Some(addr)) => {
                let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
            }
            Waker::Tcp(None) => {}
            Waker::Unix(path) => {
                let _ = UnixStream::connect(path);
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One client connection, TCP or unix.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// The peer's IP; None on a unix socket.
    pub fn peer_ip(&self) -> Option<IpAddr> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
            Stream::Unix(_) => None,
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    /// True when the peer has closed its side (or the connection broke). Waits at most
    /// a millisecond; data the client already sent (a pipelined request) stays unread.
    pub fn peer_closed(&self) -> bool {
        let mut byte = [0u8; 1];
        if self.set_read_timeout(Some(Duration::from_millis(1))).is_err() {
            return true;
        }
        let peeked = match self {
            Stream::Tcp(s) => s.peek(&mut byte),
            Stream::Unix(s) => {
                // std has no peek for unix streams: recv with MSG_PEEK through the fd.
                unix_peek(s, &mut byte)
            }
        };
        match peeked {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        }
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

fn unix_peek(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: recv on a valid, owned fd into a live buffer of the given length.
    let n = unsafe {
        libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_accepted() {
        for ok in ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"] {
            assert!(loopback_addr(ok, 8000).is_ok(), "{ok}");
        }
        for bad in ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "8.8.8.8", "fe80::1"] {
            let err = loopback_addr(bad, 8000).unwrap_err().to_string();
            assert!(err.contains("reverse proxy"), "{bad}: {err}");
        }
    }
}
