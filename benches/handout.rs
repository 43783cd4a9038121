//! Per-test database handout latency of `isoenv::testing`, per engine: p50 and p95 over many
//! handouts, each held for a short "test" while the pool refills in the background.
//! `cargo bench --bench handout`; `ISOENV_POOL_SIZE=0` measures without the pool;
//! `ISOENV_BENCH_JSON=1` prints one JSON measurement per line (what `cargo xtask bench` reads)
//! and `ISOENV_BENCH_RUNS` sets the number of handouts.

use std::time::{Duration, Instant};

use isoenv::bench::Measurement;
use isoenv::testing::{blocking, Result, TestDb};

/// How long each simulated test holds its database.
const HOLD: Duration = Duration::from_millis(150);

fn measure(name: &str, handout: fn() -> Result<TestDb>, runs: usize, json: bool) {
    drop(handout().expect("first handout (provisions the server and template)"));
    std::thread::sleep(Duration::from_millis(500)); // let the pool fill
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let db = handout().unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(HOLD);
        drop(db);
    }
    let pool = match std::env::var("ISOENV_POOL_SIZE").as_deref() {
        Ok("0") => "without pool",
        _ => "pool",
    };
    let m = Measurement::of(format!("handout {name} ({pool})"), "ms", &times).unwrap();
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
    if !json {
        let pool = std::env::var("ISOENV_POOL_SIZE").unwrap_or_else(|_| "8 (default)".into());
        println!("handout latency, pool size {pool}\n");
        println!("| engine   | p50 (ms) | p95 (ms) | runs |\n|---|---|---|---|");
    }
    measure("postgres", blocking::postgres, runs, json);
    measure("mysql", blocking::mysql, runs, json);
    measure("redis", blocking::redis, runs, json);
}
