//! TOML text → [`Config`], reporting every problem at once.

use std::fmt;

use serde::de::DeserializeOwned;

use crate::model::{Config, NotifierConfig, SourceConfig};

/// One problem in a config, naming the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the key, e.g. `sources.plant.qos`.
    pub key: String,
    /// What is wrong, as a sentence.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

const TOP_LEVEL: &[&str] = &[
    "http",
    "cluster",
    "runtime",
    "broker",
    "lake",
    "decode",
    "sources",
    "streams",
    "functions",
    "windows",
    "alerts",
    "notifiers",
    "alerting",
    "limits",
    "publish",
];

impl Config {
    /// Parses and validates a config file's text. On failure, every problem found.
    pub fn from_toml(text: &str) -> Result<Config, Vec<ConfigError>> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            vec![ConfigError {
                key: "(file)".into(),
                message: format!("not valid TOML: {}", e.message()),
            }]
        })?;
        let mut errors = Vec::new();
        let mut config = Config::default();
        for (key, value) in table {
            match key.as_str() {
                "http" => section(&key, value, &mut errors).map(|v| config.http = v),
                "broker" => section(&key, value, &mut errors).map(|v| config.broker = v),
                "lake" => section(&key, value, &mut errors).map(|v| config.lake = v),
                "cluster" => section(&key, value, &mut errors).map(|v| config.cluster = Some(v)),
                "runtime" => section(&key, value, &mut errors).map(|v| config.runtime = v),
                "decode" => section(&key, value, &mut errors).map(|v| config.decode = v),
                "sources" => named(&key, value, &mut errors, source).map(|v| config.sources = v),
                "streams" => named(&key, value, &mut errors, |name, v, errs| {
                    section(&format!("streams.{name}"), v, errs)
                })
                .map(|v| config.streams = v),
                "functions" => named(&key, value, &mut errors, |name, v, errs| {
                    section(&format!("functions.{name}"), v, errs)
                })
                .map(|v| config.functions = v),
                "windows" => named(&key, value, &mut errors, |name, v, errs| {
                    section(&format!("windows.{name}"), v, errs)
                })
                .map(|v| config.windows = v),
                "alerts" => named(&key, value, &mut errors, |name, v, errs| {
                    section(&format!("alerts.{name}"), v, errs)
                })
                .map(|v| config.alerts = v),
                "notifiers" => {
                    named(&key, value, &mut errors, notifier).map(|v| config.notifiers = v)
                }
                "alerting" => section(&key, value, &mut errors).map(|v| config.alerting = v),
                "limits" => section(&key, value, &mut errors).map(|v| config.limits = v),
                "publish" => named(&key, value, &mut errors, |name, v, errs| {
                    section(&format!("publish.{name}"), v, errs)
                })
                .map(|v| config.publish = v),
                _ => {
                    errors.push(ConfigError {
                        key: key.clone(),
                        message: format!(
                            "unknown section; expected one of {}",
                            TOP_LEVEL.join(", ")
                        ),
                    });
                    None
                }
            };
        }
        config.fill_default_streams();
        config.fill_repartition();
        if let Err(more) = config.validate() {
            errors.extend(more);
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }
}

/// Deserializes a `[parent.<name>]` table of entries, each with `each`.
fn named<T>(
    parent: &str,
    value: toml::Value,
    errors: &mut Vec<ConfigError>,
    each: impl Fn(&str, toml::Value, &mut Vec<ConfigError>) -> Option<T>,
) -> Option<std::collections::BTreeMap<String, T>> {
    let toml::Value::Table(table) = value else {
        errors.push(ConfigError {
            key: parent.into(),
            message: "must be a table of named entries".into(),
        });
        return None;
    };
    Some(
        table
            .into_iter()
            .filter_map(|(name, v)| each(&name, v, errors).map(|t| (name, t)))
            .collect(),
    )
}

