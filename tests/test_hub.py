"""The hub is asked through huggingface_hub (its proxies and offline mode apply); cache errors are reported."""
from __future__ import annotations

import os

import pytest

from jneox.errors import CheckpointError


# ---- the hub is asked through huggingface_hub (proxies apply); cache errors are reported ---
def test_hub_probe_goes_through_the_proxy(tmp_path):
    """Behind a proxy the hub is reachable only through it: the probe must use HTTPS_PROXY."""
    import socket
    import subprocess
    import sys
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    seen = []

    def proxy():
        conn, _ = server.accept()
        seen.append(conn.recv(200))
        conn.close()

    thread = threading.Thread(target=proxy, daemon=True)
    thread.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k.lower() not in ("no_proxy", "all_proxy")}
    env.update(HF_HOME=str(tmp_path), HF_ENDPOINT="https://hub.invalid",
               HTTPS_PROXY=f"http://127.0.0.1:{server.getsockname()[1]}")
    code = "from jneox.hub import hub_unreachable\nprint(hub_unreachable())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    thread.join(10)
    server.close()
    assert out.returncode == 0, out.stderr
    assert seen and seen[0].startswith(b"CONNECT hub.invalid:443")
    assert out.stdout.strip() != "None"  # the proxy hung up: reported as unreachable, with the reason


def test_a_cache_that_cannot_be_read_is_reported(monkeypatch):
    import huggingface_hub

    from jneox.hub import resolve

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/cache/models--rinna--x/refs/main")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreadable)
    with pytest.raises(CheckpointError, match="cache .* cannot be read: PermissionError: .*Permission denied"):
        resolve("rinna/x")
