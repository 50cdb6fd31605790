//! TLS record protection after the handshake, done by ringside in the caller's buffers as
//! kTLS does it in the kernel (issue 31): rustls runs the handshake and keeps what only it
//! can do (new traffic secrets on a key update, a client's session tickets) in a
//! `KernelConnection`; records are sealed and opened here, in place, with the AEAD
//! `tls::aead` picks for this CPU (aws-lc-rs or ring). No I/O.
//!
//! rustls' buffered `Connection` copies each record's plaintext into a fresh `Vec` before
//! sealing it and allocates one per record each way (perf/RESULTS.md, issue 31: 15.7% of
//! the pair's bulk CPU); here the plaintext is sealed where it already lies, behind room the
//! caller left for the header and the tag.
//!
//! TLS 1.3 (RFC 8446 §5.2: nonce = iv XOR seq, AAD = the record header, inner content type
//! and zero padding after the plaintext) and TLS 1.2 AEAD suites (RFC 5246 §6.2.3.3, RFC 5288
//! explicit nonce for AES-GCM, RFC 7905 for ChaCha20-Poly1305), as the OpenSSL peers of the
//! tests negotiate 1.2.

use std::ops::Range;

use super::aead::{Cipher, RecordKey, TAG_LEN};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};

/// The record header: type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// The largest plaintext a record carries (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The largest ciphertext a peer may send (RFC 8446 §5.2: 2^14 + 256; RFC 5246 allows
/// 2^14 + 2048 for 1.2, but no AEAD suite expands a record by more than 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// The per-record nonce (RFC 8446 §5.3).
const NONCE_LEN: usize = 12;
/// TLS 1.2 AES-GCM's explicit nonce (RFC 5288 §3).
const EXPLICIT_NONCE_LEN: usize = 8;

/// Content types (RFC 8446 §5.1).
const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

/// Handshake message types after the handshake (RFC 8446 §4).
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// Alert descriptions sent or recognised here (RFC 8446 §6).
const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const DECODE_ERROR: u8 = 50;
const ILLEGAL_PARAMETER: u8 = 47;
const INTERNAL_ERROR: u8 = 80;
const USER_CANCELED: u8 = 90;

/// A handshake message split over records is kept until complete; a NewSessionTicket is a
/// few hundred bytes, so this bounds what a peer can make us hold.
const MAX_POST_HANDSHAKE_MESSAGE: usize = 1 << 16;

/// Why a record could not be sealed or opened; the connection ends (after the alert of
/// `Error::alert`, when there is one).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A record longer than the limits (RFC 8446 §5.2: record_overflow).
    #[error("record overflow")]
    RecordOverflow,
    /// A record that does not open with the peer's key (bad_record_mac).
    #[error("bad record mac")]
    BadRecordMac,
    /// A record type or handshake message not allowed after the handshake.
    #[error("unexpected message")]
    UnexpectedMessage,
    /// A malformed record header, alert or handshake message.
    #[error("decode error")]
    Decode,
    /// A KeyUpdate with a request value that is neither 0 nor 1.
    #[error("illegal parameter")]
    IllegalParameter,
    /// The peer sent a fatal alert (its description).
    #[error("peer sent alert {0}")]
    Alert(u8),
    /// rustls refused a key update or a session ticket.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A suite this module does not implement (rustls negotiates only AEAD suites here).
    #[error("unsupported cipher suite")]
    UnsupportedSuite,
    /// The sequence number or the AEAD's confidentiality limit ran out (TLS 1.2 has no key
    /// update: the connection ends, as rustls ends it).
    #[error("record limit reached")]
    Limit,
    /// aws-lc-rs refused to seal (a key or length it does not take).
    #[error("seal failed")]
    Seal,
}

impl Error {
    /// The alert description to send the peer for this error, if one is due (a peer's own
    /// alert is not answered).
    pub fn alert(&self) -> Option<u8> {
        match self {
            Error::RecordOverflow => Some(RECORD_OVERFLOW),
            Error::BadRecordMac => Some(BAD_RECORD_MAC),
            Error::UnexpectedMessage => Some(UNEXPECTED_MESSAGE),
            Error::Decode => Some(DECODE_ERROR),
            Error::IllegalParameter => Some(ILLEGAL_PARAMETER),
            Error::Alert(_) => None,
            Error::Rustls(_) | Error::UnsupportedSuite | Error::Limit | Error::Seal => Some(INTERNAL_ERROR),
        }
    }
}

