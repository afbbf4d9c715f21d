//! Rewrites invalid HTTP/2 `:authority` values before `h2` sees them.
//!
//! gRPC C-core (Python `grpcio`, py-spiffe and every Python agent framework
//! on top of it) and grpc-java send the socket path as `:authority` when they
//! dial a Unix socket: `/tmp/agentid/workload.sock`, percent-encoded (grpcio
//! 1.85 sends `tmp%2Fagentid%2Fworkload.sock`) or as `unix:/…`
//! (grpc/grpc#38142). The `h2` crate under hyper and tonic
//! parses `:authority` as an `http::uri::Authority` and resets the stream
//! with PROTOCOL_ERROR when that fails (hyperium/h2#487 would relax it but is
//! unmerged), so those clients cannot talk to us while SPIRE, written in Go,
//! accepts them. [`AuthorityRewrite`] sits between the socket and `h2`: it
//! decodes every client header block and replaces an `:authority` that `h2`
//! would reject with `localhost`. Nothing here depends on `h2` internals, so
//! it survives dependency upgrades, and it is a no-op for well-behaved clients.
//!
//! HPACK is stateful, so every block is decoded (one decoder per connection,
//! fed in order). Until a block needs a fix, blocks go to `h2` as they came:
//! its decoder then sees exactly the client's stream and keeps the same
//! dynamic table, as without the adapter. From the first block that needs a
//! fix on, every block is re-encoded as literals that never touch the dynamic
//! table: the server's table stays as it was, unused, and consistent with our
//! output by construction, whatever the client's encoder does next. A block
//! that repeats the one before byte for byte, where that one left the table as
//! it was, means the same fields again: it is sent as the last one was, not
//! decoded (once its fields are in the table, a client's next call on the
//! connection is usually such a block).
//!
//! HPACK crate: `loona-hpack` 0.4. Of the candidates it is the only one whose
//! decoder returns errors on every malformed input we read: `hpack` 0.3 and
//! `fluke-hpack` 0.3 `unwrap()` a truncated dynamic-table size update (a
//! one-byte `0x3f` block panics), and `httlib-hpack` 0.1 indexes past the end
//! of a truncated multi-byte integer. `loona-hpack` is the newest of that
//! line (same author as `fluke-hpack`), bounds size updates with
//! `set_max_allowed_table_size`, and rejects a block that ends in one. Its
//! Huffman decoder rebuilds its code table for every string, though, so
//! Huffman-coded literals are decoded first by `huffman.rs` (table-driven,
//! refusing exactly what `loona-hpack` refuses) and the decoder reads the
//! block with raw literals in their place.
//!
//! Choices: input that does not start with the HTTP/2 client preface is
//! passed through untouched (HTTP/1 or garbage is `hyper`'s business, not
//! ours). The client's dynamic table may grow to 4096 octets, the
//! SETTINGS_HEADER_TABLE_SIZE default, and no further: tonic's server has no
//! knob to advertise another value, so the write direction is not parsed for
//! SETTINGS (if hyper's `header_table_size` is ever raised, raise
//! `HEADER_TABLE_SIZE` with it). PUSH_PROMISE, which a client may not send,
//! is passed through for `h2` to reject.
//! Malformed framing, HPACK errors and oversized header blocks fail the
//! connection with `io::ErrorKind::InvalidData`.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod huffman;

/// HTTP/2 default SETTINGS_MAX_FRAME_SIZE, the largest frame we emit unless
/// told otherwise; every server accepts frames of this size.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 16_384;
/// Cap on a buffered header block, both encoded and decoded (name + value +
/// 32 per field, as HPACK counts). hyper's own default limit is 16 KiB, so
/// no request that the server would accept comes close.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The value that replaces an `:authority` that `h2` would reject.
pub const REPLACEMENT_AUTHORITY: &str = "localhost";

const HEADER_TABLE_SIZE: usize = 4096;
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const READ_CHUNK: usize = 16 * 1024;
/// Buffers larger than this are freed rather than kept once empty.
const IDLE_BUFFER: usize = 1024;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Whether `h2` accepts `s` as `:authority` (it parses it exactly like this).
pub fn is_valid_authority(s: &str) -> bool {
    s.parse::<http::uri::Authority>().is_ok()
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("http2 authority rewrite: {}", msg.into()),
    )
}

enum Phase {
    /// Matching the 24-byte client preface.
    Preface,
    /// Parsing frames.
    Frames,
    /// Not HTTP/2: everything passes through.
    Opaque,
}

/// A header block being collected from HEADERS + CONTINUATION frames.
struct Block {
    stream: [u8; 4],
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl Block {
    fn priority(&self) -> &[u8] {
        self.priority.as_ref().map_or(&[], |p| &p[..])
    }
}

/// A block that did not change the dynamic table, and the payload sent for it.
#[derive(Default)]
struct Repeat {
    block: Vec<u8>,
    payload: Vec<u8>,
}

/// An I/O adapter that rewrites invalid `:authority` pseudo-headers in the
/// client-to-server direction of an HTTP/2 connection (see the module docs).
/// Writes pass through untouched.
pub struct AuthorityRewrite<S> {
    inner: S,
    phase: Phase,
    /// Bytes read from `inner`; `raw[raw_pos..]` is not yet processed.
    raw: Vec<u8>,
    raw_pos: usize,
    /// Processed bytes; `out[out_pos..]` is not yet handed to the reader.
    out: Vec<u8>,
    out_pos: usize,
    /// Payload bytes of the current pass-through frame still to forward.
    forward: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    max_frame_size: usize,
    /// A block was rewritten: from then on every block is re-encoded.
    rewriting: bool,
    /// The last block, if it left the dynamic table as it was, and what was sent for it.
    /// Clients repeat a request's block byte for byte once its fields are in the table; the
    /// same bytes against the same table are the same fields, so the decision is reused.
    repeat: Option<Repeat>,
    /// The last `:authority` found valid: a client sends the same one on every request, so
    /// it is parsed once per connection, not once per request.
    valid_authority: Vec<u8>,
    /// Buffers kept between blocks (see [`recycle`]): for a block's fragment, for the block
    /// with Huffman strings decoded, and for the block re-encoded.
    spare_fragment: Vec<u8>,
    spare_plain: Vec<u8>,
    spare_encoded: Vec<u8>,
    eof: bool,
    failed: bool,
}

impl<S> AuthorityRewrite<S> {
    /// Wraps `inner`, emitting frames of at most [`DEFAULT_MAX_FRAME_SIZE`].
    pub fn new(inner: S) -> Self {
        Self::with_max_frame_size(inner, DEFAULT_MAX_FRAME_SIZE)
    }

