//! Where each HTTP/1.1 request line starts on a connection, followed on the bytes' way in.
//!
//! actix-http cannot answer a request target over 64 KiB: the `http` crate's `Uri` cannot
//! hold one, so it sends an empty 400 (past 128 KiB of head, a 431). To answer those with
//! 414 and the error JSON like every other long target, the connection's bytes are
//! followed before actix reads them: request line, head, body (by `Content-Length` or
//! chunked), the next request line. A request line longer than the limit is where the
//! stream stops.
//!
//! The follower only ever refuses what really is a request line: whatever it is unsure of
//! (an upgrade, `CONNECT`, conflicting lengths, a malformed chunk, a folded header) makes
//! it stand aside for the rest of the connection, and actix's own answers stand.

/// How much of one header line is kept to read its name and value; the framing headers
/// are short, and a longer one of them makes the follower stand aside.
const HEADER_LINE_KEPT: usize = 256;

/// Longest chunk-size line (size and extensions) followed; longer ones: stand aside.
const CHUNK_LINE_MAX: usize = 1024;

/// Longest trailer line followed after the last chunk; longer ones: stand aside.
const TRAILER_LINE_MAX: usize = 16 * 1024;

/// What one call to [`RequestFraming::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Every byte may go on.
    Pass,
    /// A request line is over the limit: only the first `keep` bytes of this call may go
    /// on (those before that line; 0 when it began in an earlier call).
    TooLong { keep: usize },
}

/// Follows one connection's incoming bytes (see the module's comment).
#[derive(Debug, Clone)]
pub struct RequestFraming {
    limit: usize,
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    /// Before or inside a request line (blank lines before it are skipped, as httparse does).
    RequestLine {
        len: usize,
        prefix: Prefix,
        ends_with_cr: bool,
    },
    Head(Head),
    Body {
        remaining: u64,
    },
    ChunkSize {
        value: u64,
        digits: u8,
        in_extension: bool,
        len: usize,
    },
    ChunkData {
        remaining: u64,
    },
    /// After a chunk's data: its CR LF (`seen_cr` once the CR has come).
    ChunkEnd {
        seen_cr: bool,
    },
    /// After the last chunk: trailer lines until a blank one.
    Trailer {
        len: usize,
        blank: bool,
    },
    /// Unsure of the framing: every byte passes and actix answers.
    StandAside,
    /// A too-long request line was found; nothing more is looked at.
    Refused,
}

/// The first bytes of a request line, enough to recognise `CONNECT`.
#[derive(Debug, Clone, Copy, Default)]
struct Prefix {
    bytes: [u8; 8],
    len: u8,
}

impl Prefix {
    fn push(&mut self, segment: &[u8]) {
        let room = self.bytes.len() - self.len as usize;
        let take = room.min(segment.len());
        self.bytes[self.len as usize..self.len as usize + take].copy_from_slice(&segment[..take]);
        self.len += take as u8;
    }

    fn is_connect(&self) -> bool {
        self.bytes[..self.len as usize].starts_with(b"CONNECT ")
    }
}

/// What the head of one request has said so far about its body.
#[derive(Debug, Clone, Default)]
struct Head {
    line: Vec<u8>,
    line_overflowed: bool,
    connect: bool,
    length: Option<u64>,
    chunked: bool,
    transfer_encoding_seen: bool,
}

/// What a finished header line means for the framing.
enum HeaderVerdict {
    Continue,
    EndOfHead,
    StandAside,
}

impl RequestFraming {
    /// A follower refusing request lines longer than `limit` bytes (method, target and
    /// version, without the line end).
    pub fn new(limit: usize) -> Self {
        Self { limit, state: State::RequestLine { len: 0, prefix: Prefix::default(), ends_with_cr: false } }
    }

    /// True once a too-long request line was found.
    pub fn refused(&self) -> bool {
        matches!(self.state, State::Refused)
    }

