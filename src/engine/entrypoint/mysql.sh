#!/bin/sh
# isoenv's local MariaDB image: the official image's interface where isoenv uses it (options as
# arguments, MARIADB_ROOT_PASSWORD or MARIADB_ROOT_PASSWORD_FILE for root@'%',
# /docker-entrypoint-initdb.d/*.sql) over a data directory that was initialized when the image
# was built and that Docker copies into each new volume. The login and the scripts run through
# --init-file at every start, so scripts must be idempotent (CREATE ... IF NOT EXISTS).
set -eu
umask 077
case "${1:-}" in -*) set -- mariadbd "$@" ;; esac
if [ "${1:-}" = mariadbd ]; then
    shift
    init=/tmp/isoenv-init.sql
    : > "$init"
    password=${MARIADB_ROOT_PASSWORD:-}
    if [ -n "${MARIADB_ROOT_PASSWORD_FILE:-}" ]; then
        IFS= read -r password < "$MARIADB_ROOT_PASSWORD_FILE" || [ -n "$password" ]
    fi
    case "$password" in
        *\'*|*\\*) echo "isoenv image: the root password must not contain ' or \\" >&2; exit 1 ;;
        ?*) printf "%s\n" \
            "CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY '$password';" \
            "ALTER USER 'root'@'%' IDENTIFIED BY '$password';" \
            "GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;" >> "$init" ;;
    esac
    for f in /docker-entrypoint-initdb.d/*.sql; do
        [ -f "$f" ] || continue
        while IFS= read -r line || [ -n "$line" ]; do printf '%s\n' "$line"; done < "$f" >> "$init"
    done
    set -- mariadbd --no-defaults --datadir=/var/lib/mysql --port=3306 --bind-address=0.0.0.0 \
        --socket=/run/mysqld/mysqld.sock --skip-name-resolve --init-file="$init" "$@"
fi
exec "$@"
