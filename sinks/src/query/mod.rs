//! Read-only SQL over the lake with DataFusion.
//!
//! Every directory under the lake root that holds a committed `*.parquet` file is
//! registered as a table of the same name, with the hive partitions `date` and `hour`
//! as string columns. Tables are discovered again for each query, so new streams
//! appear without a restart.
//!
//! # Read-only
//! Two gates: the SQL must parse to exactly one plain query (`SELECT`/`WITH`/`VALUES`),
//! and the plan is verified with DDL, DML and statements disallowed. File paths are
//! never tables: no URL table provider is registered, so `FROM '/etc/passwd'` is an
//! unknown table.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use crate::{Error, Result};

/// The hive partition columns every table has.
pub const PARTITION_COLUMNS: [&str; 2] = ["date", "hour"];

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

/// Runs read-only SQL over the lake at `root`.
#[derive(Debug, Clone)]
pub struct QueryEngine {
    root: PathBuf,
}

impl QueryEngine {
    /// An engine over the lake at `root` (which need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Runs `sql` after checking it is a single read-only query.
    pub async fn query(&self, sql: &str) -> Result<QueryResult> {
        check_read_only(sql)?;
        let ctx = self.context().await?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let frame = ctx.sql_with_options(sql, options).await?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let batches = frame.collect().await?;
        Ok(QueryResult { schema, batches })
    }

    /// The table names currently in the lake.
    pub fn tables(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            // `_staging`, `_state` and `_manifests` are the writer's, not tables.
            .filter(|name| {
                name.starts_with(|c: char| c.is_ascii_lowercase())
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    && has_parquet(&self.root.join(name))
            })
            .collect();
        names.sort();
        names
    }

    async fn context(&self) -> Result<SessionContext> {
        let config = SessionConfig::new().with_information_schema(true);
        let ctx = SessionContext::new_with_config(config);
        let root = std::fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        for table in self.tables() {
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                .with_file_extension(".parquet")
                .with_table_partition_cols(
                    PARTITION_COLUMNS
                        .iter()
                        .map(|c| (c.to_string(), DataType::Utf8))
                        .collect(),
                );
            let path = format!("{}/{table}/", root.display());
            ctx.register_listing_table(table.as_str(), &path, options, None, None)
                .await?;
        }
        Ok(ctx)
    }
}

fn has_parquet(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        let path = e.path();
        if path.is_dir() {
            has_parquet(&path)
        } else {
            path.extension().is_some_and(|x| x == "parquet")
        }
    })
}

/// Refuses anything but exactly one plain query.
pub fn check_read_only(sql: &str) -> Result<()> {
    let statements =
        DFParser::parse_sql(sql).map_err(|e| Error::Refused(format!("cannot parse SQL: {e}")))?;
    if statements.len() != 1 {
        return Err(Error::Refused(format!(
            "exactly one statement is allowed, found {}",
            statements.len()
        )));
    }
    match &statements[0] {
        Statement::Statement(s) if matches!(**s, SqlStatement::Query(_)) => Ok(()),
        Statement::CopyTo(_) => Err(Error::Refused(
            "COPY is not allowed; queries are read-only".into(),
        )),
        Statement::CreateExternalTable(_) => Err(Error::Refused(
            "CREATE EXTERNAL TABLE is not allowed; queries are read-only".into(),
        )),
        other => {
            let text = other.to_string();
            let verb: String = text
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            Err(Error::Refused(format!(
                "only SELECT queries are allowed; {verb:?}… is not read-only"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_queries_pass() {
        for ok in [
            "SELECT 1",
            "WITH a AS (SELECT 1 AS x) SELECT x FROM a",
            "select count(*) from telemetry",
        ] {
            check_read_only(ok).expect(ok);
        }
        for bad in [
            "COPY (SELECT 1) TO '/tmp/x.csv'",
            "CREATE TABLE t AS SELECT 1",
            "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'",
            "INSERT INTO telemetry VALUES (1)",
            "DROP TABLE telemetry",
            "SET datafusion.execution.batch_size = 1",
            "SELECT 1; SELECT 2",
            "SELEC 1",
        ] {
            let err = check_read_only(bad).expect_err(bad);
            assert!(matches!(err, Error::Refused(_)), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn paths_are_not_tables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = QueryEngine::new(dir.path());
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
}
