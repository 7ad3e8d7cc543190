//! HTTP/1.1 on one connection: read a request (head parsed by `httparse`, body by
//! Content-Length or chunked coding) under size and time limits, write a response or a
//! chunked stream. Owning the socket is what lets a handler notice a client that went
//! away while its answer is computed, and bound how long a slow client may hold a
//! thread.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::listen::Stream;

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_head_bytes: usize,
    pub max_body_bytes: usize,
    /// From the first byte of a request to the end of its head (slow-header clients).
    pub head_timeout: Duration,
    /// For the whole body.
    pub body_timeout: Duration,
    /// How long an idle keep-alive connection is kept.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 32 << 10,
            max_body_bytes: 8 << 20,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
        }
    }
}

const MAX_HEADERS: usize = 64;

pub struct Request {
    pub method: String,
    /// The request target as sent (origin-form `/v1/models?x=1`, or absolute-form).
    pub target: String,
    /// HTTP/1.x minor version.
    pub minor_version: u8,
    /// Names lower-cased.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

impl Request {
    /// The first value of a header, when it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// The path without query string; an absolute-form target is reduced to its path.
    pub fn path(&self) -> &str {
        let mut target = self.target.as_str();
        if let Some(rest) =
            target.strip_prefix("http://").or_else(|| target.strip_prefix("https://"))
        {
            target = rest.find('/').map_or("/", |i| &rest[i..]);
        }
        target.split(['?', '#']).next().unwrap_or(target)
    }
}

/// A request that cannot be read: answered with `status` and the connection closed.
#[derive(Debug)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError { status, message: message.into() }
    }
}

pub struct Conn {
    pub stream: Stream,
    /// Bytes read past the previous request (pipelining).
    buf: Vec<u8>,
    limits: Limits,
}

impl Conn {
    pub fn new(stream: Stream, limits: Limits) -> Self {
        let _ = stream.set_write_timeout(Some(Duration::from_secs(60)));
        Conn { stream, buf: Vec::new(), limits }
    }

    /// The next request; Ok(None) when the client closed (or idled out) between requests.
    pub fn read_request(&mut self) -> Result<Option<Request>, HttpError> {
        if self.buf.is_empty() && self.fill(Some(self.limits.idle_timeout)) != Fill::Data {
            return Ok(None);
        }
        let deadline = Instant::now() + self.limits.head_timeout;
        let head_len = loop {
            if let Some(end) = find_head_end(&self.buf) {
                break end;
            }
            if self.buf.len() > self.limits.max_head_bytes {
                return Err(HttpError::new(431, "request head too large"));
            }
            self.fill_before(deadline, "request head")?;
        };
        if head_len > self.limits.max_head_bytes {
            return Err(HttpError::new(431, "request head too large"));
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&self.buf[..head_len]) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(HttpError::new(400, "malformed request")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(HttpError::new(431, "too many request headers"))
            }
            Err(e) => return Err(HttpError::new(400, format!("malformed request: {e}"))),
        }
        let method = parsed.method.unwrap_or_default().to_string();
        let target = parsed.path.unwrap_or_default().to_string();
        let minor_version = parsed.version.unwrap_or(1);
        let headers: Vec<(String, Vec<u8>)> = parsed
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect();
        self.buf.drain(..head_len);
        let mut request =
            Request { method, target, minor_version, headers, body: Vec::new(), keep_alive: true };
        request.keep_alive = wants_keep_alive(&request);
        self.read_body(&mut request)?;
        Ok(Some(request))
    }

    fn read_body(&mut self, request: &mut Request) -> Result<(), HttpError> {
        let lengths: Vec<&str> = request
            .headers
            .iter()
            .filter(|(n, _)| n == "content-length")
            .map(|(_, v)| std::str::from_utf8(v).unwrap_or("x").trim())
            .collect();
        let chunked = match request.header("transfer-encoding") {
            None => false,
            Some(te) if te.eq_ignore_ascii_case("chunked") => true,
            Some(_) => {
                return Err(HttpError::new(501, "only chunked transfer coding is supported"))
            }
        };
        if chunked && !lengths.is_empty() {
            // Both framings at once is how requests get smuggled past proxies.
            return Err(HttpError::new(400, "both Content-Length and Transfer-Encoding given"));
        }
        let limit = self.limits.max_body_bytes;
        let length = match lengths.as_slice() {
            [] => None,
            [first, rest @ ..] if rest.iter().all(|l| l == first) => match first.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => return Err(HttpError::new(400, "invalid Content-Length")),
            },
            _ => return Err(HttpError::new(400, "conflicting Content-Length headers")),
        };
        if length.is_some_and(|n| n > limit as u64) {
            return Err(HttpError::new(413, format!("request body exceeds {limit} bytes")));
        }
        let has_body = chunked || length.is_some_and(|n| n > 0);
        if !has_body {
            if length.is_none() && request.method == "POST" {
                return Err(HttpError::new(411, "a POST body needs a Content-Length"));
            }
            return Ok(());
        }
        if request.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
            self.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|_| HttpError::new(400, "connection failed"))?;
        }
        let deadline = Instant::now() + self.limits.body_timeout;
        if let Some(n) = length {
            let n = n as usize;
            while self.buf.len() < n {
                self.fill_before(deadline, "request body")?;
            }
            request.body = self.buf.drain(..n).collect();
            return Ok(());
        }
        // Chunked: decode from what is buffered, then the socket. Bytes after the body
        // might be swallowed by the decoder's reads, so the connection closes after it.
        request.keep_alive = false;
        let _ = self.stream.set_read_timeout(Some(self.limits.body_timeout));
        let buffered = std::mem::take(&mut self.buf);
        let source =
            io::Cursor::new(buffered).chain(DeadlineReader { stream: &mut self.stream, deadline });
        let mut decoder = chunked_transfer::Decoder::new(source).take(limit as u64 + 1);
        let mut body = Vec::new();
        match decoder.read_to_end(&mut body) {
            Ok(_) if body.len() > limit => {
                Err(HttpError::new(413, format!("request body exceeds {limit} bytes")))
            }
            Ok(_) => {
                request.body = body;
                Ok(())
            }
            Err(e) if is_timeout(&e) => {
                Err(HttpError::new(408, "request body not received in time"))
            }
            Err(_) => Err(HttpError::new(400, "malformed chunked request body")),
        }
    }

    /// Reads more of `what` before `deadline`: 408 when time runs out, 400 when the
    /// client stops sending mid-request.
    fn fill_before(&mut self, deadline: Instant, what: &str) -> Result<(), HttpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match if left.is_zero() { Fill::TimedOut } else { self.fill(Some(left)) } {
            Fill::Data => Ok(()),
            Fill::TimedOut => Err(HttpError::new(408, format!("{what} not received in time"))),
            Fill::Closed => Err(HttpError::new(400, format!("{what} ended early"))),
        }
    }

    /// Reads more bytes into the buffer.
    fn fill(&mut self, timeout: Option<Duration>) -> Fill {
        let _ = self.stream.set_read_timeout(timeout);
        let mut chunk = [0u8; 16 << 10];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Fill::Closed,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Fill::Data;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => return Fill::TimedOut,
                Err(_) => return Fill::Closed,
            }
        }
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// A complete response with a Content-Length body.
    pub fn respond(
        &mut self,
        status: u16,
        headers: &[(&str, String)],
        body: &[u8],
        keep_alive: bool,
        head_only: bool,
    ) -> io::Result<()> {
        let mut out = head(status, headers, keep_alive);
        out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(body);
        }
        self.write_all(&bytes)
    }

    /// Starts a streamed response (chunked for HTTP/1.1; for HTTP/1.0 the body ends when
    /// the connection closes).
    pub fn start_stream(
        &mut self,
        status: u16,
        headers: &[(&str, String)],
        minor_version: u8,
    ) -> io::Result<StreamWriter<'_>> {
        let chunked = minor_version >= 1;
        let mut out = head(status, headers, chunked);
        if chunked {
            out.push_str("Transfer-Encoding: chunked\r\n");
        }
        out.push_str("\r\n");
        self.write_all(out.as_bytes())?;
        Ok(StreamWriter { conn: self, chunked })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Data,
    Closed,
    TimedOut,
}

