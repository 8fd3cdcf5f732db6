//! File target: one payload per line, as `generate` and `sluice run --from-file` use.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::Arc;

use anyhow::Context;

use crate::stats::Stats;
use crate::workload::Message;

/// Writes JSON lines to a file; each write is the message's acknowledgement.
#[derive(Debug)]
pub struct FileTarget {
    out: BufWriter<File>,
    path: String,
    stats: Arc<Stats>,
}

impl FileTarget {
    /// Creates (truncates) `path`.
    pub fn create(path: &str, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let file = File::create(path).with_context(|| format!("cannot create {path}"))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, file),
            path: path.to_owned(),
            stats,
        })
    }

    /// Appends the payload and a newline.
    pub fn send(&mut self, msg: &Message, due_us: u64) -> anyhow::Result<()> {
        self.out
            .write_all(&msg.payload)
            .and_then(|()| self.out.write_all(b"\n"))
            .with_context(|| format!("cannot write {}", self.path))?;
        self.stats.acked(due_us);
        Ok(())
    }

    /// Flushes the buffer to the file.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.out
            .flush()
            .with_context(|| format!("cannot write {}", self.path))
    }

    /// Flushes and closes.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.flush()
    }
}