/// What an opened record holds for the reader.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: this range of the record's buffer (possibly empty).
    Data(Range<usize>),
    /// close_notify: the peer's direction ended.
    Eof,
    /// A record for the session itself (ticket, key update, warning alert): nothing to read,
    /// but `Session::control` may now hold records to send.
    Session,
}

/// The length of the first record in `buf` when all of it is there (`None`: read more).
/// Fails on a header no TLS peer sends (an SSLv2 hello, a length over `MAX_CIPHERTEXT`).
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, Error> {
    let Some(header) = buf.get(..HEADER_LEN) else { return Ok(None) };
    if header[1] != 3 {
        return Err(Error::Decode);
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(Error::RecordOverflow);
    }
    let total = HEADER_LEN + len;
    Ok((buf.len() >= total).then_some(total))
}

/// The protected record layer of one direction: its key, the fixed IV and the sequence
/// number (RFC 8446 §5.3).
struct Keys {
    key: RecordKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Keys, Error> {
        let (cipher, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Cipher::Chacha20Poly1305, key, iv),
            _ => return Err(Error::UnsupportedSuite),
        };
        let key = RecordKey::new(cipher, key.as_ref()).ok_or(Error::UnsupportedSuite)?;
        let iv = iv.as_ref().try_into().map_err(|_| Error::UnsupportedSuite)?;
        Ok(Keys { key, iv, seq })
    }

    /// The per-record nonce: the IV with the sequence number XORed into its last 8 bytes.
    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    /// Moves to the next record; the sequence number never wraps (RFC 8446 §5.3).
    fn advance(&mut self) -> Result<(), Error> {
        self.seq = self.seq.checked_add(1).ok_or(Error::Limit)?;
        Ok(())
    }

    fn is_gcm(&self) -> bool {
        self.key.is_gcm()
    }
}

/// What rustls keeps after the handshake, per side.
pub enum Kernel {
    /// A client: it also stores the server's session tickets for resumption.
    Client(KernelConnection<ClientConnectionData>),
    /// A server.
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn protocol_version(&self) -> ProtocolVersion {
        match self {
            Kernel::Client(k) => k.protocol_version(),
            Kernel::Server(k) => k.protocol_version(),
        }
    }

    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        }
    }

    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }
}

/// One connection's record layer after the handshake: both directions' keys, rustls'
/// `KernelConnection`, and the records the session itself has to send (`control`).
pub struct Session {
    tls13: bool,
    tx: Keys,
    rx: Keys,
    kernel: Kernel,
    /// Records sealed under `tx` up to which a key update is sent first (TLS 1.3), or the
    /// connection ends (TLS 1.2): the suite's confidentiality limit.
    limit: u64,
    /// A post-handshake handshake message split over records (empty, unallocated, nearly
    /// always).
    partial: Vec<u8>,
    /// Sealed records of the session's own (our KeyUpdate): they go out after every record
    /// sealed before them and before every record sealed after them.
    control: Vec<u8>,
}

impl Session {
    /// The record layer of a finished handshake, from rustls'
    /// `dangerous_into_kernel_connection`.
    pub fn new(secrets: ExtractedSecrets, kernel: Kernel) -> Result<Session, Error> {
        let (tls13, limit) = match (kernel.protocol_version(), kernel.suite()) {
            (ProtocolVersion::TLSv1_3, SupportedCipherSuite::Tls13(s)) => {
                (true, s.common.confidentiality_limit)
            }
            (ProtocolVersion::TLSv1_2, SupportedCipherSuite::Tls12(s)) => {
                (false, s.common.confidentiality_limit)
            }
            _ => return Err(Error::UnsupportedSuite),
        };
        Ok(Session {
            tls13,
            tx: Keys::new(secrets.tx)?,
            rx: Keys::new(secrets.rx)?,
            kernel,
            limit,
            partial: Vec::new(),
            control: Vec::new(),
        })
    }

    /// Lowers the confidentiality limit (tests reach it in a few records).
    #[cfg(test)]
    fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Whether the session is TLS 1.3.
    pub fn is_tls13(&self) -> bool {
        self.tls13
    }

    /// Room a record needs before its plaintext: the header, and TLS 1.2 AES-GCM's explicit
    /// nonce.
    pub fn head_room(&self) -> usize {
        if !self.tls13 && self.tx.is_gcm() { HEADER_LEN + EXPLICIT_NONCE_LEN } else { HEADER_LEN }
    }

    /// Room a record needs after its plaintext: TLS 1.3's inner content type, and the tag.
    pub fn tail_room(&self) -> usize {
        if self.tls13 { 1 + TAG_LEN } else { TAG_LEN }
    }

