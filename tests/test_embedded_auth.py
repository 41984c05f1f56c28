"""An embedded kvstore (`connect()` with no address, as `kvstore up` runs it) keeps Ray's token
authentication on with a token of its own, and serves its data plane on loopback: a process
without the token cannot join its Ray cluster, and no token file is left in ~/.ray."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cluster

OWNER = textwrap.dedent("""
    import sys
    from kvstore import connect
    client = connect(host_tier_bytes="16MiB", slot_bytes="64KiB", shm_prefix="kvstore-authtest")
    import ray
    print(ray.get_runtime_context().gcs_address, client.nodes()[0]["address"], flush=True)
    sys.stdin.read()  # until the test is done
    client.close()
""")
INTRUDER = textwrap.dedent("""
    import sys, ray
    try:
        ray.init(address=sys.argv[1], log_to_driver=False)
        print("JOINED", ray.nodes()[0]["Alive"], flush=True)
    except Exception as e:
        print("REFUSED", type(e).__name__, str(e)[:300], flush=True)
""")


def test_an_embedded_cluster_keeps_ray_auth_on_and_its_data_plane_on_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["HOME"] = str(tmp_path)  # where Ray would write ~/.ray/auth_token
    owner = subprocess.Popen([sys.executable, "-c", OWNER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        gcs, flight = owner.stdout.readline().split()
        assert flight.startswith("127.0.0.1:"), flight
        intruder = subprocess.run([sys.executable, "-c", INTRUDER, gcs], env=env, capture_output=True, text=True,
                                  timeout=120)
        told = intruder.stdout + intruder.stderr[-3000:]
        assert "REFUSED" in intruder.stdout and "JOINED" not in intruder.stdout, told
        assert "token" in told.lower() or "authenticat" in told.lower(), told  # refused for its missing token
        assert not (tmp_path / ".ray" / "auth_token").exists()
    finally:
        owner.stdin.close()
        owner.wait(timeout=60)
