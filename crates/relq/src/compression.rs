//! Payload compression: chosen at publish (per message, or per topic above a size), stored
//! compressed with the algorithm in [`HEADER_ENCODING`], undone by the consumer before a handler
//! sees the message.
//!
//! Every algorithm uses its standard framing (the LZ4 frame format, gzip, a zstd frame), so a
//! program in another language can read and write these payloads. Decompression reads at most
//! the consumer's payload limit plus one byte: a small payload that would expand without bound
//! (a decompression bomb) is refused, not allocated.

use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;

use bytes::Bytes;

use relq_core::{shorten, ConfigError, Error, Message, HEADER_ENCODING};

/// A compression algorithm for payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    /// LZ4 (frame format): the fastest, a lower ratio.
    Lz4,
    /// gzip (deflate, level 6): slower, widely readable.
    Gzip,
    /// zstd (level 3): about gzip's ratio or better at several times its speed. Needs relq's
    /// `zstd` feature (on by default).
    Zstd,
}

impl Compression {
    /// Every algorithm, in the order of their names.
    pub const ALL: [Compression; 3] = [Compression::Gzip, Compression::Lz4, Compression::Zstd];

    /// The algorithm's name, as in [`HEADER_ENCODING`], the configuration and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Lz4 => "lz4",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// `payload` compressed.
    ///
    /// # Errors
    /// This build has no such algorithm (zstd without the `zstd` feature).
    pub fn compress(self, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let failed =
            |e: std::io::Error| Error::Encode(format!("{} compression failed: {e}", self.as_str()));
        match self {
            Compression::Lz4 => {
                // With a checksum of the content: a flipped bit is a decode failure, not a
                // garbled payload handed to a handler.
                let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(
                    lz4_flex::frame::FrameInfo::new().content_checksum(true),
                    Vec::with_capacity(payload.len() / 2 + 64),
                );
                enc.write_all(payload).map_err(failed)?;
                enc.finish().map_err(|e| failed(std::io::Error::other(e)))
            }
            Compression::Gzip => gzip::compress(payload).map_err(failed),
            #[cfg(feature = "zstd")]
            Compression::Zstd => zstd_ctx::compress(payload).map_err(failed),
            #[cfg(not(feature = "zstd"))]
            Compression::Zstd => Err(Error::Encode(
                "this build of relq has no zstd: enable relq's `zstd` feature".into(),
            )),
        }
    }

    /// `data` decompressed, at most `limit` bytes of it.
    ///
    /// # Errors
    /// `data` is not a valid stream of this algorithm, it expands past `limit`, or this build
    /// has no such algorithm.
    pub fn decompress(self, data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
        let over = || {
            DecodeError(format!(
                "the {} payload expands past the limit of {limit} bytes",
                self.as_str()
            ))
        };
        // One byte over the limit tells "exactly at the limit" from "over it".
        let cap = (limit as u64).saturating_add(1);
        let mut out = Vec::with_capacity(data.len().saturating_mul(3).min(limit) + 1);
        let read = match self {
            Compression::Lz4 => lz4_flex::frame::FrameDecoder::new(data)
                .take(cap)
                .read_to_end(&mut out),
            Compression::Gzip => {
                return gzip::decompress(data, limit).map_err(|e| match e {
                    gzip::Failed::OverLimit => over(),
                    gzip::Failed::Invalid(why) => {
                        DecodeError(format!("the payload is not valid gzip data: {why}"))
                    }
                })
            }
            #[cfg(feature = "zstd")]
            Compression::Zstd => match zstd_ctx::decompress_sized(data, limit) {
                Some(Ok(v)) => return Ok(v),
                Some(Err(())) => return Err(over()),
                // No size in the frame header, or the frame is not what it says: streamed,
                // bounded.
                None => zstd::stream::read::Decoder::with_buffer(data).and_then(|mut d| {
                    // The window the frame may ask for (the decoder allocates it up front):
                    // enough for the limit and for what zstd's levels use, not the 128 MiB
                    // zstd would allow.
                    d.window_log_max(zstd_ctx::window_log(limit))?;
                    d.take(cap).read_to_end(&mut out)
                }),
            },
            #[cfg(not(feature = "zstd"))]
            Compression::Zstd => {
                return Err(DecodeError(
                    "this build of relq has no zstd: enable relq's `zstd` feature".into(),
                ))
            }
        };
        read.map_err(|e| {
            DecodeError(format!(
                "the payload is not valid {} data: {e}",
                self.as_str()
            ))
        })?;
        if out.len() > limit {
            return Err(over());
        }
        Ok(out)
    }
}