    /// A sealed record's length for `plain` bytes of plaintext.
    pub fn sealed_len(&self, plain: usize) -> usize {
        self.head_room() + plain + self.tail_room()
    }

    /// Records the session has to send (our KeyUpdate): after the records sealed before,
    /// before any sealed from now on. Empty nearly always.
    pub fn control(&self) -> &[u8] {
        &self.control
    }

    /// Forget `control` once it is sent (its buffer is freed: a key update is rare).
    pub fn clear_control(&mut self) {
        self.control = Vec::new();
    }

    /// Call before sealing `records` records: in TLS 1.3 a KeyUpdate goes to `control` when
    /// they would pass the confidentiality limit (RFC 8446 §5.5), so a batch of records is
    /// sealed under one key; TLS 1.2 fails instead.
    pub fn reserve(&mut self, records: u64) -> Result<(), Error> {
        // One more for the KeyUpdate itself, sealed under the old key.
        if self.tx.seq.saturating_add(records).saturating_add(1) <= self.limit {
            return Ok(());
        }
        if !self.tls13 {
            return Err(Error::Limit);
        }
        self.send_key_update(false)
    }

    /// Seal `record` in place as one application-data record: its plaintext lies at
    /// `record[head_room()..record.len() - tail_room()]` (at most `MAX_PLAINTEXT`), the
    /// rooms around it are overwritten with the header, nonce, content type and tag.
    pub fn seal_data(&mut self, record: &mut [u8]) -> Result<(), Error> {
        self.seal(APPLICATION_DATA, record)
    }

