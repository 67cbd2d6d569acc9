"""``pyvol``: the daemon, and a client for people (tables) and scripts (``--json``).

Every client command talks to the daemon over its socket (``--socket``, before or after the
command, or PYVOL_SOCKET; else found: client.find_socket), so the CLI works the same against a
host service and a managed plugin. Errors print the daemon's message on stderr and exit 1; no
traceback. Tables never cut a value (see _table); ``--json`` is the interface for scripts.
"""

import contextlib
import json
import os
import shutil
import sys
import textwrap

from typing import TYPE_CHECKING

import click

from . import config as pyvol_config
from .backup.retention import COUNTS as RETENTION_COUNTS
from .backup.retention import WITHINS as RETENTION_WITHINS
from .errors import PyvolError
from .units import format_size

# `pyvol daemon` runs in this module too, and gunicorn's workers are forks of it: what only
# the client commands use (.client; rich) is imported where they use it, so
# that no process of the daemon holds them.
if TYPE_CHECKING:
    from .client import Client


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


SOCKET_HELP = ("The daemon's socket, before or after the command (env PYVOL_SOCKET; default: "
               f"the host service's {pyvol_config.DEFAULT_SOCKET}, else the managed plugin's).")


def _keep_socket(ctx, _param, value):
    # ctx.meta is shared by the group's and the command's contexts: the option after the
    # command is read after the one before it (and after PYVOL_SOCKET), so it wins
    if value:
        ctx.meta["pyvol.socket"] = value


def _socket_option(**kw) -> click.Option:
    return click.Option(["--socket"], metavar="PATH", default=None, expose_value=False,
                        callback=_keep_socket, help=SOCKET_HELP, **kw)


def _named_socket(ctx) -> str | None:
    return ctx.meta.get("pyvol.socket")


def _client(ctx) -> "Client":
    from .client import Client, find_socket

    return Client(_named_socket(ctx) or find_socket(lambda line: click.echo(line, err=True)))


def _print(data, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        render(data)


# Columns a terminal never folds: URLs and timestamps are copied whole, off one line
WHOLE = frozenset({"BACKUP", "CREATED", "SINCE", "TARGET", "NEXT", "LAST", "RESULT"})
GAP = "  "
FOLD_FLOOR = 8  # a folding column keeps at least this many characters (or its header's)


def _cell(value) -> str:
    text = "" if value is None else " ".join(str(value).split("\n"))
    return text.replace("\t", " ") or "-"


def _table(columns, rows) -> None:
    """Print a table with every value whole; never an ellipsis.

    Not to a terminal (a pipe, a file): columns as wide as their longest value, one line per
    row, whatever the length. To a terminal: the same when it fits its width; else the columns
    other than WHOLE ones fold (a value continues on the next lines of its column); and when
    even the WHOLE columns do not fit, one block of ``COLUMN value`` lines per row (as psql's
    expanded display), where a value longer than the screen is left to the terminal to wrap.
    """
    columns = list(columns)
    cells = [[_cell(c) for c in r] for r in rows]
    natural = [max(map(len, col)) for col in zip(columns, *cells)]
    if not sys.stdout.isatty():
        _print_rows(columns, cells, natural, bold=False)
        return
    room = shutil.get_terminal_size().columns - len(GAP) * (len(columns) - 1)
    widths = _fit(columns, natural, room)
    if widths is None:
        _print_records(columns, cells)
    else:
        _print_rows(columns, cells, widths, bold=True)


def _fit(columns, natural, room) -> list[int] | None:
    """Column widths that fit ``room``, the widest folding column narrowed first; None when
    the WHOLE columns and the others at their floor do not fit."""
    widths = list(natural)
    floors = [n if h in WHOLE else min(n, max(len(h), FOLD_FLOOR))
              for h, n in zip(columns, natural)]
    excess = sum(widths) - room
    while excess > 0:
        narrowable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not narrowable:
            return None
        i = max(narrowable, key=widths.__getitem__)
        widths[i] -= 1
        excess -= 1
    return widths


def _print_rows(columns, cells, widths, bold: bool) -> None:
    for n, row in enumerate([columns, *cells]):
        # long values fold into their column: at spaces where they have some, else anywhere
        parts = [[v] if len(v) <= w else textwrap.wrap(v, w, break_on_hyphens=False) or [v]
                 for v, w in zip(row, widths)]
        for k in range(max(map(len, parts))):
            line = GAP.join((p[k] if k < len(p) else "").ljust(w)
                            for p, w in zip(parts, widths)).rstrip()
            click.echo(click.style(line, bold=True) if bold and n == 0 else line)


def _print_records(columns, cells) -> None:
    label = max(map(len, columns))
    for n, row in enumerate(cells):
        if n:
            click.echo()
        for h, v in zip(columns, row):
            click.echo(click.style(h.ljust(label), bold=True) + GAP + v)


def _kv(data: dict, indent: str = "") -> None:
    for k, v in data.items():
        if isinstance(v, dict):
            click.echo(f"{indent}{k}:")
            _kv(v, indent + "  ")
        elif isinstance(v, list) and v and all(isinstance(i, dict) for i in v):
            click.echo(f"{indent}{k}:")  # e.g. mount_ids: every field whole, one item each
            for item in v:
                click.echo(f"{indent}  - " + ", ".join(f"{ik}: {iv}" for ik, iv in item.items()))
        else:
            click.echo(f"{indent}{k}: {v}")


def _opts(pairs) -> dict:
    opts = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"{p!r}: accepted is KEY=VALUE", param_hint="--opt")
        k, v = p.split("=", 1)
        opts[k] = v
    return opts


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PyvolError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, params=[_socket_option(envvar="PYVOL_SOCKET")])
def cli():
    """pyvol: thin volumes, snapshots and backups for Docker."""


