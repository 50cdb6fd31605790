//! What Envoy's `http_inspector` reads from a plaintext connection's first bytes (SPEC §9):
//! the HTTP/2 connection preface (`h2c`), or an HTTP/1.x request line (`http/1.1`, else
//! `http/1.0`), as its parser reads the request line. Pure: bytes in, a verdict out, no I/O
//! and no allocation.

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// Not decided yet: more bytes may make it HTTP.
    NeedMore,
    /// Not HTTP: the chain match sees no application protocol.
    NotHttp,
    /// HTTP, as the application protocol the chain match sees: `http/1.0`, `http/1.1`, `h2c`.
    Http(&'static str),
}

/// Read `bytes`, a connection's first bytes (as peeked), as Envoy's `http_inspector`: a prefix
/// of the HTTP/2 preface needs more, the whole preface is `h2c`; otherwise the first line must
/// be a request line (`METHOD SP TARGET SP HTTP/d.d`, CRLF or LF), decided as soon as a byte
/// cannot continue one (a binary or server-first protocol is told apart at its first bytes)
/// or when its line ends. `HTTP/1.1` is `http/1.1`; any other version `http/1.0`, as Envoy
/// sets it.
pub fn sniff(bytes: &[u8]) -> Sniff {
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes.get(..n) == H2_PREFACE.get(..n) {
        return if n == H2_PREFACE.len() { Sniff::Http("h2c") } else { Sniff::NeedMore };
    }
    // The request line, up to its LF (or all there is).
    let (line, ended) = match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => (bytes.get(..i).unwrap_or_default(), true),
        None => (bytes, false),
    };
    // A CR before the LF (or last, with the LF still to come) is the line end's.
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match request_line(line, ended) {
        Line::Invalid => Sniff::NotHttp,
        Line::Partial => Sniff::NeedMore,
        Line::Version(b'1', b'1') => Sniff::Http("http/1.1"),
        Line::Version(..) => Sniff::Http("http/1.0"),
    }
}

/// `protocol` (one [`Sniff::Http`] gives) as the application protocols a chain match reads
/// (`ConnFacts::alpn`): built once, so a sniffed connection allocates nothing.
pub fn application_protocols(protocol: &str) -> &'static [String] {
    static PROTOCOLS: std::sync::LazyLock<[String; 3]> =
        std::sync::LazyLock::new(|| ["http/1.0".into(), "http/1.1".into(), "h2c".into()]);
    let all: &'static [String] = &PROTOCOLS[..];
    let at = all.iter().position(|p| p == protocol);
    at.and_then(|i| all.get(i..=i)).unwrap_or_default()
}

/// How far a request line (without its line end) goes.
enum Line {
    /// A byte that no request line has at that place.
    Invalid,
    /// Valid so far; the line has not ended.
    Partial,
    /// A whole request line, with its version's major and minor digits.
    Version(u8, u8),
}

/// `line` as `METHOD SP TARGET SP HTTP/d.d`; `ended`: its line end was seen.
fn request_line(line: &[u8], ended: bool) -> Line {
    // The method: a token (any method, as Envoy's parser allows custom ones).
    let method = line.iter().take_while(|&&b| is_tchar(b)).count();
    let Some(rest) = line.get(method..) else { return Line::Invalid };
    match rest.first() {
        None if !ended => return Line::Partial,
        Some(b' ') if method > 0 => {}
        _ => return Line::Invalid,
    }
    // The request target: visible characters up to the next space.
    let rest = rest.get(1..).unwrap_or_default();
    let target = rest.iter().take_while(|&&b| b > b' ' && b != 0x7f).count();
    let Some(rest) = rest.get(target..) else { return Line::Invalid };
    match rest.first() {
        None if !ended => return Line::Partial,
        Some(b' ') if target > 0 => {}
        _ => return Line::Invalid,
    }
    // The version: `HTTP/` digit `.` digit, and nothing after it.
    let version = rest.get(1..).unwrap_or_default();
    let pattern: &[u8] = b"HTTP/d.d";
    for (i, &b) in version.iter().enumerate() {
        let ok = match pattern.get(i) {
            Some(b'd') => b.is_ascii_digit(),
            Some(&p) => b == p,
            None => false,
        };
        if !ok {
            return Line::Invalid;
        }
    }
    match (version, ended) {
        ([.., major, b'.', minor], true) if version.len() == pattern.len() => Line::Version(*major, *minor),
        (_, false) => Line::Partial,
        _ => Line::Invalid,
    }
}

