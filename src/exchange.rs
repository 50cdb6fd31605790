//! istio-peer-exchange codec (SPEC §2): [`encode`] a node's metadata into the preamble it sends,
//! and an incremental [`Parser`] that reads the peer's preamble from byte slices of any size.
//!
//! No I/O, no clocks, no allocation per feed beyond the one payload buffer: the relay owns the
//! sockets and the timeouts, this module owns the bytes. Peer bytes are hostile, so nothing here
//! panics on them (no `unwrap`, no indexing, no unchecked arithmetic on peer values).
//!
//! Wire format (documented in `proto/peer_exchange.proto`): a big-endian `u32` [`MAGIC`], a
//! big-endian `u32` payload length `N`, then `N` bytes of `google.protobuf.Any` wrapping a
//! `google.protobuf.Struct` with the keys `x-envoy-peer-metadata` and `x-envoy-peer-metadata-id`.
//!
//! The payload is made only of protobuf well-known types, so we use the ready-made messages of
//! `prost-types` instead of generating code from a `.proto` at build time: no `protoc`, no build
//! script, nothing generated to keep in sync. `prost-types` keeps `Struct` fields in a `BTreeMap`,
//! so encoding is deterministic (keys sorted), byte for byte what Google's protobuf writes with
//! deterministic serialization (checked in `tests/exchange_interop.rs`).

use std::collections::BTreeMap;
use std::rc::Rc;

use prost::Message;
use prost_types::{Any, Struct, Value, value::Kind};

/// Magic number that opens every preamble (`0x3D230467`, Istio's `MetadataExchangeInitialHeader`).
pub const MAGIC: u32 = 0x3D23_0467;

/// Size of the preamble header: the magic and a big-endian `u32` payload length.
pub const HEADER_LEN: usize = 8;

/// Type URL the payload's `Any` must carry.
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";
/// Struct key holding the node metadata fields.
const METADATA_KEY: &str = "x-envoy-peer-metadata";
/// Struct key holding the node id.
const METADATA_ID_KEY: &str = "x-envoy-peer-metadata-id";
/// Longest type URL quoted back in [`Invalid::WrongTypeUrl`]; the rest is peer noise.
const MAX_QUOTED_TYPE_URL: usize = 128;

/// The magic's wire bytes; a `static` so that [`Parser::held_prefix`] can lend a prefix of it.
static MAGIC_BYTES: [u8; 4] = MAGIC.to_be_bytes();

/// Node metadata of one side. Empty string = absent (the reader requires none of the fields).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeMetadata {
    /// Node id, sent as `x-envoy-peer-metadata-id`.
    pub id: String,
    /// Pod name, `NAME`.
    pub name: String,
    /// Namespace, `NAMESPACE`.
    pub namespace: String,
    /// Owner reference, `OWNER` (`kubernetes://apis/apps/v1/namespaces/<ns>/deployments/<w>`).
    pub owner: String,
    /// Workload name, `WORKLOAD_NAME`.
    pub workload_name: String,
    /// Cluster id, `CLUSTER_ID`.
    pub cluster_id: String,
    /// Mesh id, `MESH_ID`.
    pub mesh_id: String,
    /// Service account, `SERVICE_ACCOUNT`.
    pub service_account: String,
    /// Istio version, `ISTIO_VERSION`.
    pub istio_version: String,
    /// Pod labels, `LABELS` (string values only).
    pub labels: BTreeMap<String, String>,
    /// Read from a peer: how many of its values (and label keys) were longer than
    /// [`MAX_PEER_VALUE`] and were replaced (values by `unknown`; such labels left out).
    pub overlong_values: u32,
}

/// Longest value (and label key) taken from a peer's metadata (SPEC §11): a peer cannot make
/// every label set it causes cost more than this per value. A longer one is replaced by
/// `unknown` (a label with a longer key is left out) and counted.
pub const MAX_PEER_VALUE: usize = 256;

