//! Seeded random request bodies that a correct server must reject with a 4xx: random
//! bytes, truncated JSON, wrongly typed fields, invalid UTF-8, deep nesting, JSON-ish
//! token soup, duplicate keys, overflowing numbers and lone surrogates. Each generator
//! is built so that no output is a valid request for its route.

use rand::Rng;
use serde_json::json;

use super::{with, MARKER, NAME};

/// One seeded random body that must be rejected with a 4xx.
pub fn body(rng: &mut rand_chacha::ChaCha8Rng, route: &str) -> Vec<u8> {
    let base = match route {
        "/v1/chat/completions" => {
            json!({"model": NAME, "messages": [{"role": "user", "content": MARKER}], "max_tokens": 2})
        }
        "/v1/completions" | "/generate" => {
            json!({"model": NAME, "prompt": MARKER, "max_tokens": 2})
        }
        "/tokenize" => json!({"prompt": MARKER}),
        "/detokenize" => json!({"tokens": [1, 2, 3]}),
        _ => json!({"message": MARKER, "max_tokens": 2}),
    };
    let text = base.to_string();
    let int_bad: &[&str] = &["\"7\"", "true", "[1]", "{}", "1.5"];
    let float_bad: &[&str] = &["\"0.5\"", "true", "[0.5]", "{}"];
    let bool_bad: &[&str] = &["\"true\"", "1", "[]", "{}"];
    let prompt_bad: &[&str] = &["5", "true", "{}", "[true]", "[{}]"];
    let messages_bad: &[&str] = &["5", "\"hi\"", "{}", "[5]", "[{\"role\":5,\"content\":\"x\"}]"];
    // The field that carries the content comes first.
    let fields: Vec<(&str, &[&str])> = match route {
        "/tokenize" => vec![("prompt", prompt_bad)],
        "/detokenize" => vec![("tokens", &["5", "\"x\"", "[\"a\"]", "[1.5]", "{}", "[-3]"])],
        "/api/chat" => vec![
            ("message", &["5", "true", "{}", "[1]"]),
            ("max_tokens", int_bad),
            ("temperature", float_bad),
        ],
        "/generate" => {
            vec![("prompt", prompt_bad), ("max_tokens", int_bad), ("temperature", float_bad)]
        }
        _ => vec![
            if route == "/v1/chat/completions" {
                ("messages", messages_bad)
            } else {
                ("prompt", prompt_bad)
            },
            ("max_tokens", int_bad),
            ("top_k", int_bad),
            ("seed", int_bad),
            ("n", int_bad),
            ("temperature", float_bad),
            ("top_p", float_bad),
            ("min_p", float_bad),
            ("presence_penalty", float_bad),
            ("frequency_penalty", float_bad),
            ("repetition_penalty", float_bad),
            ("stream", bool_bad),
            ("ignore_eos", bool_bad),
            ("stop", &["5", "true", "{}", "[1]"]),
        ],
    };
    let (main, main_bad) = fields[0];
    match rng.random_range(0..8) {
        0 => (0..rng.random_range(0..200)).map(|_| rng.random()).collect(),
        1 => text.as_bytes()[..rng.random_range(0..text.len())].to_vec(),
        2 | 3 => {
            let (field, bad) = fields[rng.random_range(0..fields.len())];
            with(&base, field, bad[rng.random_range(0..bad.len())]).into_bytes()
        }
        4 => {
            let at = text.find(MARKER).map_or(1, |i| i + rng.random_range(0..MARKER.len()));
            let junk: &[&[u8]] = &[
                b"\xff",
                b"\xfe\xfe",
                b"\xc0\x80",
                b"\x80",
                b"\xed\xa0\x80",
                b"\xf8\x88\x80\x80\x80",
            ];
            let mut out = text.as_bytes()[..at].to_vec();
            out.extend_from_slice(junk[rng.random_range(0..junk.len())]);
            out.extend_from_slice(&text.as_bytes()[at..]);
            out
        }
        5 => {
            let depth = rng.random_range(100..3000);
            format!("{{\"prompt\":{}", "[".repeat(depth)).into_bytes()
        }
        6 => {
            let toks = [
                "{",
                "}",
                "[",
                "]",
                ",",
                ":",
                "\"a\"",
                "1",
                "true",
                "null",
                "\"\\u",
                "\\",
                "\"\\ud800\"",
                "1e999",
            ];
            (0..rng.random_range(1..40))
                .map(|_| toks[rng.random_range(0..toks.len())])
                .collect::<String>()
                .into_bytes()
        }
        _ => {
            let forms = [
                format!("[{text}]"),
                // A duplicate key whose last value is wrong: rejected by struct and map parsers alike.
                format!("{},\"{main}\":{}}}", &text[..text.len() - 1], main_bad[0]),
                format!("{{\"{main}\":1e400}}"),
                format!("{{\"{main}\":\"\\ud800\"}}"),
                text.replacen('}', "", 1),
            ];
            forms[rng.random_range(0..forms.len())].clone().into_bytes()
        }
    }
}
