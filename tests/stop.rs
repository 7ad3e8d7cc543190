//! StopMatcher over arbitrary splits of a text, against a direct reference: scan the whole
//! text char by char and cut at the first stop string to complete (the longest on a tie).

use proptest::prelude::*;
use qilin::engine::stop::StopMatcher;

/// The reference result: (returned text, stopped).
fn reference(text: &str, stops: &[String]) -> (String, bool) {
    let ends = text.char_indices().map(|(i, c)| i + c.len_utf8());
    for end in ends {
        let hit = stops.iter().filter(|s| text[..end].ends_with(s.as_str())).map(|s| s.len()).max();
        if let Some(len) = hit {
            return (text[..end - len].to_string(), true);
        }
    }
    (text.to_string(), false)
}

/// Splits `text` at the given char positions (sorted, deduplicated by the caller).
fn split<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    let mut points: Vec<usize> = cuts.iter().map(|&c| bounds[c % bounds.len()]).collect();
    points.push(0);
    points.push(text.len());
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

/// Streams `deltas` through a matcher, checking at every step that nothing beyond the final
/// answer was shown and that only a possible stop prefix is held back.
fn stream(deltas: &[&str], stops: &[String], want: &str) -> Result<(String, bool), TestCaseError> {
    let mut m = StopMatcher::new(stops);
    let (mut shown, mut seen, mut stopped) = (String::new(), String::new(), false);
    for d in deltas {
        let out = m.push(d);
        prop_assert!(!stopped || out.emit.is_empty(), "text after the stop");
        shown.push_str(&out.emit);
        seen.push_str(d);
        stopped |= out.stopped;
        prop_assert!(want.starts_with(&shown), "shown {:?} is not a prefix of {:?}", shown, want);
        if !stopped {
            let held = &seen[shown.len()..];
            prop_assert!(
                held.is_empty() || stops.iter().any(|s| s.starts_with(held) && s != held),
                "held back {:?}, not a stop prefix",
                held
            );
        }
    }
    shown.push_str(&m.finish());
    Ok((shown, stopped))
}

fn text_of(
    alphabet: &'static [&'static str],
    len: std::ops::Range<usize>,
) -> BoxedStrategy<String> {
    prop::collection::vec(prop::sample::select(alphabet), len).prop_map(|v| v.concat()).boxed()
}

const TEXT: &[&str] = &["a", "b", "你", "😀", "c", "é"];
const STOP: &[&str] = &["a", "b", "你"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_split_gives_the_reference_result(
        text in text_of(TEXT, 0..40),
        stops in prop::collection::vec(text_of(STOP, 1..5), 0..4),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let want = reference(&text, &stops);
        let deltas = split(&text, &cuts);
        let got = stream(&deltas, &stops, &want.0)?;
        prop_assert_eq!(got, want, "deltas {:?} stops {:?}", deltas, stops);
    }
}

fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
    let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
    let full = deltas.concat();
    let want = reference(&full, &stops);
    let got = stream(deltas, &stops, &want.0).expect("stream invariants");
    assert_eq!(got, want);
    got
}

#[test]
fn chinese_stop_split_inside_and_across_deltas() {
    let stops = ["。\n", "结束"];
    assert_eq!(run(&stops, &["你好", "。", "\n再见"]), ("你好".into(), true));
    assert_eq!(run(&stops, &["任务结", "束了"]), ("任务".into(), true));
    assert_eq!(run(&stops, &["结", "果。", "好"]), ("结果。好".into(), false));
}

#[test]
fn overlapping_stops() {
    // A stop that is its own prefix's continuation: "abab" inside "aabab".
    assert_eq!(run(&["abab"], &["a", "a", "b", "a", "b", "x"]), ("a".into(), true));
    // One stop inside another's occurrence: "bc" completes first.
    assert_eq!(run(&["abcd", "bc"], &["ab", "cd"]), ("a".into(), true));
    // Same end: the longer stop cuts more.
    assert_eq!(run(&["cd", "bcd"], &["abc", "d"]), ("a".into(), true));
    // A held prefix of one stop that turns into another stop.
    assert_eq!(run(&["<|im_end|>", "<|end|>"], &["hi <|", "end|> more"]), ("hi ".into(), true));
}

#[test]
fn no_stops_passes_everything_through() {
    assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    let mut m = StopMatcher::new(&[String::new()]);
    assert_eq!(m.push("x").emit, "x");
}