/// Why a peer's preamble is broken; the caller closes the connection (SPEC §2).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// The announced payload is larger than the configured max preamble size.
    #[error("preamble length {length} exceeds max preamble {max}")]
    TooLarge {
        /// Payload length the peer announced.
        length: u32,
        /// Configured max preamble size.
        max: usize,
    },
    /// The payload is not a protobuf `Any` wrapping a decodable `Struct`.
    #[error("preamble payload does not decode")]
    Undecodable,
    /// The `Any` does not wrap a `google.protobuf.Struct`.
    #[error("preamble type url {0:?} is not google.protobuf.Struct")]
    WrongTypeUrl(String),
    /// `x-envoy-peer-metadata` is present but is not a struct.
    #[error("preamble x-envoy-peer-metadata is not a struct")]
    NotAStruct,
    /// `feed` was called again after the parser returned a final status.
    #[error("preamble parser fed after it finished")]
    Finished,
}

/// What one [`Parser::feed`] found.
#[derive(Debug)]
pub enum Status {
    /// Every byte of the input was absorbed; feed more.
    NeedMore,
    /// `input[..consumed]` was preamble; `input[consumed..]` is application data.
    Done {
        /// The peer's node metadata (shared with [`Peers`] when the parser has one).
        peer: Rc<NodeMetadata>,
        /// Bytes of this input that belonged to the preamble.
        consumed: usize,
    },
    /// Magic mismatch: this input is application data, untouched (forward
    /// [`Parser::held_prefix`] first).
    NotPresent,
    /// Broken preamble: the caller closes the connection.
    Invalid(Invalid),
}

/// Encode a whole preamble (header + Any payload). Done once at start-up per node.
///
/// The writer always sends NAME, NAMESPACE, WORKLOAD_NAME, CLUSTER_ID, OWNER and LABELS (as
/// given, even when empty, as Istio's proxy does) and MESH_ID, SERVICE_ACCOUNT, ISTIO_VERSION
/// only when non-empty. The caller keeps the metadata under its max preamble size.
///
/// The bytes are those of Google's protobuf deterministic serialization (C++, as in Istio's
/// proxy, and Python), except for an empty label key: prost leaves a map entry's default key
/// off the wire where Google's writes `0a 00`. Both read back the same; Kubernetes label keys
/// are never empty.
pub fn encode(node: &NodeMetadata) -> Vec<u8> {
    let mut fields = BTreeMap::new();
    for (key, value) in [
        ("NAME", &node.name),
        ("NAMESPACE", &node.namespace),
        ("WORKLOAD_NAME", &node.workload_name),
        ("CLUSTER_ID", &node.cluster_id),
        ("OWNER", &node.owner),
    ] {
        fields.insert(key.to_owned(), string_value(value));
    }
    for (key, value) in [
        ("MESH_ID", &node.mesh_id),
        ("SERVICE_ACCOUNT", &node.service_account),
        ("ISTIO_VERSION", &node.istio_version),
    ] {
        if !value.is_empty() {
            fields.insert(key.to_owned(), string_value(value));
        }
    }
    let labels = node.labels.iter().map(|(key, value)| (key.clone(), string_value(value))).collect();
    fields.insert("LABELS".to_owned(), struct_value(Struct { fields: labels }));

    let mut top = BTreeMap::new();
    top.insert(METADATA_KEY.to_owned(), struct_value(Struct { fields }));
    top.insert(METADATA_ID_KEY.to_owned(), string_value(&node.id));
    let any = Any { type_url: STRUCT_TYPE_URL.to_owned(), value: Struct { fields: top }.encode_to_vec() };

    let payload_len = any.encoded_len();
    let mut preamble = Vec::with_capacity(HEADER_LEN.saturating_add(payload_len));
    preamble.extend_from_slice(&MAGIC_BYTES);
    // Our own metadata is a few hundred bytes; saturating only matters for a 4 GiB config,
    // which every peer rejects as too large rather than misreading.
    preamble.extend_from_slice(&u32::try_from(payload_len).unwrap_or(u32::MAX).to_be_bytes());
    any.encode_raw(&mut preamble);
    preamble
}

