#!/bin/sh
# isoenv's local MariaDB image: the official image's interface where isoenv uses it (options as
# arguments, /docker-entrypoint-initdb.d/*.sql) over a data directory that was initialized when
# the image was built and that Docker copies into each new volume. The scripts run through
# --init-file at every start, so they must be idempotent (CREATE ... IF NOT EXISTS).
set -eu
case "${1:-}" in -*) set -- mariadbd "$@" ;; esac
if [ "${1:-}" = mariadbd ]; then
    shift
    init=/tmp/isoenv-init.sql
    : > "$init"
    for f in /docker-entrypoint-initdb.d/*.sql; do
        [ -f "$f" ] || continue
        while IFS= read -r line || [ -n "$line" ]; do printf '%s\n' "$line"; done < "$f" >> "$init"
    done
    set -- mariadbd --no-defaults --datadir=/var/lib/mysql --port=3306 --bind-address=0.0.0.0 \
        --socket=/run/mysqld/mysqld.sock --skip-name-resolve --init-file="$init" "$@"
fi
exec "$@"
