//! [`Qos`], the first segment of a topic.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::{Subject, TopicError};
use crate::validate::parse_qos;
use crate::Segment;

/// Quality of service encoded in the first segment.
///
/// Written `q0`, `q1` or `q2` (lowercase) in topics, in `Display`, `FromStr` and serde.
/// The default is [`Qos::Q1`], the default of [`topic`](crate::topic).
///
/// ```
/// use tg_topic::Qos;
///
/// let qos: Qos = "q2".parse()?;
/// assert_eq!(qos, Qos::Q2);
/// assert_eq!(qos.level(), 2);
/// assert!(qos.is_persistent());
/// assert_eq!(Qos::default().to_string(), "q1");
/// assert!("Q1".parse::<Qos>().is_err());
/// # Ok::<(), tg_topic::TopicError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Qos {
    /// `q0`, best-effort: no acknowledgement, messages may be lost.
    Q0,
    /// `q1`, at-least-once: messages are acknowledged and redelivered until they are.
    #[default]
    Q1,
    /// `q2`, effectively-once: at-least-once delivery with de-duplication.
    Q2,
}

impl Qos {
    /// Every qos, lowest level first.
    pub const ALL: [Qos; 3] = [Qos::Q0, Qos::Q1, Qos::Q2];

    /// The segment text: `"q0"`, `"q1"` or `"q2"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Qos::Q0 => "q0",
            Qos::Q1 => "q1",
            Qos::Q2 => "q2",
        }
    }

    /// The numeric level: 0, 1 or 2 (the same numbers as MQTT QoS).
    pub const fn level(self) -> u8 {
        match self {
            Qos::Q0 => 0,
            Qos::Q1 => 1,
            Qos::Q2 => 2,
        }
    }

    /// The qos of a numeric level, `None` above 2.
    pub const fn from_level(level: u8) -> Option<Qos> {
        match level {
            0 => Some(Qos::Q0),
            1 => Some(Qos::Q1),
            2 => Some(Qos::Q2),
            _ => None,
        }
    }

    /// Whether messages must be stored until acknowledged: true for [`Qos::Q1`] and [`Qos::Q2`].
    pub const fn is_persistent(self) -> bool {
        !matches!(self, Qos::Q0)
    }
}

impl fmt::Display for Qos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Qos {
    type Err = TopicError;

    /// Parses exactly `q0`, `q1` or `q2`; the error has [`Segment::Qos`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_qos(s).map_err(|reason| TopicError::new(Subject::Qos, s, Segment::Qos, reason))
    }
}

impl Serialize for Qos {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Qos {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct QosVisitor;

        impl Visitor<'_> for QosVisitor {
            type Value = Qos;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a qos string: \"q0\", \"q1\" or \"q2\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Qos, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(QosVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Reason;

    #[test]
    fn strings_and_levels() {
        let expected = [("q0", 0, false), ("q1", 1, true), ("q2", 2, true)];
        for (qos, (text, level, persistent)) in Qos::ALL.into_iter().zip(expected) {
            assert_eq!(qos.as_str(), text);
            assert_eq!(qos.to_string(), text);
            assert_eq!(qos.level(), level);
            assert_eq!(qos.is_persistent(), persistent);
            assert_eq!(Qos::from_level(level), Some(qos));
            assert_eq!(text.parse::<Qos>(), Ok(qos));
        }
        assert_eq!(Qos::from_level(3), None);
        assert_eq!(Qos::default(), Qos::Q1);
        assert!(Qos::Q0 < Qos::Q1 && Qos::Q1 < Qos::Q2);
    }

    #[test]
    fn parse_errors() {
        let err = "q3".parse::<Qos>().unwrap_err();
        assert_eq!(err.segment(), Segment::Qos);
        assert_eq!(err.reason(), &Reason::UnknownQos("q3".into()));
        assert_eq!(err.input(), "q3");
        assert_eq!(
            err.to_string(),
            r#"invalid qos "q3": qos segment "q3" is not one of q0, q1, q2"#
        );
        for bad in ["Q1", " q1", "q1 ", "1", "q01", "q"] {
            assert_eq!(
                bad.parse::<Qos>().unwrap_err().reason(),
                &Reason::UnknownQos(bad.into())
            );
        }
        assert_eq!("".parse::<Qos>().unwrap_err().reason(), &Reason::Empty);
    }

    #[test]
    fn serde_as_string() {
        for qos in Qos::ALL {
            let json = serde_json::to_string(&qos).unwrap();
            assert_eq!(json, format!("\"{qos}\""));
            assert_eq!(serde_json::from_str::<Qos>(&json).unwrap(), qos);
        }
        let err = serde_json::from_str::<Qos>("\"q7\"").unwrap_err();
        assert!(
            err.to_string().contains("is not one of q0, q1, q2"),
            "{err}"
        );
        assert!(serde_json::from_str::<Qos>("1").is_err());
    }
}
