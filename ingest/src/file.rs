//! The file source behind `sluice run --from-file STREAM=PATH`: JSON lines (gzip when
//! the name ends in `.gz`), decoded and batched exactly as live messages are.
//!
//! Decoding is most of a bounded run's work, so it is spread over `[runtime] workers`
//! threads without changing what comes out:
//!
//! ```text
//!  reader thread ── chunk 0, n, 2n… ─► worker 0 ─┐
//!  (4 MiB cut at     chunk 1, n+1…  ─► worker 1 ─┤ sequencer (async): chunk 0's batches,
//!   a line end,      …                   …       ├─ then chunk 1's, … in file order
//!   lines numbered)  chunk n-1…     ─► worker n-1┘      └─► the pipeline channel
//! ```
//!
//! Chunks are cut the same way whatever the worker count, each worker's emitter hands
//! on what it holds at the end of every chunk, and the sequencer takes the workers'
//! results round-robin, the order the reader dealt the chunks in: so every count of
//! workers hands the pipeline the same batches in the same order, and windows see the
//! same watermarks. One worker decodes on the reader's thread. A message's offset is
//! its line number in the file (blank lines count, so it is the line an editor shows).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use sluice_core::{Clock, PipeSender, StreamBatch};

use crate::decode::MessageMeta;
use crate::emit::Emitter;
use crate::{Error, Result};

/// How much of a file one chunk holds (then cut back to its last line end). On W1
/// pinned to one core, 1 MiB and 8 MiB chunks were 4–6 % slower than 4 MiB (more
/// part-full batches; chunks out of the cache).
const CHUNK_BYTES: usize = 4 << 20;

/// Feeds every line of `path` through the `workers`' emitters (one thread each) into
/// `out`, in file order; returns the number of non-blank lines read.
pub async fn feed_file(
    path: PathBuf,
    workers: Vec<Emitter>,
    out: PipeSender,
    clock: Arc<dyn Clock>,
) -> Result<u64> {
    feed_chunks(path, workers, out, clock, CHUNK_BYTES).await
}

/// A piece of the file that ends at a line end (or the end of the file).
struct Chunk {
    bytes: Vec<u8>,
    /// The line number (1-based) of its first line.
    first_line: u64,
}

/// What a worker made of one chunk.
struct Decoded {
    batches: Vec<StreamBatch>,
    lines: u64,
}

async fn feed_chunks(
    path: PathBuf,
    workers: Vec<Emitter>,
    out: PipeSender,
    clock: Arc<dyn Clock>,
    chunk_bytes: usize,
) -> Result<u64> {
    assert!(
        !workers.is_empty(),
        "a file needs at least one decode worker"
    );
    let handle = tokio::runtime::Handle::current();
    let partition: Arc<str> = path.display().to_string().into();
    let mut decoders: Vec<ChunkDecoder> = workers
        .into_iter()
        .map(|emitter| ChunkDecoder::new(emitter, &handle, &clock, &partition))
        .collect();
    // Workers hand decoded chunks' buffers back for the reader to fill again: a fresh
    // 4 MiB buffer per chunk is a fresh mapping whose pages fault in (about 10 % of a
    // one-worker run).
    let (free_tx, free_rx) = std::sync::mpsc::channel();
    let mut results = Vec::new();
    let mut threads = Vec::new();
    let reader = if let [_] = &decoders[..] {
        // One worker decodes on the reader's thread: the chunk is still in the cache and
        // nothing is handed between threads (a thread of its own cost about 2 % of a
        // run pinned to one core).
        let mut decoder = decoders.pop().expect("one decoder");
        let (result_tx, result_rx) = tokio::sync::mpsc::channel(1);
        results.push(result_rx);
        tokio::task::spawn_blocking(move || {
            read_chunks(&path, chunk_bytes, &free_rx, |chunk| {
                let decoded = decoder.decode(chunk, &free_tx);
                result_tx.blocking_send(decoded).is_ok()
            })
        })
    } else {
        let mut chunk_txs: Vec<SyncSender<Chunk>> = Vec::new();
        for mut decoder in decoders {
            let (chunk_tx, chunk_rx) = sync_channel(1);
            let (result_tx, result_rx) = tokio::sync::mpsc::channel(1);
            chunk_txs.push(chunk_tx);
            results.push(result_rx);
            let free = free_tx.clone();
            threads.push(tokio::task::spawn_blocking(move || {
                for chunk in chunk_rx {
                    if result_tx
                        .blocking_send(decoder.decode(chunk, &free))
                        .is_err()
                    {
                        return;
                    }
                }
            }));
        }
        let mut next = 0;
        tokio::task::spawn_blocking(move || {
            read_chunks(&path, chunk_bytes, &free_rx, |chunk| {
                let dealt = chunk_txs[next].send(chunk).is_ok();
                next = (next + 1) % chunk_txs.len();
                dealt
            })
        })
    };
    // The sequencer: chunk i was dealt to worker i % n, so taking the workers' results
    // round-robin restores the file's order. The first worker with nothing more means
    // the reader dealt its last chunk.
    let mut lines = 0;
    let n = results.len();
    for i in 0.. {
        let Some(decoded) = results[i % n].recv().await else {
            break;
        };
        lines += decoded.lines;
        for batch in decoded.batches {
            out.send(batch).await.map_err(|_| Error::PipelineClosed)?;
        }
    }
    let stopped = |e: tokio::task::JoinError| Error::Config {
        source_name: "file".into(),
        message: format!("file reader stopped: {e}"),
    };
    reader.await.map_err(stopped)??;
    for thread in threads {
        thread.await.map_err(stopped)?;
    }
    Ok(lines)
}