    /// Append `payload` sealed as records of at most `MAX_PLAINTEXT` (a copy: for the
    /// preamble and control messages, not bulk).
    pub fn seal_append(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        let records = payload.len().div_ceil(MAX_PLAINTEXT).max(1);
        self.reserve(records as u64)?;
        let mut chunks = payload.chunks(MAX_PLAINTEXT);
        let first = chunks.next().unwrap_or_default();
        for chunk in std::iter::once(first).chain(chunks) {
            self.append(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Append a close_notify alert (RFC 8446 §6.1).
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        self.seal_alert(CLOSE_NOTIFY, out)
    }

    /// Append a fatal alert with `description` (`Error::alert`).
    pub fn seal_alert(&mut self, description: u8, out: &mut Vec<u8>) -> Result<(), Error> {
        // close_notify is a warning in TLS 1.2; in 1.3 the level is ignored (RFC 8446 §6).
        let level = if description == CLOSE_NOTIFY { 1 } else { 2 };
        self.append(ALERT, &[level, description], out)
    }

    fn append(&mut self, typ: u8, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        let start = out.len();
        let head = self.head_room();
        out.resize(start + head, 0);
        out.extend_from_slice(payload);
        out.resize(out.len() + self.tail_room(), 0);
        self.seal(typ, &mut out[start..])
    }

    fn seal(&mut self, typ: u8, record: &mut [u8]) -> Result<(), Error> {
        let head = self.head_room();
        let tail = self.tail_room();
        let plain_len = record.len().checked_sub(head + tail).ok_or(Error::Seal)?;
        if plain_len > MAX_PLAINTEXT {
            return Err(Error::RecordOverflow);
        }
        if self.tx.seq >= self.limit {
            return Err(Error::Limit);
        }
        let nonce = self.tx.nonce();
        let body_len = record.len() - HEADER_LEN;
        let sealed_end = record.len() - TAG_LEN;
        let tag = if self.tls13 {
            // The inner content type follows the plaintext; no padding.
            record[head + plain_len] = typ;
            let hdr = header(APPLICATION_DATA, body_len);
            record[..HEADER_LEN].copy_from_slice(&hdr);
            self.tx.key.seal(nonce, &hdr, &mut record[head..sealed_end])
        } else {
            record[..HEADER_LEN].copy_from_slice(&header(typ, body_len));
            if head > HEADER_LEN {
                // RFC 5288: the explicit nonce; rustls sends the low 8 bytes of iv ^ seq.
                record[HEADER_LEN..head].copy_from_slice(&nonce[4..]);
            }
            let aad = tls12_aad(self.tx.seq, typ, plain_len);
            self.tx.key.seal(nonce, &aad, &mut record[head..sealed_end])
        }
        .map_err(|_| Error::Seal)?;
        record[sealed_end..].copy_from_slice(&tag);
        self.tx.advance()
    }

    /// Open one whole record (`record_len` long) in place and act on what it holds: a
    /// session ticket goes to rustls, a key update changes keys (and may queue ours in
    /// `control`), close_notify is `Eof`, another fatal alert an error.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, Error> {
        let Some((&mut hdr, body)) = record.split_first_chunk_mut::<HEADER_LEN>() else {
            return Err(Error::Decode);
        };
        if body.len() > MAX_CIPHERTEXT {
            return Err(Error::RecordOverflow);
        }
        if usize::from(u16::from_be_bytes([hdr[3], hdr[4]])) != body.len() {
            return Err(Error::Decode);
        }
        let outer = hdr[0];
        let nonce = self.rx.nonce();
        let (typ, plain) = if self.tls13 {
            // A compatibility change_cipher_spec is allowed only during the handshake.
            if outer != APPLICATION_DATA {
                return Err(Error::UnexpectedMessage);
            }
            let inner_len = self.rx.key.open(nonce, &hdr, body).map_err(|_| Error::BadRecordMac)?;
            // The content type is the last non-zero byte; zeros after it are padding.
            let Some(at) = body[..inner_len].iter().rposition(|&b| b != 0) else {
                return Err(Error::UnexpectedMessage);
            };
            if at > MAX_PLAINTEXT {
                return Err(Error::RecordOverflow);
            }
            (body[at], HEADER_LEN..HEADER_LEN + at)
        } else {
            let explicit = if self.rx.is_gcm() { EXPLICIT_NONCE_LEN } else { 0 };
            let plain_len = body.len().checked_sub(explicit + TAG_LEN).ok_or(Error::BadRecordMac)?;
            let mut nonce = nonce;
            if explicit > 0 {
                nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE_LEN]);
            }
            let aad = tls12_aad(self.rx.seq, outer, plain_len);
            let plain_len =
                self.rx.key.open(nonce, &aad, &mut body[explicit..]).map_err(|_| Error::BadRecordMac)?;
            if plain_len > MAX_PLAINTEXT {
                return Err(Error::RecordOverflow);
            }
            let start = HEADER_LEN + explicit;
            (outer, start..start + plain_len)
        };
        self.rx.advance()?;
        // Records of one handshake message are contiguous (RFC 8446 §5.1).
        if typ != HANDSHAKE && !self.partial.is_empty() {
            return Err(Error::UnexpectedMessage);
        }
        match typ {
            APPLICATION_DATA => Ok(Opened::Data(plain)),
            ALERT => self.alert(&record[plain]),
            HANDSHAKE if self.tls13 => {
                let key_update_ends_record = self.handshake(&record[plain])?;
                // A key update changes keys after this record; what follows in it would be
                // read under the wrong key (RFC 8446 §5.1).
                if key_update_ends_record == Some(false) {
                    return Err(Error::UnexpectedMessage);
                }
                Ok(Opened::Session)
            }
            // TLS 1.2 renegotiation (HelloRequest) is refused, as rustls refuses it.
            CHANGE_CIPHER_SPEC | HANDSHAKE => Err(Error::UnexpectedMessage),
            _ => Err(Error::UnexpectedMessage),
        }
    }

    fn alert(&mut self, alert: &[u8]) -> Result<Opened, Error> {
        let &[level, description] = alert else { return Err(Error::Decode) };
        match description {
            CLOSE_NOTIFY => Ok(Opened::Eof),
            // user_canceled is followed by close_notify (RFC 8446 §6.1).
            USER_CANCELED => Ok(Opened::Session),
            // TLS 1.2 warnings do not end the connection (RFC 5246 §7.2.2); in 1.3 every
            // other alert is fatal (RFC 8446 §6.2).
            _ if !self.tls13 && level == 1 => Ok(Opened::Session),
            d => Err(Error::Alert(d)),
        }
    }

    /// Handle the handshake messages of one record; `Some(last)` when it held a KeyUpdate,
    /// `last` telling whether that was the record's end.
    fn handshake(&mut self, input: &[u8]) -> Result<Option<bool>, Error> {
        let joined;
        let mut bytes = input;
        if !self.partial.is_empty() {
            if self.partial.len() + bytes.len() > MAX_POST_HANDSHAKE_MESSAGE {
                return Err(Error::Decode);
            }
            let mut p = std::mem::take(&mut self.partial);
            p.extend_from_slice(bytes);
            joined = p;
            bytes = &joined;
        }
        let mut key_update = None;
        while !bytes.is_empty() {
            if key_update.is_some() {
                return Ok(Some(false));
            }
            let Some(&[typ, a, b, c]) = bytes.first_chunk::<4>() else {
                return self.keep_partial(bytes).map(|()| key_update);
            };
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            let Some(body) = bytes.get(4..4 + len) else {
                return self.keep_partial(bytes).map(|()| key_update);
            };
            match (typ, &self.kernel) {
                (NEW_SESSION_TICKET, Kernel::Client(_)) => {
                    if let Kernel::Client(k) = &mut self.kernel {
                        k.handle_new_session_ticket(body)?;
                    }
                }
                (KEY_UPDATE, _) => {
                    let &[request] = body else { return Err(Error::Decode) };
                    if request > 1 {
                        return Err(Error::IllegalParameter);
                    }
                    self.rx = Keys::new(self.kernel.update_rx()?)?;
                    if request == 1 {
                        self.send_key_update(false)?;
                    }
                    key_update = Some(true);
                }
                _ => return Err(Error::UnexpectedMessage),
            }
            bytes = &bytes[4 + len..];
        }
        Ok(key_update)
    }

    fn keep_partial(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if bytes.len() > MAX_POST_HANDSHAKE_MESSAGE {
            return Err(Error::Decode);
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    /// Seal our KeyUpdate into `control` under the current key, then switch to the next
    /// (RFC 8446 §4.6.3).
    fn send_key_update(&mut self, request: bool) -> Result<(), Error> {
        let mut control = std::mem::take(&mut self.control);
        let sealed = self.append(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, u8::from(request)], &mut control);
        self.control = control;
        sealed?;
        self.tx = Keys::new(self.kernel.update_tx()?)?;
        Ok(())
    }

    /// Ask the peer for a key update (ours is sent too): for tests and a future rotation.
    pub fn request_key_update(&mut self) -> Result<(), Error> {
        if !self.tls13 {
            return Err(Error::UnexpectedMessage);
        }
        self.send_key_update(true)
    }
}

