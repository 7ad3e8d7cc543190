//! The audit log: one JSON line per request, for answering "who called what, when,
//! and how big was it" after the fact. It records metadata only — never the prompt,
//! the answer, the raw URL or a token — so it can be kept and shipped without becoming
//! a second copy of users' data.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
}

/// One request, as written. Field order is the line's key order.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC, milliseconds: when the request finished.
    pub time: String,
    pub request_id: String,
    /// The label of the API key used (never the key); `None` when unauthenticated.
    pub key_label: Option<String>,
    /// From `TrustedProxies::client_address`: an IP or `"unix"`.
    pub client: String,
    pub method: String,
    /// The matched route pattern (`/v1/chat/completions`), or `"other"`: never the raw
    /// URL, whose query string could carry content.
    pub route: String,
    pub model: Option<String>,
    pub status: u16,
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
    pub duration_ms: f64,
    pub finish_reason: Option<String>,
}

/// An append-only JSON-lines file shared by all connection threads.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating if needed) `path` for appending. A new file gets mode 0600: key
    /// labels and client addresses are not for every local user. An existing file keeps
    /// the mode the operator gave it.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let mut options = OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options
            .open(path)
            .map_err(|source| AuditError::Open { path: path.to_path_buf(), source })?;
        Ok(AuditLog { path: path.to_path_buf(), file: Mutex::new(file) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` as one line.
    ///
    /// The line is serialised first and handed to the kernel in one `write_all` on an
    /// `O_APPEND` descriptor under the lock, so lines from concurrent requests never
    /// interleave, and each is in the page cache when this returns: it survives the
    /// process crashing or being killed. `File` has no user-space buffer, so `flush`
    /// only states that intent. We don't `sync_data` per line: an fsync costs
    /// milliseconds and, under the lock, would serialise every request behind the disk;
    /// losing the last lines needs the machine itself to go down. `sync` at shutdown.
    pub fn write(&self, record: &AuditRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        // A panic elsewhere while holding the lock leaves the file itself intact.
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(&line)?;
        file.flush()
    }

    /// Forces written lines to disk; for shutdown.
    pub fn sync(&self) -> std::io::Result<()> {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.sync_data()
    }
}

/// The current time as audit records write it: `2025-01-31T12:34:56.789Z`.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> AuditRecord {
        AuditRecord {
            time: now_rfc3339(),
            request_id: format!("{i:032x}"),
            key_label: if i == 0 { None } else { Some(format!("team-{i}")) },
            client: "203.0.113.5".into(),
            method: "POST".into(),
            route: "/v1/chat/completions".into(),
            model: Some("smollm2".into()),
            status: 200,
            prompt_tokens: Some(10 + i),
            completion_tokens: if i == 2 { None } else { Some(i) },
            duration_ms: 12.5 * i as f64,
            finish_reason: Some("stop".into()),
        }
    }

    const FIELDS: [&str; 12] = [
        "time",
        "request_id",
        "key_label",
        "client",
        "method",
        "route",
        "model",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "duration_ms",
        "finish_reason",
    ];

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).expect("read audit log");
        assert!(text.ends_with('\n'), "every line is terminated");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON value"))
            .collect()
    }

    #[test]
    fn writes_one_json_object_per_line_with_exactly_the_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("open");
        for i in 0..3 {
            log.write(&record(i)).expect("write");
        }
        let lines = lines(&path);
        assert_eq!(lines.len(), 3);
        for (i, line) in lines.iter().enumerate() {
            let obj = line.as_object().expect("object");
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            assert_eq!(keys, FIELDS);
            assert_eq!(obj["request_id"], format!("{i:032x}"));
            assert_eq!(obj["status"], 200);
            assert_eq!(obj["route"], "/v1/chat/completions");
            assert_eq!(obj["prompt_tokens"], 10 + i);
            assert_eq!(obj["duration_ms"].as_f64(), Some(12.5 * i as f64));
        }
        // Absent values are JSON null, not missing keys: every line has one shape.
        assert!(lines[0]["key_label"].is_null());
        assert_eq!(lines[1]["key_label"], "team-1");
        assert!(lines[2]["completion_tokens"].is_null());
    }

    #[test]
    fn reopening_appends_instead_of_truncating() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        AuditLog::open(&path).expect("open").write(&record(0)).expect("write");
        let log = AuditLog::open(&path).expect("reopen");
        log.write(&record(1)).expect("write");
        log.write(&record(2)).expect("write");
        log.sync().expect("sync");
        let ids: Vec<String> = lines(&path)
            .iter()
            .map(|l| l["request_id"].as_str().expect("id").to_string())
            .collect();
        assert_eq!(ids, [0, 1, 2].map(|i| format!("{i:032x}")));
    }

    #[test]
    fn concurrent_writers_never_interleave_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = std::sync::Arc::new(AuditLog::open(&path).expect("open"));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        log.write(&record(i)).expect("write");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer thread");
        }
        assert_eq!(lines(&path).len(), 800);
    }

    #[cfg(unix)]
    #[test]
    fn new_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        AuditLog::open(&path).expect("open");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn open_error_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("no-such-dir").join("audit.jsonl");
        let err = AuditLog::open(&path).err().expect("missing directory");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        let t = now_rfc3339();
        // 2025-01-31T12:34:56.789Z
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z'), "{t}");
        assert_eq!(&t[19..20], ".", "{t}");
        let parsed = chrono::DateTime::parse_from_rfc3339(&t).expect("parses as RFC 3339");
        assert_eq!(parsed.offset().local_minus_utc(), 0);
    }
}