@cli.command()
@click.option("--root", envvar="PYVOL_ROOT", default=pyvol_config.DEFAULT_ROOT, show_default=True,
              help="State and pool directory (env PYVOL_ROOT).")
@click.option("--backend", envvar="PYVOL_BACKEND", default=None,
              help="Default backend (env PYVOL_BACKEND; default: best available).")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="gunicorn workers.")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def daemon(ctx, root, backend, workers, log_level):
    """Run the daemon in the foreground."""
    from .server import serve

    cfg = pyvol_config.load(root=root, socket=_named_socket(ctx), backend=backend)
    if workers:
        cfg.workers = workers
    if log_level:
        cfg.log_level = log_level
    serve(cfg)


@cli.command()
@click.argument("name")
@click.option("--size", help="Size with K/M/G/T suffix (default 10G).")
@click.option("--backend", help="Storage backend.")
@click.option("--fs", "fstype", type=click.Choice(["ext4", "xfs"]), help="Filesystem.")
@click.option("--from-snapshot", metavar="VOL@SNAP", help="Start from a snapshot's data.")
@click.option("--opt", "-o", "pairs", multiple=True, metavar="KEY=VALUE", help="Any option.")
@json_option
@click.pass_context
def create(ctx, name, size, backend, fstype, from_snapshot, pairs, as_json):
    """Create a volume."""
    opts = _opts(pairs)
    for key, value in (("size", size), ("backend", backend), ("fs", fstype),
                       ("from-snapshot", from_snapshot)):
        if value:
            opts[key] = value
    v = _client(ctx).call("POST", "/volumes", {"Name": name, "Opts": opts})
    _print(v, as_json, lambda v: click.echo(v["Name"]))


@cli.command()
@click.argument("name")
@click.pass_context
def rm(ctx, name):
    """Remove a volume and its snapshots."""
    _client(ctx).call("DELETE", f"/volumes/{name}")
    click.echo(name)


def _volume_rows(vols):
    _table(["NAME", "BACKEND", "SIZE", "FS", "MOUNTS", "SNAPSHOTS", "CREATED", "MOUNTPOINT"],
           [(v["Name"], v["Status"]["backend"], format_size(v["Status"]["size"]),
             v["Status"]["fs"] or "-", v["Status"]["mounts"], v["Status"]["snapshots"],
             v["CreatedAt"], v["Mountpoint"]) for v in vols])


