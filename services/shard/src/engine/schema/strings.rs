//! Strings that satisfy `format`, `pattern`, `minLength` and `maxLength`.

use serde_json::{Map, Value, json};

use super::{mix, pattern, pick};

/// Words a plain string is made of.
const WORDS: &[&str] = &[
    "alpha", "bravo", "cedar", "delta", "ember", "fjord", "grove", "harbor", "iris", "juniper", "kite", "lumen",
    "maple", "nova", "orbit", "pine", "quartz", "river", "sierra", "tide",
];

pub fn string(schema: &Map<String, Value>, seed: u64) -> Value {
    let min = schema.get("minLength").and_then(Value::as_u64).map_or(0, |n| n.min(4096) as usize);
    let max = schema.get("maxLength").and_then(Value::as_u64).map(|n| n as usize);
    let fits = |text: &str| {
        let length = text.chars().count();
        length >= min && max.is_none_or(|max| length <= max)
    };
    let pattern = schema.get("pattern").and_then(Value::as_str);
    if let Some(format) = schema.get("format").and_then(Value::as_str)
        && let Some(text) = formatted(format, seed)
        && fits(&text)
        && pattern.is_none_or(|p| pattern::matches(p, &text))
    {
        return json!(text);
    }
    if let Some(pattern) = pattern
        && let Some(text) = pattern::generate(pattern, seed, min, max)
    {
        return json!(text);
    }
    json!(plain(seed, min, max))
}

/// Words, padded to `min` characters and cut to `max`.
fn plain(seed: u64, min: usize, max: Option<usize>) -> String {
    let mut text = WORDS[pick(seed, WORDS.len())].to_owned();
    let mut index = 1;
    while text.chars().count() < min.max(12) {
        text.push(' ');
        text.push_str(WORDS[pick(mix(seed, index), WORDS.len())]);
        index += 1;
    }
    match max {
        Some(max) => text.chars().take(max).collect(),
        None => text,
    }
}

/// A value of a JSON Schema `format` (and OpenAPI's), `None` for a format it does not know.
fn formatted(format: &str, seed: u64) -> Option<String> {
    let n = seed % 10_000;
    let date = || format!("{:04}-{:02}-{:02}", 2020 + seed % 7, 1 + (seed / 7) % 12, 1 + (seed / 84) % 28);
    let time = || format!("{:02}:{:02}:{:02}", (seed / 3) % 24, (seed / 11) % 60, (seed / 13) % 60);
    Some(match format {
        "date" => date(),
        "date-time" => format!("{}T{}Z", date(), time()),
        "time" => format!("{}Z", time()),
        "duration" => format!("P{}DT{}H", 1 + n % 30, n % 24),
        "email" | "idn-email" => format!("user{n}@example.com"),
        "uri" | "url" | "iri" | "uri-reference" | "iri-reference" => format!("https://example.com/items/{n}"),
        "uri-template" => "https://example.com/items/{id}".to_owned(),
        "uuid" => uuid(seed),
        "ipv4" => format!("192.0.2.{}", 1 + n % 254),
        "ipv6" => format!("2001:db8::{:x}", 1 + n % 0xfffe),
        "hostname" | "idn-hostname" => format!("host-{n}.example.com"),
        "json-pointer" => format!("/items/{}", n % 100),
        "relative-json-pointer" => format!("0/items/{}", n % 100),
        "regex" => "^[a-z]+$".to_owned(),
        "byte" => "dGV0aGVy".to_owned(),
        "int32" | "int64" => format!("{n}"),
        _ => return None,
    })
}

/// A version 4 UUID from `seed`.
fn uuid(seed: u64) -> String {
    let high = mix(seed, 0x0a);
    let low = mix(seed, 0x0b);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xfff,
        8 + (low >> 62),
        (low >> 48) & 0xfff,
        low & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::string;

    #[test]
    fn lengths_are_honoured() {
        for seed in 0..100 {
            for (min, max) in [(0, 3), (12, 12), (30, 40), (1, 1), (0, 0)] {
                let schema = json!({"minLength": min, "maxLength": max});
                let text = string(schema.as_object().unwrap(), seed);
                let length = text.as_str().unwrap().chars().count();
                assert!((min..=max).contains(&length), "{text} {min}..{max}");
            }
        }
    }

    #[test]
    fn formats_have_their_shape() {
        let uuid = string(json!({"format":"uuid"}).as_object().unwrap(), 5);
        let Value::String(uuid) = uuid else { panic!() };
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
    }
}
