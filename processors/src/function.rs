//! Stateless functions: a filter, a projection and routes, declared as SQL text.
//!
//! A function reads one stream. Its SQL is parsed and planned once, at
//! [`Function::compile`], into DataFusion physical expressions; [`Function::process`]
//! then evaluates them on each `RecordBatch` with Arrow kernels: no per-row
//! interpretation and no SQL planning per batch.
//!
//! The output keeps every system column and the stream's event-time and key columns
//! (added after the selected columns if the projection leaves them out), so windows,
//! sinks and the loop guard downstream see what they need.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::DFSchema;
use datafusion::execution::context::SessionState;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::ast::{SelectItem, SetExpr, Statement as SqlStatement};
use sluice_core::StreamBatch;
use sluice_core::schema::{EVENT_TIME_META, KEY_META, system_fields};

use crate::{Error, Result};

/// What the config says about a function.
#[derive(Debug, Clone, Default)]
pub struct FunctionSpec {
    /// The function's name (its config key).
    pub name: String,
    /// Keep only rows for which this SQL predicate is true (null counts as false).
    pub filter: Option<String>,
    /// SQL select items, e.g. `"temperature * 9 / 5 + 32 AS temperature_f"`; `"*"` keeps
    /// every declared column. Empty: keep every column unchanged.
    pub select: Vec<String>,
    /// Routes: rows of the output for which `when` holds also go to stream `to`.
    pub routes: Vec<RouteSpec>,
    /// Rows per second the function takes; the excess is shed (see
    /// [`crate::guard::RowLimit`]).
    pub limit: Option<crate::guard::RateSpec>,
    /// Threads one batch may use at once, at most (0 counts as 1): a batch of at
    /// least 2 × [`MIN_SLICE_ROWS`] rows is split into slices evaluated in parallel.
    pub concurrency: usize,
}

/// The fewest rows a parallel slice gets: below it, starting a thread costs more than
/// it saves.
pub const MIN_SLICE_ROWS: usize = 4096;

/// One route of a function.
#[derive(Debug, Clone, Default)]
pub struct RouteSpec {
    /// SQL predicate over the function's output columns.
    pub when: String,
    /// Target stream.
    pub to: String,
}

/// A compiled function.
#[derive(Debug)]
pub struct Function {
    name: String,
    filter: Option<Arc<dyn PhysicalExpr>>,
    /// `None` keeps the (filtered) input columns as they are.
    projection: Option<Vec<Arc<dyn PhysicalExpr>>>,
    output_schema: SchemaRef,
    routes: Vec<(Arc<dyn PhysicalExpr>, Arc<str>)>,
    concurrency: usize,
}

/// One pass's result: the output rows and, per route, the rows it takes (if any).
type Pass = (RecordBatch, Vec<Option<RecordBatch>>);

impl Function {
    /// Compiles `spec` against the input stream's schema. `key` is the config path of
    /// the function (e.g. `functions.clean`); every problem is returned, each naming
    /// its key and quoting DataFusion.
    pub fn compile(spec: &FunctionSpec, input: &SchemaRef, key: &str) -> Result<Self, Vec<Error>> {
        let state = crate::session().state();
        let mut errors = Vec::new();
        let input_df = match DFSchema::try_from(input.as_ref().clone()) {
            Ok(s) => s,
            Err(e) => return Err(vec![config(key, format!("input schema: {e}"))]),
        };

        let filter = spec.filter.as_deref().and_then(|sql| {
            compile_predicate(&state, sql, input, &input_df, &format!("{key}.filter"))
                .map_err(|e| errors.push(e))
                .ok()
        });

        let (projection, output_schema) = if spec.select.is_empty() {
            (None, input.clone())
        } else {
            match compile_projection(&state, &spec.select, input, &input_df, key) {
                Ok((exprs, schema)) => (Some(exprs), schema),
                Err(mut more) => {
                    errors.append(&mut more);
                    (None, input.clone())
                }
            }
        };

        let mut routes = Vec::new();
        if let Ok(output_df) = DFSchema::try_from(output_schema.as_ref().clone()) {
            for (i, route) in spec.routes.iter().enumerate() {
                let path = format!("{key}.routes[{i}].when");
                match compile_predicate(&state, &route.when, &output_schema, &output_df, &path) {
                    Ok(expr) => routes.push((expr, Arc::from(route.to.as_str()))),
                    Err(e) => errors.push(e),
                }
            }
        }
        if errors.is_empty() {
            Ok(Self {
                name: spec.name.clone(),
                filter,
                projection,
                output_schema,
                routes,
                concurrency: spec.concurrency.max(1),
            })
        } else {
            Err(errors)
        }
    }

