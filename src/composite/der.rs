//! The three DER pieces the X.509 encoding needs: OBJECT IDENTIFIER content with arcs beyond
//! u64, UTF8String, and one tag-length-value frame. Hand-written because they are tiny, and so
//! that decoding is strict DER (minimal lengths, no trailing bytes) and cannot panic.

pub(super) const TAG_OID: u8 = 0x06;
pub(super) const TAG_UTF8_STRING: u8 = 0x0c;

/// `tag`, DER length (short form below 128, minimal long form above), `content`.
pub(super) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// The content of `input`, which must be exactly one DER TLV with tag `tag`.
pub(super) fn read_tlv(tag: u8, input: &[u8]) -> Result<&[u8], &'static str> {
    let (&t, rest) = input.split_first().ok_or("empty")?;
    if t != tag {
        return Err("wrong tag");
    }
    let (&first, rest) = rest.split_first().ok_or("missing length")?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 {
            return Err("indefinite length");
        }
        if n > 4 || n > rest.len() {
            return Err("length too long");
        }
        let (digits, rest) = rest.split_at(n);
        if digits[0] == 0 {
            return Err("non-minimal length");
        }
        let len = digits
            .iter()
            .fold(0usize, |acc, d| (acc << 8) | usize::from(*d));
        if len < 0x80 {
            return Err("non-minimal length");
        }
        (len, rest)
    };
    if rest.len() != len {
        return Err(if rest.len() < len {
            "truncated"
        } else {
            "trailing bytes"
        });
    }
    Ok(rest)
}

/// A DER UTF8String holding `s`.
pub(super) fn utf8_string(s: &str) -> Vec<u8> {
    tlv(TAG_UTF8_STRING, s.as_bytes())
}

/// The text of a DER UTF8String that makes up all of `input`.
pub(super) fn read_utf8_string(input: &[u8]) -> Result<&str, &'static str> {
    let content = read_tlv(TAG_UTF8_STRING, input)?;
    std::str::from_utf8(content).map_err(|_| "not UTF-8")
}

/// Appends one base-128 subidentifier (X.690 §8.19.2).
pub(super) fn push_subidentifier(out: &mut Vec<u8>, value: u128) {
    let groups = (128 - (value | 1).leading_zeros()).div_ceil(7);
    for i in (1..groups).rev() {
        out.push(0x80 | ((value >> (7 * i)) & 0x7f) as u8);
    }
    out.push((value & 0x7f) as u8);
}

/// OBJECT IDENTIFIER content (without tag and length) for `arcs`, which must hold at least two
/// arcs with a valid first pair; the first pair is packed as `40 * a + b`.
pub(super) fn oid_content(arcs: &[u128]) -> Vec<u8> {
    let mut out = Vec::new();
    if let [a, b, rest @ ..] = arcs {
        push_subidentifier(&mut out, a * 40 + b);
        for arc in rest {
            push_subidentifier(&mut out, *arc);
        }
    }
    out
}

/// Reads one minimal subidentifier that fits in u64 from the front of `input`.
pub(super) fn read_subidentifier(input: &[u8]) -> Result<(u64, &[u8]), &'static str> {
    if input.first() == Some(&0x80) {
        return Err("non-minimal subidentifier");
    }
    let mut value: u64 = 0;
    for (i, b) in input.iter().enumerate() {
        if value >> 57 != 0 {
            return Err("subidentifier too large");
        }
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            return Ok((value, &input[i + 1..]));
        }
    }
    Err("truncated subidentifier")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_short_and_minimal_long_form() {
        assert_eq!(utf8_string("ab"), [0x0c, 2, b'a', b'b']);
        let s = "x".repeat(127);
        assert_eq!(&utf8_string(&s)[..2], &[0x0c, 127]);
        let s = "x".repeat(128);
        assert_eq!(&utf8_string(&s)[..3], &[0x0c, 0x81, 128]);
        let s = "x".repeat(300);
        assert_eq!(&utf8_string(&s)[..4], &[0x0c, 0x82, 0x01, 0x2c]);
        for n in [0, 1, 127, 128, 255, 256, 70_000] {
            let s = "é".repeat(n);
            assert_eq!(read_utf8_string(&utf8_string(&s)), Ok(s.as_str()));
        }
    }

    #[test]
    fn decoding_is_strict() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "empty"),
            (&[0x13, 0], "wrong tag"),
            (&[0x0c], "missing length"),
            (&[0x0c, 0x80], "indefinite length"),
            (&[0x0c, 0x81, 0x05, 1, 2, 3, 4, 5], "non-minimal length"),
            (&[0x0c, 0x82, 0x00, 0x80], "non-minimal length"),
            (&[0x0c, 0x85, 1, 1, 1, 1, 1], "length too long"),
            (&[0x0c, 0x84, 0xff, 0xff, 0xff, 0xff], "truncated"),
            (&[0x0c, 2, b'a'], "truncated"),
            (&[0x0c, 1, b'a', b'b'], "trailing bytes"),
            (&[0x0c, 1, 0xff], "not UTF-8"),
        ];
        for (input, want) in cases {
            assert_eq!(read_utf8_string(input), Err(*want), "{input:02x?}");
        }
    }

    #[test]
    fn oid_content_matches_known_encodings() {
        // 1.2.840.113549 (RSA) and 2.999.3 (X.690 example with a large second arc).
        assert_eq!(
            oid_content(&[1, 2, 840, 113_549]),
            [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]
        );
        assert_eq!(oid_content(&[2, 999, 3]), [0x88, 0x37, 0x03]);
        let x = 101_859_123_922_914_636_683_822_578_809_381_883_987_u128;
        let content = oid_content(&[2, 25, x]);
        assert_eq!(content.len(), 20);
        assert_eq!(content[0], 0x69);
    }

    #[test]
    fn subidentifiers_round_trip_and_reject_overflow() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut buf = Vec::new();
            push_subidentifier(&mut buf, u128::from(v));
            buf.push(0x42);
            assert_eq!(read_subidentifier(&buf), Ok((v, &[0x42][..])));
        }
        let mut big = Vec::new();
        push_subidentifier(&mut big, u128::from(u64::MAX) + 1);
        assert_eq!(read_subidentifier(&big), Err("subidentifier too large"));
        assert_eq!(
            read_subidentifier(&[0x80, 0x01]),
            Err("non-minimal subidentifier")
        );
        assert_eq!(read_subidentifier(&[0x81]), Err("truncated subidentifier"));
    }
}