    /// Wraps `inner`; rewritten header blocks are split into frames of at most
    /// `max_frame_size` payload bytes. Use the server's SETTINGS_MAX_FRAME_SIZE
    /// if it was configured; values outside 16384..=16777215 are clamped.
    pub fn with_max_frame_size(inner: S, max_frame_size: usize) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            inner,
            phase: Phase::Preface,
            raw: Vec::new(),
            raw_pos: 0,
            out: Vec::new(),
            out_pos: 0,
            forward: 0,
            block: None,
            decoder,
            max_frame_size: max_frame_size.clamp(DEFAULT_MAX_FRAME_SIZE, (1 << 24) - 1),
            rewriting: false,
            repeat: None,
            valid_authority: Vec::new(),
            spare_fragment: Vec::new(),
            spare_plain: Vec::new(),
            spare_encoded: Vec::new(),
            eof: false,
            failed: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream; reading from it directly corrupts the connection.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Moves as much of `raw` to `out` as can be decided on now.
    fn process(&mut self) -> io::Result<()> {
        loop {
            let avail = &self.raw[self.raw_pos..];
            match self.phase {
                Phase::Opaque => {
                    self.out.extend_from_slice(avail);
                    self.raw_pos = self.raw.len();
                    return Ok(());
                }
                Phase::Preface => {
                    let n = avail.len().min(PREFACE.len());
                    if avail[..n] != PREFACE[..n] {
                        self.phase = Phase::Opaque;
                    } else if n < PREFACE.len() {
                        return Ok(());
                    } else {
                        self.out.extend_from_slice(PREFACE);
                        self.raw_pos += n;
                        self.phase = Phase::Frames;
                    }
                }
                Phase::Frames if self.forward > 0 => {
                    let n = avail.len().min(self.forward);
                    if n == 0 {
                        return Ok(());
                    }
                    self.out.extend_from_slice(&avail[..n]);
                    self.raw_pos += n;
                    self.forward -= n;
                }
                Phase::Frames => {
                    let Some(head) = avail.get(..FRAME_HEADER) else {
                        return Ok(());
                    };
                    let len = usize::from(head[0]) << 16
                        | usize::from(head[1]) << 8
                        | usize::from(head[2]);
                    let (ty, flags) = (head[3], head[4]);
                    let stream = [head[5], head[6], head[7], head[8]];
                    if ty != HEADERS && ty != CONTINUATION && self.block.is_none() {
                        // Everything else streams through without buffering.
                        self.out.extend_from_slice(head);
                        self.raw_pos += FRAME_HEADER;
                        self.forward = len;
                        continue;
                    }
                    // Checked before waiting for the payload, so a huge
                    // length cannot make us buffer it.
                    if len > MAX_HEADER_BLOCK {
                        return Err(invalid(format!("{len}-byte header frame")));
                    }
                    let Some(payload) = avail.get(FRAME_HEADER..FRAME_HEADER + len) else {
                        return Ok(());
                    };
                    match (ty, self.block.as_mut()) {
                        (HEADERS, None) => {
                            let fragment = std::mem::take(&mut self.spare_fragment);
                            self.block = Some(start_block(flags, stream, payload, fragment)?);
                        }
                        (CONTINUATION, Some(b)) if b.stream == stream => {
                            if b.fragment.len() + len > MAX_HEADER_BLOCK {
                                return Err(invalid("header block too large"));
                            }
                            b.fragment.extend_from_slice(payload);
                        }
                        // RFC 9113 §6.10: a header block is contiguous.
                        _ => {
                            return Err(invalid(format!(
                                "unexpected frame type {ty} in header block"
                            )));
                        }
                    }
                    self.raw_pos += FRAME_HEADER + len;
                    if flags & END_HEADERS != 0
                        && let Some(block) = self.block.take()
                    {
                        self.emit_block(block)?;
                    }
                }
            }
        }
    }

    /// Decodes a complete header block, fixes `:authority` and writes the
    /// block, as it came or re-encoded, to `out` as HEADERS + CONTINUATION
    /// frames.
    fn emit_block(&mut self, block: Block) -> io::Result<()> {
        if let Some(r) = self.repeat.take_if(|r| r.block == block.fragment) {
            self.write_frames(&block, &r.payload);
            self.repeat = Some(r);
            self.spare_fragment = recycle(block.fragment);
            return Ok(());
        }
        // Huffman strings are decoded here rather than by `loona-hpack` (see
        // `huffman.rs`); the decoder then reads the same block with raw
        // literals. A block that does not parse goes to the decoder as it
        // came, to be refused there.
        let mut plain = std::mem::take(&mut self.spare_plain);
        let mut encoded = std::mem::take(&mut self.spare_encoded);
        let (input, changes_table) = match unhuffman(&block.fragment, &mut plain) {
            Some(changes_table) => (&plain[..], changes_table),
            None => (&block.fragment[..], true),
        };
        // Table references expand: room for a typical request's fields at once.
        encoded.reserve(input.len() + 512);
        let mut size = 0usize;
        let valid = &mut self.valid_authority;
        let mut fixed = false;
        // Decoded size is capped separately: one-byte references to a large
        // dynamic-table entry would otherwise expand 64 KiB into gigabytes.
        self.decoder
            .decode_with_cb(input, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size > MAX_HEADER_BLOCK {
                    return;
                }
                let value = if &name[..] != b":authority" || value[..] == valid[..] {
                    &value[..]
                } else if std::str::from_utf8(&value).is_ok_and(is_valid_authority) {
                    valid.clear();
                    valid.extend_from_slice(&value);
                    &value[..]
                } else {
                    fixed = true;
                    REPLACEMENT_AUTHORITY.as_bytes()
                };
                // Literal without indexing, new name (RFC 7541 §6.2.2): never
                // touches the server's dynamic table.
                encoded.push(0);
                put_string(&name, &mut encoded);
                put_string(value, &mut encoded);
            })
            .map_err(|e| invalid(format!("hpack: {e}")))?;
        if size > MAX_HEADER_BLOCK {
            return Err(invalid("decoded header list too large"));
        }
        self.rewriting |= fixed;
        // Unchanged, and `h2`'s table still follows the client's: the block as
        // it came (cheaper for `h2` to decode than the literals).
        let payload = if self.rewriting {
            &encoded[..]
        } else {
            &block.fragment[..]
        };
        self.write_frames(&block, payload);
        // Decoding a block again that added to the table would add again: not repeatable.
        // The payload was chosen after `rewriting` was settled, so it stays right for repeats.
        let repeatable = !changes_table && block.fragment.len().max(payload.len()) <= IDLE_BUFFER;
        // The previous memo's buffers are reused for this one.
        let mut r = self.repeat.take().unwrap_or_default();
        if repeatable {
            r.block.clone_from(&block.fragment);
            r.payload.clear();
            r.payload.extend_from_slice(payload);
            self.repeat = Some(r);
        }
        self.spare_fragment = recycle(block.fragment);
        self.spare_plain = recycle(plain);
        self.spare_encoded = recycle(encoded);
        Ok(())
    }

