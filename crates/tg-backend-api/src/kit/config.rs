//! The one configuration grammar every backend reads its URL with.
//!
//! A backend URL is `scheme://[user[:password]@]host[:port][/path][?option=value&…]`. The
//! authority and path are the backend's to interpret ([`BackendUrl`]); the query options are
//! read into the backend's serde options struct by [`parse_url`], with the same rules in every
//! backend:
//!
//! - option names are the struct's field names (`connect_timeout`, `reconnect_max`,
//!   `dedup_window`, … mean the same thing wherever they appear);
//! - durations are human strings with a unit, `250ms`, `5s`, `2m`, `1h 30m` (fields declared with
//!   `#[serde(with = "tg_backend_api::kit::config::duration")]`);
//! - booleans are `true` or `false`; numbers are plain decimal integers (sizes in bytes);
//! - an unknown option is an error that lists the known ones, a repeated option is an error, and a
//!   value that does not read names the option and the value;
//! - secrets (the password, options listed as secret) are [`Secret`]s: `Debug`, `Display` and
//!   [`redact_url`] print them as `***`.
//!
//! ```
//! use std::time::Duration;
//! use tg_backend_api::kit::config::{self, parse_url};
//!
//! #[derive(Debug, Default, serde::Deserialize)]
//! #[serde(default, deny_unknown_fields)]
//! struct Options {
//!     #[serde(with = "config::duration")]
//!     connect_timeout: Duration,
//!     batch: usize,
//!     tls_verify: bool,
//! }
//!
//! let url = parse_url::<Options>("Demo", &["demo"], "demo://me:pw@host:7/db?connect_timeout=250ms&batch=5").unwrap();
//! assert_eq!(url.options.connect_timeout, Duration::from_millis(250));
//! assert_eq!((url.host.as_deref(), url.port, url.path.as_str()), (Some("host"), Some(7), "db"));
//! assert_eq!(url.password.as_ref().map(|p| p.expose()), Some("pw"));
//! assert_eq!(format!("{:?}", url.password), "Some(***)");
//!
//! let err = parse_url::<Options>("Demo", &["demo"], "demo://host?colour=blue").unwrap_err();
//! assert_eq!(
//!     err.message(),
//!     "unknown Demo URL option \"colour\"; known: connect_timeout, batch, tls_verify"
//! );
//! let err = parse_url::<Options>("Demo", &["demo"], "demo://host?connect_timeout=5").unwrap_err();
//! assert!(err.message().starts_with("Demo URL option connect_timeout=\"5\": "), "{err}");
//! ```

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// A secret value (password, token): readable with [`Secret::expose`], printed as `***`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// The placeholder every secret prints as.
    pub const REDACTED: &'static str = "***";

    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for handing to the client crate.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

impl Serialize for Secret {
    /// Serialises as `***`: a configuration written out never carries the secret.
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(Self::REDACTED)
    }
}

/// A backend URL taken apart: what the authority and path say, and the query read into the
/// backend's options struct `O`.
#[derive(Debug, Clone)]
pub struct BackendUrl<O> {
    /// The scheme, one of those the backend accepts.
    pub scheme: String,
    /// The host, without brackets around an IPv6 address; `None` when the URL has none.
    pub host: Option<String>,
    /// The port, when the URL gives one.
    pub port: Option<u16>,
    /// The user name, percent-decoded; `None` when empty.
    pub username: Option<String>,
    /// The password, percent-decoded.
    pub password: Option<Secret>,
    /// The path without its leading `/`, percent-decoded (a database number, a schema, a vhost).
    pub path: String,
    /// The query options.
    pub options: O,
}

impl<O> BackendUrl<O> {
    /// The host, or an error saying the URL needs one (`example` shows the form).
    pub fn require_host(&self, what: &str, example: &str) -> Result<String> {
        self.host
            .clone()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| Error::config(format!("{what} URL has no host (expected {example})")))
    }
}

