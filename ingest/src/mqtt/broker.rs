//! The embedded MQTT broker (rumqttd), for `sluice run` with no external broker.

use std::net::{SocketAddr, TcpListener};

use sluice_config::BrokerConfig;

use crate::{Error, Result};

/// Starts rumqttd on its own thread, listening on `config.listen`.
///
/// The port is bound once here first, because rumqttd only logs a bind failure from
/// its own thread; this way a taken port is a clear error before anything starts.
pub fn start_embedded_broker(config: &BrokerConfig) -> Result<SocketAddr> {
    let addr: SocketAddr = config.listen.parse().map_err(|e| Error::Bind {
        what: "the embedded MQTT broker",
        addr: config.listen.clone(),
        error: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")),
    })?;
    let probe = TcpListener::bind(addr).map_err(|error| Error::Bind {
        what: "the embedded MQTT broker",
        addr: config.listen.clone(),
        error,
    })?;
    let addr = probe.local_addr().unwrap_or(addr);
    drop(probe);
    // rumqttd's Config is built from its documented TOML shape.
    let text = format!(
        r#"
        id = 0
        [router]
        id = 0
        max_connections = {max_connections}
        max_outgoing_packet_count = 1000
        max_segment_size = 16777216
        max_segment_count = 10

        [v4.1]
        name = "sluice-v4"
        listen = "{addr}"
        next_connection_delay_ms = 0
        [v4.1.connections]
        connection_timeout_ms = 60000
        max_payload_size = {max_payload}
        max_inflight_count = {max_inflight}
        dynamic_filters = true
        "#,
        max_connections = config.max_connections,
        max_payload = config.max_payload_size.as_usize(),
        max_inflight = config.max_inflight,
    );
    let broker_config: rumqttd::Config = toml::from_str(&text).map_err(|e| Error::Config {
        source_name: "broker".into(),
        message: format!("embedded broker settings rejected: {e}"),
    })?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(broker_config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|error| Error::Bind {
            what: "the embedded MQTT broker thread",
            addr: addr.to_string(),
            error,
        })?;
    // Wait until it accepts connections, so sources do not start with an "outage".
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    tracing::info!(%addr, "embedded MQTT broker listening");
    Ok(addr)
}
