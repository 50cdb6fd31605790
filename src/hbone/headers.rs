//! Header blocks for CONNECT tunnels: HPACK encoding of the few headers HBONE sends, bounded
//! HPACK decoding of what the peer sends, and the request/response checks of RFC 9113 §8.3
//! and §8.5 with ztunnel's answers.
//!
//! Decoding uses `loona-hpack` (complete: Huffman, dynamic table, size updates): the maintained
//! fork of `hpack`, whose last release is years old; `h2` does not export its HPACK, and
//! `httlib-hpack` is little used. We bound what it may hold (its table is capped at
//! [`HEADER_TABLE_SIZE`], blocks at the header list size) and fuzz it (`tests.rs`). Encoding is
//! ours and never touches the dynamic table: every field is a literal without indexing (or the
//! static `:status 200`), so the peer's SETTINGS_HEADER_TABLE_SIZE needs no tracking and a
//! tunnel's handful of headers costs a few bytes more than indexing would. No I/O.

use std::borrow::Cow;

/// A decoded header field list: lowercase names and raw values, pseudo-headers included.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Regular (non-pseudo) headers of a request or response: lowercase names, raw values.
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// Size of the dynamic table we let the peer's encoder use (the RFC default, never raised).
pub const HEADER_TABLE_SIZE: usize = 4096;

/// Why a header block could not be used.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// HPACK decoding failed: the shared compression context is lost (a connection error).
    #[error("hpack: {0}")]
    Compression(&'static str),
    /// The decoded list is over SETTINGS_MAX_HEADER_LIST_SIZE (the block was still decoded,
    /// so the compression context stays in sync).
    #[error("header list larger than {0} bytes")]
    TooLarge(usize),
    /// The fields break RFC 9113 §8.3 (a stream error, PROTOCOL_ERROR).
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// Well-formed, but not a request HBONE serves: answered with status 400 (ztunnel's answer).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
}

/// Decodes one complete header block. The list is bounded by `max_list_size` as RFC 9113
/// §6.5.2 counts it (name + value + 32 per field); past it, fields are decoded and dropped, so a
/// hostile block of repeated indexed references cannot grow memory.
pub fn decode(
    hpack: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
    max_list_size: usize,
) -> Result<Fields, Invalid> {
    let mut fields = Fields::new();
    let mut size = 0usize;
    hpack
        .decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| {
            size = size.saturating_add(name.len() + value.len() + 32);
            if size <= max_list_size {
                fields.push((name.into_owned(), value.into_owned()));
            }
        })
        .map_err(|e| {
            Invalid::Compression(match e {
                loona_hpack::decoder::DecoderError::HeaderIndexOutOfBounds => "index out of bounds",
                loona_hpack::decoder::DecoderError::InvalidMaxDynamicSize => {
                    "table size update over our limit"
                }
                loona_hpack::decoder::DecoderError::SizeUpdateAtEnd => "size update at block end",
                _ => "bad integer or string",
            })
        })?;
    if size > max_list_size {
        return Err(Invalid::TooLarge(max_list_size));
    }
    Ok(fields)
}

/// A CONNECT request as the server role accepts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `:authority`, `host:port` (for HBONE, the destination `IP:port`).
    pub authority: String,
    /// Regular headers (e.g. `baggage`, `traceparent`).
    pub headers: HeaderList,
}

/// A response as the client role reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// `:status`.
    pub status: u16,
    /// Regular headers (e.g. the terminator's `baggage`).
    pub headers: HeaderList,
}

/// Connection-specific fields that make a message malformed (RFC 9113 §8.2.2).
const CONNECTION_SPECIFIC: [&[u8]; 5] =
    [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"];

/// Checks a regular field's name (lowercase token characters) and value (no NUL, CR, LF,
/// no leading or trailing whitespace: RFC 9113 §8.2.1), and the connection-specific ban.
fn check_regular(name: &[u8], value: &[u8]) -> Result<(), Invalid> {
    let token = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(b);
    if name.is_empty() || !name.iter().all(token) {
        return Err(Invalid::Malformed("invalid header name"));
    }
    if value.iter().any(|b| matches!(b, 0 | b'\r' | b'\n'))
        || value.first().is_some_and(|b| matches!(b, b' ' | b'\t'))
        || value.last().is_some_and(|b| matches!(b, b' ' | b'\t'))
    {
        return Err(Invalid::Malformed("invalid header value"));
    }
    if CONNECTION_SPECIFIC.contains(&name) {
        return Err(Invalid::Malformed("connection-specific header"));
    }
    if name == b"te" && value != b"trailers" {
        return Err(Invalid::Malformed("te other than trailers"));
    }
    Ok(())
}

/// Pseudo-header fields in arrival order, borrowed from the decoded list.
type Pseudo<'a> = Vec<(&'a [u8], &'a [u8])>;

/// Splits fields into pseudo-headers (checked for order and duplicates) and regular headers.
fn split<'a>(fields: &'a Fields, allowed: &[&'static [u8]]) -> Result<(Pseudo<'a>, HeaderList), Invalid> {
    let mut pseudo: Vec<(&[u8], &[u8])> = Vec::new();
    let mut regular = HeaderList::new();
    for (name, value) in fields {
        if name.first() == Some(&b':') {
            if !regular.is_empty() {
                return Err(Invalid::Malformed("pseudo-header after regular header"));
            }
            if !allowed.contains(&name.as_slice()) {
                return Err(Invalid::Malformed("unknown pseudo-header"));
            }
            if pseudo.iter().any(|(n, _)| *n == name.as_slice()) {
                return Err(Invalid::Malformed("duplicate pseudo-header"));
            }
            pseudo.push((name, value));
        } else {
            check_regular(name, value)?;
            // check_regular allowed only ASCII token characters in the name.
            let name = String::from_utf8_lossy(name).into_owned();
            regular.push((name, value.clone()));
        }
    }
    Ok((pseudo, regular))
}

fn pseudo<'a>(p: &[(&[u8], &'a [u8])], name: &[u8]) -> Option<&'a [u8]> {
    p.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// Checks a request header block as ztunnel's inbound does over the `h2` crate: a malformed
