"""100 clients at once on the socket: only expected errors, and records, mounts and loop
devices agree at the end (two gunicorn workers with threads, all on shared names)."""

import os
import threading

from helpers import Api, loop_devices_under
from pyvol import mountinfo

CLIENTS = 100
NAMES = 30  # fewer names than clients: they collide on purpose
EXPECTED = ("already exists", "no such volume", "in use", "busy with another operation")


def test_hundred_concurrent_clients(daemon):
    errors, unexpected = [], []
    start = threading.Barrier(CLIENTS)

    def client(i: int):
        api = Api(daemon.socket, timeout=120)
        name, mid = f"c{i % NAMES}", f"id{i}"
        start.wait()
        steps = [("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "32M"}}),
                 ("/VolumeDriver.Mount", {"Name": name, "ID": mid}),
                 ("/VolumeDriver.Get", {"Name": name}),
                 ("/VolumeDriver.Unmount", {"Name": name, "ID": mid}),
                 ("/VolumeDriver.Remove", {"Name": name})]
        for path, body in steps:
            try:
                data = api.post(path, body)
            except Exception as e:  # transport failure: never expected
                unexpected.append((path, repr(e)))
                continue
            err = data.get("Err")
            if err:
                (errors if any(w in err for w in EXPECTED) else unexpected).append((path, err))
            elif path == "/VolumeDriver.Mount":
                with open(os.path.join(data["Mountpoint"], mid), "w") as f:
                    f.write(mid)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert unexpected == []
    assert errors, "names collide, so some calls must have been refused"

    api = daemon.api
    left = api.ok("/VolumeDriver.List", {})["Volumes"]
    for v in left:  # every client unmounted its own ID: nothing may still count as mounted
        status = api.ok("/VolumeDriver.Get", {"Name": v["Name"]})["Volume"]
        assert status["Mountpoint"] == "" and status["Status"]["mounts"] == 0, status
        api.ok("/VolumeDriver.Remove", {"Name": v["Name"]})
    assert api.ok("/VolumeDriver.List", {})["Volumes"] == []
    assert mountinfo.under(daemon.root / "mounts") == []
    assert list(loop_devices_under(daemon.root).values()) == [str(daemon.root / "loop/pool.img")]
    assert os.listdir(daemon.root / "loop/pool/volumes") == []
