//! Strings matching a `pattern`: the regex is parsed with `regex-syntax`, narrowed to printable
//! ASCII where a class allows it, and sampled with `rand_regex`; each sample is checked with
//! the `regex` crate (anchors and look-arounds are not generated, only checked).

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::rc::Rc;

use rand_regex_rng::TryRng;
use rand_regex_rng::distr::Distribution;
use regex_syntax::hir::{Capture, Class, ClassUnicode, ClassUnicodeRange, Hir, HirKind, Repetition};

/// Samples per repetition bound before giving up.
const SAMPLES: u64 = 32;
/// Compiled patterns kept per thread (cleared when full): a schema's patterns recur.
const CACHED_PATTERNS: usize = 128;
/// The longest match a sampled pattern may need, in bytes (a string's `minLength` cap is 4,096).
const MAX_PATTERN_LEN: usize = 4_096;

/// A pattern's checker and its samplers, by repetition bound.
struct Compiled {
    check: regex::Regex,
    hir: Hir,
}

thread_local! {
    static COMPILED: RefCell<HashMap<String, Option<Rc<Compiled>>>> = RefCell::new(HashMap::new());
}

fn compiled(pattern: &str) -> Option<Rc<Compiled>> {
    COMPILED.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(found) = cache.get(pattern) {
            return found.clone();
        }
        if cache.len() >= CACHED_PATTERNS {
            cache.clear();
        }
        let compiled = regex::Regex::new(pattern).ok().and_then(|check| {
            let hir = regex_syntax::ParserBuilder::new().build().parse(pattern).ok()?;
            // A pattern whose shortest match, or bounded longest one, is long (`a{1000000}`)
            // would make every sample that long: fall back to plain words instead.
            let properties = hir.properties();
            if properties.minimum_len().unwrap_or(0) > MAX_PATTERN_LEN
                || properties.maximum_len().is_some_and(|max| max > MAX_PATTERN_LEN)
            {
                return None;
            }
            Some(Rc::new(Compiled { check, hir: printable(hir) }))
        });
        cache.insert(pattern.to_owned(), compiled.clone());
        compiled
    })
}

/// A string of `min..=max` characters that `pattern` matches, or `None` when none was found
/// (an unsupported or unsatisfiable pattern: the caller falls back to a plain string).
pub fn generate(pattern: &str, seed: u64, min: usize, max: Option<usize>) -> Option<String> {
    let compiled = compiled(pattern)?;
    let mut rng = SplitMix(seed);
    // Unbounded repetitions run to `max_repeat` past their minimum: try short strings first
    // (a `maxLength` is common), then longer ones (for a `minLength`).
    let short = max.map_or(6, |max| max.clamp(1, 6) as u32);
    for max_repeat in [short, 6, 16, 64] {
        let Ok(sampler) = rand_regex::Regex::with_hir(compiled.hir.clone(), max_repeat) else { continue };
        for _ in 0..SAMPLES {
            let text: String = sampler.sample(&mut rng);
            let length = text.chars().count();
            if length >= min && max.is_none_or(|max| length <= max) && compiled.check.is_match(&text) {
                return Some(text);
            }
        }
    }
    None
}

/// Whether `pattern` (unanchored, as JSON Schema reads it) matches `text`; true for a pattern
/// the `regex` crate cannot compile (nothing to check it with).
pub fn matches(pattern: &str, text: &str) -> bool {
    compiled(pattern).is_none_or(|compiled| compiled.check.is_match(text))
}

/// `hir` without look-around assertions (sampled as nothing) and with each class narrowed to
/// its printable ASCII part when it has one.
fn printable(hir: Hir) -> Hir {
    match hir.into_kind() {
        HirKind::Look(_) => Hir::empty(),
        HirKind::Class(Class::Unicode(class)) => {
            let mut narrowed = class.clone();
            narrowed.intersect(&ClassUnicode::new([ClassUnicodeRange::new(' ', '~')]));
            Hir::class(Class::Unicode(if narrowed.ranges().is_empty() { class } else { narrowed }))
        }
        HirKind::Repetition(repetition) => {
            Hir::repetition(Repetition { sub: Box::new(printable(*repetition.sub)), ..repetition })
        }
        HirKind::Capture(capture) => Hir::capture(Capture { sub: Box::new(printable(*capture.sub)), ..capture }),
        HirKind::Concat(parts) => Hir::concat(parts.into_iter().map(printable).collect()),
        HirKind::Alternation(parts) => Hir::alternation(parts.into_iter().map(printable).collect()),
        HirKind::Empty => Hir::empty(),
        HirKind::Literal(literal) => Hir::literal(literal.0),
        HirKind::Class(class) => Hir::class(class),
    }
}

/// splitmix64 as a `rand` generator: samples are a pure function of the seed.
struct SplitMix(u64);

impl TryRng for SplitMix {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        self.try_next_u64().map(|n| (n >> 32) as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        Ok(super::mix(self.0, 0))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.try_next_u64()?.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::generate;

    #[test]
    fn samples_match_their_pattern_within_the_lengths() {
        for (pattern, min, max) in [
            (r"^\d{3}-\d{4}$", 0, None),
            (r"^[A-Z]{2}[0-9]{6}$", 8, Some(8)),
            (r"^[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}$", 0, Some(40)),
            (r"^(red|green|blue)$", 0, None),
            (r"\w+", 5, Some(9)),
            (r"^SKU-[A-F0-9]{4,8}$", 0, None),
        ] {
            let check = regex::Regex::new(pattern).unwrap();
            for seed in 0..50 {
                let text = generate(pattern, seed, min, max).unwrap_or_else(|| panic!("{pattern}"));
                assert!(check.is_match(&text), "{pattern}: {text}");
                assert!(text.chars().count() >= min && max.is_none_or(|max| text.chars().count() <= max));
                assert!(text.chars().all(|c| (' '..='~').contains(&c)), "{text}");
            }
        }
        assert_eq!(generate(r"^(?=a)b$", 1, 0, None), None, "look-ahead is not supported: fall back");
    }
}
