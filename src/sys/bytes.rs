//! Byte sizes as people write them (`512M`, `1.5g`, `64KiB`).

/// Parses `512M`, `1G`, `64K`, `1.5G`, `2048` (bytes); suffixes are binary (K = 1024), with an
/// optional `B`/`iB`.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => return Err(format!("`{text}` has an unknown unit `{other}`")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a memory size"))?;
    let bytes = value * factor as f64;
    if bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("1G"), Ok(1 << 30));
        assert_eq!(parse_memory("1.5g"), Ok(3 << 29));
        assert_eq!(parse_memory("4096"), Ok(4096));
        assert_eq!(parse_memory("64KiB"), Ok(64 << 10));
        assert!(parse_memory("12X").is_err());
        assert!(parse_memory("M").is_err());
        assert!(parse_memory("0").is_err());
    }
}