fn source(name: &str, value: toml::Value, errors: &mut Vec<ConfigError>) -> Option<SourceConfig> {
    let path = format!("sources.{name}");
    let (kind, table) = tagged(&path, value, &["mqtt", "kafka", "kinesis"], errors)?;
    match kind.as_str() {
        "mqtt" => section(&path, table, errors).map(SourceConfig::Mqtt),
        "kafka" => section(&path, table, errors).map(SourceConfig::Kafka),
        _ => section(&path, table, errors).map(SourceConfig::Kinesis),
    }
}

fn notifier(
    name: &str,
    value: toml::Value,
    errors: &mut Vec<ConfigError>,
) -> Option<NotifierConfig> {
    let path = format!("notifiers.{name}");
    let (kind, table) = tagged(&path, value, &["mqtt", "webhook", "kafka"], errors)?;
    match kind.as_str() {
        "mqtt" => section(&path, table, errors).map(NotifierConfig::Mqtt),
        "webhook" => section(&path, table, errors).map(NotifierConfig::Webhook),
        _ => section(&path, table, errors).map(NotifierConfig::Kafka),
    }
}

/// Splits a `type`-tagged table into its type (one of `kinds`) and the other keys.
fn tagged(
    path: &str,
    value: toml::Value,
    kinds: &[&str],
    errors: &mut Vec<ConfigError>,
) -> Option<(String, toml::Value)> {
    let toml::Value::Table(mut table) = value else {
        errors.push(ConfigError {
            key: path.into(),
            message: "must be a table".into(),
        });
        return None;
    };
    let expected = kinds
        .iter()
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let kind = table.remove("type");
    match kind.as_ref().and_then(toml::Value::as_str) {
        Some(k) if kinds.contains(&k) => Some((k.to_owned(), toml::Value::Table(table))),
        Some(other) => {
            errors.push(ConfigError {
                key: format!("{path}.type"),
                message: format!("unknown type {other:?}; expected one of {expected}"),
            });
            None
        }
        None => {
            errors.push(ConfigError {
                key: format!("{path}.type"),
                message: format!("is required (one of {expected})"),
            });
            None
        }
    }
}

/// Deserializes one section, reporting unknown keys and wrongly typed values one by one:
/// after each such error the offending key is set aside and the rest is tried again,
/// so a single section yields all of its problems.
/// Removes the key at `segments` (a path through nested tables); whether it was there.
fn remove_at(table: &mut toml::Table, segments: &[String]) -> bool {
    match segments {
        [] => false,
        [last] => table.remove(last).is_some(),
        [first, rest @ ..] => match table.get_mut(first) {
            Some(toml::Value::Table(inner)) => remove_at(inner, rest),
            _ => false,
        },
    }
}

fn section<T: DeserializeOwned>(
    path: &str,
    value: toml::Value,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    let toml::Value::Table(mut table) = value else {
        errors.push(ConfigError {
            key: path.into(),
            message: "must be a table".into(),
        });
        return None;
    };
    let mut set_aside: Vec<String> = Vec::new();
    // Each round removes one key, so this ends.
    loop {
        let attempt: Result<T, _> =
            serde_path_to_error::deserialize(toml::Value::Table(table.clone()));
        let error = match attempt {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        let message = error.inner().to_string();
        let field = error
            .path()
            .iter()
            .next()
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty() && s != "?");
        if let Some(unknown) = between_backticks(&message, "unknown field `") {
            // The key may sit in a nested table (`[broker.acl]`): its path is the
            // error's. Removing it is what makes the next round get further; a key
            // that cannot be removed ends the section here (it once looped forever,
            // listing the same key until memory ran out: found by the config fuzzer).
            let mut at: Vec<String> = error.path().iter().map(|s| s.to_string()).collect();
            if at.last() != Some(&unknown) {
                at.push(unknown);
            }
            let key = at.join(".");
            errors.push(ConfigError {
                key: format!("{path}.{key}"),
                message: format!(
                    "unknown key; {}",
                    message.split_once(", ").map_or("", |(_, rest)| rest)
                ),
            });
            if !remove_at(&mut table, &at) {
                return None;
            }
            set_aside.push(key);
            continue;
        }
        if let Some(missing) = between_backticks(&message, "missing field `") {
            if !set_aside.contains(&missing) {
                errors.push(ConfigError {
                    key: format!("{path}.{missing}"),
                    message: "is required".into(),
                });
            }
            return None;
        }
        match field {
            Some(f) if table.contains_key(&f) => {
                errors.push(ConfigError {
                    key: format!("{path}.{f}"),
                    message,
                });
                table.remove(&f);
                set_aside.push(f);
            }
            _ => {
                errors.push(ConfigError {
                    key: path.into(),
                    message,
                });
                return None;
            }
        }
    }
}

