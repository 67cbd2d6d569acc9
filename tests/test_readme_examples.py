"""The README's examples, run as written (issue 14).

Every shell block of README.md's "Use" section but the NFS one is read from the README and
run line by line with bash, through the tests' dockerd (tests/helpers.py: a private engine
with a busybox image imported from Debian's busybox-static, no registry) and a pyvol daemon.
A line whose comment is ``# → TEXT`` must print TEXT. The restore and the ``from-backup``
create use the backup URL read from the BACKUP column of ``pyvol backup ls``'s table, which
must be the URL ``pyvol backup create`` printed.

Substituted, and nothing else:
- ``docker`` is the tests' dockerd's client (``docker -H unix://...``);
- ``pyvol`` is this checkout's CLI (``python -m pyvol --socket <the test daemon's socket>``);
- the driver name ``pyvol`` (``--volume-driver=pyvol``, ``-d pyvol``) is the test daemon's
  legacy plugin name, ``pyvol-test-<pid>``: /run/docker/plugins/pyvol.sock belongs to the
  host's own pyvol service, where one runs;
- ``/srv/backups`` is a directory in the test's scratch directory, absent at first as it is
  on a fresh host;
- the backup URL in ``pyvol restore`` and ``-o from-backup`` (the README's
  ``...#wordpressdb/20261125T210000Z-1a2b3c4d`` is an example) is the one read from the table.

Not run: the NFS block (NFS exports and a second host; tests/test_nfs.py covers the nfs
backend) and the "Set up" blocks (install.sh, test.sh, build-plugin.sh; the managed plugin is
tests/test_managed_plugin.py).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DOCKER

pytestmark = pytest.mark.docker

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE_URL = re.compile(r"file:///srv/backups#[^\s']+")
DRIVER = re.compile(r"(--volume-driver=|-d )pyvol\b")


def use_examples() -> list[tuple[str, str | None]]:
    """(command, the output its ``# → TEXT`` comment promises, or None) for each line of the
    "Use" section's shell blocks, the NFS block left out."""
    section = README.read_text().split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
              if "PYVOL_NFS_SHARES" not in b]
    lines = []
    for block in blocks:
        for line in block.splitlines():
            if not line.strip():
                continue
            m = re.fullmatch(r"(.*?\S)\s+# (.*)", line)  # a '#' inside a URL has no space
            command, comment = (m[1], m[2]) if m else (line, "")
            lines.append((command, comment[2:] if comment.startswith("→ ") else None))
    return lines


def test_the_use_section_is_what_this_test_expects():
    """The parts the next test relies on are in the README (so that a rewrite that drops one
    fails here, by name, rather than passing with less)."""
    commands = [c for c, _ in use_examples()]
    for needed in ("busybox cat /sample/f", "pyvol snapshot create", "from-snapshot=",
                   "pyvol backup init file:///srv/backups", "pyvol backup create",
                   "pyvol backup ls", "pyvol restore", "from-backup="):
        assert any(needed in c for c in commands), needed
    assert sum(1 for _, out in use_examples() if out) >= 3


def test_the_readme_examples_run_as_written(dockerd, plugin, workdir):
    backups = workdir / "srv-backups"
    prelude = (f'docker() {{ {DOCKER} -H unix://{dockerd.sock} "$@"; }}\n'
               f'pyvol() {{ {sys.executable} -m pyvol --socket {plugin.socket} "$@"; }}\n')
    printed_url = table_url = None
    for line, promised in use_examples():
        command = line
        if EXAMPLE_URL.search(command):
            assert table_url, f"{line!r} needs a backup URL, but no `pyvol backup ls` ran"
            command = EXAMPLE_URL.sub(table_url, command)
        command = DRIVER.sub(rf"\g<1>{plugin.driver}", command)
        command = command.replace("/srv/backups", str(backups))
        r = subprocess.run(["bash", "-c", prelude + command], capture_output=True, text=True,
                           timeout=300, check=False)
        assert r.returncode == 0, f"README: {line}\nran: {command}\n{r.stdout}{r.stderr}"
        if promised is not None:
            assert r.stdout.strip() == promised, f"README: {line}"
        if line.startswith("pyvol backup init"):
            assert backups.is_dir() and r.stdout.startswith(f"created repository file://{backups}")
        if line.startswith("pyvol backup create"):
            printed_url = r.stdout.strip()
        if line.startswith("pyvol backup ls"):
            rows = r.stdout.splitlines()
            assert rows[0].split()[0] == "BACKUP" and len(rows) == 2, r.stdout
            table_url = rows[1].split()[0]
            assert table_url == printed_url and "…" not in r.stdout
            assert table_url.startswith(f"file://{backups}#wordpressdb/")
    restored = dockerd.run("volume", "inspect", "-f", "{{.Driver}}", "wp2").stdout.strip()
    assert restored == plugin.driver
    out = dockerd.run("run", "--rm", "-v", "wp2:/d", "busybox", "cat", "/d/data").stdout
    assert out == "v2\n"  # the volume made by -o from-backup holds the backed-up data
