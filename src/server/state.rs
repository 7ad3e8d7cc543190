//! What every connection thread shares: the engine handle, a copy of the tokenizer,
//! the security settings, metrics, audit log, admission and shutdown state.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::audit::AuditLog;
use super::auth::ApiKeys;
use super::error::ApiError;
use super::metrics::Metrics;
use super::proxy::TrustedProxies;
use crate::engine::EngineHandle;
use crate::model::loader::GenerationDefaults;
use crate::tokenizer::Tokenizer;

pub struct App {
    pub engine: EngineHandle,
    pub tokenizer: Tokenizer,
    pub defaults: GenerationDefaults,
    pub max_model_len: usize,
    /// Names a request's `model` may use; the first is the one reported.
    pub served_names: Vec<String>,
    pub keys: ApiKeys,
    pub metrics_public: bool,
    pub metrics: Metrics,
    pub audit: Option<AuditLog>,
    pub proxies: TrustedProxies,
    pub request_timeout: Duration,
    /// Generation requests admitted at once: running sequences plus the bounded queue.
    pub max_in_flight: usize,
    pub in_flight: AtomicUsize,
    /// Unix time of start-up (the `created` of /v1/models).
    pub created: u64,
    /// Set on SIGTERM: new requests get 503, in-flight ones may finish.
    pub draining: AtomicBool,
    /// Set when the shutdown grace period is over: in-flight requests are aborted.
    pub aborting: AtomicBool,
}

/// Longest a single engine step may take before /health reports the engine stuck.
pub const MAX_STEP: Duration = Duration::from_secs(300);

impl App {
    /// Takes a generation slot, or 429 when the queue is full.
    pub fn admit(&self) -> Result<Slot<'_>, ApiError> {
        let mut current = self.in_flight.load(Ordering::SeqCst);
        loop {
            if current >= self.max_in_flight {
                return Err(ApiError::too_many_requests());
            }
            match self.in_flight.compare_exchange(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Ok(Slot(&self.in_flight)),
                Err(now) => current = now,
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn is_aborting(&self) -> bool {
        self.aborting.load(Ordering::SeqCst)
    }

    pub fn model_name(&self) -> &str {
        self.served_names.first().map(String::as_str).unwrap_or("qilin")
    }
}

/// An admitted generation request; dropping it frees the slot.
pub struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