@cli.command("ls")
@json_option
@click.pass_context
def ls(ctx, as_json):
    """List volumes."""
    _print(_client(ctx).call("GET", "/volumes"), as_json, _volume_rows)


@cli.command()
@click.argument("name")
@json_option
@click.pass_context
def inspect(ctx, name, as_json):
    """Show one volume."""
    _print(_client(ctx).call("GET", f"/volumes/{name}"), as_json, _kv)


@cli.command()
@click.argument("name")
@click.argument("size")
@json_option
@click.pass_context
def resize(ctx, name, size, as_json):
    """Grow a volume to SIZE (K/M/G/T suffix), also while containers use it; never shrinks."""
    v = _client(ctx).call("POST", f"/volumes/{name}/resize", {"Size": size})
    _print(v, as_json, lambda v: click.echo(f"{v['Name']} {format_size(v['Status']['size'])}"))


@cli.command()
@click.argument("name")
@click.option("--id", "mount_id", default="pyvol-cli", show_default=True,
              help="Mount ID; each ID is counted, unmount with the same ID.")
@click.pass_context
def mount(ctx, name, mount_id):
    """Mount a volume on this host and print its mountpoint."""
    click.echo(_client(ctx).call("POST", f"/volumes/{name}/mount", {"ID": mount_id})["Mountpoint"])


@cli.command()
@click.argument("name")
@click.option("--id", "mount_id", default="pyvol-cli", show_default=True,
              help="Mount ID, in full, as `pyvol inspect` shows it under mount_ids.")
@click.option("--all", "every", is_flag=True,
              help="Drop every count of that ID, not just one.")
@click.pass_context
def umount(ctx, name, mount_id, every):
    """Drop one count of a mount ID (the volume is unmounted when the last count goes).

    Also how an operator clears a count that Docker will never release (its container is
    gone but the count stayed): find the ID with `pyvol inspect NAME`, then
    `pyvol umount NAME --id ID --all`.
    """
    _client(ctx).call("POST", f"/volumes/{name}/unmount", {"ID": mount_id, "All": every})


@cli.group()
def snapshot():
    """Snapshots: constant-time, point-in-time copies of a volume."""


def _snap_rows(snaps):
    # ORIGIN: "backup" marks the snapshots pyvol took itself (and may remove); "user" the rest
    _table(["SNAPSHOT", "VOLUME", "SIZE", "CREATED", "ORIGIN"],
           [(s["Ref"], s["Volume"], format_size(s["Size"]), s["CreatedAt"], s.get("Origin", ""))
            for s in snaps])


@snapshot.command("create")
@click.argument("volume")
@click.option("--name", help="Snapshot name (default: a UTC timestamp).")
@json_option
@click.pass_context
def snapshot_create(ctx, volume, name, as_json):
    """Snapshot a volume (its filesystem is frozen for the instant it takes)."""
    s = _client(ctx).call("POST", f"/volumes/{volume}/snapshots", {"Name": name})
    _print(s, as_json, lambda s: click.echo(s["Ref"]))


@snapshot.command("ls")
@click.argument("volume", required=False)
@json_option
@click.pass_context
def snapshot_ls(ctx, volume, as_json):
    """List snapshots, of one volume or all."""
    params = {"volume": volume} if volume else None
    _print(_client(ctx).call("GET", "/snapshots", params=params), as_json, _snap_rows)


@snapshot.command("rm")
@click.argument("ref", metavar="VOL@SNAP")
@click.pass_context
def snapshot_rm(ctx, ref):
    """Remove a snapshot."""
    _client(ctx).call("DELETE", f"/snapshots/{ref}")
    click.echo(ref)


@snapshot.command("rollback")
@click.argument("ref", metavar="VOL@SNAP")
@click.option("--discard-current", is_flag=True,
              help="Do not keep the volume's current data as a pre-rollback-TIME snapshot.")
@json_option
@click.pass_context
def snapshot_rollback(ctx, ref, discard_current, as_json):
    """Replace a volume's data with a snapshot's (refused while it is mounted).

    What the volume held stays as snapshot VOL@pre-rollback-TIME (printed), unless
    --discard-current."""
    r = _client(ctx).call("POST", f"/snapshots/{ref}/rollback",
                          {"DiscardCurrent": discard_current})
    _print(r, as_json, lambda r: click.echo(
        f"{r['Volume']} rolled back to {r['Snapshot']}"
        + (f"; its data before: {r['Kept']}" if r["Kept"] else "")))


