//! What Envoy's `tls_inspector` reads from a connection's first bytes (SPEC §9): whether it
//! starts a TLS handshake, and the server name (SNI) and ALPN protocols its ClientHello
//! offers, so a listener's filter chain can be chosen by transport protocol, server name and
//! ALPN before any byte is consumed.
//! Pure: bytes in, a verdict out; no I/O.

/// What the bytes seen so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not a TLS handshake: the connection is `raw_buffer`.
    NotTls,
    /// A TLS handshake record has begun; its ClientHello is not complete yet.
    NeedMore,
    /// A complete ClientHello and what it offers. A handshake that is malformed after its
    /// record header is still TLS, offering nothing (the handshake then fails).
    Tls(ClientHello),
}

/// What a ClientHello offers that chooses a filter chain.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The ALPN protocols, in the client's order (empty: none).
    pub alpn: Vec<String>,
    /// The SNI host name, if any.
    pub server_name: Option<String>,
}

/// Record content type of a handshake.
const HANDSHAKE: u8 = 0x16;
/// Handshake type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Extension type of ALPN (RFC 7301).
const ALPN: u16 = 16;
/// Extension type of server_name (RFC 6066).
const SERVER_NAME: u16 = 0;
/// Largest record fragment TLS allows (2^14) plus the expansion allowance.
const MAX_FRAGMENT: usize = (1 << 14) + 2048;

/// Read `bytes`, the connection's first bytes (as peeked), as Envoy's `tls_inspector`: a
/// handshake record (0x16, version 3.x) carrying a ClientHello, possibly over several
/// records.
pub fn parse(bytes: &[u8]) -> Hello {
    match bytes {
        [] => return Hello::NeedMore,
        [b, ..] if *b != HANDSHAKE => return Hello::NotTls,
        [_, v, ..] if *v != 3 => return Hello::NotTls,
        _ => {}
    }
    // The handshake message, gathered from consecutive handshake records.
    let mut message: Vec<u8> = Vec::new();
    let mut rest = bytes;
    loop {
        let Some((header, after)) = rest.split_first_chunk::<5>() else { return Hello::NeedMore };
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != HANDSHAKE || header[1] != 3 || len == 0 || len > MAX_FRAGMENT {
            return Hello::Tls(ClientHello::default());
        }
        let Some((fragment, after)) = after.split_at_checked(len) else { return Hello::NeedMore };
        message.extend_from_slice(fragment);
        rest = after;
        let Some((head, body)) = message.split_first_chunk::<4>() else { continue };
        if head[0] != CLIENT_HELLO {
            return Hello::Tls(ClientHello::default());
        }
        let need = usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]);
        if let Some(body) = body.get(..need) {
            return Hello::Tls(offers(body).unwrap_or_default());
        }
    }
}

/// A cursor over a message; every read is checked (peer bytes are hostile).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A vector with a `u8` or `u16` length prefix.
    fn vec8(&mut self) -> Option<Reader<'a>> {
        let n = self.u8()?;
        self.take(n).map(Reader)
    }

    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(n).map(Reader)
    }
}

/// What a ClientHello body offers; `None` if it is malformed.
fn offers(body: &[u8]) -> Option<ClientHello> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    let mut hello = ClientHello::default();
    if r.0.is_empty() {
        return Some(hello); // no extensions
    }
    let mut extensions = r.vec16()?;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec16()?;
        if kind == usize::from(ALPN) {
            let mut list = data.vec16()?;
            while !list.0.is_empty() {
                let name = list.vec8()?;
                hello.alpn.push(String::from_utf8_lossy(name.0).into_owned());
            }
        } else if kind == usize::from(SERVER_NAME) {
            let mut list = data.vec16()?;
            while !list.0.is_empty() {
                let name_type = list.u8()?;
                let name = list.vec16()?;
                // host_name (0), the only type defined; names compare case-insensitively.
                if name_type == 0 && hello.server_name.is_none() {
                    hello.server_name = Some(String::from_utf8_lossy(name.0).to_ascii_lowercase());
                }
            }
        }
    }
    Some(hello)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello, as rustls writes it, offering `alpn`.
    fn client_hello(alpn: &[&str]) -> Vec<u8> {
        #[derive(Debug)]
        struct Any;
        impl rustls::client::danger::ServerCertVerifier for Any {
            fn verify_server_cert(
                &self,
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &[rustls::pki_types::CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                vec![rustls::SignatureScheme::ECDSA_NISTP256_SHA256]
            }
        }
        let mut c = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Any))
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from("outbound_.6379_._.redis").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(c), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// What rustls' ClientHello offers (its SNI is always `outbound_.6379_._.redis`).
    fn tls(alpn: &[&str]) -> Hello {
        Hello::Tls(ClientHello {
            alpn: alpn.iter().map(|s| s.to_string()).collect(),
            server_name: Some("outbound_.6379_._.redis".into()),
        })
    }

    fn nothing() -> Hello {
        Hello::Tls(ClientHello::default())
    }

    #[test]
    fn a_client_hello_gives_its_alpn_and_every_prefix_of_it_needs_more() {
        let hello = client_hello(&["istio-peer-exchange", "istio"]);
        assert_eq!(parse(&hello), tls(&["istio-peer-exchange", "istio"]));
        for cut in 0..hello.len() {
            assert_eq!(parse(&hello[..cut]), Hello::NeedMore, "cut at {cut}");
        }
        assert_eq!(parse(&client_hello(&[])), tls(&[]));
    }

    #[test]
    fn a_client_hello_split_over_two_records_is_read_whole() {
        let hello = client_hello(&["istio"]);
        let body = &hello[5..];
        let (a, b) = body.split_at(40);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[0x16, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(parse(&two), tls(&["istio"]));
    }

    #[test]
    fn plaintext_is_known_from_its_first_byte_and_garbage_after_a_tls_header_stays_tls() {
        assert_eq!(parse(b"G"), Hello::NotTls);
        assert_eq!(parse(b"\x16\x01"), Hello::NotTls);
        assert_eq!(parse(b"\x16"), Hello::NeedMore);
        assert_eq!(parse(b"\x16\x03\x01\x00\x00"), nothing());
        // A ClientHello whose lengths run past its end: TLS, offering nothing.
        assert_eq!(parse(b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\xff\xff"), nothing());
        assert_eq!(parse(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"), nothing());
    }

    #[test]
    fn hostile_bytes_never_panic_and_a_tls_header_is_never_taken_for_plaintext() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let hello = client_hello(&["istio"]);
        for round in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Start from the real ClientHello (so the parser goes deep) and flip bytes in it.
            let mut bytes = hello[..(x as usize % hello.len())].to_vec();
            for i in 0..(round % 8) {
                let at = (x as usize >> (i * 5)) % bytes.len().max(1);
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= (x >> (i * 3)) as u8;
                }
            }
            let verdict = parse(&bytes);
            if bytes.starts_with(&[0x16, 3]) {
                assert_ne!(verdict, Hello::NotTls, "{bytes:?}");
            }
        }
    }
}
