//! The first of the query endpoint's two read-only gates: the SQL must parse, with
//! DataFusion's own parser, to exactly one plain query (`SELECT`/`WITH`/`VALUES`, or
//! `EXPLAIN [ANALYZE]` of one). The second gate, in `sluice-sinks`, verifies the plan.
//!
//! It sees every string a user sends to `POST /api/query`, so it is fuzzed
//! (`fuzz/fuzz_targets/sql.rs`); it depends on `datafusion-sql` alone so that the
//! sanitizer build of the fuzz target stays small.

use datafusion_sql::parser::DFParserBuilder;
pub use datafusion_sql::parser::Statement;
use datafusion_sql::sqlparser::ast::Statement as SqlStatement;

/// How deep the parser may recurse. sqlparser 0.62 (the one DataFusion 55 uses) takes
/// time exponential in that depth on some inputs: the fuzz target found an 88-byte
/// query that took 2.8 s to refuse, and `a.b.c[` twelve times took over 20 s, on one
/// core that no query timeout can take back (parsing does not yield). Upstream fixed
/// it in later releases (apache/datafusion-sqlparser-rs#2344, #2352). At 20 (the
/// default is 50) those inputs are refused at once, while five nested subqueries,
/// five nested CASEs and ten nested parentheses still parse. The config's SQL (the
/// functions' and windows' expressions) is parsed with the same limit.
pub const RECURSION_LIMIT: usize = 20;

/// The one plain query `sql` holds, or why it is refused (a sentence for the user).
pub fn read_only_statement(sql: &str) -> Result<Statement, String> {
    let cannot = |e| format!("cannot parse SQL: {e}");
    let mut statements = DFParserBuilder::new(sql)
        .with_recursion_limit(RECURSION_LIMIT)
        .build()
        .map_err(cannot)?
        .parse_statements()
        .map_err(cannot)?;
    if statements.len() != 1 {
        return Err(format!(
            "exactly one statement is allowed, found {}",
            statements.len()
        ));
    }
    let Some(statement) = statements.pop_front() else {
        return Err("no statement".into());
    };
    match &statement {
        Statement::Statement(s) if matches!(**s, SqlStatement::Query(_)) => Ok(statement),
        // EXPLAIN [ANALYZE] of a plain query shows its plan (and, with ANALYZE, runs it):
        // how an analyst sees which files and row groups a query prunes.
        Statement::Explain(explain) if matches!(&*explain.statement, Statement::Statement(s) if matches!(**s, SqlStatement::Query(_))) => {
            Ok(statement)
        }
        Statement::CopyTo(_) => Err("COPY is not allowed; queries are read-only".into()),
        Statement::CreateExternalTable(_) => {
            Err("CREATE EXTERNAL TABLE is not allowed; queries are read-only".into())
        }
        other => {
            let text = other.to_string();
            let verb: String = text
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            Err(format!(
                "only SELECT queries are allowed; {verb:?}… is not read-only"
            ))
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
            "VALUES (1, 2)",
            "EXPLAIN SELECT 1",
            "EXPLAIN ANALYZE SELECT count(*) FROM telemetry",
        ] {
            read_only_statement(ok).expect(ok);
        }
        for bad in [
            "COPY (SELECT 1) TO '/tmp/x.csv'",
            "CREATE TABLE t AS SELECT 1",
            "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'",
            "INSERT INTO telemetry VALUES (1)",
            "DROP TABLE telemetry",
            "SET datafusion.execution.batch_size = 1",
            "SELECT 1; SELECT 2",
            "",
            "SELEC 1",
            "EXPLAIN INSERT INTO telemetry VALUES (1)",
            "EXPLAIN COPY (SELECT 1) TO '/tmp/x.csv'",
        ] {
            read_only_statement(bad).expect_err(bad);
        }
    }

    /// Every input the SQL fuzz target kept (`fuzz/corpus/sql/`) runs through the gate
    /// again: what once crashed stays fixed.
    #[test]
    fn the_fuzz_corpus_replays() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/sql");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&corpus)
            .expect("fuzz/corpus/sql")
            .flatten()
        {
            let data = std::fs::read(entry.path()).expect("readable");
            if let Ok(sql) = std::str::from_utf8(&data) {
                let _ = read_only_statement(sql);
            }
            replayed += 1;
        }
        assert!(replayed > 0, "an empty corpus under {}", corpus.display());
    }

    /// Queries an analyst writes parse; inputs whose parse time grows exponentially
    /// with their nesting are refused (each took seconds to minutes at the parser's
    /// default depth; a regression hangs this test).
    #[test]
    fn real_queries_parse_and_exponential_ones_are_refused() {
        for ok in [
            "SELECT a FROM (SELECT a FROM (SELECT a FROM (SELECT a FROM (SELECT a FROM (SELECT 1 AS a) x1) x2) x3) x4) x5 WHERE a IN (SELECT b FROM (SELECT 1 AS b) y WHERE b > (SELECT avg(c) FROM (SELECT 2 AS c) z))",
            "SELECT CASE WHEN a > 1 THEN CASE WHEN b > 2 THEN CASE WHEN c > 3 THEN CASE WHEN d > 4 THEN CASE WHEN e > 5 THEN 1 ELSE 2 END ELSE 3 END ELSE 4 END ELSE 5 END ELSE 6 END FROM t",
            "SELECT ((((((((((1 + 2) * 3) - 4) / 5) + 6) * 7) - 8) / 9) + 10) * 11) AS x, coalesce(nullif(lower(upper(trim(concat(a, b, c)))), ''), 'x') FROM t",
            "WITH a AS (SELECT device_id, avg(temperature) OVER (PARTITION BY device_id ORDER BY ts ROWS BETWEEN 10 PRECEDING AND CURRENT ROW) AS t FROM telemetry) SELECT * FROM a WHERE t > 80 AND (t < 100 OR t IS NULL) AND NOT (t BETWEEN 90 AND 95)",
            "SELECT table_name FROM datafusion.information_schema.tables",
        ] {
            read_only_statement(ok).expect(ok);
        }
        for bad in [
            format!("SELECT {}x", "a.b.c[".repeat(12)),
            format!("SELECT {}x", "a.b.c.d.e[".repeat(8)),
            format!("SELECT {}1", "x-not-b.".repeat(30)),
        ] {
            read_only_statement(&bad).expect_err(&bad);
        }
    }

    /// Nesting deep enough to overflow a recursive parser's stack is refused by the
    /// parser's depth limit, not a crash.
    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
        let err = read_only_statement(&deep).expect_err("too deep");
        assert!(err.contains("cannot parse SQL"), "{err}");
    }
}
