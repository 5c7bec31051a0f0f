//! Micro-benchmarks of the hot path (payload -> frame -> every subscriber's queue), so that a
//! regression shows without a full load run. Figures go to BENCHMARKS.md; nothing here is a
//! pass/fail test. Run: `cargo bench --bench hot_path`.

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sse_gateway::testing::event::parse_payload;
use sse_gateway::testing::frame::encode;
use sse_gateway::testing::hub::{Hub, Queued, StreamInfo, Subscriber};
use tokio_util::sync::CancellationToken;

const ENVELOPE: &[u8] =
    br#"{"event":"order.updated","data":{"id":1234,"status":"shipped","items":[1,2,3]}}"#;
const MULTILINE: &[u8] = b"first line\nsecond line\nthird line with some more text in it";

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for (name, payload) in [("json-envelope", ENVELOPE), ("raw-multiline", MULTILINE)] {
        g.throughput(Throughput::Bytes(payload.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let event = parse_payload(std::hint::black_box(payload), 65_536)
                    .expect("the payload is valid");
                encode(&event).expect("the event encodes")
            })
        });
    }
    g.finish();
}

fn subscriber(id: u64) -> (Arc<Subscriber>, tokio::sync::mpsc::Receiver<Queued>) {
    Subscriber::new(
        id,
        64,
        CancellationToken::new(),
        StreamInfo {
            conn_id: id,
            remote: "127.0.0.1:1".parse().expect("a valid address"),
            protocol: "HTTP/1.1",
            sub: format!("user-{id}"),
            channels: vec!["bench".into()],
            opened_at: std::time::SystemTime::now(),
            presence: false,
        },
    )
}

/// One frame to every subscriber of a channel, and each subscriber taking it off its queue, as
/// its stream task would.
fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub-fanout");
    for n in [1usize, 100, 1000, 10_000] {
        let hub = Hub::new();
        let mut queues = Vec::with_capacity(n);
        for id in 0..n as u64 {
            let (sub, rx) = subscriber(id);
            hub.subscribe(&sub, &["bench".to_string()]);
            queues.push((sub, rx));
        }
        let frame = Queued {
            bytes: encode(&parse_payload(ENVELOPE, 65_536).expect("valid")).expect("encodes"),
            received: Instant::now(),
            durable: None,
        };
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let delivered = hub.deliver("bench", &frame);
                for (_, rx) in queues.iter_mut() {
                    let _ = rx.try_recv();
                }
                delivered
            })
        });
    }
    g.finish();
}

/// Reading a message off pub/sub: a plain payload, and a durable one whose HMAC is verified
/// (SPEC §6.6), at 100 B, 1 KiB and 16 KiB: the cost of the signature on the receive path.
fn receive(c: &mut Criterion) {
    use sse_gateway::testing::position::{decode_durable, encode_durable, DurableKey, Position};
    let key = DurableKey::random();
    let mut g = c.benchmark_group("receive");
    for size in [100usize, 1024, 16 * 1024] {
        let payload = vec![b'x'; size];
        let signed = encode_durable(
            &key,
            "bench",
            "18c0ffee00001",
            Position { ms: 1, seq: 0 },
            &payload,
        );
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("plain", size), &payload, |b, p| {
            b.iter(|| decode_durable(Some(&key), "bench", std::hint::black_box(p)))
        });
        g.bench_with_input(
            BenchmarkId::new("durable-verified", size),
            &signed,
            |b, m| b.iter(|| decode_durable(Some(&key), "bench", std::hint::black_box(m))),
        );
    }
    g.finish();
}

criterion_group!(benches, frames, fanout, receive);
criterion_main!(benches);
