//! The real `cargo xtask` binary: configuration resolution, `env check`, `doctor`, the `db`
//! commands, the activate script in a real bash, and that no output ever shows a password.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

mod support;
use support::{text, Project};

const PROD: &str = "ENVIRONMENT=production\nDB_PROD_HOST=db.internal\nDB_PROD_NAME=app\nDB_PROD_USER=app\nDB_PROD_PASSWORD=Pr0d-S3cret-Value\n";

#[test]
fn env_json_resolves_each_environment() {
    let dev = Project::new("DB_VM_HOST=vm.local\nDB_VM_PORT=6543\nDB_VM_SSH_ENABLED=true\nDB_VM_SSH_HOST=bastion\nDB_VM_SSH_USER=dev\n");
    let j = dev.json(&["env", "--json"]);
    assert_eq!(j["environment"], "development");
    assert_eq!(j["database"]["host"], "vm.local");
    assert_eq!(j["database"]["port"], 6543);
    assert_eq!(j["database"]["use_vm"], true);
    assert_eq!(j["database"]["ssh_tunnel"]["host"], "bastion");
    assert_eq!(j["database"]["ssh_tunnel"]["user"], "dev");
    assert_eq!(j["sandbox"]["memory_limit_bytes"], 512u64 << 20);
    assert_eq!(j["sandbox"]["dir"], dev.state().display().to_string());

    let staging = Project::new(
        "ENVIRONMENT=staging\nDB_STAGING_HOST=st\nDB_STAGING_NAME=s\nWASI_MEMORY_LIMIT=1G\n",
    );
    let j = staging.json(&["env", "--json"]);
    assert_eq!(
        (j["environment"].as_str(), j["database"]["host"].as_str()),
        (Some("staging"), Some("st"))
    );
    assert_eq!(j["database"]["use_vm"], false);
    assert_eq!(j["database"]["ssh_tunnel"], Value::Null);
    assert_eq!(j["sandbox"]["memory_limit_bytes"], 1u64 << 30);

    let prod = Project::new(PROD);
    let j = prod.json(&["env", "--json"]);
    assert_eq!(j["environment"], "production");
    assert_eq!(j["database"]["ssl_mode"], "require");
    assert_eq!(j["database"]["name"], "app");
}

#[test]
fn process_environment_beats_the_file() {
    let p = Project::new("ENVIRONMENT=staging\nDB_STAGING_PORT=1111\n");
    let out = p
        .cmd(&["env", "--json"])
        .env("DB_STAGING_PORT", "2222")
        .output()
        .unwrap();
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["database"]["port"], 2222);
}

#[test]
fn an_active_environment_takes_precedence() {
    let p = Project::new("DB_VM_HOST=vm\n");
    let out = p
        .cmd(&["env", "--json"])
        .envs([
            ("ISOENV_ACTIVE", "dev"),
            ("DB_HOST", "127.0.0.1"),
            ("DB_PORT", "40123"),
            ("DB_NAME", "x"),
            ("DB_USER", "u"),
        ])
        .output()
        .unwrap();
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            j["database"]["port"].as_u64(),
            j["database"]["use_vm"].as_bool()
        ),
        (Some(40123), Some(false))
    );
    assert_eq!(j["database"]["source"]["name"], "dev");
}

#[test]
fn bad_configuration_is_reported_whole_and_clearly() {
    let p = Project::new("ENVIRONMENT=qa\nDB_VM_PORT=abc\nWASI_MEMORY_LIMIT=12Q\n");
    let err = p.fails(&["env"]);
    assert!(err.contains("development, staging, production"), "{err}");
    assert!(
        err.contains("WASI_MEMORY_LIMIT") && err.contains(".env"),
        "{err}"
    );

    let p = Project::new("DB_VM_PORT=99999\n");
    assert!(p
        .fails(&["env"])
        .contains("DB_VM_PORT: `99999` is not a port"));

    let p = Project::new("ENVIRONMENT=production\n");
    let err = p.fails(&["env", "--json"]);
    for var in [
        "DB_PROD_HOST",
        "DB_PROD_NAME",
        "DB_PROD_USER",
        "DB_PROD_PASSWORD",
    ] {
        assert!(err.contains(var), "{var} missing from: {err}");
    }

    let p = Project::new("A=1\nthis line is wrong\n");
    let err = p.fails(&["env"]);
    assert!(
        err.contains(&format!("{}:4:", p.env_file().display())),
        "{err}"
    );

    let missing = p.dir.path().join("nope.env");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("--env-file")
        .arg(&missing)
        .arg("env")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
}

