//! TEMPORARY stub of the istio-peer-exchange codec; replaced by the real module.
use std::collections::BTreeMap;
pub const MAGIC: u32 = 0x3D23_0467;
pub const HEADER_LEN: usize = 8;
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeMetadata {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub owner: String,
    pub workload_name: String,
    pub cluster_id: String,
    pub mesh_id: String,
    pub service_account: String,
    pub istio_version: String,
    pub labels: BTreeMap<String, String>,
}
pub fn encode(_node: &NodeMetadata) -> Vec<u8> {
    let mut v = MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&0u32.to_be_bytes());
    v
}
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Invalid {
    #[error("bad")]
    Bad,
}
#[derive(Debug)]
pub enum Status {
    NeedMore,
    Done { peer: NodeMetadata, consumed: usize },
    NotPresent,
    Invalid(Invalid),
}
pub struct Parser {
    buf: Vec<u8>,
    seen: usize,
}
impl Parser {
    pub fn new(max: usize) -> Self {
        Self::with_buffer(max, Vec::new())
    }
    pub fn with_buffer(_max: usize, buf: Vec<u8>) -> Self {
        Parser { buf, seen: 0 }
    }
    pub fn feed(&mut self, input: &[u8]) -> Status {
        let magic = MAGIC.to_be_bytes();
        for (i, b) in input.iter().enumerate() {
            if self.seen < 4 {
                if *b != magic[self.seen] {
                    return Status::NotPresent;
                }
            }
            self.seen += 1;
            if self.seen == 8 {
                return Status::Done {
                    peer: NodeMetadata::default(),
                    consumed: i + 1,
                };
            }
        }
        Status::NeedMore
    }
    pub fn held_prefix(&self) -> &'static [u8] {
        const M: [u8; 4] = MAGIC.to_be_bytes();
        &M[..self.seen.min(3)]
    }
    pub fn begun(&self) -> bool {
        self.seen > 0
    }
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}
