//! Reading an OpenAI streaming answer (server-sent events) and timing its chunks.
//!
//! Bytes arrive in arbitrary pieces: one event may be split over several reads and one
//! read may hold several events, so lines are reassembled first. Each event is stamped
//! with the time of the read that completed it, not the time it was parsed.

use std::io::Read;
use std::time::Instant;

use serde_json::Value;

use super::stats::RequestTiming;

/// Which OpenAI route the stream comes from: where the text of a chunk lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StreamError {
    #[error("malformed stream: {0}")]
    Malformed(String),
    /// An `{"error": ...}` event: the server gave up mid-stream.
    #[error("error event in stream: {0}")]
    Server(String),
    #[error("reading the stream: {0}")]
    Io(String),
}

/// One event's payload: `data: X` lines; comments and other fields carry nothing we use.
#[derive(Debug, PartialEq)]
pub enum SseEvent {
    Data(String),
    Done,
}

/// Reassembles lines from pieces of the byte stream.
#[derive(Default)]
pub struct SseLines {
    buf: Vec<u8>,
}

impl SseLines {
    /// The events completed by `bytes`, in order; an unfinished line stays buffered.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, StreamError> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut consumed = 0;
        // A '\n' byte never occurs inside a multi-byte UTF-8 character, so a complete
        // line is always whole characters even when a read ended mid-character.
        while let Some(nl) = self.buf[consumed..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[consumed..consumed + nl];
            consumed += nl + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = std::str::from_utf8(line)
                .map_err(|_| StreamError::Malformed("invalid UTF-8 in an event".into()))?;
            if let Some(event) = parse_line(line) {
                events.push(event);
            }
        }
        self.buf.drain(..consumed);
        Ok(events)
    }
}

fn parse_line(line: &str) -> Option<SseEvent> {
    // Blank lines end events, ':' starts a comment (keep-alive pings); `event:`, `id:`
    // and `retry:` fields say nothing about tokens.
    let value = line.strip_prefix("data:")?;
    let value = value.strip_prefix(' ').unwrap_or(value);
    Some(if value.trim() == "[DONE]" { SseEvent::Done } else { SseEvent::Data(value.to_string()) })
}

/// Chunk timing and usage gathered from the events of one stream.
#[derive(Default)]
struct Tally {
    text_times: Vec<Instant>,
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
}

impl Tally {
    fn event(&mut self, data: &str, endpoint: Endpoint, at: Instant) -> Result<(), StreamError> {
        let chunk: Value = serde_json::from_str(data)
            .map_err(|e| StreamError::Malformed(format!("an event is not JSON ({e})")))?;
        if let Some(err) = chunk.get("error") {
            let message = err.get("message").and_then(Value::as_str).unwrap_or("no message");
            return Err(StreamError::Server(clip(message)));
        }
        if let Some(choice) = chunk.get("choices").and_then(Value::as_array).and_then(|c| c.first())
        {
            let text = match endpoint {
                Endpoint::Completions => choice.get("text"),
                Endpoint::Chat => choice.get("delta").and_then(|d| d.get("content")),
            };
            // Only chunks with text count as tokens: a chat stream opens with a role-only
            // delta, and a final chunk may carry just the finish reason.
            if text.and_then(Value::as_str).is_some_and(|t| !t.is_empty()) {
                self.text_times.push(at);
            }
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let count = |k: &str| usage.get(k).and_then(Value::as_u64).map(|n| n as usize);
            self.prompt_tokens = count("prompt_tokens");
            self.completion_tokens = count("completion_tokens");
        }
        Ok(())
    }

    fn finish(self, start: Instant, done_at: Instant) -> Result<RequestTiming, StreamError> {
        let (Some(&first), Some(&last), Some(output_tokens)) =
            (self.text_times.first(), self.text_times.last(), self.completion_tokens)
        else {
            return Err(StreamError::Malformed(if self.text_times.is_empty() {
                "no chunk with text before [DONE]".into()
            } else {
                "no usage chunk before [DONE] (is stream_options.include_usage supported?)".into()
            }));
        };
        Ok(RequestTiming {
            prompt_tokens: self.prompt_tokens.unwrap_or(0),
            output_tokens,
            ttft: first.saturating_duration_since(start),
            itl: self.text_times.windows(2).map(|w| w[1].saturating_duration_since(w[0])).collect(),
            last_token: last.saturating_duration_since(start),
            e2el: done_at.saturating_duration_since(start),
        })
    }
}

/// Reads one streaming answer to its `data: [DONE]`; `now` stamps each read (the real
/// clock in use, a fake one in tests).
pub fn read_stream(
    mut body: impl Read,
    endpoint: Endpoint,
    start: Instant,
    mut now: impl FnMut() -> Instant,
) -> Result<RequestTiming, StreamError> {
    let mut lines = SseLines::default();
    let mut tally = Tally::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => return Err(StreamError::Malformed("stream ended without [DONE]".into())),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StreamError::Io(e.to_string())),
        };
        let at = now();
        for event in lines.feed(&buf[..n])? {
            match event {
                SseEvent::Data(data) => tally.event(&data, endpoint, at)?,
                SseEvent::Done => return tally.finish(start, at),
            }
        }
    }
}

