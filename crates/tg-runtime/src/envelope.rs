//! A CloudEvents-style envelope around message data.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A message wrapped with event metadata, using the CloudEvents 1.0 attribute names (`specversion`,
/// `id`, `type`, `source`, `time`, `datacontenttype`, `data`) and the extension attribute
/// `correlationid` (CloudEvents extension names are lowercase alphanumeric). Spec 003 FR-002/FR-016.
///
/// It is an ordinary message type: send it with a typed producer and handle it with a
/// [`ConsumerRunner`](crate::ConsumerRunner), de-duplicating on [`Envelope::id`]
/// (see [`ConsumerRunner::deduplicate`](crate::ConsumerRunner::deduplicate)).
///
/// ```
/// use tg_runtime::Envelope;
///
/// let e = Envelope::new("tars.stt.final", "stt-worker", "hello".to_owned()).correlation_id("req-7");
/// let json = serde_json::to_value(&e).unwrap();
/// assert_eq!(json["type"], "tars.stt.final");
/// assert_eq!(json["specversion"], "1.0");
/// assert_eq!(json["correlationid"], "req-7");
/// assert_eq!(json["data"], "hello");
/// assert!(json["time"].as_str().unwrap().ends_with('Z'));
/// let back: Envelope<String> = serde_json::from_value(json).unwrap();
/// assert_eq!(back, e);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// CloudEvents spec version: `1.0`.
    #[serde(default = "spec_version")]
    pub specversion: String,
    /// Unique id of the event (a UUID v4 by default); consumers de-duplicate on it.
    pub id: String,
    /// The event type, e.g. `tars.stt.final`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Who emitted the event (service name or URI).
    pub source: String,
    /// When, RFC 3339 in UTC (`2026-11-23T15:00:00.123Z`).
    pub time: String,
    /// Media type of `data`. Default: `application/json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    /// Correlation id linking requests, responses and follow-up events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<String>,
    /// The payload.
    pub data: T,
}

fn spec_version() -> String {
    "1.0".to_owned()
}

impl<T> Envelope<T> {
    /// A new envelope: fresh id, current time, `application/json`.
    pub fn new(event_type: impl Into<String>, source: impl Into<String>, data: T) -> Self {
        Self {
            specversion: spec_version(),
            id: uuid::Uuid::new_v4().to_string(),
            event_type: event_type.into(),
            source: source.into(),
            time: rfc3339(SystemTime::now()),
            datacontenttype: Some("application/json".to_owned()),
            correlationid: None,
            data,
        }
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlationid = Some(id.into());
        self
    }

    /// Sets the id.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }
}

impl<T: tg_schema::Message> tg_schema::Message for Envelope<T> {
    const NAME: &'static str = "envelope";
}

/// Formats a time as RFC 3339 in UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
