"""Fixtures for real-guest tests (QEMU + a tiny Linux guest, see tests/rig/README.md).

Why one shared guest: a boot costs ~3 s under TCG, so the 9p reference guest is booted once
per session and reused; it is rebooted transparently only if a test left it unusable (QEMU
died, or a command outlived its timeout).

Every test collected under tests/guest/ gets the ``guest`` marker automatically. Without
qemu-system-x86_64 the tests skip, unless $CI is set: then they fail.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `pytest` (unlike `python -m pytest`) does not put the repo root on sys.path.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.rig import qemu as rigqemu  # noqa: E402
from tests.rig.build import BuildError, GuestImage, build  # noqa: E402
from tests.rig.qemu import Guest  # noqa: E402

GUEST_DIR = Path(__file__).resolve().parent


def require_qemu() -> None:
    """Skip (or, in CI, fail) when QEMU is not installed."""
    if rigqemu.qemu_binary() is None:
        msg = "qemu-system-x86_64 not installed (run as root: bash tests/rig/deps.sh)"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI is set, so guest tests must not skip", pytrace=False)
        pytest.skip(msg)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if GUEST_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.guest)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On failure, attach the console path and tail of every running guest to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.get_closest_marker("guest"):
        for g in rigqemu.live_guests():
            report.sections.append(
                (
                    f"guest {g.name} console ({g.console_path})",
                    g.console_tail(rigqemu.CONSOLE_TAIL_LINES),
                )
            )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if rigqemu.BOOT_LOG:
        boots = ", ".join(f"{n} {s:.1f} s ({a})" for n, s, a in rigqemu.BOOT_LOG)
        terminalreporter.write_line(f"guest boots: {boots}")


@pytest.fixture(scope="session", autouse=True)
def _guest_prerequisites() -> None:
    """Runs before any (module/session) guest fixture, so a missing QEMU skips cleanly."""
    require_qemu()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The cached guest image (built on first use; rebuilt when rig inputs change)."""
    require_qemu()
    try:
        return build()
    except BuildError as e:
        pytest.fail(f"guest image build failed: {e}", pytrace=False)


class P9Guest:
    """The shared guest with a virtio-9p share of ``host_dir`` mounted at ``mnt``."""

    def __init__(self, host_dir: Path, workdir: Path, image: GuestImage) -> None:
        self.host_dir = host_dir
        self.mnt = "/mnt/p9"
        self._workdir = workdir
        self._image = image
        self._guest: Guest | None = None
        self._dirs = 0
        self._boots = 0

    @property
    def guest(self) -> Guest:
        """The running guest; (re)booted and mounted if needed."""
        g = self._guest
        if g is None or not g.alive or not g.healthy:
            if g is not None:
                g.close(graceful=False)
            name = "p9" if self._boots == 0 else f"p9-reboot{self._boots}"
            self._boots += 1
            g = Guest(self._workdir, p9_dir=self.host_dir, tag="p9", image=self._image, name=name)
            g.start()
            g.mount_share(self.mnt, "9p")
            self._guest = g
        return g

    def fresh_dir(self, name: str) -> tuple[Path, str]:
        """A new empty directory in the share: (host path, guest path)."""
        self._dirs += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
        rel = f"{self._dirs:03d}-{safe}"
        host = self.host_dir / rel
        host.mkdir()
        return host, f"{self.mnt}/{rel}"

    def close(self) -> None:
        if self._guest is not None:
            self._guest.close()
            self._guest = None


@pytest.fixture(scope="session")
def p9_guest(
    tmp_path_factory: pytest.TempPathFactory, guest_image: GuestImage
) -> Iterator[P9Guest]:
    """One guest per session with a 9p share (``.guest``, ``.host_dir``, ``.mnt``)."""
    holder = P9Guest(
        tmp_path_factory.mktemp("p9-share"), tmp_path_factory.mktemp("p9-guest"), guest_image
    )
    holder.guest  # noqa: B018 (boot now, so the boot is not charged to the first test)
    yield holder
    holder.close()


@pytest.fixture
def p9_case(p9_guest: P9Guest, request: pytest.FixtureRequest) -> tuple[Path, str]:
    """A fresh per-test directory in the 9p share: (host path, guest path)."""
    return p9_guest.fresh_dir(request.node.name)
