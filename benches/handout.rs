//! Per-test database handout latency of `isoenv::testing`, per engine: p50 and p95 over many
//! handouts, each held for a short "test" while the pool refills in the background.
//! `cargo bench --bench handout`; `ISOENV_POOL_SIZE=0` measures without the pool.

use std::time::{Duration, Instant};

use isoenv::testing::{blocking, Result, TestDb};

const RUNS: usize = 100;
/// How long each simulated test holds its database.
const HOLD: Duration = Duration::from_millis(150);

fn measure(name: &str, handout: fn() -> Result<TestDb>) {
    drop(handout().expect("first handout (provisions the server and template)"));
    std::thread::sleep(Duration::from_millis(500)); // let the pool fill
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let db = handout().unwrap();
        times.push(t.elapsed());
        std::thread::sleep(HOLD);
        drop(db);
    }
    times.sort();
    let pct = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    println!(
        "| {name:<8} | {:>8.3} | {:>8.3} | {RUNS} |",
        pct(50).as_secs_f64() * 1e3,
        pct(95).as_secs_f64() * 1e3
    );
}

fn main() {
    let pool = std::env::var("ISOENV_POOL_SIZE").unwrap_or_else(|_| "8 (default)".into());
    println!("handout latency, pool size {pool}\n");
    println!("| engine   | p50 (ms) | p95 (ms) | runs |\n|---|---|---|---|");
    measure("postgres", blocking::postgres);
    measure("mysql", blocking::mysql);
    measure("redis", blocking::redis);
}
