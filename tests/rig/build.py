"""Build and cache a bootable test guest: Debian kernel + a busybox initramfs.

Why: the daemon must be proven against a real guest kernel (virtiofs.ko, 9p), not only
against our own front-end. The guest is tiny (busybox, fio, a command agent) so it boots in
a few seconds under TCG, and it is rebuilt automatically whenever one of its inputs changes.

Layout under the cache dir (``<repo>/.cache/guest``, or ``$VFSD_GUEST_CACHE``)::

    kernel/<pkg>_<version>.deb      the downloaded Debian kernel package (kept: re-extraction)
    kernel/<pkg>_<version>/         vmlinuz, vmlinux (PVH), config, modules/*.ko (only ours)
    progs/<sha>                     statically linked helpers from tests/guest/progs/*.c
    builds/<key>/                   vmlinuz, initrd.img, manifest.json  (key = input hash)

CLI: ``python -m tests.rig.build [--force] [--print]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

RIG_DIR = Path(__file__).resolve().parent
REPO = RIG_DIR.parents[1]
PROGS_DIR = REPO / "tests" / "guest" / "progs"
AGENT_SRC = RIG_DIR / "agent.sh"

KERNEL_META_PKG = "linux-image-amd64"
#: Modules the guest needs (their dependencies are added from the .ko modinfo).
#: Everything virtio in Debian's 6.1 config is =m: virtio, virtio_ring, virtio_pci(+_lib).
WANTED_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_console",
    "fuse",
    "virtiofs",
    "9pnet_virtio",
    "9p",
    "overlay",  # overlayfs on a virtiofs upper directory (device-node whiteouts)
)
#: Host programs copied into the guest with their shared libraries (required, optional).
HOST_PROGRAMS: tuple[tuple[str, bool], ...] = (
    ("/usr/bin/fio", True),
    ("/usr/bin/getfattr", False),
    ("/usr/bin/setfattr", False),
    ("/usr/bin/getfacl", False),
    ("/usr/bin/setfacl", False),
)
BUSYBOX = "/bin/busybox"
GUEST_MODULE_DIR = "/lib/modules/vfsd"
#: Bumped by hand when the image layout changes in a way the source hash would not catch.
LAYOUT_VERSION = "2"


class BuildError(RuntimeError):
    """The guest image could not be built (missing host package, download failure, ...)."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: what Guest() boots.

    ``kernel`` is the uncompressed PVH-bootable vmlinux when the kernel has a PVH entry (QEMU
    jumps straight into it: ~2 s faster under TCG than decompressing the bzImage), else the
    bzImage (``bzimage``). ``$VFSD_GUEST_PVH=0`` forces the bzImage.
    """

    kernel: Path
    initrd: Path
    bzimage: Path
    kernel_version: str  # uname -r inside the guest, e.g. 6.1.0-56-amd64
    modules: tuple[str, ...]  # insmod order
    key: str
    path: Path


def cache_dir() -> Path:
    """Root of the guest cache (``$VFSD_GUEST_CACHE`` or ``<repo>/.cache/guest``)."""
    env = os.environ.get("VFSD_GUEST_CACHE")
    return Path(env).resolve() if env else REPO / ".cache" / "guest"


def _log(msg: str) -> None:
    print(f"[rig.build] {msg}", file=sys.stderr, flush=True)


def _run(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, capture_output=True, text=True, **kw)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize builds between processes (pytest-xdist, parallel CI jobs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# kernel


@dataclass(frozen=True)
class KernelKit:
    pkg: str
    version: str
    release: str  # uname -r
    dir: Path
    vmlinuz: Path
    vmlinux: Path | None  # PVH-bootable ELF, if the kernel has a PVH entry point
    modules: tuple[str, ...]  # load order (dependencies first)


def _apt_candidate(pkg: str) -> str | None:
    out = _run(["apt-cache", "policy", pkg]).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m.group(1) == "(none)":
        return None
    return m.group(1)


def resolve_kernel_package() -> tuple[str, str]:
    """Resolve ``linux-image-amd64`` to the versioned image package it depends on.

    ``$VFSD_GUEST_KERNEL_PKG`` pins a package name (e.g. ``linux-image-6.1.0-56-amd64``).
    """
    pinned = os.environ.get("VFSD_GUEST_KERNEL_PKG")
    if pinned:
        ver = _apt_candidate(pinned)
        if ver is None:
            cached = _cached_kits(pinned)
            if cached:
                return cached[-1]
            raise BuildError(f"VFSD_GUEST_KERNEL_PKG={pinned}: no apt candidate")
        return pinned, ver
    meta = _apt_candidate(KERNEL_META_PKG)
    if meta is None and os.geteuid() == 0:
        _log("apt lists have no linux-image-amd64; running apt-get update")
        _run(["apt-get", "update", "-qq"])
        meta = _apt_candidate(KERNEL_META_PKG)
    if meta is None:
        cached = _cached_kits(None)
        if cached:
            return cached[-1]
        raise BuildError("cannot resolve linux-image-amd64 (no apt candidate, nothing cached)")
    show = _run(["apt-cache", "show", f"{KERNEL_META_PKG}={meta}"]).stdout
    m = re.search(r"^Depends:\s*(linux-image-[^\s,(]+)\s*(?:\(=\s*([^)\s]+)\))?", show, re.M)
    if not m:
        raise BuildError(f"cannot parse Depends of {KERNEL_META_PKG}={meta}")
    pkg = m.group(1)
    ver = m.group(2) or _apt_candidate(pkg)
    if not ver:
        raise BuildError(f"no version for {pkg}")
    return pkg, ver


def _cached_kits(pkg: str | None) -> list[tuple[str, str]]:
    kdir = cache_dir() / "kernel"
    found = []
    for meta in sorted(kdir.glob("*/kit.json"), key=lambda p: p.stat().st_mtime):
        info = json.loads(meta.read_text())
        if pkg is None or info["pkg"] == pkg:
            found.append((info["pkg"], info["version"]))
    return found


def _modinfo(ko: bytes) -> dict[str, str]:
    """Read the .modinfo section of an ELF64 LE module (no modinfo/depmod on the host)."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise BuildError("not an ELF64 little-endian module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def sh(i: int) -> tuple[int, int, int]:
        name, _typ, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + i * shentsize
        )
        return name, off, size

    _, stroff, _ = sh(shstrndx)
    for i in range(shnum):
        name, off, size = sh(i)
        end = ko.index(b"\0", stroff + name)
        if ko[stroff + name : end] == b".modinfo":
            info: dict[str, str] = {}
            for item in ko[off : off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, v)
            return info
    return {}


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _download_kernel_deb(pkg: str, version: str, dest: Path) -> Path:
    deb = dest / f"{pkg}_{version}.deb"
    if deb.exists():
        return deb
    _log(f"downloading {pkg}={version} (apt-get download, ~70 MB)")
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl-") as tmp:
        # _apt cannot enter this dir: apt warns and downloads unsandboxed as root. Fine.
        r = _run(["apt-get", "download", f"{pkg}={version}"], cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise BuildError(f"apt-get download {pkg}={version} failed:\n{r.stdout}{r.stderr}")
        os.replace(debs[0], deb)
    return deb


def fetch_kernel(pkg: str, version: str, wanted: Iterable[str] = WANTED_MODULES) -> KernelKit:
    """Download (once) and extract the kernel plus the module closure of ``wanted``."""
    wanted = tuple(wanted)
    kroot = cache_dir() / "kernel"
    kroot.mkdir(parents=True, exist_ok=True)
    kit_dir = kroot / f"{pkg}_{version}"
    meta = kit_dir / "kit.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        if info.get("wanted") == list(wanted) and info.get("layout") == LAYOUT_VERSION:
            vmlinux = kit_dir / "vmlinux" if info.get("pvh") else None
            return KernelKit(
                pkg,
                version,
                info["release"],
                kit_dir,
                kit_dir / "vmlinuz",
                vmlinux,
                tuple(info["order"]),
            )
    deb = _download_kernel_deb(pkg, version, kroot)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=kroot, prefix=".x-") as tmp:
        x = Path(tmp)
        r = _run(["dpkg-deb", "-x", str(deb), str(x)])
        if r.returncode != 0:
            raise BuildError(f"dpkg-deb -x {deb} failed: {r.stderr}")
        vmlinuz = sorted((x / "boot").glob("vmlinuz-*"))
        config = sorted((x / "boot").glob("config-*"))
        moddirs = sorted((x / "lib" / "modules").iterdir())
        if not vmlinuz or not moddirs:
            raise BuildError(f"{deb}: no vmlinuz or modules")
        release = moddirs[0].name
        builtin = set()
        bfile = moddirs[0] / "modules.builtin"
        if bfile.exists():
            builtin = {
                _norm(Path(line).name.removesuffix(".ko")) for line in bfile.read_text().split()
            }
        available = {_norm(p.name.removesuffix(".ko")): p for p in moddirs[0].rglob("*.ko")}
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            name = _norm(name)
            if name in order or name in builtin:
                return
            if name in visiting:
                raise BuildError(f"module dependency cycle at {name}")
            if name not in available:
                raise BuildError(f"module {name} is neither built in nor shipped in {pkg}")
            visiting.add(name)
            deps = _modinfo(available[name].read_bytes()).get("depends", "")
            for dep in filter(None, deps.split(",")):
                visit(dep)
            visiting.discard(name)
            order.append(name)

        for name in wanted:
            visit(name)
        new = kroot / f".new-{os.getpid()}"
        shutil.rmtree(new, ignore_errors=True)
        (new / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz[0], new / "vmlinuz")
        vmlinux = _pvh_vmlinux(vmlinuz[0].read_bytes())
        if vmlinux:
            (new / "vmlinux").write_bytes(vmlinux)
        if config:
            shutil.copy2(config[0], new / "config")
        for name in order:
            shutil.copy2(available[name], new / "modules" / f"{name}.ko")
        info = {
            "pkg": pkg,
            "version": version,
            "release": release,
            "wanted": list(wanted),
            "order": order,
            "pvh": bool(vmlinux),
            "layout": LAYOUT_VERSION,
            "builtin_wanted": [w for w in wanted if _norm(w) in builtin],
        }
        (new / "kit.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(kit_dir, ignore_errors=True)
        os.replace(new, kit_dir)
    _log(
        f"kernel {release}: modules {' '.join(order)}, pvh={bool(vmlinux)}"
        f" ({time.monotonic() - t0:.1f} s)"
    )
    return KernelKit(
        pkg,
        version,
        release,
        kit_dir,
        kit_dir / "vmlinuz",
        kit_dir / "vmlinux" if vmlinux else None,
        tuple(order),
    )


def _elf_has_pvh_note(elf: bytes) -> bool:
    """True if an ELF64 has a Xen PHYS32_ENTRY note (what QEMU needs to boot it via PVH)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _pvh_vmlinux(bzimage: bytes) -> bytes | None:
    """Decompress the vmlinux inside a bzImage (xz or gzip payload) if it is PVH-bootable."""
    for magic, make in (
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
        (b"\x1f\x8b\x08\x00", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    ):
        start = bzimage.find(magic)
        while start >= 0:
            with contextlib.suppress(lzma.LZMAError, zlib.error, EOFError):
                elf = make().decompress(bzimage[start:])
                if _elf_has_pvh_note(elf):
                    return elf
            start = bzimage.find(magic, start + 1)
    return None


# --------------------------------------------------------------------------------------------
# host programs, helpers


def _ldd(path: str) -> list[str]:
    """Shared objects ``path`` needs, including the dynamic loader (empty if static)."""
    r = _run(["ldd", path])
    libs = []
    for line in r.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+)", line) or re.match(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _guest_path(host: str) -> str:
    """Map a host path to the guest's merged-/usr layout (/lib -> /usr/lib, ...)."""
    for top in ("/bin/", "/sbin/", "/lib/", "/lib64/"):
        if host.startswith(top):
            return "/usr" + host
    return host


def host_files() -> dict[str, str]:
    """guest path -> host path for the host programs and all their libraries."""
    files: dict[str, str] = {}
    for prog, required in HOST_PROGRAMS:
        if not os.path.exists(prog):
            if required:
                raise BuildError(f"{prog} is missing on the host: run tests/rig/deps.sh")
            continue
        files[_guest_path(prog)] = prog
        for lib in _ldd(prog):
            files[_guest_path(lib)] = lib
    if not os.path.exists(BUSYBOX):
        raise BuildError(f"{BUSYBOX} is missing: run tests/rig/deps.sh (busybox-static)")
    return files


_CFLAGS_RE = re.compile(r"rig-cflags:\s*(.*?)\s*(?:\*/)?$")


def _prog_cflags(src: str) -> list[str]:
    for line in src.splitlines()[:10]:
        m = _CFLAGS_RE.search(line)
        if m:
            return m.group(1).split()
    return []


def compile_progs(progs_dir: Path | None = None) -> dict[str, Path]:
    """Compile tests/guest/progs/*.c statically; name -> binary (cached by source hash)."""
    progs_dir = PROGS_DIR if progs_dir is None else progs_dir
    out: dict[str, Path] = {}
    sources = sorted(progs_dir.glob("*.c")) if progs_dir.is_dir() else []
    if not sources:
        return out
    pdir = cache_dir() / "progs"
    pdir.mkdir(parents=True, exist_ok=True)
    for src in sources:
        text = src.read_text()
        cflags = _prog_cflags(text)
        digest = hashlib.sha256((text + "\0" + " ".join(cflags)).encode()).hexdigest()[:20]
        binary = pdir / f"{src.stem}-{digest}"
        if not binary.exists():
            tmp = binary.with_suffix(".tmp")
            cmd = ["gcc", "-static", "-O2", "-Wall", "-o", str(tmp), str(src), *cflags]
            r = _run(cmd)
            if r.returncode != 0:
                raise BuildError(f"compiling {src} failed:\n{' '.join(cmd)}\n{r.stderr}")
            os.replace(tmp, binary)
            for old in pdir.glob(f"{src.stem}-*"):
                if old != binary and len(old.name) == len(binary.name):
                    old.unlink(missing_ok=True)
        out[src.stem] = binary
    return out


# --------------------------------------------------------------------------------------------
# initramfs


class Cpio:
    """Minimal cpio "newc" writer (what the kernel's initramfs unpacker reads)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        name = name.lstrip("/")
        self.seen.add(name)
        nb = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        self.buf.write(hdr + nb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in self.seen:
                self._entry(sub, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


INIT_TEMPLATE = r"""#!/bin/sh
# /init of the vfsd test guest (generated by tests/rig/build.py).
export PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /mnt /root
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname vfsd-guest
ip link set lo up 2>/dev/null
echo "vfsd-guest: kernel $(uname -r), loading modules"
while read -r m; do
    insmod @MODDIR@/$m.ko || echo "vfsd-guest: insmod $m FAILED"
done < /etc/vfsd/modules
port=
i=0
while [ $i -lt 200 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] && [ "$(cat "$p/name")" = vfsd.agent ] && port=/dev/${p##*/}
    done
    [ -n "$port" ] && [ -c "$port" ] && break
    sleep 0.05
    i=$((i + 1))
done
if [ -z "$port" ]; then
    echo "vfsd-guest: no virtio-serial port named vfsd.agent; powering off"
    poweroff -f
fi
echo "vfsd-guest: agent on $port (uptime $(cut -d' ' -f1 /proc/uptime) s)"
while :; do
    sh /etc/vfsd/agent.sh "$port"
    echo "vfsd-guest: agent exited rc=$?, restarting"
    sleep 1
done
"""


def _busybox_applets() -> list[str]:
    r = _run([BUSYBOX, "--list-full"])
    if r.returncode != 0:
        raise BuildError(f"{BUSYBOX} --list-full failed: {r.stderr}")
    return [_guest_path("/" + line.strip()) for line in r.stdout.split() if line.strip()]


def build_initrd(kit: KernelKit, progs: dict[str, Path], files: dict[str, str]) -> bytes:
    """Assemble the initramfs.

    Uncompressed newc: QEMU copies it into guest RAM at host speed, while decompressing ~30 MB
    of gzip under TCG would cost seconds. (fio's shared libraries make up most of it.)
    """
    c = Cpio()
    for top in ("bin", "sbin", "lib", "lib64"):
        c.dir(f"usr/{top}")
        c.symlink(top, f"usr/{top}")
    for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "etc/vfsd", "usr/local/bin"):
        c.dir(d, 0o1777 if d == "tmp" else 0o755)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("usr/bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    real = set(files)
    for applet in _busybox_applets():
        if applet != "/usr/bin/busybox" and applet not in real:
            c.symlink(applet, "/usr/bin/busybox")
    for gpath, hpath in sorted(files.items()):
        st = os.stat(hpath)
        c.file(gpath, Path(hpath).read_bytes(), stat.S_IMODE(st.st_mode))
    for name, binary in sorted(progs.items()):
        c.file(f"usr/local/bin/{name}", binary.read_bytes(), 0o755)
    for name in kit.modules:
        c.file(f"{GUEST_MODULE_DIR}/{name}.ko", (kit.dir / "modules" / f"{name}.ko").read_bytes())
    c.file("etc/vfsd/modules", "".join(f"{m}\n" for m in kit.modules).encode())
    c.file("etc/vfsd/agent.sh", AGENT_SRC.read_bytes(), 0o755)
    c.file("init", INIT_TEMPLATE.replace("@MODDIR@", GUEST_MODULE_DIR).encode(), 0o755)
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    c.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    c.file("etc/hostname", b"vfsd-guest\n")
    lib_dirs = sorted({os.path.dirname(g) for g in files if "/lib" in g})
    c.file("etc/ld.so.conf", "".join(f"{d}\n" for d in lib_dirs).encode())
    return c.finish()


# --------------------------------------------------------------------------------------------
# top level


def _input_key(kit_id: str, progs: dict[str, Path], files: dict[str, str]) -> str:
    h = hashlib.sha256()

    def add(*parts: object) -> None:
        for p in parts:
            h.update(str(p).encode())
            h.update(b"\0")

    add("layout", LAYOUT_VERSION, kit_id, ",".join(WANTED_MODULES))
    add(Path(__file__).read_bytes(), AGENT_SRC.read_bytes())
    for name, binary in sorted(progs.items()):
        add(name, binary.name)
    for gpath, hpath in sorted({**files, "/usr/bin/busybox": BUSYBOX}.items()):
        st = os.stat(hpath)
        add(gpath, hpath, st.st_size, st.st_mtime_ns)
    return h.hexdigest()[:16]


_memo: dict[str, GuestImage] = {}


def build(force: bool = False, keep: int = 3) -> GuestImage:
    """Return a guest image for the current inputs, building it only if they changed.

    Cheap when cached (an apt-cache query, ldd, a few stats). ``keep`` older builds are kept.
    """
    if not force and "img" in _memo and _memo["img"].initrd.exists():
        return _memo["img"]
    root = cache_dir()
    with _locked(root / ".lock"):
        pkg, version = resolve_kernel_package()
        kit = fetch_kernel(pkg, version)
        progs = compile_progs()
        files = host_files()
        key = _input_key(f"{pkg}={version}", progs, files)
        out = root / "builds" / key
        if force or not (out / "manifest.json").exists():
            t0 = time.monotonic()
            tmp = root / "builds" / f".tmp-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            initrd = build_initrd(kit, progs, files)
            (tmp / "initrd.img").write_bytes(initrd)
            _link_or_copy(kit.vmlinuz, tmp / "vmlinuz")
            if kit.vmlinux:
                _link_or_copy(kit.vmlinux, tmp / "vmlinux")
            manifest = {
                "key": key,
                "kernel_pkg": pkg,
                "kernel_version": version,
                "release": kit.release,
                "modules": list(kit.modules),
                "pvh": kit.vmlinux is not None,
                "progs": sorted(progs),
                "host_files": sorted(files),
                "initrd_bytes": len(initrd),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            _log(
                f"built guest {key}: kernel {kit.release}, initrd {len(initrd) / 2**20:.0f} MiB,"
                f" {len(progs)} progs ({time.monotonic() - t0:.1f} s)"
            )
            _prune(root / "builds", keep, out)
        os.utime(out)
        manifest = json.loads((out / "manifest.json").read_text())
    pvh = manifest.get("pvh") and os.environ.get("VFSD_GUEST_PVH", "1") != "0"
    img = GuestImage(
        kernel=out / ("vmlinux" if pvh else "vmlinuz"),
        initrd=out / "initrd.img",
        bzimage=out / "vmlinuz",
        kernel_version=manifest["release"],
        modules=tuple(manifest["modules"]),
        key=key,
        path=out,
    )
    _memo["img"] = img
    return img


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _prune(builds: Path, keep: int, current: Path) -> None:
    dirs = [d for d in builds.iterdir() if d.is_dir() and not d.name.startswith(".")]
    dirs.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs[keep:]:
        if d != current:
            shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """CLI: build (or reuse) the guest image and print where it is."""
    ap = argparse.ArgumentParser(
        prog="python -m tests.rig.build", description="Build or reuse the cached test guest."
    )
    ap.add_argument("--force", action="store_true", help="rebuild the initramfs even if cached")
    ap.add_argument("--print", action="store_true", help="print the manifest as JSON")
    args = ap.parse_args(argv)
    try:
        img = build(force=args.force)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.print:
        print((img.path / "manifest.json").read_text())
    else:
        print(f"kernel: {img.kernel}\ninitrd: {img.initrd}\nmodules: {' '.join(img.modules)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