    /// Follows the next bytes of the connection.
    pub fn feed(&mut self, data: &[u8]) -> Feed {
        let mut at = 0;
        while at < data.len() {
            match &mut self.state {
                State::StandAside => return Feed::Pass,
                State::Refused => return Feed::TooLong { keep: 0 },
                State::RequestLine { .. } => {
                    if let Some(keep) = self.request_line(data, &mut at) {
                        self.state = State::Refused;
                        return Feed::TooLong { keep };
                    }
                }
                State::Head(_) => self.head(data, &mut at),
                State::Body { remaining } | State::ChunkData { remaining } => {
                    let take = (*remaining).min((data.len() - at) as u64);
                    *remaining -= take;
                    at += take as usize;
                    if *remaining == 0 {
                        self.state = match self.state {
                            State::Body { .. } => Self::next_request(),
                            _ => State::ChunkEnd { seen_cr: false },
                        };
                    }
                }
                State::ChunkSize { .. } | State::ChunkEnd { .. } | State::Trailer { .. } => {
                    self.framing_byte(data[at]);
                    at += 1;
                }
            }
        }
        Feed::Pass
    }

    fn next_request() -> State {
        State::RequestLine { len: 0, prefix: Prefix::default(), ends_with_cr: false }
    }

    /// One byte of chunk framing (sizes, the CR LF after data, trailers): short lines read
    /// byte by byte, where the data itself is skipped by length.
    fn framing_byte(&mut self, byte: u8) {
        match self.state {
            State::ChunkSize { .. } => self.chunk_size(byte),
            State::ChunkEnd { .. } => self.chunk_end(byte),
            State::Trailer { .. } => self.trailer(byte),
            _ => unreachable!("called in a chunk-framing state"),
        }
    }

    /// Reads request-line bytes from `at`; the offset to keep when the line is too long.
    fn request_line(&mut self, data: &[u8], at: &mut usize) -> Option<usize> {
        let State::RequestLine { len, prefix, ends_with_cr } = &mut self.state else { unreachable!("called in the request-line state") };
        let start = *at;
        let end = memchr::memchr(b'\n', &data[start..]).map(|i| start + i);
        let segment = &data[start..end.unwrap_or(data.len())];
        prefix.push(segment);
        let began_here = *len == 0;
        *len += segment.len();
        if let Some(last) = segment.last() {
            *ends_with_cr = *last == b'\r';
        }
        // The line end's CR is not part of the line (it may have come in an earlier piece).
        let content = if end.is_some() && *ends_with_cr { *len - 1 } else { *len };
        if content > self.limit && (end.is_some() || *len > self.limit + 1) {
            return Some(if began_here { start } else { 0 });
        }
        let Some(end) = end else {
            *at = data.len();
            return None;
        };
        *at = end + 1;
        if content == 0 {
            // A blank line before the request line.
            (*len, *prefix, *ends_with_cr) = (0, Prefix::default(), false);
        } else {
            let connect = prefix.is_connect();
            self.state = State::Head(Head { connect, ..Head::default() });
        }
        None
    }

    /// Reads header bytes from `at`, acting on each header line as it ends.
    fn head(&mut self, data: &[u8], at: &mut usize) {
        let State::Head(head) = &mut self.state else { unreachable!("called in the head state") };
        let start = *at;
        let end = memchr::memchr(b'\n', &data[start..]).map(|i| start + i);
        let segment = &data[start..end.unwrap_or(data.len())];
        let room = HEADER_LINE_KEPT.saturating_sub(head.line.len());
        head.line.extend_from_slice(&segment[..room.min(segment.len())]);
        head.line_overflowed |= segment.len() > room;
        let Some(end) = end else {
            *at = data.len();
            return;
        };
        *at = end + 1;
        let verdict = head.finish_line();
        self.state = match verdict {
            HeaderVerdict::Continue => return,
            HeaderVerdict::StandAside => State::StandAside,
            HeaderVerdict::EndOfHead => match (head.connect, head.chunked, head.length) {
                (true, _, _) => State::StandAside,
                (false, true, _) => State::ChunkSize { value: 0, digits: 0, in_extension: false, len: 0 },
                (false, false, Some(n)) if n > 0 => State::Body { remaining: n },
                (false, false, _) => Self::next_request(),
            },
        };
    }

