//! Properties read from a broker that can repeat a name (MQTT 5 user properties, Kafka headers,
//! AMQP header tables written by other clients, JSON objects with a key twice).
//!
//! [`Properties`] holds one value per name, as the Python framework's `dict` does. The one rule,
//! for every backend: **the last value of a repeated name wins** (what the framework's
//! `dict(pairs)` gives a Python consumer of the same message), and the consumer logs a warning
//! naming the repeated names and the topic, so that the values dropped are never dropped silently.

use crate::Properties;

/// Collects `(name, value)` pairs under the last-value-wins rule, returning the properties and
/// the names that came more than once (sorted, each once), for the caller to report.
///
/// ```
/// use tg_backend_api::kit::properties_from_pairs;
///
/// let (props, repeated) = properties_from_pairs([("a", "1"), ("b", "x"), ("a", "2"), ("a", "3")]);
/// assert_eq!(props.get("a").map(String::as_str), Some("3"));
/// assert_eq!(repeated, vec!["a".to_owned()]);
/// ```
pub fn properties_from_pairs<K, V>(
    pairs: impl IntoIterator<Item = (K, V)>,
) -> (Properties, Vec<String>)
where
    K: Into<String>,
    V: Into<String>,
{
    let mut properties = Properties::new();
    let mut repeated: Vec<String> = Vec::new();
    for (name, value) in pairs {
        let name = name.into();
        if properties.contains_key(&name) && !repeated.contains(&name) {
            repeated.push(name.clone());
        }
        properties.insert(name, value.into());
    }
    repeated.sort();
    (properties, repeated)
}

/// [`properties_from_pairs`], logging a warning on `topic` when a name was repeated.
pub fn properties_from_pairs_logged<K, V>(
    topic: &str,
    pairs: impl IntoIterator<Item = (K, V)>,
) -> Properties
where
    K: Into<String>,
    V: Into<String>,
{
    let (properties, repeated) = properties_from_pairs(pairs);
    warn_repeated(topic, &repeated);
    properties
}

/// The warning for names a received message repeated (nothing when `repeated` is empty).
pub fn warn_repeated(topic: &str, repeated: &[String]) {
    if !repeated.is_empty() {
        tracing::warn!(
            topic,
            names = ?repeated,
            "a received message repeats property names; the last value of each is kept"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_value_wins_and_repeats_are_named_once() {
        let (props, repeated) =
            properties_from_pairs([("b", "1"), ("a", "1"), ("b", "2"), ("a", "2"), ("b", "3")]);
        assert_eq!(props.len(), 2);
        assert_eq!(props["a"], "2");
        assert_eq!(props["b"], "3");
        assert_eq!(repeated, ["a", "b"]);
    }

    #[test]
    fn distinct_names_report_nothing() {
        let (props, repeated) = properties_from_pairs([("a", "1"), ("b", "2")]);
        assert_eq!(props.len(), 2);
        assert!(repeated.is_empty());
    }
}
