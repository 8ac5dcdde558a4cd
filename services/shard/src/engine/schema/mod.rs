//! Values that satisfy a JSON Schema: the sim engine's tool arguments and structured outputs.
//!
//! [`synthesize`] walks the schema the way a constrained decoder would: `$ref` (local pointers,
//! `#` recursion), `allOf` merged into one schema, one `anyOf`/`oneOf` branch chosen by seed,
//! `enum`/`const`, `type` lists with null, objects, arrays, numbers and strings with their
//! constraints. It is deterministic per seed. [`Contract`] checks each candidate with a real
//! validator and tries further seeds when one misses (a `oneOf` value matching two branches, a
//! `default` that does not fit its own schema), so what the engine emits validates.

mod merge;
mod numbers;
mod pattern;
mod strings;

use serde_json::{Map, Value, json};

/// Past this depth a value is the smallest the schema allows (required properties only,
/// minimum items, the simplest branch), so recursive schemas end.
const SHALLOW_DEPTH: u32 = 5;
/// Past this depth nothing more is generated (a schema with no finite value).
const MAX_DEPTH: u32 = 40;
/// `$ref` hops followed to resolve one schema (a chain of references that loops ends here).
const MAX_REF_HOPS: u32 = 16;
/// Seeds a [`Contract`] tries before it settles for a value the validator refused.
const ATTEMPTS: u64 = 24;
/// Schema nodes one synthesis may visit (values built plus references and `allOf`s resolved).
/// A client's schema is data: nested or recursive `minItems` (64^depth values) or an `allOf`
/// of self-references must not turn into unbounded memory and CPU in the shard. Past the
/// budget every value is `null`, which the validator then refuses.
const NODE_BUDGET: u32 = 4_096;

/// A schema a value must validate against, with its compiled validator.
pub struct Contract {
    schema: Value,
    strict: bool,
    validator: jsonschema::Validator,
}

impl Contract {
    /// Compiles `schema` (formats are checked too); an error names what is wrong with it.
    pub fn compile(schema: &Value, strict: bool) -> Result<Self, String> {
        let validator = jsonschema::options().should_validate_formats(true).build(schema).map_err(|e| e.to_string())?;
        Ok(Contract { schema: schema.clone(), strict, validator })
    }

    /// Returns a value that validates, trying seeds derived from `seed` in order; the last
    /// candidate if none does (a schema no finite value satisfies).
    pub fn value(&self, seed: u64) -> Value {
        let mut candidate = Value::Null;
        for attempt in 0..ATTEMPTS {
            let seed = if attempt == 0 { seed } else { mix(seed, 0x5eed ^ attempt) };
            let (value, spent) = synthesize_bounded(&self.schema, seed, self.strict);
            candidate = value;
            // A schema that outgrew the node budget outgrows it for every seed: stop here.
            if spent || self.validator.is_valid(&candidate) {
                return candidate;
            }
        }
        tracing::debug!("no synthesized value validated against the schema");
        candidate
    }

    pub fn is_valid(&self, value: &Value) -> bool {
        self.validator.is_valid(value)
    }
}

/// Builds a value for `schema` from `seed` (best effort: [`Contract::value`] checks it).
/// `strict` is OpenAI's strict mode: every declared property is present.
pub fn synthesize(schema: &Value, seed: u64, strict: bool) -> Value {
    synthesize_bounded(schema, seed, strict).0
}

/// [`synthesize`], and whether the node budget ran out (the value is then cut short).
fn synthesize_bounded(schema: &Value, seed: u64, strict: bool) -> (Value, bool) {
    let synthesizer = Synthesizer { root: schema, strict, budget: std::cell::Cell::new(NODE_BUDGET) };
    let value = synthesizer.value(schema, seed, 0);
    (value, synthesizer.budget.get() == 0)
}

