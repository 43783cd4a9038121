//! The opt-in pre-commit hook: what the stub says, whether an existing hook is ours, and what a
//! commit must not contain. Pure; the xtask does the git and file work.

/// The line that marks a hook as isoenv's. A hook without it is never overwritten or removed.
pub const MARKER: &str = "# isoenv-managed hook";

/// The variable that skips the hook for one commit (as `git commit --no-verify` does).
pub const SKIP_VAR: &str = "ISOENV_SKIP_HOOKS";

/// The hook file: a stub that runs `PROGRAM hooks run pre-commit` (or `$ISOENV_XTASK`), where
/// `program` is how the repository calls isoenv (`cargo xtask`, `isoenv`).
pub fn stub(program: &str) -> String {
    format!(
        "#!/bin/sh\n{MARKER}: installed by `{program} hooks install`, removed by `{program} hooks uninstall`.\n\
         # Skip once with `git commit --no-verify` or {SKIP_VAR}=1.\n\
         [ \"${{{SKIP_VAR}:-}}\" = 1 ] && exit 0\n\
         exec ${{ISOENV_XTASK:-{program}}} hooks run pre-commit\n"
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookState {
    Absent,
    Ours,
    /// Someone else's hook: left alone.
    Foreign,
}

pub fn classify(existing: Option<&str>) -> HookState {
    match existing {
        None => HookState::Absent,
        Some(text) if text.lines().any(|l| l.starts_with(MARKER)) => HookState::Ours,
        Some(_) => HookState::Foreign,
    }
}

/// A dotenv file that holds real settings (`.env`, `.env.local`, ...), not a template.
pub fn is_env_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let templates = [".env.example", ".env.sample", ".env.template", ".env.dist"];
    (name == ".env" || name.starts_with(".env.")) && !templates.contains(&name)
}

/// The variables whose (non-trivial) values appear in `content`. Names only: never the value.
pub fn leaked<'a>(content: &str, secrets: &'a [(String, String)]) -> Vec<&'a str> {
    secrets
        .iter()
        .filter(|(_, value)| value.len() >= 6 && content.contains(value.as_str()))
        .map(|(name, _)| name.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_marked_hooks_are_ours() {
        assert_eq!(classify(None), HookState::Absent);
        assert_eq!(classify(Some(&stub("cargo xtask"))), HookState::Ours);
        assert_eq!(classify(Some("#!/bin/sh\nnpm test\n")), HookState::Foreign);
        assert!(stub("isoenv").contains(SKIP_VAR));
    }

    #[test]
    fn env_files_but_not_templates() {
        for p in [".env", "app/.env", ".env.local", ".env.production"] {
            assert!(is_env_file(p), "{p}");
        }
        for p in [
            ".env.example",
            "deploy/.env.sample",
            "env.rs",
            "my.env",
            ".envrc",
        ] {
            assert!(!is_env_file(p), "{p}");
        }
    }

    #[test]
    fn secrets_are_found_by_value_and_reported_by_name() {
        let secrets = vec![
            ("DB_PROD_PASSWORD".to_owned(), "s3cr3t-Value".to_owned()),
            ("DB_VM_PASSWORD".to_owned(), "pw".to_owned()),
        ];
        assert_eq!(
            leaked("url = postgres://u:s3cr3t-Value@h", &secrets),
            ["DB_PROD_PASSWORD"]
        );
        assert!(
            leaked("a pw here", &secrets).is_empty(),
            "too short to mean anything"
        );
    }
}