/// zstd with one compression and one decompression context per thread: creating a context
/// costs more than compressing a small payload.
#[cfg(feature = "zstd")]
mod zstd_ctx {
    use std::cell::RefCell;

    /// The level: zstd's default, about gzip's ratio at several times its speed.
    const LEVEL: i32 = 3;

    thread_local! {
        static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
        static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    }

    /// `data` as one zstd frame, its size in the header.
    pub(super) fn compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
        COMPRESSOR.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_none() {
                let mut new = zstd::bulk::Compressor::new(LEVEL)?;
                // A checksum of the content: a flipped bit is a decode failure.
                new.include_checksum(true)?;
                *c = Some(new);
            }
            match c.as_mut() {
                Some(c) => c.compress(data),
                None => Err(std::io::Error::other("no zstd compressor")),
            }
        })
    }

    /// The largest window (as a power of two) a streamed frame may use: at least what the
    /// payload limit needs and 8 MiB (zstd's levels up to 19 stay within it), at most zstd's
    /// own default limit.
    pub(super) fn window_log(limit: usize) -> u32 {
        let need = usize::BITS - limit.max(1).saturating_sub(1).leading_zeros();
        need.clamp(23, 27)
    }

    /// `data` decompressed in one call when its frame header gives its size: `Some(Err(()))`
    /// when that size is over `limit`; `None` when the header has no size or the data is not
    /// exactly one frame of that size (the caller streams it instead).
    pub(super) fn decompress_sized(data: &[u8], limit: usize) -> Option<Result<Vec<u8>, ()>> {
        let size = zstd::zstd_safe::get_frame_content_size(data).ok()??;
        if size > limit as u64 {
            return Some(Err(()));
        }
        DECOMPRESSOR.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = zstd::bulk::Decompressor::new().ok();
            }
            let out = d.as_mut()?.decompress(data, size as usize).ok()?;
            (out.len() as u64 == size).then_some(Ok(out))
        })
    }
}

/// gzip (RFC 1952) around raw deflate, with one deflate and one inflate state per thread
/// (flate2's gzip types allocate and zero a fresh state for every payload, which costs more than
/// compressing a small one).
mod gzip {
    use std::cell::RefCell;

    use flate2::{Compress, Crc, Decompress, FlushCompress, FlushDecompress, Status};

    thread_local! {
        static DEFLATE: RefCell<Option<Compress>> = const { RefCell::new(None) };
        static INFLATE: RefCell<Option<Decompress>> = const { RefCell::new(None) };
    }

    /// A member header: no name, no time, "unknown" operating system.
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

    pub(super) enum Failed {
        OverLimit,
        Invalid(String),
    }

    pub(super) fn compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        out.extend_from_slice(&HEADER);
        DEFLATE.with(|c| {
            let mut c = c.borrow_mut();
            let c = c.get_or_insert_with(|| Compress::new(flate2::Compression::default(), false));
            c.reset();
            let start = c.total_in();
            loop {
                if out.capacity() - out.len() < 64 {
                    out.reserve(out.capacity().max(256));
                }
                let done = (c.total_in() - start) as usize;
                match c.compress_vec(&data[done..], &mut out, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(std::io::Error::other(e)),
                }
            }
        })?;
        let mut crc = Crc::new();
        crc.update(data);
        out.extend_from_slice(&crc.sum().to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        Ok(out)
    }

