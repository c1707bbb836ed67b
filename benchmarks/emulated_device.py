"""An emulated board: a Debian bookworm arm64 rootfs run through qemu-user-static, with the
device agent installed in it by ``device_agents/install.sh``, and nodes started in it the way
its systemd unit would start them.

systemd does not run in a chroot, so a node is started from the unit's own ``ExecStart=`` line
(``exec_start``), as the unit's ``User=`` and in its ``WorkingDirectory=``. The chroot shares
the host's network namespace: a broker on the host's loopback is reachable from inside.
Used by the device test (``make test-device``) and the footprint benchmark (``--arch arm64``).
Needs root (debootstrap, chroot, mounts).

Emulated times are not a board's: qemu-user translates every arm64 instruction, so CPU-bound
work runs several times slower than natively on the host, and neither is a Raspberry Pi.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AGENT_VENV",
    "CHECKOUT_IN_ROOT",
    "REPO",
    "SERVICE_USER",
    "ServiceCommand",
    "build_rootfs",
    "chroot_argv",
    "copy_checkout",
    "emulated_board",
    "exec_start",
    "install_agent",
    "mounted",
    "overlay",
    "unit_directives",
]

REPO = Path(__file__).resolve().parent.parent
ROOTFS_SCRIPT = REPO / "device_agents" / "emulated_rootfs.sh"
UNIT_FILE = REPO / "device_agents" / "hfl-mqtt@.service"
CHECKOUT_IN_ROOT = "/usr/src/hfl-mqtt"
AGENT_VENV = "/opt/hfl-mqtt"
SERVICE_USER = "hfl-mqtt"
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}


def build_rootfs(arch: str = "arm64") -> Path:
    """The cached rootfs for ``arch``, built first if missing (progress on stderr)."""
    out = subprocess.run(
        ["bash", str(ROOTFS_SCRIPT), "--arch", arch],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[Path]:
    """``root`` with /proc, /sys and /dev mounted for the duration (what pip, venv and a
    Python program expect), unmounted afterwards, even if something failed."""
    done: list[Path] = []
    try:
        for target, args in (
            ("proc", ["-t", "proc", "proc"]),
            ("sys", ["-t", "sysfs", "sysfs"]),
            ("dev", ["--bind", "/dev"]),
            ("dev/pts", ["--bind", "/dev/pts"]),
        ):
            path = root / target
            if os.path.ismount(path):
                continue
            path.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *args, str(path)], check=True)
            done.append(path)
        yield root
    finally:
        for path in reversed(done):
            subprocess.run(["umount", "--lazy", str(path)], check=False)


@contextlib.contextmanager
def overlay(root: Path, workdir: Path) -> Iterator[Path]:
    """A writable view of ``root`` (an overlay mount in ``workdir``) so that what a run
    installs never reaches the cached rootfs; unmounted afterwards."""
    upper, work, merged = workdir / "upper", workdir / "work", workdir / "merged"
    for path in (upper, work, merged):
        path.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={root},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", "--lazy", str(merged)], check=False)


@contextlib.contextmanager
def emulated_board(workdir: Path, arch: str = "arm64") -> Iterator[Path]:
    """A fresh board for one run: the cached rootfs (built if missing) under an overlay in
    ``workdir``, with /proc, /sys and /dev mounted and pip's download cache kept on the host
    (``/var/cache/hfl-mqtt-device/pip-ARCH``) so later runs download nothing."""
    root = build_rootfs(arch)
    with overlay(root, workdir) as merged, mounted(merged):
        cache = root.parent / f"pip-{arch}"
        cache.mkdir(exist_ok=True)
        inside = merged / "root" / ".cache" / "pip"
        inside.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(cache), str(inside)], check=True)
        try:
            yield merged
        finally:
            subprocess.run(["umount", "--lazy", str(inside)], check=False)


def copy_checkout(root: Path, dest: str = CHECKOUT_IN_ROOT) -> Path:
    """Copy this checkout's files (tracked, and new ones not ignored) to ``root/dest``; the
    copy is replaced each time."""
    target = root / dest.lstrip("/")
    if target.exists():
        shutil.rmtree(target)
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        stdout=subprocess.PIPE,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = os.fsdecode(raw)
        src = REPO / rel
        if not src.is_file():
            continue  # deleted in the working tree
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target / rel)
    return target


def chroot_argv(
    root: Path,
    argv: Sequence[str],
    *,
    user: str | None = None,
    cwd: str = "/",
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """A host command that runs ``argv`` inside ``root`` as ``user`` (default root), in
    ``cwd``, with a clean environment (``CHROOT_ENV`` plus ``env``)."""
    variables = {**CHROOT_ENV, **(env or {})}
    if user is not None:
        variables["HOME"] = cwd
    script = f"cd {shlex.quote(cwd)} && exec " + shlex.join(argv)
    prefix = ["chroot"] + ([f"--userspec={user}:{user}"] if user else []) + [str(root)]
    return [
        "env",
        "-i",
        *(f"{k}={v}" for k, v in variables.items()),
        *prefix,
        "/bin/sh",
        "-c",
        script,
    ]


def install_agent(
    root: Path,
    config: Path,
    *,
    data: Sequence[Path] = (),
    secrets: Sequence[Path] = (),
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``device_agents/install.sh`` of the copied checkout inside ``root`` for ``config``
    (copied in, with its data files), installing from that checkout."""
    stage = root / "tmp" / "hfl-install" / config.stem
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    inside = f"/tmp/hfl-install/{config.stem}"
    args = [f"{CHECKOUT_IN_ROOT}/device_agents/install.sh", "--from", CHECKOUT_IN_ROOT]
    for path in data:
        shutil.copy2(path, stage / path.name)
        args += ["--data", f"{inside}/{path.name}"]
    shutil.copy2(config, stage / config.name)
    args.append(f"{inside}/{config.name}")
    for path in secrets:
        shutil.copy2(path, stage / path.name)
        args.append(f"{inside}/{path.name}")
    # pip inside finds the package index the way pip here does (emulated_rootfs.sh copied the
    # configuration files and the CA bundle to the same places).
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    env.update(extra_env or {})
    return subprocess.run(
        chroot_argv(root, ["bash", *args], env=env),
        check=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def unit_directives(text: str) -> dict[str, list[str]]:
    """The ``Key=value`` lines of a unit file, by key (in order; comments and sections left
    out, continuation lines joined)."""
    directives: dict[str, list[str]] = {}
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def _expand(value: str, instance: str) -> str:
    """systemd's specifiers used by the unit: %i, %I (the instance), %S (/var/lib), %%."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "%" and i + 1 < len(value):
            code = value[i + 1]
            known = {"i": instance, "I": instance, "S": "/var/lib", "%": "%"}
            if code not in known:
                raise ValueError(f"unit specifier %{code} is not handled here")
            out.append(known[code])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class ServiceCommand:
    """What systemd would run for one instance of the unit: command, user, directory, and
    the unit's ``Environment=`` variables."""

    argv: list[str]
    user: str
    cwd: str
    env: dict[str, str]


def exec_start(instance: str, unit: str | None = None) -> ServiceCommand:
    """The unit's ``ExecStart=`` command for ``instance`` (``%i`` expanded), with its
    ``User=``, ``WorkingDirectory=`` and ``Environment=``; ``unit`` is the unit file's text
    (default: the checkout's)."""
    directives = unit_directives(unit if unit is not None else UNIT_FILE.read_text())
    (command,) = directives["ExecStart"]
    env: dict[str, str] = {}
    for assignment in directives.get("Environment", []):
        for word in shlex.split(_expand(assignment, instance)):
            key, _, value = word.partition("=")
            env[key] = value
    return ServiceCommand(
        argv=shlex.split(_expand(command.lstrip("-@:+!"), instance)),
        user=directives.get("User", ["root"])[-1],
        cwd=_expand(directives.get("WorkingDirectory", ["/"])[-1], instance),
        env=env,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.emulated_device [ARCH]``: build the rootfs, print its path."""
    args = argv if argv is not None else sys.argv[1:]
    print(build_rootfs(args[0] if args else "arm64"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
