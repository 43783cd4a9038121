//! The venv-style `bin/activate` script (bash and zsh): exports an environment's variables,
//! remembers what they were, and defines `deactivate` to restore them.

use crate::sys::shell::quote;

/// Disables the prompt marker, like venv's `VIRTUAL_ENV_DISABLE_PROMPT`.
pub const DISABLE_PROMPT: &str = "ISOENV_DISABLE_PROMPT";

pub fn script(name: &str, exports: &[(String, String)]) -> String {
    let mut save = String::new();
    let mut restore = String::new();
    for (key, value) in exports {
        // Remember whether it was set at all, so that deactivate can unset what was unset.
        save.push_str(&format!(
            "if [ -n \"${{{key}+x}}\" ]; then _ISOENV_OLD_{key}=\"${key}\"; _ISOENV_HAD_{key}=1; fi\nexport {key}={}\n",
            quote(value)
        ));
        restore.push_str(&format!(
            "    if [ -n \"${{_ISOENV_HAD_{key}:-}}\" ]; then export {key}=\"$_ISOENV_OLD_{key}\"; else unset {key}; fi\n    unset _ISOENV_OLD_{key} _ISOENV_HAD_{key}\n"
        ));
    }
    format!(
        r#"# isoenv environment `{name}`: `source` this file (bash or zsh); `deactivate` undoes it.
# It holds the environment's password: keep it 0600.

# Leave any other isoenv environment first, so its saved values are restored.
if typeset -f deactivate >/dev/null 2>&1 && [ -n "${{ISOENV_ACTIVE:-}}" ]; then
    deactivate
fi

deactivate () {{
{restore}    if [ -n "${{_ISOENV_OLD_PS1+x}}" ]; then
        PS1="$_ISOENV_OLD_PS1"
        unset _ISOENV_OLD_PS1
    fi
    hash -r 2>/dev/null
    unset -f deactivate
}}

{save}
if [ -z "${{{DISABLE_PROMPT}:-}}" ]; then
    _ISOENV_OLD_PS1="${{PS1-}}"
    PS1="(isoenv:{name}) ${{PS1-}}"
fi
hash -r 2>/dev/null
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(shell: &str, body: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("activate");
        let exports = vec![
            ("DB_HOST".to_owned(), "127.0.0.1".to_owned()),
            ("DB_PASSWORD".to_owned(), "it's $(secret)".to_owned()),
            ("ISOENV_ACTIVE".to_owned(), "dev".to_owned()),
        ];
        std::fs::write(&path, script("dev", &exports)).unwrap();
        // A clean environment: the test may itself run inside an activated environment.
        let out = Command::new(shell)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .arg("-c")
            .arg(format!(
                "PS1='$ '; DB_HOST=old; export DB_HOST\n. {}\n{body}",
                path.display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn activate_sets_and_deactivate_restores() {
        let out = run(
            "bash",
            r#"echo "$DB_HOST|$DB_PASSWORD|$ISOENV_ACTIVE|$PS1"
deactivate
echo "$DB_HOST|${DB_PASSWORD-unset}|${ISOENV_ACTIVE-unset}|$PS1"
typeset -f deactivate >/dev/null 2>&1 && echo still-defined || echo gone"#,
        );
        assert_eq!(
            out,
            "127.0.0.1|it's $(secret)|dev|(isoenv:dev) $ \nold|unset|unset|$ \ngone\n"
        );
    }

    #[test]
    fn zsh_reads_the_same_script() {
        // CI installs zsh: its absence is a broken machine, not a skip.
        let out = run(
            "zsh",
            r#"echo "$DB_HOST|$DB_PASSWORD|$ISOENV_ACTIVE"
deactivate
echo "$DB_HOST|${DB_PASSWORD-unset}|${ISOENV_ACTIVE-unset}|$PS1""#,
        );
        assert_eq!(out, "127.0.0.1|it's $(secret)|dev\nold|unset|unset|$ \n");
    }

    #[test]
    fn prompt_marker_can_be_disabled() {
        let out = run("bash", "echo \"$PS1\"");
        assert_eq!(out, "(isoenv:dev) $ \n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, script("dev", &[])).unwrap();
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "PS1='$ '; {DISABLE_PROMPT}=1; . {}; echo \"$PS1\"",
                path.display()
            ))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "$ \n");
    }
}
