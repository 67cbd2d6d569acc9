"""The loop backend's pool: thin, auto-provisioned, and failing fast when full."""

import errno
import os
import time


from helpers import Daemon


def test_pool_is_sparse_and_provisioned_at_first_start(daemon):
    pool = daemon.root / "loop/pool.img"
    st = os.stat(pool)
    assert st.st_size == 20 << 30
    assert st.st_blocks * 512 < 200 << 20, "the pool file must not allocate up front"
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "thin", "Opts": {"size": "10G"}})
    image = daemon.root / "loop/pool/volumes/thin.img"
    assert os.stat(image).st_blocks * 512 < 300 << 20, "a new volume is thin"
    api.ok("/VolumeDriver.Remove", {"Name": "thin"})


def test_full_pool_fails_writes_fast_and_refuses_creates_clearly(workdir):
    d = Daemon(workdir / "root", workdir / "pyvol.sock", env={"PYVOL_LOOP_POOL_SIZE": "1G"})
    d.start()
    try:
        api = d.api
        api.ok("/VolumeDriver.Create", {"Name": "a", "Opts": {"size": "700M"}})
        api.ok("/VolumeDriver.Create", {"Name": "b", "Opts": {"size": "700M"}})  # thin: overcommit
        mps = [api.ok("/VolumeDriver.Mount", {"Name": n, "ID": "w"})["Mountpoint"] for n in "ab"]
        chunk = os.urandom(1 << 20)
        started, failure = time.monotonic(), None
        for mp in mps:
            try:
                with open(os.path.join(mp, "fill"), "wb") as f:
                    for i in range(600):  # fits each volume; both overflow the pool
                        f.write(chunk)
                        if i % 16 == 15:
                            f.flush()
                            os.fsync(f.fileno())
                    os.fsync(f.fileno())
            except OSError as e:
                failure = e
                break
        elapsed = time.monotonic() - started
        assert failure is not None, "1.2G written into a 1G pool without an error"
        assert failure.errno in (errno.EIO, errno.ENOSPC, errno.EROFS), failure
        assert elapsed < 120, f"writes into a full pool took {elapsed:.0f}s to fail"

        err = api.err("/VolumeDriver.Create", {"Name": "c", "Opts": {"size": "100M"}})
        assert "the loop pool is full" in err
        info = api.ok("/VolumeDriver.Get", {"Name": "a"})["Volume"]
        assert info["Status"]["allocated"] > 100 << 20
        # a full pool must still let the user clean up
        for n in "ab":
            api.ok("/VolumeDriver.Unmount", {"Name": n, "ID": "w"})
            api.ok("/VolumeDriver.Remove", {"Name": n})
        api.ok("/VolumeDriver.Create", {"Name": "c", "Opts": {"size": "100M"}})
    finally:
        d.stop()
