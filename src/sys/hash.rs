//! A stable hash for names and cache keys.

/// A stable hash for cache keys (std's hasher may change between Rust releases).
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}
