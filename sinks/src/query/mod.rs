//! Read-only SQL over the lake with DataFusion.
//!
//! Every Delta table under the lake root is a table of the same name, with the
//! partitions `date` and `hour` as string columns. A query registers only the tables it
//! names, each from its cached Delta snapshot, refreshed from the log first (only the
//! commits since the cached version are read): no directory listing or footer reads
//! per query, and DataFusion prunes files by partition values and the log's per-file
//! statistics.
//!
//! # Time travel
//! `"<table>@<version>"` reads the table as of a Delta version, and
//! `"<table>@<RFC 3339 time>"` as of the newest version committed at or before that
//! time, e.g. `SELECT count(*) FROM "telemetry@12"` or
//! `SELECT * FROM "telemetry@2026-01-01T10:00:00Z"`.
//!
//! # Read-only
//! Two gates: the SQL must parse to exactly one plain query (`SELECT`/`WITH`/`VALUES`,
//! or `EXPLAIN [ANALYZE]` of one),
//! and the plan is verified with DDL, DML and statements disallowed. File paths are
//! never tables: no URL table provider is registered, so `FROM '/etc/passwd'` is an
//! unknown table.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::datasource::TableProvider;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    GreedyMemoryPool, MemoryConsumer, MemoryPool, MemoryReservation,
};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::physical_plan::joins::{CrossJoinExec, NestedLoopJoinExec};
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::sql::parser::Statement;
use deltalake::DeltaTable;
use deltalake::delta_datafusion::{DeltaScanConfig, DeltaScanNext};
use futures::StreamExt;
use tokio::sync::Mutex;

use crate::delta::{DeltaTables, delta_error};
use crate::location::LakeLocation;
use crate::{Error, Result};

mod constant_groups;
mod scan;

use constant_groups::AggregateByPartition;

/// How results are written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// A JSON array of row objects.
    Json,
}

impl Format {
    /// Parses `table`, `csv` or `json`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "table" => Some(Format::Table),
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// A query's results.
#[derive(Debug)]
pub struct QueryResult {
    /// The result schema (also for zero rows).
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// The rows' share of the memory pool, given back when the result is dropped
    /// (after it is encoded).
    _reservation: Option<MemoryReservation>,
}

impl QueryResult {
    /// Total rows.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// Writes the rows in `format`.
    pub fn render(&self, format: Format) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        match format {
            Format::Table => {
                let text = arrow::util::pretty::pretty_format_batches(&self.batches)?;
                out.extend_from_slice(text.to_string().as_bytes());
                out.push(b'\n');
            }
            Format::Csv => {
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut out);
                if self.batches.is_empty() {
                    writer.write(&RecordBatch::new_empty(self.schema.clone()))?;
                }
                for batch in &self.batches {
                    writer.write(batch)?;
                }
            }
            Format::Json => {
                let mut writer = arrow::json::ArrayWriter::new(&mut out);
                for batch in &self.batches {
                    writer.write(batch)?;
                }
                writer.finish()?;
                if out.is_empty() {
                    out.extend_from_slice(b"[]");
                }
            }
        }
        Ok(out)
    }
}

/// Runs read-only SQL over the lake at a [`LakeLocation`].
#[derive(Clone)]
pub struct QueryEngine {
    location: LakeLocation,
    /// Open tables, refreshed per query (shared by clones: the HTTP handlers).
    tables: Arc<Mutex<DeltaTables>>,
    limits: QueryLimits,
    /// The memory every query of this engine (and its clones) shares.
    pool: Option<Arc<dyn MemoryPool>>,
}

/// What an engine's queries may use; `None`: no limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueryLimits {
    /// Memory of all running queries together (DataFusion's memory pool): an operator
    /// that cannot get more ends its query with an error (nothing spills to disk).
    pub memory: Option<usize>,
    /// Rows a result may hold.
    pub max_rows: Option<usize>,
    /// Bytes a result may hold (Arrow, in memory).
    pub max_bytes: Option<usize>,
    /// Pairs a join without equal keys may consider (see [`check_join_pairs`]).
    pub max_join_pairs: Option<u64>,
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine")
            .field("location", &self.location)
            .finish()
    }
}

impl QueryEngine {
    /// An engine over the lake at `location`.
    pub fn new(location: LakeLocation) -> Self {
        let tables = DeltaTables::at(&location);
        Self {
            location,
            tables: Arc::new(Mutex::new(tables)),
            limits: QueryLimits::default(),
            pool: None,
        }
    }

