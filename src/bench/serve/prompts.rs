//! Seeded random prompts for `qilin bench serve`.
//!
//! The client has no tokenizer (it may be pointed at any OpenAI-compatible server), so
//! prompts are built from short common English words that nearly every BPE vocabulary
//! holds as one token with its leading space: `--input-len` words give about that many
//! tokens, and the report uses the exact counts from the server's `usage`. Random
//! words also keep prompts apart, so a prefix cache cannot flatter the numbers.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are",
    "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by",
    "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said", "there",
    "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up", "other",
    "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make", "like",
    "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no",
    "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "now", "find",
    "long", "down", "day", "did", "get", "come", "made", "may", "part", "over", "new", "sound",
    "take", "only", "little", "work", "know", "place", "year", "live", "me", "back", "give",
    "most", "very", "after", "thing", "our", "just", "name", "good", "man", "think", "say",
    "great", "where", "help", "through", "much", "before", "line", "right", "too", "mean", "old",
    "any", "same", "tell", "boy", "follow", "came", "want", "show", "also", "around", "form",
    "three", "small", "set", "put", "end", "does", "another", "well", "large", "must", "big",
    "even", "such", "because", "turn", "here", "why", "ask", "went", "men", "read", "need", "land",
    "different", "home", "us", "move", "try", "kind", "hand", "picture", "again", "change", "off",
    "play", "spell", "air", "away", "animal", "house", "point", "page", "letter", "mother",
    "answer", "found", "study", "still", "learn", "should", "world", "high", "every", "near",
    "add", "food", "between", "own", "below", "country", "plant", "last", "school", "father",
    "keep", "tree", "never", "start", "city", "earth", "eye", "light", "thought", "head", "under",
    "story", "saw", "left", "few", "while", "along", "might", "close", "something", "seem", "next",
    "hard", "open", "example", "begin", "life", "always", "those", "both", "paper", "together",
    "got", "group", "often", "run", "important", "until", "children", "side", "feet", "car",
    "mile", "night", "walk", "white", "sea", "began", "grow", "took", "river", "four", "carry",
    "state", "once", "book", "hear", "stop", "without", "second", "later", "miss", "idea",
    "enough", "eat", "face",
];

/// `count` prompts of `words` words each; the same seed always gives the same prompts.
pub fn generate(count: usize, words: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let picked: Vec<&str> =
                (0..words).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
            picked.join(" ")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_prompts_other_seed_other_prompts() {
        let a = generate(8, 32, 7);
        assert_eq!(a, generate(8, 32, 7));
        assert_ne!(a, generate(8, 32, 8));
        // The prompts of one run differ from each other too (no shared prefix to cache).
        for (i, p) in a.iter().enumerate() {
            for q in &a[i + 1..] {
                assert_ne!(p, q);
            }
        }
    }

    #[test]
    fn prompts_have_the_asked_number_of_known_words() {
        for p in generate(5, 17, 1) {
            let words: Vec<&str> = p.split(' ').collect();
            assert_eq!(words.len(), 17, "{p:?}");
            assert!(words.iter().all(|w| WORDS.contains(w)), "{p:?}");
        }
        assert_eq!(generate(3, 0, 1), vec![String::new(); 3]);
    }

    #[test]
    fn word_list_is_plain_lowercase_words() {
        assert!(WORDS.len() >= 256, "{} words", WORDS.len());
        for w in WORDS {
            assert!(!w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase()), "{w:?}");
        }
    }
}
