"""The first code a sandboxed check runs (as `python -I sandbox_boot.py`, stdin = one JSON line of settings).

It confines itself, then runs `main.py` (response code + tests) from its work directory. As root it enters new
mount and network namespaces (no interfaces: no network at all), puts its work directory over /tmp, empties the
other world-writable directories and root's home, and drops to a throw-away uid with no groups and no way back
(no_new_privs): that uid can write nowhere but its work directory and cannot read the parent's /proc entries.
Without root it keeps only what an unprivileged process can do (limits, socket block, scrubbed environment).
Stdlib only: it runs before any confinement is known to work, under any interpreter.
"""

import ctypes
import json
import os
import resource
import runpy
import socket
import sys
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_NO_NEW_PRIVS = 38
SETUP_FAILED = 3
WORLD_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def confine_as_root(libc, settings):
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount private")
    # fds taken inside the new namespace (a bind source must be a mount of the caller's namespace)
    work = os.open(".", os.O_PATH)  # the work directory may live under /tmp, which is about to be covered
    # The interpreter may live under a directory others cannot enter (pyenv in /root): cover that directory with
    # an empty tmpfs (which also hides its other files) and bind the interpreter's own directories back.
    keep = [p for p in dict.fromkeys(settings["keep_visible"]) if os.path.isdir(p)]
    fds = {p: os.open(p, os.O_PATH) for p in keep}
    hidden = []
    for p in keep:
        parts = p.rstrip("/").split("/")
        for i in range(2, len(parts) + 1):
            anc = "/".join(parts[:i])
            if not os.stat(anc).st_mode & 0o001:
                if not any(anc == h or anc.startswith(h + "/") for h in hidden):
                    hidden.append(anc)
                break
    for h in hidden:
        _check(libc.mount(b"tmpfs", h.encode(), b"tmpfs", 0, b"mode=755,size=1m"), f"hide {h}")
    for p, fd in fds.items():
        if any(p.startswith(h + "/") for h in hidden):
            os.makedirs(p, exist_ok=True)
            _check(libc.mount(f"/proc/self/fd/{fd}".encode(), p.encode(), None, MS_BIND | MS_REC, None), f"bind {p}")
    _check(libc.mount(f"/proc/self/fd/{work}".encode(), b"/tmp", None, MS_BIND, None), "bind /tmp")
    for d in WORLD_WRITABLE:
        if os.path.isdir(d):
            _check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"mode=755,size=1m"), f"cover {d}")
    os.chdir("/tmp")
    uid = settings["uid"]
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def set_limits(settings):
    cpu = settings["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = settings["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_NPROC, (settings["max_processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (settings["file_mb"] * 1024 * 1024,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def block_sockets():
    """Belt and braces over the empty network namespace (and the only network guard without root)."""

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the fusechat sandbox")

    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, refuse)


def main():
    settings = json.loads(sys.stdin.readline())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if os.geteuid() == 0 and settings.get("uid") is not None:
            confine_as_root(libc, settings)
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        set_limits(settings)
        block_sockets()
    except Exception as e:  # noqa: BLE001 - any setup failure is the sandbox's fault, reported as such
        sys.stderr.write(f"fusechat-sandbox: setup failed: {e}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED)
    done = settings["nonce"]
    del settings
    sys.argv = ["main.py"]
    try:
        runpy.run_path("main.py", run_name="__main__")
    except BaseException:  # noqa: BLE001 - SystemExit too: exiting before the tests ran is not a pass
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os.write(1, f"\n{done}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    main()
