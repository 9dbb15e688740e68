//! Properties as stored: a JSON object of string values, in the `properties` column (`jsonb`) of
//! q1/q2 messages and in the header of q0 notifications.
//!
//! tg-pubsub writes string values only, but another writer of the same table (a SQL `INSERT`,
//! another framework) may not. Reading, every value is kept: a string as it is; a number, a
//! boolean, an array or an object as its compact JSON text (`3`, `true`, `[1,2]`), which is
//! what it looks like in the column; a `null`, which carries no value, is dropped. The consumer
//! logs a warning naming the keys that were not strings, so nothing changes or goes silently.
//!
//! A name given twice follows the rule of every backend: the last value wins and the consumer
//! logs a warning naming it ([`tg_backend_api::kit::properties_from_pairs`]). A `jsonb` column
//! cannot hold a name twice (PostgreSQL keeps the last value when the row is written, before
//! any consumer sees it); a q0 notification's header is plain JSON text and can.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use tg_backend_api::kit::{properties_from_pairs, warn_repeated};
use tg_backend_api::Properties;

/// Properties as the text of the `jsonb` column (`None` when empty).
pub fn to_json(properties: &Properties) -> Option<String> {
    if properties.is_empty() {
        None
    } else {
        serde_json::to_string(properties).ok()
    }
}

/// Properties read from stored JSON, and what the reading had to change.
#[derive(Debug, Default, PartialEq)]
pub struct Read {
    /// The properties.
    pub properties: Properties,
    /// Keys whose values were numbers, booleans, arrays or objects, kept as their JSON text.
    pub converted: Vec<String>,
    /// Keys whose values were `null`, dropped.
    pub dropped: Vec<String>,
    /// Keys given more than once (the last value kept).
    pub repeated: Vec<String>,
}

impl Read {
    /// Logs what the reading changed, on `topic`.
    pub(crate) fn warn(&self, topic: &str) {
        if !self.converted.is_empty() || !self.dropped.is_empty() {
            tracing::warn!(
                topic,
                converted = ?self.converted,
                dropped = ?self.dropped,
                "a received message has property values that are not strings; numbers, \
                 booleans, arrays and objects are kept as their JSON text, nulls are dropped"
            );
        }
        warn_repeated(topic, &self.repeated);
    }
}

/// The key-value pairs of a JSON object in their order, repeats included.
pub(crate) struct Pairs(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = Pairs;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(pair) = map.next_entry::<String, Value>()? {
                    pairs.push(pair);
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor)
    }
}

impl Pairs {
    /// The properties these pairs give under the rules of this module.
    pub(crate) fn read(self) -> Read {
        let mut converted = Vec::new();
        let mut dropped = Vec::new();
        // A `null` counts as a name's value like any other: given last, it leaves the name
        // out, as `jsonb` does when it keeps the last value of a repeated name.
        let mut last_null = BTreeSet::new();
        let strings = self.0.into_iter().map(|(key, value)| {
            let text = match value {
                Value::String(s) => s,
                Value::Null => {
                    dropped.push(key.clone());
                    last_null.insert(key.clone());
                    return (key, String::new());
                }
                other => {
                    converted.push(key.clone());
                    other.to_string()
                }
            };
            last_null.remove(&key);
            (key, text)
        });
        let (mut properties, repeated) = properties_from_pairs(strings);
        for key in &last_null {
            properties.remove(key);
        }
        for names in [&mut converted, &mut dropped] {
            names.sort();
            names.dedup();
        }
        Read {
            properties,
            converted,
            dropped,
            repeated,
        }
    }
}

/// Reads the text of a stored properties object.
pub fn read(text: &str) -> serde_json::Result<Read> {
    serde_json::from_str::<Pairs>(text).map(Pairs::read)
}

/// The properties of a received q1/q2 message on `topic` from the column's text, with the
/// warnings of [`Read::warn`]. Text that is not a JSON object (another writer's) gives no
/// properties and a warning saying so.
pub(crate) fn from_json_logged(topic: &str, text: &str) -> Properties {
    match read(text) {
        Ok(read) => {
            read.warn(topic);
            read.properties
        }
        Err(e) => {
            tracing::warn!(topic, error = %e, "a received message's properties are not a JSON object; ignored");
            Properties::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn strings_only_is_the_plain_case() {
        let read = read(r#"{"a": "1", "b": "x\ny"}"#).unwrap();
        assert_eq!(read.properties.len(), 2);
        assert_eq!(read.properties["b"], "x\ny");
        assert_eq!(
            (read.converted, read.dropped, read.repeated),
            (vec![], vec![], vec![])
        );
    }

    #[test]
    fn other_values_are_kept_as_json_text_and_named() {
        let read = read(
            r#"{"s": "str", "n": 3, "f": 1.5, "neg": -7, "t": true, "arr": [1, "x"],
                "obj": {"k": null}, "nil": null}"#,
        )
        .unwrap();
        let p = &read.properties;
        assert_eq!(p["s"], "str");
        assert_eq!(p["n"], "3");
        assert_eq!(p["f"], "1.5");
        assert_eq!(p["neg"], "-7");
        assert_eq!(p["t"], "true");
        assert_eq!(p["arr"], r#"[1,"x"]"#);
        assert_eq!(p["obj"], r#"{"k":null}"#);
        assert!(!p.contains_key("nil"));
        assert_eq!(read.converted, names(&["arr", "f", "n", "neg", "obj", "t"]));
        assert_eq!(read.dropped, names(&["nil"]));
    }

    #[test]
    fn a_repeated_name_keeps_the_last_value() {
        let read = read(r#"{"a": "1", "b": "x", "a": "2", "a": 3}"#).unwrap();
        assert_eq!(read.properties["a"], "3");
        assert_eq!(read.repeated, names(&["a"]));
        assert_eq!(read.converted, names(&["a"]));
    }

    /// A `null` given last for a repeated name leaves the name out (its last value is no
    /// value), as the same text stored in the `jsonb` column would.
    #[test]
    fn a_repeated_name_whose_last_value_is_null_is_left_out() {
        let read = read(r#"{"a": "1", "b": "x", "a": null, "b": null, "b": "y"}"#).unwrap();
        assert!(!read.properties.contains_key("a"), "{:?}", read.properties);
        assert_eq!(read.properties["b"], "y");
        assert_eq!(read.properties.len(), 1);
        assert_eq!(read.repeated, names(&["a", "b"]));
        assert_eq!(read.dropped, names(&["a", "b"]));
    }

    #[test]
    fn not_an_object_is_an_error() {
        for text in ["[1, 2]", "\"x\"", "3", "null"] {
            assert!(read(text).is_err(), "{text}");
        }
    }
}
