#!/bin/sh
# isoenv's local PostgreSQL image: the official image's interface (POSTGRES_USER,
# POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE, PGDATA, options as arguments) over a cluster that
# was initialized when the image was built and that Docker copies into each new volume.
set -eu
case "${1:-}" in -*) set -- postgres "$@" ;; esac
if [ "${1:-}" = postgres ]; then
    if [ "${POSTGRES_USER:-postgres}" != postgres ]; then
        echo "isoenv image: POSTGRES_USER must be postgres, the superuser of the built-in cluster" >&2
        exit 1
    fi
    password=${POSTGRES_PASSWORD:-}
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        IFS= read -r password < "$POSTGRES_PASSWORD_FILE" || [ -n "$password" ]
    fi
    case "$password" in
        "") echo "isoenv image: set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE" >&2; exit 1 ;;
        *\'*) echo "isoenv image: the password must not contain a single quote" >&2; exit 1 ;;
    esac
    # Single-user mode sets the login before the server accepts any connection.
    printf "ALTER ROLE postgres PASSWORD '%s'\n" "$password" \
        | postgres --single -D "$PGDATA" postgres >/dev/null
fi
exec "$@"