    /// The same engine with `limits` on its queries.
    pub fn with_limits(mut self, limits: QueryLimits) -> Self {
        self.pool = limits
            .memory
            .map(|bytes| Arc::new(GreedyMemoryPool::new(bytes)) as Arc<dyn MemoryPool>);
        self.limits = limits;
        self
    }

    /// The lake this engine reads.
    pub fn location(&self) -> &LakeLocation {
        &self.location
    }

    /// An engine over a lake on a local directory (which need not exist yet).
    pub fn local(dir: &std::path::Path) -> Result<Self> {
        Ok(Self::new(LakeLocation::local(dir)?))
    }

    /// Runs `sql` after checking it is a single read-only query.
    pub async fn query(&self, sql: &str) -> Result<QueryResult> {
        let statement = read_only_statement(sql)?;
        let config = SessionConfig::new().with_information_schema(true);
        let mut builder = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(AggregateByPartition));
        if let Some(pool) = &self.pool {
            // No spilling: a query that needs more than the pool ends with an error
            // rather than filling the disk (a denial of service of its own).
            let no_spill = DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled);
            let runtime = RuntimeEnvBuilder::new()
                .with_memory_pool(pool.clone())
                .with_disk_manager_builder(no_spill)
                .build_arc()?;
            builder = builder.with_runtime_env(runtime);
        }
        let state = builder.build();
        let ctx = SessionContext::new_with_state(state);
        let state = ctx.state();
        for reference in state.resolve_table_references(&statement)? {
            if reference.schema().is_none() {
                self.register(&ctx, reference.table()).await?;
            }
        }
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let plan = state.statement_to_plan(statement).await?;
        options.verify_plan(&plan)?;
        let frame = ctx.execute_logical_plan(plan).await?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let task = Arc::new(frame.task_ctx());
        let physical = frame.create_physical_plan().await?;
        if let Some(max) = self.limits.max_join_pairs {
            check_join_pairs(&physical, max)?;
        }
        let mut stream = execute_stream(physical, task)?;
        // The result is held until it is encoded: it counts against the memory pool
        // too, so that queries' results and their operators share one budget.
        let mut reservation = self
            .pool
            .as_ref()
            .map(|pool| MemoryConsumer::new("query result").register(pool));
        let (mut batches, mut rows, mut bytes) = (Vec::new(), 0, 0);
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            rows += batch.num_rows();
            let size = batch.get_array_memory_size();
            bytes += size;
            if let Some(max) = self.limits.max_rows.filter(|&max| rows > max) {
                return Err(Error::TooLarge(format!(
                    "the result has more than {max} rows (the cap); aggregate or add a LIMIT"
                )));
            }
            if let Some(max) = self.limits.max_bytes.filter(|&max| bytes > max) {
                return Err(Error::TooLarge(format!(
                    "the result is over {max} bytes (the cap); select fewer columns or rows"
                )));
            }
            if let Some(reservation) = reservation.as_mut() {
                reservation.try_grow(size)?;
            }
            batches.push(batch);
        }
        Ok(QueryResult {
            schema,
            batches,
            _reservation: reservation,
        })
    }

    /// Registers `name` (a table, or `table@version|time`) if it is a Delta table of the
    /// lake; anything else is left for DataFusion to call an unknown table. Nothing is
    /// listed: the name is the table's directory.
    async fn register(&self, ctx: &SessionContext, name: &str) -> Result<()> {
        let (base, at) = match name.split_once('@') {
            Some((base, at)) => (base, Some(at)),
            None => (name, None),
        };
        if !is_table_name(base) {
            return Ok(());
        }
        let table: DeltaTable = {
            let mut tables = self.tables.lock().await;
            match at {
                None => {
                    let t = tables.open(base).await?;
                    if t.version().is_none() {
                        tables.forget(base);
                        drop(tables);
                        return self.refuse_old_layout(base);
                    }
                    t.clone()
                }
                Some(at) => {
                    let builder = tables.builder(base)?;
                    let builder = match at.parse::<u64>() {
                        Ok(version) => builder.with_version(version),
                        Err(_) => builder.with_datestring(at).map_err(|e| {
                            Error::Refused(format!(
                                "{name:?}: after '@' give a table version or an RFC 3339 time ({e})"
                            ))
                        })?,
                    };
                    builder.load().await.map_err(delta_error(base))?
                }
            }
        };
        if table.version().is_none() {
            return Ok(());
        }
        let snapshot = table
            .snapshot()
            .map_err(delta_error(base))?
            .snapshot()
            .clone();
        // Our own scan reads our tables (see `scan`); the table's object store is
        // registered under a URL of its own, rooted at the table directory.
        let store = ObjectStoreUrl::parse(format!("sluice-table://{base}/"))?;
        let provider: Arc<dyn TableProvider> =
            match scan::SnapshotScan::try_new(&snapshot, store.clone()) {
                Some(provider) => {
                    ctx.runtime_env().register_object_store(
                        store.as_ref(),
                        table.log_store().object_store(None),
                    );
                    Arc::new(provider)
                }
                None => {
                    table
                        .update_datafusion_session(&ctx.state())
                        .map_err(delta_error(base))?;
                    let config = DeltaScanConfig::new_from_session(&ctx.state())
                        .with_wrap_partition_values(false);
                    Arc::new(DeltaScanNext::new(snapshot, config)?)
                }
            };
        ctx.register_table(name, provider)?;
        Ok(())
    }

    /// A table directory of the layout before Delta (local lakes only) is refused with
    /// the command that converts it.
    fn refuse_old_layout(&self, base: &str) -> Result<()> {
        let Some(root) = self.location.local_dir() else {
            return Ok(());
        };
        let dir = root.join(base);
        // A table of a Delta lake between its first files and its first commit looks
        // the same; but a lake before Delta has no table with a log at all.
        let delta_lake = || {
            std::fs::read_dir(root).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.path().join("_delta_log").is_dir())
            })
        };
        if crate::convert::parquet_count(&dir) > 0
            && !dir.join("_delta_log").exists()
            && !delta_lake()
        {
            return Err(Error::Refused(format!(
                "table {base:?} at {} is in the layout before Delta tables; run \
                 `sluice run --data-dir {}` once (it converts the lake in place, \
                 nothing is rewritten), then query again",
                dir.display(),
                root.display()
            )));
        }
        Ok(())
    }

    /// The columns of table `name` as queries see them (its Delta schema with the
    /// partition columns); `None` if the lake has no such table (a version or time
    /// after `@` is not a table either).
    pub async fn schema(&self, name: &str) -> Result<Option<SchemaRef>> {
        if !is_table_name(name) {
            return Ok(None);
        }
        let ctx = SessionContext::new();
        self.register(&ctx, name).await?;
        Ok(match ctx.table_provider(name).await {
            Ok(provider) => Some(provider.schema()),
            Err(_) => None,
        })
    }

    /// The table names currently in the lake.
    pub async fn tables(&self) -> Result<Vec<String>> {
        Ok(self
            .location
            .tables()
            .await?
            .into_iter()
            .filter(|name| is_table_name(name))
            .collect())
    }
}