@snapshot.command("inspect")
@click.argument("ref", metavar="VOL@SNAP")
@json_option
@click.pass_context
def snapshot_inspect(ctx, ref, as_json):
    """Show one snapshot."""
    _print(_client(ctx).call("GET", f"/snapshots/{ref}"), as_json, _kv)


def _info(data):
    click.echo(f"pyvol {data['version']}  root {data['root']}  socket {data['socket']}")
    click.echo(f"default backend: {data['default_backend']}   volumes: {data['volumes']}")
    rows = []
    for name, b in sorted(data["backends"].items()):
        if b.get("available"):
            size, used = b.get("pool_size"), b.get("pool_used")
            pool = f"{format_size(used)} used of {format_size(size)}" if size else "-"
            rows.append((name, "yes", b["scope"], pool))
        else:
            rows.append((name, "no", "-", b.get("reason", "")))
    _table(["BACKEND", "AVAILABLE", "SCOPE", "POOL"], rows)
    if "backups" in data:
        _backups_info(data["backups"])


def _backups_info(b: dict) -> None:
    click.echo("backups: the daemon reads and writes repositories itself, with its own "
               "environment (AWS_* in /etc/default/pyvol, or `docker plugin set`)")
    s3 = b.get("s3", {})
    if s3.get("error"):
        click.echo(f"  S3:             {s3['error']}")
    else:
        click.echo(f"  S3 endpoint:    {s3.get('endpoint')}")
        click.echo(f"  S3 region:      {s3.get('region')}")
        creds = s3.get("credentials")
        click.echo(f"  S3 credentials: {creds} (the AWS credential provider that found them)"
                   if creds else "  S3 credentials: none found in the daemon's environment")
    key = b.get("key_file")
    if not key:
        click.echo("  key file:       none (PYVOL_BACKUP_KEY_FILE unset): new repositories are "
                   "not encrypted")
    elif b.get("key_file_error"):
        click.echo(f"  key file:       {key}: {b['key_file_error']}")
    else:
        click.echo(f"  key file:       {key}: new repositories are encrypted with it")


@cli.command()
@json_option
@click.pass_context
def info(ctx, as_json):
    """Show the daemon, its backends and pool usage, and what backups use."""
    _print(_client(ctx).call("GET", "/info", params={"backups": "1"}), as_json, _info)


@contextlib.contextmanager
def _progress(quiet: bool):
    """A progress bar (bytes, rate, ETA) on a terminal; nothing under --json or in a pipe,
    where rich is not imported at all (its progress module alone takes 0.15 s to import)."""
    if quiet or not sys.stderr.isatty():
        yield lambda _report: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    err = Console(stderr=True)
    if quiet or not err.is_terminal:
        yield lambda _report: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def show(report):
            phase = report.get("phase") or "working"
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=report.get("total") or None)
            bar.update(tasks[phase], completed=report.get("done", 0),
                       total=report.get("total") or None)
        yield show


@cli.group()
def claim():
    """Which hosts hold a shared (nfs, ebs) volume; clear a dead host's claim."""


@claim.command("ls")
@click.argument("volume")
@json_option
@click.pass_context
def claim_ls(ctx, volume, as_json):
    """List the hosts that have VOLUME mounted (and so claim it)."""
    _print(_client(ctx).call("GET", f"/volumes/{volume}/claims"), as_json, lambda ls: _table(
        ["HOST", "INSTANCE", "SINCE"], [(x["host"], x["instance"], x["since"]) for x in ls]))


@claim.command("clear")
@click.argument("volume")
@click.argument("host")
@click.pass_context
def claim_clear(ctx, volume, host):
    """Drop the claim of HOST (dead) on VOLUME, so that it can be removed or moved."""
    r = _client(ctx).call("POST", f"/volumes/{volume}/claims/clear", {"Host": host})
    click.echo(f"cleared {r['cleared']} claim(s) of {host} on {volume}")