    /// The offset of the deflate data after a member header (with any optional fields).
    fn body_start(data: &[u8]) -> Result<usize, Failed> {
        let bad = |why: &str| Failed::Invalid(why.to_owned());
        if data.len() < 18 {
            return Err(bad("shorter than a gzip header and trailer"));
        }
        if data[0] != 0x1f || data[1] != 0x8b {
            return Err(bad("no gzip magic number"));
        }
        if data[2] != 8 {
            return Err(bad("not deflate"));
        }
        let flags = data[3];
        if flags & 0xe0 != 0 {
            return Err(bad("reserved header flags set"));
        }
        let mut pos = 10;
        if flags & 0x04 != 0 {
            let xlen = data
                .get(pos..pos + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
                .ok_or_else(|| bad("truncated header"))?;
            pos += 2 + xlen;
        }
        for flag in [0x08, 0x10] {
            if flags & flag != 0 {
                let end = data
                    .get(pos..)
                    .and_then(|rest| rest.iter().position(|&b| b == 0))
                    .ok_or_else(|| bad("truncated header"))?;
                pos += end + 1;
            }
        }
        if flags & 0x02 != 0 {
            pos += 2;
        }
        if pos > data.len() {
            return Err(bad("truncated header"));
        }
        Ok(pos)
    }

    /// Every member of `data` decompressed and joined (as gzip readers do), at most `limit`
    /// bytes in all, each member's CRC and length checked. Bytes after the last member that do
    /// not start another are an error.
    pub(super) fn decompress(data: &[u8], limit: usize) -> Result<Vec<u8>, Failed> {
        // One byte over the limit tells "exactly at the limit" from "over it".
        let cap = limit.saturating_add(1);
        let mut out: Vec<u8> = Vec::with_capacity(data.len().saturating_mul(4).max(64).min(cap));
        let mut rest = data;
        loop {
            let member_start = out.len();
            let body = &rest[body_start(rest)?..];
            let consumed = inflate(body, &mut out, limit)?;
            let trailer = body
                .get(consumed..consumed + 8)
                .ok_or_else(|| Failed::Invalid("truncated trailer".into()))?;
            let member = &out[member_start..];
            let mut crc = Crc::new();
            crc.update(member);
            if trailer[..4] != crc.sum().to_le_bytes() {
                return Err(Failed::Invalid("CRC mismatch".into()));
            }
            if trailer[4..] != (member.len() as u32).to_le_bytes() {
                return Err(Failed::Invalid("length mismatch".into()));
            }
            rest = &body[consumed + 8..];
            if rest.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Inflates the raw deflate stream at the start of `body` onto `out` (which stays at most
    /// `limit` bytes); returns how many bytes of `body` it took.
    fn inflate(body: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<usize, Failed> {
        let cap = limit.saturating_add(1);
        INFLATE.with(|d| {
            let mut d = d.borrow_mut();
            let d = d.get_or_insert_with(|| Decompress::new(false));
            d.reset(false);
            let start = d.total_in();
            loop {
                if out.len() == out.capacity() {
                    if out.len() > limit {
                        return Err(Failed::OverLimit);
                    }
                    let grow = out.capacity().max(4096).min(cap - out.len());
                    out.reserve_exact(grow);
                }
                let (in_before, out_before) = (d.total_in(), out.len());
                let done = (in_before - start) as usize;
                let status = d
                    .decompress_vec(&body[done..], out, FlushDecompress::None)
                    .map_err(|e| Failed::Invalid(e.to_string()))?;
                if out.len() > limit {
                    return Err(Failed::OverLimit);
                }
                match status {
                    Status::StreamEnd => return Ok((d.total_in() - start) as usize),
                    _ if d.total_in() == in_before
                        && out.len() == out_before
                        && out.len() < out.capacity() =>
                    {
                        return Err(Failed::Invalid("truncated".into()))
                    }
                    _ => {}
                }
            }
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lz4" => Ok(Compression::Lz4),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            other => Err(Error::Config(ConfigError::new(
                "compression",
                format!("{:?} is none of lz4, gzip, zstd", shorten(other)),
            ))),
        }
    }
}

impl serde::Serialize for Compression {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Compression {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A payload that could not be decoded (decompressed, or decoded by a typed handler's codec).
/// A consumer turns it into a permanent failure with category `decode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub(crate) String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

/// A topic's compression: `algorithm` for payloads of at least `min_size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TopicCompression {
    pub(crate) algorithm: Compression,
    pub(crate) min_size: usize,
}

/// What compressing a payload did: the algorithm and the sizes before and as stored (the same
/// when compressing did not make it smaller and it was kept as it was), for metrics.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Compressed {
    pub(crate) algorithm: Compression,
    pub(crate) before: usize,
    pub(crate) after: usize,
}

/// Compresses `payload` with `algorithm` if that makes it smaller, and then records the
/// algorithm in `headers` ([`HEADER_ENCODING`]); else leaves both as they are (random or already
/// compressed data). Says which.
pub(crate) fn compress_stored(
    payload: &mut Bytes,
    headers: &mut std::collections::BTreeMap<String, String>,
    algorithm: Compression,
) -> Result<Compressed, Error> {
    let packed = algorithm.compress(payload)?;
    let before = payload.len();
    if packed.len() >= before {
        return Ok(Compressed {
            algorithm,
            before,
            after: before,
        });
    }
    let c = Compressed {
        algorithm,
        before,
        after: packed.len(),
    };
    *payload = Bytes::from(packed);
    headers.insert(HEADER_ENCODING.to_owned(), algorithm.as_str().to_owned());
    Ok(c)
}

/// Undoes a stored message's compression in place (payload decompressed, header gone); a message
/// without [`HEADER_ENCODING`] is left as it is.
///
/// # Errors
/// An unknown algorithm, a payload that does not decompress, or one that expands past `limit`.
pub(crate) fn decode_message(m: &mut Message, limit: usize) -> Result<(), DecodeError> {
    let Some(name) = m.headers.get(HEADER_ENCODING) else {
        return Ok(());
    };
    let algorithm: Compression = name.parse().map_err(|_| {
        DecodeError(format!(
            "unknown payload encoding {:?} (header {HEADER_ENCODING})",
            shorten(name)
        ))
    })?;
    m.payload = Bytes::from(algorithm.decompress(&m.payload, limit)?);
    m.headers.remove(HEADER_ENCODING);
    Ok(())
}

/// Whether a message is stored compressed.
pub(crate) fn is_encoded(m: &Message) -> bool {
    !m.headers.is_empty() && m.headers.contains_key(HEADER_ENCODING)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json(n: usize) -> Vec<u8> {
        let mut s = String::from("[");
        for i in 0..n {
            s.push_str(&format!(
                r#"{{"order_id":"ord-{i:08}","customer":"customer-{}","status":"created","amount_cents":{},"currency":"EUR"}},"#,
                i % 97,
                i * 37 % 10_000
            ));
        }
        s.push(']');
        s.into_bytes()
    }

    fn available() -> Vec<Compression> {
        Compression::ALL
            .into_iter()
            .filter(|c| cfg!(feature = "zstd") || *c != Compression::Zstd)
            .collect()
    }

    #[test]
    fn every_algorithm_round_trips_and_shrinks_json() {
        let data = json(200);
        for c in available() {
            let packed = c.compress(&data).unwrap();
            assert!(
                packed.len() * 3 < data.len(),
                "{c}: {} of {}",
                packed.len(),
                data.len()
            );
            assert_eq!(c.decompress(&packed, data.len()).unwrap(), data, "{c}");
            assert_eq!(c.as_str().parse::<Compression>().unwrap(), c);
        }
        assert!("brotli".parse::<Compression>().is_err());
    }

    #[test]
    fn a_payload_expanding_past_the_limit_is_refused() {
        // 64 MiB of zeros packs into a few KiB: a decompression bomb for a 1 MiB limit.
        let zeros = vec![0u8; 64 << 20];
        for c in available() {
            let packed = c.compress(&zeros).unwrap();
            assert!(packed.len() < 1 << 20, "{c}: {}", packed.len());
            let e = c.decompress(&packed, 1 << 20).unwrap_err();
            assert!(e.to_string().contains("limit of 1048576"), "{c}: {e}");
            // Exactly at the limit is fine.
            let packed = c.compress(&zeros[..1 << 20]).unwrap();
            assert_eq!(c.decompress(&packed, 1 << 20).unwrap().len(), 1 << 20);
        }
    }

    #[test]
    fn garbage_and_truncated_streams_are_decode_errors() {
        let data = json(50);
        for c in available() {
            assert!(
                c.decompress(b"definitely not compressed", 1 << 20).is_err(),
                "{c}"
            );
            let packed = c.compress(&data).unwrap();
            let cut = &packed[..packed.len() / 2];
            assert!(c.decompress(cut, 1 << 20).is_err(), "{c}: truncated");
        }
    }

    #[test]
    fn gzip_reads_and_writes_what_other_gzip_programs_do() {
        let data = json(100);
        // Ours through flate2's reader.
        let ours = Compression::Gzip.compress(&data).unwrap();
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&ours[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        // A member with a file name, a comment and an extra field, through ours.
        let mut enc = flate2::GzBuilder::new()
            .filename("orders.json")
            .comment("exported")
            .extra(vec![1, 2, 3])
            .write(Vec::new(), flate2::Compression::best());
        enc.write_all(&data).unwrap();
        let theirs = enc.finish().unwrap();
        assert_eq!(
            Compression::Gzip.decompress(&theirs, data.len()).unwrap(),
            data
        );
        // A flipped bit in the body or the trailer is caught.
        for at in [theirs.len() / 2, theirs.len() - 6, theirs.len() - 2] {
            let mut bad = theirs.clone();
            bad[at] ^= 0x40;
            assert!(Compression::Gzip.decompress(&bad, 1 << 20).is_err(), "{at}");
        }
    }

    #[test]
    fn gzip_members_are_joined_and_trailing_garbage_refused() {
        let (a, b) = (json(20), json(30));
        let mut two = Compression::Gzip.compress(&a).unwrap();
        two.extend(Compression::Gzip.compress(&b).unwrap());
        let both = Compression::Gzip.decompress(&two, 1 << 20).unwrap();
        assert_eq!(both, [a.clone(), b.clone()].concat());
        // The limit counts every member.
        assert!(Compression::Gzip
            .decompress(&two, a.len() + b.len() - 1)
            .is_err());
        let mut junk = Compression::Gzip.compress(&a).unwrap();
        junk.extend_from_slice(b"trailing junk");
        assert!(Compression::Gzip.decompress(&junk, 1 << 20).is_err());
    }

    #[test]
    fn a_flipped_bit_is_caught_by_every_algorithm() {
        let data = json(100);
        for c in available() {
            let packed = c.compress(&data).unwrap();
            // Bytes across the middle of the stream, one at a time: none may decode to other
            // data than what was compressed.
            for at in (packed.len() / 4..packed.len() * 3 / 4).step_by(7) {
                let mut bad = packed.clone();
                bad[at] ^= 0x10;
                if let Ok(back) = c.decompress(&bad, 1 << 20) {
                    assert_eq!(back, data, "{c}: a flip at {at} decoded to other data");
                }
            }
        }
    }

    #[cfg(feature = "zstd")]
    #[test]
    fn zstd_frames_without_a_size_are_read_bounded() {
        // A streamed frame has no content size in its header.
        let data = json(100);
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.write_all(&data).unwrap();
        let streamed = enc.finish().unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&streamed).unwrap(),
            None
        );
        assert_eq!(
            Compression::Zstd.decompress(&streamed, data.len()).unwrap(),
            data
        );
        let e = Compression::Zstd
            .decompress(&streamed, data.len() - 1)
            .unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
        // Two frames back to back: the first one's size is not the whole.
        let mut two = Compression::Zstd.compress(&data).unwrap();
        two.extend(Compression::Zstd.compress(&data).unwrap());
        let both = Compression::Zstd.decompress(&two, 1 << 20).unwrap();
        assert_eq!(both.len(), data.len() * 2);
    }

    #[test]
    fn incompressible_payloads_stay_as_they_are() {
        let mut random = Bytes::from((0..4096).map(|_| fastrand::u8(..)).collect::<Vec<_>>());
        let before = random.clone();
        for c in available() {
            let mut headers = std::collections::BTreeMap::new();
            let done = compress_stored(&mut random, &mut headers, c).unwrap();
            assert!(done.after == done.before && headers.is_empty(), "{c}");
            assert_eq!(random, before);
        }
    }

    #[cfg(not(feature = "zstd"))]
    #[test]
    fn zstd_without_its_feature_names_the_feature() {
        let e = Compression::Zstd.compress(b"x").unwrap_err();
        assert!(e.to_string().contains("`zstd` feature"), "{e}");
        let e = Compression::Zstd.decompress(b"x", 10).unwrap_err();
        assert!(e.to_string().contains("`zstd` feature"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn round_trip_of_any_payload(data in proptest::collection::vec(any::<u8>(), 0..4096), pick in 0usize..3) {
            let algos = available();
            let c = algos[pick % algos.len()];
            let packed = c.compress(&data).unwrap();
            prop_assert_eq!(c.decompress(&packed, data.len()).unwrap(), data.clone());
            if !data.is_empty() {
                prop_assert!(c.decompress(&packed, data.len() - 1).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512), limit in 0usize..100_000) {
            for c in available() {
                let _ = c.decompress(&data, limit);
                let _ = c.decompress(&data, usize::MAX);
            }
        }

        #[test]
        fn any_limit_is_held(data in proptest::collection::vec(any::<u8>(), 0..2048), limit in 0usize..4096) {
            for c in available() {
                let packed = c.compress(&data).unwrap();
                match c.decompress(&packed, limit) {
                    Ok(back) => prop_assert!(back == data && data.len() <= limit),
                    Err(e) => prop_assert!(data.len() > limit, "{c}: {e}"),
                }
            }
        }
    }
}
