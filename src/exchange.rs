//! istio-peer-exchange codec (placeholder: the real module is written in another worktree; only
//! the node metadata type that `metrics` needs lives here until it is merged).

/// One node's Istio metadata as carried by the peer-exchange preamble; an empty string is absent.
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
    pub labels: std::collections::BTreeMap<String, String>,
}
