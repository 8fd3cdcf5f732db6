//! What a node sees of a source's leases in the lake (Kinesis shards shared by the
//! nodes of a cluster): the types the lease store (`sinks`) and the sources that lease
//! (`ingest`) exchange. ARCHITECTURE.md, "Kinesis shards leased through the lake".

use std::collections::BTreeMap;

/// The newest lease object of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    /// Its epoch: each renewal, take-over or release creates the next one.
    #[serde(skip)]
    pub epoch: u64,
    /// The node holding it; `""` when released.
    pub owner: String,
    /// A checkpoint covers the shard's end: nobody needs to read it again.
    #[serde(default)]
    pub finished: bool,
}

/// One listing of a source's leases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseScan {
    /// Shard → its newest lease.
    pub shards: BTreeMap<String, Lease>,
    /// Node → a tag that changes each time the node says it is alive.
    pub members: BTreeMap<String, String>,
}
