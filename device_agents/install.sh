#!/usr/bin/env bash
# Install an hfl-mqtt node on a board as a systemd service: Raspberry Pi OS bookworm (arm64,
# armhf), Debian, Ubuntu.
#
#   sudo device_agents/install.sh [OPTIONS] NODE.yaml [SECRET_FILE...]
#
# - creates the unprivileged system user and group hfl-mqtt;
# - creates a venv (default /opt/hfl-mqtt) holding hfl-mqtt with its `agent` extra only (numpy,
#   msgpack, zstandard, pydantic, structlog, aiomqtt, pyyaml): no torch, scikit-learn or plots;
# - installs the node file as /etc/hfl-mqtt/NODE.yaml (0640 root:hfl-mqtt) and its secrets
#   (password file, TLS CA, client certificate and key) in /etc/hfl-mqtt/NODE/ (0640
#   root:hfl-mqtt: the service reads them, only root changes them). The node file's secret
#   paths are rewritten to NODE/NAME, which the loader resolves next to the node file;
# - installs the template unit hfl-mqtt@.service and enables hfl-mqtt@NODE, and starts (or
#   restarts) it when systemd is running. In a chroot or a container without systemd it
#   installs and enables the unit and says how to start the node.
#
# Running it again updates the package, the node file, the secrets and the unit: it is safe to
# repeat. Several nodes on one board: run it once per node file (they share the venv).
set -euo pipefail

SELF_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
UNIT_NAME="hfl-mqtt@.service"
SERVICE_USER="hfl-mqtt"
CONFIG_DIR="/etc/hfl-mqtt"
UNIT_DIR="/etc/systemd/system"
STATE_ROOT="/var/lib/hfl-mqtt"

VENV="${HFL_MQTT_VENV:-/opt/hfl-mqtt}"
FROM="${HFL_MQTT_FROM:-hfl-mqtt}"
PYTHON="${HFL_MQTT_PYTHON:-python3}"
START=1
DATA=()
CONFIG=""
SECRETS=()

usage() {
    cat <<EOF
Usage: sudo $0 [OPTIONS] NODE.yaml [SECRET_FILE...]

Install the node of NODE.yaml as the systemd service hfl-mqtt@NODE (NODE: the file's 'node').

SECRET_FILE: a file the node file names as password_file, tls.ca_file, tls.cert_file or
tls.key_file (matched by file name). A named file not given here is taken from where the node
file's path points, or kept from an earlier install.

Options:
  --from SPEC      what to install: a checkout directory, a wheel or an sdist path, or a
                   requirement such as 'hfl-mqtt==0.1.0' (default: \$HFL_MQTT_FROM, else
                   'hfl-mqtt' from the package index). The 'agent' extra is added.
  --venv DIR       the venv (default: \$HFL_MQTT_VENV, else /opt/hfl-mqtt)
  --python PY      the Python that creates the venv, >= 3.11 (default: python3)
  --data FILE      copy FILE into the node's state directory $STATE_ROOT/NODE/, where the
                   service runs (a CSV task's readings; repeat for several files)
  --no-start       enable the service but do not start or restart it now
  -h, --help       this help

Environment: HFL_MQTT_FROM, HFL_MQTT_VENV, HFL_MQTT_PYTHON; PIP_* settings reach pip.

After installing:  systemctl status hfl-mqtt@NODE     journalctl -u hfl-mqtt@NODE -o cat -f
EOF
}

say() { echo "install.sh: $*"; }
die() {
    echo "install.sh: error: $*" >&2
    exit 1
}

while (($#)); do
    case "$1" in
        --from) FROM="${2:?--from needs a value}"; shift 2 ;;
        --venv) VENV="${2:?--venv needs a directory}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs a command}"; shift 2 ;;
        --data) DATA+=("${2:?--data needs a file}"); shift 2 ;;
        --no-start) START=0; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *)
            if [[ -z "$CONFIG" ]]; then CONFIG="$1"; else SECRETS+=("$1"); fi
            shift
            ;;
    esac