    /// Writes `payload`, the block's fields, to `out` as HEADERS + CONTINUATION frames.
    fn write_frames(&mut self, block: &Block, payload: &[u8]) {
        // The first frame keeps the HEADERS flags (END_STREAM, PRIORITY) but
        // loses its padding; END_HEADERS goes on the last frame only.
        let first = payload
            .len()
            .min(self.max_frame_size - block.priority().len());
        let (mut chunk, mut rest) = payload.split_at(first);
        let mut ty = HEADERS;
        let mut flags = block.flags & !(PADDED | END_HEADERS);
        loop {
            let end = if rest.is_empty() { END_HEADERS } else { 0 };
            let prio: &[u8] = if ty == HEADERS { block.priority() } else { &[] };
            let len = prio.len() + chunk.len();
            self.out.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                ty,
                flags | end,
            ]);
            self.out.extend_from_slice(&block.stream);
            self.out.extend_from_slice(prio);
            self.out.extend_from_slice(chunk);
            if rest.is_empty() {
                break;
            }
            (chunk, rest) = rest.split_at(rest.len().min(self.max_frame_size));
            (ty, flags) = (CONTINUATION, 0);
        }
    }
}

/// An HPACK integer with a 7-bit prefix and no flag bits (RFC 7541 §5.1).
fn put_integer(mut value: usize, out: &mut Vec<u8>) {
    if value < 0x7f {
        out.push(value as u8);
        return;
    }
    out.push(0x7f);
    value -= 0x7f;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A raw (not Huffman-coded) HPACK string literal.
fn put_string(s: &[u8], out: &mut Vec<u8>) {
    put_integer(s.len(), out);
    out.extend_from_slice(s);
}

/// Reads an HPACK integer whose prefix has `prefix` bits, starting at
/// `block[at]`; returns it and the index after it. Refuses encodings of more
/// than 5 octets, as `loona-hpack` does.
fn get_integer(block: &[u8], at: usize, prefix: u32) -> Option<(usize, usize)> {
    let mask = (1usize << prefix) - 1;
    let value = usize::from(*block.get(at)?) & mask;
    if value < mask {
        return Some((value, at + 1));
    }
    let mut value = value;
    for (k, &b) in block.get(at + 1..)?.iter().take(4).enumerate() {
        value += usize::from(b & 0x7f) << (7 * k);
        if b & 0x80 == 0 {
            return Some((value, at + 2 + k));
        }
    }
    None
}

/// Copies `block` to `out` with every Huffman-coded string literal replaced by
/// its raw octets. Indices, representation bits and table size updates are
/// copied as they are, so the result means exactly what `block` means to an
/// HPACK decoder, dynamic table included. `None` if `block` does not parse;
/// else whether the block changes the dynamic table (adds to it or resizes it).
fn unhuffman(block: &[u8], out: &mut Vec<u8>) -> Option<bool> {
    out.reserve(block.len() + block.len() / 2);
    let (mut at, mut changes_table) = (0, false);
    while let Some(&first) = block.get(at) {
        at = if first & 0x80 != 0 {
            // Indexed field.
            copy_integer(block, at, 7, out)?
        } else if first & 0x40 != 0 {
            // Literal with incremental indexing.
            changes_table = true;
            copy_literal(block, at, 6, out)?
        } else if first & 0x20 != 0 {
            // Dynamic table size update.
            changes_table = true;
            copy_integer(block, at, 5, out)?
        } else {
            // Literal without indexing, or never indexed.
            copy_literal(block, at, 4, out)?
        };
    }
    Some(changes_table)
}

fn copy_integer(block: &[u8], at: usize, prefix: u32, out: &mut Vec<u8>) -> Option<usize> {
    let (_, next) = get_integer(block, at, prefix)?;
    out.extend_from_slice(&block[at..next]);
    Some(next)
}

/// A literal field: the name index (0: a name string follows), then the value.
fn copy_literal(block: &[u8], at: usize, prefix: u32, out: &mut Vec<u8>) -> Option<usize> {
    let (index, next) = get_integer(block, at, prefix)?;
    out.extend_from_slice(&block[at..next]);
    let next = if index == 0 {
        copy_string(block, next, out)?
    } else {
        next
    };
    copy_string(block, next, out)
}

fn copy_string(block: &[u8], at: usize, out: &mut Vec<u8>) -> Option<usize> {
    let (len, start) = get_integer(block, at, 7)?;
    let end = start.checked_add(len)?;
    let data = block.get(start..end)?;
    if block[at] & 0x80 == 0 {
        out.extend_from_slice(&block[at..end]);
        return Some(end);
    }
    // The decoded length goes before the octets but is known only after
    // decoding them: decode, then rotate the length in front.
    let mark = out.len();
    huffman::decode(data, out)?;
    let decoded = out.len() - mark;
    put_integer(decoded, out);
    let prefix = out.len() - mark - decoded;
    out[mark..].rotate_right(prefix);
    Some(end)
}

/// Empties `v`, and frees it if it grew past [`IDLE_BUFFER`]: an idle
/// connection (a workload holding its FetchX509SVID stream open) keeps no
/// large buffer.
fn release(v: &mut Vec<u8>) {
    if v.capacity() > IDLE_BUFFER {
        *v = Vec::new();
    } else {
        v.clear();
    }
}

/// [`release`]d, to be kept as a spare.
fn recycle(mut v: Vec<u8>) -> Vec<u8> {
    release(&mut v);
    v
}

/// Parses the payload of a HEADERS frame: strips padding, keeps priority.
/// `fragment` is a spare buffer to hold the block.
fn start_block(
    flags: u8,
    stream: [u8; 4],
    payload: &[u8],
    mut fragment: Vec<u8>,
) -> io::Result<Block> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, tail) = rest
            .split_first()
            .ok_or_else(|| invalid("missing pad length"))?;
        pad = usize::from(n);
        rest = tail;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (p, tail) = rest
            .split_first_chunk::<5>()
            .ok_or_else(|| invalid("short priority"))?;
        priority = Some(*p);
        rest = tail;
    }
    let fragment_len = rest
        .len()
        .checked_sub(pad)
        .ok_or_else(|| invalid("padding exceeds payload"))?;
    fragment.extend_from_slice(&rest[..fragment_len]);
    Ok(Block {
        stream,
        flags,
        priority,
        fragment,
    })
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRewrite<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(Err(invalid("connection failed earlier")));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    release(&mut this.out);
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.process() {
                this.failed = true;
                return Poll::Ready(Err(e));
            }
            if this.out_pos < this.out.len() {
                continue;
            }
            if this.eof {
                if matches!(this.phase, Phase::Preface) && this.raw_pos < this.raw.len() {
                    // Too short to be HTTP/2: hand it over as it is.
                    this.phase = Phase::Opaque;
                    continue;
                }
                // A frame cut short by EOF is dropped: h2 sees the EOF.
                return Poll::Ready(Ok(()));
            }
            // Drop what was processed; what remains is an incomplete frame.
            if this.raw_pos == this.raw.len() {
                release(&mut this.raw);
            } else {
                this.raw.drain(..this.raw_pos);
            }
            this.raw_pos = 0;

            let opaque = matches!(this.phase, Phase::Opaque);
            if this.raw.is_empty() && (opaque || this.forward > 0) {
                // Pass-through payload (DATA, mostly): read straight into the
                // caller's buffer and keep only what lies past the frame.
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                let got = buf.filled().len() - before;
                if !opaque && got > this.forward {
                    this.raw
                        .extend_from_slice(&buf.filled()[before + this.forward..]);
                    buf.set_filled(before + this.forward);
                }
                this.forward -= got.min(this.forward);
                this.eof = got == 0;
                return Poll::Ready(Ok(()));
            }

            // Read on the stack and keep only what arrived, so `raw` stays
            // the size of what is pending rather than of the read.
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut chunk);
            let res = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
            this.raw.extend_from_slice(rb.filled());
            ready!(res)?;
            this.eof = rb.filled().is_empty();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityRewrite<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Keeps the wrapped stream's connection info (peer credentials for a
