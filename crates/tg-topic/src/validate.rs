//! The character and length rules shared by topic segments and subscription names.

use crate::error::Reason;
use crate::Qos;

/// Checks one name (tenant, namespace, queue or subscription).
///
/// `at` offsets in the returned [`Reason`] are byte offsets inside `name`, always on a char
/// boundary. The length is checked before the characters, so a huge input is rejected without
/// being scanned.
pub(crate) fn check_name(name: &str, max: usize, allow_colon: bool) -> Result<(), Reason> {
    if name.is_empty() {
        return Err(Reason::Empty);
    }
    if name.len() > max {
        return Err(Reason::TooLong {
            len: name.len(),
            max,
        });
    }
    for (at, ch) in name.char_indices() {
        if ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-') || (allow_colon && ch == ':')
        {
            continue;
        }
        return Err(match ch {
            '+' | '#' => Reason::Wildcard { ch, at },
            c if c.is_whitespace() => Reason::Whitespace { at },
            c if c.is_control() => Reason::Control { at },
            _ => Reason::InvalidChar { ch, at },
        });
    }
    if name.bytes().all(|b| b == b'.') {
        // "." and ".." are path tricks in file- and URL-based brokers.
        return Err(Reason::InvalidChar { ch: '.', at: 0 });
    }
    Ok(())
}

/// Parses the qos segment: exactly `q0`, `q1` or `q2`.
pub(crate) fn parse_qos(s: &str) -> Result<Qos, Reason> {
    match s {
        "q0" => Ok(Qos::Q0),
        "q1" => Ok(Qos::Q1),
        "q2" => Ok(Qos::Q2),
        "" => Err(Reason::Empty),
        other => Err(Reason::UnknownQos(
            truncate(other, crate::MAX_SEGMENT_LEN).to_owned(),
        )),
    }
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("abc", 2), "ab");
        assert_eq!(truncate("a€", 3), "a");
        assert_eq!(truncate("a€", 2), "a");
        assert_eq!(truncate("a€", 4), "a€");
        assert_eq!(truncate("€", 0), "");
    }

    #[test]
    fn wildcards_win_over_invalid_char_classification() {
        assert_eq!(
            check_name("+", 10, false),
            Err(Reason::Wildcard { ch: '+', at: 0 })
        );
        // The first bad character is reported.
        assert_eq!(
            check_name("a$+", 10, false),
            Err(Reason::InvalidChar { ch: '$', at: 1 })
        );
    }

    #[test]
    fn offsets_are_byte_offsets() {
        assert_eq!(
            check_name("éa", 10, false),
            Err(Reason::InvalidChar { ch: 'é', at: 0 })
        );
        assert_eq!(
            check_name("aé", 10, false),
            Err(Reason::InvalidChar { ch: 'é', at: 1 })
        );
        assert_eq!(
            check_name("€€ b", 10, false),
            Err(Reason::InvalidChar { ch: '€', at: 0 })
        );
        assert_eq!(
            check_name("ab\u{3000}", 10, false),
            Err(Reason::Whitespace { at: 2 })
        );
    }

    #[test]
    fn colon_only_where_allowed() {
        assert_eq!(check_name("a:b", 10, true), Ok(()));
        assert_eq!(
            check_name("a:b", 10, false),
            Err(Reason::InvalidChar { ch: ':', at: 1 })
        );
    }

    #[test]
    fn dots() {
        for dots in [".", "..", "..."] {
            assert_eq!(
                check_name(dots, 10, true),
                Err(Reason::InvalidChar { ch: '.', at: 0 })
            );
        }
        for ok in [".a", "a.", "a..b", ".-."] {
            assert_eq!(check_name(ok, 10, false), Ok(()));
        }
    }

    #[test]
    fn qos_segment() {
        assert_eq!(parse_qos("q0"), Ok(Qos::Q0));
        assert_eq!(parse_qos("q1"), Ok(Qos::Q1));
        assert_eq!(parse_qos("q2"), Ok(Qos::Q2));
        assert_eq!(parse_qos(""), Err(Reason::Empty));
        assert_eq!(parse_qos("Q1"), Err(Reason::UnknownQos("Q1".into())));
        assert_eq!(parse_qos("q1 "), Err(Reason::UnknownQos("q1 ".into())));
        let long = "€".repeat(100);
        let Err(Reason::UnknownQos(kept)) = parse_qos(&long) else {
            panic!("expected UnknownQos");
        };
        assert!(kept.len() <= crate::MAX_SEGMENT_LEN);
        assert!(long.starts_with(&kept));
    }
}
