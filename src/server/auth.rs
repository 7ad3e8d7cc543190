//! Bearer-token authentication, deny by default.
//!
//! Keys come from `--api-key-file` and the env vars `QILIN_API_KEYS` / `API_TOKENS`;
//! each has a label that goes to the audit log in its place. Nothing here ever puts
//! token text into an error or a log line: errors point at a file line or an env item.

use std::fmt;
use std::path::{Path, PathBuf};

use subtle::{ConditionallySelectable, ConstantTimeEq};

/// Shortest accepted token: below this a token is guessable by brute force over HTTP.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest accepted token. `check` compares fixed-size buffers of this length, so the
/// time it takes does not depend on how long the presented or stored tokens are.
pub const MAX_TOKEN_LEN: usize = 512;
const MAX_LABEL_LEN: usize = 64;

/// The env vars read, in this order, after the file.
pub const ENV_VARS: [&str; 2] = ["QILIN_API_KEYS", "API_TOKENS"];

/// Where a key was defined: a file line or an item of an env var (both 1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    File { path: PathBuf, line: usize },
    Env { var: &'static str, item: usize },
    Generated,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File { path, line } => write!(f, "{} line {line}", path.display()),
            Location::Env { var, item } => write!(f, "env {var} item {item}"),
            Location::Generated => f.write_str("the generated key"),
        }
    }
}

/// What is wrong with one key entry. The messages describe, never quote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("token is shorter than {MIN_TOKEN_LEN} characters")]
    TooShort,
    #[error("token is longer than {MAX_TOKEN_LEN} characters")]
    TooLong,
    #[error("token contains a space, control or non-ASCII character")]
    BadTokenChar,
    #[error("empty label before ':'")]
    EmptyLabel,
    #[error("label is longer than {MAX_LABEL_LEN} characters")]
    LabelTooLong,
    #[error("label contains a space, control or non-ASCII character")]
    BadLabelChar,
    #[error("not valid UTF-8")]
    NotUtf8,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read API key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("API key at {at}: {problem} (expected `label:token` or `token`)")]
    Invalid { at: Location, problem: KeyProblem },
    #[error("API key label at {second} is already used at {first}; labels must be unique")]
    DuplicateLabel { first: Location, second: Location },
    #[error("API key at {second} is the same token as at {first}; give each token one label")]
    DuplicateToken { first: Location, second: Location },
}

struct Key {
    label: String,
    /// The token zero-padded to `MAX_TOKEN_LEN`; compared whole, see `check`.
    padded: Box<[u8; MAX_TOKEN_LEN]>,
    len: usize,
    at: Location,
}

/// The configured keys. Deliberately no `Debug`: it would print tokens.
pub struct ApiKeys {
    keys: Vec<Key>,
}

