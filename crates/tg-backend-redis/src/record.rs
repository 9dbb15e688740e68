//! A message as a producer queues it: `send` copies the message's parts into its batch's buffer
//! (no allocation per message), and the producer's writer reads them back as [`Record`]s to build
//! the batch's commands. The layout never leaves the process.
//!
//! Little-endian: `[u32 payload len][payload][u32 key len + 1, 0 = none][key][u32 n]`
//! `([u32 len][name][u32 len][value])*n`.

use tg_backend_api::Properties;

/// Appends a message's parts to `buf` as one record.
pub fn encode_record(
    buf: &mut Vec<u8>,
    payload: &[u8],
    properties: &Properties,
    key: Option<&str>,
) {
    let props: usize = properties.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    buf.reserve(12 + payload.len() + key.map_or(0, str::len) + props);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    match key {
        Some(k) => {
            buf.extend_from_slice(&(k.len() as u32 + 1).to_le_bytes());
            buf.extend_from_slice(k.as_bytes());
        }
        None => buf.extend_from_slice(&0u32.to_le_bytes()),
    }
    buf.extend_from_slice(&(properties.len() as u32).to_le_bytes());
    for (k, v) in properties {
        buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
        buf.extend_from_slice(k.as_bytes());
        buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        buf.extend_from_slice(v.as_bytes());
    }
}

/// A queued message (see [`encode_record`]), borrowed from the batch's buffer.
#[derive(Clone, Copy)]
pub struct Record<'a> {
    /// The payload.
    pub payload: &'a [u8],
    /// The key, when set.
    pub key: Option<&'a [u8]>,
    count: usize,
    props: &'a [u8],
}

/// Splits `n` bytes off the front of `buf`.
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

fn take_u32(buf: &mut &[u8]) -> Option<usize> {
    let b = take(buf, 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

impl<'a> Record<'a> {
    /// Decodes the record at the front of `buf` and advances past it.
    pub fn decode(buf: &mut &'a [u8]) -> Option<Self> {
        let n = take_u32(buf)?;
        let payload = take(buf, n)?;
        let key = match take_u32(buf)? {
            0 => None,
            n => Some(take(buf, n - 1)?),
        };
        let count = take_u32(buf)?;
        let start = *buf;
        for _ in 0..count {
            let n = take_u32(buf)?;
            take(buf, n)?;
            let n = take_u32(buf)?;
            take(buf, n)?;
        }
        let props = &start[..start.len() - buf.len()];
        Some(Self {
            payload,
            key,
            count,
            props,
        })
    }

    /// The properties, `(name, value)`.
    pub(crate) fn properties(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        let mut rest = self.props;
        (0..self.count).filter_map(move |_| {
            let n = take_u32(&mut rest)?;
            let k = take(&mut rest, n)?;
            let n = take_u32(&mut rest)?;
            Some((k, take(&mut rest, n)?))
        })
    }

    /// One property's value.
    pub(crate) fn property(&self, name: &str) -> Option<&'a [u8]> {
        self.properties()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The number of properties.
    pub(crate) fn property_count(&self) -> usize {
        self.count
    }

    /// The bytes the properties take as `XADD` fields or in a frame (names and values, each
    /// with a 4-byte length).
    pub(crate) fn properties_len(&self) -> usize {
        self.props.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut props = Properties::new();
        props.insert("id".into(), "42".into());
        props.insert("empty".into(), String::new());
        let mut buf = Vec::new();
        encode_record(&mut buf, b"payload", &props, Some("k1"));
        encode_record(&mut buf, b"", &Properties::new(), None);
        encode_record(&mut buf, b"x", &Properties::new(), Some(""));
        let mut rest = &buf[..];
        let a = Record::decode(&mut rest).unwrap();
        assert_eq!((a.payload, a.key), (&b"payload"[..], Some(&b"k1"[..])));
        let got: Vec<_> = a.properties().collect();
        assert_eq!(
            got,
            vec![(&b"empty"[..], &b""[..]), (&b"id"[..], &b"42"[..])]
        );
        assert_eq!(a.property("id"), Some(&b"42"[..]));
        assert_eq!(a.property_count(), 2);
        let b = Record::decode(&mut rest).unwrap();
        assert_eq!((b.payload, b.key, b.property_count()), (&b""[..], None, 0));
        let c = Record::decode(&mut rest).unwrap();
        assert_eq!((c.payload, c.key), (&b"x"[..], Some(&b""[..])));
        assert!(rest.is_empty() && Record::decode(&mut rest).is_none());
        assert!(Record::decode(&mut &buf[..5]).is_none());
    }
}
