//! Which group keys a window already holds, for the window-state budget: while over
//! it, a window takes rows only of keys it holds (see [`super::Window::refuse`]).
//!
//! A pane keeps the 64-bit hashes of its keys beside its `GroupValues`, which has no
//! lookup that does not insert. Hashing is DataFusion's vectorized row hashing, seeded
//! per process, so device-chosen keys cannot be made to collide with held ones.

use std::collections::HashSet;

use arrow::array::ArrayRef;
use datafusion::common::hash_utils::{RandomState, create_hashes};

use super::aggregate::internal;
use crate::Result;

/// Hashes the group-key rows of a window.
#[derive(Debug, Clone)]
pub(crate) struct KeyHashes(RandomState);

impl KeyHashes {
    pub(crate) fn new() -> Self {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64);
        Self(RandomState::with_seed(seed))
    }

    /// One hash per row of the group columns `groups` (`rows` of them; a window
    /// without `group_by` has one key, hash 0).
    pub(crate) fn hash(&self, groups: &[ArrayRef], rows: usize) -> Result<Vec<u64>> {
        let mut hashes = vec![0; rows];
        if !groups.is_empty() {
            create_hashes(groups, &self.0, &mut hashes).map_err(|e| internal(e.to_string()))?;
        }
        Ok(hashes)
    }
}

/// A pane's key hashes.
#[derive(Debug, Default)]
pub(crate) struct KeySet(HashSet<u64, foldhash::fast::RandomState>);

impl KeySet {
    pub(crate) fn extend(&mut self, hashes: impl IntoIterator<Item = u64>) {
        self.0.extend(hashes);
    }

    pub(crate) fn contains(&self, hash: u64) -> bool {
        self.0.contains(&hash)
    }

    /// Approximate heap bytes (a hash and a control byte per slot).
    pub(crate) fn size(&self) -> usize {
        self.0.capacity() * (std::mem::size_of::<u64>() + 1)
    }
}