/// A record header with `len` bytes after it (the version is always TLS 1.2's on the wire).
fn header(typ: u8, len: usize) -> [u8; HEADER_LEN] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [typ, 3, 3, hi, lo]
}

/// TLS 1.2's additional data: seq ‖ type ‖ version ‖ plaintext length (RFC 5246 §6.2.3.3).
fn tls12_aad(seq: u64, typ: u8, plain_len: usize) -> [u8; 13] {
    let mut aad = [0; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8..].copy_from_slice(&header(typ, plain_len));
    aad
}

#[cfg(test)]
mod tests {
    //! rustls itself is the peer: an in-memory buffered `Connection` on the other side reads
    //! the records sealed here and seals the records opened here, including key updates both
    //! ways and session tickets. These are the tests that prove the layer is TLS.

    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::client::UnbufferedClientConnection;
    use rustls::crypto::{CryptoProvider, aws_lc_rs};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::server::UnbufferedServerConnection;
    use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
    use rustls::{ClientConfig, Connection, RootCertStore, ServerConfig, SupportedCipherSuite};

    use super::*;

    struct Configs {
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    }

    fn configs(suite: SupportedCipherSuite) -> Configs {
        let ck = rcgen::generate_simple_self_signed(vec!["ratings".into()]).unwrap();
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let provider =
            Arc::new(CryptoProvider { cipher_suites: vec![suite], ..aws_lc_rs::default_provider() });
        let version = match suite {
            SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
            SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
        };
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        server.enable_secret_extraction = true;
        Configs { client: Arc::new(client), server: Arc::new(server) }
    }

    /// Our side's handshake over rustls' unbuffered API against `peer`, in memory; returns
    /// our side's status once it may write application data, and the bytes it has received
    /// but not yet processed.
    macro_rules! drive {
        ($ours:expr, $peer:expr) => {{
            let ours = &mut $ours;
            let peer: &mut Connection = $peer;
            let mut incoming: Vec<u8> = Vec::new();
            let mut outgoing = vec![0u8; 1 << 16];
            let mut outgoing_used = 0;
            loop {
                let UnbufferedStatus { discard, state } = ours.process_tls_records(&mut incoming);
                let state = state.unwrap();
                let done = match state {
                    ConnectionState::EncodeTlsData(mut e) => {
                        match e.encode(&mut outgoing[outgoing_used..]) {
                            Ok(n) => outgoing_used += n,
                            Err(EncodeError::InsufficientSize(_)) => panic!("outgoing too small"),
                            Err(e) => panic!("{e}"),
                        }
                        false
                    }
                    ConnectionState::TransmitTlsData(t) => {
                        peer.read_tls(&mut &outgoing[..outgoing_used]).unwrap();
                        peer.process_new_packets().unwrap();
                        outgoing_used = 0;
                        t.done();
                        false
                    }
                    ConnectionState::BlockedHandshake => {
                        let mut more = Vec::new();
                        while peer.wants_write() {
                            peer.write_tls(&mut more).unwrap();
                        }
                        assert!(!more.is_empty(), "peer has nothing to send");
                        incoming.drain(..discard);
                        incoming.extend_from_slice(&more);
                        continue;
                    }
                    ConnectionState::WriteTraffic(_) => true,
                    _ => panic!("unexpected state during the handshake"),
                };
                incoming.drain(..discard);
                if done {
                    // The peer finishes on what we sent last (our Finished).
                    peer.process_new_packets().unwrap();
                    break incoming;
                }
            }
        }};
    }