/// Decode an Any payload (without header) into node metadata.
///
/// Unknown keys are ignored and a field holding something other than a string counts as absent,
/// as Istio's proxy reads it; only a payload that is not an `Any(Struct)`, or whose
/// `x-envoy-peer-metadata` is not a struct, is [`Invalid`].
pub fn decode_payload(payload: &[u8]) -> Result<NodeMetadata, Invalid> {
    let any = Any::decode(payload).map_err(|_| Invalid::Undecodable)?;
    if any.type_url != STRUCT_TYPE_URL {
        return Err(Invalid::WrongTypeUrl(quote(&any.type_url)));
    }
    let mut top = Struct::decode(any.value.as_slice()).map_err(|_| Invalid::Undecodable)?;

    let mut node =
        NodeMetadata { id: take_string(&mut top.fields, METADATA_ID_KEY), ..NodeMetadata::default() };
    let mut fields = match top.fields.remove(METADATA_KEY).and_then(|value| value.kind) {
        None => return Ok(node),
        Some(Kind::StructValue(fields)) => fields.fields,
        Some(_) => return Err(Invalid::NotAStruct),
    };
    node.name = take_string(&mut fields, "NAME");
    node.namespace = take_string(&mut fields, "NAMESPACE");
    node.owner = take_string(&mut fields, "OWNER");
    node.workload_name = take_string(&mut fields, "WORKLOAD_NAME");
    node.cluster_id = take_string(&mut fields, "CLUSTER_ID");
    node.mesh_id = take_string(&mut fields, "MESH_ID");
    node.service_account = take_string(&mut fields, "SERVICE_ACCOUNT");
    node.istio_version = take_string(&mut fields, "ISTIO_VERSION");
    if let Some(Kind::StructValue(labels)) = fields.remove("LABELS").and_then(|value| value.kind) {
        node.labels = labels
            .fields
            .into_iter()
            .filter_map(|(key, value)| match value.kind {
                Some(Kind::StringValue(value)) => Some((key, value)),
                _ => None,
            })
            .collect();
    }
    bound_values(&mut node);
    Ok(node)
}

/// Replace every value over [`MAX_PEER_VALUE`] bytes by `unknown`, leave out labels whose key
/// is over it, and count both (SPEC §11).
fn bound_values(node: &mut NodeMetadata) {
    let mut overlong = 0u32;
    let mut bound = |value: &mut String| {
        if value.len() > MAX_PEER_VALUE {
            *value = "unknown".to_owned();
            overlong = overlong.saturating_add(1);
        }
    };
    for value in [
        &mut node.id,
        &mut node.name,
        &mut node.namespace,
        &mut node.owner,
        &mut node.workload_name,
        &mut node.cluster_id,
        &mut node.mesh_id,
        &mut node.service_account,
        &mut node.istio_version,
    ] {
        bound(value);
    }
    node.labels.values_mut().for_each(&mut bound);
    let before = node.labels.len();
    node.labels.retain(|key, _| key.len() <= MAX_PEER_VALUE);
    let dropped = u32::try_from(before - node.labels.len()).unwrap_or(u32::MAX);
    node.overlong_values = overlong.saturating_add(dropped);
}

/// Where the parser is in the preamble.
#[derive(Debug)]
enum State {
    /// Comparing the magic; `matched` bytes (0..=3) matched so far.
    Magic { matched: usize },
    /// Reading the length; `read` bytes (0..=3) of it are in `length`.
    Length { read: usize, length: u32 },
    /// Accumulating a `length`-byte payload into the buffer.
    Payload { length: usize },
    /// Returned `NotPresent`; earlier feeds had absorbed `held` bytes of the magic.
    NotPresent { held: usize },
    /// Returned `Done` or `Invalid`.
    Finished,
}

/// The peers a worker's exchanges heard from last, decoded once (`crate::recent`): at most
/// 16 payloads of at most 8 KiB (a sidecar's is a few hundred bytes to a few KiB).
pub type Peers = crate::recent::Recent<Rc<NodeMetadata>, 16, { 8 * 1024 }>;

/// Incremental reader of a peer's preamble, fed the bytes of one direction as they arrive.
#[derive(Debug)]
pub struct Parser<'p> {
    state: State,
    max_preamble: usize,
    buffer: Vec<u8>,
    begun: bool,
    peers: Option<&'p Peers>,
}

impl Parser<'static> {
    /// Create a parser that rejects payloads larger than `max_preamble` bytes.
    pub fn new(max_preamble: usize) -> Self {
        Self::with_buffer(max_preamble, Vec::new())
    }

    /// Reuse a payload buffer from the worker's pool (cleared, capacity kept).
    pub fn with_buffer(max_preamble: usize, mut buffer: Vec<u8>) -> Self {
        buffer.clear();
        Parser { state: State::Magic { matched: 0 }, max_preamble, buffer, begun: false, peers: None }
    }
}

