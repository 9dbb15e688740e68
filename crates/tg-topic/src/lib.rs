#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod qos;
pub mod queue;
mod topic;
mod validate;

pub use crate::error::{Reason, Segment, TopicError};
pub use crate::qos::Qos;
pub use crate::queue::{QueueClass, QueueId, QueueIdError};
pub use crate::topic::{Topic, TopicBuilder};

/// The tenant used by [`topic`] and [`Topic::builder`] unless another one is set.
pub const DEFAULT_TENANT: &str = "tg";

/// The namespace used by [`topic`] and [`Topic::builder`] unless another one is set.
pub const DEFAULT_NAMESPACE: &str = "flow";

/// Maximum length in bytes of the tenant and of the namespace segment.
pub const MAX_SEGMENT_LEN: usize = 64;

/// Maximum length in bytes of the queue segment.
pub const MAX_QUEUE_LEN: usize = 192;

/// Maximum length in bytes of the whole canonical topic text.
pub const MAX_TOPIC_LEN: usize = 255;

/// Maximum length in bytes of a subscription name (see [`validate_subscription`]).
pub const MAX_SUBSCRIPTION_LEN: usize = MAX_SEGMENT_LEN * 2;

/// Makes the topic `q1/tg/flow/{queue}`: the queue with the default qos ([`Qos::Q1`]),
/// [`DEFAULT_TENANT`] and [`DEFAULT_NAMESPACE`].
///
/// Use [`Topic::builder`] to change any of the defaults.
///
/// # Errors
///
/// A [`TopicError`] with [`Segment::Queue`] if `queue` is not a valid queue name.
///
/// # Examples
///
/// ```
/// let t = tg_topic::topic("my-queue")?;
/// assert_eq!(t.to_string(), "q1/tg/flow/my-queue");
/// assert!(tg_topic::topic("my queue").is_err());
/// # Ok::<(), tg_topic::TopicError>(())
/// ```
pub fn topic(queue: &str) -> Result<Topic, TopicError> {
    Topic::new(Qos::Q1, DEFAULT_TENANT, DEFAULT_NAMESPACE, queue)
}

/// Checks the name of a subscription (a consumer group).
///
/// A subscription name follows the rules of a tenant segment plus `':'`: it is made of
/// `A-Z a-z 0-9 _ . - :`, is not only dots, and is 1 to [`MAX_SUBSCRIPTION_LEN`] bytes long.
///
/// # Errors
///
/// A [`TopicError`] with [`Segment::Subscription`] saying what is wrong with the name.
///
/// # Examples
///
/// ```
/// use tg_topic::{validate_subscription, Reason};
///
/// assert!(validate_subscription("text-completion:ws1").is_ok());
/// let err = validate_subscription("my group").unwrap_err();
/// assert_eq!(err.reason(), &Reason::Whitespace { at: 2 });
/// ```
pub fn validate_subscription(name: &str) -> Result<(), TopicError> {
    validate::check_name(name, MAX_SUBSCRIPTION_LEN, true).map_err(|reason| {
        TopicError::new(
            error::Subject::Subscription,
            name,
            Segment::Subscription,
            reason,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_helper_uses_defaults() {
        let t = topic("x").unwrap();
        assert_eq!(t.to_string(), "q1/tg/flow/x");
        assert_eq!(t.qos(), Qos::Q1);
        assert_eq!(t.tenant(), DEFAULT_TENANT);
        assert_eq!(t.namespace(), DEFAULT_NAMESPACE);
        assert_eq!(t.queue(), "x");
    }

    #[test]
    fn topic_helper_rejects_bad_queue() {
        let err = topic("a/b").unwrap_err();
        assert_eq!(err.segment(), Segment::Queue);
        assert_eq!(err.reason(), &Reason::InvalidChar { ch: '/', at: 1 });
        let err = topic("").unwrap_err();
        assert_eq!(err.segment(), Segment::Queue);
        assert_eq!(err.reason(), &Reason::Empty);
    }

    #[test]
    fn subscription_names() {
        for ok in [
            "a",
            "text-completion",
            "text-completion:ws1:default",
            "Group_1.v2",
            "..a",
        ] {
            assert_eq!(validate_subscription(ok), Ok(()), "{ok}");
        }
        let long_ok = "s".repeat(MAX_SUBSCRIPTION_LEN);
        assert_eq!(validate_subscription(&long_ok), Ok(()));
    }

    #[test]
    fn subscription_rejections() {
        let cases: [(&str, Reason); 9] = [
            ("", Reason::Empty),
            ("a+", Reason::Wildcard { ch: '+', at: 1 }),
            ("#", Reason::Wildcard { ch: '#', at: 0 }),
            ("a b", Reason::Whitespace { at: 1 }),
            ("a\u{7}", Reason::Control { at: 1 }),
            ("a/b", Reason::InvalidChar { ch: '/', at: 1 }),
            ("é", Reason::InvalidChar { ch: 'é', at: 0 }),
            ("..", Reason::InvalidChar { ch: '.', at: 0 }),
            (
                &"s".repeat(MAX_SUBSCRIPTION_LEN + 1),
                Reason::TooLong {
                    len: MAX_SUBSCRIPTION_LEN + 1,
                    max: MAX_SUBSCRIPTION_LEN,
                },
            ),
        ];
        for (name, reason) in cases {
            let err = validate_subscription(name).unwrap_err();
            assert_eq!(err.segment(), Segment::Subscription, "{name:?}");
            assert_eq!(err.reason(), &reason, "{name:?}");
            assert_eq!(err.input(), name);
        }
    }

    #[test]
    fn subscription_error_text() {
        assert_eq!(
            validate_subscription("my group").unwrap_err().to_string(),
            r#"invalid subscription name "my group": subscription name contains whitespace at byte 2"#
        );
        assert_eq!(
            validate_subscription("").unwrap_err().to_string(),
            r#"invalid subscription name "": subscription name is empty"#
        );
    }
}
