"""The managed plugin, built from the Dockerfile on a local base image and run by a real
dockerd: the seed's demo, docker-compose, the CLI against it, and an upgrade."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from helpers import DOCKER, release, seed_demo

pytestmark = pytest.mark.docker

HERE = Path(__file__).resolve().parent.parent
NAME = "pyvol"
DRIVER = "pyvol:latest"


def _scripts_env(dockerd) -> dict:
    return {**os.environ, "DOCKER": DOCKER, "DOCKER_HOST": f"unix://{dockerd.sock}",
            "PYTHON": os.environ.get("PYVOL_TEST_PYTHON", sys.executable)}


def _enable(dockerd, state: Path) -> None:
    dockerd.run("plugin", "set", NAME, f"state.source={state}", "PYVOL_LOOP_POOL_SIZE=20G")
    dockerd.run("plugin", "enable", NAME, timeout=120)


def _plugin_socket(dockerd) -> str:
    pid = dockerd.run("plugin", "inspect", "-f", "{{.Id}}", NAME).stdout.strip()
    return f"/run/docker/plugins/{pid}/pyvol.sock"


@pytest.fixture(scope="module")
def managed(dockerd, report):
    env = _scripts_env(dockerd)
    base = subprocess.run(["bash", "scripts/make-base-image.sh"], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert base.returncode == 0, base.stderr
    started = time.monotonic()
    built = subprocess.run(["bash", "scripts/build-plugin.sh", "--base", base.stdout.strip(),
                            "--name", NAME], cwd=HERE, env=env, capture_output=True, text=True,
                           timeout=1200)
    assert built.returncode == 0, built.stderr
    rootfs = HERE / "build/plugin/rootfs"
    size = int(subprocess.run(["du", "-sb", str(rootfs)], capture_output=True,
                              text=True).stdout.split()[0])
    report(f"managed plugin: rootfs {size / (1 << 20):.0f} MiB, built in "
           f"{time.monotonic() - started:.0f} s ({built.stdout.strip()})")
    state = Path(tempfile.mkdtemp(prefix="pyvol-mp-", dir="/var/tmp"))
    _enable(dockerd, state)
    yield state
    dockerd.run("rm", "-f", *dockerd.run("ps", "-aq").stdout.split(), check=False)
    for vol in dockerd.run("volume", "ls", "-q", "--filter", f"driver={DRIVER}").stdout.split():
        dockerd.run("volume", "rm", "-f", vol, check=False)
    dockerd.run("plugin", "disable", "-f", NAME, check=False)
    dockerd.run("plugin", "rm", "-f", NAME, check=False)
    release(state)
    shutil.rmtree(state, ignore_errors=True)


def cli(dockerd, *args) -> subprocess.CompletedProcess:
    """The pyvol CLI as a user runs it: no --socket, it finds the managed plugin's. It runs
    from the environment the test command made, never a pyvol the host may have elsewhere."""
    env = {k: v for k, v in os.environ.items() if k != "PYVOL_SOCKET"}
    proc = subprocess.run([sys.executable, "-m", "pyvol", *args], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_seed_demo_through_the_managed_plugin(dockerd, managed):
    seed_demo(dockerd, DRIVER)
    info = json.loads(cli(dockerd, "info", "--json").stdout)
    assert info["socket"] == "/run/docker/plugins/pyvol.sock"  # as the plugin sees it
    assert info["root"] == "/var/lib/pyvol" and (managed / "state.db").exists()


@pytest.mark.slow  # faster relative: the seed demo through the managed plugin (same calls)
def test_docker_compose_v1_with_the_managed_driver(dockerd, managed, tmp_path):
    (tmp_path / "docker-compose.yml").write_text(textwrap.dedent(f"""\
        version: "2"
        services:
          writer:
            image: busybox
            command: sh -c "echo composed > /data/f"
            volumes: ["data:/data"]
        volumes:
          data:
            driver: "{DRIVER}"
            driver_opts:
              size: "256M"
        """))
    env = {**os.environ, "DOCKER_HOST": f"unix://{dockerd.sock}"}
    up = subprocess.run(["docker-compose", "-p", "mp", "up", "--abort-on-container-exit"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    out = dockerd.run("run", "--rm", "-v", "mp_data:/d", "busybox", "cat", "/d/f").stdout
    assert out == "composed\n"
    inspect = json.loads(dockerd.run("volume", "inspect", "mp_data").stdout)[0]
    assert inspect["Driver"] == DRIVER and inspect["Status"]["size"] == 256 << 20
    subprocess.run(["docker-compose", "-p", "mp", "down"], cwd=tmp_path, env=env,
                   capture_output=True, timeout=120)


def test_cli_snapshots_and_backs_up_through_the_managed_plugin(dockerd, managed):
    dockerd.run("volume", "create", "-d", DRIVER, "-o", "size=128M", "shop")
    dockerd.run("run", "--rm", "-v", "shop:/d", "busybox", "sh", "-c",
                "echo order-1 > /d/orders")
    snap = cli(dockerd, "snapshot", "create", "shop", "--name", "s1").stdout.strip()
    assert snap == "shop@s1"
    # a file target must be a path the plugin sees: under its state dir
    (managed / "repo").mkdir(exist_ok=True)
    made = json.loads(cli(dockerd, "backup", "create", "shop@s1", "--dest",
                          "file:///var/lib/pyvol/repo", "--json").stdout)
    assert (managed / "repo" / "config").exists()
    cli(dockerd, "restore", made["url"], "shop-copy")
    out = dockerd.run("run", "--rm", "-v", "shop-copy:/d", "busybox", "cat", "/d/orders").stdout
    assert out == "order-1\n"
    dockerd.run("volume", "create", "-d", DRIVER, "-o", f"from-backup={made['url']}", "shop-2")
    out = dockerd.run("run", "--rm", "-v", "shop-2:/d", "busybox", "cat", "/d/orders").stdout
    assert out == "order-1\n"


def test_upgrade_disable_rm_create_enable_keeps_every_volume(dockerd, managed):
    dockerd.run("volume", "create", "-d", DRIVER, "keep")
    dockerd.run("run", "--rm", "-v", "keep:/d", "busybox", "sh", "-c",
                "dd if=/dev/urandom of=/d/blob bs=1M count=8 2>/dev/null; md5sum /d/blob > /d/sum")
    before = sorted(dockerd.run("volume", "ls", "-q", "--filter", f"driver={DRIVER}").stdout.split())
    assert "keep" in before
    dockerd.run("plugin", "disable", "-f", NAME)
    dockerd.run("plugin", "rm", "-f", NAME)
    dockerd.run("plugin", "create", NAME, str(HERE / "build/plugin"))
    _enable(dockerd, managed)
    after = sorted(dockerd.run("volume", "ls", "-q", "--filter", f"driver={DRIVER}").stdout.split())
    assert after == before
    out = dockerd.run("run", "--rm", "-v", "keep:/d", "busybox", "md5sum", "-c", "/d/sum").stdout
    assert "OK" in out
