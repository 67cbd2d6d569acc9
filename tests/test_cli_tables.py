"""The CLI's tables never cut a value (issue 14): whole in a pipe whatever its width, and in an
80-column terminal folded or laid out one value per line, but never elided.

The values are as long as pyvol allows or makes them: a 128-character volume name (the
longest name accepted), a 64-character snapshot name, a backup URL in a repository with a
long path, the daemon's timestamps and mountpoints. What each table must show is read from
the same command's ``--json``.
"""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

LONG = ("v" + "0123456789abcdef" * 8)[:118] + "-long-name"  # 128 characters: the most allowed
SNAP = "s" + "0123456789" * 5 + "-snapshot-end"  # 64 characters: the most allowed
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture(scope="module")
def listed(shared_daemon):
    """Two volumes (one named as long as allowed), a snapshot of each, a backup of each into
    a repository with a long path; and the --json of the three listings."""
    d = shared_daemon
    repo = Path(d.root.parent, "repository-" + "r" * 80)
    repo.mkdir()
    url = f"file://{repo}"
    for name in (LONG, "short"):
        d.cli("create", name, "--size", "64M")
        d.cli("snapshot", "create", name, "--name", SNAP)
        d.cli("backup", "create", name, "--dest", url)
    d.cli("mount", LONG)  # its mountpoint is listed: ROOT/mounts/<128 characters>
    assert len(LONG) == 128 and len(SNAP) == 64
    return {
        "ls": json.loads(d.cli("ls", "--json").stdout),
        "snapshot ls": json.loads(d.cli("snapshot", "ls", "--json").stdout),
        "backup ls": json.loads(d.cli("backup", "ls", url, "--json").stdout),
        "url": url,
    }


def expected(listed, command) -> tuple[list[str], list[dict[str, str]]]:
    """The headers, and per row the values that must appear whole under them."""
    if command == "ls":
        return ["NAME", "CREATED", "MOUNTPOINT"], [
            {"NAME": v["Name"], "CREATED": v["CreatedAt"], "MOUNTPOINT": v["Mountpoint"] or "-"}
            for v in listed["ls"]]
    if command == "snapshot ls":
        return ["SNAPSHOT", "VOLUME", "CREATED"], [
            {"SNAPSHOT": s["Ref"], "VOLUME": s["Volume"], "CREATED": s["CreatedAt"]}
            for s in listed["snapshot ls"]]
    return ["BACKUP", "VOLUME", "CREATED"], [
        {"BACKUP": b["url"], "VOLUME": b["volume"], "CREATED": b["created"]}
        for b in listed["backup ls"]]


def argv(d, command, listed) -> list[str]:
    args = command.split() + ([listed["url"]] if command == "backup ls" else [])
    return [sys.executable, "-m", "pyvol", "--socket", str(d.socket), *args]


def in_a_terminal(args: list[str], columns: int = 80) -> str:
    """Run ``args`` with stdout on a pseudo-terminal ``columns`` wide; what it printed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env={**env, "TERM": "xterm"})
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        shown += data
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0, err
    os.close(master)
    return ANSI.sub("", shown.decode()).replace("\r\n", "\n")


def column_fragments(lines: list[str], headers: list[str]) -> dict[str, list[str]]:
    """For a table whose first line is its header: per column, the text each line holds in
    that column's span (columns start where their header starts)."""
    starts, pos = [], 0
    for h in headers:
        pos = lines[0].index(h, pos)
        starts.append(pos)
        pos += len(h)
    ends = [*starts[1:], None]
    return {h: [ln[s:e].strip() for ln in lines] for h, s, e in zip(headers, starts, ends)}


def folded_whole(fragments: list[str], value: str) -> bool:
    """Whether ``value`` is the text of consecutive lines of one column (folded or not)."""
    for first in range(len(fragments)):
        text = ""
        for frag in fragments[first:]:
            text += frag
            if text == value:
                return True
            if not frag or not value.startswith(text):
                break
    return False


COMMANDS = ["ls", "snapshot ls", "backup ls"]
ALL_HEADERS = {
    "ls": ["NAME", "BACKEND", "SIZE", "FS", "MOUNTS", "SNAPSHOTS", "CREATED", "MOUNTPOINT"],
    "snapshot ls": ["SNAPSHOT", "VOLUME", "SIZE", "CREATED", "ORIGIN"],
    "backup ls": ["BACKUP", "VOLUME", "CREATED", "SIZE", "CHUNKS", "INCREMENTAL"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_piped_tables_hold_every_value_whole_on_one_line(shared_daemon, listed, command):
    """Through a pipe, and with COLUMNS=40 claiming a narrow screen: one line per row, each
    value whole in its column."""
    env = {**os.environ, "COLUMNS": "40"}
    r = subprocess.run(argv(shared_daemon, command, listed), capture_output=True, text=True,
                       env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout and "\x1b" not in r.stdout
    lines = r.stdout.splitlines()
    headers, rows = expected(listed, command)
    assert lines[0].split() == ALL_HEADERS[command]
    assert len(lines) == 1 + len(rows), r.stdout  # nothing wrapped onto a line of its own
    cols = column_fragments(lines, ALL_HEADERS[command])
    for want in rows:
        line = next(n for n in range(1, len(lines)) if cols[headers[0]][n] == want[headers[0]])
        for h in headers:
            assert cols[h][line] == want[h], (command, h, lines[line])
    assert any(len(ln) > 200 for ln in lines)  # the long values are really there


@pytest.mark.parametrize("command", COMMANDS)
def test_tables_in_an_80_column_terminal_fold_but_never_elide(shared_daemon, listed, command):
    """In a pseudo-terminal 80 columns wide: a table whose values fold within their column, or
    one ``COLUMN value`` line per value when the URLs and timestamps cannot share a line;
    either way every value is all there, and no line but a whole value's is wider than 80."""
    text = in_a_terminal(argv(shared_daemon, command, listed))
    assert "…" not in text and "..." not in text
    lines = text.splitlines()
    headers, rows = expected(listed, command)
    if lines[0].split() == ALL_HEADERS[command]:  # a table
        cols = column_fragments(lines, ALL_HEADERS[command])
        for want in rows:
            for h in headers:
                assert folded_whole(cols[h], want[h]), (command, h, want[h], text)
        assert max(map(len, lines)) <= 80, text
        for timestamp in (w["CREATED"] for w in rows):  # never folded
            assert any(timestamp in ln for ln in lines)
    else:  # one block per row
        label = max(map(len, ALL_HEADERS[command])) + 2
        records = [ln for ln in lines if ln]
        assert [ln[:label].strip() for ln in records] == ALL_HEADERS[command] * len(rows)
        for want in rows:
            for h in headers:
                assert f"{h.ljust(label)}{want[h]}" in records, (command, h, text)
        assert all(len(ln) <= 80 or ln[label:] in {w[h] for w in rows for h in headers}
                   for ln in records), text


def test_a_terminal_wide_enough_gets_one_line_per_row(shared_daemon, listed):
    """With room for every value, the terminal gets the pipe's table (and bold headers)."""
    text = in_a_terminal(argv(shared_daemon, "backup ls", listed), columns=600)
    lines = text.splitlines()
    assert lines[0].split() == ALL_HEADERS["backup ls"] and len(lines) == 3
    for b in listed["backup ls"]:
        assert any(ln.startswith(b["url"] + "  ") for ln in lines)
