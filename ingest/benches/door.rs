//! The embedded broker's door on the way up, per message: a device's QoS 1 publishes
//! (W1-like JSON readings, 160 bytes) through the inspector under an ACL, as MQTT
//! 3.1.1 arrives, and as MQTT 5 arrives (with a user property each): translated by
//! `v5::Up` first. The difference is what an MQTT 5 device costs the door; the way
//! down (rumqttd's PUBACKs, 4 bytes each) is measured the same way.
//!
//! `cargo bench -p sluice-ingest --bench door`

use std::hint::black_box;
use std::sync::Arc;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_main};
use rumqttc::mqttbytes::{QoS, v4};
use rumqttc::v5::mqttbytes::{QoS as QoS5, v5};
use sluice_config::AclConfig;
use sluice_ingest::mqtt::auth::Acl;
use sluice_ingest::mqtt::inspect::Inspector;
use sluice_ingest::mqtt::v5::{Terms, Up};

/// Messages in a measured stream.
const MESSAGES: u64 = 10_000;
/// Bytes the relay reads at once.
const READ: usize = 64 << 10;

fn payload(i: u64) -> String {
    format!(
        r#"{{"device_id":"dev-000042","ts":"2026-01-01T00:00:{:02}.000Z","temperature":21.{},"humidity":55.0,"battery":3.6,"status":"ok"}}"#,
        i % 60,
        i % 10
    )
}

/// The device's byte stream, as MQTT 3.1.1 and as MQTT 5.
fn streams() -> (Vec<u8>, Vec<u8>) {
    let (mut v4s, mut v5s) = (BytesMut::new(), BytesMut::new());
    for i in 0..MESSAGES {
        let pkid = (i % 65_535 + 1) as u16;
        let mut p = v4::Publish::new("devices/dev-000042/telemetry", QoS::AtLeastOnce, payload(i));
        p.pkid = pkid;
        p.write(&mut v4s).expect("v4");
        let properties = v5::PublishProperties {
            user_properties: vec![("trace".into(), format!("t-{i}"))],
            ..Default::default()
        };
        let mut p = v5::Publish::new(
            "devices/dev-000042/telemetry",
            QoS5::AtLeastOnce,
            payload(i),
            Some(properties),
        );
        p.pkid = pkid;
        p.write(&mut v5s).expect("v5");
    }
    (v4s.to_vec(), v5s.to_vec())
}

fn inspector() -> Inspector {
    let acl = Arc::new(Acl::new(&AclConfig {
        publish: vec!["devices/{client_id}/#".into()],
        subscribe: vec!["commands/{client_id}".into()],
    }));
    Inspector::new(64 << 10).with_acl(acl, "dev-000042".into())
}

fn up(c: &mut Criterion) {
    let (v4s, v5s) = streams();
    let mut group = c.benchmark_group("door_up");
    group.throughput(Throughput::Elements(MESSAGES));
    group.bench_function("mqtt311", |b| {
        b.iter(|| {
            let mut inspector = inspector();
            let mut out = Vec::with_capacity(READ * 2);
            for read in v4s.chunks(READ) {
                inspector.feed(read, &mut out).expect("inspected");
                black_box(&out);
                out.clear();
            }
        })
    });
    group.bench_function("mqtt5", |b| {
        b.iter(|| {
            let (mut up, mut inspector) = (Up::new(64 << 10), inspector());
            let (mut translated, mut out) = (Vec::new(), Vec::with_capacity(READ * 2));
            for read in v5s.chunks(READ) {
                translated.clear();
                up.feed(read, &mut translated).expect("translated");
                inspector.feed(&translated, &mut out).expect("inspected");
                black_box(&out);
                out.clear();
            }
        })
    });
    group.finish();
}

fn down(c: &mut Criterion) {
    let mut acks = BytesMut::new();
    for i in 0..MESSAGES {
        v4::PubAck::new((i % 65_535 + 1) as u16)
            .write(&mut acks)
            .expect("puback");
    }
    let mut group = c.benchmark_group("door_down");
    group.throughput(Throughput::Elements(MESSAGES));
    group.bench_function("mqtt5", |b| {
        b.iter(|| {
            let up = Up::new(64 << 10);
            let mut down = up.down(Terms::default(), None);
            let mut out = Vec::with_capacity(READ);
            for read in acks.chunks(READ) {
                down.feed(read, &mut out);
                black_box(&out);
                out.clear();
            }
        })
    });
    group.finish();
}

#[allow(missing_docs)] // criterion_group! defines an undocumented function.
mod group {
    criterion::criterion_group!(benches, super::up, super::down);
}
use group::benches;

criterion_main!(benches);
