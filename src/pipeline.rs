//! From config to a compiled [`Pipeline`]: shared by `sluice check` and `sluice run`.

use std::collections::HashMap;

use sluice_config::Config;
use sluice_processors::function::{FunctionSpec, RouteSpec};
use sluice_processors::pipeline::{FunctionDecl, Pipeline};

/// Compiles the config's functions against its streams; every problem as a line.
pub(crate) fn build(config: &Config) -> Result<Pipeline, Vec<String>> {
    let streams: HashMap<String, _> = config
        .streams
        .iter()
        .filter_map(|(name, s)| Some((name.clone(), s.build_schema().ok()?.arrow().clone())))
        .collect();
    let functions: Vec<FunctionDecl> = config
        .functions
        .iter()
        .map(|(name, f)| FunctionDecl {
            key: format!("functions.{name}"),
            input: f.input.clone(),
            output: f.output.clone(),
            spec: FunctionSpec {
                name: name.clone(),
                filter: f.filter.clone(),
                select: f.select.clone(),
                routes: f
                    .routes
                    .iter()
                    .map(|r| RouteSpec {
                        when: r.when.clone(),
                        to: r.to.clone(),
                    })
                    .collect(),
            },
        })
        .collect();
    Pipeline::build(&functions, &streams)
        .map_err(|errors| errors.iter().map(ToString::to_string).collect())
}