/// Refuses a join without equal keys (DataFusion's nested-loop or cross join) whose
/// inputs' row estimates multiply past `max` pairs. Such a join compares every row
/// with every row: the candidate pairs of each batch live outside the memory pool
/// (three at once, with a `GROUP BY`, took the process to 4 GB under
/// `scripts/bench-queries.sh`), and at
/// that size it would run past the query timeout anyway. Estimates come from the
/// tables' Delta statistics through the plan; a side with no estimate (rare: some
/// aggregates) is let through, bounded by the pool and the timeout as before.
fn check_join_pairs(plan: &Arc<dyn ExecutionPlan>, max: u64) -> Result<()> {
    if plan.is::<NestedLoopJoinExec>() || plan.is::<CrossJoinExec>() {
        let rows = |child: &Arc<dyn ExecutionPlan>| {
            let statistics = StatisticsContext::new()
                .compute(child.as_ref(), &StatisticsArgs::new())
                .ok()?;
            statistics.num_rows.get_value().map(|&n| n as u64)
        };
        if let [left, right] = &plan.children()[..]
            && let (Some(l), Some(r)) = (rows(left), rows(right))
            && l.saturating_mul(r) > max
        {
            return Err(Error::TooLarge(format!(
                "a join without equal keys would pair about {l} rows with {r} ({} pairs, \
                 over query_max_join_pairs = {max}); join on equal columns, or filter or \
                 aggregate its inputs first",
                l.saturating_mul(r)
            )));
        }
    }
    plan.children()
        .into_iter()
        .try_for_each(|child| check_join_pairs(child, max))
}

