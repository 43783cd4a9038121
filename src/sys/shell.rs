//! POSIX shell quoting, shared by `env --shell` and the activate scripts.

/// Quotes `value` so that bash, zsh and sh read it back verbatim: single quotes, with each
/// embedded `'` written as `'\''`. Nothing inside single quotes is expanded.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// `export KEY='value'` lines, one per pair, safe to `eval`.
pub fn export_lines<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .into_iter()
        .map(|(k, v)| format!("export {k}={}\n", quote(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn bash_reads_quoted_values_back_verbatim() {
        let nasty = "a'b \"c\" $(touch /tmp/isoenv-pwned) `x` $HOME \\n ; & | ~";
        let script = format!("{}printf %s \"$V\"", export_lines([("V", nasty)]));
        let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), nasty);
        assert!(!std::path::Path::new("/tmp/isoenv-pwned").exists());
    }
}