@cli.group()
def schedule():
    """Snapshots and backups the daemon takes by itself, every INTERVAL, with retention.

    The options are those `docker volume create -o` takes: snapshot-every, snapshot-keep,
    backup-every, backup-to, backup-keep. Retention removes only what the schedule made.
    """


def _schedule_rows(items):
    _table(["VOLUME", "WHAT", "EVERY", "KEEP", "TARGET", "NEXT", "LAST", "RESULT", "FAILURES",
            "ERROR"],
           [(s["volume"], s["what"], s["every"], s["keep"], s["target"], s["next"], s["last"],
             f"run by {s['by']}" if s.get("by") else s["result"], s["failures"], s["error"])
            for s in items])


@schedule.command("set")
@click.argument("volume")
@click.option("--snapshot-every", metavar="INTERVAL", help="Snapshot every 30s, 10m, 1h, 1d...")
@click.option("--snapshot-cron", metavar="EXPR",
              help="Snapshot at a cron expression's times, in UTC: '0 3 * * *'.")
@click.option("--snapshot-keep", metavar="N|POLICY",
              help="Keep the N newest, or a policy such as hourly=24,daily=7.")
@click.option("--backup-every", metavar="INTERVAL", help="Back up every INTERVAL.")
@click.option("--backup-cron", metavar="EXPR", help="Back up at a cron expression's times.")
@click.option("--backup-to", metavar="URL", help="s3://BUCKET[/PREFIX], file:///PATH or "
                                                 "ebs://REGION.")
@click.option("--backup-keep", metavar="N|POLICY",
              help="Keep the N newest, or a policy such as daily=7,weekly=4.")
@click.option("--opt", "-o", "pairs", multiple=True, metavar="KEY=VALUE",
              help="Any of the above as KEY=VALUE.")
@json_option
@click.pass_context
def schedule_set(ctx, volume, pairs, as_json, **named):
    """Set VOLUME's snapshot or backup schedule (options not given stay as they were)."""
    opts = _opts(pairs)
    opts.update({k.replace("_", "-"): v for k, v in named.items() if v is not None})
    if not opts:
        raise click.UsageError("nothing to set: give --snapshot-every or --snapshot-cron, "
                               "--backup-every or --backup-cron with --backup-to, or the keep "
                               "options")
    rows = _client(ctx).call("PUT", f"/volumes/{volume}/schedules", {"Opts": opts})
    _print(rows, as_json, _schedule_rows)


@schedule.command("ls")
@click.argument("volume", required=False)
@json_option
@click.pass_context
def schedule_ls(ctx, volume, as_json):
    """List schedules and each one's last run: its snapshot or backup, or its error."""
    params = {"volume": volume} if volume else None
    _print(_client(ctx).call("GET", "/schedules", params=params), as_json, _schedule_rows)


@schedule.command("rm")
@click.argument("volume")
@click.option("--what", type=click.Choice(["snapshot", "backup"]),
              help="Only this schedule (default: both).")
@click.pass_context
def schedule_rm(ctx, volume, what):
    """Stop VOLUME's schedules; what they made stays (remove it as usual)."""
    r = _client(ctx).call("DELETE", f"/volumes/{volume}/schedules",
                          params={"what": what} if what else None)
    click.echo(f"removed {r['removed']} schedule(s) of {volume}")


# `pyvol lease ...`, the name these commands had before "claim" (a host's hold on a shared
# volume) was told apart from a repository's lock: kept working, no longer listed
cli.add_command(click.Group("lease", commands=claim.commands, hidden=True,
                            help=claim.help))


@cli.group()
def backup():
    """Backups: incremental, deduplicated copies of volumes in an S3 or file repository."""


def _backup_rows(items):
    _table(["BACKUP", "VOLUME", "CREATED", "SIZE", "CHUNKS", "INCREMENTAL"],
           [(b["url"], b["volume"], b["created"], format_size(b["source"]["size"]),
             b["chunk_count"], "yes" if b["incremental"] else "no") for b in items])