/// message (no `:method`, `:scheme`/`:path` on CONNECT, a bad `:authority`, …) resets the stream;
/// a well-formed request that is not a CONNECT, or a CONNECT without `host:port`, gets 400.
pub fn parse_request(fields: &Fields) -> Result<Request, Invalid> {
    let (p, headers) = split(fields, &[b":method", b":scheme", b":authority", b":path", b":protocol"])?;
    let method = pseudo(&p, b":method").ok_or(Invalid::Malformed("missing :method"))?;
    let is_connect = method == b"CONNECT";
    if pseudo(&p, b":protocol").is_some() {
        // Extended CONNECT (RFC 8441) needs SETTINGS_ENABLE_CONNECT_PROTOCOL, never sent.
        return Err(Invalid::Malformed(":protocol without extended connect"));
    }
    let authority = pseudo(&p, b":authority");
    if let Some(a) = authority
        && (a.is_empty() || !a.iter().all(|b| b.is_ascii_graphic()))
    {
        return Err(Invalid::Malformed("invalid :authority"));
    }
    if is_connect {
        if pseudo(&p, b":scheme").is_some() || pseudo(&p, b":path").is_some() {
            return Err(Invalid::Malformed(":scheme or :path in CONNECT"));
        }
    } else {
        match (pseudo(&p, b":scheme"), pseudo(&p, b":path")) {
            (Some(_), Some(path)) if !path.is_empty() => {}
            _ => return Err(Invalid::Malformed("missing :scheme or :path")),
        }
        return Err(Invalid::BadRequest("method not CONNECT"));
    }
    let authority = authority.ok_or(Invalid::BadRequest("missing :authority"))?;
    // Checked ASCII above.
    let authority = String::from_utf8_lossy(authority).into_owned();
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !has_port {
        return Err(Invalid::BadRequest(":authority not host:port"));
    }
    Ok(Request { authority, headers })
}

/// Checks a response header block: exactly one `:status` of three digits, then regular headers.
pub fn parse_response(fields: &Fields) -> Result<Response, Invalid> {
    let (p, headers) = split(fields, &[b":status"])?;
    let status = pseudo(&p, b":status").ok_or(Invalid::Malformed("missing :status"))?;
    let status = std::str::from_utf8(status)
        .ok()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..=999).contains(s))
        .ok_or(Invalid::Malformed("invalid :status"))?;
    Ok(Response { status, headers })
}

/// Appends an HPACK integer with an `n`-bit prefix (RFC 7541 §5.1); `high` holds the bits above
/// the prefix in the first octet.
fn put_int(dst: &mut Vec<u8>, n: u8, high: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        dst.push(high | value as u8);
        return;
    }
    dst.push(high | max as u8);
    value -= max;
    while value >= 128 {
        dst.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    dst.push(value as u8);
}

/// Appends a raw (not Huffman-coded) string literal.
fn put_str(dst: &mut Vec<u8>, s: &[u8]) {
    put_int(dst, 7, 0, s.len());
    dst.extend_from_slice(s);
}

/// Appends a literal field without indexing whose name is static-table entry `index`.
fn put_indexed_name(dst: &mut Vec<u8>, index: usize, value: &[u8]) {
    put_int(dst, 4, 0, index);
    put_str(dst, value);
}

/// Appends a literal field without indexing with a literal name.
fn put_literal(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.push(0);
    put_str(dst, name);
    put_str(dst, value);
}

/// Static table indices (RFC 7541 Appendix A).
const AUTHORITY: usize = 1;
const METHOD: usize = 2;
const STATUS: usize = 8;
const STATUS_200_INDEXED: u8 = 0x80 | 8;

