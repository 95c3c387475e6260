"""The first code a sandboxed check runs (as `python -I sandbox_boot.py`, stdin = one JSON line of settings).

It confines itself, checks the program statically, then runs `main.py` (program + tests) from its work directory.
How it confines depends on `mode` (the parent picks the strongest that works on the machine, see `sandbox.py`):

- `root` (root with CAP_SYS_ADMIN): new mount and network namespaces (no interfaces: no network at all), the
  work directory over /tmp, the other world-writable directories and root's home emptied, every other mount
  read-only, then a throw-away uid with no groups: that uid can write nowhere but its work directory and cannot
  read or signal the parent.
- `userns` (any user, where unprivileged user namespaces work): new user, mount, network, PID and IPC
  namespaces. The view of the filesystem is read-only except the work directory (over /tmp) and empty private
  tmpfs on /dev/shm, /var/tmp, /run; /proc shows only the sandbox's own processes. The code runs as a child of a
  small init (PID 1 of the new namespace, which the code cannot signal) with every capability dropped; when the
  code ends, or the parent stops the check, the init exits and the kernel kills whatever the code left behind.
  Root without CAP_SYS_ADMIN becomes a throw-away uid first.
- `none` (only when the user accepted it, `score.code.allow_no_isolation`): resource limits, a scrubbed
  environment and no Python-level sockets; as root, a throw-away uid.

In every mode: limits on CPU time, address space, processes and file size; no_new_privs. The static pass
(`static_check.py`, when `static` is set) runs after confinement, on `solution.py`.

Exit codes: 0 after the nonce (ran to the end), 1 an exception, 3 the sandbox could not be set up, 4/5 the static
pass failed (syntax error / undefined name), 128+N the code died of signal N (relayed by the init).
Stdlib only (pyflakes is loaded by path when asked for): it runs before any confinement is known to work.
"""

import ctypes
import errno
import json
import os
import re
import resource
import select
import signal
import socket
import sys
import traceback
import types

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MOUNT_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
SETUP_FAILED = 3
STATIC_FAILED = {"syntax_error": 4, "undefined_name": 5}
WORLD_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
PRIVATE_TMPFS = ("/dev/shm", "/var/tmp", "/run", "/dev/mqueue")  # userns mode: empty, private, discarded


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(libc, flags, settings):
    if settings.get("deny_namespaces"):  # FUSECHAT_SANDBOX_DENY_NAMESPACES: behave like a kernel that refuses
        raise OSError(errno.EPERM, "unshare: Operation not permitted (namespaces denied by the environment)")
    _check(libc.unshare(flags), "unshare")


def _become(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


# --------------------------------------------------------------------------------------------- root
def confine_as_root(libc, settings):
    _unshare(libc, CLONE_NEWNS | CLONE_NEWNET, settings)
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
    _remount_read_only(libc)  # other directories anyone may write to (a shared scratch space) included
    os.chdir("/tmp")
    _become(settings["uid"])


# --------------------------------------------------------------------------------------------- userns
def confine_in_user_namespace(libc, settings):
    """Returns only in the process that runs the code; the two above it wait for it and relay its end."""
    if os.geteuid() == 0:
        _become(settings["uid"])  # root without CAP_SYS_ADMIN: a throw-away user makes the namespace
        _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")  # reset by setuid; /proc/self is ours again
    uid, gid = os.getuid(), os.getgid()
    _unshare(libc, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC, settings)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)
    # The parent stops a check with SIGTERM to this process, which the code cannot reach (other PID namespace):
    # kill the init, whose exit kills everything in the namespace, then report.
    init = None
    signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGKILL) if init else os._exit(128 + 15))
    alive_r, alive_w = os.pipe()  # EOF on alive_r: this process is gone
    init = os.fork()
    if init:
        os.close(alive_r)
        _relay(init)
    # PID 1 of the new namespace: the code (its child) cannot signal it; it dies with the process above.
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    os.close(alive_w)
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(SETUP_FAILED)  # the process above died before the death signal was armed
    os.close(alive_r)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "not dumpable")
    _read_only_view(libc)
    code = os.fork()
    if code:
        _relay(code)
    _drop_capabilities(libc)
    os.chdir("/tmp")


def _relay(pid):
    """Wait for `pid`, then exit as it did (a signal N as 128+N)."""
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    except BaseException:  # noqa: BLE001 - never fall through into running the code in a relay
        code = SETUP_FAILED
    os._exit(code)