impl<'p> Parser<'p> {
    /// `with_buffer`, the peer's metadata taken from (and kept in) the worker's `peers`.
    pub fn with_peers(max_preamble: usize, buffer: Vec<u8>, peers: &'p Peers) -> Self {
        Parser { peers: Some(peers), ..Parser::with_buffer(max_preamble, buffer) }
    }

    fn decode(&self, payload: &[u8]) -> Result<Rc<NodeMetadata>, Invalid> {
        match self.peers {
            Some(peers) => peers.get_or_make(payload, || decode_payload(payload).map(Rc::new)),
            None => decode_payload(payload).map(Rc::new),
        }
    }

    /// Feed bytes never fed before, any size (including 1 byte at a time).
    pub fn feed(&mut self, input: &[u8]) -> Status {
        let mut rest = input;
        loop {
            match self.state {
                State::Magic { matched } => {
                    // Compare the magic byte by byte instead of waiting for all 8 header bytes
                    // (as Istio's filter does): a non-mesh client that sends 1-3 bytes and waits
                    // must get NotPresent as soon as a byte differs, not stall (SPEC §2).
                    let expected = MAGIC_BYTES.get(matched..).unwrap_or_default();
                    let common = expected.iter().zip(rest).take_while(|(want, got)| want == got).count();
                    if common > 0 {
                        self.begun = true;
                    }
                    if common < expected.len() && common < rest.len() {
                        // Bytes absorbed by earlier feeds are handed back via held_prefix;
                        // this input is untouched.
                        self.state = State::NotPresent { held: matched };
                        return Status::NotPresent;
                    }
                    rest = rest.get(common..).unwrap_or_default();
                    let matched = matched.saturating_add(common);
                    if matched < MAGIC_BYTES.len() {
                        self.state = State::Magic { matched };
                        return Status::NeedMore;
                    }
                    // From here on the stream is committed to being a preamble.
                    self.state = State::Length { read: 0, length: 0 };
                }
                State::Length { mut read, mut length } => {
                    while read < 4 {
                        let Some((&byte, tail)) = rest.split_first() else {
                            self.state = State::Length { read, length };
                            return Status::NeedMore;
                        };
                        length = (length << 8) | u32::from(byte);
                        read = read.saturating_add(1);
                        rest = tail;
                    }
                    // Refuse before buffering anything: the peer's length never sizes an
                    // allocation beyond max_preamble.
                    let Some(length_usize) =
                        usize::try_from(length).ok().filter(|&length| length <= self.max_preamble)
                    else {
                        return self.fail(Invalid::TooLarge { length, max: self.max_preamble });
                    };
                    self.state = State::Payload { length: length_usize };
                    if let Some(payload) = rest.get(..length_usize) {
                        // Whole payload in this input: decode in place, no copy.
                        return self.finish(self.decode(payload), input, rest, length_usize);
                    }
                    // The buffer is empty here (cleared on construction and after each decode),
                    // so this reserves exactly the payload and each byte is copied once.
                    self.buffer.reserve_exact(length_usize);
                }
                State::Payload { length } => {
                    let missing = length.saturating_sub(self.buffer.len());
                    let take = missing.min(rest.len());
                    let (chunk, _) = rest.split_at(take);
                    self.buffer.extend_from_slice(chunk);
                    if take < missing {
                        return Status::NeedMore;
                    }
                    let result = self.decode(&self.buffer);
                    self.buffer.clear();
                    return self.finish(result, input, rest, take);
                }
                State::NotPresent { .. } | State::Finished => {
                    return self.fail(Invalid::Finished);
                }
            }
        }
    }

