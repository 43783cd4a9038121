//! Per-test database handout latency of `isoenv::testing`, per engine: p50 and p95 over many
//! handouts, each held for a "test" of `ISOENV_BENCH_HOLD_MS` (default 150) while released
//! databases are reset in the background; a hold of 10 ms is a test shorter than any clone.
//! `cargo bench --bench handout`; `ISOENV_BENCH_JSON=1` prints one JSON measurement per line
//! (what `cargo xtask bench` reads) and `ISOENV_BENCH_RUNS` sets the number of handouts.

use std::time::{Duration, Instant};

use isoenv::bench::Measurement;
use isoenv::testing::{blocking, Result, TestDb};

fn measure(name: &str, handout: fn() -> Result<TestDb>, runs: usize, hold: u64, json: bool) {
    drop(handout().expect("first handout (provisions the server and template)"));
    std::thread::sleep(Duration::from_millis(500)); // let the pool fill
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let db = handout().unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(hold));
        drop(db);
    }
    let m = Measurement::of(
        format!("handout {name} (tests held {hold} ms)"),
        "ms",
        &times,
    )
    .unwrap();
    if json {
        println!("{}", serde_json::to_string(&m).unwrap());
    } else {
        println!(
            "| {name:<8} | {:>8.3} | {:>8.3} | {runs} |",
            m.median, m.p95
        );
    }
}

fn main() {
    let json = std::env::var_os("ISOENV_BENCH_JSON").is_some();
    let runs = std::env::var("ISOENV_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100);
    let hold = std::env::var("ISOENV_BENCH_HOLD_MS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(150);
    if !json {
        println!("handout latency, each test holding its database {hold} ms\n");
        println!("| engine   | p50 (ms) | p95 (ms) | runs |\n|---|---|---|---|");
    }
    measure("postgres", blocking::postgres, runs, hold, json);
    measure("mysql", blocking::mysql, runs, hold, json);
    measure("redis", blocking::redis, runs, hold, json);
}