fn between_backticks(message: &str, prefix: &str) -> Option<String> {
    let rest = message.split_once(prefix)?.1;
    Some(rest.split_once('`')?.0.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_in_a_nested_table_is_named_by_its_whole_path() {
        for (text, key) in [
            (
                "[broker]\nenabled = true\n[broker.acl]\npuilish = [\"a/#\"]\n",
                "broker.acl.puilish",
            ),
            ("[lake.s3]\nregoin = \"x\"\n", "lake.s3.regoin"),
        ] {
            let errors = Config::from_toml(text).expect_err(text);
            assert!(errors.iter().any(|e| e.key == key), "{text}: {errors:?}");
            assert!(errors.len() < 10, "each problem once: {errors:?}");
        }
    }

    #[test]
    fn a_good_file_loads() {
        let text = r#"
            [broker]
            enabled = true
            [lake]
            dir = "/tmp/lake"
            roll_interval = "1s"
            [sources.plant]
            type = "mqtt"
            url = "mqtt://127.0.0.1:1883"
            topics = ["devices/+/telemetry"]
            stream = "telemetry"
            [streams.telemetry]
            schema = "telemetry"
        "#;
        let config = Config::from_toml(text).expect("valid");
        assert_eq!(config.lake.roll_interval, crate::Duration::from_secs(1));
        assert_eq!(config.sources.len(), 1);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
            [http]
            listen = "nowhere"
            [lake]
            roll_size = "huge"
            zstd_level = 40
            colour = "blue"
            [lake.maintenance]
            memory = "1MB"
            [sources.plant]
            type = "mqtt"
            url = "http://x"
            tpoics = ["a"]
            topics = ["a/#/b"]
            qos = "one"
            stream = "nope"
            [sources.bus]
            type = "carrier-pigeon"
            [streams.telemetry]
            schema = "weather"
            [extras]
            x = 1
        "#;
        let errors = Config::from_toml(text).expect_err("invalid");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for want in [
            "http.listen",
            "lake.roll_size",
            "lake.colour",
            "sources.plant.tpoics",
            "sources.plant.qos",
            "sources.bus.type",
            "extras",
            "streams.telemetry.schema",
        ] {
            assert!(keys.contains(&want), "missing {want} in {errors:#?}");
        }
        // Once the badly typed keys are set aside, the rest is still validated.
        assert!(keys.contains(&"lake.zstd_level"), "{errors:#?}");
        assert!(keys.contains(&"lake.maintenance.memory"), "{errors:#?}");
        assert!(keys.contains(&"sources.plant.stream"), "{errors:#?}");
        assert!(keys.contains(&"sources.plant.url"), "{errors:#?}");
        assert!(errors.iter().all(|e| !e.message.is_empty()));
    }

    /// Values at the edges that once reached a panic (a modulo by a slide of 0 ms, a
    /// channel too long to make) or an overflow (a deadline 10^9 years away) are
    /// problems of their keys.
    #[test]
    fn values_past_what_the_service_can_use_are_problems_of_their_keys() {
        let window = |extra: &str| {
            format!(
                "[windows.w]\ninput = \"telemetry\"\ngroup_by = [\"device_id\"]\nselect = [\"count(*) AS n\"]\n{extra}"
            )
        };
        for (text, key) in [
            (
                window("kind = \"hopping\"\nsize = \"1m\"\nslide = \"500us\""),
                "windows.w.slide",
            ),
            (window("kind = \"tumbling\"\nsize = \"900us\""), "windows.w.size"),
            (
                window("kind = \"session\"\ngap = \"1ns\""),
                "windows.w.gap",
            ),
            (
                "[lake]\nroll_interval = \"1000000000y\"\n".into(),
                "lake.roll_interval",
            ),
            (
                "[limits]\nqueue_batches = 3000000000000000000\n".into(),
                "limits.queue_batches",
            ),
            (
                "[notifiers.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\nqueue = 3000000000000000000\n".into(),
                "notifiers.hook.queue",
            ),
        ] {
            let errors = Config::from_toml(&text).expect_err(&text);
            assert!(errors.iter().any(|e| e.key == key), "{text}: {errors:#?}");
        }
        let longest = format!(
            "[lake]\nroll_interval = \"{}\"\n",
            crate::units::MAX_DURATION
        );
        Config::from_toml(&longest).expect("the longest duration is taken");
    }

    #[test]
    fn a_cluster_node_is_named_by_its_id_or_host_and_port() {
        let config = Config::from_toml("[cluster]\nnode_id = \"edge-1\"").expect("valid");
        assert_eq!(config.node_id().as_deref(), Some("edge-1"));
        let mut config = Config::from_toml("[cluster]").expect("valid");
        config.http.listen = "127.0.0.1:8181".into();
        let id = config.node_id().expect("a node id");
        assert!(
            id.ends_with("-8181") && crate::ClusterConfig::valid_node_id(&id),
            "{id}"
        );
        assert_eq!(Config::from_toml("").expect("valid").node_id(), None);
        let errors = Config::from_toml("[cluster]\nnode_id = \"a/b\"").expect_err("invalid");
        assert_eq!(errors[0].key, "cluster.node_id", "{errors:?}");
    }

    #[test]
    fn a_repartitioned_stream_gets_its_kafka_source_and_bad_settings_are_named() {
        let mqtt = |name: &str, qos: u8| {
            format!(
                "[sources.{name}]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:1883\"\ntopics = [\"plant/#\"]\nqos = {qos}\nstream = \"telemetry\"\n"
            )
        };
        let cluster =
            "[cluster]\nnode_id = \"a\"\n[cluster.repartition]\nbrokers = \"127.0.0.1:9092\"\n";
        let config = Config::from_toml(&format!("{cluster}{}", mqtt("plant", 1))).expect("valid");
        let Some(crate::SourceConfig::Kafka(k)) = config.sources.get("repartition-telemetry")
        else {
            panic!("no repartition source: {:?}", config.sources.keys());
        };
        assert!(k.repartition);
        assert_eq!(k.topics, ["sluice-repartition-telemetry"]);
        assert_eq!(
            (k.stream.as_str(), k.brokers.as_str()),
            ("telemetry", "127.0.0.1:9092")
        );
        assert_eq!(
            config.repartitioned_streams(),
            [(
                "telemetry".to_owned(),
                vec!["plant".to_owned(), "http:telemetry".to_owned()]
            )]
            .into()
        );
        assert!(
            config
                .notes
                .iter()
                .any(|n| n.contains("repartition-telemetry")),
            "{:?}",
            config.notes
        );

        // Without [cluster.repartition], keyed work over MQTT in a cluster is noted.
        let config = Config::from_toml(&format!("[cluster]\n{}", mqtt("plant", 1))).expect("valid");
        assert!(!config.sources.contains_key("repartition-telemetry"));
        assert!(
            config
                .notes
                .iter()
                .any(|n| n.contains("[cluster.repartition]")),
            "{:?}",
            config.notes
        );

        // A Kinesis stream's shards are origins too; without repartition, keyed work
        // over Kinesis in a cluster is noted.
        let kinesis = "[sources.shards]\ntype = \"kinesis\"\nkinesis_stream = \"t\"\nstream = \"telemetry\"\n";
        let window = "[windows.w]\ninput = \"telemetry\"\nkind = \"tumbling\"\nsize = \"1m\"\ngroup_by = [\"device_id\"]\nselect = [\"count(*) AS n\"]\n";
        let config = Config::from_toml(&format!("{cluster}{kinesis}")).expect("valid");
        assert_eq!(
            config.repartitioned_streams(),
            [(
                "telemetry".to_owned(),
                vec!["shards".to_owned(), "http:telemetry".to_owned()]
            )]
            .into()
        );
        assert!(config.sources.contains_key("repartition-telemetry"));
        let config = Config::from_toml(&format!("[cluster]\n{kinesis}{window}")).expect("valid");
        assert!(
            config
                .notes
                .iter()
                .any(|n| n.contains("Kinesis") && n.contains("[cluster.repartition]")),
            "{:?}",
            config.notes
        );

        let bad = format!(
            "[lake]\ncheckpoint_interval = \"0s\"\n[cluster]\n[cluster.repartition]\nbrokers = \" \"\npartitions = 0\ntopic_prefix = \"a b\"\n{}{}{kinesis}",
            mqtt("plant", 0),
            mqtt("repartition-x", 1)
        );
        let errors = Config::from_toml(&bad).expect_err("invalid");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for key in [
            "cluster.repartition.brokers",
            "cluster.repartition.partitions",
            "cluster.repartition.topic_prefix",
            "sources.plant",
            "sources.repartition-x",
            "sources.shards",
            "lake.checkpoint_interval",
        ] {
            assert!(keys.contains(&key), "{key}: {errors:#?}");
        }

        // A stream HTTP ingest alone feeds is keyed through the topic too; one a Kafka
        // source feeds is not.
        let fields = r#"fields = [{ name = "user", type = "string", required = true }, { name = "ts", type = "timestamp", required = true }]
key = "user"
"#;
        let streams = format!(
            "[streams.clicks]\n{fields}[streams.orders]\n{fields}[sources.shop]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopics = [\"orders\"]\nstream = \"orders\"\n"
        );
        let config = Config::from_toml(&format!("{cluster}{streams}")).expect("valid");
        assert_eq!(
            config.repartitioned_streams(),
            [("clicks".to_owned(), vec!["http:clicks".to_owned()])].into()
        );
        assert!(config.sources.contains_key("repartition-clicks"));
        assert!(!config.sources.contains_key("repartition-orders"));
    }

    #[test]
    fn workers_default_to_the_cores_and_zero_is_refused() {
        let config = Config::from_toml("[runtime]\nworkers = 3").expect("valid");
        assert_eq!(config.workers(), 3);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(Config::from_toml("").expect("valid").workers(), cores);
        let errors = Config::from_toml("[runtime]\nworkers = 0").expect_err("invalid");
        assert_eq!(errors[0].key, "runtime.workers", "{errors:?}");
        let errors = Config::from_toml("[runtime]\nthreads = 2").expect_err("invalid");
        assert!(errors[0].key.starts_with("runtime"), "{errors:?}");
    }

    /// A public address with no way to tell callers apart is refused unless the config
    /// says so; tokens make the API's fine.
    #[test]
    fn public_listeners_without_authentication_are_refused_unless_allowed() {
        let keys = |text: &str| -> Vec<String> {
            Config::from_toml(text)
                .map_or_else(|e| e.into_iter().map(|e| e.key).collect(), |_| Vec::new())
        };
        let public = "[http]\nlisten = \"0.0.0.0:8080\"\n[broker]\nenabled = true\nlisten = \"0.0.0.0:1883\"\n";
        assert_eq!(keys(public), ["http.listen", "broker.listen"]);
        let allowed = public
            .replace("[http]\n", "[http]\nallow_unauthenticated = true\n")
            .replace("[broker]\n", "[broker]\nallow_anonymous = true\n");
        assert!(keys(&allowed).is_empty(), "{:?}", keys(&allowed));
        let token = format!(
            "{public}[[http.tokens]]\nname = \"a\"\nsha256 = \"{}\"\nscopes = [\"query\"]\n",
            "0".repeat(64)
        );
        assert_eq!(keys(&token), ["broker.listen"]);
        assert!(keys("[http]\nlisten = \"127.0.0.1:8080\"\n").is_empty());
    }

    /// `[http] tokens_file` counts as tokens, and each problem of the file is listed
    /// under the key with the entry it is in.
    #[test]
    fn a_tokens_file_is_checked_entry_by_entry() {
        let path =
            std::env::temp_dir().join(format!("sluice-check-tokens-{}.toml", std::process::id()));
        let good = format!(
            "[[tokens]]\nname = \"a\"\nsha256 = \"{}\"\nscopes = [\"query\"]\n",
            "0".repeat(64)
        );
        std::fs::write(
            &path,
            format!("{good}[[tokens]]\nname = \"b\"\nsha256 = \"xyz\"\nscopes = [\"root\"]\n"),
        )
        .unwrap();
        let text = format!(
            "[http]\nlisten = \"0.0.0.0:8080\"\ntokens_file = {:?}\n",
            path.display().to_string()
        );
        let errors = Config::from_toml(&text).expect_err("invalid");
        let messages: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.key, e.message))
            .collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].starts_with("http.tokens_file") && messages[0].contains("tokens[1].sha256"),
            "{messages:?}"
        );
        assert!(
            messages[1].contains("tokens[1].scopes") && messages[1].contains("\"root\""),
            "{messages:?}"
        );
        std::fs::write(&path, good).unwrap();
        assert!(
            Config::from_toml(&text).is_ok(),
            "a tokens file makes a public API fine"
        );
        std::fs::remove_file(&path).unwrap();
        let errors = Config::from_toml(&text).expect_err("missing file");
        assert!(errors[0].message.contains("cannot read"), "{errors:?}");
    }

    #[test]
    fn semantic_problems_are_all_listed() {
        let text = r#"
            [sources.plant]
            type = "mqtt"
            url = "embedded"
            topics = ["a/#/b"]
            qos = 2
            stream = "nope"
        "#;
        let errors = Config::from_toml(text).expect_err("invalid");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "sources.plant.stream",
                "sources.plant.url",
                "sources.plant.topics",
                "sources.plant.qos"
            ]
        );
    }

    #[test]
    fn syntax_errors_are_one_problem() {
        let errors = Config::from_toml("[http\nlisten=").expect_err("invalid");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "(file)");
    }
}