done
while (($#)); do
    if [[ -z "$CONFIG" ]]; then CONFIG="$1"; else SECRETS+=("$1"); fi
    shift
done

[[ -n "$CONFIG" ]] || { usage >&2; exit 2; }
[[ -f "$CONFIG" && -r "$CONFIG" ]] || die "node file $CONFIG: not a readable file"
for f in "${SECRETS[@]}" "${DATA[@]}"; do
    [[ -f "$f" && -r "$f" ]] || die "$f: not a readable file"
done
[[ "$VENV" == /* ]] || die "--venv must be an absolute path, got $VENV"
[[ -f "$SELF_DIR/$UNIT_NAME" ]] || die "$SELF_DIR/$UNIT_NAME is missing: run install.sh from its directory in a checkout"
[[ $EUID -eq 0 ]] || die "run as root (sudo $0 ...): it creates a user and writes /etc, /opt and the unit"

# --- Python and its venv module -----------------------------------------------------------------
if ! "$PYTHON" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    if ! command -v "$PYTHON" >/dev/null && [[ "$PYTHON" != python3 ]]; then
        die "$PYTHON not found"
    fi
    if command -v apt-get >/dev/null && [[ "$PYTHON" == python3 ]]; then
        say "installing python3 and python3-venv with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
    fi
    "$PYTHON" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        die "$PYTHON must be Python >= 3.11 with its venv module (Debian: apt-get install python3-venv)"
fi

# --- the service user ---------------------------------------------------------------------------
if ! getent group "$SERVICE_USER" >/dev/null; then
    groupadd --system "$SERVICE_USER"
    say "created group $SERVICE_USER"
fi
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    nologin="$(command -v nologin || echo /usr/sbin/nologin)"
    useradd --system --gid "$SERVICE_USER" --home-dir "$STATE_ROOT" --no-create-home \
        --shell "$nologin" --comment "hfl-mqtt federated learning node" "$SERVICE_USER"
    say "created system user $SERVICE_USER"
fi

# --- the venv and the package -------------------------------------------------------------------
# The venv holds what the node runs and no installer: pip runs from the pip wheel that Python's
# venv module brings (Debian: /usr/share/python-wheels), which keeps about 25 MB of pip and
# setuptools off the board. Without such a wheel the venv gets its own pip.
pip_wheel() {
    local w
    for w in /usr/share/python-wheels/pip-*.whl \
        "$("$PYTHON" -c 'import ensurepip, os; print(os.path.dirname(ensurepip.__file__))' \
            2>/dev/null)"/_bundled/pip-*.whl; do
        if [[ -f "$w" ]]; then echo "$w"; fi
    done | sort -V | tail -n 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating the venv $VENV"
    "$PYTHON" -m venv --without-pip "$VENV"
fi
if [[ -x "$VENV/bin/pip" ]]; then
    PIP=("$VENV/bin/python" -m pip)
elif wheel="$(pip_wheel)" && [[ -n "$wheel" ]]; then
    PIP=("$VENV/bin/python" "$wheel/pip")
else
    say "no pip wheel found: installing pip into the venv"
    "$VENV/bin/python" -m ensurepip --upgrade >/dev/null
    PIP=("$VENV/bin/python" -m pip)
fi

# What to install, with the agent extra: a path gets [agent] appended, a requirement after its name.
if [[ -e "$FROM" ]]; then
    FROM="$(cd "$(dirname "$FROM")" && pwd)/$(basename "$FROM")"
    SPEC="${FROM}[agent]"
elif [[ "$FROM" =~ ^([A-Za-z0-9._-]+)(\[[^]]*\])?(.*)$ ]]; then
    extras="${BASH_REMATCH[2]:-}"
    if [[ -z "$extras" ]]; then extras="[agent]"; else extras="${extras%]},agent]"; fi
    SPEC="${BASH_REMATCH[1]}${extras}${BASH_REMATCH[3]}"
else
    die "--from $FROM: neither a path nor a requirement"
fi
say "installing $SPEC into $VENV (takes a minute or two on a Raspberry Pi)"
"${PIP[@]}" install --upgrade --disable-pip-version-check --no-warn-script-location \
    --progress-bar off -q "$SPEC"
"$VENV/bin/hfl-mqtt" --help >/dev/null || die "$VENV/bin/hfl-mqtt does not run"
say "installed $("$VENV/bin/python" -c 'import hfl_mqtt; print("hfl-mqtt", hfl_mqtt.__version__)')"

# --- the node file and its secrets ---------------------------------------------------------------
# The venv's Python reads the node file (the same loader as the service: errors name the field),
# and writes a copy whose secret paths are NODE/NAME, relative to the installed file. It prints
# the node id, then one "secret<TAB>source<TAB>name" line per file to install.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$VENV/bin/python" - "$CONFIG" "$WORK/node.yaml" "$CONFIG_DIR" "${SECRETS[@]}" >"$WORK/plan" <<'PY'
import sys
from pathlib import Path

import yaml

from hfl_mqtt.config import load_node
from hfl_mqtt.errors import ConfigError

source, out, config_dir, *given = sys.argv[1:]
try:
    node = load_node(source).node
except ConfigError as exc:
    sys.exit(f"install.sh: error: {exc}")
data = yaml.safe_load(Path(source).read_text(encoding="utf8"))
by_name = {}
for path in map(Path, given):
    if path.name in by_name and by_name[path.name].resolve() != path.resolve():
        sys.exit(f"install.sh: error: two secret files are named {path.name}")
    by_name[path.name] = path
installed = Path(config_dir) / node
print(f"node\t{node}")
used = set()
for link in ("upstream", "downstream"):
    broker = (data.get(link) or {}).get("broker") or {}
    fields = [(broker, "password_file")]
    tls = broker.get("tls") or {}
    fields += [(tls, key) for key in ("ca_file", "cert_file", "key_file")]
    for holder, key in fields:
        written = holder.get(key)
        if not written:
            continue
        name = Path(written).name
        where = Path(written) if Path(written).is_absolute() else Path(source).parent / written
        if name in by_name:
            print(f"secret\t{by_name[name]}\t{name}")
        elif where.is_file():
            print(f"secret\t{where}\t{name}")
        elif not (installed / name).is_file():
            sys.exit(
                f"install.sh: error: {link}.broker {key} {written}: not found; give the file "
                "on the command line"
            )
        used.add(name)
        holder[key] = f"{node}/{name}"
for name, path in by_name.items():
    if name not in used:
        print(f"unused\t{path}\t{name}")
header = f"# Installed by device_agents/install.sh from {Path(source).resolve()}.\n"
header += f"# Secret paths are relative to this file: {installed}/.\n"
Path(out).write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf8")
PY

NODE="$(awk -F '\t' '$1 == "node" { print $2 }' "$WORK/plan")"
[[ "$NODE" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "node id '$NODE' is not usable as a unit instance"

install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR" "$CONFIG_DIR/$NODE"
while IFS=$'\t' read -r kind src name; do
    case "$kind" in
        secret)
            install -m 0640 -o root -g "$SERVICE_USER" "$src" "$CONFIG_DIR/$NODE/$name"
            say "secret $CONFIG_DIR/$NODE/$name (0640 root:$SERVICE_USER)"
            ;;
        unused)
            say "warning: $src is not named by the node file: installed anyway"
            install -m 0640 -o root -g "$SERVICE_USER" "$src" "$CONFIG_DIR/$NODE/$name"
            ;;
    esac
done <"$WORK/plan"
install -m 0640 -o root -g "$SERVICE_USER" "$WORK/node.yaml" "$CONFIG_DIR/$NODE.yaml"
say "node file $CONFIG_DIR/$NODE.yaml (0640 root:$SERVICE_USER)"

# The state directory (systemd also creates it, as StateDirectory=): data files go here.
install -d -m 0755 -o root -g root "$STATE_ROOT"
install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_ROOT/$NODE"
for f in "${DATA[@]}"; do
    install -m 0640 -o "$SERVICE_USER" -g "$SERVICE_USER" "$f" "$STATE_ROOT/$NODE/"
    say "data $STATE_ROOT/$NODE/$(basename "$f")"
done

# --- the unit -----------------------------------------------------------------------------------
install -d -m 0755 "$UNIT_DIR"
sed "s|/opt/hfl-mqtt|$VENV|g" "$SELF_DIR/$UNIT_NAME" >"$WORK/unit"
install -m 0644 "$WORK/unit" "$UNIT_DIR/$UNIT_NAME"
if [[ -f "$SELF_DIR/README.md" ]]; then
    install -m 0644 "$SELF_DIR/README.md" "$VENV/README-device.md"
fi

# A growing restart back-off needs systemd >= 254 (RestartSteps=, RestartMaxDelaySec=).
version=0
if command -v systemctl >/dev/null; then
    version="$(systemctl --version 2>/dev/null | awk 'NR == 1 { print $2 + 0 }')" || version=0
fi
dropin="$UNIT_DIR/$UNIT_NAME.d/backoff.conf"
if ((version >= 254)); then
    install -d -m 0755 "$(dirname "$dropin")"
    printf '[Service]\nRestartSteps=6\nRestartMaxDelaySec=5min\n' >"$WORK/backoff"
    install -m 0644 "$WORK/backoff" "$dropin"
fi
say "unit $UNIT_DIR/$UNIT_NAME"

INSTANCE="hfl-mqtt@$NODE.service"
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable "$INSTANCE" >/dev/null
    if ((START)); then
        systemctl restart "$INSTANCE"
        say "started $INSTANCE: systemctl status hfl-mqtt@$NODE; journalctl -u hfl-mqtt@$NODE -o cat -f"
    else
        say "enabled $INSTANCE; start it with: systemctl start hfl-mqtt@$NODE"
    fi
else
    # No running systemd (a chroot, a container, an image being built): enable by hand, as
    # `systemctl enable` would, so the node starts at the board's next boot.
    wants="$UNIT_DIR/multi-user.target.wants"
    install -d -m 0755 "$wants"
    ln -sfn "$UNIT_DIR/$UNIT_NAME" "$wants/$INSTANCE"
    say "systemd is not running here: $INSTANCE is installed and enabled, and starts at the next boot."
    say "  on a running system: systemctl daemon-reload && systemctl start hfl-mqtt@$NODE"
    say "  without systemd: runuser -u $SERVICE_USER -- $VENV/bin/hfl-mqtt run --config $CONFIG_DIR/$NODE.yaml"
fi
