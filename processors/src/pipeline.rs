//! The set of functions of a config, wired by stream name.
//!
//! [`Pipeline::process`] takes one batch of stream S and returns it together with
//! everything derived from it: the output of every function reading S, and what
//! their routes took, recursively (a function may read another's output). Each
//! derived batch is one hop further; past [`MAX_DEPTH`] nothing more is derived, so a
//! cycle in the config cannot loop forever.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use sluice_core::StreamBatch;

use crate::function::{Function, FunctionSpec};
use crate::{Error, Result};

/// How many function hops one batch may make inside the pipeline.
pub const MAX_DEPTH: usize = 16;

/// A function as the config declares it.
#[derive(Debug, Clone)]
pub struct FunctionDecl {
    /// Config path, e.g. `functions.clean`, for error messages.
    pub key: String,
    /// The stream it reads.
    pub input: String,
    /// The stream its output lands in, if any.
    pub output: Option<String>,
    /// Filter, select and routes.
    pub spec: FunctionSpec,
}

#[derive(Debug)]
struct Node {
    function: Function,
    output: Option<Arc<str>>,
}

/// Compiled functions, indexed by the stream they read.
#[derive(Debug, Default)]
pub struct Pipeline {
    readers: HashMap<String, Vec<usize>>,
    nodes: Vec<Node>,
    schemas: HashMap<String, SchemaRef>,
}

impl Pipeline {
    /// Compiles `functions` against the declared `streams` (name → schema). A
    /// function may read another function's output or route; the schemas of every
    /// derived stream are found by compiling in dependency order. Returns every
    /// problem at once.
    pub fn build(
        functions: &[FunctionDecl],
        streams: &HashMap<String, SchemaRef>,
    ) -> Result<Self, Vec<Error>> {
        let mut schemas = streams.clone();
        let mut nodes: Vec<Option<Node>> = functions.iter().map(|_| None).collect();
        let mut handled = vec![false; functions.len()];
        let mut errors = Vec::new();
        // Each round compiles every function whose input schema is known; stops when
        // a round makes no progress (the rest read unknown streams or form a cycle).
        loop {
            let mut progress = false;
            for (i, decl) in functions.iter().enumerate() {
                if handled[i] {
                    continue;
                }
                let Some(input) = schemas.get(&decl.input).cloned() else {
                    continue;
                };
                progress = true;
                handled[i] = true;
                match Function::compile(&decl.spec, &input, &decl.key) {
                    Ok(function) => {
                        let produced = decl
                            .output
                            .iter()
                            .map(|o| (o.clone(), format!("{}.output", decl.key)))
                            .chain(decl.spec.routes.iter().enumerate().map(|(r, route)| {
                                (route.to.clone(), format!("{}.routes[{r}].to", decl.key))
                            }));
                        for (stream, key) in produced {
                            if let Some(existing) = schemas.get(&stream) {
                                if existing.fields() != function.output_schema().fields() {
                                    errors.push(Error::Config {
                                        key,
                                        message: format!(
                                            "stream {stream:?} already exists with other columns"
                                        ),
                                    });
                                }
                            } else {
                                schemas.insert(stream, function.output_schema().clone());
                            }
                        }
                        nodes[i] = Some(Node {
                            function,
                            output: decl.output.as_deref().map(Arc::from),
                        });
                    }
                    Err(mut more) => errors.append(&mut more),
                }
            }
            if !progress {
                break;
            }
        }
        for (i, decl) in functions.iter().enumerate() {
            if !handled[i] {
                errors.push(Error::Config {
                    key: format!("{}.input", decl.key),
                    message: format!(
                        "stream {:?} is not declared and no function produces it",
                        decl.input
                    ),
                });
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, decl) in functions.iter().enumerate() {
            readers.entry(decl.input.clone()).or_default().push(i);
        }
        Ok(Self {
            readers,
            nodes: nodes.into_iter().flatten().collect(),
            schemas,
        })
    }

    /// The schema of every stream: declared and derived.
    pub fn schemas(&self) -> &HashMap<String, SchemaRef> {
        &self.schemas
    }

    /// `batch` plus every batch derived from it, in order. A function that fails on a
    /// batch is reported in the error list and its outputs are skipped; the rest goes on.
    pub fn process(&self, batch: StreamBatch, out: &mut Vec<StreamBatch>, errors: &mut Vec<Error>) {
        let mut pending = vec![(batch, 0usize)];
        while let Some((batch, depth)) = pending.pop() {
            if depth < MAX_DEPTH
                && let Some(readers) = self.readers.get(&*batch.stream)
            {
                for &i in readers {
                    let node = &self.nodes[i];
                    match node.function.process(&batch.batch) {
                        Ok((output, routed)) => {
                            if let Some(stream) = &node.output
                                && output.num_rows() > 0
                            {
                                pending.push((
                                    StreamBatch {
                                        stream: stream.clone(),
                                        batch: output,
                                    },
                                    depth + 1,
                                ));
                            }
                            pending.extend(routed.into_iter().map(|b| (b, depth + 1)));
                        }
                        Err(e) => errors.push(e),
                    }
                }
            }
            out.push(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_core::StreamSchema;

    use super::*;
    use crate::function::RouteSpec;

    fn decl(name: &str, input: &str, output: Option<&str>, filter: &str) -> FunctionDecl {
        FunctionDecl {
            key: format!("functions.{name}"),
            input: input.into(),
            output: output.map(str::to_owned),
            spec: FunctionSpec {
                name: name.into(),
                filter: Some(filter.into()),
                ..FunctionSpec::default()
            },
        }
    }

    fn streams() -> HashMap<String, SchemaRef> {
        HashMap::from([(
            "telemetry".to_owned(),
            StreamSchema::builtin("telemetry").unwrap().arrow().clone(),
        )])
    }

    #[test]
    fn chains_compile_in_dependency_order_and_unknown_inputs_are_named() {
        // `hot` reads `clean`'s output although it is declared first.
        let functions = vec![
            decl("hot", "clean", Some("hot"), "temperature > 80"),
            decl("clean", "telemetry", Some("clean"), "status <> 'error'"),
        ];
        let p = Pipeline::build(&functions, &streams()).unwrap();
        assert!(p.schemas().contains_key("clean") && p.schemas().contains_key("hot"));

        let errors =
            Pipeline::build(&[decl("x", "nowhere", None, "true")], &streams()).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "functions.x.input: stream \"nowhere\" is not declared and no function produces it"
        );
    }

    #[test]
    fn a_cycle_stops_at_max_depth() {
        let mut f = decl("loop", "telemetry", Some("telemetry"), "true");
        f.spec.routes = vec![RouteSpec {
            when: "true".into(),
            to: "telemetry".into(),
        }];
        let p = Pipeline::build(&[f], &streams()).unwrap();
        let batch = crate::test_support::telemetry(&[("a", Some(1.0), "ok")]);
        let mut out = Vec::new();
        let mut errors = Vec::new();
        p.process(
            StreamBatch {
                stream: "telemetry".into(),
                batch,
            },
            &mut out,
            &mut errors,
        );
        assert!(errors.is_empty());
        // The input, then per hop one output and one route, up to MAX_DEPTH hops.
        let expected: usize = (0..MAX_DEPTH)
            .map(|d| 2usize.pow(d as u32 + 1))
            .sum::<usize>()
            + 1;
        assert_eq!(out.len(), expected);
    }
}