/// The body of a streamed response; every `send` reaches the socket at once.
pub struct StreamWriter<'a> {
    conn: &'a mut Conn,
    chunked: bool,
}

impl StreamWriter<'_> {
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.chunked {
            let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
            framed.extend_from_slice(data);
            framed.extend_from_slice(b"\r\n");
            self.conn.write_all(&framed)
        } else {
            self.conn.write_all(data)
        }
    }

    pub fn finish(self) -> io::Result<()> {
        if self.chunked {
            self.conn.write_all(b"0\r\n\r\n")
        } else {
            Ok(())
        }
    }

    pub fn peer_closed(&self) -> bool {
        self.conn.stream.peer_closed()
    }
}

/// Fails reads once the deadline has passed, so a client trickling a chunked body one
/// byte at a time cannot hold the connection forever.
struct DeadlineReader<'a> {
    stream: &'a mut Stream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "body deadline"));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn wants_keep_alive(request: &Request) -> bool {
    let connection = request.header("connection").unwrap_or("").to_ascii_lowercase();
    let tokens: Vec<&str> = connection.split(',').map(str::trim).collect();
    if request.minor_version == 0 {
        // HTTP/1.0 keep-alive is rare and easy to get wrong; close after each answer.
        return false;
    }
    !tokens.contains(&"close")
}

fn head(status: u16, headers: &[(&str, String)], keep_alive: bool) -> String {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str(if keep_alive { "Connection: keep-alive\r\n" } else { "Connection: close\r\n" });
    out
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str) -> Request {
        Request {
            method: "GET".into(),
            target: target.into(),
            minor_version: 1,
            headers: vec![],
            body: vec![],
            keep_alive: true,
        }
    }

    #[test]
    fn path_drops_query_and_absolute_form() {
        assert_eq!(request("/health?x=1").path(), "/health");
        assert_eq!(request("http://host:8000/v1/models").path(), "/v1/models");
        assert_eq!(request("http://host").path(), "/");
        assert_eq!(request("/v1/../metrics").path(), "/v1/../metrics");
    }
}
