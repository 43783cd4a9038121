//! The `.env` file: loading it into a variable map (process environment > file) and linting it
//! for constructs that `dotenvy` and bash's `source .env` read differently.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the `.env` comes from. A default file may be absent; an explicit one must exist.
#[derive(Debug, Clone)]
pub enum EnvFile {
    Default(PathBuf),
    Explicit(PathBuf),
}

impl EnvFile {
    pub fn path(&self) -> &Path {
        match self {
            EnvFile::Default(p) | EnvFile::Explicit(p) => p,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnvFileError {
    #[error("env file {path} does not exist; create it (see .env.example) or fix --env-file")]
    Missing { path: PathBuf },
    #[error("cannot read env file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: cannot parse `{text}`: expected KEY=value (run `cargo xtask env check` for details)")]
    Parse {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// The variables configuration is resolved from. Resolution is a pure function of this map, so
/// tests build one directly instead of touching the process environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vars {
    values: BTreeMap<String, String>,
}

impl Vars {
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Vars {
            values: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The file's variables overlaid with `process` (the process environment wins, as with
    /// dotenvy). For duplicate keys in the file the first wins, as with dotenvy.
    pub fn load(
        file: &EnvFile,
        process: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, EnvFileError> {
        let path = file.path();
        let mut values = BTreeMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for (key, value) in parse(path, &text)? {
                    values.entry(key).or_insert(value);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let EnvFile::Explicit(_) = file {
                    return Err(EnvFileError::Missing {
                        path: path.to_owned(),
                    });
                }
            }
            Err(source) => {
                return Err(EnvFileError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        values.extend(process);
        Ok(Vars { values })
    }

    /// The same variables with `key` set to `value`.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.values.insert(key.into(), value.into());
        self
    }

    /// The value, with empty treated as unset (an empty `DB_PORT=` means "use the default").
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

fn parse(path: &Path, text: &str) -> Result<Vec<(String, String)>, EnvFileError> {
    dotenvy::from_read_iter(text.as_bytes())
        .map(|item| {
            item.map_err(|e| match e {
                dotenvy::Error::LineParse(bad, _) => {
                    let first = bad.lines().next().unwrap_or_default();
                    let line = text
                        .lines()
                        .position(|l| l.trim_end_matches('\r') == first)
                        .map_or(0, |i| i + 1);
                    EnvFileError::Parse {
                        path: path.to_owned(),
                        line,
                        text: first.to_owned(),
                    }
                }
                other => EnvFileError::Read {
                    path: path.to_owned(),
                    source: std::io::Error::other(other.to_string()),
                },
            })
        })
        .collect()
}

/// One construct that dotenvy and bash read differently (or that one of them rejects).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub line: usize,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {}\n  fix: {}",
            self.line, self.message, self.fix
        )
    }
}

/// Whether a `.env` with this text and these permission bits shows a password to other users
/// (as ssh refuses a key others can read): the warning with its fix, or `None`.
pub fn exposure(text: &str, mode: u32, path: &Path) -> Option<String> {
    let holds_password = text.lines().any(|line| {
        let line = line.trim_start();
        let line = line.strip_prefix("export ").unwrap_or(line);
        line.split_once('=').is_some_and(|(key, value)| {
            !key.trim_start().starts_with('#')
                && key.contains("PASSWORD")
                && !value
                    .trim()
                    .trim_matches(|c| c == '"' || c == '\'')
                    .is_empty()
        })
    });
    (holds_password && mode & 0o077 != 0).then(|| {
        format!(
            "{} holds a password and other users can read it (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        )
    })
}

/// Lints `.env` text. Every finding is a real divergence: Rust and Bash would see different
/// configurations, so `env check` treats each one as an error.
pub fn lint(text: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut first_seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        let mut add = |message: String, fix: &str| {
            findings.push(Finding {
                line,
                message,
                fix: fix.to_owned(),
            })
        };
        if raw.ends_with('\r') {
            add(
                "CRLF line ending: bash keeps the \\r as part of the value, dotenvy drops it"
                    .into(),
                "save the file with LF line endings (e.g. `sed -i 's/\\r$//' .env`)",
            );
        }
        let content = raw.trim_end_matches('\r');
        let trimmed = content.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let body = trimmed.strip_prefix("export ").unwrap_or(trimmed);
        let Some(eq) = body.find('=') else {
            add(
                format!(
                    "`{trimmed}` is not KEY=value: dotenvy rejects it, bash runs it as a command"
                ),
                "write it as KEY=value, or comment it out with #",
            );
            continue;
        };
        let (key_part, value) = (&body[..eq], &body[eq + 1..]);
        let key = key_part.trim_end();
        if !is_var_name(key) {
            add(
                format!("`{key}` is not a valid variable name"),
                "use letters, digits and _ only, not starting with a digit",
            );
            continue;
        }
        if key.len() != key_part.len() || value.starts_with([' ', '\t']) {
            add(
                format!("spaces around `=` in `{key}`: bash runs `{key}` as a command"),
                &format!("remove the spaces: {key}={}", value.trim()),
            );
        }
        if let Some(&first) = first_seen.get(key) {
            add(
                format!("{key} is set again (first at line {first}): dotenvy keeps the first value, bash the last"),
                "keep only one assignment",
            );
        } else {
            first_seen.insert(key, line);
        }
        for (message, fix) in lint_value(value.trim_start()) {
            add(format!("{key}: {message}"), &fix);
        }
    }
    findings
}

fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn lint_value(value: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let quote_it = "put the value in single quotes: '...' (nothing is expanded inside)";
    if let Some(rest) = value.strip_prefix('\'') {
        match rest.find('\'') {
            Some(end) => trailing(&rest[end + 1..], &mut out),
            None => out.push((
                "unterminated single quote (multi-line values are read differently)".into(),
                "close the quote on the same line".into(),
            )),
        }
        return out;
    }
    if let Some(rest) = value.strip_prefix('"') {
        let Some(end) = closing_double_quote(rest) else {
            out.push((
                "unterminated double quote (multi-line values are read differently)".into(),
                "close the quote on the same line".into(),
            ));
            return out;
        };
        let inner = &rest[..end];
        expansions(inner, &mut out);
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('"' | '\\' | '$') | None => {}
                    Some(other) => {
                        out.push((
                            format!("escape `\\{other}` in double quotes: dotenvy translates it, bash keeps the backslash"),
                            "use single quotes for literal text, or write the character itself".into(),
                        ));
                        break;
                    }
                }
            }
        }
        trailing(&rest[end + 1..], &mut out);
        return out;
    }
    // Unquoted: the value ends at a ` #` comment.
    let text = match value.find(" #").or_else(|| value.find("\t#")) {
        Some(i) => &value[..i],
        None => value,
    }
    .trim_end();
    expansions(text, &mut out);
    if text.contains([' ', '\t']) {
        out.push((
            "unquoted space: bash runs the text after it as a command".into(),
            quote_it.into(),
        ));
    }
    if let Some(c) = text.chars().find(|c| "&;|<>`()".contains(*c)) {
        if !text.contains("$(") {
            out.push((
                format!("unquoted shell metacharacter `{c}`: bash interprets it"),
                quote_it.into(),
            ));
        }
    }
    if text.starts_with('~') {
        out.push((
            "leading `~`: bash expands it to $HOME, dotenvy does not".into(),
            "write the absolute path".into(),
        ));
    }
    if text.contains('\\') {
        out.push((
            "unquoted backslash: bash removes it, dotenvy keeps it".into(),
            quote_it.into(),
        ));
    }
    out
}

/// Finds `$(...)`, backticks, unbraced `$VAR` and `${VAR:-...}`-style expansions.
fn expansions(text: &str, out: &mut Vec<(String, String)>) {
    if text.contains("$(") || text.contains('`') {
        out.push((
            "command substitution: bash runs the command, dotenvy does not".into(),
            "put the command's output in the file, or compute it outside .env".into(),
        ));
    }
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices('$') {
        match bytes.get(i + 1) {
            Some(b'{') => {
                let inner = text[i + 2..].split('}').next().unwrap_or_default();
                if !is_var_name(inner) {
                    out.push((
                        format!("`${{{inner}}}`: only plain ${{NAME}} references are read alike"),
                        "use ${NAME} with a variable defined earlier in the file".into(),
                    ));
                }
            }
            Some(c) if c.is_ascii_alphanumeric() || *c == b'_' => {
                let name: String = text[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push((
                    format!(
                        "unbraced `${name}`: dotenvy and bash end the name at different characters"
                    ),
                    format!("write ${{{name}}}"),
                ));
            }
            _ => {}
        }
    }
}

fn closing_double_quote(rest: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

fn trailing(after_quote: &str, out: &mut Vec<(String, String)>) {
    let t = after_quote.trim_start();
    let is_comment = t.starts_with('#') && after_quote.len() > t.len();
    if !(t.is_empty() || is_comment) {
        out.push((
            format!("text `{t}` after the closing quote is read differently"),
            "put everything inside the quotes, or start a comment with ` #`".into(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(text: &str) -> Vec<usize> {
        lint(text).iter().map(|f| f.line).collect()
    }

    #[test]
    fn portable_constructs_pass() {
        let text =
            "# comment\n\nexport A=1\nB='x y $Z $(no)'\nC=\"${A}/x\" # note\nD=\nE=plain # c\n";
        assert_eq!(lint(text), vec![]);
    }

    #[test]
    fn each_divergence_is_found_on_its_line() {
        let cases = [
            ("A = 1", "spaces around"),
            ("A= 1", "spaces around"),
            ("A=$HOME/x", "unbraced `$HOME`"),
            ("A=\"$HOME\"", "unbraced"),
            ("A=1\r", "CRLF"),
            ("A=a;b", "metacharacter `;`"),
            ("A=a&b", "metacharacter `&`"),
            ("A=a|b", "metacharacter `|`"),
            ("A=$(whoami)", "command substitution"),
            ("A=`id`", "command substitution"),
            ("A=${B:-x}", "only plain"),
            ("A=\"a\\nb\"", "escape"),
            ("A=two words", "unquoted space"),
            ("A=~/x", "leading `~`"),
            ("not an assignment", "not KEY=value"),
            ("1A=x", "not a valid variable name"),
            ("A='open", "unterminated"),
        ];
        for (line, expected) in cases {
            let text = format!("OK=1\n{line}\n");
            let findings = lint(&text);
            assert!(
                findings
                    .iter()
                    .any(|f| f.line == 2 && f.message.contains(expected)),
                "{line:?}: expected {expected:?}, got {findings:?}"
            );
        }
    }

    #[test]
    fn duplicate_keys_name_the_first_line() {
        let f = lint("A=1\nB=2\nA=3\n");
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].line, 3);
        assert!(f[0].message.contains("first at line 1"));
        assert_eq!(lines_of("export A=1\nA=2"), vec![2]);
    }

    #[test]
    fn load_gives_process_precedence_and_first_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "A=file\nB=file\nB=second\nC=${A}-x\n").unwrap();
        let vars = Vars::load(&EnvFile::Explicit(path), [("A".into(), "proc".into())]).unwrap();
        assert_eq!(vars.get("A"), Some("proc"));
        assert_eq!(vars.get("B"), Some("file"));
        // `${A}` is expanded from the file while parsing, as dotenvy does.
        assert_eq!(vars.get("C"), Some("file-x"));
    }

    #[test]
    fn missing_explicit_file_is_an_error_but_default_is_optional() {
        let missing = PathBuf::from("/nonexistent/.env");
        assert!(matches!(
            Vars::load(&EnvFile::Explicit(missing.clone()), []),
            Err(EnvFileError::Missing { .. })
        ));
        assert!(Vars::load(&EnvFile::Default(missing), []).is_ok());
    }

    #[test]
    fn parse_errors_carry_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "A=1\n# c\nthis is wrong\n").unwrap();
        let err = Vars::load(&EnvFile::Explicit(path.clone()), []).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("{}:3:", path.display())), "{msg}");
    }

    #[test]
    fn a_readable_env_file_with_a_password_is_flagged() {
        let path = Path::new(".env");
        let secret = "DB_VM_PASSWORD=hunter2\n";
        assert!(exposure(secret, 0o644, path)
            .unwrap()
            .contains("chmod 600 .env"));
        assert!(exposure(secret, 0o640, path).is_some());
        assert_eq!(exposure(secret, 0o600, path), None);
        assert_eq!(
            exposure("DB_VM_PASSWORD=\nDB_VM_HOST=x\n", 0o644, path),
            None
        );
        assert_eq!(exposure("# DB_VM_PASSWORD=old\n", 0o644, path), None);
        assert!(exposure("export DB_PROD_PASSWORD='s3'\n", 0o604, path).is_some());
    }
}
