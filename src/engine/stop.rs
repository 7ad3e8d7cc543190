//! Stop strings over a stream of text deltas (OpenAI / vLLM `stop`).
//!
//! Generation stops as soon as the generated text contains one of the stop strings; the
//! stop string and everything after it are not returned. "As soon as" is by text, not by
//! delta: the occurrence that completes first (smallest end offset) wins, and of several
//! completing at the same offset the longest. So the result does not depend on how the text
//! was split into deltas, and it is the plain "truncate before the earliest occurrence"
//! whenever no stop string occurs inside another's occurrence.
//!
//! Text that may be the beginning of a stop string is held back until decided, so a stream
//! never shows part of a stop string; `finish` releases it when the stream ends otherwise.

/// Watches the generated text for stop strings. Text that could still be the start of a
/// stop string is held back until it is decided.
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not emitted: always a proper prefix of some stop string (between
    /// calls), so never longer than the longest stop.
    pending: String,
    stopped: bool,
}

/// What to emit after a delta, and whether a stop string matched.
#[derive(Debug, Default, PartialEq)]
pub struct StopOutcome {
    pub emit: String,
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stops: &[String]) -> Self {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        StopMatcher { stops, pending: String::new(), stopped: false }
    }

    /// True once a stop string has matched; later deltas are ignored.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next delta; returns the text now safe to show. After a match, `stopped` is
    /// true and `emit` ends right before the stop string.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome { emit: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return StopOutcome { emit: delta.to_string(), stopped: false };
        }
        self.pending.push_str(delta);
        // Every occurrence lies inside `pending`: emitted text never ends with a stop prefix.
        if let Some(start) = self.first_completed() {
            self.stopped = true;
            self.pending.truncate(start);
            return StopOutcome { emit: std::mem::take(&mut self.pending), stopped: true };
        }
        let hold = self.held_len();
        let rest = self.pending.split_off(self.pending.len() - hold);
        let emit = std::mem::replace(&mut self.pending, rest);
        StopOutcome { emit, stopped: false }
    }

    /// End of stream: whatever was held back (nothing after a match).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Start of the occurrence in `pending` that completes first (longest on a tie).
    fn first_completed(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|start| (start + s.len(), start)))
            .min()
            .map(|(_, start)| start)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            // Proper prefixes at char boundaries, longest first; shorter ones cannot beat it.
            let lens = stop.char_indices().map(|(i, _)| i).filter(|&i| i > best).rev();
            for len in lens {
                if self.pending.ends_with(&stop[..len]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut emits = Vec::new();
        let mut stopped = false;
        for d in deltas {
            let o = m.push(d);
            emits.push(o.emit);
            stopped |= o.stopped;
        }
        (emits, stopped, m.finish())
    }

    #[test]
    fn holds_back_possible_prefix_then_releases() {
        let (emits, stopped, tail) = run(&["</s>"], &["hello <", "/", "x"]);
        assert_eq!(emits, ["hello ", "", "</x"]);
        assert!(!stopped);
        assert_eq!(tail, "");
        let (emits, stopped, tail) = run(&["</s>"], &["hello </"]);
        assert_eq!((emits, stopped, tail), (vec!["hello ".to_string()], false, "</".to_string()));
    }

    #[test]
    fn earliest_completing_occurrence_wins() {
        // "bc" completes before "abcd" does.
        let (emits, stopped, _) = run(&["abcd", "bc"], &["abcd"]);
        assert_eq!((emits.concat(), stopped), ("a".to_string(), true));
        // Both complete at the same offset: the longer cuts more.
        let (emits, _, _) = run(&["b", "ab"], &["xa", "b"]);
        assert_eq!(emits.concat(), "x");
    }
}