impl ApiKeys {
    /// Loads the key file (if any), then `QILIN_API_KEYS`, then `API_TOKENS`.
    ///
    /// File lines are `label:token` or `token`; `#` starts a comment line, blank lines
    /// are skipped, surrounding whitespace is trimmed. Env values are comma-separated
    /// items of the same form; empty items are skipped. A line is split at its first
    /// ':', so a bare token must not contain ':' (write `label:token` for such tokens).
    /// Unlabelled tokens are labelled by origin: `file:3`, `QILIN_API_KEYS:2`.
    /// Tokens are printable ASCII without spaces (what an `Authorization` header can
    /// carry), 16 to 512 characters. Labels and tokens must both be unique.
    ///
    /// `env` is the environment lookup (`|name| std::env::var(name).ok()` in
    /// production), injected so tests don't touch the process environment.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ApiKeys, AuthError> {
        let mut keys = ApiKeys { keys: Vec::new() };
        if let Some(path) = file {
            let bytes = std::fs::read(path)
                .map_err(|source| AuthError::Read { path: path.to_path_buf(), source })?;
            for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
                let at = Location::File { path: path.to_path_buf(), line: i + 1 };
                let Ok(line) = std::str::from_utf8(raw) else {
                    return Err(AuthError::Invalid { at, problem: KeyProblem::NotUtf8 });
                };
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let default_label = format!("file:{}", i + 1);
                keys.add(line, default_label, at)?;
            }
        }
        for var in ENV_VARS {
            let Some(value) = env(var) else { continue };
            // Items are numbered among the non-empty ones, as a person would count them.
            let items = value.split(',').map(str::trim).filter(|s| !s.is_empty());
            for (i, item) in items.enumerate() {
                let at = Location::Env { var, item: i + 1 };
                keys.add(item, format!("{var}:{}", i + 1), at)?;
            }
        }
        Ok(keys)
    }

    /// A one-run key set: a single random token, `qk-` + 64 lowercase hex digits
    /// (256 bits) from the OS RNG, labelled "generated".
    pub fn generate() -> (ApiKeys, String) {
        use rand::{RngCore, TryRngCore};
        let mut bytes = [0u8; 32];
        if rand::rngs::OsRng.try_fill_bytes(&mut bytes).is_err() {
            // ThreadRng is a ChaCha CSPRNG seeded from the OS; it only gets here when
            // a direct getrandom call failed transiently.
            rand::rng().fill_bytes(&mut bytes);
        }
        let mut token = String::with_capacity(67);
        token.push_str("qk-");
        for b in bytes {
            token.push_str(&format!("{b:02x}"));
        }
        let keys = ApiKeys {
            keys: vec![Key::new(
                "generated".into(),
                &token,
                Location::Env { var: "generated", item: 1 },
            )],
        };
        (keys, token)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The labels, in load order (for a startup log line).
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.label.as_str())
    }

    /// Checks an `Authorization` header value: `Bearer <token>`, scheme
    /// case-insensitive, one or more spaces. Returns the matching key's label.
    ///
    /// Timing does not depend on the token's contents nor on which key (if any)
    /// matches: the presented token is zero-padded to `MAX_TOKEN_LEN` and compared in
    /// full against every key with `subtle`, lengths included, without stopping early.
    /// Only the header's shape (scheme, spacing) is checked with ordinary branches —
    /// that reveals nothing about any key.
    pub fn check(&self, authorization: Option<&str>) -> Option<&str> {
        let token = bearer_token(authorization?)?;
        if token.len() > MAX_TOKEN_LEN {
            // No stored key is this long (enforced at load).
            return None;
        }
        let mut presented = [0u8; MAX_TOKEN_LEN];
        presented[..token.len()].copy_from_slice(token.as_bytes());
        let presented_len = token.len() as u64;

        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, key) in self.keys.iter().enumerate() {
            let same = key.padded.ct_eq(&presented) & (key.len as u64).ct_eq(&presented_len);
            index.conditional_assign(&(i as u64), same);
            found |= same;
        }
        if bool::from(found) {
            // Tokens are unique (enforced at load), so at most one key matched.
            self.keys.get(index as usize).map(|k| k.label.as_str())
        } else {
            None
        }
    }

    fn add(&mut self, entry: &str, default_label: String, at: Location) -> Result<(), AuthError> {
        let (label, token) = match entry.split_once(':') {
            Some((label, token)) => (label.trim(), token.trim()),
            None => ("", entry),
        };
        let invalid = |problem| AuthError::Invalid { at: at.clone(), problem };
        let label = if entry.contains(':') {
            if label.is_empty() {
                return Err(invalid(KeyProblem::EmptyLabel));
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(invalid(KeyProblem::LabelTooLong));
            }
            if !label.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(KeyProblem::BadLabelChar));
            }
            label.to_string()
        } else {
            default_label
        };
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(KeyProblem::BadTokenChar));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(invalid(KeyProblem::TooShort));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(invalid(KeyProblem::TooLong));
        }
        if let Some(prev) = self.keys.iter().find(|k| k.label == label) {
            return Err(AuthError::DuplicateLabel { first: prev.at.clone(), second: at });
        }
        // Startup only, so an ordinary comparison is fine here.
        if let Some(prev) = self.keys.iter().find(|k| &k.padded[..k.len] == token.as_bytes()) {
            return Err(AuthError::DuplicateToken { first: prev.at.clone(), second: at });
        }
        self.keys.push(Key::new(label, token, at));
        Ok(())
    }
}

impl Key {
    /// `token` is at most `MAX_TOKEN_LEN` bytes (checked by the callers).
    fn new(label: String, token: &str, at: Location) -> Key {
        let mut padded = Box::new([0u8; MAX_TOKEN_LEN]);
        padded[..token.len()].copy_from_slice(token.as_bytes());
        Key { label, padded, len: token.len(), at }
    }
}

