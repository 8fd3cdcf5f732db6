//! The first of the query endpoint's two read-only gates: the SQL must parse, with
//! DataFusion's own parser, to exactly one plain query (`SELECT`/`WITH`/`VALUES`, or
//! `EXPLAIN [ANALYZE]` of one). The second gate, in `sluice-sinks`, verifies the plan.
//!
//! It sees every string a user sends to `POST /api/query`, so it is fuzzed
//! (`fuzz/fuzz_targets/sql.rs`); it depends on `datafusion-sql` alone so that the
//! sanitizer build of the fuzz target stays small.

use datafusion_sql::parser::DFParser;
pub use datafusion_sql::parser::Statement;
use datafusion_sql::sqlparser::ast::Statement as SqlStatement;

/// The one plain query `sql` holds, or why it is refused (a sentence for the user).
pub fn read_only_statement(sql: &str) -> Result<Statement, String> {
    let mut statements = DFParser::parse_sql(sql).map_err(|e| format!("cannot parse SQL: {e}"))?;
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

    /// Nesting deep enough to overflow a recursive parser's stack is refused by the
    /// parser's depth limit, not a crash.
    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
        let err = read_only_statement(&deep).expect_err("too deep");
        assert!(err.contains("cannot parse SQL"), "{err}");
    }
}
