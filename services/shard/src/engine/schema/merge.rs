//! Merging two schemas into one that asks for both (`allOf`, `$ref` with siblings, a chosen
//! `anyOf` branch with the keywords around it): the tighter bound wins, lists intersect.

use serde_json::{Map, Value, json};

/// Keywords whose larger value is the tighter bound.
const LOWER_BOUNDS: &[&str] = &["minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"];
/// Keywords whose smaller value is the tighter bound.
const UPPER_BOUNDS: &[&str] = &["maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"];

/// Returns a schema for values that satisfy both `first` and `second` (as far as one schema
/// can say it; where neither bound nor list applies, `first`'s keyword wins).
pub fn merge(mut first: Map<String, Value>, second: Map<String, Value>) -> Map<String, Value> {
    for (key, value) in second {
        let Some(existing) = first.get_mut(&key) else {
            first.insert(key, value);
            continue;
        };
        match key.as_str() {
            "properties" => {
                if let (Value::Object(mine), Value::Object(theirs)) = (existing, value) {
                    for (name, schema) in theirs {
                        match mine.remove(&name) {
                            Some(current) if current != schema => {
                                mine.insert(name, json!({"allOf": [current, schema]}));
                            }
                            Some(current) => {
                                mine.insert(name, current);
                            }
                            None => {
                                mine.insert(name, schema);
                            }
                        }
                    }
                }
            }
            "required" => {
                if let (Value::Array(mine), Value::Array(theirs)) = (existing, value) {
                    for name in theirs {
                        if !mine.contains(&name) {
                            mine.push(name);
                        }
                    }
                }
            }
            "type" => {
                let mine = type_list(existing);
                let both: Vec<Value> = type_list(&value)
                    .into_iter()
                    .filter(|t| mine.contains(t) || (t == "integer" && mine.iter().any(|m| m == "number")))
                    .map(Value::String)
                    .collect();
                if !both.is_empty() {
                    *existing = Value::Array(both);
                }
            }
            "enum" => {
                if let (Value::Array(mine), Value::Array(theirs)) = (&*existing, &value) {
                    let both: Vec<Value> = mine.iter().filter(|v| theirs.contains(v)).cloned().collect();
                    if !both.is_empty() {
                        *existing = Value::Array(both);
                    }
                }
            }
            "additionalProperties" | "unevaluatedProperties" if value == Value::Bool(false) => *existing = value,
            key if LOWER_BOUNDS.contains(&key) => tighten(existing, &value, |a, b| b > a),
            key if UPPER_BOUNDS.contains(&key) => tighten(existing, &value, |a, b| b < a),
            _ => {}
        }
    }
    first
}

/// Replaces `existing` by `candidate` when both are numbers and `better(existing, candidate)`.
fn tighten(existing: &mut Value, candidate: &Value, better: impl Fn(f64, f64) -> bool) {
    if let (Some(a), Some(b)) = (existing.as_f64(), candidate.as_f64())
        && better(a, b)
    {
        *existing = candidate.clone();
    }
}

fn type_list(value: &Value) -> Vec<String> {
    match value {
        Value::String(kind) => vec![kind.clone()],
        Value::Array(kinds) => kinds.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::merge;

    fn map(value: Value) -> serde_json::Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn bounds_tighten_and_lists_intersect() {
        let merged = merge(
            map(json!({"type":["string","null"],"minLength":2,"maxLength":10,"required":["a"],"properties":{"a":{}}})),
            map(json!({"type":"string","minLength":4,"maxLength":20,"required":["b"],"properties":{"b":{}}})),
        );
        assert_eq!(merged["type"], json!(["string"]));
        assert_eq!((merged["minLength"].clone(), merged["maxLength"].clone()), (json!(4), json!(10)));
        assert_eq!(merged["required"], json!(["a", "b"]));
        assert_eq!(merged["properties"].as_object().unwrap().len(), 2);
    }
}
