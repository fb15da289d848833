#!/bin/sh
# Entrypoint of the taskmesh worker image. For each NAME_FILE=/path in the environment
# (Docker's convention for secrets), export NAME with the file's content, then run the
# command: a secret reaches taskmesh and Celery by environment, never on a command line,
# which `ps` shows to every user of the host.
set -eu
for name in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)_FILE=.*/\1/p'); do
    eval "path=\${${name}_FILE}"
    if [ ! -r "$path" ]; then
        echo "taskmesh-entrypoint: ${name}_FILE names $path, which cannot be read; mount the secret there" >&2
        exit 2
    fi
    value=$(cat "$path")
    export "$name=$value"
    unset "${name}_FILE"
done
exec "$@"
