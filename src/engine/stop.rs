//! Stop strings over a stream of text deltas (owned by the sampling work item). STUB.

/// Watches the generated text for stop strings. Text that could still be the start of a
/// stop string is held back until it is decided.
pub struct StopMatcher {
    stops: Vec<String>,
}

/// What to emit after a delta, and whether a stop string matched.
#[derive(Debug, Default, PartialEq)]
pub struct StopOutcome {
    pub emit: String,
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.to_vec() }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        let _ = &self.stops;
        StopOutcome { emit: delta.to_string(), stopped: false }
    }

    /// End of stream: whatever was held back.
    pub fn finish(&mut self) -> String {
        String::new()
    }
}