/// An HTTP token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every prefix of `bytes` short of `decided_at` needs more; from there on, `want`.
    fn decides_at(bytes: &[u8], decided_at: usize, want: Sniff) {
        for k in 0..=bytes.len() {
            let got = sniff(&bytes[..k]);
            if k < decided_at {
                assert_eq!(
                    got,
                    Sniff::NeedMore,
                    "{:?} after {k} bytes",
                    String::from_utf8_lossy(&bytes[..k])
                );
            } else {
                assert_eq!(got, want, "{:?} after {k} bytes", String::from_utf8_lossy(&bytes[..k]));
            }
        }
    }

    #[test]
    fn each_protocol_found_is_an_application_protocol_the_match_reads() {
        for p in ["http/1.0", "http/1.1", "h2c"] {
            assert_eq!(application_protocols(p), [p.to_string()]);
        }
        assert!(application_protocols("h2").is_empty());
    }

    #[test]
    fn an_http_1_1_request_line_is_http_1_1_once_its_line_ends() {
        let get = b"GET /info?x=1 HTTP/1.1\r\nHost: httpbin\r\n\r\n";
        decides_at(get, 24, Sniff::Http("http/1.1"));
        // A bare LF ends a line too; any method token.
        decides_at(b"PURGE /cache HTTP/1.1\nHost: x\n\n", 22, Sniff::Http("http/1.1"));
    }

    #[test]
    fn http_1_0_and_other_versions_are_http_1_0() {
        decides_at(b"GET / HTTP/1.0\r\n\r\n", 16, Sniff::Http("http/1.0"));
        decides_at(b"GET / HTTP/0.9\r\n", 16, Sniff::Http("http/1.0"));
        // A preface that diverges is read as a request line, as Envoy's parser reads it.
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nXX"), Sniff::Http("http/1.0"));
    }

    #[test]
    fn the_http2_preface_is_h2c_and_each_of_its_prefixes_needs_more() {
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // a SETTINGS frame after it
        decides_at(&h2, H2_PREFACE.len(), Sniff::Http("h2c"));
    }

    #[test]
    fn binary_and_server_first_protocols_are_not_http_at_their_first_byte_that_cannot_be() {
        // A TLS record, a MySQL client's first packet: the first byte says.
        for first in [&[0x16u8, 0x03, 0x01][..], &[0x20, 0x00, 0x00, 0x01]] {
            assert_eq!(sniff(first), Sniff::NotHttp, "{first:?}");
            assert_eq!(sniff(&first[..1]), Sniff::NotHttp, "{first:?}");
        }
        // Redis RESP: `*1` could begin a method; its line end says.
        decides_at(b"*1\r\n$4\r\nPING\r\n", 4, Sniff::NotHttp);
        // A line that starts like a method but is not a request line.
        decides_at(b"PING\r\n", 6, Sniff::NotHttp);
        decides_at(b"GET /\r\n", 7, Sniff::NotHttp);
        decides_at(b"GET / HTTP/1.1 x\r\n", 15, Sniff::NotHttp);
        decides_at(b"GET / HTTX", 10, Sniff::NotHttp);
        assert_eq!(sniff(b"\r\nGET / HTTP/1.1\r\n"), Sniff::NotHttp, "an empty first line");
        assert_eq!(sniff(b" GET / HTTP/1.1\r\n"), Sniff::NotHttp);
        assert_eq!(sniff(b""), Sniff::NeedMore);
    }
}
