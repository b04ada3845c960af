//! The on-disk record format of the log.
//!
//! ```text
//! record  = len:u32le crc:u32le body            (len = body length, > 0)
//! crc     = crc32c(len bytes ++ body)
//! body    = offset:u64le ms:u64le gen:u32le flags:u8 [deliver_at:u64le if flags & 1]
//!           kind_len:u16le kind  n_headers:u16le (key_len:u16le key val_len:u32le val)*
//!           payload_len:u32le payload
//! ```
//!
//! A message that does not fit these fields (see [`check`]) is refused before anything is
//! written; encoding never panics.
//!
//! Segment files are preallocated with zeros, so a zero length marks the end of the data. `gen`
//! is the engine's open count: records of one segment never go back to an older `gen`, which lets
//! a scan reject stale bytes a crash left beyond the end of the data.

use std::collections::BTreeMap;

use bytes::Bytes;

/// Bytes before the body.
pub(crate) const HEADER: usize = 8;
/// Largest body accepted when reading; anything larger is corruption.
pub(crate) const MAX_BODY: usize = 256 << 20;

/// A stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) offset: u64,
    pub(crate) ms: u64,
    pub(crate) gen: u32,
    pub(crate) deliver_at: Option<u64>,
    pub(crate) kind: String,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) payload: Bytes,
}

impl Record {
    /// The encoded size.
    pub(crate) fn encoded_len(&self) -> usize {
        HEADER
            + 8
            + 8
            + 4
            + 1
            + if self.deliver_at.is_some() { 8 } else { 0 }
            + 2
            + self.kind.len()
            + 2
            + self
                .headers
                .iter()
                .map(|(k, v)| 2 + k.len() + 4 + v.len())
                .sum::<usize>()
            + 4
            + self.payload.len()
    }

    /// Appends the encoded record to `out`.
    ///
    /// # Errors
    /// The record does not fit the format (see [`check`]); nothing is appended then.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        check(
            &self.kind,
            &self.headers,
            self.payload.len(),
            self.deliver_at.is_some(),
        )?;
        let start = out.len();
        out.extend_from_slice(&[0; HEADER]);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.ms.to_le_bytes());
        out.extend_from_slice(&self.gen.to_le_bytes());
        out.push(u8::from(self.deliver_at.is_some()));
        if let Some(at) = self.deliver_at {
            out.extend_from_slice(&at.to_le_bytes());
        }
        put_u16(out, self.kind.len());
        out.extend_from_slice(self.kind.as_bytes());
        put_u16(out, self.headers.len());
        for (k, v) in &self.headers {
            put_u16(out, k.len());
            out.extend_from_slice(k.as_bytes());
            put_u32(out, v.len());
            out.extend_from_slice(v.as_bytes());
        }
        put_u32(out, self.payload.len());
        out.extend_from_slice(&self.payload);
        let len = u32::try_from(out.len() - start - HEADER).unwrap_or(u32::MAX);
        let len_bytes = len.to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), &out[start + HEADER..]);
        out[start..start + 4].copy_from_slice(&len_bytes);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }
}

/// Checks that a message with this type, these headers and a payload of `payload` bytes fits the
/// record format: lengths and counts in their fields (`u16`, `u32`), and a body of at most
/// [`MAX_BODY`] bytes (a larger one would be written but read back as corruption). The error says
/// which limit, without echoing the input.
pub(crate) fn check(
    kind: &str,
    headers: &BTreeMap<String, String>,
    payload: usize,
    delayed: bool,
) -> Result<(), String> {
    const U16: usize = u16::MAX as usize;
    if kind.len() > U16 {
        return Err(format!(
            "the message type is {} bytes, over the record format's limit of {U16}",
            kind.len()
        ));
    }
    if headers.len() > U16 {
        return Err(format!(
            "{} headers exceed the record format's limit of {U16}",
            headers.len()
        ));
    }
    // offset, ms, gen, flags, [deliver_at], kind, header count, payload length.
    let fixed = 8 + 8 + 4 + 1 + if delayed { 8 } else { 0 };
    let mut body = fixed + 2 + kind.len() + 2 + 4;
    for (k, v) in headers {
        if k.len() > U16 {
            return Err(format!(
                "a header name is {} bytes, over the record format's limit of {U16}",
                k.len()
            ));
        }
        body = body.saturating_add(2 + k.len() + 4).saturating_add(v.len());
    }
    body = body.saturating_add(payload);
    if body > MAX_BODY {
        return Err(format!(
            "the message is {body} bytes stored, over the record format's limit of {MAX_BODY} \
             bytes (a payload of {payload} bytes)"
        ));
    }
    Ok(())
}

/// Appends `n` as a `u16`. [`check`] keeps every length written here in range; were one not,
/// the field saturates (the record then fails to decode) rather than panic the writer.
fn put_u16(out: &mut Vec<u8>, n: usize) {
    debug_assert!(n <= usize::from(u16::MAX), "checked by `check`");
    out.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_le_bytes());
}