/// Parses `url` as a URL of backend `what` (its name in messages, e.g. `Redis`) with one of
/// `schemes`, reading the query into `O` by the rules of this module. Nothing secret appears in
/// the errors.
pub fn parse_url<O: DeserializeOwned>(
    what: &str,
    schemes: &[&str],
    url: &str,
) -> Result<BackendUrl<O>> {
    let parsed = url::Url::parse(url)
        .map_err(|e| Error::config(format!("malformed {what} URL {:?}: {e}", redact_url(url))))?;
    if !schemes.contains(&parsed.scheme()) {
        return Err(Error::config(format!(
            "{what} URL must start with {}, got scheme {:?}",
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(" or "),
            parsed.scheme()
        )));
    }
    let decode = |s: &str, part: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(Cow::into_owned)
            .map_err(|_| {
                Error::config(format!(
                    "{what} URL {part} is not valid percent-encoded UTF-8"
                ))
            })
    };
    let username = match parsed.username() {
        "" => None,
        user => Some(decode(user, "user name")?),
    };
    let password = parsed
        .password()
        .map(|p| decode(p, "password").map(Secret))
        .transpose()?;
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned());
    let path = decode(parsed.path().trim_start_matches('/'), "path")?;
    let options = parse_options(what, parsed.query().unwrap_or(""))?;
    Ok(BackendUrl {
        scheme: parsed.scheme().to_owned(),
        host,
        port: parsed.port(),
        username,
        password,
        path,
        options,
    })
}

/// Reads a query string (`a=1&b=2s`) into `O` by the rules of this module.
pub fn parse_options<O: DeserializeOwned>(what: &str, query: &str) -> Result<O> {
    let known = option_names::<O>();
    let pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = form_urlencoded_pairs(query).collect::<Vec<_>>();
    for (i, (key, _)) in pairs.iter().enumerate() {
        if !known.contains(&key.as_ref()) {
            return Err(Error::config(format!(
                "unknown {what} URL option {key:?}; known: {}",
                known.join(", ")
            )));
        }
        if pairs[..i].iter().any(|(k, _)| k == key) {
            return Err(Error::config(format!(
                "{what} URL option {key:?} is given twice"
            )));
        }
    }
    let deserializer =
        serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let option = e.path().to_string();
        let value = pairs
            .iter()
            .find(|(k, _)| *k == option)
            .map(|(_, v)| v.as_ref())
            .unwrap_or("");
        Error::config(format!(
            "{what} URL option {option}={value:?}: {}",
            e.into_inner()
        ))
    })
}

// The pre-check of option names reads the pairs with the parser `serde_urlencoded` reads with, so
// both see the same keys.
fn form_urlencoded_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    form_urlencoded::parse(query.as_bytes())
}

/// The field names of a serde struct, in declaration order, as its `Deserialize` impl declares
/// them (fields marked `#[serde(skip)]` are not among them).
pub fn option_names<O: DeserializeOwned>() -> Vec<&'static str> {
    struct Names(Vec<&'static str>);
    impl<'de> Deserializer<'de> for &mut Names {
        type Error = de::value::Error;

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            self.0.extend_from_slice(fields);
            Err(de::Error::custom("names only"))
        }

        fn deserialize_any<V: Visitor<'de>>(
            self,
            _visitor: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut names = Names(Vec::new());
    let _ = O::deserialize(&mut names);
    names.0
}

/// Serde helpers for [`Duration`] options written with a unit (`250ms`, `5s`, `2m`, `1h 30m`).
/// A bare number is refused, so `connect_timeout=5` cannot silently mean five milliseconds in one
/// backend and five seconds in another.
pub mod duration {
    use super::*;

    /// Reads a duration with a unit.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Duration, D::Error> {
        let text = Cow::<str>::deserialize(deserializer)?;
        parse(&text).map_err(de::Error::custom)
    }

    /// Writes a duration the way it is read (`1s 500ms`).
    pub fn serialize<S: Serializer>(
        value: &Duration,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    /// Parses `250ms`, `5s`, `2m`, `1h 30m`.
    pub fn parse(text: &str) -> std::result::Result<Duration, String> {
        let text = text.trim();
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("a duration needs a unit, e.g. {text}ms or {text}s"));
        }
        humantime::parse_duration(text)
            .map_err(|e| format!("not a duration ({e}); e.g. 250ms, 5s, 2m"))
    }
}

/// Serde helpers for optional [`Duration`] options (absent = `None`), written as in [`duration`].
pub mod opt_duration {
    use super::*;

    /// Reads an optional duration with a unit.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Option<Duration>, D::Error> {
        super::duration::deserialize(deserializer).map(Some)
    }

    /// Writes an optional duration.
    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match value {
            Some(d) => super::duration::serialize(d, serializer),
            None => serializer.serialize_none(),
        }
    }
}

/// Checks of option values after parsing: `require(ok, backend, option, rule)` fails with an error
/// naming the option and the rule it breaks.
///
/// ```
/// use tg_backend_api::kit::config::require;
/// assert!(require(true, "Redis", "batch", "at least 1").is_ok());
/// let err = require(false, "Redis", "batch", "at least 1").unwrap_err();
/// assert_eq!(err.message(), "Redis option batch must be at least 1");
/// ```
pub fn require(ok: bool, what: &str, option: &str, rule: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{what} option {option} must be {rule}"
        )))
    }
}