@backup.command("init")
@click.argument("url", metavar="REPOSITORY")
@json_option
@click.pass_context
def backup_init(ctx, url, as_json):
    """Create an empty repository (and, for file://, its directory); print its id.

    Encrypted when the daemon has a key file (PYVOL_BACKUP_KEY_FILE). Refused where a
    repository exists already.
    """
    r = _client(ctx).call("POST", "/repository/init", {"Repo": url})
    _print(r, as_json, lambda r: click.echo(
        f"created repository {r['url']}\nid:        {r['id']}\nencrypted: "
        + (f"yes, with the key file {r['key_file']}" if r["encrypted"] else
           "no (the daemon has no PYVOL_BACKUP_KEY_FILE)")))


@backup.command("create")
@click.argument("ref", metavar="VOLUME[@SNAPSHOT]")
@click.option("--dest", required=True, metavar="URL",
              help="Repository: s3://BUCKET[/PREFIX] or file:///PATH.")
@json_option
@click.pass_context
def backup_create(ctx, ref, dest, as_json):
    """Back up a volume (from a new snapshot unless one is named); print the backup's URL."""
    with _progress(as_json) as show:
        result = _client(ctx).stream("POST", "/backups", {"Volume": ref, "Dest": dest}, show)
    _print(result, as_json, lambda r: click.echo(r["url"]))
    if not as_json and result.get("full_reason"):
        click.echo(f"note: full read: {result['full_reason']}", err=True)


@backup.command("ls")
@click.argument("url", metavar="REPOSITORY")
@click.option("--volume", help="Only this volume's backups.")
@json_option
@click.pass_context
def backup_ls(ctx, url, volume, as_json):
    """List the backups in a repository, oldest first."""
    params = {"repo": url, **({"volume": volume} if volume else {})}
    _print(_client(ctx).call("GET", "/backups", params=params), as_json, _backup_rows)


@backup.command("inspect")
@click.argument("url", metavar="BACKUP_URL")
@json_option
@click.pass_context
def backup_inspect(ctx, url, as_json):
    """Show one backup's manifest (without its chunk list)."""
    _print(_client(ctx).call("GET", "/backup", params={"url": url}), as_json, _kv)


@backup.command("rm")
@click.argument("url", metavar="BACKUP_URL")
@click.pass_context
def backup_rm(ctx, url):
    """Delete a backup (its chunks go at the next gc)."""
    _client(ctx).call("DELETE", "/backup", params={"url": url})
    click.echo(url)


@backup.command("verify")
@click.argument("url", metavar="BACKUP_URL")
@json_option
@click.pass_context
def backup_verify(ctx, url, as_json):
    """Read every chunk of a backup and check it against its name."""
    with _progress(as_json) as show:
        result = _client(ctx).stream("POST", "/backup/verify", {"Url": url}, show)
    _print(result, as_json, lambda r: click.echo(
        f"ok: {r['chunks']} chunks, {format_size(r['bytes'])} checked"))


@backup.command("gc")
@click.argument("url", metavar="REPOSITORY")
@json_option
@click.pass_context
def backup_gc(ctx, url, as_json):
    """Delete the chunks no backup uses any more."""
    result = _client(ctx).call("POST", "/repository/gc", {"Repo": url})
    _print(result, as_json, lambda r: click.echo(
        f"deleted {r['chunks_deleted']} chunks ({format_size(r['bytes_freed'])}), "
        f"kept {r['chunks_kept']} used by {r['backups']} backups"))


def _forget_rows(r):
    rows = []
    for g in r["groups"]:
        for b in g["backups"]:
            action = "keep" if b["kept"] else ("would remove" if r["dry_run"] else "remove")
            rows.append((action, b["url"], b["volume"], b["host"], b["created"],
                         ", ".join(b["reasons"]) or "no rule keeps it"))
    rows += [("keep", u["url"], "", "", "", u["why"]) for u in r["unreadable"]]
    click.echo(f"policy: {r['policy']} (per volume and host; days, weeks, months in UTC)")
    _table(["ACTION", "BACKUP", "VOLUME", "HOST", "CREATED", "WHY"], rows)
    verb = "would remove" if r["dry_run"] else "removed"
    click.echo(f"{verb} {r['removed']} backups, kept {r['kept']}")
    if r["gc"] is not None:
        g = r["gc"]
        click.echo(f"gc: deleted {g['chunks_deleted']} chunks ({format_size(g['bytes_freed'])})"
                   + (f", {g['chunks_marked']} more after {g['delete_after']} (a lock was "
                      "broken lately)" if g.get("chunks_marked") else ""))
    elif r["removed"] and not r["dry_run"]:
        click.echo(f"their chunks stay until `pyvol backup gc {r['repo']}` (or forget --gc)")


