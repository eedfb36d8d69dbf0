//! Structured Fields (RFC 9651) of the IETF resumable-uploads protocol and of digests
//! (RFC 9530), parsed and written with the `sfv` crate.

use http::{HeaderMap, HeaderValue};
use sfv::{BareItem, DictSerializer, Dictionary, Item, KeyRef, ListEntry, Parser};

/// A field as the request carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field<T> {
    Absent,
    /// Present but not a valid value of its type.
    Malformed(String),
    Valid(T),
}

impl<T> Field<T> {
    pub fn valid(self) -> Option<T> {
        match self {
            Self::Valid(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_present(&self) -> bool {
        !matches!(self, Self::Absent)
    }
}

/// The field's value as one string (repeated lines joined as RFC 9110 combines them); None when
/// absent.
fn combined(headers: &HeaderMap, name: &str) -> Option<Result<String, String>> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let mut joined = String::new();
    for value in values {
        let Ok(text) = value.to_str() else {
            return Some(Err(format!("{name} is not ASCII")));
        };
        if !joined.is_empty() {
            joined.push_str(", ");
        }
        joined.push_str(text);
    }
    Some(Ok(joined))
}

fn item(headers: &HeaderMap, name: &str) -> Field<BareItem> {
    match combined(headers, name) {
        None => Field::Absent,
        Some(Err(e)) => Field::Malformed(e),
        Some(Ok(text)) => match Parser::new(&text).parse::<Item>() {
            Ok(item) => Field::Valid(item.bare_item),
            Err(e) => Field::Malformed(format!("{name} is not a structured field item: {e}")),
        },
    }
}

/// A non-negative Integer field (`Upload-Offset`, `Upload-Length`, the interop version).
pub fn integer(headers: &HeaderMap, name: &str) -> Field<u64> {
    match item(headers, name) {
        Field::Absent => Field::Absent,
        Field::Malformed(e) => Field::Malformed(e),
        Field::Valid(bare) => match bare.as_integer().map(i64::from) {
            Some(n) if n >= 0 => Field::Valid(n as u64),
            Some(n) => Field::Malformed(format!("{name} must not be negative (it is {n})")),
            None => Field::Malformed(format!("{name} must be an Integer")),
        },
    }
}

/// A Boolean field (`Upload-Complete`: `?1` or `?0`).
pub fn boolean(headers: &HeaderMap, name: &str) -> Field<bool> {
    match item(headers, name) {
        Field::Absent => Field::Absent,
        Field::Malformed(e) => Field::Malformed(e),
        Field::Valid(bare) => match bare.as_boolean() {
            Some(b) => Field::Valid(b),
            None => Field::Malformed(format!("{name} must be a Boolean, ?1 or ?0")),
        },
    }
}

/// A digest field (`Content-Digest`, `Repr-Digest`): algorithm names and their Byte Sequences.
/// Members that are not Byte Sequences are skipped.
pub fn digests(headers: &HeaderMap, name: &str) -> Field<Vec<(String, Vec<u8>)>> {
    match combined(headers, name) {
        None => Field::Absent,
        Some(Err(e)) => Field::Malformed(e),
        Some(Ok(text)) => match Parser::new(&text).parse::<Dictionary>() {
            Ok(dict) => Field::Valid(
                dict.iter()
                    .filter_map(|(key, entry)| match entry {
                        ListEntry::Item(Item { bare_item: BareItem::ByteSequence(bytes), .. }) => {
                            Some((key.as_str().to_string(), bytes.clone()))
                        }
                        _ => None,
                    })
                    .collect(),
            ),
            Err(e) => Field::Malformed(format!("{name} is not a structured field dictionary: {e}")),
        },
    }
}

/// `Want-Repr-Digest` / `Want-Content-Digest`: the algorithms asked for, with their preference
/// (0 means "not this one").
pub fn wanted_digests(headers: &HeaderMap, name: &str) -> Vec<(String, i64)> {
    let Some(Ok(text)) = combined(headers, name) else {
        return Vec::new();
    };
    let Ok(dict) = Parser::new(&text).parse::<Dictionary>() else {
        return Vec::new();
    };
    dict.iter()
        .filter_map(|(key, entry)| match entry {
            ListEntry::Item(item) => Some((key.as_str().to_string(), item.bare_item.as_integer().map(i64::from)?)),
            ListEntry::InnerList(_) => None,
        })
        .collect()
}

/// `?1` or `?0`.
pub fn boolean_value(value: bool) -> HeaderValue {
    HeaderValue::from_static(if value { "?1" } else { "?0" })
}

/// A Dictionary of Integers, such as `Upload-Limit: max-size=…, max-age=…`. Values outside what
/// a Structured Field Integer holds are left out.
pub fn integer_dictionary(members: &[(&str, u64)]) -> HeaderValue {
    let mut serializer = DictSerializer::new();
    for (key, value) in members {
        if let (Ok(key), Ok(value)) = (KeyRef::from_str(key), sfv::Integer::try_from(*value)) {
            serializer.bare_item(key, value);
        }
    }
    let text = serializer.finish().unwrap_or_default();
    HeaderValue::from_str(&text).expect("a serialized dictionary is a valid header value")
}

/// A digest field's value: `sha-256=:…:`.
pub fn digest_value(algorithm: &str, digest: &[u8]) -> HeaderValue {
    let mut serializer = DictSerializer::new();
    if let Ok(key) = KeyRef::from_str(algorithm) {
        serializer.bare_item(key, digest);
    }
    let text = serializer.finish().unwrap_or_default();
    HeaderValue::from_str(&text).expect("a serialized dictionary is a valid header value")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header map of static pairs (repeated names append).
    pub(crate) fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn integers_and_booleans() {
        let h = headers(&[("upload-offset", "42"), ("upload-complete", "?1"), ("upload-length", "-1")]);
        assert_eq!(integer(&h, "upload-offset"), Field::Valid(42));
        assert_eq!(boolean(&h, "upload-complete"), Field::Valid(true));
        assert!(matches!(integer(&h, "upload-length"), Field::Malformed(_)));
        assert_eq!(integer(&h, "upload-draft-interop-version"), Field::Absent);
        for bad in ["1", "true", "?2", "?1;", ""] {
            let h = headers(&[("upload-complete", bad)]);
            assert!(matches!(boolean(&h, "upload-complete"), Field::Malformed(_)), "{bad:?} accepted");
        }
        for bad in ["4.5", "\"7\"", "1 2", "1234567890123456", "0x10"] {
            let h = headers(&[("upload-offset", bad)]);
            assert!(matches!(integer(&h, "upload-offset"), Field::Malformed(_)), "{bad:?} accepted");
        }
        // Parameters are allowed on an Item and ignored.
        let h = headers(&[("upload-offset", "7;x=1")]);
        assert_eq!(integer(&h, "upload-offset"), Field::Valid(7));
        // Two lines of a single-Item field make a List: malformed.
        let h = headers(&[("upload-offset", "1"), ("upload-offset", "2")]);
        assert!(matches!(integer(&h, "upload-offset"), Field::Malformed(_)));
    }

    #[test]
    fn digest_dictionaries() {
        let h = headers(&[("content-digest", "sha-256=:AAAA:, unixsum=30, sha-512=:AQID:")]);
        let Field::Valid(found) = digests(&h, "content-digest") else { panic!("not parsed") };
        assert_eq!(found, vec![("sha-256".to_string(), vec![0, 0, 0]), ("sha-512".to_string(), vec![1, 2, 3])]);
        let h = headers(&[("content-digest", "sha-256=:not base64!:")]);
        assert!(matches!(digests(&h, "content-digest"), Field::Malformed(_)));
        assert_eq!(digest_value("sha-256", &[0, 0, 0]), "sha-256=:AAAA:");
        let h = headers(&[("want-repr-digest", "sha-512=3, sha-256=10, md5=0")]);
        assert_eq!(
            wanted_digests(&h, "want-repr-digest"),
            vec![("sha-512".into(), 3), ("sha-256".into(), 10), ("md5".into(), 0)]
        );
    }

    #[test]
    fn limits_dictionary() {
        assert_eq!(
            integer_dictionary(&[("max-size", 1 << 40), ("max-append-size", 1 << 20), ("max-age", 86400)]),
            "max-size=1099511627776, max-append-size=1048576, max-age=86400"
        );
    }
}
