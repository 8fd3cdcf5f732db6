//! From config to a compiled [`Pipeline`]: shared by `sluice check` and `sluice run`.

use std::collections::HashMap;
use std::sync::Arc;

use sluice_config::FireFor;
use sluice_config::{Config, REPARTITION_SOURCE_PREFIX, SourceConfig};
use sluice_core::Clock;
use sluice_processors::alert::{AlertSpec, AlertingSpec, Fire};
use sluice_processors::function::{FunctionSpec, RouteSpec};
use sluice_processors::guard::{PublishDecl, RateSpec};
pub use sluice_processors::pipeline::Pipeline;
use sluice_processors::pipeline::{FunctionDecl, Role, StreamDecl, WindowDecl};
use sluice_processors::window::{WatermarkSpec, WindowKind, WindowSpec};

/// A limit as a processor's [`RateSpec`], if it has a rate.
pub fn rate_spec(l: &sluice_config::LimitConfig) -> Option<RateSpec> {
    let rate = l.rate?;
    Some(RateSpec {
        rate,
        burst: l.burst.unwrap_or(rate),
        sample: l.dead_letter_sample,
        block: l.mode == sluice_config::LimitMode::Block,
    })
}

/// Compiles the config's functions and windows against its streams; every problem as
/// a line.
pub fn build(config: &Config, clock: Arc<dyn Clock>) -> Result<Pipeline, Vec<String>> {
    let ms = |d: sluice_config::Duration| i64::try_from(d.0.as_millis()).unwrap_or(i64::MAX);
    let repartitioned = config.repartitioned_streams();
    let streams: HashMap<String, StreamDecl> = config
        .streams
        .iter()
        .filter_map(|(name, s)| {
            let decl = StreamDecl {
                schema: s.build_schema().ok()?.arrow().clone(),
                watermark: WatermarkSpec {
                    max_out_of_orderness_ms: ms(s.max_out_of_orderness),
                    idle_timeout_ms: Some(ms(s.idle_timeout)).filter(|&t| t > 0),
                    by_partition: config.sources.values().any(|source| {
                        source.stream() == Some(name.as_str())
                            && matches!(source, SourceConfig::Kafka(_) | SourceConfig::Kinesis(_))
                    }),
                    row_sources: repartitioned.contains_key(name),
                },
                store: s.store,
            };
            Some((name.clone(), decl))
        })
        .collect();
    // validate() has checked kinds and sizes; anything it let through is refused here.
    let windows: Vec<WindowDecl> = config
        .windows
        .iter()
        .filter_map(|(name, w)| {
            let kind = match w.kind.as_str() {
                "tumbling" => WindowKind::Tumbling {
                    size_ms: ms(w.size?),
                },
                "hopping" => WindowKind::Hopping {
                    size_ms: ms(w.size?),
                    slide_ms: ms(w.slide?),
                },
                "session" => WindowKind::Session { gap_ms: ms(w.gap?) },
                _ => return None,
            };
            Some(WindowDecl {
                input: w.input.clone(),
                spec: WindowSpec {
                    name: name.clone(),
                    key: format!("windows.{name}"),
                    kind,
                    group_by: w.group_by.clone(),
                    filter: w.filter.clone(),
                    select: w.select.clone(),
                    allowed_lateness_ms: ms(w.allowed_lateness),
                },
            })
        })
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
                limit: f.limit.as_ref().and_then(rate_spec),
                concurrency: f.concurrency,
            },
        })
        .collect();
    let alerts: Vec<AlertSpec> = config
        .alerts
        .iter()
        .map(|(name, a)| AlertSpec {
            name: name.clone(),
            key: format!("alerts.{name}"),
            input: a.input.clone(),
            condition: a.condition.clone(),
            clear: a.clear.clone(),
            value: a.value.clone(),
            group_by: a.group_by.clone(),
            fire: match a.fire_for {
                Some(FireFor::Duration(d)) => Fire::Duration { ms: ms(d) },
                Some(FireFor::Count(m)) => Fire::Count {
                    m,
                    n: a.of.unwrap_or(m),
                },
                None => Fire::Count {
                    m: 1,
                    n: a.of.unwrap_or(1),
                },
            },
            clear_for: a.clear_for,
            missing_after_ms: a.missing_after.map(ms),
            cooldown_ms: ms(a.cooldown),
            severity: a.severity.clone(),
            labels: a.labels.clone(),
            message: a.message.clone(),
            notify: a.notify.clone(),
        })
        .collect();
    let cap = AlertingSpec {
        per_second: config.alerting.max_notifications_per_second,
        burst: config.alerting.burst,
    };
    let publish: Vec<PublishDecl> = config
        .publish
        .iter()
        .map(|(name, p)| PublishDecl {
            key: format!("publish.{name}"),
            input: p.input.clone(),
            notifier: p.notifier.clone(),
        })
        .collect();
    let lines = |errors: Vec<sluice_processors::Error>| -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    };
    let mut pipeline =
        Pipeline::build_with_alerts(&functions, &windows, &alerts, Some(cap), &streams, clock)
            .map_err(lines)?;
    pipeline
        .guard(config.limits.max_hops, &publish)
        .map_err(lines)?;
    pipeline.set_window_budget(Some(config.limits.window_state.as_usize()));
    pipeline
        .instances()
        .keep_by_partition(partitioned_sources(config));
    for (stream, origins) in repartitioned {
        for origin in origins {
            pipeline.set_role(&origin, Role::StoreOnly);
        }
        pipeline.set_role(
            &format!("{REPARTITION_SOURCE_PREFIX}{stream}"),
            Role::ProcessOnly,
        );
    }
    Ok(pipeline)
}

/// The sources whose window state is kept per partition, so that it moves with the
/// partition: on a node of a cluster, the Kafka sources (their partitions move between
/// the nodes of the consumer group, and keep their keys).
pub(crate) fn partitioned_sources(config: &Config) -> std::collections::HashSet<String> {
    if config.node_id().is_none() {
        return Default::default();
    }
    config
        .sources
        .iter()
        .filter(|(_, s)| matches!(s, SourceConfig::Kafka(_)))
        .map(|(name, _)| name.clone())
        .collect()
}