def _mounts():
    """(mount point, per-mount flags) of every mount in this namespace, parents first; autofs trigger points
    left out (touching one would mount it; what it mounts is listed itself)."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[fields.index("-") + 1] == "autofs":
                continue
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040: a space
            flags = 0
            for opt in fields[5].split(","):
                flags |= MOUNT_FLAGS.get(opt, 0)
            found.append((point, flags))
    return sorted(found, key=lambda m: m[0].count("/"))


def _remount_read_only(libc):
    """Every mount of this (private) namespace read-only, but the work directory on /tmp (and /proc)."""
    for point, flags in _mounts():
        if point in ("/tmp", "/proc") or point.startswith("/proc/"):
            continue
        keep = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME | MS_STRICTATIME)
        rc = libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None)
        if rc != 0 and ctypes.get_errno() not in (errno.EACCES, errno.ENOENT):  # unreachable: unwritable too
            _check(rc, f"read-only {point}")


def _read_only_view(libc):
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount private")
    work = os.open(".", os.O_PATH)
    _check(libc.mount(f"/proc/self/fd/{work}".encode(), b"/tmp", None, MS_BIND, None), "bind /tmp")
    os.close(work)
    _remount_read_only(libc)
    for d in PRIVATE_TMPFS:
        if os.path.isdir(d) and not os.path.islink(d):
            _check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=16m"), f"cover {d}")
    # Only this namespace's processes in /proc; where the kernel refuses a new proc (a container that masks
    # parts of /proc), an empty /proc.
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        _check(libc.mount(b"tmpfs", b"/proc", b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=1m"), "cover /proc")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities(libc):
    """The code gets no capability in its namespace (it could otherwise unmount the read-only view)."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "drop capabilities")


# --------------------------------------------------------------------------------------------- every mode
def set_limits(settings):
    cpu = settings["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = settings["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_NPROC, (settings["max_processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (settings["file_mb"] * 1024 * 1024,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def block_sockets():
    """Belt and braces over the empty network namespace (and the only network guard in `none` mode)."""

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the fusechat sandbox")

    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, refuse)


def load_static_check(settings):
    """The static pass, loaded before confinement (its file and pyflakes may be out of sight afterwards)."""
    if not settings.get("static"):
        return None
    import importlib.util

    sys.path.insert(0, settings["pyflakes_dir"])
    try:
        spec = importlib.util.spec_from_file_location("fusechat_static_check", settings["static"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(settings["pyflakes_dir"])
    return module.static_verdict


def main():
    settings = json.loads(sys.stdin.readline())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        static_verdict = load_static_check(settings)
        libc = ctypes.CDLL(None, use_errno=True)
        mode = settings["mode"]
        if mode == "root":
            confine_as_root(libc, settings)
        elif mode == "userns":
            confine_in_user_namespace(libc, settings)
        elif os.geteuid() == 0:
            _become(settings["uid"])
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        set_limits(settings)
        block_sockets()
    except Exception as e:  # noqa: BLE001 - any setup failure is the sandbox's fault, reported as such
        sys.stderr.write(f"fusechat-sandbox: setup failed: {e}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED)
    if static_verdict is not None:
        with open("solution.py", encoding="utf-8") as fh:
            try:
                verdict = static_verdict(fh.read())
            except Exception as e:  # noqa: BLE001 - a checker bug must not fail the response: skip the pass
                sys.stderr.write(f"fusechat-sandbox: static check skipped: {e!r}\n")
                verdict = None
        if verdict is not None:
            sys.stderr.write(f"fusechat-sandbox: static: {verdict}\n")
            sys.stderr.flush()
            os._exit(STATIC_FAILED[verdict])
    done = settings["nonce"]
    del settings
    try:
        run_files()
    except BaseException:  # noqa: BLE001 - SystemExit too: exiting before the tests ran is not a pass
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os.write(1, f"\n{done}\n".encode())
    os._exit(0)


def run_files():
    """`solution.py` then `tests.py` in one module: the solution's `if __name__ == "__main__":` demo does not
    run, tests under such a guard do. A bare program is `main.py`, run as `__main__`."""
    parts = [("solution.py", "__solution__"), ("tests.py", "__main__")] if os.path.exists("tests.py") else []
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = sys.modules["__solution__"] = module
    sys.argv = ["main.py"]
    for filename, name in parts or [("main.py", "__main__")]:
        with open(filename, encoding="utf-8") as fh:
            code = compile(fh.read(), filename, "exec")
        module.__dict__.update(__name__=name, __file__=filename)
        exec(code, module.__dict__)


if __name__ == "__main__":
    main()