    /// A finished handshake: our client session and the buffered rustls server as the peer.
    fn client_session(c: &Configs) -> (Session, Connection) {
        let mut peer: Connection = rustls::ServerConnection::new(c.server.clone()).unwrap().into();
        let name = ServerName::try_from("ratings").unwrap();
        let mut ours = UnbufferedClientConnection::new(c.client.clone(), name).unwrap();
        let rest = drive!(ours, &mut peer);
        assert!(rest.is_empty());
        let (secrets, kernel) = ours.dangerous_into_kernel_connection().unwrap();
        (Session::new(secrets, Kernel::Client(kernel)).unwrap(), peer)
    }

    /// A finished handshake: our server session and the buffered rustls client as the peer.
    fn server_session(c: &Configs) -> (Session, Connection) {
        let name = ServerName::try_from("ratings").unwrap();
        let mut peer: Connection = rustls::ClientConnection::new(c.client.clone(), name).unwrap().into();
        let mut ours = UnbufferedServerConnection::new(c.server.clone()).unwrap();
        let rest = drive!(ours, &mut peer);
        assert!(rest.is_empty());
        let (secrets, kernel) = ours.dangerous_into_kernel_connection().unwrap();
        (Session::new(secrets, Kernel::Server(kernel)).unwrap(), peer)
    }

    /// Seal `data` in place, as the relay does: plaintext read behind the head room.
    fn seal(s: &mut Session, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in data.chunks(MAX_PLAINTEXT) {
            let mut record = vec![0u8; s.sealed_len(chunk.len())];
            let head = s.head_room();
            record[head..head + chunk.len()].copy_from_slice(chunk);
            s.reserve(1).unwrap();
            out.extend_from_slice(s.control());
            s.clear_control();
            s.seal_data(&mut record).unwrap();
            out.extend_from_slice(&record);
        }
        out
    }

    /// Open every whole record of `wire`: the plaintext, and whether close_notify came.
    fn open_all(s: &mut Session, wire: &mut [u8]) -> Result<(Vec<u8>, bool), Error> {
        let mut plain = Vec::new();
        let mut at = 0;
        while let Some(len) = record_len(&wire[at..])? {
            let record = &mut wire[at..at + len];
            match s.open(record)? {
                Opened::Data(r) => plain.extend_from_slice(&record[r]),
                Opened::Eof => return Ok((plain, true)),
                Opened::Session => {}
            }
            at += len;
        }
        assert_eq!(at, wire.len(), "a partial record left");
        Ok((plain, false))
    }