/// Encodes a CONNECT request's header block. Header names must be lowercase (RFC 9113 §8.2).
pub fn encode_request(dst: &mut Vec<u8>, authority: &str, headers: &[(&str, &[u8])]) {
    put_indexed_name(dst, METHOD, b"CONNECT");
    put_indexed_name(dst, AUTHORITY, authority.as_bytes());
    for (name, value) in headers {
        debug_assert!(!name.bytes().any(|b| b.is_ascii_uppercase()));
        put_literal(dst, name.as_bytes(), value);
    }
}

/// Encodes a response's header block. Header names must be lowercase (RFC 9113 §8.2).
pub fn encode_response(dst: &mut Vec<u8>, status: u16, headers: &[(&str, &[u8])]) {
    if status == 200 {
        dst.push(STATUS_200_INDEXED);
    } else {
        put_indexed_name(dst, STATUS, status.to_string().as_bytes());
    }
    for (name, value) in headers {
        debug_assert!(!name.bytes().any(|b| b.is_ascii_uppercase()));
        put_literal(dst, name.as_bytes(), value);
    }
}

/// A fresh HPACK decoder whose dynamic table the peer cannot grow past [`HEADER_TABLE_SIZE`].
pub fn decoder() -> loona_hpack::Decoder<'static> {
    let mut d = loona_hpack::Decoder::new();
    d.set_max_allowed_table_size(HEADER_TABLE_SIZE);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn our_request_encoding_decodes_with_an_independent_decoder() {
        let mut block = Vec::new();
        let long = "x".repeat(300); // a length past the 7-bit prefix
        encode_request(
            &mut block,
            "10.1.2.3:9080",
            &[("baggage", b"k8s.namespace.name=default"), ("x-long", long.as_bytes())],
        );
        let got = decode(&mut decoder(), &block, 65_536).unwrap();
        assert_eq!(
            got,
            fields(&[
                (":method", "CONNECT"),
                (":authority", "10.1.2.3:9080"),
                ("baggage", "k8s.namespace.name=default"),
                ("x-long", &long),
            ])
        );
        let mut block = Vec::new();
        encode_response(&mut block, 503, &[]);
        assert_eq!(decode(&mut decoder(), &block, 65_536).unwrap(), fields(&[(":status", "503")]));
    }

    #[test]
    fn a_connect_with_authority_is_a_request() {
        let r = parse_request(&fields(&[
            (":method", "CONNECT"),
            (":authority", "10.0.0.1:80"),
            ("baggage", "a=b"),
        ]))
        .unwrap();
        assert_eq!(r.authority, "10.0.0.1:80");
        assert_eq!(r.headers, vec![("baggage".to_string(), b"a=b".to_vec())]);
    }

    #[test]
    fn requests_ztunnel_answers_400_and_those_the_h2_crate_resets() {
        let bad = |l: &[(&str, &str)]| parse_request(&fields(l)).unwrap_err();
        let get = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a:1")];
        assert_eq!(bad(&get), Invalid::BadRequest("method not CONNECT"));
        assert_eq!(bad(&[(":method", "CONNECT")]), Invalid::BadRequest("missing :authority"));
        assert_eq!(
            bad(&[(":method", "CONNECT"), (":authority", "10.0.0.1")]),
            Invalid::BadRequest(":authority not host:port")
        );
        assert!(matches!(bad(&[(":method", "GET"), (":authority", "a:1")]), Invalid::Malformed(_)));
        assert!(matches!(
            bad(&[(":method", "CONNECT"), (":authority", "a:1"), (":path", "/")]),
            Invalid::Malformed(_)
        ));
        assert!(matches!(bad(&[(":authority", "a:1")]), Invalid::Malformed(_)));
        assert!(matches!(
            bad(&[(":method", "CONNECT"), ("x", "1"), (":authority", "a:1")]),
            Invalid::Malformed(_)
        ));
        assert!(matches!(
            bad(&[(":method", "CONNECT"), (":authority", "a:1"), ("Baggage", "1")]),
            Invalid::Malformed(_)
        ));
        assert!(matches!(
            bad(&[(":method", "CONNECT"), (":authority", "a:1"), ("connection", "close")]),
            Invalid::Malformed(_)
        ));
    }

    #[test]
    fn a_header_list_over_the_limit_is_refused_without_growing() {
        // One literal-with-indexing field of ~4000 bytes, then 10,000 one-byte references to it:
        // 40 MB if it were kept.
        let mut block = vec![0x40];
        put_str(&mut block, b"x-big");
        put_str(&mut block, &[b'v'; 4000]);
        block.extend(std::iter::repeat_n(0x80 | 62, 10_000));
        assert_eq!(decode(&mut decoder(), &block, 65_536), Err(Invalid::TooLarge(65_536)));
    }

    #[test]
    fn a_table_size_update_over_our_limit_is_a_compression_error() {
        // Size update to 8192 (> 4096), then an indexed :method GET.
        let mut block = Vec::new();
        put_int(&mut block, 5, 0x20, 8192);
        block.push(0x82);
        assert!(matches!(decode(&mut decoder(), &block, 65_536), Err(Invalid::Compression(_))));
    }
}