struct Synthesizer<'a> {
    root: &'a Value,
    strict: bool,
    /// Nodes left to visit (see [`NODE_BUDGET`]).
    budget: std::cell::Cell<u32>,
}

impl Synthesizer<'_> {
    /// Takes one node from the budget; false once it is spent.
    fn spend(&self) -> bool {
        let left = self.budget.get();
        self.budget.set(left.saturating_sub(1));
        left > 0
    }

    fn value(&self, schema: &Value, seed: u64, depth: u32) -> Value {
        if depth > MAX_DEPTH || !self.spend() {
            return Value::Null;
        }
        match schema {
            Value::Object(schema) => self.object_schema(&self.flatten(schema, 0), seed, depth),
            Value::Bool(false) => Value::Null,
            // `true` and anything that is not a schema accept every value.
            _ => json!(format!("value-{}", seed % 1000)),
        }
    }

    /// Resolves `$ref` and merges `allOf` into one schema.
    fn flatten(&self, schema: &Map<String, Value>, hops: u32) -> Map<String, Value> {
        let mut out = schema.clone();
        if !self.spend() {
            return out;
        }
        if let Some(Value::String(reference)) = out.remove("$ref")
            && hops < MAX_REF_HOPS
            && let Some(Value::Object(target)) = self.resolve(&reference)
        {
            out = merge::merge(self.flatten(target, hops + 1), out);
        }
        if let Some(Value::Array(parts)) = out.remove("allOf") {
            for part in parts {
                if let Value::Object(part) = part {
                    out = merge::merge(out, self.flatten(&part, hops + 1));
                }
            }
        }
        out
    }

    /// A local reference: `#`, `#/$defs/Name`, `#/definitions/Name` or any JSON pointer.
    fn resolve(&self, reference: &str) -> Option<&Value> {
        let pointer = reference.strip_prefix('#')?;
        let pointer = percent_decode(pointer);
        self.root.pointer(&pointer)
    }

    fn object_schema(&self, schema: &Map<String, Value>, seed: u64, depth: u32) -> Value {
        let shallow = depth >= SHALLOW_DEPTH;
        if let Some(constant) = schema.get("const") {
            return constant.clone();
        }
        if let Some(Value::Array(options)) = schema.get("enum")
            && !options.is_empty()
        {
            return options[pick(seed, options.len())].clone();
        }
        if let Some(default) = schema.get("default")
            && (shallow || pick(mix(seed, 0xde), 4) == 0)
            && allowed_types(schema).is_none_or(|types| types.contains(&json_type(default)))
        {
            return default.clone();
        }
        for key in ["oneOf", "anyOf"] {
            if let Some(Value::Array(branches)) = schema.get(key)
                && !branches.is_empty()
            {
                let index = if shallow { simplest(branches) } else { pick(mix(seed, 0xb4), branches.len()) };
                let mut rest = schema.clone();
                for annotation in [key, "default", "title", "description", "examples"] {
                    rest.remove(annotation);
                }
                let branch = match &branches[index] {
                    Value::Object(branch) => self.flatten(branch, 0),
                    Value::Bool(false) => continue,
                    _ => Map::new(),
                };
                return self.object_schema(&merge::merge(branch, rest), mix(seed, 0xb5), depth + 1);
            }
        }
        let kind = self.choose_type(schema, seed, shallow);
        match kind {
            "null" => Value::Null,
            "boolean" => json!(pick(seed, 2) == 0),
            "integer" => numbers::integer(schema, seed),
            "number" => numbers::number(schema, seed),
            "array" => self.array(schema, seed, depth),
            "object" => self.object(schema, seed, depth),
            _ => strings::string(schema, seed),
        }
    }

    /// The JSON type to produce: one of `type`'s (null now and then when allowed, always when
    /// shallow), or the one the constraints imply.
    fn choose_type(&self, schema: &Map<String, Value>, seed: u64, shallow: bool) -> &'static str {
        let mut types = allowed_types(schema).unwrap_or_else(|| vec![implied_type(schema)]);
        if schema.get("nullable") == Some(&Value::Bool(true)) && !types.contains(&"null") {
            types.push("null");
        }
        let concrete: Vec<&'static str> = types.iter().copied().filter(|t| *t != "null").collect();
        let nullable = concrete.len() < types.len();
        if concrete.is_empty() || (nullable && (shallow || pick(mix(seed, 0x0f), 4) == 0)) {
            return "null";
        }
        concrete[pick(mix(seed, 0x7e), concrete.len())]
    }

    fn object(&self, schema: &Map<String, Value>, seed: u64, depth: u32) -> Value {
        let shallow = depth >= SHALLOW_DEPTH;
        let empty = Map::new();
        let properties = schema.get("properties").and_then(Value::as_object).unwrap_or(&empty);
        let required: Vec<&str> =
            schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        let closed = [schema.get("additionalProperties"), schema.get("unevaluatedProperties")]
            .contains(&Some(&Value::Bool(false)));
        let extra_schema = match schema.get("additionalProperties") {
            Some(extra @ Value::Object(_)) => extra.clone(),
            _ => json!({}),
        };
        let min = schema.get("minProperties").and_then(Value::as_u64).unwrap_or(0).min(64) as usize;
        let max = schema.get("maxProperties").and_then(Value::as_u64).map_or(usize::MAX, |n| n as usize);

        let mut out = Map::new();
        let mut omitted = Vec::new();
        for (index, (name, property)) in properties.iter().enumerate() {
            let salt = index as u64 + 1;
            let include =
                required.contains(&name.as_str()) || (!shallow && (self.strict || pick(mix(seed, salt), 3) != 0));
            if include {
                out.insert(name.clone(), self.value(property, mix(seed, salt), depth + 1));
            } else {
                omitted.push((name, property, salt));
            }
        }
        for (index, name) in required.iter().enumerate() {
            if !out.contains_key(*name) {
                out.insert((*name).to_owned(), self.value(&extra_schema, mix(seed, 0x100 + index as u64), depth + 1));
            }
        }
        // A map (`dict[str, X]`): no declared properties, a schema for the rest.
        let entries = if properties.is_empty() && schema.get("additionalProperties").is_some_and(Value::is_object) {
            if shallow { 0 } else { 1 + pick(mix(seed, 0xe1), 2) }
        } else {
            0
        };
        let mut key_index = 0u64;
        while (out.len() < min || key_index < entries as u64) && key_index < 64 {
            if let Some((name, property, salt)) = (!omitted.is_empty()).then(|| omitted.remove(0)) {
                out.insert(name.clone(), self.value(property, mix(seed, salt), depth + 1));
                continue;
            }
            if closed {
                break;
            }
            let key = self.property_name(schema, mix(seed, 0x200 + key_index), key_index, depth);
            key_index += 1;
            if !out.contains_key(&key) {
                out.insert(key, self.value(&extra_schema, mix(seed, 0x300 + key_index), depth + 1));
            }
        }
        while out.len() > max {
            let Some(name) = out.keys().rev().find(|name| !required.contains(&name.as_str())).cloned() else {
                break;
            };
            out.remove(&name);
        }
        Value::Object(out)
    }

    fn property_name(&self, schema: &Map<String, Value>, seed: u64, index: u64, depth: u32) -> String {
        match schema.get("propertyNames") {
            Some(names @ Value::Object(_)) => match self.value(names, seed, depth + 1) {
                Value::String(name) => name,
                _ => format!("key_{index}"),
            },
            _ => format!("key_{index}"),
        }
    }

    fn array(&self, schema: &Map<String, Value>, seed: u64, depth: u32) -> Value {
        let shallow = depth >= SHALLOW_DEPTH;
        // Draft 2020-12 `prefixItems` + `items`, or the older array form of `items` +
        // `additionalItems`.
        let (prefix, rest) = match (schema.get("prefixItems"), schema.get("items")) {
            (Some(Value::Array(prefix)), items) => (prefix.clone(), items.cloned()),
            (_, Some(Value::Array(prefix))) => (prefix.clone(), schema.get("additionalItems").cloned()),
            (_, items) => (Vec::new(), items.cloned()),
        };
        let rest = rest.unwrap_or(json!({}));
        let min = schema.get("minItems").and_then(Value::as_u64).unwrap_or(0).min(64) as usize;
        let mut max = schema.get("maxItems").and_then(Value::as_u64).map_or(usize::MAX, |n| n as usize);
        if rest == Value::Bool(false) {
            max = max.min(prefix.len());
        }
        let wanted = if shallow { min } else { min.max(prefix.len()).max(1) + pick(mix(seed, 0xa0), 3) };
        let length = wanted.max(min).min(max).max(min.min(max));
        let unique = schema.get("uniqueItems") == Some(&Value::Bool(true));

        let mut items: Vec<Value> = Vec::with_capacity(length);
        if let Some(contains) = schema.get("contains")
            && length > prefix.len()
        {
            items.extend(prefix.iter().enumerate().map(|(i, s)| self.value(s, mix(seed, i as u64), depth + 1)));
            items.push(self.value(contains, mix(seed, 0xc0), depth + 1));
        }
        let mut attempt = 0u64;
        while items.len() < length && attempt < length as u64 * 8 + 8 {
            let index = items.len();
            let item_schema = prefix.get(index).unwrap_or(&rest);
            let item = self.value(item_schema, mix(seed, (index as u64) << 8 | attempt), depth + 1);
            attempt += 1;
            if unique && items.contains(&item) {
                continue;
            }
            items.push(item);
        }
        Value::Array(items)
    }
}