    fn chunk_size(&mut self, byte: u8) {
        let State::ChunkSize { value, digits, in_extension, len } = &mut self.state else { unreachable!("called in the chunk-size state") };
        *len += 1;
        if *len > CHUNK_LINE_MAX {
            self.state = State::StandAside;
            return;
        }
        match byte {
            b'\n' if *digits > 0 => {
                self.state = if *value == 0 { State::Trailer { len: 0, blank: true } } else { State::ChunkData { remaining: *value } };
            }
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' if !*in_extension => {
                // 15 hex digits already exceed any body anyone would accept.
                if *digits == 15 {
                    self.state = State::StandAside;
                    return;
                }
                *value = *value * 16 + u64::from((byte as char).to_digit(16).unwrap_or(0));
                *digits += 1;
            }
            b';' | b' ' | b'\t' | b'\r' if *digits > 0 => *in_extension = true,
            _ if *in_extension => {}
            _ => self.state = State::StandAside,
        }
    }

    fn chunk_end(&mut self, byte: u8) {
        let State::ChunkEnd { seen_cr } = &mut self.state else { unreachable!("called in the chunk-end state") };
        match byte {
            b'\r' if !*seen_cr => *seen_cr = true,
            b'\n' => self.state = State::ChunkSize { value: 0, digits: 0, in_extension: false, len: 0 },
            _ => self.state = State::StandAside,
        }
    }

    fn trailer(&mut self, byte: u8) {
        let State::Trailer { len, blank } = &mut self.state else { unreachable!("called in the trailer state") };
        match byte {
            b'\n' if *blank => self.state = Self::next_request(),
            b'\n' => (*len, *blank) = (0, true),
            b'\r' => {}
            _ => {
                *len += 1;
                *blank = false;
                if *len > TRAILER_LINE_MAX {
                    self.state = State::StandAside;
                }
            }
        }
    }
}

impl Head {
    /// Acts on the header line just ended, and clears it for the next one.
    fn finish_line(&mut self) -> HeaderVerdict {
        let line = std::mem::take(&mut self.line);
        let overflowed = std::mem::replace(&mut self.line_overflowed, false);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if line.is_empty() && !overflowed {
            return HeaderVerdict::EndOfHead;
        }
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            // A folded header: httparse refuses it, and there is nothing to follow.
            return HeaderVerdict::StandAside;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else { return HeaderVerdict::StandAside };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        let frames = |wanted: &str| name.eq_ignore_ascii_case(wanted.as_bytes());
        if !(frames("content-length") || frames("transfer-encoding") || frames("upgrade")) {
            return HeaderVerdict::Continue;
        }
        if overflowed || frames("upgrade") {
            return HeaderVerdict::StandAside;
        }
        if frames("content-length") {
            let parsed = std::str::from_utf8(value).ok().filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).and_then(|v| v.parse::<u64>().ok());
            match (parsed, self.length) {
                (Some(n), None) => self.length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return HeaderVerdict::StandAside,
            }
        } else {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default().trim_ascii();
            if self.transfer_encoding_seen || !last.eq_ignore_ascii_case(b"chunked") {
                return HeaderVerdict::StandAside;
            }
            self.transfer_encoding_seen = true;
            self.chunked = true;
        }
        if self.chunked && self.length.is_some() {
            // Both framings: actix refuses the request, and which one to follow is moot.
            return HeaderVerdict::StandAside;
        }
        HeaderVerdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of `step`; the absolute offset where the kept bytes end, if refused.
    fn refusal_offset(bytes: &[u8], step: usize, limit: usize) -> Option<usize> {
        let mut framing = RequestFraming::new(limit);
        let mut offset = 0;
        for piece in bytes.chunks(step) {
            if let Feed::TooLong { keep } = framing.feed(piece) {
                return Some(offset + keep);
            }
            offset += piece.len();
        }
        None
    }

    /// Where the kept bytes may end for a too-long line starting at `line_start`: there, or,
    /// when the line began in an earlier piece (passed on already, as a partial line), at
    /// the start of the piece that showed it too long.
    fn stops_at_line(at: Option<usize>, line_start: usize, step: usize) -> bool {
        at.is_some_and(|at| at == line_start || (at > line_start && at % step == 0))
    }

