//! Our zero-copy parser against a straightforward copying parser, on 1-frame and 16-frame
//! datagrams. Throughput is in bytes; frames per second follow from the frames per datagram.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventstream::wire::protocol::{Datagram, DatagramSpans, Limits, encode};
use eventstream_benches::copying_parse;

fn datagram(frames: usize, payload: usize) -> Vec<u8> {
    let mut d = Vec::new();
    for i in 0..frames {
        encode(
            i as u8,
            "sensors.temperature.eu-west-1",
            &vec![i as u8; payload],
            &mut d,
        )
        .unwrap();
    }
    d
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parser");
    for frames in [1usize, 16] {
        let d = datagram(frames, 64);
        g.throughput(Throughput::Bytes(d.len() as u64));
        let limits = Limits::default();
        g.bench_function(BenchmarkId::new("ours_spans", frames), |b| {
            b.iter(|| {
                let mut sum = 0usize;
                for span in DatagramSpans::new(black_box(&d), limits) {
                    sum += span.unwrap().payload_len as usize;
                }
                sum
            });
        });
        g.bench_function(BenchmarkId::new("ours_frames", frames), |b| {
            b.iter(|| {
                let mut sum = 0usize;
                for f in Datagram::new(black_box(&d), limits) {
                    let f = f.unwrap();
                    sum += f.topic.len() + f.payload.len();
                }
                sum
            });
        });
        let mut out = Vec::with_capacity(frames);
        g.bench_function(BenchmarkId::new("copying", frames), |b| {
            b.iter(|| {
                out.clear();
                copying_parse(black_box(&d), &mut out).unwrap();
                out.len()
            });
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = eventstream_benches::criterion();
    targets = parse
}
criterion_main!(benches);
