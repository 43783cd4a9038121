//! The venv-style `bin/activate` scripts (bash and zsh; `activate.fish` for fish): export an
//! environment's variables, remember what they were, and define `deactivate` to restore them.

use std::path::Path;

use crate::sys::shell::quote;

/// Disables the prompt marker, like venv's `VIRTUAL_ENV_DISABLE_PROMPT`.
pub const DISABLE_PROMPT: &str = "ISOENV_DISABLE_PROMPT";

/// The bash/zsh script for environment `name`: `exports`, and `bin` (its wrappers) first on
/// `PATH`, as venv puts its own `bin/` first.
///
/// It coexists with a Python venv in either order. Activated after one, its `deactivate` undoes
/// isoenv and hands `deactivate` back to the venv; activated before one, the venv's activate
/// replaces `deactivate`, and `isoenv_deactivate` (always defined) still undoes isoenv.
pub fn script(name: &str, bin: &Path, exports: &[(String, String)]) -> String {
    let mut save = String::new();
    let mut restore = String::new();
    let path = [("PATH".to_owned(), format!("{}:$PATH", bin.display()))];
    for (key, value) in exports.iter().chain(&path) {
        // PATH is prepended to at activation; the rest are literal.
        let value = match key.as_str() {
            "PATH" => format!("{}:\"$PATH\"", quote(&bin.display().to_string())),
            _ => quote(value),
        };
        // Remember whether it was set at all, so that deactivate can unset what was unset.
        save.push_str(&format!(
            "if [ -n \"${{{key}+x}}\" ]; then _ISOENV_OLD_{key}=\"${key}\"; _ISOENV_HAD_{key}=1; fi\nexport {key}={value}\n"
        ));
        restore.push_str(&format!(
            "    if [ -n \"${{_ISOENV_HAD_{key}:-}}\" ]; then export {key}=\"$_ISOENV_OLD_{key}\"; else unset {key}; fi\n    unset _ISOENV_OLD_{key} _ISOENV_HAD_{key}\n"
        ));
    }
    format!(
        r#"# isoenv environment `{name}`: `source` this file (bash or zsh; fish: activate.fish);
# `deactivate` (or `isoenv_deactivate`) undoes it. It holds the environment's password: keep it
# 0600.

# Leave any other isoenv environment first, so its saved values are restored.
if [ -n "${{ISOENV_ACTIVE:-}}" ] && typeset -f isoenv_deactivate >/dev/null 2>&1; then
    isoenv_deactivate
fi

# A venv's (or another tool's) `deactivate` is kept, to be handed back.
if typeset -f deactivate >/dev/null 2>&1; then
    eval "$(typeset -f deactivate | sed '1s/^deactivate /_isoenv_next_deactivate /')"
fi

isoenv_deactivate () {{
{restore}    if [ -n "${{_ISOENV_OLD_PS1+x}}" ]; then
        PS1="$_ISOENV_OLD_PS1"
        unset _ISOENV_OLD_PS1
    fi
    unset -f deactivate isoenv_deactivate
    if typeset -f _isoenv_next_deactivate >/dev/null 2>&1; then
        eval "$(typeset -f _isoenv_next_deactivate | sed '1s/^_isoenv_next_deactivate /deactivate /')"
        unset -f _isoenv_next_deactivate
    fi
    hash -r 2>/dev/null
    return 0
}}

deactivate () {{
    isoenv_deactivate
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

/// The same for fish (`source .../bin/activate.fish`).
pub fn fish(name: &str, bin: &Path, exports: &[(String, String)]) -> String {
    let mut save = String::new();
    let mut restore = String::new();
    for (key, value) in exports {
        save.push_str(&format!(
            "if set -q {key}; set -g _isoenv_old_{key} ${key}; end\nset -gx {key} {}\n",
            fish_quote(value)
        ));
        restore.push_str(&format!(
            "    if set -q _isoenv_old_{key}; set -gx {key} $_isoenv_old_{key}; set -e _isoenv_old_{key}; else; set -e {key}; end\n"
        ));
    }
    let bin = fish_quote(&bin.display().to_string());
    format!(
        r#"# isoenv environment `{name}` for fish: `source` this file; `isoenv_deactivate` undoes it.
# It holds the environment's password: keep it 0600.

if set -q ISOENV_ACTIVE; and functions -q isoenv_deactivate
    isoenv_deactivate
end

function isoenv_deactivate
{restore}    set -gx PATH $_isoenv_old_PATH
    set -e _isoenv_old_PATH
    if functions -q _isoenv_old_fish_prompt
        functions -e fish_prompt
        functions -c _isoenv_old_fish_prompt fish_prompt
        functions -e _isoenv_old_fish_prompt
    end
    functions -e isoenv_deactivate
end

{save}set -g _isoenv_old_PATH $PATH
set -gx PATH {bin} $PATH
if not set -q {DISABLE_PROMPT}; and functions -q fish_prompt
    functions -c fish_prompt _isoenv_old_fish_prompt
    function fish_prompt
        printf '(isoenv:%s) ' {name_quoted}
        _isoenv_old_fish_prompt
    end
end
"#,
        name_quoted = fish_quote(name)
    )
}

/// A fish string literal: single quotes, with `\` and `'` escaped.
fn fish_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
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
        std::fs::write(&path, script("dev", Path::new("/isoenv/bin"), &exports)).unwrap();
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
        std::fs::write(&path, script("dev", Path::new("/isoenv/bin"), &[])).unwrap();
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
