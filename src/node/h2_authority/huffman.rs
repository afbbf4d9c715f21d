//! HPACK Huffman decoding (RFC 7541 §5.2, Appendix B), table-driven.
//!
//! `loona-hpack` rebuilds a hash map of the whole code for every Huffman string it decodes,
//! which made that one step most of the HTTP/2 fix-up's cost. This decoder indexes the code
//! once, at compile time, reads codes of up to 8 bits (letters, digits and the usual
//! punctuation) with one table lookup each, and rejects exactly what `loona-hpack` rejects:
//! the EOS symbol inside a string, padding longer than 7 bits, and padding that is not a
//! prefix of EOS.

/// Longest code in the table (EOS and a few control octets).
const MAX_LEN: usize = 30;
const EOS: u16 = 256;

/// (code, length in bits) for each symbol 0..=256, from RFC 7541 Appendix B.
#[rustfmt::skip]
const CODES: [(u32, u8); 257] = [
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), (0xfffffe4, 28),
    (0xfffffe5, 28), (0xfffffe6, 28), (0xfffffe7, 28), (0xfffffe8, 28), (0xffffea, 24),
    (0x3ffffffc, 30), (0xfffffe9, 28), (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28),
    (0xfffffec, 28), (0xfffffed, 28), (0xfffffee, 28), (0xfffffef, 28), (0xffffff0, 28),
    (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28), (0xffffff4, 28),
    (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), (0xffffff8, 28), (0xffffff9, 28),
    (0xffffffa, 28), (0xffffffb, 28), (0x14, 6), (0x3f8, 10), (0x3f9, 10),
    (0xffa, 12), (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11),
    (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11), (0xfa, 8),
    (0x16, 6), (0x17, 6), (0x18, 6), (0x0, 5), (0x1, 5),
    (0x2, 5), (0x19, 6), (0x1a, 6), (0x1b, 6), (0x1c, 6),
    (0x1d, 6), (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), (0x1ffa, 13),
    (0x21, 6), (0x5d, 7), (0x5e, 7), (0x5f, 7), (0x60, 7),
    (0x61, 7), (0x62, 7), (0x63, 7), (0x64, 7), (0x65, 7),
    (0x66, 7), (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7),
    (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7), (0x6f, 7),
    (0x70, 7), (0x71, 7), (0x72, 7), (0xfc, 8), (0x73, 7),
    (0xfd, 8), (0x1ffb, 13), (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14),
    (0x22, 6), (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5),
    (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6), (0x27, 6),
    (0x6, 5), (0x74, 7), (0x75, 7), (0x28, 6), (0x29, 6),
    (0x2a, 6), (0x7, 5), (0x2b, 6), (0x76, 7), (0x2c, 6),
    (0x8, 5), (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), (0x7fc, 11),
    (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28), (0xfffe6, 20), (0x3fffd2, 22),
    (0xfffe7, 20), (0xfffe8, 20), (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22),
    (0x7fffd9, 23), (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23), (0x7fffdc, 23),
    (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23), (0xffffec, 24),
    (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23), (0xffffee, 24), (0x7fffe1, 23),
    (0x7fffe2, 23), (0x7fffe3, 23), (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22),
    (0x7fffe5, 23), (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24),
    (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22), (0x3fffdc, 22),
    (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21), (0x7fffea, 23), (0x3fffdd, 22),
    (0x3fffde, 22), (0xfffff0, 24), (0x1fffdf, 21), (0x3fffdf, 22), (0x7fffeb, 23),
    (0x7fffec, 23), (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), (0xfffea, 20),
    (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22), (0x7ffff0, 23), (0x3fffe5, 22),
    (0x3fffe6, 22), (0x7ffff1, 23), (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20),
    (0x7fff1, 19), (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22), (0x1ffffec, 25),
    (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27), (0x7ffffdf, 27),
    (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), (0x7fff2, 19), (0x1fffe3, 21),
    (0x3ffffe6, 26), (0x7ffffe0, 27), (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27),
    (0xfffff2, 24), (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26),
    (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27), (0xfffec, 20),
    (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21), (0x3fffe9, 22), (0x1fffe7, 21),
    (0x1fffe8, 21), (0x7ffff3, 23), (0x3fffea, 22), (0x3fffeb, 22), (0x1ffffee, 25),
    (0x1ffffef, 25), (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), (0x7ffffe7, 27),
    (0x7ffffe8, 27), (0x7ffffe9, 27), (0x7ffffea, 27), (0x7ffffeb, 27), (0xffffffe, 28),
    (0x7ffffec, 27), (0x7ffffed, 27), (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27),
    (0x3ffffee, 26), (0x3fffffff, 30),
];

/// The code indexed by length: the codes of one length are consecutive integers, so a
/// `len`-bit value `v` is a code exactly when `v - first[len] < count[len]`, and its symbol
/// is `symbols[offset[len] + v - first[len]]`.
struct Index {
    first: [u32; MAX_LEN + 1],
    count: [u32; MAX_LEN + 1],
    offset: [u32; MAX_LEN + 1],
    symbols: [u16; 257],
}

const INDEX: Index = index();

/// For every 8-bit window: the symbol whose code, of at most 8 bits, begins it, and the
/// code's length; length 0 when the window begins with a longer code.
const SHORT: [(u8, u8); 256] = short();