/// A lowercase identifier (letters, digits, `_`, starting with a letter): what a table
/// directory is named, and nothing a path could hide in.
fn is_table_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Refuses anything but exactly one plain query (`sluice_sqlgate`).
pub fn check_read_only(sql: &str) -> Result<()> {
    read_only_statement(sql).map(|_| ())
}

fn read_only_statement(sql: &str) -> Result<Statement> {
    sluice_sqlgate::read_only_statement(sql).map_err(Error::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_statement_is_an_error_of_its_own_kind() {
        check_read_only("SELECT 1").expect("a plain query");
        let err = check_read_only("DROP TABLE telemetry").expect_err("not read-only");
        assert!(matches!(err, Error::Refused(_)), "{err}");
    }

    #[tokio::test]
    async fn a_table_of_the_layout_before_delta_names_the_command_that_converts_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::test_support::store(dir.path(), "old", &[1, 2]).await;
        let engine = QueryEngine::local(dir.path()).expect("engine");
        let err = engine
            .query("SELECT * FROM old")
            .await
            .expect_err("refused");
        assert!(err.is_user_error());
        assert!(err.to_string().contains("sluice run --data-dir"), "{err}");
        // Beside a Delta table it is a table before its first commit, not an old lake.
        let written = crate::test_support::store(dir.path(), "new", &[1]).await;
        let location = crate::location::LakeLocation::local(dir.path()).expect("location");
        crate::delta::DeltaTables::at(&location)
            .append_all([(Arc::from("new"), written)].into())
            .await
            .expect("commit");
        let err = engine
            .query("SELECT * FROM old")
            .await
            .expect_err("no such table yet");
        assert!(!err.to_string().contains("sluice run --data-dir"), "{err}");
    }

    /// The rows a result holds until it is encoded count against the memory pool.
    #[tokio::test]
    async fn a_result_larger_than_the_memory_pool_is_over_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = QueryLimits {
            memory: Some(100_000),
            ..QueryLimits::default()
        };
        let engine = QueryEngine::local(dir.path())
            .expect("engine")
            .with_limits(limits);
        let small = engine
            .query("SELECT * FROM generate_series(1, 1000)")
            .await
            .expect("fits");
        assert_eq!(small.num_rows(), 1000);
        let err = engine
            .query("SELECT * FROM generate_series(1, 100000)")
            .await
            .expect_err("over the pool");
        assert!(err.is_over_limit(), "{err}");
        assert!(err.to_string().contains("query result"), "{err}");
    }

    /// A join without equal keys is refused before it runs once its inputs' estimated
    /// rows multiply past the cap; a join on equal keys, or one under the cap, runs.
    #[tokio::test]
    async fn joins_without_equal_keys_past_the_pair_cap_are_refused() {
        let (_dir, engine) = lake_of_files(&[&[1, 2, 3], &[4, 5]]).await;
        let capped = |max| {
            engine.clone().with_limits(QueryLimits {
                max_join_pairs: Some(max),
                ..QueryLimits::default()
            })
        };
        let cross = "SELECT count(*) AS n FROM t a CROSS JOIN t b WHERE a.v >= b.v - 100";
        let theta = "SELECT count(*) AS n FROM t a JOIN t b ON a.ts < b.ts";
        let equal = "SELECT count(*) AS n FROM t a JOIN t b ON a.k = b.k AND a.v = b.v";
        let all_pairs = "SELECT a.v, b.v FROM t a CROSS JOIN t b";
        for sql in [cross, theta, all_pairs] {
            let err = capped(24).query(sql).await.expect_err(sql);
            assert!(err.is_over_limit(), "{sql}: {err}");
            assert!(
                err.to_string().contains("5 rows with 5 (25 pairs"),
                "{sql}: {err}"
            );
        }
        assert_eq!(csv(&capped(25), cross).await, "n\n25\n");
        assert_eq!(csv(&capped(25), theta).await, "n\n10\n");
        assert_eq!(
            capped(25).query(all_pairs).await.expect("fits").num_rows(),
            25
        );
        assert!(csv(&capped(1), equal).await.starts_with("n\n"));
    }

    #[tokio::test]
    async fn paths_are_not_tables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = QueryEngine::local(dir.path()).expect("engine");
        for sql in [
            "SELECT * FROM '/etc/passwd'",
            "SELECT * FROM \"/etc/passwd\"",
        ] {
            let err = engine.query(sql).await.expect_err(sql);
            assert!(err.to_string().contains("not found"), "{sql}: {err}");
        }
        let result = engine.query("SELECT 1 AS one").await.expect("select");
        assert_eq!(result.num_rows(), 1);
        let json = String::from_utf8(result.render(Format::Json).expect("json")).expect("utf8");
        assert_eq!(json.trim(), r#"[{"one":1}]"#);
        let csv = String::from_utf8(result.render(Format::Csv).expect("csv")).expect("utf8");
        assert_eq!(csv, "one\n1\n");
    }

    /// A lake with table `t`, one file per entry of `files` (rows at those times, ms).
    async fn lake_of_files(files: &[&[i64]]) -> (tempfile::TempDir, QueryEngine) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut tables = DeltaTables::local(root).expect("tables");
        for times in files {
            let written = crate::test_support::store(root, "t", times).await;
            tables
                .append_all([(Arc::from("t"), written)].into())
                .await
                .expect("commit");
        }
        let engine = QueryEngine::local(root).expect("engine");
        (dir, engine)
    }

    /// `sql`'s result as CSV text.
    async fn csv(engine: &QueryEngine, sql: &str) -> String {
        let result = engine.query(sql).await.expect("query");
        String::from_utf8(result.render(Format::Csv).expect("csv")).expect("utf8")
    }

    /// The Parquet files a query's physical plan reads.
    async fn files_read(engine: &QueryEngine, sql: &str) -> Vec<String> {
        let text = csv(engine, &format!("EXPLAIN {sql}")).await;
        let mut files: Vec<String> = text
            .split(|c: char| c == '[' || c == ']' || c == ',' || c.is_whitespace())
            .filter(|s| s.ends_with(".parquet"))
            .map(|s| {
                let hour = s.find("date=").map_or(s, |i| &s[i..]);
                hour.split("/part-").next().unwrap_or(hour).to_owned()
            })
            .collect();
        files.sort();
        files
    }

    #[tokio::test]
    async fn filters_on_partitions_and_on_time_skip_files_in_the_plan() {
        // Three files: two in hour 00 (minutes 0 and 30), one in hour 01.
        let (_dir, engine) = lake_of_files(&[&[1_000, 2_000], &[1_800_000], &[3_700_000]]).await;
        assert_eq!(
            files_read(&engine, "SELECT count(*) FROM t").await.len(),
            0,
            "a count comes from the log's statistics"
        );
        assert_eq!(
            files_read(&engine, "SELECT v FROM t").await,
            [
                "date=1970-01-01/hour=00",
                "date=1970-01-01/hour=00",
                "date=1970-01-01/hour=01"
            ]
        );
        assert_eq!(
            files_read(&engine, "SELECT v FROM t WHERE hour = '01'").await,
            ["date=1970-01-01/hour=01"],
            "partition pruning"
        );
        assert_eq!(
            files_read(
                &engine,
                "SELECT v FROM t WHERE ts >= '1970-01-01T00:20:00Z' AND ts < '1970-01-01T01:00:00Z'"
            )
            .await,
            ["date=1970-01-01/hour=00"],
            "file statistics on event time"
        );
        let rows = engine
            .query("SELECT v FROM t WHERE ts >= '1970-01-01T00:20:00Z' AND ts < '1970-01-01T01:00:00Z'")
            .await
            .expect("query");
        assert_eq!(rows.num_rows(), 1);
    }

    #[tokio::test]
    async fn grouping_by_partitions_aggregates_whole_batches_and_agrees_with_hash_aggregation() {
        let (_dir, engine) = lake_of_files(&[
            &[1_000, 2_000, 3_700_000],
            &[1_800_000, 7_300_000],
            &[3_800_000],
        ])
        .await;
        let select = "SELECT date, hour, count(*) AS n, sum(v) AS s, min(ts) AS first";
        let by_partition = format!("{select} FROM t GROUP BY date, hour ORDER BY date, hour");
        // A sort between scan and aggregation keeps the rule away: plain hash aggregation.
        let by_hash = format!(
            "{select} FROM (SELECT * FROM t ORDER BY ts LIMIT 100) GROUP BY date, hour ORDER BY date, hour"
        );
        let plan = |sql: &str| format!("EXPLAIN {sql}");
        let rule = "ConstantGroupsExec";
        assert!(csv(&engine, &plan(&by_partition)).await.contains(rule));
        assert!(!csv(&engine, &plan(&by_hash)).await.contains(rule));
        let got = csv(&engine, &by_partition).await;
        assert_eq!(got, csv(&engine, &by_hash).await);
        assert_eq!(
            got.lines().count(),
            4,
            "a header and hours 00, 01, 02: {got}"
        );
    }
}
