"""Isolation steps of the sandboxed child (loaded by sandbox_harness; stdlib only).

Namespace mode (after unshare(NEWNS|NEWNET|NEWPID|NEWIPC) in the supervisor, plus NEWUSER when not
root, where only the caller's own uid is mapped): a private tmpfs becomes the root, with read-only
binds of /usr and the Python installation, bare device nodes, a /proc of the new pid namespace and
a size-limited /tmp as cwd and HOME. Nothing of the host file system is visible or writable (the
data set, the repository, other sandboxes), and all of it vanishes with the namespace. The network
namespace has only a loopback that is down. As root the program then runs as a fresh uid; in a user
namespace it keeps the caller's uid and loses every capability (the kernel refuses a new user
namespace inside a chroot, so it cannot get them back).
Plain mode (by request only): cwd is the scratch dir; still rlimits and, as root, a separate uid.
Either way the privilege drop comes after the set-up and before any solution code.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import signal
import stat

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
DEVICES = ("null", "zero", "full", "random", "urandom")


def _mount(libc, src: str | None, tgt: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    if libc.mount(enc(src), enc(tgt), enc(fstype), flags, enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src} on {tgt}: {os.strerror(e)}")


_KEEP = ((os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
         (os.ST_RELATIME, MS_RELATIME))


def _bind_ro(libc, root: str, path: str) -> None:
    target = root + path
    os.makedirs(target, mode=0o755, exist_ok=True)
    _mount(libc, path, target, None, MS_BIND | MS_REC)
    # in a user namespace the source mount's noexec and atime flags are locked: a remount that
    # dropped them would fail with EPERM, so they are carried over
    kept = os.statvfs(path).f_flag
    extra = sum(ms for st, ms in _KEEP if kept & st)
    _mount(libc, None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | extra)


def _covered(path: str, bound: list[str]) -> bool:
    return any(path == b or path.startswith(b.rstrip("/") + "/") for b in bound)


def enter_namespace_root(req: dict, libc) -> str:
    root, uid = req["scratch"], int(req["uid"])
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    _mount(libc, "sandbox", root, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(req['scratch_mb'])}m,nr_inodes=4096,mode=755")
    # the sandbox's own /tmp comes first: a Python installation under /tmp (a venv in /tmp/x) is then
    # bound read-only inside it instead of colliding with it
    os.mkdir(root + "/tmp", 0o700)
    if os.geteuid() == 0:
        os.chown(root + "/tmp", uid, uid)
    bound = ["/usr"]
    _bind_ro(libc, root, "/usr")
    for name in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(name):
            os.symlink(os.readlink(name), root + name)
        elif os.path.isdir(name):
            _bind_ro(libc, root, name)
            bound.append(name)
    for path in req["ro_paths"]:
        path = os.path.realpath(path)
        if path.rstrip("/") in ("", "/tmp", "/proc", "/dev"):
            raise OSError(f"the Python installation {path} would cover the sandbox's own {path or '/'}: "
                          "install Python (or the virtual environment) in a directory of its own")
        if os.path.isdir(path) and not _covered(path, bound):
            _bind_ro(libc, root, path)
            bound.append(path)
    os.mkdir(root + "/dev", 0o755)
    for dev in DEVICES:
        open(root + "/dev/" + dev, "w").close()
        _mount(libc, "/dev/" + dev, root + "/dev/" + dev, None, MS_BIND)
    os.symlink("/proc/self/fd", root + "/dev/fd")
    for k, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{k}", root + "/dev/" + name)
    os.mkdir(root + "/proc", 0o555)
    os.chroot(root)
    os.chdir("/tmp")
    _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return "namespaces (net, mount, pid, ipc), private tmpfs root"


def _world_readable(path: str) -> bool:
    """Can an unrelated uid traverse to and read ``path``?"""
    parts = os.path.realpath(path).split("/")
    for k in range(2, len(parts) + 1):
        try:
            mode = os.stat("/".join(parts[:k]) or "/").st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH or (k == len(parts) and not mode & stat.S_IROTH):
            return False
    return True


def plain_setup(req: dict) -> str:
    scratch = req["scratch"]
    if os.geteuid() == 0:
        os.chown(scratch, int(req["uid"]), int(req["uid"]))
    os.chdir(scratch)
    note = "NO namespaces (no network/file-system isolation): scratch cwd"
    if os.geteuid() == 0 and not all(_world_readable(p) for p in req["ro_paths"][:1]):
        note += "; python prefix unreadable by the sandbox uid, imports beyond the prelude may fail"
    return note


def _set(res: int, soft: int, hard: int | None = None) -> None:
    hard = soft if hard is None else hard
    cur_soft, cur_hard = resource.getrlimit(res)
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(res, (soft, hard))


def apply_limits(req: dict) -> None:
    cpu = int(math.ceil(float(req["timeout_s"]))) + 1
    _set(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU, then SIGKILL a second later
    _set(resource.RLIMIT_AS, int(req["memory_mb"]) << 20)
    _set(resource.RLIMIT_FSIZE, int(req["fsize"]))
    _set(resource.RLIMIT_NOFILE, 256)
    _set(resource.RLIMIT_CORE, 0)
    # RLIMIT_NPROC counts every task of the real uid: as root it is the fresh sandbox uid we switch
    # to below; otherwise it is the caller's own uid, so allow what already runs plus the budget
    base = 0 if os.geteuid() == 0 else _tasks_of_uid(os.getuid())
    _set(resource.RLIMIT_NPROC, base + int(req["nproc"]))


def _tasks_of_uid(uid: int) -> int:
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return total


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities(libc) -> None:
    """Empty effective, permitted and inheritable sets (the user namespace's set-up capabilities).
    With a non-zero uid and no_new_privs, no exec can bring them back."""
    if libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), (_CapData * 2)()) != 0:  # _LINUX_CAPABILITY_VERSION_3
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


def drop_privileges(req: dict, libc, supervisor: int, ns: bool) -> str:
    if os.geteuid() == 0:
        uid = int(req["uid"])
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        note = f"; uid {uid}; rlimits (cpu, address space, processes, file size, files)"
    elif ns:
        drop_capabilities(libc)
        note = (f"; user namespace, uid {os.getuid()} (this user's), no capabilities; rlimits (cpu, address space, "
                "processes, file size, files)")
    else:
        note = (f"; uid {os.getuid()} unchanged (not root: the program can signal this user's processes; "
                "process limit = this user's tasks + budget); rlimits")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a uid change clears it: set it after
    if not ns and os.getppid() != supervisor:
        os._exit(1)
    return note