    fn get(target_len: usize) -> Vec<u8> {
        format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(target_len - 1)).into_bytes()
    }

    #[test]
    fn a_request_line_over_the_limit_is_refused_at_its_start_however_it_is_split() {
        for step in [1, 7, 100, 10_000, 1 << 20] {
            let at = refusal_offset(&get(100_000), step, 1000);
            assert!(stops_at_line(at, 0, step), "step {step}: {at:?}");
            if step > 1000 {
                assert_eq!(at, Some(0));
            }
        }
        // Exactly at the limit passes: "GET " + target + " HTTP/1.1" is the line.
        let at_limit = 1000 - "GET  HTTP/1.1".len();
        for step in [1, 3, 1000] {
            assert_eq!(refusal_offset(&get(at_limit), step, 1000), None, "step {step}");
            assert!(stops_at_line(refusal_offset(&get(at_limit + 1), step, 1000), 0, step), "step {step}");
        }
    }

    #[test]
    fn a_long_line_after_a_normal_request_keeps_the_first_request_whole() {
        let mut bytes = get(10);
        let first = bytes.len();
        bytes.extend(get(5000));
        for step in [1, 5, first, 64, 1 << 16] {
            let at = refusal_offset(&bytes, step, 1000);
            assert!(stops_at_line(at, first, step), "step {step}: kept up to {at:?}, the line starts at {first}");
        }
    }

    #[test]
    fn bodies_without_line_ends_are_skipped_by_length_and_by_chunks() {
        let body = vec![b'x'; 50_000];
        let mut by_length = format!("POST /v1/search HTTP/1.1\r\nHost: x\r\ncontent-LENGTH: {}\r\n\r\n", body.len()).into_bytes();
        by_length.extend(&body);
        by_length.extend(get(10));
        let mut chunked = b"POST /v1/search HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec();
        for piece in body.chunks(20_000) {
            chunked.extend(format!("{:x};name=v\r\n", piece.len()).as_bytes());
            chunked.extend(piece);
            chunked.extend(b"\r\n");
        }
        chunked.extend(b"0\r\nX-Trailer: 1\r\n\r\n");
        chunked.extend(get(10));
        for bytes in [&by_length, &chunked] {
            for step in [1, 9, 4096, 1 << 20] {
                assert_eq!(refusal_offset(bytes, step, 1000), None, "step {step}");
            }
            // And the follower is back at a request line: a long one after is refused.
            let mut then_long = bytes.clone();
            then_long.extend(get(2000));
            assert_eq!(refusal_offset(&then_long, 1 << 20, 1000), Some(bytes.len()));
        }
    }

    #[test]
    fn blank_lines_before_a_request_line_are_skipped_and_bare_line_feeds_end_lines() {
        let mut bytes = b"\r\n\n".to_vec();
        bytes.extend(b"GET / HTTP/1.1\nContent-Length: 3\n\nabc");
        bytes.extend(get(2000));
        assert_eq!(refusal_offset(&bytes, 1 << 20, 1000), Some(bytes.len() - get(2000).len()));
    }

    #[test]
    fn what_the_follower_is_unsure_of_makes_it_stand_aside() {
        let long = get(5000);
        let unsure: [&[u8]; 8] = [
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
        ];
        for head in unsure {
            let mut bytes = head.to_vec();
            bytes.extend(&long);
            assert_eq!(refusal_offset(&bytes, 1 << 20, 1000), None, "{}", String::from_utf8_lossy(head));
        }
        // An ordinary header longer than what is kept is fine; a long Content-Length is not followed.
        let mut bytes = format!("GET / HTTP/1.1\r\nCookie: {}\r\n\r\n", "c".repeat(5000)).into_bytes();
        bytes.extend(&long);
        assert!(refusal_offset(&bytes, 1 << 20, 1000).is_some());
        let mut bytes = format!("GET / HTTP/1.1\r\nContent-Length: {}1\r\n\r\n", " ".repeat(300)).into_bytes();
        bytes.extend(&long);
        assert_eq!(refusal_offset(&bytes, 1 << 20, 1000), None);
    }

    #[test]
    fn once_refused_nothing_more_passes() {
        let mut framing = RequestFraming::new(10);
        assert_eq!(framing.feed(b"GET /0123456789 HTTP/1.1"), Feed::TooLong { keep: 0 });
        assert!(framing.refused());
        assert_eq!(framing.feed(b"\r\n\r\nGET / HTTP/1.1\r\n"), Feed::TooLong { keep: 0 });
    }
}