/// The token of a `Bearer` credential, or `None` for any other shape.
fn bearer_token(header: &str) -> Option<&str> {
    let header = header.trim_matches(|c| c == ' ' || c == '\t');
    let (scheme, rest) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches(' ');
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "tok-aaaaaaaaaaaaaaaa1";
    const T2: &str = "tok-bbbbbbbbbbbbbbbb2";
    const T3: &str = "tok-cccccccccccccccc3";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn write_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        std::fs::write(&path, text).expect("write key file");
        (dir, path)
    }

    fn load_file(text: &str) -> Result<ApiKeys, AuthError> {
        let (_dir, path) = write_file(text);
        ApiKeys::load(Some(&path), no_env)
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    #[test]
    fn file_lines_comments_blanks_and_labels() {
        let text =
            format!("# team keys\n\n  alice:{T1}  \r\n{T2}\n\t# indented comment\nbob : {T3}\n");
        let keys = load_file(&text).expect("valid file");
        assert_eq!(keys.len(), 3);
        assert!(!keys.is_empty());
        assert_eq!(keys.labels().collect::<Vec<_>>(), ["alice", "file:4", "bob"]);
        assert_eq!(keys.check(Some(&bearer(T1))), Some("alice"));
        assert_eq!(keys.check(Some(&bearer(T2))), Some("file:4"));
        assert_eq!(keys.check(Some(&bearer(T3))), Some("bob"));
    }

    #[test]
    fn token_may_contain_colons_after_the_label() {
        let keys = load_file("svc:abc:def:0123456789abcdef\n").expect("valid");
        assert_eq!(keys.check(Some("Bearer abc:def:0123456789abcdef")), Some("svc"));
    }

    #[test]
    fn env_vars_are_comma_separated_and_labelled_by_origin() {
        let env = |name: &str| match name {
            "QILIN_API_KEYS" => Some(format!(" {T1} ,, ci:{T2},")),
            "API_TOKENS" => Some(T3.to_string()),
            _ => None,
        };
        let keys = ApiKeys::load(None, env).expect("valid env");
        assert_eq!(keys.labels().collect::<Vec<_>>(), ["QILIN_API_KEYS:1", "ci", "API_TOKENS:1"]);
        assert_eq!(keys.check(Some(&bearer(T3))), Some("API_TOKENS:1"));
    }

    #[test]
    fn file_and_env_combine() {
        let (_dir, path) = write_file(&format!("{T1}\n"));
        let keys =
            ApiKeys::load(Some(&path), |name| (name == "API_TOKENS").then(|| format!("ops:{T2}")))
                .expect("valid");
        assert_eq!(keys.labels().collect::<Vec<_>>(), ["file:1", "ops"]);
    }

    #[test]
    fn empty_sources_give_an_empty_set_that_matches_nothing() {
        let keys = load_file("# nothing here\n\n").expect("valid");
        assert!(keys.is_empty());
        let keys2 = ApiKeys::load(None, |_| Some(" , ,".to_string())).expect("valid");
        assert_eq!(keys2.len(), 0);
        for k in [&keys, &keys2] {
            assert_eq!(k.check(Some(&bearer(T1))), None);
            assert_eq!(k.check(Some("Bearer ")), None);
            assert_eq!(k.check(Some("Bearer")), None);
            assert_eq!(k.check(Some("")), None);
            assert_eq!(k.check(None), None);
        }
    }

    /// Every error message names where, and never contains any part of a token.
    fn assert_error(text: &str, line: usize, expect: &str, secrets: &[&str]) {
        let (_dir, path) = write_file(text);
        let err = ApiKeys::load(Some(&path), no_env).err().expect("should fail");
        let msg = err.to_string();
        assert!(msg.contains(&format!("{} line {line}", path.display())), "{msg}");
        assert!(msg.contains(expect), "{msg}");
        for s in secrets {
            assert!(!msg.contains(s), "error leaks {s:?}: {msg}");
        }
    }

    #[test]
    fn file_errors_name_the_line_and_not_the_token() {
        assert_error("# c\nshort-secret-x\n", 2, "shorter than 16", &["short-secret"]);
        assert_error(
            &format!("{T1}\nlabel:has a-space-inside-it\n"),
            2,
            "space",
            &["has a", "space-inside", T1],
        );
        assert_error("\n\nsecret\u{7}bell-0123456789\n", 3, "control", &["secret", "bell"]);
        assert_error("secrét-0123456789abc\n", 1, "non-ASCII", &["secr", "0123456789"]);
        assert_error(&format!(":{T1}\n"), 1, "empty label", &["tok-"]);
        assert_error(&format!("my label:{T1}\n"), 1, "label contains", &["tok-"]);
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        assert_error(&format!("{long}\n"), 1, "longer than", &["xxxxxxxxxxxxxxxx"]);
        // A label that is really a mistyped token is not echoed either.
        assert_error("verysecretlabelpart:short\n", 1, "shorter", &["verysecret", "short\n"]);
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        std::fs::write(&path, [T1.as_bytes(), b"\n\xff\xfe-0123456789abcdef\n"].concat())
            .expect("write");
        let err = ApiKeys::load(Some(&path), no_env).err().expect("should fail");
        assert!(err.to_string().contains("line 2: not valid UTF-8"), "{err}");
    }

    #[test]
    fn duplicates_are_errors_naming_both_places() {
        assert_error(&format!("a:{T1}\nb:{T2}\na:{T3}\n"), 3, "line 1", &["tok-"]);
        assert_error(&format!("a:{T1}\nb:{T1}\n"), 2, "same token", &["tok-"]);
        // Across sources too.
        let (_dir, path) = write_file(&format!("ci:{T1}\n"));
        let err =
            ApiKeys::load(Some(&path), |n| (n == "QILIN_API_KEYS").then(|| format!("x,ci:{T2}")))
                .err()
                .expect("duplicate label");
        // Entries are validated in order: the short item 1 is reported before the
        // duplicate label in item 2.
        assert!(err.to_string().contains("env QILIN_API_KEYS item 1"), "{err}");
        let err =
            ApiKeys::load(Some(&path), |n| (n == "API_TOKENS").then(|| format!("{T2},ci:{T3}")))
                .err()
                .expect("duplicate label");
        let msg = err.to_string();
        assert!(msg.contains("env API_TOKENS item 2"), "{msg}");
        assert!(msg.contains(&format!("{} line 1", path.display())), "{msg}");
        assert!(!msg.contains("tok-"), "{msg}");
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent");
        let err = ApiKeys::load(Some(&path), no_env).err().expect("missing");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn check_accepts_scheme_variants_and_rejects_everything_else() {
        let keys = load_file(&format!("a:{T1}\nb:{T2}\n")).expect("valid");
        for ok in [
            format!("Bearer {T1}"),
            format!("bearer {T1}"),
            format!("BEARER   {T1}"),
            format!("  Bearer {T1} "),
        ] {
            assert_eq!(keys.check(Some(&ok)), Some("a"), "{ok:?}");
        }
        let prefix = &T1[..T1.len() - 1];
        let extended = format!("{T1}x");
        let mut flipped = T1.to_string().into_bytes();
        flipped[5] ^= 1;
        let flipped = String::from_utf8(flipped).expect("ascii");
        for bad in [
            format!("Basic {T1}"),
            format!("Token {T1}"),
            format!("Bearer{T1}"),
            format!("Bearer\t{T1}"),
            T1.to_string(),
            format!("Bearer {prefix}"),
            format!("Bearer {extended}"),
            format!("Bearer {flipped}"),
            format!("Bearer {T1} {T2}"),
            format!("Bearer {}", T1.to_uppercase()),
            format!("Bearer {}", "x".repeat(MAX_TOKEN_LEN + 10)),
            "Bearer ".to_string(),
            String::new(),
        ] {
            assert_eq!(keys.check(Some(&bad)), None, "{bad:?}");
        }
        assert_eq!(keys.check(None), None);
    }

    #[test]
    fn padding_does_not_make_a_zero_suffix_match() {
        // The comparison pads with NUL bytes; a presented token can't carry NULs (not
        // graphic ASCII), and the length is compared too, so a key is never matched
        // by a shorter token whose padding happens to line up.
        let keys = load_file(&format!("a:{T1}\n")).expect("valid");
        let with_nul = format!("Bearer {T1}\0");
        assert_eq!(keys.check(Some(&with_nul)), None);
        assert_eq!(keys.check(Some("Bearer tok-aaaaaaaaaaaaaaaa")), None);
    }

    #[test]
    fn generated_key_has_the_documented_shape_and_works() {
        let (keys, token) = ApiKeys::generate();
        assert_eq!(keys.len(), 1);
        assert_eq!(token.len(), 3 + 64);
        assert!(token.starts_with("qk-"));
        assert!(token[3..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(keys.check(Some(&bearer(&token))), Some("generated"));
        assert_eq!(keys.check(Some(&bearer(T1))), None);
        let (_, other) = ApiKeys::generate();
        assert_ne!(token, other, "fresh randomness each time");
    }
}