#[cfg(test)]
mod example_tests {
    use crate::Config;

    /// The shipped example is the embedded default; it must parse and validate.
    #[test]
    fn the_default_example_is_valid() {
        let config = Config::from_toml(crate::DEFAULT_TOML).expect("example is valid");
        assert_eq!(config.windows.len(), 3);
        assert!(!config.sources.is_empty());
    }
}

#[cfg(test)]
mod stream_tests {
    use crate::Config;

    #[test]
    fn declared_fields_build_a_schema_and_mistakes_name_their_key() {
        let text = r#"
            [streams.plant]
            fields = [
              { name = "meter", type = "string", required = true },
              { name = "ts", type = "timestamp", required = true },
              { name = "kw", type = "float" },
            ]
            key = "meter"
        "#;
        let config = Config::from_toml(text).expect("valid");
        let schema = config.streams["plant"].build_schema().expect("schema");
        let names: Vec<&str> = schema
            .arrow()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(&names[..3], ["meter", "ts", "kw"]);

        let bad = r#"
            [streams.a]
            fields = [{ name = "ts", type = "timestamp", required = true }, { name = "x", type = "decimal" }]
            key = "ts"
            [streams.b]
            schema = "telemetry"
            fields = [{ name = "x", type = "int" }]
            [streams.c]
            fields = [{ name = "ts", type = "timestamp" }, { name = "id", type = "string" }]
            key = "id"
            [streams.d]
            fields = [{ name = "ts", type = "timestamp", required = true }]
        "#;
        let errors = Config::from_toml(bad).expect_err("invalid");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "streams.a.fields[1].type",
                "streams.b.fields",
                "streams.c.event_time",
                "streams.d.key"
            ],
            "{errors:#?}"
        );
    }
}
