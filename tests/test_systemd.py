"""pyvol as a systemd service (packaging/pyvol.service): the unit is checked by
systemd-analyze."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "pyvol.service"
INSTALLED = "/usr/local/bin/pyvol"  # where scripts/install.sh links the command


def _verify(unit: Path) -> str:
    """systemd-analyze verify's complaints about ``unit`` ('' when none). It exits 0 on
    unknown keys and bad values (it only warns), so what counts is what it prints."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install the systemd package (scripts/test.sh does)"
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    return (proc.stdout + proc.stderr).strip() or ("" if proc.returncode == 0 else
                                                   f"exit {proc.returncode}")


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    """The unit as shipped, with ExecStart pointing at this environment's pyvol: the
    installed path exists only where install.sh ran, and verify checks that it does."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} daemon\n" in text
    here = Path(sys.executable).with_name("pyvol")
    assert os.access(here, os.X_OK), f"{here}: the test command's environment has no pyvol"
    copy = tmp_path / "pyvol.service"
    copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={here} "))
    assert _verify(copy) == ""
    if os.access(INSTALLED, os.X_OK):  # a host where install.sh ran: the unit as it is
        assert _verify(UNIT) == ""
    # the check itself sees a mistake (verify only warns about it)
    copy.write_text(text.replace("NotifyAccess=", "NotifyAcess="))
    assert "Unknown key 'NotifyAcess'" in _verify(copy)