_UNIT = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month",
         "yearly": "year"}
# the daemon's own rule names (backup/retention.py), so a rule it adds is an option here too
KEEP_COUNTS = RETENTION_COUNTS
KEEP_WITHINS = tuple(k.replace("_", "-") for k in RETENTION_WITHINS)


def _keep_options(fn):
    # strings, checked by the daemon (backup/retention.py), so one sentence says what is wrong
    for name in reversed(KEEP_WITHINS):
        what = "every backup" if name == "within" else \
            f"the newest backup of each {_UNIT[name.rpartition('-')[2]]}"
        fn = click.option(f"--keep-{name}", name.replace("-", "_"), metavar="DURATION",
                          help=f"Keep {what} newer than DURATION (2d, 12h, 1y6m) before "
                               "the newest backup.")(fn)
    for name in reversed(KEEP_COUNTS):
        fn = click.option(f"--keep-{name}", name, metavar="N", help=(
            "Keep the N newest backups." if name == "last" else
            f"Keep the newest backup of each of the last N {_UNIT[name]}s that have one."))(fn)
    return fn


@backup.command("forget")
@click.argument("url", metavar="REPOSITORY")
@click.option("--volume", help="Only this volume's backups.")
@_keep_options
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--gc", "run_gc", is_flag=True, help="Then delete the chunks no backup uses.")
@json_option
@click.pass_context
def backup_forget(ctx, url, volume, dry_run, run_gc, as_json, **keep):
    """Remove the backups a retention policy does not keep (restic's --keep-* rules).

    Each volume's backups from each host are judged apart; hours, days, weeks (ISO), months
    and years are counted in UTC. Prints each backup with why it is kept. Only manifests
    are removed: their chunks go at the next `pyvol backup gc` (or with --gc).
    """
    body = {"Repo": url, "Volume": volume, "DryRun": dry_run, "Gc": run_gc,
            "Keep": {k: v for k, v in keep.items() if v is not None}}
    _print(_client(ctx).call("POST", "/repository/forget", body), as_json, _forget_rows)


@backup.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
def backup_keygen(path):
    """Write a new random repository key (then set PYVOL_BACKUP_KEY_FILE to it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        # secrets.token_hex is this; importing secrets loads OpenSSL, 15 ms of every cold call
        f.write(os.urandom(32).hex() + "\n")
    click.echo(path)


@cli.command()
@click.argument("url", metavar="BACKUP_URL")
@click.argument("name")
@click.option("--size", help="Size of the new volume (default: the backed-up size).")
@click.option("--backend", help="Backend of the new volume (any block backend).")
@json_option
@click.pass_context
def restore(ctx, url, name, size, backend, as_json):
    """Restore a backup into a new volume NAME."""
    body = {"Url": url, "Name": name, "Size": size, "Backend": backend}
    with _progress(as_json) as show:
        v = _client(ctx).stream("POST", "/restore", body, show)
    _print(v, as_json, lambda v: click.echo(v["Name"]))


def _socket_everywhere(group: click.Group) -> None:
    """``--socket`` after any command too: ``pyvol ls --socket S``, ``pyvol daemon --socket S``,
    ``pyvol snapshot ls --socket S``."""
    seen: set[int] = set()
    todo = list(group.commands.values())
    while todo:
        cmd = todo.pop()
        if id(cmd) in seen:  # `lease` shares its commands with `claim`
            continue
        seen.add(id(cmd))
        cmd.params.append(_socket_option())
        if isinstance(cmd, click.Group):
            todo.extend(cmd.commands.values())


_socket_everywhere(cli)


def main():
    cli(prog_name="pyvol")
