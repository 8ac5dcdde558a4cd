"""Starting `tether dev` on an ephemeral port for the loadtest scripts (peer_router.py,
profiles/record.py): returns the process and the URL it printed."""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_dev(tether: Path, args: list[str], log: Path, timeout_s: float) -> tuple[subprocess.Popen[bytes], str | None]:
    """Starts `tether dev --listen 127.0.0.1:0 ARGS` with stderr to `log`; returns the process and
    its URL, or None when it printed none within `timeout_s` (the caller stops it)."""
    popen = subprocess.Popen(
        [str(tether), "dev", "--listen", "127.0.0.1:0", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log.open("wb"), cwd=REPO,
    )  # fmt: skip
    found = threading.Event()
    box: list[str] = []

    def pump() -> None:
        assert popen.stdout is not None
        for raw in iter(popen.stdout.readline, b""):
            match = re.search(r"tether listening on (http://\S+)", raw.decode(errors="replace"))
            if match and not box:
                box.append(match.group(1))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    found.wait(timeout_s)
    return popen, (box[0] if box else None)