#[test]
fn env_check_finds_each_divergence_with_its_line() {
    let p = Project::new("");
    let body =
        "OK=1\nSPACED = 1\nUNBRACED=$HOME/x\nDUP=1\nDUP=2\nCRLF=1\r\nMETA=a;b\nCMD=$(whoami)\n";
    fs::write(p.env_file(), body).unwrap();
    let out = p.run(&["env", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out);
    let file = p.env_file().display().to_string();
    for (line, what) in [
        (2, "spaces around"),
        (3, "unbraced"),
        (5, "set again"),
        (6, "CRLF"),
        (7, "metacharacter"),
        (8, "command substitution"),
    ] {
        assert!(
            report.contains(&format!("{file}:{line}: error:")) && report.contains(what),
            "line {line} ({what}) missing:\n{report}"
        );
    }
    assert!(!report.contains(&format!("{file}:1:")), "{report}");

    let clean = Project::new("ENVIRONMENT=development\nDB_VM_PASSWORD='x y'\n");
    assert!(clean.ok(&["env", "check"]).contains("ok"));
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.env.example");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("--env-file")
        .arg(example)
        .args(["env", "check"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn no_output_shows_a_configured_password_unless_asked() {
    let p = Project::new(PROD);
    let secret = "Pr0d-S3cret-Value";
    for args in [
        &["env"][..],
        &["env", "--json"],
        &["env", "--shell"],
        &["env", "check"],
        &["doctor"],
        &["doctor", "--json"],
        &["db", "list"],
    ] {
        let out = text(&p.run(args));
        assert!(
            !out.contains(secret),
            "{args:?} printed the password:\n{out}"
        );
    }
    assert!(p
        .ok(&["env", "--shell", "--with-password"])
        .contains(secret));
}

#[test]
fn env_shell_output_evals_in_bash() {
    let p = Project::new("DB_VM_NAME='we ird;$(touch /tmp/isoenv-pwned)'\n");
    let exports = p.ok(&["env", "--shell"]);
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{exports}\nprintf %s \"$DB_NAME|$ENVIRONMENT\""))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "we ird;$(touch /tmp/isoenv-pwned)|development"
    );
    assert!(!Path::new("/tmp/isoenv-pwned").exists());
}

#[test]
fn doctor_finds_every_engine_and_writes_nothing() {
    let p = Project::new("");
    let checks = p.json(&["doctor", "--json"]);
    let checks = checks.as_array().unwrap();
    for name in [
        "postgres",
        "mysql",
        "redis",
        "docker",
        "namespaces",
        "cgroups",
        "ssh",
    ] {
        let c = checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check"));
        // CI installs every engine: a missing one is a broken machine, not a skip.
        if ["postgres", "mysql", "redis"].contains(&name) {
            assert_eq!(c["ok"], true, "{c}");
        }
    }
    p.ok(&["env"]);
    assert!(!p.state().exists(), "env/doctor created the state root");
}

#[test]
fn db_up_is_idempotent_and_down_stops() {
    let p = Project::new("");
    let up = p.json(&["db", "up", "--json"]);
    assert_eq!(up["outcome"], "created");
    assert_eq!(
        (
            up["name"].as_str(),
            up["engine"].as_str(),
            up["status"].as_str()
        ),
        (Some("dev"), Some("postgres"), Some("running"))
    );
    let again = p.json(&["db", "up", "--json"]);
    assert_eq!(again["outcome"], "already-up");

    let url = p.ok(&["db", "url", "dev"]);
    let mut client = postgres::Client::connect(url.trim(), postgres::NoTls).unwrap();
    assert_eq!(
        client
            .query_one("SELECT 40 + 2", &[])
            .unwrap()
            .get::<_, i32>(0),
        42
    );
    drop(client);

    let creds: Value =
        serde_json::from_slice(&fs::read(p.state().join("dev/credentials")).unwrap()).unwrap();
    let password = creds["password"].as_str().unwrap();
    let human = p.ok(&["db", "up"]);
    assert!(
        !human.contains(password) && !up.to_string().contains(password),
        "db up printed the password"
    );
    assert!(
        human.contains("already up") && human.contains("source ") && human.contains("bin/activate"),
        "{human}"
    );
    assert!(p.ok(&["db", "down"]).contains("stopped"));
    let list = p.json(&["db", "list", "--json"]);
    assert_eq!(list[0]["status"], "stopped");
    assert_eq!(p.json(&["db", "up", "--json"])["outcome"], "started");
}

#[test]
fn production_refuses_to_destroy_or_create() {
    let prod = Project::new(PROD);
    assert!(prod.fails(&["db", "destroy", "dev"]).contains("production"));
    assert!(prod
        .fails(&["db", "create", "x", "--engine", "postgres"])
        .contains("production"));
    assert!(!prod.state().exists());
}

#[test]
fn list_inspect_and_up_never_show_the_environment_password() {
    let p = Project::new("");
    let created = p.ok(&["db", "create", "pw", "--engine", "redis"]);
    let creds: Value =
        serde_json::from_slice(&fs::read(p.state().join("pw/credentials")).unwrap()).unwrap();
    let password = creds["password"].as_str().unwrap().to_owned();
    assert_eq!(password.len(), 32);
    let mut shown = created;
    for args in [
        &["db", "list"][..],
        &["db", "list", "--json"],
        &["db", "inspect", "pw"],
        &["db", "inspect", "pw", "--json"],
        &["db", "start", "pw"],
    ] {
        shown.push_str(&text(&p.run(args)));
    }
    assert!(!shown.contains(&password), "password printed:\n{shown}");
    assert!(
        p.ok(&["db", "url", "pw"]).contains(&password),
        "url must print it when asked"
    );
}

#[test]
fn list_and_inspect_json_fields() {
    let p = Project::new("");
    p.ok(&["db", "create", "m", "--engine", "mysql"]);
    p.ok(&["db", "create", "e", "--engine", "postgres", "--no-service"]);
    let list = p.json(&["db", "list", "--json"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    for e in list {
        for key in [
            "name", "engine", "backend", "status", "host", "port", "pid", "dir",
        ] {
            assert!(e.get(key).is_some(), "{key} missing in {e}");
        }
    }
    let m = p.json(&["db", "inspect", "m", "--json"]);
    assert_eq!(
        (
            m["engine"].as_str(),
            m["status"].as_str(),
            m["backend"].as_str()
        ),
        (Some("mysql"), Some("running"), Some("lightweight"))
    );
    assert!(m["pid"].as_i64().unwrap() > 0);
    assert_eq!(
        p.json(&["db", "inspect", "e", "--json"])["status"],
        "env-only"
    );
    assert!(p.ok(&["db", "logs", "m"]).contains("ready for connections"));
    let table = p.ok(&["db", "list"]);
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
}

#[test]
fn activate_and_deactivate_in_a_real_bash() {
    let p = Project::new("");
    p.ok(&["db", "create", "act", "--engine", "postgres"]);
    let activate = p.state().join("act/bin/activate");
    let script = format!(
        "export PGHOST=before; unset DATABASE_URL ISOENV_ACTIVE\n\
         source {}\n\
         psql -tAc 'select 7*6'\n\
         echo \"url-set:${{DATABASE_URL:+yes}} active:$ISOENV_ACTIVE\"\n\
         deactivate\n\
         echo \"after:$PGHOST:${{DATABASE_URL-unset}}:${{ISOENV_ACTIVE-unset}}\"",
        activate.display()
    );
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "42\nurl-set:yes active:act\nafter:before:unset:unset\n",
        "{}",
        text(&out)
    );

    // The activated variables are what the environment configuration reads as active.
    let script = format!(
        "source {}\n{} --env-file {} env --json",
        activate.display(),
        env!("CARGO_BIN_EXE_xtask"),
        p.env_file().display()
    );
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["database"]["source"]["name"], "act", "{}", text(&out));
}

#[test]
fn ten_concurrent_cli_creates_exactly_one_wins() {
    let p = Project::new("");
    let children: Vec<_> = (0..10)
        .map(|_| {
            p.cmd(&["db", "create", "same", "--engine", "redis"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let wins = outputs.iter().filter(|o| o.status.success()).count();
    assert_eq!(wins, 1);
    for o in outputs.iter().filter(|o| !o.status.success()) {
        let err = text(o);
        assert!(
            err.contains("already exists") || err.contains("another isoenv command"),
            "{err}"
        );
    }
}

#[test]
fn bad_input_gets_clear_errors_and_creates_nothing() {
    let p = Project::new("");
    assert!(p
        .fails(&["db", "create", "a/b", "--engine", "postgres"])
        .contains("invalid environment name"));
    assert!(p
        .fails(&["db", "create", "ok", "--engine", "oracle"])
        .contains("valid engines: postgres, mysql, redis"));
    assert!(p
        .fails(&["db", "create", "ok", "--engine", "redis", "--backend", "vm"])
        .contains("valid backends"));
    assert!(p
        .fails(&["db", "destroy", "ghost"])
        .contains("no environment `ghost`"));
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    assert!(p
        .fails(&["db", "create", "ok", "--engine", "redis", "--port", &port])
        .contains("already in use"));
    assert!(!p.state().join("ok").exists());
    assert!(!p.state().join("a").exists());
}

fn demo_dirs() -> Vec<std::path::PathBuf> {
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::read_dir(target)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("isoenv-demo-")
        })
        .collect()
}

/// One test: both runs check that no demo directory is left, so they must not overlap.
#[test]
fn demo_tours_every_backend_and_leaves_nothing_even_when_interrupted() {
    full_demo();
    interrupted_demo();
}

fn full_demo() {
    let p = Project::new("");
    let out = p.run(&["demo", "--yes"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for expected in [
        "Backend `lightweight`",
        "postgres|PostgreSQL",
        "destroyed `demo-lightweight`",
    ] {
        assert!(said.contains(expected), "missing `{expected}`:\n{said}");
    }
    if nix::unistd::geteuid().is_root() {
        for expected in [
            "limit memory 512M",
            "/etc/shadow: does not exist",
            "network interfaces (/sys/class/net): lo \n",
            "destroyed `demo-sandbox`",
        ] {
            assert!(said.contains(expected), "missing `{expected}`:\n{said}");
        }
    }
    assert!(demo_dirs().is_empty(), "{:?}", demo_dirs());
}

fn interrupted_demo() {
    let p = Project::new("");
    let mut child = p
        .cmd(&["demo"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Past the first two pauses: the lightweight server is being created or running.
    use std::io::Write;
    stdin.write_all(b"\n\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(demo_dirs().is_empty(), "{:?}", demo_dirs());
}

/// What a script reads: `doctor` fails when this profile's `db up` would, idempotent verbs say
/// that they changed nothing, and `inspect --json` keeps one schema.
#[test]
fn the_cli_tells_scripts_what_happened() {
    let p = Project::new("");
    p.ok(&["db", "create", "idem", "--engine", "redis"]);
    assert!(p
        .ok(&["db", "start", "idem"])
        .starts_with("already running"));
    assert_eq!(p.ok(&["db", "stop", "idem"]).trim(), "stopped `idem`");
    assert_eq!(
        p.ok(&["db", "stop", "idem"]).trim(),
        "`idem` was already stopped"
    );
    p.ok(&["db", "destroy", "idem"]);

    p.ok(&[
        "db",
        "create",
        "iso",
        "--engine",
        "redis",
        "--backend",
        "sandbox",
    ]);
    let manifest = &p.json(&["db", "inspect", "iso", "--json"])["isolation"]["manifest"];
    assert!(manifest["limits"].is_object(), "{manifest}");
    assert!(
        manifest.get("Ok").is_none(),
        "a Rust Result leaked: {manifest}"
    );
    fs::write(p.state().join("iso/manifest.json"), "{").unwrap();
    let manifest = &p.json(&["db", "inspect", "iso", "--json"])["isolation"]["manifest"];
    assert!(manifest["error"].is_string(), "{manifest}");
    p.ok(&["db", "destroy", "iso"]);

    assert!(
        p.run(&["doctor"]).status.success(),
        "postgres is all development needs"
    );
    let staging = Project::new("ENVIRONMENT=staging\nDOCKER_HOST=tcp://127.0.0.1:1\n");
    let out = staging.run(&["doctor"]);
    assert!(
        !out.status.success(),
        "staging without Docker passed doctor"
    );
    assert!(
        text(&out).contains("this profile needs: docker"),
        "{}",
        text(&out)
    );
}

/// An application that reads its configuration as the design documents show (no activated
/// shell) gets the `dev` environment `db up` made, and `env` says where it came from. The VM
/// tunnel keeps `DB_VM_*`.
#[test]
fn development_resolves_to_the_dev_environment_without_activation() {
    let p = Project::new("");
    let before = p.json(&["env", "--json"]);
    assert_eq!(
        before["database"]["port"], 5432,
        "nothing made yet: DB_VM_*"
    );
    p.ok(&["db", "up"]);
    let port = p.json(&["db", "inspect", "dev", "--json"])["port"].clone();
    let after = p.json(&["env", "--json"]);
    assert_eq!(after["database"]["port"], port);
    assert_eq!(after["database"]["source"]["kind"], "default");
    assert!(p.ok(&["env"]).contains("from isoenv environment `dev`"));
    // Its dotenv file is what `docker run --env-file` and python-dotenv read.
    let dotenv = fs::read_to_string(p.state().join("dev/dotenv")).unwrap();
    assert!(dotenv.contains(&format!("DB_PORT={port}")), "{dotenv}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &fs::metadata(p.state().join("dev/dotenv"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    p.write_env("DB_VM_SSH_ENABLED=true\nDB_VM_HOST=vm.local\n");
    assert_eq!(p.json(&["env", "--json"])["database"]["host"], "vm.local");
    p.write_env("");
    p.ok(&["db", "destroy", "dev"]);
}

/// `activate` beside a Python venv, in both orders (bash and zsh), and `activate.fish`.
#[test]
fn activate_coexists_with_a_python_venv_and_fish_has_its_own() {
    let p = Project::new("");
    p.ok(&["db", "create", "act", "--engine", "postgres"]);
    let activate = p.state().join("act/bin/activate");
    let venv = p.dir.path().join("venv");
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    let venv = venv.join("bin/activate");
    let show = "echo \"${VIRTUAL_ENV:+venv}|${ISOENV_ACTIVE-unset}\"";
    let shell = |sh: &str, script: String| {
        let out = Command::new(sh)
            .arg("-c")
            .arg(format!("unset ISOENV_ACTIVE VIRTUAL_ENV\n{script}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{sh}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for sh in ["bash", "zsh"] {
        // venv first: `deactivate` undoes isoenv, then the venv, as a stack.
        let out = shell(
            sh,
            format!(
                ". {v}\n. {a}\n{show}\npsql -w -tAc 'select 6*7'\ndeactivate\n{show}\ndeactivate\n{show}",
                v = venv.display(),
                a = activate.display()
            ),
        );
        assert_eq!(
            out, "venv|act\n42\nvenv|unset\n|unset\n",
            "{sh}, venv first"
        );
        // isoenv first: the venv's activate takes `deactivate`; isoenv_deactivate remains.
        let out = shell(
            sh,
            format!(
                ". {a}\n. {v}\n{show}\ndeactivate\n{show}\nisoenv_deactivate\n{show}",
                v = venv.display(),
                a = activate.display()
            ),
        );
        assert_eq!(out, "venv|act\n|act\n|unset\n", "{sh}, isoenv first");
    }
    let fish = Command::new("fish")
        .arg("-c")
        .arg(format!(
            "set -e ISOENV_ACTIVE; source {}.fish; psql -w -tAc 'select 6*7'; echo $ISOENV_ACTIVE; isoenv_deactivate; set -q ISOENV_ACTIVE; or echo gone",
            activate.display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&fish.stdout),
        "42\nact\ngone\n",
        "{}",
        text(&fish)
    );
}

/// After `source .../bin/activate`, each engine's own client connects with no arguments: over
/// TCP, and over the Unix socket where the backend has one (Debian's /etc/mysql names another
/// socket; redis-cli reads no address from the environment).
#[test]
fn every_client_connects_with_no_arguments_after_activate() {
    let p = Project::new("");
    p.ok(&["db", "create", "my", "--engine", "mysql"]);
    p.ok(&["db", "create", "kv", "--engine", "redis"]);
    let shell = |env: &str, commands: &str| {
        let activate = p.state().join(env).join("bin/activate");
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "unset ISOENV_ACTIVE MYSQL_HOST MYSQL_TCP_PORT REDISCLI_AUTH\n. {}\n{commands}",
                activate.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{env}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let my = shell(
        "my",
        "mariadb -N -e 'select 6*7'\nmariadb -h localhost -N -e 'select 6*7, database()'",
    );
    assert_eq!(my, "42\n42\tisoenv\n");
    let socket = p.state().join("kv/run/redis.sock");
    let kv = shell(
        "kv",
        &format!(
            "redis-cli set answer 42\nredis-cli -s {} get answer",
            socket.display()
        ),
    );
    assert_eq!(kv, "OK\n42\n");
    p.ok(&["db", "destroy", "my"]);
    p.ok(&["db", "destroy", "kv"]);
}

/// On a terminal a missing engine is offered for installation (here declined, so nothing is
/// installed or made); `--install`, `ISOENV_AUTO_INSTALL=1` and `CI=true` would not ask.
#[test]
fn a_missing_engine_is_offered_for_installation_on_a_terminal() {
    use std::io::Write;
    let p = Project::new("ISOENV_REDIS_BIN_DIR=/nonexistent\n");
    let command = format!(
        "{} --env-file {} db create offered --engine redis",
        env!("CARGO_BIN_EXE_xtask"),
        p.env_file().display()
    );
    // `script` gives the command a terminal.
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("CI")
        .env_remove("ISOENV_AUTO_INSTALL")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.stdin.take().unwrap().write_all(b"n\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(
        shown.contains("redis is not installed. Install it now with `"),
        "{shown}"
    );
    assert!(shown.contains("install it with:"), "{shown}");
    assert!(!p.state().join("offered").exists());
}

/// Every verb that reports something says it as JSON when asked, one object per command.
#[test]
fn every_reporting_verb_speaks_json() {
    let p = Project::new("");
    p.ok(&["db", "create", "j", "--engine", "redis"]);
    assert_eq!(p.json(&["db", "stop", "j", "--json"])["status"], "stopped");
    assert_eq!(p.json(&["db", "start", "j", "--json"])["status"], "running");
    assert_eq!(p.json(&["db", "destroy", "j", "--json"])["destroyed"], "j");
    let gc = p.json(&["db", "gc", "--json"]);
    assert!(
        gc["environments"].is_array() && gc["leftovers"].is_array(),
        "{gc}"
    );
    assert_eq!(p.json(&["db", "down", "--json"])["outcome"], "nothing");
    let run = p.json(&[
        "run",
        "--isolated",
        "--engine",
        "redis",
        "--json",
        "--",
        "true",
    ]);
    assert_eq!(run["exit_code"], 0);
    assert_eq!(run["environments"].as_array().unwrap().len(), 1, "{run}");
    assert_eq!(run["kept"], false);
    let git = Command::new("git")
        .args(["init", "-q"])
        .current_dir(p.dir.path())
        .status()
        .unwrap();
    assert!(git.success());
    let mut hooks = p.cmd(&["hooks", "status", "--json"]);
    hooks.current_dir(p.dir.path());
    let out = hooks.output().unwrap();
    let status: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_eq!(status["state"], "absent");
}
