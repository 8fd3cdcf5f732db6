//! The file source behind `sluice run --from-file STREAM=PATH`: JSON lines (gzip when
//! the name ends in `.gz`), decoded and batched exactly as live messages are.
//!
//! Reading is blocking file I/O, so it runs on a blocking thread and hands batches to
//! the async pipeline channel through the runtime handle.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::Arc;

use sluice_core::Clock;

use crate::decode::MessageMeta;
use crate::emit::Emitter;
use crate::{Error, Result};

/// Feeds every line of `path` through `emitter`; returns the number of lines read.
pub async fn feed_file(path: PathBuf, mut emitter: Emitter, clock: Arc<dyn Clock>) -> Result<u64> {
    let handle = tokio::runtime::Handle::current();
    let shown = path.display().to_string();
    let io = move |error: std::io::Error| Error::File {
        path: shown.clone(),
        error,
    };
    let task = tokio::task::spawn_blocking(move || -> Result<u64> {
        let file = std::fs::File::open(&path).map_err(&io)?;
        let raw: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let mut reader = BufReader::with_capacity(1 << 20, raw);
        let partition = path.display().to_string();
        let mut offset = itoa::Buffer::new();
        let mut line = Vec::with_capacity(4096);
        let mut lines = 0u64;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).map_err(&io)? == 0 {
                break;
            }
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            lines += 1;
            let meta = MessageMeta {
                partition: &partition,
                offset: offset.format(lines),
                ingest_time_ms: clock.now_ms(),
                hops: 0,
            };
            emitter.push(text, "", &meta);
            if emitter.is_full() {
                handle.block_on(emitter.flush())?;
            }
        }
        handle.block_on(emitter.flush())?;
        Ok(lines)
    });
    task.await.map_err(|e| Error::Config {
        source_name: "file".into(),
        message: format!("file reader stopped: {e}"),
    })?
}