const fn short() -> [(u8, u8); 256] {
    let mut table = [(0u8, 0u8); 256];
    // EOS (symbol 256) is 30 bits long: never in this table.
    let mut s = 0;
    while s < 256 {
        let (code, len) = CODES[s];
        if len <= 8 {
            let free = 8 - len as u32;
            let first = (code << free) as usize;
            let mut k = 0;
            while k < 1 << free {
                table[first + k] = (s as u8, len);
                k += 1;
            }
        }
        s += 1;
    }
    table
}

const fn index() -> Index {
    let mut ix = Index {
        first: [u32::MAX; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        offset: [0; MAX_LEN + 1],
        symbols: [0; 257],
    };
    let mut s = 0;
    while s < CODES.len() {
        let (code, len) = (CODES[s].0, CODES[s].1 as usize);
        ix.count[len] += 1;
        if code < ix.first[len] {
            ix.first[len] = code;
        }
        s += 1;
    }
    let (mut len, mut acc) = (1, 0);
    while len <= MAX_LEN {
        ix.offset[len] = acc;
        acc += ix.count[len];
        len += 1;
    }
    s = 0;
    while s < CODES.len() {
        let (code, len) = (CODES[s].0, CODES[s].1 as usize);
        let i = code - ix.first[len];
        // Fails the build if the codes of one length were not consecutive.
        assert!(
            i < ix.count[len],
            "HPACK Huffman codes of one length are consecutive"
        );
        ix.symbols[(ix.offset[len] + i) as usize] = s as u16;
        s += 1;
    }
    ix
}

/// Appends the decoding of `data` to `out`. `None` for the EOS symbol in the string, padding
/// longer than 7 bits or padding that is not all ones (the most significant bits of EOS).
pub fn decode(data: &[u8], out: &mut Vec<u8>) -> Option<()> {
    // Bits read but not decoded yet: the low `avail` bits of `acc`, oldest first.
    let (mut acc, mut avail, mut next) = (0u64, 0u32, 0usize);
    loop {
        while avail <= 56 && next < data.len() {
            acc = acc << 8 | u64::from(data[next]);
            avail += 8;
            next += 1;
        }
        if avail >= 8 {
            let (symbol, len) = SHORT[usize::from((acc >> (avail - 8)) as u8)];
            if len > 0 {
                out.push(symbol);
                avail -= u32::from(len);
                continue;
            }
        }
        // A longer code, or fewer than 8 bits left: one symbol bit by bit. Running out of
        // bits here is the end of the string, where what is left must be padding.
        let (mut code, mut len) = (0u32, 0usize);
        loop {
            if avail == 0 {
                let Some(&byte) = data.get(next) else {
                    return (len <= 7 && code == (1 << len) - 1).then_some(());
                };
                (acc, avail, next) = (u64::from(byte), 8, next + 1);
            }
            avail -= 1;
            code = code << 1 | (acc >> avail & 1) as u32;
            len += 1;
            let i = code.wrapping_sub(INDEX.first[len]);
            if i < INDEX.count[len] {
                match INDEX.symbols[(INDEX.offset[len] + i) as usize] {
                    EOS => return None,
                    symbol => out.push(symbol as u8),
                }
                break;
            } else if len == MAX_LEN {
                // Unreachable: the code is complete (see the tests), so every 30-bit value
                // ends a symbol. Refusing keeps the indexing in bounds regardless.
                return None;
            }
        }
    }
}

/// Huffman-encodes `data`, padded with ones (for tests).
#[cfg(test)]
pub fn encode(data: &[u8]) -> Vec<u8> {
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u64, 0u32);
    for &b in data {
        let (code, len) = CODES[b as usize];
        acc = acc << len | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        // Pad with the most significant bits of EOS (all ones).
        out.push((acc << (8 - bits)) as u8 | (0xff >> bits));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::huffman::HuffmanDecoder;

    fn ours(data: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        decode(data, &mut out).map(|()| out)
    }

    #[test]
    fn the_code_is_complete_so_every_30_bit_value_decodes() {
        let kraft: u64 = CODES
            .iter()
            .map(|&(_, len)| 1u64 << (MAX_LEN - len as usize))
            .sum();
        assert_eq!(kraft, 1 << MAX_LEN);
    }

    #[test]
    fn round_trips_every_octet() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(ours(&encode(&all)).unwrap(), all);
        for s in [
            &b""[..],
            b"/SpiffeWorkloadAPI/FetchX509SVID",
            b"www.example.com",
            b"tonic/0.14.9",
        ] {
            assert_eq!(ours(&encode(s)).unwrap(), s);
        }
        // RFC 7541 C.4.1.
        let www = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(ours(&www).unwrap(), b"www.example.com");
    }

    #[test]
    fn refuses_what_loona_refuses() {
        // EOS inside the string, padding of 8 ones, padding with a zero bit.
        assert_eq!(ours(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(ours(&[0x07, 0xff]), None);
        assert_eq!(ours(&[0x06]), None);
    }

    #[test]
    fn agrees_with_loona_on_arbitrary_input() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut loona = HuffmanDecoder::new();
        for round in 0..20_000 {
            let len = rng.usize(0..if round % 4 < 2 { 12 } else { 40 });
            let data: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| rng.u8(..)).collect()
            } else {
                // Mostly valid: a real encoding with its last octet disturbed now and then.
                let plain: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                let mut enc = encode(&plain);
                if let Some(last) = enc.last_mut().filter(|_| rng.bool()) {
                    *last ^= 1 << rng.u32(0..8);
                }
                enc
            };
            let theirs = loona.decode(&data).ok();
            assert_eq!(ours(&data), theirs, "input {data:02x?}");
        }
    }
}