    /// The schema of the function's output.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Applies the function to one batch: the output rows, and for each route that
    /// matched any row, the rows it takes (`(stream, batch)`). With `concurrency` above
    /// 1, a large batch is split into slices evaluated on scoped threads; the output
    /// is then one batch per slice, in order (joining them would copy every row).
    pub fn process(&self, batch: &RecordBatch) -> Result<(Vec<RecordBatch>, Vec<StreamBatch>)> {
        let slices = self
            .concurrency
            .min(batch.num_rows() / MIN_SLICE_ROWS)
            .max(1);
        let passes = if slices == 1 {
            vec![self.pass(batch)?]
        } else {
            self.passes(batch, slices)?
        };
        let mut outputs = Vec::with_capacity(passes.len());
        let mut routed = Vec::new();
        for (output, routes) in passes {
            outputs.push(output);
            routed.extend(
                routes
                    .into_iter()
                    .zip(&self.routes)
                    .filter_map(|(rows, (_, stream))| {
                        Some(StreamBatch::new(stream.clone(), rows?))
                    }),
            );
        }
        Ok((outputs, routed))
    }

    /// `slices` near-equal slices of `batch`, each through [`Function::pass`] (the
    /// first on this thread), in order.
    fn passes(&self, batch: &RecordBatch, slices: usize) -> Result<Vec<Pass>> {
        let rows = batch.num_rows();
        let parts: Vec<RecordBatch> = (0..slices)
            .map(|i| {
                let (start, end) = (rows * i / slices, rows * (i + 1) / slices);
                batch.slice(start, end - start)
            })
            .collect();
        let results: Vec<Result<Pass>> = std::thread::scope(|scope| {
            let others: Vec<_> = parts[1..]
                .iter()
                .map(|part| scope.spawn(|| self.pass(part)))
                .collect();
            let mut results = vec![self.pass(&parts[0])];
            results.extend(others.into_iter().map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(self.bug("a function slice's thread panicked")))
            }));
            results
        });
        results.into_iter().collect()
    }

    /// Filter, projection and route masks over `batch`, on this thread.
    fn pass(&self, batch: &RecordBatch) -> Result<Pass> {
        let filtered = match &self.filter {
            Some(predicate) => keep(predicate, batch).map_err(|e| self.eval(e))?,
            None => batch.clone(),
        };
        let output = match &self.projection {
            Some(exprs) => {
                let columns = exprs
                    .iter()
                    .map(|e| self.evaluate(e, &filtered))
                    .collect::<Result<Vec<ArrayRef>>>()?;
                RecordBatch::try_new(self.output_schema.clone(), columns)
                    .map_err(|e| self.eval(e.into()))?
            }
            None => filtered,
        };
        let mut routed = Vec::with_capacity(self.routes.len());
        for (predicate, _) in &self.routes {
            let mask = self.evaluate(predicate, &output)?;
            let mask = mask
                .as_boolean_opt()
                .ok_or_else(|| self.bug("route is not boolean"))?;
            routed.push(if mask.true_count() > 0 {
                Some(filter_record_batch(&output, mask).map_err(|e| self.eval(e.into()))?)
            } else {
                None
            });
        }
        Ok((output, routed))
    }

    fn evaluate(&self, expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Result<ArrayRef> {
        expr.evaluate(batch)
            .and_then(|v| v.into_array(batch.num_rows()))
            .map_err(|e| self.eval(e))
    }

    fn eval(&self, source: datafusion::error::DataFusionError) -> Error {
        Error::Eval {
            function: self.name.clone(),
            source,
        }
    }

    fn bug(&self, what: &str) -> Error {
        self.eval(datafusion::error::DataFusionError::Internal(
            what.to_owned(),
        ))
    }
}