    /// What the peer sends, as bytes on the wire.
    fn peer_wire(peer: &mut Connection) -> Vec<u8> {
        let mut wire = Vec::new();
        while peer.wants_write() {
            peer.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// Hand `wire` to the peer and read what it decrypted.
    fn peer_reads(peer: &mut Connection, wire: &[u8]) -> Vec<u8> {
        let mut rest = wire;
        let mut plain = Vec::new();
        while !rest.is_empty() {
            peer.read_tls(&mut rest).unwrap();
            peer.process_new_packets().unwrap();
            let mut buf = vec![0; 1 << 16];
            loop {
                match peer.reader().read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => plain.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        plain
    }

    fn pattern(n: usize, salt: u8) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ salt).collect()
    }

    fn all_suites() -> Vec<SupportedCipherSuite> {
        use rustls::crypto::aws_lc_rs::cipher_suite::*;
        vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ]
    }

    #[test]
    fn records_sealed_in_place_are_read_by_rustls_and_rustls_records_open_in_place_every_suite() {
        for suite in all_suites() {
            let c = configs(suite);
            for (mut ours, mut peer) in [client_session(&c), server_session(&c)] {
                // Several records, a partial last one, and an empty one.
                let data = pattern(3 * MAX_PLAINTEXT + 1234, 7);
                assert_eq!(peer_reads(&mut peer, &seal(&mut ours, &data)), data, "{suite:?}");
                let back = pattern(2 * MAX_PLAINTEXT + 99, 3);
                peer.writer().write_all(&back).unwrap();
                peer.writer().write_all(b"").unwrap();
                let mut wire = peer_wire(&mut peer);
                let (plain, eof) = open_all(&mut ours, &mut wire).unwrap();
                assert_eq!(plain, back, "{suite:?}");
                assert!(!eof);
                // seal_append (the copy path of the preamble) is the same protocol.
                let mut out = Vec::new();
                ours.seal_append(b"preamble", &mut out).unwrap();
                assert_eq!(peer_reads(&mut peer, &out), b"preamble");
            }
        }
    }

    /// Records use the AEAD `tls::aead` chose for this CPU: ring's for AES-GCM where it
    /// chose ring, aws-lc-rs' otherwise and always for ChaCha20-Poly1305.
    #[test]
    fn every_suites_keys_come_from_the_aead_chosen_for_this_cpu() {
        use crate::tls::aead::{GcmBackend, RecordKey, gcm_backend};
        for suite in all_suites() {
            let c = configs(suite);
            let gcm = !format!("{:?}", suite.suite()).contains("CHACHA20");
            let want_ring = gcm && gcm_backend() == GcmBackend::Ring;
            for (ours, _) in [client_session(&c), server_session(&c)] {
                for key in [&ours.tx.key, &ours.rx.key] {
                    assert_eq!(matches!(key, RecordKey::Ring(_)), want_ring, "{suite:?}");
                    assert_eq!(key.is_gcm(), gcm, "{suite:?}");
                }
            }
        }
    }

    #[test]
    fn close_notify_is_eof_both_ways() {
        for suite in all_suites() {
            let c = configs(suite);
            let (mut ours, mut peer) = client_session(&c);
            peer.send_close_notify();
            let mut wire = peer_wire(&mut peer);
            assert_eq!(open_all(&mut ours, &mut wire).unwrap(), (Vec::new(), true));
            let mut out = Vec::new();
            ours.seal_close_notify(&mut out).unwrap();
            let mut rest = &out[..];
            peer.read_tls(&mut rest).unwrap();
            let state = peer.process_new_packets().unwrap();
            assert!(state.peer_has_closed(), "{suite:?}");
        }
    }

    #[test]
    fn a_record_that_does_not_open_is_bad_record_mac() {
        for suite in all_suites() {
            let c = configs(suite);
            let (mut ours, mut peer) = server_session(&c);
            peer.writer().write_all(b"hello").unwrap();
            let mut wire = peer_wire(&mut peer);
            let last = wire.len() - 1;
            wire[last] ^= 1;
            let err = open_all(&mut ours, &mut wire).unwrap_err();
            assert!(matches!(err, Error::BadRecordMac), "{suite:?}: {err}");
            assert_eq!(err.alert(), Some(BAD_RECORD_MAC));
        }
    }

    #[test]
    fn record_overflow_on_a_ciphertext_over_two_to_the_fourteen_plus_256() {
        let mut header = [23, 3, 3, 0, 0];
        header[3..].copy_from_slice(&((MAX_CIPHERTEXT + 1) as u16).to_be_bytes());
        assert!(matches!(record_len(&header), Err(Error::RecordOverflow)));
        header[3..].copy_from_slice(&(MAX_CIPHERTEXT as u16).to_be_bytes());
        assert_eq!(record_len(&header).unwrap(), None);
        assert!(matches!(record_len(&[0x80, 0x2e, 1, 3, 1]), Err(Error::Decode)));
        // Sealing more than a record's plaintext is refused.
        let c = configs(all_suites()[0]);
        let (mut ours, _) = client_session(&c);
        let mut record = vec![0; ours.sealed_len(MAX_PLAINTEXT + 1)];
        assert!(matches!(ours.seal_data(&mut record), Err(Error::RecordOverflow)));
    }

    #[test]
    fn a_fatal_alert_from_the_peer_is_an_error() {
        for suite in all_suites() {
            let c = configs(suite);
            let (mut ours, mut peer) = client_session(&c);
            // A record rustls cannot open: it answers with a fatal bad_record_mac alert.
            let mut wire = seal(&mut ours, b"hello");
            let last = wire.len() - 1;
            wire[last] ^= 1;
            let mut rest = &wire[..];
            peer.read_tls(&mut rest).unwrap();
            assert!(peer.process_new_packets().is_err());
            let mut alert = peer_wire(&mut peer);
            let err = open_all(&mut ours, &mut alert).unwrap_err();
            assert!(matches!(err, Error::Alert(BAD_RECORD_MAC)), "{suite:?}: {err}");
            assert_eq!(err.alert(), None, "a peer's alert is not answered");
        }
    }

    #[test]
    fn key_updates_from_rustls_are_followed_and_answered() {
        for suite in all_suites().into_iter().take(3) {
            let c = configs(suite);
            for (mut ours, mut peer) in [client_session(&c), server_session(&c)] {
                peer.writer().write_all(b"old key").unwrap();
                // rustls asks for an update (update_requested) and switches its sending key.
                peer.refresh_traffic_keys().unwrap();
                peer.writer().write_all(b", new key").unwrap();
                let mut wire = peer_wire(&mut peer);
                let (plain, _) = open_all(&mut ours, &mut wire).unwrap();
                assert_eq!(plain, b"old key, new key", "{suite:?}");
                // Our answer waits in `control`, sent before the next data.
                assert!(!ours.control().is_empty());
                let data = pattern(40_000, 1);
                let wire = seal(&mut ours, &data);
                assert_eq!(peer_reads(&mut peer, &wire), data, "{suite:?}");
                assert!(ours.control().is_empty());
            }
        }
    }

    #[test]
    fn our_key_update_is_followed_by_rustls() {
        for suite in all_suites().into_iter().take(3) {
            let c = configs(suite);
            let (mut ours, mut peer) = server_session(&c);
            ours.request_key_update().unwrap();
            let data = pattern(20_000, 9);
            let wire = seal(&mut ours, &data);
            assert_eq!(peer_reads(&mut peer, &wire), data);
            // rustls answers with its own KeyUpdate, then data under its new key.
            peer.writer().write_all(b"after").unwrap();
            let mut wire = peer_wire(&mut peer);
            assert_eq!(open_all(&mut ours, &mut wire).unwrap().0, b"after");
        }
    }

    #[test]
    fn the_confidentiality_limit_brings_a_key_update_before_it() {
        let c = configs(all_suites()[0]);
        let (mut ours, mut peer) = client_session(&c);
        ours.set_limit(5);
        let mut sent = Vec::new();
        let mut wire = Vec::new();
        for i in 0..12u8 {
            let data = pattern(1000, i);
            wire.extend(seal(&mut ours, &data));
            sent.extend(data);
        }
        assert_eq!(peer_reads(&mut peer, &wire), sent);
        // TLS 1.2 has no key update: the session ends instead.
        let c = configs(all_suites()[3]);
        let (mut ours, _) = client_session(&c);
        ours.set_limit(3);
        ours.reserve(1).unwrap();
        assert!(matches!(ours.reserve(3), Err(Error::Limit)));
    }

    #[test]
    fn session_tickets_reach_rustls_and_the_next_connection_resumes() {
        let c = configs(all_suites()[0]);
        let (mut ours, mut peer) = client_session(&c);
        // The server's tickets went out after its Finished; our client did not see them yet.
        let mut tickets = peer_wire(&mut peer);
        assert!(!tickets.is_empty());
        let (plain, _) = open_all(&mut ours, &mut tickets).unwrap();
        assert!(plain.is_empty());
        // A new connection with the same client config resumes from the stored ticket.
        let mut peer: Connection = rustls::ServerConnection::new(c.server.clone()).unwrap().into();
        let name = ServerName::try_from("ratings").unwrap();
        let mut next = UnbufferedClientConnection::new(c.client.clone(), name).unwrap();
        drive!(next, &mut peer);
        assert_eq!(peer.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    }

    #[test]
    fn a_handshake_message_split_over_records_is_joined() {
        let c = configs(all_suites()[0]);
        let (mut ours, mut peer) = client_session(&c);
        let mut tickets = peer_wire(&mut peer);
        let (_, _) = open_all(&mut ours, &mut tickets).unwrap();
        // A KeyUpdate split into two records of one and four bytes, sealed by a session with
        // the peer's keys is not at hand: check the joining on the message level instead.
        assert_eq!(ours.handshake(&[KEY_UPDATE, 0]).unwrap(), None);
        assert_eq!(ours.partial.len(), 2);
        assert_eq!(ours.handshake(&[0, 1, 0]).unwrap(), Some(true));
        assert!(ours.partial.is_empty());
        // A message that is not allowed after the handshake.
        assert!(matches!(ours.handshake(&[1, 0, 0, 0]), Err(Error::UnexpectedMessage)));
        assert!(matches!(ours.handshake(&[KEY_UPDATE, 0, 0, 1, 2]), Err(Error::IllegalParameter)));
    }
}