/// The reader: cuts the file into chunks that end at a line end, numbers their lines
/// and hands each to `deal` in order, reusing the buffers that come back on `free`.
/// Stops early (without an error) once `deal` says the workers are gone.
fn read_chunks(
    path: &Path,
    chunk_bytes: usize,
    free: &Receiver<Vec<u8>>,
    mut deal: impl FnMut(Chunk) -> bool,
) -> Result<()> {
    let io = |error: std::io::Error| Error::File {
        path: path.display().to_string(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut raw: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut first_line = 1u64;
    let mut buf: Vec<u8> = Vec::with_capacity(chunk_bytes);
    loop {
        // Read at least `chunk_bytes` more, then cut at the last line end; a line
        // longer than that keeps the buffer growing until it ends.
        let (chunk, end) = loop {
            let want = chunk_bytes as u64;
            let read = (&mut raw).take(want).read_to_end(&mut buf).map_err(io)?;
            let end = (read as u64) < want;
            if end {
                break (std::mem::take(&mut buf), true);
            }
            if let Some(cut) = memchr::memrchr(b'\n', &buf) {
                let mut rest = free
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(chunk_bytes + (64 << 10)));
                rest.extend_from_slice(&buf[cut + 1..]);
                buf.truncate(cut + 1);
                break (std::mem::replace(&mut buf, rest), false);
            }
        };
        if !chunk.is_empty() {
            let lines = bytecount::count(&chunk, b'\n') as u64;
            if !deal(Chunk {
                bytes: chunk,
                first_line,
            }) {
                return Ok(());
            }
            first_line += lines;
        }
        if end {
            return Ok(());
        }
    }
}

/// One worker's decoding: its emitter, and what it needs to label each message.
struct ChunkDecoder {
    emitter: Emitter,
    handle: tokio::runtime::Handle,
    clock: Arc<dyn Clock>,
    partition: Arc<str>,
    offset: itoa::Buffer,
    now: i64,
    read: u64,
}

impl ChunkDecoder {
    fn new(
        emitter: Emitter,
        handle: &tokio::runtime::Handle,
        clock: &Arc<dyn Clock>,
        partition: &Arc<str>,
    ) -> Self {
        Self {
            emitter,
            handle: handle.clone(),
            now: clock.now_ms(),
            clock: clock.clone(),
            partition: partition.clone(),
            offset: itoa::Buffer::new(),
            read: 0,
        }
    }

    /// Decodes `chunk` into batches, handing on what the emitter holds at the chunk's
    /// end (so batches do not depend on the worker count); its buffer goes back to the
    /// reader on `free`.
    fn decode(&mut self, chunk: Chunk, free: &std::sync::mpsc::Sender<Vec<u8>>) -> Decoded {
        // The ingest time is read once per CLOCK_EVERY lines: a clock read per line cost
        // ~7 % of a bounded run, and a file has no finer arrival time anyway.
        const CLOCK_EVERY: u64 = 1024;
        let mut batches = Vec::new();
        let mut lines = 0u64;
        let bytes = &chunk.bytes;
        let mut start = 0;
        let ends = memchr::memchr_iter(b'\n', bytes).chain(
            // The file's last line, when it has no line end.
            (bytes.last() != Some(&b'\n')).then_some(bytes.len()),
        );
        for (number, end) in (chunk.first_line..).zip(ends) {
            let text = bytes[start..end].trim_ascii();
            start = end + 1;
            if text.is_empty() {
                continue;
            }
            lines += 1;
            self.read += 1;
            if self.read.is_multiple_of(CLOCK_EVERY) {
                self.now = self.clock.now_ms();
            }
            let meta = MessageMeta {
                partition: &self.partition,
                offset: self.offset.format(number),
                ingest_time_ms: self.now,
                hops: 0,
                origin: None,
            };
            self.emitter.push(text, "", &meta);
            if self.emitter.is_full() {
                batches.extend(self.handle.block_on(self.emitter.take()));
            }
        }
        batches.extend(self.handle.block_on(self.emitter.take()));
        let mut bytes = chunk.bytes;
        bytes.clear();
        let _ = free.send(bytes);
        Decoded { batches, lines }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use arrow::array::RecordBatch;
    use arrow::compute::concat_batches;
    use proptest::prelude::*;
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
        let (tx, mut rx) = sluice_core::pipe(16, 64 << 20);
        let emitters = (0..3)
            .map(|_| {
                let decoder = Decoder::new(
                    schema.clone(),
                    "telemetry",
                    "file",
                    None,
                    DecodeLimits::default(),
                );
                Emitter::new(decoder, tx.clone(), 4096, "file:t", "file")
            })
            .collect();
        let reader = tokio::spawn(feed_file(path, emitters, tx, Arc::new(ManualClock::new(0))));
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

    /// Decodes the file at `path` with `workers` workers and chunks of `chunk_bytes`: the batches
    /// handed on, concatenated per stream in order (telemetry, then dead letters).
    fn decode_with(path: &Path, workers: usize, chunk_bytes: usize) -> Vec<RecordBatch> {
        let path = path.to_owned();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let schema = StreamSchema::builtin("telemetry").unwrap();
            let limits = DecodeLimits {
                max_payload: 200,
                ..DecodeLimits::default()
            };
            let (tx, mut rx) = sluice_core::pipe(4, 64 << 20);
            let emitters = (0..workers)
                .map(|_| {
                    let decoder = Decoder::new(schema.clone(), "telemetry", "file", None, limits);
                    Emitter::new(decoder, tx.clone(), 7, "file:t", "file")
                })
                .collect();
            let clock = Arc::new(ManualClock::new(0));
            let reader = tokio::spawn(feed_chunks(path, emitters, tx, clock, chunk_bytes));
            let mut by_stream: Vec<(String, Vec<RecordBatch>)> = Vec::new();
            while let Some(b) = rx.recv().await {
                match by_stream.iter_mut().find(|(s, _)| **s == *b.stream) {
                    Some((_, batches)) => batches.push(b.batch),
                    None => by_stream.push((b.stream.to_string(), vec![b.batch])),
                }
            }
            reader.await.unwrap().unwrap();
            by_stream.sort_by(|a, b| a.0.cmp(&b.0));
            by_stream
                .into_iter()
                .map(|(_, batches)| concat_batches(&batches[0].schema(), &batches).unwrap())
                .collect()
        })
    }

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (0u32..50, -40i32..60).prop_map(|(d, t)| format!(
                r#"{{"device_id":"d{d}","ts":{},"temperature":{t}}}"#,
                1_767_225_600_000u64 + u64::from(d) * 997
            )),
            1 => Just(String::new()),
            1 => Just("not json".to_owned()),
            1 => Just(r#"{"device_id":"x"}"#.to_owned()),
            1 => (0usize..400).prop_map(|n| format!(r#"{{"device_id":"{}","ts":1}}"#, "p".repeat(n))),
            1 => Just("\r".to_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Any worker count and chunk size hands on the same rows, dead letters and
        /// offsets in the same order as one worker reading the file in one piece.
        #[test]
        fn every_worker_count_decodes_the_same_rows_in_file_order(
            lines in proptest::collection::vec(line(), 0..300),
            workers in 1usize..6,
            chunk_bytes in 16usize..2048,
            final_newline in any::<bool>(),
        ) {
            let mut text = lines.join("\n");
            if final_newline {
                text.push('\n');
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.jsonl");
            std::fs::write(&path, text).unwrap();
            let one = decode_with(&path, 1, 1 << 20);
            let many = decode_with(&path, workers, chunk_bytes);
            prop_assert_eq!(one.len(), many.len());
            for (a, b) in one.iter().zip(&many) {
                prop_assert_eq!(a.num_rows(), b.num_rows(), "rows of {:?}", a.schema());
                for (i, field) in a.schema().fields().iter().enumerate() {
                    prop_assert_eq!(
                        a.column(i).to_data(),
                        b.column(i).to_data(),
                        "column {}",
                        field.name()
                    );
                }
            }
        }
    }
}