    /// After NotPresent: the bytes of the magic that earlier feeds absorbed (returned NeedMore
    /// for); the caller forwards these first, then the whole input. Always a prefix of MAGIC's
    /// big-endian bytes, at most 3 bytes.
    ///
    /// While still comparing the magic it is the part absorbed so far; once the magic matched,
    /// those bytes are preamble and this is empty.
    pub fn held_prefix(&self) -> &'static [u8] {
        let held = match self.state {
            State::Magic { matched } => matched,
            State::NotPresent { held } => held,
            State::Length { .. } | State::Payload { .. } | State::Finished => 0,
        };
        MAGIC_BYTES.get(..held).unwrap_or_default()
    }

    /// True once at least one byte matched the magic (the exchange timeout applies from then).
    pub fn begun(&self) -> bool {
        self.begun
    }

    /// Give the payload buffer back to the pool.
    pub fn into_buffer(mut self) -> Vec<u8> {
        self.buffer.clear();
        self.buffer
    }

    /// End the exchange with `result`; the payload ends `taken` bytes into `rest`, a tail of
    /// `input`.
    fn finish(
        &mut self,
        result: Result<Rc<NodeMetadata>, Invalid>,
        input: &[u8],
        rest: &[u8],
        taken: usize,
    ) -> Status {
        match result {
            Ok(peer) => {
                self.state = State::Finished;
                let consumed = input.len().saturating_sub(rest.len()).saturating_add(taken);
                Status::Done { peer, consumed }
            }
            Err(invalid) => self.fail(invalid),
        }
    }

    /// End the exchange as broken.
    fn fail(&mut self, invalid: Invalid) -> Status {
        self.state = State::Finished;
        Status::Invalid(invalid)
    }
}

/// Remove `key` from `fields` and return its string, or "" when absent or not a string.
fn take_string(fields: &mut BTreeMap<String, Value>, key: &str) -> String {
    match fields.remove(key).and_then(|value| value.kind) {
        Some(Kind::StringValue(value)) => value,
        _ => String::new(),
    }
}

/// Quote at most [`MAX_QUOTED_TYPE_URL`] bytes of a peer's type URL, on a char boundary.
fn quote(type_url: &str) -> String {
    let mut end = type_url.len().min(MAX_QUOTED_TYPE_URL);
    while !type_url.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    type_url.get(..end).unwrap_or_default().to_owned()
}

fn string_value(value: &str) -> Value {
    Value { kind: Some(Kind::StringValue(value.to_owned())) }
}

