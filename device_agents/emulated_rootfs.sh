#!/usr/bin/env bash
# Build (once) and print the path of an emulated Raspberry Pi OS stand-in: a Debian bookworm arm64
# userland run through qemu-user-static and binfmt_misc, for the device test and the footprint
# benchmark. The rootfs is cached under $HFL_DEVICE_CACHE (default /var/cache/hfl-mqtt-device),
# keyed by a hash of this recipe, so only the first run pays for debootstrap (about 2-3 minutes).
#
#   device_agents/emulated_rootfs.sh [--arch arm64] [--check]
#
# The last line of stdout is the rootfs path; progress goes to stderr. Needs root and
# qemu-user-static, debootstrap and binfmt-support (installed with apt-get when missing).
set -euo pipefail

ARCH=arm64
CHECK_ONLY=0
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,ca-certificates

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --arch ARCH   Debian architecture of the rootfs: arm64 (default) or armhf
  --check       only print the cached rootfs path and exit 0 if it exists, 1 if not
  -h, --help    this help
EOF
}

while (($#)); do
    case "$1" in
        --arch) ARCH="${2:?--arch needs a value}"; shift 2 ;;
        --check) CHECK_ONLY=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "emulated_rootfs: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

case "$ARCH" in
    arm64) QEMU=qemu-aarch64 ;;
    armhf) QEMU=qemu-arm ;;
    *) echo "emulated_rootfs: unsupported --arch $ARCH (arm64 or armhf)" >&2; exit 2 ;;
esac

say() { echo "emulated_rootfs: $*" >&2; }

# The Debian mirror apt here uses: the first http(s) URI of a bookworm "main" source.
debian_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] && files+=("$f")
    done
    if ((${#files[@]})); then
        # one-line format: deb URI bookworm main ...; deb822 format: URIs: URI (+ Suites: bookworm)
        awk '
            $1 == "deb" && $3 == "bookworm" { print $2; exit }
            $1 == "URIs:" { uri = $2 }
            $1 == "Suites:" && uri != "" { for (i = 2; i <= NF; i++) if ($i == "bookworm") { print uri; exit } }
        ' "${files[@]}" | grep -E '^https?://' | head -n 1 || true
    fi
}

MIRROR="${HFL_DEBIAN_MIRROR:-$(debian_mirror)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

# Files from the host that pip inside the rootfs needs to reach the package index the way pip on
# the host does: its configuration files and the CA bundle its `cert` setting names.
pip_files() {
    local f
    for f in /etc/pip.conf /etc/xdg/pip/pip.conf /root/.config/pip/pip.conf /root/.pip/pip.conf \
        "${PIP_CONFIG_FILE:-}"; do
        [[ -n "$f" && -f "$f" ]] && echo "$f"
    done
    pip_cert
}

pip_cert() {
    local cert="${PIP_CERT:-}"
    if [[ -z "$cert" ]]; then
        cert="$(grep -hE '^\s*cert\s*=' /etc/pip.conf /etc/xdg/pip/pip.conf \
            /root/.config/pip/pip.conf 2>/dev/null | tail -n 1 | sed 's/^[^=]*=\s*//' || true)"
    fi
    [[ -n "$cert" && -f "$cert" ]] && echo "$cert"
    return 0
}

pip_constraints() {
    grep -hE '^\s*constraint\s*=' /etc/pip.conf /etc/xdg/pip/pip.conf /root/.config/pip/pip.conf \
        2>/dev/null | sed 's/^[^=]*=\s*//' || true
}

# The key: the recipe (bump RECIPE when the debootstrap step changes), architecture, suite,
# packages and mirror. Editing the rest of this script keeps the cache.
RECIPE=1
KEY="$(echo "$RECIPE $ARCH $SUITE $PACKAGES $MIRROR" | sha256sum | cut -c1-16)"
CACHE="${HFL_DEVICE_CACHE:-/var/cache/hfl-mqtt-device}"
ROOT="$CACHE/bookworm-$ARCH-$KEY"

if ((CHECK_ONLY)); then
    echo "$ROOT"
    [[ -f "$ROOT/.hfl-complete" ]]
    exit
fi

if [[ $EUID -ne 0 ]]; then
    echo "emulated_rootfs: must run as root (debootstrap, chroot, binfmt_misc)" >&2
    exit 1
fi

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[[ -x /usr/bin/${QEMU}-static ]] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if ((${#need[@]})); then
    say "installing ${need[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

# binfmt_misc lets the kernel hand arm64 binaries to qemu; a container may not have it mounted.
if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
    say "mounting binfmt_misc"
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [[ ! -e /proc/sys/fs/binfmt_misc/$QEMU ]]; then
    say "enabling $QEMU in binfmt_misc"
    update-binfmts --enable "$QEMU" >&2
fi

if [[ ! -f "$ROOT/.hfl-complete" ]]; then
    say "building a $SUITE $ARCH rootfs in $ROOT from $MIRROR (takes 2-3 minutes; cached afterwards)"
    rm -rf "$ROOT.partial"
    mkdir -p "$CACHE"
    debootstrap --arch="$ARCH" --variant=minbase --include="$PACKAGES" \
        "$SUITE" "$ROOT.partial" "$MIRROR" >&2
    rm -rf "$ROOT"
    mv "$ROOT.partial" "$ROOT"
    touch "$ROOT/.hfl-complete"
    say "rootfs ready"
fi

# Refreshed every run (cheap), so a changed host pip configuration reaches the rootfs.
while IFS= read -r f; do
    mkdir -p "$ROOT$(dirname "$f")"
    cp -f "$f" "$ROOT$f"
done < <(pip_files)
while IFS= read -r f; do
    if [[ -n "$f" && -f "$f" ]]; then
        mkdir -p "$ROOT$(dirname "$f")"
        cp -f "$f" "$ROOT$f"
    fi
done < <(pip_constraints)
# Name resolution inside the chroot is the host's.
cp -f /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

echo "$ROOT"