/// `url` with its password (and the values of the query options named in `secret_options`)
/// replaced by `***`; an unparsable URL shows as a placeholder, since it may hold a secret in a
/// place no parser found.
///
/// ```
/// use tg_backend_api::kit::config::redact_url;
/// assert_eq!(redact_url("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
/// assert_eq!(redact_url("not a url"), "<unparsable URL>");
/// ```
pub fn redact_url(url: &str) -> String {
    redact_url_options(url, &[])
}

/// [`redact_url`], also hiding the values of the query options named in `secret_options`.
pub fn redact_url_options(url: &str, secret_options: &[&str]) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "<unparsable URL>".to_owned();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(Secret::REDACTED));
    }
    if !secret_options.is_empty() && parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret_options.contains(&k.as_ref()) {
                    Secret::REDACTED.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Opts {
        #[serde(with = "duration")]
        wait: Duration,
        #[serde(with = "opt_duration")]
        linger: Option<Duration>,
        on: bool,
        count: u32,
        name: String,
        #[serde(skip)]
        hidden: u8,
    }

    fn opts(query: &str) -> Result<Opts> {
        parse_options("Test", query)
    }

    #[test]
    fn reads_every_kind_of_value() {
        let o = opts("wait=1m%2030s&linger=250ms&on=true&count=7&name=a%2Fb").unwrap();
        assert_eq!(o.wait, Duration::from_secs(90));
        assert_eq!(o.linger, Some(Duration::from_millis(250)));
        assert!(o.on);
        assert_eq!((o.count, o.name.as_str()), (7, "a/b"));
        assert_eq!(opts("").unwrap(), Opts::default());
    }

    #[test]
    fn errors_name_the_option_and_the_value() {
        for (query, needle) in [
            (
                "bogus=1",
                "unknown Test URL option \"bogus\"; known: wait, linger, on, count, name",
            ),
            ("hidden=1", "unknown Test URL option \"hidden\""),
            (
                "count=1&count=2",
                "Test URL option \"count\" is given twice",
            ),
            (
                "wait=5",
                "Test URL option wait=\"5\": a duration needs a unit, e.g. 5ms or 5s",
            ),
            ("wait=soon", "Test URL option wait=\"soon\": not a duration"),
            ("on=yes", "Test URL option on=\"yes\""),
            ("count=-1", "Test URL option count=\"-1\""),
        ] {
            let err = opts(query).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::ConfigInvalid);
            assert!(err.message().starts_with(needle), "{query}: {err}");
        }
    }

    #[test]
    fn urls_take_apart_and_hide_the_password() {
        let u = parse_url::<Opts>(
            "Test",
            &["t", "ts"],
            "ts://us%40r:p%3Aw@[::1]:9/v%2Fh?count=2",
        )
        .unwrap();
        assert_eq!(u.scheme, "ts");
        assert_eq!(u.host.as_deref(), Some("::1"));
        assert_eq!(u.port, Some(9));
        assert_eq!(u.username.as_deref(), Some("us@r"));
        assert_eq!(u.password.as_ref().unwrap().expose(), "p:w");
        assert_eq!(u.path, "v/h");
        assert_eq!(u.options.count, 2);
        let err = parse_url::<Opts>("Test", &["t"], "http://u:s3cret@h").unwrap_err();
        assert_eq!(
            err.message(),
            "Test URL must start with t://, got scheme \"http\""
        );
        let err = parse_url::<Opts>("Test", &["t"], "t://u:s3cret@h:99999").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(err.message().starts_with("malformed Test URL"), "{err}");
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url_options("p://u:pw@h/x?token=abc&n=1", &["token"]),
            "p://u:***@h/x?token=***&n=1"
        );
        assert_eq!(format!("{}", Secret::new("x")), "***");
        assert_eq!(serde_json_like(&Secret::new("x")), "\"***\"");
    }

    fn serde_json_like(secret: &Secret) -> String {
        serde_urlencoded::to_string([("s", secret)])
            .map(|s| format!("\"{}\"", s.trim_start_matches("s=").replace("%2A", "*")))
            .unwrap_or_default()
    }

    #[test]
    fn durations_print_as_they_read() {
        let d = Duration::from_millis(1500);
        let text = humantime::format_duration(d).to_string();
        assert_eq!(duration::parse(&text), Ok(d));
    }
}
