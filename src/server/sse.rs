//! Server-sent events as OpenAI streams them: `data: <json>\n\n` per chunk, then
//! `data: [DONE]\n\n`.

use serde_json::Value;

/// Headers every stream carries; `X-Accel-Buffering: no` tells nginx to pass each
/// event on at once even where `proxy_buffering` is on.
pub fn headers() -> [(&'static str, String); 3] {
    [
        ("Content-Type", "text/event-stream; charset=utf-8".into()),
        ("Cache-Control", "no-cache".into()),
        ("X-Accel-Buffering", "no".into()),
    ]
}

/// One event carrying a JSON payload (serde_json never emits raw newlines, so one
/// `data:` line is always enough).
pub fn event(payload: &Value) -> Vec<u8> {
    format!("data: {payload}\n\n").into_bytes()
}

pub const DONE: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_single_data_lines() {
        let payload = serde_json::json!({"text": "a\nb\r\n\n"});
        let bytes = event(&payload);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("data: {"));
        assert!(text.ends_with("}\n\n"));
        assert_eq!(text.matches('\n').count(), 2, "{text}");
        let back: Value = serde_json::from_str(&text[6..text.len() - 2]).unwrap();
        assert_eq!(back, payload);
    }
}
