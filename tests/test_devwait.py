"""Device waits (pyvol.devwait): on kernel uevents where they arrive, by a slow poll where they
do not, and always bounded by the caller's timeout and sentence.

Each wait below is for a device that is not there when the wait starts and appears from
another thread (losetup, dmsetup) moments later. With the fallback poll made longer than the
timeout, only an event can end a wait early: one that missed every event would find the
device at its last look, at the timeout, and fail the bound on how soon it returned.
"""

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvol import devwait
from pyvol.backends import loopdev
from pyvol.backends.devicemapper import dmsetup
from pyvol.errors import CommandFailed, PyvolError

IN_VM = os.environ.get("PYVOL_IN_VM") == "1"
NO_POLL = 3600.0  # a fallback interval no wait below lives to see
SOON = 10.0  # how soon after the device appears an event-driven wait has returned (the
             # qemu lane's emulated CPU is slow; the timeouts below are three times this)


def _kernel_sends_uevents() -> bool:
    """Whether this process receives the kernel's uevents (a raw socket, not devwait's: the
    check must not depend on the code under test). A network namespace owned by a user
    namespace receives none."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)  # NETLINK_KOBJECT_UEVENT
    try:
        s.bind((0, 1))
        s.settimeout(5)
        image = Path(f"/tmp/pyvol-uevent-probe-{os.getpid()}.img")
        image.write_bytes(b"\0" * 8192)
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                             text=True, check=True).stdout.strip()
        try:
            s.recv(65536)
            return True
        except TimeoutError:
            return False
        finally:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
            image.unlink()
    finally:
        s.close()


@pytest.fixture(scope="module")
def uevents_here():
    if not IN_VM and not _kernel_sends_uevents():
        pytest.skip("this process receives no kernel uevents here (a user namespace's "
                    "network namespace?); the qemu lane runs the event waits")


@pytest.fixture
def image(workdir):
    path = workdir / "dev.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    yield path
    loopdev.detach(path)


def _later(delay: float, action) -> dict:
    """Run ``action`` in a thread after ``delay`` s; the dict gets its result and when."""
    out: dict = {}

    def run():
        time.sleep(delay)
        out["result"] = action()
        out["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    out["thread"] = t
    return out


def _losetup(path: Path):
    return lambda: subprocess.run(["losetup", "--find", "--show", str(path)],
                                  capture_output=True, text=True, check=True).stdout.strip()


def _recording(check):
    """``check``, with every result it gave kept in ``.seen``."""
    def recorded():
        result = check()
        recorded.seen.append(result)
        return result
    recorded.seen = []
    return recorded


def _once_subscribed(delay: float, action):
    """A listener (the real one) that runs ``action`` ``delay`` s after it has subscribed:
    only an event can then tell the wait of the change, not its look after subscribing.
    Its ``.done`` is _later's dict."""
    class Subscribed(devwait.Uevents):
        async def __aenter__(self):
            await super().__aenter__()
            Subscribed.done = _later(delay, action)
            return self
    return Subscribed


class Silent:
    """A listener where uevents never arrive (a container without the host's uevents)."""

    entered = 0

    async def __aenter__(self):
        Silent.entered += 1
        return self

    async def __aexit__(self, *exc):
        pass

    async def next(self):
        await asyncio.sleep(NO_POLL)


def test_a_loop_devices_attach_ends_the_wait_on_its_uevent_not_a_poll(image, uevents_here):
    check = _recording(lambda: (dev := loopdev.find(image)) and devwait.block_device(dev))
    listen = _once_subscribed(0.5, _losetup(image))
    started = time.monotonic()
    found = devwait.until(check, 3 * SOON, "the loop device never appeared", fallback=NO_POLL,
                          listen=listen)
    returned = time.monotonic()
    attach = listen.done
    attach["thread"].join()
    assert not check.seen[0], "the device was there before the wait: nothing was waited for"
    assert found == attach["result"]
    assert returned - attach["at"] < SOON, (
        f"returned {returned - started:.1f} s after it started and "
        f"{returned - attach['at']:.1f} s after the attach: at its last look, not on an event")


def test_without_uevents_the_fallback_poll_finds_the_device(image):
    Silent.entered = 0
    check = _recording(lambda: loopdev.find(image))
    attach = _later(0.5, _losetup(image))
    found = devwait.until(check, 3 * SOON, "the loop device never appeared", fallback=0.3,
                          listen=Silent)
    returned = time.monotonic()
    attach["thread"].join()
    assert Silent.entered == 1, "the wait listened elsewhere than where nothing arrives"
    assert not check.seen[0]
    assert found == attach["result"]
    assert returned - attach["at"] < SOON, "not found by the poll, only at the timeout"
    assert len(check.seen) >= 3, "found without looking again: the poll did not run"


