//! Integers and numbers within `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum`
//! (draft 4's boolean form too) and on a `multipleOf` step.

use serde_json::{Map, Value, json};

use super::{mix, pick};

/// The span used when a side of the range is open.
const OPEN_SPAN: f64 = 100.0;

/// A lower or upper bound and whether it is exclusive.
#[derive(Clone, Copy)]
struct Bound {
    at: f64,
    exclusive: bool,
}

fn bounds(schema: &Map<String, Value>) -> (Option<Bound>, Option<Bound>) {
    let number = |key: &str| schema.get(key).and_then(Value::as_f64);
    let flag = |key: &str| schema.get(key) == Some(&Value::Bool(true));
    let side = |inclusive: &str, exclusive: &str, lower: bool| {
        let inclusive_at = number(inclusive).map(|at| Bound { at, exclusive: flag(exclusive) });
        let exclusive_at = number(exclusive).map(|at| Bound { at, exclusive: true });
        match (inclusive_at, exclusive_at) {
            (Some(a), Some(b)) => Some(if (b.at >= a.at) == lower { b } else { a }),
            (a, b) => a.or(b),
        }
    };
    (side("minimum", "exclusiveMinimum", true), side("maximum", "exclusiveMaximum", false))
}

/// The range's ends, closed: open sides span [`OPEN_SPAN`] from the other end (or from 0).
fn span(low: Option<f64>, high: Option<f64>) -> (f64, f64) {
    match (low, high) {
        (Some(low), Some(high)) => (low, high),
        (Some(low), None) => (low, low + OPEN_SPAN),
        (None, Some(high)) => (if high >= 0.0 { 0.0 } else { high - OPEN_SPAN }, high),
        (None, None) => (0.0, OPEN_SPAN - 1.0),
    }
}

pub fn integer(schema: &Map<String, Value>, seed: u64) -> Value {
    let (low, high) = bounds(schema);
    let low = low.map(|b| if b.exclusive { b.at.floor() + 1.0 } else { b.at.ceil() });
    let high = high.map(|b| if b.exclusive { b.at.ceil() - 1.0 } else { b.at.floor() });
    let (low, high) = span(low, high);
    let step = schema.get("multipleOf").and_then(Value::as_f64).filter(|m| *m > 0.0);
    let value = match step {
        Some(step) if step.fract() == 0.0 => on_step(low, high, step, seed).unwrap_or(low),
        // A fractional step divides some integers (0.5 divides all): look for one.
        Some(step) => (0..64)
            .map(|i| low + ((pick(mix(seed, i), 1000) as f64) % (high - low + 1.0).max(1.0)).floor())
            .find(|v| (v / step).fract().abs() < 1e-9)
            .unwrap_or(low),
        None => low + (pick(seed, 1000) as f64 % (high - low + 1.0).max(1.0)).floor(),
    };
    let value = value.clamp(i64::MIN as f64, i64::MAX as f64) as i64;
    json!(value)
}

pub fn number(schema: &Map<String, Value>, seed: u64) -> Value {
    let (low_bound, high_bound) = bounds(schema);
    let (low, high) = span(low_bound.map(|b| b.at), high_bound.map(|b| b.at));
    let fits = |v: f64| {
        low_bound.is_none_or(|b| if b.exclusive { v > b.at } else { v >= b.at })
            && high_bound.is_none_or(|b| if b.exclusive { v < b.at } else { v <= b.at })
    };
    if let Some(step) = schema.get("multipleOf").and_then(Value::as_f64).filter(|m| *m > 0.0) {
        let value = on_step(low, high, step, seed).map(|v| round_to_step(v, step)).filter(|v| fits(*v));
        return value.map_or(json!(low), float);
    }
    // A point inside the range, preferring one with few decimals.
    let fraction = (1 + pick(seed, 9)) as f64 / 10.0;
    let raw = low + (high - low) * fraction;
    let value = [raw.round(), (raw * 10.0).round() / 10.0, (raw * 100.0).round() / 100.0, raw]
        .into_iter()
        .find(|v| fits(*v))
        .unwrap_or(raw);
    float(value)
}

/// A multiple of `step` in `[low, high]`, chosen by `seed`.
fn on_step(low: f64, high: f64, step: f64, seed: u64) -> Option<f64> {
    let first = (low / step).ceil();
    let last = (high / step).floor();
    if first > last || !first.is_finite() || !last.is_finite() {
        return None;
    }
    let count = (last - first + 1.0).min(1000.0);
    Some((first + (pick(seed, count as usize) as f64)) * step)
}

/// `value` printed with no more decimals than `step` has (0.1 × 3 is 0.3, not 0.30000000000000004).
fn round_to_step(value: f64, step: f64) -> f64 {
    let decimals = format!("{step}").split_once('.').map_or(0, |(_, fraction)| fraction.len()).min(12);
    format!("{value:.decimals$}").parse().unwrap_or(value)
}

/// A JSON number: an integer when the value is integral (the smallest text a model would write).
fn float(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 9.0e15 { json!(value as i64) } else { json!(value) }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{integer, number};

    fn schema(value: Value) -> serde_json::Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn integers_stay_in_range_and_on_step() {
        for seed in 0..200 {
            let v = integer(&schema(json!({"minimum": 10, "exclusiveMaximum": 20, "multipleOf": 3})), seed);
            let v = v.as_i64().unwrap();
            assert!((10..20).contains(&v) && v % 3 == 0, "{v}");
            let v = integer(&schema(json!({"exclusiveMinimum": 0})), seed).as_i64().unwrap();
            assert!(v > 0, "{v}");
        }
    }

    #[test]
    fn numbers_respect_exclusive_bounds() {
        for seed in 0..200 {
            let v = number(&schema(json!({"exclusiveMinimum": 0, "exclusiveMaximum": 1})), seed).as_f64().unwrap();
            assert!(v > 0.0 && v < 1.0, "{v}");
            let v = number(&schema(json!({"minimum": 1.5, "maximum": 1.5})), seed).as_f64().unwrap();
            assert_eq!(v, 1.5);
        }
    }
}