/// The types `type` lists, if it is present.
fn allowed_types(schema: &Map<String, Value>) -> Option<Vec<&'static str>> {
    let names: Vec<&str> = match schema.get("type")? {
        Value::String(kind) => vec![kind.as_str()],
        Value::Array(kinds) => kinds.iter().filter_map(Value::as_str).collect(),
        _ => return None,
    };
    Some(names.into_iter().filter_map(type_name).collect())
}

fn type_name(name: &str) -> Option<&'static str> {
    ["null", "boolean", "integer", "number", "string", "array", "object"].into_iter().find(|t| *t == name)
}

/// The type a schema without `type` describes, from its keywords (a string when nothing says).
fn implied_type(schema: &Map<String, Value>) -> &'static str {
    let has = |keys: &[&str]| keys.iter().any(|key| schema.contains_key(*key));
    if has(&["properties", "required", "additionalProperties", "minProperties", "patternProperties", "propertyNames"]) {
        "object"
    } else if has(&["items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains"]) {
        "array"
    } else if has(&["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"]) {
        "number"
    } else {
        "string"
    }
}

/// The JSON Schema type of a value (an integral number is an integer, which `number` allows).
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The branch with the least nesting: where a recursive schema ends (`null`, a scalar).
fn simplest(branches: &[Value]) -> usize {
    let weight = |branch: &Value| -> usize {
        let text = branch.to_string();
        let refs = text.matches("$ref").count();
        let null = branch.get("type") == Some(&json!("null"));
        if null { 0 } else { 1 + refs * 1000 + text.len() }
    };
    (0..branches.len()).min_by_key(|&i| weight(&branches[i])).unwrap_or(0)
}

/// `%xx` escapes in a reference's pointer (JSON pointer `~0`/`~1` are `Value::pointer`'s).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text.get(i + 1..i + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An index in `0..len` from `seed`.
pub(crate) fn pick(seed: u64, len: usize) -> usize {
    (seed % len.max(1) as u64) as usize
}

/// Derives an independent seed from `seed` and `salt` (splitmix64's finalizer).
pub(crate) fn mix(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