/// Server messages go into the report; keep them to a readable length.
pub fn clip(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A body that hands out the given pieces one read at a time.
    struct Pieces(std::collections::VecDeque<Vec<u8>>);

    impl Read for Pieces {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let Some(piece) = self.0.pop_front() else { return Ok(0) };
            assert!(piece.len() <= out.len());
            out[..piece.len()].copy_from_slice(&piece);
            Ok(piece.len())
        }
    }

    fn pieces(p: &[&str]) -> Pieces {
        Pieces(p.iter().map(|s| s.as_bytes().to_vec()).collect())
    }

    /// A clock that moves 10 ms per read: read k (from 1) happens at start + 10k ms.
    fn fake_clock(start: Instant) -> impl FnMut() -> Instant {
        let mut reads = 0;
        move || {
            reads += 1;
            start + ms(10 * reads)
        }
    }

    fn text_chunk(t: &str) -> String {
        format!(
            "data: {{\"choices\":[{{\"index\":0,\"text\":\"{t}\",\"finish_reason\":null}}]}}\n\n"
        )
    }

    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n";

    #[test]
    fn lines_split_across_reads_and_several_per_read() {
        let mut l = SseLines::default();
        assert_eq!(l.feed(b"data: {\"a\"").unwrap(), vec![]);
        assert_eq!(l.feed(b":1}\r").unwrap(), vec![]);
        assert_eq!(
            l.feed(b"\n\n: ping\nevent: x\ndata:{}\n\ndata: [DONE]\n\n").unwrap(),
            vec![SseEvent::Data("{\"a\":1}".into()), SseEvent::Data("{}".into()), SseEvent::Done]
        );
        // A multi-byte character cut between two reads survives.
        let bytes = "data: \"é\"\n".as_bytes();
        let cut = bytes.iter().position(|&b| b == 0xC3).unwrap() + 1;
        assert_eq!(l.feed(&bytes[..cut]).unwrap(), vec![]);
        assert_eq!(l.feed(&bytes[cut..]).unwrap(), vec![SseEvent::Data("\"é\"".into())]);
        assert!(matches!(l.feed(b"data: \xff\n"), Err(StreamError::Malformed(_))));
    }

    #[test]
    fn completions_stream_timing_from_reads() {
        let start = Instant::now();
        let first = text_chunk("Hello");
        let (a, b) = first.split_at(12);
        // read 1: half an event; read 2: its end + an empty-text chunk + a token;
        // read 3: a token, usage and [DONE].
        let body = pieces(&[
            a,
            &format!("{b}{}{}", text_chunk(""), text_chunk(" wor")),
            &format!("{}{USAGE}data: [DONE]\n\n", text_chunk("ld")),
        ]);
        let t = read_stream(body, Endpoint::Completions, start, fake_clock(start)).unwrap();
        assert_eq!(t.ttft, ms(20));
        assert_eq!(t.itl, vec![ms(0), ms(10)]);
        assert_eq!((t.last_token, t.e2el), (ms(30), ms(30)));
        assert_eq!((t.prompt_tokens, t.output_tokens), (7, 3));
    }

    #[test]
    fn chat_stream_ignores_role_only_delta() {
        let start = Instant::now();
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        let tok = |t: &str| {
            format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}}}}]}}\n\n")
        };
        let body = pieces(&[role, &tok("Hi"), &tok("!"), &format!("{USAGE}data: [DONE]\n\n")]);
        let t = read_stream(body, Endpoint::Chat, start, fake_clock(start)).unwrap();
        assert_eq!((t.ttft, t.itl.clone()), (ms(20), vec![ms(10)]));
        assert_eq!((t.last_token, t.e2el), (ms(30), ms(40)));
        // The same chunks read as completions carry no text at all.
        let body = pieces(&[&tok("Hi"), &format!("{USAGE}data: [DONE]\n\n")]);
        let err = read_stream(body, Endpoint::Completions, start, fake_clock(start)).unwrap_err();
        assert!(err.to_string().contains("no chunk with text"), "{err}");
    }

    #[test]
    fn broken_streams_are_errors() {
        let start = Instant::now();
        let run = |p: &[&str]| {
            read_stream(pieces(p), Endpoint::Completions, start, fake_clock(start)).unwrap_err()
        };
        let tok = text_chunk("x");
        let e = run(&[&tok, USAGE]);
        assert!(e.to_string().contains("without [DONE]"), "{e}");
        let e = run(&[&tok, "data: {not json\n\n"]);
        assert!(matches!(e, StreamError::Malformed(_)), "{e}");
        let e = run(&[&tok, "data: {\"error\":{\"message\":\"request timed out\"}}\n\n"]);
        assert_eq!(e, StreamError::Server("request timed out".into()));
        let e = run(&[&tok, "data: [DONE]\n\n"]);
        assert!(e.to_string().contains("usage"), "{e}");
    }

    #[test]
    fn clip_keeps_short_messages_and_cuts_long_ones_on_char_boundaries() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(300);
        let c = clip(&long);
        assert_eq!(c.chars().count(), 203);
        assert!(c.ends_with("..."));
    }
}