/// Appends `n` as a `u32`; see [`put_u16`].
fn put_u32(out: &mut Vec<u8>, n: usize) {
    debug_assert!(u32::try_from(n).is_ok(), "checked by `check`");
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// A valid record of `len` bytes.
    Record(Record, usize),
    /// A zero length: the end of the data.
    End,
    /// The buffer ends inside the record; `need` bytes hold all of it.
    Incomplete { need: usize },
    /// Not a valid record (bad checksum, impossible length or malformed body).
    Invalid(&'static str),
}

/// Decodes the record at the start of `buf`.
pub(crate) fn decode(buf: &[u8]) -> Decoded {
    if buf.len() < HEADER {
        return Decoded::Incomplete { need: HEADER };
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Decoded::End;
    }
    if len > MAX_BODY {
        return Decoded::Invalid("impossible record length");
    }
    if buf.len() < HEADER + len {
        return Decoded::Incomplete { need: HEADER + len };
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let body = &buf[HEADER..HEADER + len];
    if crc32c::crc32c_append(crc32c::crc32c(&buf[0..4]), body) != crc {
        return Decoded::Invalid("checksum mismatch");
    }
    match parse_body(body) {
        Some(r) => Decoded::Record(r, HEADER + len),
        None => Decoded::Invalid("malformed record body"),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_le_bytes(b.try_into().expect("2")) as usize)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
    }
    fn str(&mut self, n: usize) -> Option<String> {
        std::str::from_utf8(self.take(n)?).ok().map(str::to_owned)
    }
}

fn parse_body(body: &[u8]) -> Option<Record> {
    let mut r = Reader(body);
    let offset = r.u64()?;
    let ms = r.u64()?;
    let gen = r.u32()?;
    let flags = r.u8()?;
    if flags > 1 {
        return None;
    }
    let deliver_at = if flags & 1 == 1 { Some(r.u64()?) } else { None };
    let kind_len = r.u16()?;
    let kind = r.str(kind_len)?;
    let n = r.u16()?;
    let mut headers = BTreeMap::new();
    for _ in 0..n {
        let kl = r.u16()?;
        let k = r.str(kl)?;
        let vl = r.u32()? as usize;
        let v = r.str(vl)?;
        headers.insert(k, v);
    }
    let pl = r.u32()? as usize;
    let payload = Bytes::copy_from_slice(r.take(pl)?);
    if !r.0.is_empty() {
        return None;
    }
    Some(Record {
        offset,
        ms,
        gen,
        deliver_at,
        kind,
        headers,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = Record> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            proptest::option::of(any::<u64>()),
            "[a-z.]{0,20}",
            proptest::collection::btree_map("[a-z-]{1,8}", "\\PC{0,12}", 0..4),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(
                |(offset, ms, gen, deliver_at, kind, headers, payload)| Record {
                    offset,
                    ms,
                    gen,
                    deliver_at,
                    kind,
                    headers,
                    payload: Bytes::from(payload),
                },
            )
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(r in record()) {
            let mut buf = Vec::new();
            r.encode(&mut buf).unwrap();
            prop_assert_eq!(buf.len(), r.encoded_len());
            prop_assert_eq!(decode(&buf), Decoded::Record(r, buf.len()));
        }

        #[test]
        fn every_strict_prefix_is_incomplete(r in record(), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            r.encode(&mut buf).unwrap();
            let cut = cut.index(buf.len());
            let incomplete = matches!(decode(&buf[..cut]), Decoded::Incomplete { .. });
            prop_assert!(incomplete);
        }

        #[test]
        fn any_flipped_bit_is_detected(r in record(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut buf = Vec::new();
            r.encode(&mut buf).unwrap();
            let at = at.index(buf.len());
            buf[at] ^= 1 << bit;
            match decode(&buf) {
                Decoded::Record(got, _) => prop_assert!(false, "corruption accepted: {:?}", got),
                Decoded::End | Decoded::Incomplete { .. } | Decoded::Invalid(_) => {}
            }
        }
    }

    proptest! {
        /// Any bytes at all decode to a record, the end, "incomplete" or "invalid": never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&buf);
        }

        /// Arbitrary bodies behind a valid length and checksum reach the body parser, which
        /// rejects or accepts them without panicking.
        #[test]
        fn arbitrary_bodies_with_a_valid_checksum_never_panic(
            body in proptest::collection::vec(any::<u8>(), 1..600)
        ) {
            let len = (body.len() as u32).to_le_bytes();
            let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &body);
            let mut buf = len.to_vec();
            buf.extend_from_slice(&crc.to_le_bytes());
            buf.extend_from_slice(&body);
            match decode(&buf) {
                Decoded::Record(_, n) => prop_assert_eq!(n, buf.len()),
                Decoded::Invalid(_) => {}
                other => prop_assert!(false, "a whole record decoded as {:?}", other),
            }
        }
    }

    /// Lengths the format cannot hold are an error, and nothing is written: never a panic.
    #[test]
    fn a_record_over_the_format_limits_is_an_error_not_a_panic() {
        let base = Record {
            offset: 0,
            ms: 0,
            gen: 1,
            deliver_at: None,
            kind: "job".into(),
            headers: BTreeMap::new(),
            payload: Bytes::new(),
        };
        let long_name = Record {
            headers: BTreeMap::from([("k".repeat(70_000), "v".into())]),
            ..base.clone()
        };
        let many = Record {
            headers: (0..70_000)
                .map(|i| (i.to_string(), String::new()))
                .collect(),
            ..base.clone()
        };
        let long_kind = Record {
            kind: "k".repeat(70_000),
            ..base.clone()
        };
        for (r, word) in [
            (long_name, "header"),
            (many, "headers"),
            (long_kind, "type"),
        ] {
            let mut out = vec![7];
            let e = r.encode(&mut out).unwrap_err();
            assert!(e.contains(word) && e.len() < 200, "{e}");
            assert_eq!(out, [7], "nothing written");
        }
        let e = check("job", &BTreeMap::new(), MAX_BODY, false).unwrap_err();
        assert!(e.contains("limit"), "{e}");
        let mut out = Vec::new();
        base.encode(&mut out).unwrap();
        assert_eq!(out.len(), base.encoded_len());
    }

    #[test]
    fn zeros_are_the_end() {
        assert_eq!(decode(&[0; 64]), Decoded::End);
    }
}