/// `UnixStream`) visible to tonic handlers.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityRewrite<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::encoder::encode_integer_into;
    use std::collections::BTreeMap;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SOCK: &str = "/tmp/agentid/workload.sock";

    type Fields = Vec<(String, String)>;

    /// Serves `data` in reads of at most `chunk` bytes.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self
                .chunk
                .min(self.data.len() - self.pos)
                .min(buf.remaining());
            buf.put_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    /// Runs `data` through the adapter, `chunk` bytes per inner read and
    /// `read_size` bytes per outer read.
    async fn rewrite_with(
        data: &[u8],
        chunk: usize,
        read_size: usize,
        max_frame: usize,
    ) -> io::Result<Vec<u8>> {
        let inner = Chunked {
            data: data.to_vec(),
            pos: 0,
            chunk,
        };
        let mut a = AuthorityRewrite::with_max_frame_size(inner, max_frame);
        let (mut out, mut buf) = (Vec::new(), vec![0; read_size]);
        loop {
            match a.read(&mut buf).await? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    async fn rewrite(data: &[u8]) -> io::Result<Vec<u8>> {
        rewrite_with(data, usize::MAX, 8192, DEFAULT_MAX_FRAME_SIZE).await
    }

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn conn(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        v.extend(frame(0x4, 0, 0, &[]));
        frames.iter().for_each(|f| v.extend_from_slice(f));
        v
    }

    #[derive(Debug, PartialEq)]
    struct Frame {
        ty: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    fn parse(out: &[u8]) -> Vec<Frame> {
        assert_eq!(&out[..24], PREFACE);
        let (mut rest, mut frames) = (&out[24..], Vec::new());
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let stream = u32::from_be_bytes(rest[5..9].try_into().unwrap());
            frames.push(Frame {
                ty: rest[3],
                flags: rest[4],
                stream,
                payload: rest[9..9 + len].to_vec(),
            });
            rest = &rest[9 + len..];
        }
        frames
    }

    /// Header blocks in `frames`, decoded in order by one decoder, as the
    /// server does. Checks the frame size limit and that END_HEADERS marks
    /// exactly the last frame.
    fn blocks(frames: &[Frame], max_frame: usize) -> Vec<Fields> {
        decode_blocks(frames, max_frame, false)
    }

    /// [`blocks`], each decoded with a *fresh* decoder, which proves that
    /// rewritten output never refers to the dynamic table.
    fn literal_blocks(frames: &[Frame], max_frame: usize) -> Vec<Fields> {
        decode_blocks(frames, max_frame, true)
    }

    fn decode_blocks(frames: &[Frame], max_frame: usize, fresh: bool) -> Vec<Fields> {
        let (mut out, mut cur) = (Vec::new(), None::<Vec<u8>>);
        let mut decoder = loona_hpack::Decoder::new();
        for f in frames
            .iter()
            .filter(|f| f.ty == HEADERS || f.ty == CONTINUATION)
        {
            assert!(
                f.payload.len() <= max_frame,
                "frame of {} bytes",
                f.payload.len()
            );
            assert_eq!(f.flags & PADDED, 0);
            let frag = if f.ty == HEADERS {
                assert!(cur.is_none());
                &f.payload[if f.flags & PRIORITY != 0 { 5 } else { 0 }..]
            } else {
                assert!(cur.is_some());
                &f.payload[..]
            };
            cur.get_or_insert_with(Vec::new).extend_from_slice(frag);
            if f.flags & END_HEADERS != 0 {
                if fresh {
                    decoder = loona_hpack::Decoder::new();
                }
                let list = decoder.decode(&cur.take().unwrap()).unwrap();
                out.push(list.into_iter().map(|(n, v)| (s(&n), s(&v))).collect());
            }
        }
        assert!(cur.is_none(), "unterminated header block");
        out
    }

    fn s(b: &[u8]) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// Encodes like grpc C-core: every new field goes into the dynamic table
    /// and repeats become one-byte references to it.
    #[derive(Default)]
    struct IndexingEncoder(Vec<(String, String)>);

    impl IndexingEncoder {
        fn encode(&mut self, list: &[(&str, &str)]) -> Vec<u8> {
            let mut out = Vec::new();
            for &(n, v) in list {
                if let Some(i) = self.0.iter().position(|(tn, tv)| tn == n && tv == v) {
                    encode_integer_into(62 + i, 7, 0x80, &mut out).unwrap();
                    continue;
                }
                out.push(0x40);
                for part in [n, v] {
                    encode_integer_into(part.len(), 7, 0, &mut out).unwrap();
                    out.extend_from_slice(part.as_bytes());
                }
                self.0.insert(0, (n.into(), v.into()));
                // Evict oldest entries to stay within 4096 octets.
                while self
                    .0
                    .iter()
                    .map(|(n, v)| n.len() + v.len() + 32)
                    .sum::<usize>()
                    > 4096
                {
                    self.0.pop();
                }
            }
            out
        }
    }

    fn grpc_request(authority: &str) -> Vec<(&str, &str)> {
        vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/x"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    }

    fn with_authority(list: &[(&str, &str)], authority: &str) -> Fields {
        let mut f = fields(list);
        f.iter_mut()
            .filter(|(n, _)| n == ":authority")
            .for_each(|(_, v)| *v = authority.into());
        f
    }

    async fn expect_invalid(data: &[u8]) {
        let err = rewrite(data).await.expect_err("must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn authority_validity_matches_http() {
        for ok in [
            "localhost",
            "example.com:8080",
            "[::1]:50051",
            "agent.local",
        ] {
            assert!(is_valid_authority(ok), "{ok}");
        }
        for bad in [
            SOCK,
            "%2Ftmp%2Fagentid%2Fworkload.sock",
            "unix:/tmp/a.sock",
            "unix:///tmp/a.sock",
            "",
            "a b",
        ] {
            assert!(!is_valid_authority(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn any_read_split_gives_the_same_output() {
        let mut enc = IndexingEncoder::default();
        let req = grpc_request(SOCK);
        let data_payload: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let input = conn(&[
            frame(HEADERS, END_HEADERS, 1, &enc.encode(&req)),
            frame(0x0, 0, 1, &data_payload),
            frame(0x0, 0x1, 1, b"tail"),
            frame(HEADERS, END_HEADERS | 0x1, 3, &enc.encode(&req)),
            frame(0x8, 0, 0, &[0, 0, 1, 0]),
        ]);
        let whole = rewrite(&input).await.unwrap();
        for (chunk, read_size) in [
            (1, 1),
            (1, 8192),
            (3, 7),
            (9, 16),
            (10, 100_000),
            (4096, 1),
            (5000, 4096),
        ] {
            let out = rewrite_with(&input, chunk, read_size, DEFAULT_MAX_FRAME_SIZE)
                .await
                .unwrap();
            assert!(out == whole, "chunk {chunk} read {read_size}");
        }
        let frames = parse(&whole);
        let types: Vec<_> = frames.iter().map(|f| (f.ty, f.flags, f.stream)).collect();
        assert_eq!(
            types,
            [
                (0x4, 0, 0),
                (1, 4, 1),
                (0, 0, 1),
                (0, 1, 1),
                (1, 5, 3),
                (8, 0, 0)
            ]
        );
        assert_eq!(frames[2].payload, data_payload);
        let expected = with_authority(&req, "localhost");
        assert_eq!(
            literal_blocks(&frames, DEFAULT_MAX_FRAME_SIZE),
            [expected.clone(), expected]
        );
    }

    #[tokio::test]
    async fn padded_priority_headers() {
        let block = IndexingEncoder::default().encode(&grpc_request(SOCK));
        let mut payload = vec![7]; // pad length
        payload.extend([0x80, 0, 0, 1, 42]); // exclusive, depends on 1, weight 42
        payload.extend(&block);
        payload.extend([0; 7]);
        let out = rewrite(&conn(&[frame(
            HEADERS,
            PADDED | PRIORITY | END_HEADERS | 0x1,
            3,
            &payload,
        )]))
        .await;
        let frames = parse(&out.unwrap());
        assert_eq!(frames[1].flags, PRIORITY | END_HEADERS | 0x1);
        assert_eq!(frames[1].payload[..5], [0x80, 0, 0, 1, 42]);
        assert_eq!(
            literal_blocks(&frames, DEFAULT_MAX_FRAME_SIZE),
            [with_authority(&grpc_request(SOCK), "localhost")]
        );
    }

    #[tokio::test]
    async fn continuation_frames_are_joined() {
        let block = IndexingEncoder::default().encode(&grpc_request(SOCK));
        let (a, rest) = block.split_at(5);
        let (b, c) = rest.split_at(20);
        let input = conn(&[
            frame(HEADERS, 0x1, 1, a),
            frame(CONTINUATION, 0, 1, b),
            frame(CONTINUATION, END_HEADERS, 1, c),
            frame(0x6, 0, 0, &[0; 8]),
        ]);
        let frames = parse(
            &rewrite_with(&input, 2, 3, DEFAULT_MAX_FRAME_SIZE)
                .await
                .unwrap(),
        );
        assert_eq!(
            frames.iter().map(|f| (f.ty, f.flags)).collect::<Vec<_>>(),
            [(4, 0), (1, 5), (6, 0)]
        );
        assert_eq!(
            literal_blocks(&frames, DEFAULT_MAX_FRAME_SIZE),
            [with_authority(&grpc_request(SOCK), "localhost")]
        );
    }

    #[tokio::test]
    async fn large_block_is_split_at_max_frame_size() {
        let big = "v".repeat(40_000);
        let mut req = grpc_request(SOCK);
        req.push(("x-big", &big));
        let block = IndexingEncoder::default().encode(&req);
        let (a, b) = block.split_at(30_000);
        let mut first = vec![0, 0, 0, 1, 16];
        first.extend(a);
        let input = conn(&[
            frame(HEADERS, PRIORITY, 1, &first),
            frame(CONTINUATION, END_HEADERS, 1, b),
        ]);
        let expected = with_authority(&req, "localhost");
        for (max, count) in [
            (DEFAULT_MAX_FRAME_SIZE, 4),
            (32_768, 3),
            (1 << 20, 2),
            (1, 4),
        ] {
            let frames = parse(&rewrite_with(&input, 1000, 1000, max).await.unwrap());
            assert_eq!(frames.len(), count, "max frame size {max}");
            assert_eq!(frames[1].flags & !END_HEADERS, PRIORITY);
            assert_eq!(
                literal_blocks(&frames, max.max(DEFAULT_MAX_FRAME_SIZE)),
                std::slice::from_ref(&expected)
            );
        }
    }

    #[tokio::test]
    async fn valid_authorities_and_huffman_rfc_vectors_unchanged() {
        // RFC 7541 C.4: Huffman strings and dynamic-table references.
        let c4 = [
            "828684418cf1e3c2e5f23a6ba0ab90f4ff",
            "828684be5886a8eb10649cbf",
            "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
        ];
        let mut frames: Vec<_> = c4
            .iter()
            .zip([1, 3, 5])
            .map(|(h, id)| frame(HEADERS, END_HEADERS, id, &hex(h)))
            .collect();
        let mut enc = IndexingEncoder::default();
        let pct = grpc_request("%2Ftmp%2Fagentid%2Fworkload.sock");
        let valid = grpc_request("example.com:8080");
        frames.push(frame(HEADERS, END_HEADERS, 7, &enc.encode(&pct)));
        frames.push(frame(HEADERS, END_HEADERS, 9, &enc.encode(&valid)));
        frames.push(frame(HEADERS, END_HEADERS, 11, &enc.encode(&valid)));
        let got = blocks(
            &parse(&rewrite(&conn(&frames)).await.unwrap()),
            DEFAULT_MAX_FRAME_SIZE,
        );
        let base = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ];
        let mut second = fields(&base);
        second.push(("cache-control".into(), "no-cache".into()));
        let third = fields(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ]);
        assert_eq!(
            got,
            [
                fields(&base),
                second,
                third,
                with_authority(&pct, "localhost"),
                fields(&valid),
                fields(&valid),
            ]
        );
    }

    #[tokio::test]
    async fn blocks_pass_through_until_one_is_fixed() {
        let mut enc = IndexingEncoder::default();
        let (valid, bad) = (grpc_request("localhost"), grpc_request(SOCK));
        let sent = [
            enc.encode(&valid),
            enc.encode(&valid),
            enc.encode(&bad),
            enc.encode(&valid),
        ];
        assert!(
            sent[1].iter().all(|&b| b >= 0x80 | 62),
            "the second block refers to the table the first one filled"
        );
        let frames: Vec<_> = sent
            .iter()
            .zip([1, 3, 5, 7])
            .map(|(b, id)| frame(HEADERS, END_HEADERS, id, b))
            .collect();
        let out = parse(&rewrite(&conn(&frames)).await.unwrap());
        // Nothing to fix yet: h2 gets what the client sent, table references and all.
        assert_eq!(out[1].payload, sent[0]);
        assert_eq!(out[2].payload, sent[1]);
        // From the first fix on, every block is re-encoded as literals.
        assert_eq!(
            literal_blocks(&out[3..], DEFAULT_MAX_FRAME_SIZE),
            [with_authority(&bad, "localhost"), fields(&valid)]
        );
        assert_eq!(
            blocks(&out, DEFAULT_MAX_FRAME_SIZE),
            [
                fields(&valid),
                fields(&valid),
                with_authority(&bad, "localhost"),
                fields(&valid)
            ]
        );
    }

    #[tokio::test]
    async fn repeated_blocks_go_out_as_decided_unless_they_change_the_table() {
        let mut enc = IndexingEncoder::default();
        let valid = grpc_request("a.example");
        let first = enc.encode(&valid);
        let repeat = enc.encode(&valid);
        // A bad `:authority` in a literal that leaves the table alone: the fixing starts here.
        let mut fix = vec![0x01, SOCK.len() as u8];
        fix.extend_from_slice(SOCK.as_bytes());
        // The same literal with incremental indexing, twice: each adds an entry, so the
        // second must be decoded too, or the next reference (to the older copy) goes astray.
        let mut insert = vec![0x41, 9];
        insert.extend_from_slice(b"c.example");
        let sent = [
            first,
            repeat.clone(),
            repeat.clone(),
            fix,
            repeat.clone(),
            repeat,
            insert.clone(),
            insert,
            vec![0x80 | 63],
        ];
        // What the client meant, read with its own table, with the fix applied.
        let mut client = loona_hpack::Decoder::new();
        let expected: Vec<Fields> = sent
            .iter()
            .map(|b| {
                let list = client.decode(b).unwrap();
                list.into_iter()
                    .map(|(n, v)| match s(&v) {
                        v if n == b":authority" && v == SOCK => (s(&n), "localhost".into()),
                        v => (s(&n), v),
                    })
                    .collect()
            })
            .collect();
        assert_eq!(expected[8], fields(&[(":authority", "c.example")]));
        let frames: Vec<_> = (1..)
            .step_by(2)
            .zip(&sent)
            .map(|(id, b)| frame(HEADERS, END_HEADERS, id, b))
            .collect();
        let out = parse(&rewrite(&conn(&frames)).await.unwrap());
        assert_eq!(blocks(&out, DEFAULT_MAX_FRAME_SIZE), expected);
        // Until the fix, repeats go out as they came; from it on, as literals only.
        for i in 0..3 {
            assert_eq!(out[1 + i].payload, sent[i]);
        }
        assert_eq!(
            literal_blocks(&out[4..], DEFAULT_MAX_FRAME_SIZE),
            expected[3..]
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn dynamic_table_references_across_requests() {
        let mut enc = IndexingEncoder::default();
        let reqs = [
            grpc_request(SOCK),
            vec![
                (":method", "POST"),
                (":authority", SOCK),
                ("x-id", "1"),
                (":path", "/y"),
            ],
            vec![
                ("x-id", "2"),
                (":authority", SOCK),
                (":path", "/x"),
                (":method", "POST"),
                ("x-id", "1"),
            ],
        ];
        let encoded: Vec<_> = reqs.iter().map(|r| enc.encode(r)).collect();
        // The later requests really do lean on the dynamic table.
        assert!(encoded[2].iter().filter(|&&b| b >= 0x80 | 62).count() >= 4);
        let frames: Vec<_> = encoded
            .iter()
            .zip([1, 3, 5])
            .map(|(b, id)| frame(HEADERS, END_HEADERS, id, b))
            .collect();
        let out = rewrite_with(&conn(&frames), 1, 1, DEFAULT_MAX_FRAME_SIZE)
            .await
            .unwrap();
        let expected: Vec<_> = reqs
            .iter()
            .map(|r| with_authority(r, "localhost"))
            .collect();
        assert_eq!(
            literal_blocks(&parse(&out), DEFAULT_MAX_FRAME_SIZE),
            expected
        );
    }

    #[tokio::test]
    async fn size_updates_bounded_by_default_table_size() {
        let mut ok = vec![0x3f, 0xe1, 0x1f]; // size update to 4096
        ok.extend(IndexingEncoder::default().encode(&grpc_request("a")));
        assert!(
            rewrite(&conn(&[frame(HEADERS, END_HEADERS, 1, &ok)]))
                .await
                .is_ok()
        );
        let mut too_big = vec![0x3f, 0xe2, 0x1f]; // 4097
        too_big.extend(IndexingEncoder::default().encode(&grpc_request("a")));
        expect_invalid(&conn(&[frame(HEADERS, END_HEADERS, 1, &too_big)])).await;
    }

    #[tokio::test]
    async fn oversized_blocks_are_rejected() {
        // One frame over the cap fails before its payload arrives.
        let mut head = conn(&[]);
        head.extend(&frame(HEADERS, 0, 1, &[])[..3]);
        head[24 + 9..24 + 12].copy_from_slice(&[0x01, 0x10, 0x00]);
        head.extend([HEADERS, 0, 0, 0, 0, 1]);
        expect_invalid(&head).await;
        // CONTINUATIONs that add up past the cap.
        let chunk = vec![0u8; 16_384];
        let mut frames = vec![frame(HEADERS, 0, 1, &chunk)];
        frames.extend((0..4).map(|_| frame(CONTINUATION, 0, 1, &chunk)));
        expect_invalid(&conn(&frames)).await;
        // A small block that expands past the cap through table references.
        let mut enc = IndexingEncoder::default();
        let value = "v".repeat(4000);
        let mut req = grpc_request("a");
        req.push(("x", &value));
        let first = enc.encode(&req);
        let bomb = vec![0x80 | 62; 17];
        let input = conn(&[
            frame(HEADERS, END_HEADERS, 1, &first),
            frame(HEADERS, END_HEADERS, 3, &bomb),
        ]);
        expect_invalid(&input).await;
    }

    #[tokio::test]
    async fn malformed_input_fails_cleanly() {
        let block = IndexingEncoder::default().encode(&grpc_request(SOCK));
        let cases = [
            frame(HEADERS, PADDED | END_HEADERS, 1, &[200, 0x82]),
            frame(HEADERS, PADDED | END_HEADERS, 1, &[]),
            frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0, 0]),
            frame(CONTINUATION, END_HEADERS, 1, &block),
            [frame(HEADERS, 0, 1, &block[..4]), frame(0x0, 0, 1, b"x")].concat(),
            [
                frame(HEADERS, 0, 1, &block[..4]),
                frame(CONTINUATION, END_HEADERS, 3, &block[4..]),
            ]
            .concat(),
            frame(HEADERS, END_HEADERS, 1, &[0xff; 6]), // integer too long
            frame(HEADERS, END_HEADERS, 1, &[0x3f]),    // truncated size update
            frame(HEADERS, END_HEADERS, 1, &[0x80 | 70]), // index out of bounds
            frame(HEADERS, END_HEADERS, 1, &[0x00, 0x05, b'a']), // short string
            frame(HEADERS, END_HEADERS, 1, &[0x00, 0x81, 0x00, 0x00]), // bad huffman padding
        ];
        for case in cases {
            expect_invalid(&conn(&[case])).await;
        }
        // Errors are sticky.
        let mut a = AuthorityRewrite::new(Chunked {
            data: conn(&[frame(CONTINUATION, 4, 1, &[])]),
            pos: 0,
            chunk: 1,
        });
        let mut buf = [0; 1024];
        while a.read(&mut buf).await.is_ok() {}
        assert!(a.read(&mut buf).await.is_err());
    }

    #[tokio::test]
    async fn random_input_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let valid = IndexingEncoder::default().encode(&grpc_request(SOCK));
        let mut outcomes = [0; 2];
        for _ in 0..3000 {
            let mut frames = Vec::new();
            for _ in 0..rand(6) {
                let ty = [0, 1, 1, 9, 9, 4, 8, rand(256)][rand(8)] as u8;
                let mut payload: Vec<u8> = (0..rand(40)).map(|_| rand(256) as u8).collect();
                if rand(3) == 0 {
                    payload.splice(0..0, valid.iter().copied().take(rand(valid.len() + 1)));
                }
                frames.push(frame(ty, rand(256) as u8, rand(4) as u32, &payload));
            }
            let mut input = conn(&frames);
            if rand(10) == 0 {
                input.truncate(rand(input.len()));
            }
            let res =
                rewrite_with(&input, 1 + rand(50), 1 + rand(50), DEFAULT_MAX_FRAME_SIZE).await;
            outcomes[usize::from(res.is_ok())] += 1;
        }
        // Both paths were exercised, not just early rejection.
        assert!(outcomes.iter().all(|&n| n > 300), "{outcomes:?}");
    }

    /// A block with every representation, Huffman strings included.
    fn mixed_block(path: &str) -> Vec<u8> {
        let huff = |s: &str, out: &mut Vec<u8>| {
            let h = huffman::encode(s.as_bytes());
            encode_integer_into(h.len(), 7, 0x80, out).unwrap();
            out.extend_from_slice(&h);
        };
        let mut b = vec![0x3f, 0xe1, 0x1f, 0x83, 0x86]; // size update 4096, POST, http
        b.push(0x04); // :path, literal without indexing, indexed name
        huff(path, &mut b);
        b.push(0x41); // :authority, literal with incremental indexing
        huff("/tmp/agentid/workload.sock", &mut b);
        b.push(0x40); // new name, incremental indexing
        huff("workload.spiffe.io", &mut b);
        huff("true", &mut b);
        b.push(0x10); // never indexed, new name, raw strings
        for part in ["x-long", &"v".repeat(300)] {
            encode_integer_into(part.len(), 7, 0, &mut b).unwrap();
            b.extend_from_slice(part.as_bytes());
        }
        b.extend_from_slice(&[0xbe, 0xbf]); // the two entries just added
        b
    }

    #[test]
    fn unhuffman_keeps_the_meaning_of_every_block() {
        let blocks = [
            mixed_block("/SpiffeWorkloadAPI/FetchX509SVID"),
            mixed_block("/a"),
        ];
        let (mut a, mut b) = (loona_hpack::Decoder::new(), loona_hpack::Decoder::new());
        for block in &blocks {
            let mut plain = Vec::new();
            unhuffman(block, &mut plain).unwrap();
            assert!(plain.len() > block.len(), "strings were decoded");
            assert_eq!(a.decode(block).unwrap(), b.decode(&plain).unwrap());
        }
        // Cut anywhere, a block either still parses or is left to the decoder to refuse.
        let block = &blocks[0];
        for cut in 0..block.len() {
            let mut plain = Vec::new();
            if unhuffman(&block[..cut], &mut plain).is_none() {
                assert!(loona_hpack::Decoder::new().decode(&block[..cut]).is_err());
            }
        }
    }

    #[test]
    fn unhuffman_agrees_with_the_decoder_on_arbitrary_blocks() {
        let mut rng = fastrand::Rng::with_seed(11);
        let valid = mixed_block("/p");
        for round in 0..4_000 {
            let block: Vec<u8> = if round % 2 == 0 {
                (0..rng.usize(0..16)).map(|_| rng.u8(..)).collect()
            } else {
                let mut v = valid.clone();
                for _ in 0..rng.usize(1..4) {
                    let i = rng.usize(..v.len());
                    v[i] = rng.u8(..);
                }
                v
            };
            let theirs = loona_hpack::Decoder::new().decode(&block).ok();
            let mut plain = Vec::new();
            let ours = unhuffman(&block, &mut plain)
                .and_then(|_| loona_hpack::Decoder::new().decode(&plain).ok());
            assert_eq!(ours, theirs, "block {block:02x?}");
        }
    }

    #[tokio::test]
    async fn non_http2_passes_through() {
        for input in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PRI * HTTP/1.1\r\n\r\n",
            b"PR",
            b"",
        ] {
            assert_eq!(
                rewrite_with(input, 1, 3, DEFAULT_MAX_FRAME_SIZE)
                    .await
                    .unwrap(),
                input
            );
        }
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (client, server) = tokio::io::duplex(1024);
        let mut a = AuthorityRewrite::new(server);
        a.write_all(b"server bytes").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        let mut client = client;
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"server bytes");
    }

    /// Runs a real `h2` server; the client writes raw frames: two requests
    /// whose `:authority` is a socket path, the second one made of dynamic
    /// table references. Returns what the server saw and what the client got.
    async fn h2_exchange(rewrite: bool) -> (Vec<String>, BTreeMap<u32, String>) {
        async fn serve<T: AsyncRead + AsyncWrite + Unpin>(io: T) -> Vec<String> {
            let mut conn = h2::server::handshake(io).await.unwrap();
            let mut seen = Vec::new();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                seen.push(format!(
                    "{} {}",
                    req.uri().authority().unwrap(),
                    req.uri().path()
                ));
                respond
                    .send_response(http::Response::new(()), true)
                    .unwrap();
            }
            seen
        }
        let (mut client, server_io) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            match rewrite {
                true => serve(AuthorityRewrite::new(server_io)).await,
                false => serve(server_io).await,
            }
        });
        let mut enc = IndexingEncoder::default();
        let req = grpc_request(SOCK);
        let (first, second) = (enc.encode(&req), enc.encode(&req));
        assert!(
            second.iter().all(|&b| b >= 0x80 | 62),
            "second request is all table references"
        );
        let input = conn(&[
            frame(HEADERS, END_HEADERS | 0x1, 1, &first),
            frame(HEADERS, END_HEADERS | 0x1, 3, &second),
        ]);
        client.write_all(&input).await.unwrap();

        let mut outcomes = BTreeMap::new();
        let mut decoder = loona_hpack::Decoder::new();
        let exchange = async {
            while outcomes.len() < 2 {
                let mut head = [0u8; 9];
                client.read_exact(&mut head).await.unwrap();
                let len =
                    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
                let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
                let mut payload = vec![0; len];
                client.read_exact(&mut payload).await.unwrap();
                match head[3] {
                    0x4 if head[4] & 1 == 0 => {
                        client.write_all(&frame(0x4, 1, 0, &[])).await.unwrap()
                    }
                    0x1 => {
                        let list = decoder.decode(&payload).unwrap();
                        outcomes.insert(stream, format!("status {}", s(&list[0].1)));
                    }
                    0x3 => {
                        let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                        outcomes.insert(stream, format!("reset {code}"));
                    }
                    0x7 => panic!("GOAWAY {payload:?}"),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("h2 exchange timed out");
        drop(client);
        (server.await.unwrap(), outcomes)
    }

    /// Proves the adapter matters. If this starts failing, h2 has learnt to
    /// accept such authorities (hyperium/h2#487) and the adapter may go.
    #[tokio::test]
    async fn h2_server_rejects_socket_path_authority_without_adapter() {
        let (seen, outcomes) = h2_exchange(false).await;
        assert!(seen.is_empty(), "{seen:?}");
        // PROTOCOL_ERROR (1) on both streams.
        assert_eq!(
            outcomes,
            BTreeMap::from([(1, "reset 1".into()), (3, "reset 1".into())])
        );
    }

    #[tokio::test]
    async fn h2_server_accepts_socket_path_authority_with_adapter() {
        let (seen, outcomes) = h2_exchange(true).await;
        assert_eq!(seen, ["localhost /x", "localhost /x"]);
        assert_eq!(
            outcomes,
            BTreeMap::from([(1, "status 200".into()), (3, "status 200".into())])
        );
    }
}
