//! TEMPORARY stub of the metrics module; replaced by the real module.
use crate::exchange::NodeMetadata;
use std::collections::BTreeMap;
use std::sync::Arc;
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}
pub fn with_canonical_labels(node: NodeMetadata) -> NodeMetadata {
    node
}
#[derive(Clone, Debug, Default)]
pub struct ServiceInfo {
    pub host: String,
    pub namespace: String,
}
pub struct ConnLabels<'a> {
    pub reporter: Reporter,
    pub local: &'a NodeMetadata,
    pub peer: Option<&'a NodeMetadata>,
    pub endpoint_labels: Option<&'a BTreeMap<String, String>>,
    pub service: &'a ServiceInfo,
    pub response_flags: &'a str,
    pub local_principal: Option<&'a str>,
    pub peer_principal: Option<&'a str>,
    pub mutual_tls: bool,
}
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LabelSet(Arc<[Box<str>]>);
pub fn label_set(c: &ConnLabels) -> LabelSet {
    LabelSet(vec![c.response_flags.into()].into())
}
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub opened: u64,
    pub closed: u64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
}
pub struct Shard;
pub struct ShardWriter;
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesId(u32);
pub struct LabelBudget;
impl LabelBudget {
    pub fn new(_m: usize) -> Arc<Self> {
        Arc::new(LabelBudget)
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeOutcome {
    AlpnProtocolFound,
    AlpnProtocolNotFound,
    InitialHeaderNotFound,
    HeaderNotFound,
    MetadataAdded,
    Invalid,
    Timeout,
}
impl ShardWriter {
    pub fn new(_w: usize, _b: Arc<LabelBudget>) -> (ShardWriter, Arc<Shard>) {
        (ShardWriter, Arc::new(Shard))
    }
    pub fn intern(&mut self, _l: LabelSet) -> SeriesId {
        SeriesId(0)
    }
    pub fn fold(&self, _id: SeriesId, _d: Delta) {}
    pub fn set_active_connections(&self, _n: u64) {}
    pub fn count_exchange(&self, _o: ExchangeOutcome) {}
}
pub fn render(_s: &[Arc<Shard>], _driver: &str) -> String {
    String::new()
}
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";