fn struct_value(value: Struct) -> Value {
    Value { kind: Some(Kind::StructValue(value)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sidecar's metadata as Istio's agent fills it: every field set, six pod labels.
    fn sidecar(workload: &str, app: &str, cluster: &str, mesh: &str, role: &str) -> NodeMetadata {
        let pod = format!("{workload}-7d4b9c6f5-q8v2m");
        let labels = [
            ("app", app),
            ("version", "v1"),
            ("pod-template-hash", "7d4b9c6f5"),
            ("service.istio.io/canonical-name", app),
            ("service.istio.io/canonical-revision", "v1"),
            ("role", role),
        ];
        NodeMetadata {
            id: format!("sidecar~10.8.3.21~{pod}.default~default.svc.cluster.local"),
            owner: format!("kubernetes://apis/apps/v1/namespaces/default/deployments/{workload}"),
            name: pod,
            namespace: "default".into(),
            workload_name: workload.into(),
            cluster_id: cluster.into(),
            mesh_id: mesh.into(),
            service_account: app.into(),
            istio_version: "1.27.1".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            overlong_values: 0,
        }
    }

    fn client_node() -> NodeMetadata {
        sidecar("productpage-v1", "productpage", "east", "mesh-a", "client")
    }

    fn server_node() -> NodeMetadata {
        sidecar("ratings-v1", "ratings", "west", "mesh-b", "server")
    }

    fn parse_whole(preamble: &[u8]) -> NodeMetadata {
        match Parser::new(64 * 1024).feed(preamble) {
            Status::Done { peer, consumed } => {
                assert_eq!(consumed, preamble.len());
                Rc::unwrap_or_clone(peer)
            }
            other => panic!("expected Done, got {other:?}"),
        }
    }

    #[test]
    fn encoded_preamble_is_magic_then_big_endian_length_then_payload() {
        let preamble = encode(&client_node());
        assert_eq!(&preamble[..4], &[0x3D, 0x23, 0x04, 0x67]);
        let length = u32::from_be_bytes(preamble[4..8].try_into().unwrap()) as usize;
        assert_eq!(preamble.len(), HEADER_LEN + length);
    }

    #[test]
    fn a_preamble_fed_byte_by_byte_reads_back_the_metadata_it_was_encoded_from() {
        let node = server_node();
        let preamble = encode(&node);
        let mut parser = Parser::new(64 * 1024);
        let (last, head) = preamble.split_last().unwrap();
        for byte in head {
            assert!(matches!(parser.feed(std::slice::from_ref(byte)), Status::NeedMore));
        }
        match parser.feed(&[*last, b'x']) {
            Status::Done { peer, consumed } => {
                assert_eq!(*peer, node);
                assert_eq!(consumed, 1);
            }
            other => panic!("expected Done, got {other:?}"),
        }
    }

    #[test]
    fn a_full_istio_node_metadata_survives_encode_and_decode() {
        for node in [client_node(), server_node()] {
            assert!(!node.workload_name.is_empty());
            assert_eq!(node.labels.len(), 6);
            assert_eq!(parse_whole(&encode(&node)), node);
        }
        assert_eq!(parse_whole(&encode(&client_node())).labels["role"], "client");
        assert_eq!(parse_whole(&encode(&server_node())).mesh_id, "mesh-b");
    }

    #[test]
    fn the_writer_sends_optional_fields_only_when_non_empty() {
        let node = NodeMetadata { id: "id".into(), ..NodeMetadata::default() };
        let payload = &encode(&node)[HEADER_LEN..];
        let any = Any::decode(payload).unwrap();
        let top = Struct::decode(any.value.as_slice()).unwrap();
        let Some(Kind::StructValue(fields)) = &top.fields[METADATA_KEY].kind else {
            panic!("metadata is not a struct");
        };
        let keys: Vec<&str> = fields.fields.keys().map(String::as_str).collect();
        assert_eq!(keys, ["CLUSTER_ID", "LABELS", "NAME", "NAMESPACE", "OWNER", "WORKLOAD_NAME"]);
    }

    #[test]
    fn a_peers_overlong_values_are_replaced_and_its_overlong_label_keys_left_out_and_counted() {
        let long = "x".repeat(MAX_PEER_VALUE + 1);
        let fit = "y".repeat(MAX_PEER_VALUE);
        let mut node = client_node();
        node.workload_name = long.clone();
        node.namespace = fit.clone();
        node.labels.insert("app".into(), long.clone());
        node.labels.insert(long.clone(), "v".into());
        let got = parse_whole(&encode(&node));
        assert_eq!(got.workload_name, "unknown");
        assert_eq!(got.namespace, fit, "exactly the bound is kept");
        assert_eq!(got.labels.get("app").map(String::as_str), Some("unknown"));
        assert!(!got.labels.contains_key(&long));
        assert_eq!(got.overlong_values, 3);
        assert_eq!(parse_whole(&encode(&client_node())).overlong_values, 0);
    }

    #[test]
    fn unknown_keys_are_ignored_and_non_string_values_are_absent() {
        let mut fields = BTreeMap::new();
        fields.insert("NAME".to_owned(), Value { kind: Some(Kind::NumberValue(1.0)) });
        fields.insert("NAMESPACE".to_owned(), string_value("default"));
        fields.insert("PLATFORM_METADATA".to_owned(), struct_value(Struct::default()));
        let mut labels = BTreeMap::new();
        labels.insert("app".to_owned(), string_value("ratings"));
        labels.insert("replicas".to_owned(), Value { kind: Some(Kind::BoolValue(true)) });
        fields.insert("LABELS".to_owned(), struct_value(Struct { fields: labels }));
        let mut top = BTreeMap::new();
        top.insert(METADATA_KEY.to_owned(), struct_value(Struct { fields }));
        top.insert(METADATA_ID_KEY.to_owned(), Value { kind: Some(Kind::NullValue(0)) });
        let payload =
            Any { type_url: STRUCT_TYPE_URL.to_owned(), value: Struct { fields: top }.encode_to_vec() }
                .encode_to_vec();

        let node = decode_payload(&payload).unwrap();

        let mut expected = NodeMetadata { namespace: "default".into(), ..NodeMetadata::default() };
        expected.labels.insert("app".into(), "ratings".into());
        assert_eq!(node, expected);
    }

    #[test]
    fn a_payload_that_is_not_an_any_of_a_struct_is_invalid() {
        let wrong_url =
            Any { type_url: "type.googleapis.com/google.protobuf.StringValue".into(), value: Vec::new() }
                .encode_to_vec();
        assert_eq!(
            decode_payload(&wrong_url),
            Err(Invalid::WrongTypeUrl("type.googleapis.com/google.protobuf.StringValue".into()))
        );
        assert_eq!(decode_payload(&[0xFF, 0xFF]), Err(Invalid::Undecodable));
        let mut top = BTreeMap::new();
        top.insert(METADATA_KEY.to_owned(), string_value("not a struct"));
        let not_a_struct =
            Any { type_url: STRUCT_TYPE_URL.into(), value: Struct { fields: top }.encode_to_vec() }
                .encode_to_vec();
        assert_eq!(decode_payload(&not_a_struct), Err(Invalid::NotAStruct));
    }

    #[test]
    fn a_long_type_url_is_quoted_short() {
        let payload = Any { type_url: "é".repeat(1000), value: Vec::new() }.encode_to_vec();
        let Err(Invalid::WrongTypeUrl(quoted)) = decode_payload(&payload) else {
            panic!("expected WrongTypeUrl");
        };
        assert_eq!(quoted, "é".repeat(MAX_QUOTED_TYPE_URL / 2));
    }

    #[test]
    fn the_payload_buffer_grows_to_the_announced_length_only_and_goes_back_cleared() {
        let preamble = encode(&client_node());
        let length = preamble.len() - HEADER_LEN;
        let mut parser = Parser::with_buffer(64 * 1024, b"stale".to_vec());
        assert!(matches!(parser.feed(&preamble[..HEADER_LEN + 1]), Status::NeedMore));
        assert_eq!(parser.buffer.len(), 1);
        assert!(parser.buffer.capacity() >= length && parser.buffer.capacity() < 2 * length);
        assert!(matches!(parser.feed(&preamble[HEADER_LEN + 1..]), Status::Done { .. }));
        let buffer = parser.into_buffer();
        assert!(buffer.is_empty() && buffer.capacity() >= length);
    }

    /// Parse a whole preamble with `peers`.
    fn parse_known(peers: &Peers, preamble: &[u8]) -> Result<Rc<NodeMetadata>, Invalid> {
        match Parser::with_peers(64 * 1024, Vec::new(), peers).feed(preamble) {
            Status::Done { peer, .. } => Ok(peer),
            Status::Invalid(invalid) => Err(invalid),
            other => panic!("expected Done or Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_peers_same_bytes_are_decoded_once_and_other_bytes_are_another_peer() {
        let peers = Peers::default();
        let (client, server) = (encode(&client_node()), encode(&server_node()));
        let first = parse_known(&peers, &client).unwrap();
        let again = parse_known(&peers, &client).unwrap();
        assert!(Rc::ptr_eq(&first, &again), "the second exchange decoded again");
        assert_eq!(*first, client_node());
        let other = parse_known(&peers, &server).unwrap();
        assert_eq!(*other, server_node());
        // A split preamble (gathered in the parser's buffer) finds the same entry.
        let mut parser = Parser::with_peers(64 * 1024, Vec::new(), &peers);
        assert!(matches!(parser.feed(&client[..HEADER_LEN + 3]), Status::NeedMore));
        let Status::Done { peer, .. } = parser.feed(&client[HEADER_LEN + 3..]) else { panic!("not done") };
        assert!(Rc::ptr_eq(&first, &peer));
    }

    #[test]
    fn peers_never_keeps_a_broken_or_oversized_payload() {
        let peers = Peers::default();
        let mut big = client_node();
        for i in 0..(8 * 1024 / MAX_PEER_VALUE + 1) {
            big.labels.insert(format!("note{i}"), "x".repeat(MAX_PEER_VALUE));
        }
        let preamble = encode(&big);
        assert!(preamble.len() > HEADER_LEN + 8 * 1024);
        assert_eq!(*parse_known(&peers, &preamble).unwrap(), big);
        let mut broken = encode(&client_node());
        broken[HEADER_LEN..].iter_mut().take(2).for_each(|b| *b = 0xFF);
        assert_eq!(parse_known(&peers, &broken), Err(Invalid::Undecodable));
        assert!(peers.is_empty(), "an oversized or broken payload was kept");
    }
}
