//! Input safety classification, pluggable behind [`Classifier`].
//!
//! The default is a pattern classifier: an Aho-Corasick automaton over a set of phrases per
//! category, case-insensitive, linear in the text it checks. Only new input is checked on a
//! chained turn; verdicts of earlier items are kept with the session state.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

pub trait Classifier: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Returns the category of the first flagged span, or `None` when the text is allowed.
    fn classify(&self, text: &str) -> Option<&str>;
}

pub struct PatternClassifier {
    automaton: AhoCorasick,
    categories: Vec<String>,
}

/// The built-in phrases: leaked private keys and credentials, plus a canary phrase that
/// tests and operators use to check the classifier is wired in.
pub const DEFAULT_PATTERNS: &[(&str, &str)] = &[
    ("credentials", "-----BEGIN RSA PRIVATE KEY-----"),
    ("credentials", "-----BEGIN OPENSSH PRIVATE KEY-----"),
    ("credentials", "-----BEGIN EC PRIVATE KEY-----"),
    ("credentials", "-----BEGIN PRIVATE KEY-----"),
    ("canary", "tether-safety-canary"),
];

impl PatternClassifier {
    /// Builds a classifier from `(category, phrase)` pairs.
    pub fn new(patterns: &[(String, String)]) -> Self {
        let automaton = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::LeftmostFirst)
            .build(patterns.iter().map(|(_, phrase)| phrase))
            .expect("safety patterns compile");
        let categories = patterns.iter().map(|(category, _)| category.clone()).collect();
        PatternClassifier { automaton, categories }
    }

    pub fn with_defaults(extra: &[(String, String)]) -> Self {
        let mut patterns: Vec<(String, String)> =
            DEFAULT_PATTERNS.iter().map(|(c, p)| ((*c).to_owned(), (*p).to_owned())).collect();
        patterns.extend_from_slice(extra);
        Self::new(&patterns)
    }
}

impl Classifier for PatternClassifier {
    fn name(&self) -> &'static str {
        "patterns-v1"
    }

    fn classify(&self, text: &str) -> Option<&str> {
        self.automaton.find(text).map(|found| self.categories[found.pattern().as_usize()].as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::{Classifier, PatternClassifier};

    #[test]
    fn flags_patterns_case_insensitively() {
        let classifier = PatternClassifier::with_defaults(&[("custom".into(), "forbidden words".into())]);
        assert_eq!(classifier.classify("hello world"), None);
        assert_eq!(classifier.classify("x TETHER-SAFETY-CANARY y"), Some("canary"));
        assert_eq!(classifier.classify("some Forbidden Words here"), Some("custom"));
        assert_eq!(classifier.classify("-----BEGIN RSA PRIVATE KEY-----\nabc"), Some("credentials"));
    }
}
