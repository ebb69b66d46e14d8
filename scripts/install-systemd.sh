#!/usr/bin/env bash
# Installs wsd as a systemd service: the release binary to /usr/local/bin/wsd, the repo's
# workers.toml to /etc/wsd/workers.toml (kept if one exists) with its runtime files under
# /run/wsd and /var/log/wsd and, with a new config, the chat page its static_dir names to
# /etc/wsd/static; and scripts/wsd.service to /etc/systemd/system. Run as root.
#   PREFIX=/usr/local  DESTDIR=  (DESTDIR stages the files under another root, for packaging)
#   WSD_BIN=path       install this binary instead of building one
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/usr/local}"
DEST="${DESTDIR:-}"
if [[ -z "${WSD_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --release --bin wsd)
    WSD_BIN="$ROOT/target/release/wsd"
fi
install -D -m 0755 "$WSD_BIN" "$DEST$PREFIX/bin/wsd"
install -D -m 0644 "$ROOT/README.md" "$DEST$PREFIX/share/doc/wsd/README.md"
for doc in "$ROOT"/docs/*.md; do
    install -D -m 0644 "$doc" "$DEST$PREFIX/share/doc/wsd/docs/$(basename "$doc")"
done
CONF="$DEST/etc/wsd/workers.toml"
if [[ ! -e "$CONF" ]]; then
    install -d "$DEST/etc/wsd"
    {
        printf '[server]\npid_file = "/run/wsd/wsd.pid"\ncontrol_socket = "/run/wsd/wsd.sock"\n'
        printf 'log_file = "/var/log/wsd/wsd.log"\n\n'
        grep -v '^\[server\]' "$ROOT/workers.toml"
    } >"$CONF"
    # The page the repo's `static_dir = "static"` serves, resolved next to the config.
    install -d "$DEST/etc/wsd/static"
    install -m 0644 "$ROOT"/static/* "$DEST/etc/wsd/static/"
fi
"$DEST$PREFIX/bin/wsd" -c "$CONF" check
sed "s|/usr/local|$PREFIX|g" "$ROOT/scripts/wsd.service" \
    | install -D -m 0644 /dev/stdin "$DEST/etc/systemd/system/wsd.service"
if [[ -z "$DEST" ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    echo "installed; start with: systemctl enable --now wsd"
else
    echo "installed under ${DEST:-/}; systemd is not running here, so nothing was enabled"
fi
