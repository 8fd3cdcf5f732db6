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
        let mut lines = 0u64;
        // The ingest time is read once per CLOCK_EVERY lines: a clock read per line
        // cost ~7 % of a bounded run, and a file has no finer arrival time anyway.
        const CLOCK_EVERY: u64 = 1024;
        let mut now = clock.now_ms();
        let mut push = |text: &[u8], emitter: &mut Emitter| -> Result<()> {
            let text = text.trim_ascii();
            if text.is_empty() {
                return Ok(());
            }
            lines += 1;
            if lines.is_multiple_of(CLOCK_EVERY) {
                now = clock.now_ms();
            }
            let meta = MessageMeta {
                partition: &partition,
                offset: offset.format(lines),
                ingest_time_ms: now,
                hops: 0,
            };
            emitter.push(text, "", &meta);
            if emitter.is_full() {
                handle.block_on(emitter.flush())?;
            }
            Ok(())
        };
        // Lines are cut straight out of the reader's buffer (memchr); only a line that
        // straddles two buffer fills is copied, into `carry`.
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let buf = reader.fill_buf().map_err(&io)?;
            if buf.is_empty() {
                push(&carry, &mut emitter)?;
                break;
            }
            let mut start = 0;
            for end in memchr::memchr_iter(b'\n', buf) {
                if carry.is_empty() {
                    push(&buf[start..end], &mut emitter)?;
                } else {
                    carry.extend_from_slice(&buf[start..end]);
                    push(&carry, &mut emitter)?;
                    carry.clear();
                }
                start = end + 1;
            }
            carry.extend_from_slice(&buf[start..]);
            let used = buf.len();
            reader.consume(used);
        }
        handle.block_on(emitter.flush())?;
        Ok(lines)
    });
    task.await.map_err(|e| Error::Config {
        source_name: "file".into(),
        message: format!("file reader stopped: {e}"),
    })?
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use sluice_core::{ManualClock, StreamSchema};

    use super::*;
    use crate::decode::{DecodeLimits, Decoder};

    /// Lines of every length around the 1 MiB buffer size, blank lines, CRLF and no
    /// final newline: every line is decoded exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_straddling_buffer_fills_are_read_whole() {
        let dir = std::env::temp_dir().join(format!("sluice-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        let mut file = std::fs::File::create(&path).unwrap();
        let mut expected = 0u64;
        let mut sum = 0.0;
        for i in 0..40_000u64 {
            let pad = "x".repeat((i * 7 % 113) as usize);
            let ending = if i % 5 == 0 { "\r\n" } else { "\n" };
            write!(
                file,
                r#"{{"device_id":"d{i}","ts":{},"temperature":{i},"status":"{pad}"}}{ending}"#,
                1_767_225_600_000u64 + i
            )
            .unwrap();
            if i % 1000 == 0 {
                writeln!(file).unwrap();
            }
            expected += 1;
            sum += i as f64;
        }
        write!(
            file,
            r#"{{"device_id":"last","ts":1767225600000,"temperature":0.5}}"#
        )
        .unwrap();
        expected += 1;
        sum += 0.5;
        drop(file);
        assert!(std::fs::metadata(&path).unwrap().len() > 3 << 20);

        let schema = StreamSchema::builtin("telemetry").unwrap();
        let decoder = Decoder::new(schema, "telemetry", "file", None, DecodeLimits::default());
        let (tx, mut rx) = sluice_core::pipe(16, 64 << 20);
        let emitter = Emitter::new(decoder, tx, 4096, "file:t", "file");
        let reader = tokio::spawn(feed_file(path, emitter, Arc::new(ManualClock::new(0))));
        let mut rows = 0u64;
        let mut got = 0.0;
        while let Some(b) = rx.recv().await {
            assert_eq!(&*b.stream, "telemetry", "no dead letters");
            rows += b.batch.num_rows() as u64;
            let t = b
                .batch
                .column(2)
                .as_any()
                .downcast_ref::<arrow::array::Float64Array>()
                .unwrap();
            got += t.iter().flatten().sum::<f64>();
        }
        assert_eq!(reader.await.unwrap().unwrap(), expected);
        assert_eq!(rows, expected);
        assert_eq!(got, sum);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