/// The rows of `batch` for which the boolean `predicate` is true.
fn keep(
    predicate: &Arc<dyn PhysicalExpr>,
    batch: &RecordBatch,
) -> datafusion::error::Result<RecordBatch> {
    let mask = predicate
        .evaluate(batch)
        .and_then(|v| v.into_array(batch.num_rows()))?;
    let mask = mask.as_boolean_opt().ok_or_else(|| {
        datafusion::error::DataFusionError::Internal("a filter is not boolean".into())
    })?;
    Ok(filter_record_batch(batch, mask)?)
}

/// A SQL predicate compiled once for one schema and applied to its batches (the
/// filter of `sluice tap`).
#[derive(Debug, Clone)]
pub struct RowFilter {
    predicate: Arc<dyn PhysicalExpr>,
}

impl RowFilter {
    /// Compiles the boolean predicate `sql` over `schema`; the error says what is
    /// wrong with it (a parse error, an unknown column, not a boolean).
    pub fn compile(sql: &str, schema: &SchemaRef) -> Result<Self> {
        Ok(Self {
            predicate: predicate(sql, schema, "filter")?,
        })
    }

    /// The rows of `batch` the predicate keeps (`batch` has the compiled schema).
    pub fn apply(&self, batch: &RecordBatch) -> datafusion::error::Result<RecordBatch> {
        keep(&self.predicate, batch)
    }
}

/// Compiles a boolean SQL predicate over `input`; `key` is its config path.
pub(crate) fn compile_predicate(
    state: &SessionState,
    sql: &str,
    input: &SchemaRef,
    input_df: &DFSchema,
    key: &str,
) -> Result<Arc<dyn PhysicalExpr>> {
    let expr = compile_expr(state, sql, input_df, key)?;
    match expr.data_type(input) {
        Ok(DataType::Boolean) => Ok(expr),
        Ok(other) => Err(config(
            key,
            format!("{sql:?} is {other}, not a boolean predicate"),
        )),
        Err(e) => Err(config(key, e.to_string())),
    }
}

/// Compiles the predicate `sql` over `input` in a fresh session (see [`compile_predicate`]).
pub(crate) fn predicate(sql: &str, input: &SchemaRef, key: &str) -> Result<Arc<dyn PhysicalExpr>> {
    let state = crate::session().state();
    let input_df = DFSchema::try_from(input.as_ref().clone())
        .map_err(|e| config(key, format!("input schema: {e}")))?;
    compile_predicate(&state, sql, input, &input_df, key)
}

/// Compiles the scalar expression `sql` over `input` in a fresh session.
pub(crate) fn compile_value(
    sql: &str,
    input: &SchemaRef,
    key: &str,
) -> Result<Arc<dyn PhysicalExpr>> {
    let state = crate::session().state();
    let input_df = DFSchema::try_from(input.as_ref().clone())
        .map_err(|e| config(key, format!("input schema: {e}")))?;
    compile_expr(&state, sql, &input_df, key)
}

fn config(key: &str, message: impl Into<String>) -> Error {
    Error::Config {
        key: key.to_owned(),
        message: message.into(),
    }
}

fn compile_expr(
    state: &SessionState,
    sql: &str,
    schema: &DFSchema,
    key: &str,
) -> Result<Arc<dyn PhysicalExpr>> {
    let logical = state
        .create_logical_expr(sql, schema)
        .map_err(|e| config(key, format!("{sql:?}: {e}")))?;
    state
        .create_physical_expr(logical, schema)
        .map_err(|e| config(key, format!("{sql:?}: {e}")))
}

/// Compiled select items and the schema they produce.
type Projection = (Vec<Arc<dyn PhysicalExpr>>, SchemaRef);