_IN_A_USERNS = """
import sys, time
from pyvol import devwait
from pyvol.backends import loopdev
image, fallback = sys.argv[1], float(sys.argv[2])
events = []
class Counted(devwait.Uevents):
    async def next(self):
        got = await super().next()
        events.append(got)
        return got
def check():
    print("looking", flush=True)
    return next((d for d, f in loopdev.attached().items() if f == image), None)
dev = devwait.until(check, 60, "never appeared", fallback=fallback, listen=Counted)
print("found", dev, time.monotonic(), len(events), flush=True)
"""


def test_in_a_user_namespace_no_uevent_arrives_and_the_poll_finds_the_device(image):
    """A network namespace owned by a user namespace (a rootless container's) receives no
    kernel uevents: the real listener opens there and hears nothing, and the poll finds the
    device."""
    if subprocess.run(["unshare", "-U", "-r", "-n", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here")
    child = subprocess.Popen(["unshare", "-U", "-r", "-n", sys.executable, "-c", _IN_A_USERNS,
                              str(os.path.realpath(image)), "0.5"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "looking"
        assert child.stdout.readline().strip() == "looking"  # the look after subscribing
        dev = _losetup(image)()
        attached_at = time.monotonic()
        out, _ = child.communicate(timeout=3 * SOON)
    finally:
        child.kill()
    last = out.strip().splitlines()[-1].split()
    assert last[:2] == ["found", dev], out
    assert float(last[2]) - attached_at < SOON
    assert last[3] == "0", f"{last[3]} uevents reached a user namespace's network namespace"


def test_a_device_that_appears_while_the_wait_subscribes_is_not_missed(image):
    """The look after subscribing sees what changed before the first event could: here the
    device appears while the listener opens, and no event ever tells of it."""
    class AttachWhileSubscribing(Silent):
        async def __aenter__(self):
            self.dev = _losetup(image)()
            return self

    started = time.monotonic()
    found = devwait.until(lambda: loopdev.find(image), 3 * SOON, "missed", fallback=NO_POLL,
                          listen=AttachWhileSubscribing)
    assert found == loopdev.find(image) is not None
    assert time.monotonic() - started < SOON, "found at the timeout's last look"


def test_a_device_that_never_appears_fails_at_the_timeout_with_the_callers_sentence(image):
    sentence = "timed out after 1.5 s waiting for the block device of never to appear"
    started = time.monotonic()
    with pytest.raises(PyvolError) as e:
        devwait.until(lambda: loopdev.find(image), 1.5, PyvolError(sentence), fallback=0.3)
    took = time.monotonic() - started
    assert str(e.value) == sentence
    assert 1.5 <= took < 1.5 + SOON / 2, f"gave up after {took:.1f} s"
    with pytest.raises(CommandFailed, match="^never$"):  # the caller's kind of error too
        devwait.until(lambda: None, 0.2, CommandFailed("never"), fallback=0.1)


def test_loop_attach_bounds_its_wait_with_its_sentence_and_detaches(image, monkeypatch):
    """Attach waits for its device's node and size; one that never comes fails with attach's
    own sentence within ATTACH_WAIT, and the device is not left bound."""
    monkeypatch.setattr(loopdev, "ATTACH_WAIT", 1.0)
    monkeypatch.setattr(devwait, "block_device", lambda *a: None)  # the node never comes
    started = time.monotonic()
    with pytest.raises(CommandFailed, match=r"^/dev/loop\d+ was bound to .*dev\.img, but it "
                       r"was not a block device of its size here within 1 s$"):
        loopdev.attach(image, direct_io=False)  # (the qemu lane's /tmp is a tmpfs: no O_DIRECT)
    assert time.monotonic() - started < 1.0 + SOON / 2
    assert loopdev.find(image) is None, "left bound after the failed attach"
    monkeypatch.undo()
    dev = loopdev.attach(image, direct_io=False)
    assert devwait.block_device(dev) == dev and loopdev.find(image) == dev


def _dm_device(name: str) -> str | None:
    """/dev/dm-N of the dm device called ``name``, by sysfs (whether or not a node exists)."""
    for d in Path("/sys/block").glob("dm-*"):
        try:
            if (d / "dm" / "name").read_text().strip() == name:
                return f"/dev/{d.name}"
        except OSError:
            continue
    return None


@pytest.mark.devicemapper
def test_a_dm_devices_activation_ends_the_wait_on_its_uevent(uevents_here):
    name = f"pyvol-devwait-{os.getpid()}"
    check = _recording(lambda: _dm_device(name))
    listen = _once_subscribed(0.5, lambda: dmsetup("create", name, "--table", "0 2048 zero"))
    try:
        found = devwait.until(check, 3 * SOON, "the dm device never appeared", fallback=NO_POLL,
                              listen=listen)
        returned = time.monotonic()
        create = listen.done
        create["thread"].join()
        assert not check.seen[0]
        assert found == _dm_device(name)
        assert returned - create["at"] < SOON, "found at the last look, not on an event"
    finally:
        if hasattr(listen, "done"):
            listen.done["thread"].join()
        subprocess.run(["dmsetup", "remove", "--retry", name], capture_output=True)
