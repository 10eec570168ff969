#!/bin/sh
# Write an env file for docker-compose.yml from .env.example with a fresh random value for every secret
# it leaves empty; the bearer token line gets one token, "ops", with every scope.
#   sh deploy/make-env.sh [FILE]      (default .env next to docker-compose.yml; never overwritten)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
target=${1:-$here/.env}
if [ -e "$target" ]; then
    echo "$target exists; not overwriting it" >&2
    exit 1
fi
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
while IFS= read -r line; do
    case "$line" in
        ORDERS_AUTH_TOKENS=) echo "ORDERS_AUTH_TOKENS=ops admin,orders:read,orders:write,inventory:write $(random)" ;;
        [A-Z]*=) echo "$line$(random)" ;;
        *) echo "$line" ;;
    esac
done < "$here/.env.example" > "$target"
echo "wrote $target"