/// Compiles the select items; the output schema is the selected columns, then the
/// event-time and key columns if not selected, then the system columns.
fn compile_projection(
    state: &SessionState,
    select: &[String],
    input: &SchemaRef,
    input_df: &DFSchema,
    key: &str,
) -> Result<Projection, Vec<Error>> {
    let mut errors = Vec::new();
    let mut exprs: Vec<Arc<dyn PhysicalExpr>> = Vec::new();
    let mut fields: Vec<Field> = Vec::new();
    let system: Vec<Field> = system_fields();
    let is_system = |name: &str| system.iter().any(|f| f.name() == name);
    let push_column =
        |name: &str, exprs: &mut Vec<Arc<dyn PhysicalExpr>>, fields: &mut Vec<Field>| {
            if let (Ok(i), false) = (
                input.index_of(name),
                fields.iter().any(|f| f.name() == name),
            ) {
                exprs.push(Arc::new(
                    datafusion::physical_expr::expressions::Column::new(name, i),
                ));
                fields.push(input.field(i).clone());
            }
        };
    for (i, item) in select.iter().enumerate() {
        let path = format!("{key}.select[{i}]");
        let parsed = match select_item(item) {
            Ok(p) => p,
            Err(message) => {
                errors.push(config(&path, message));
                continue;
            }
        };
        match parsed {
            Item::Wildcard => {
                for field in input.fields().iter().filter(|f| !is_system(f.name())) {
                    push_column(field.name(), &mut exprs, &mut fields);
                }
            }
            Item::Expr { sql, alias } => match compile_expr(state, &sql, input_df, &path) {
                Ok(expr) => {
                    let name = alias.unwrap_or_else(|| sql.clone());
                    if is_system(&name) || fields.iter().any(|f| f.name() == &name) {
                        errors.push(config(
                            &path,
                            format!("output column {name:?} is already taken"),
                        ));
                        continue;
                    }
                    match (expr.data_type(input), expr.nullable(input)) {
                        (Ok(ty), Ok(nullable)) => {
                            fields.push(Field::new(name, ty, nullable));
                            exprs.push(expr);
                        }
                        (Err(e), _) | (_, Err(e)) => errors.push(config(&path, e.to_string())),
                    }
                }
                Err(e) => errors.push(e),
            },
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let metadata = input.metadata().clone();
    for meta in [EVENT_TIME_META, KEY_META] {
        if let Some(name) = metadata.get(meta) {
            push_column(name, &mut exprs, &mut fields);
        }
    }
    for field in &system {
        push_column(field.name(), &mut exprs, &mut fields);
    }
    Ok((exprs, Arc::new(Schema::new_with_metadata(fields, metadata))))
}

enum Item {
    Wildcard,
    Expr { sql: String, alias: Option<String> },
}

/// Splits one select item into its expression text and alias with the SQL parser.
fn select_item(item: &str) -> Result<Item, String> {
    let statements =
        DFParser::parse_sql(&format!("SELECT {item}")).map_err(|e| format!("{item:?}: {e}"))?;
    let projection = match statements.front() {
        Some(Statement::Statement(s)) if statements.len() == 1 => match s.as_ref() {
            SqlStatement::Query(q) => match q.body.as_ref() {
                SetExpr::Select(select) if select.from.is_empty() => select.projection.clone(),
                _ => return Err(format!("{item:?} is not a single select item")),
            },
            _ => return Err(format!("{item:?} is not a single select item")),
        },
        _ => return Err(format!("{item:?} is not a single select item")),
    };
    match projection.as_slice() {
        [SelectItem::Wildcard(_)] => Ok(Item::Wildcard),
        [SelectItem::UnnamedExpr(e)] => Ok(Item::Expr {
            sql: e.to_string(),
            alias: None,
        }),
        [SelectItem::ExprWithAlias { expr, alias }] => Ok(Item::Expr {
            sql: expr.to_string(),
            alias: Some(alias.value.clone()),
        }),
        _ => Err(format!("{item:?} is not a single select item")),
    }
}

#[cfg(test)]
mod tests;
