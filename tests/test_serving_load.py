"""Real servers under load and under faults: concurrency, the bounded queue, stopped and hung servers."""
import socket
import threading
import time

import numpy as np
import pytest
import requests

from serving_support import ServerProcess, percentile
from stepvideo_ms.serving import protocol
from stepvideo_ms.serving.client import RemoteClient, RemoteServerError

CLIENTS = 8
REQUESTS_PER_CLIENT = 25
LOAD_DEADLINE_S = 300
VAE_AT = 12  # the 13th request of even-numbered clients is a VAE decode (1.5-3 s on a busy 2-core host)
MAX_CONNECTIONS = 8
HEAVY = ["一只熊猫在竹林里吃竹子。" * 40] * 16  # a caption job long enough for requests to pile up


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from stepvideo_ms.tools.tiny import write_tiny_model

    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=1, task="t2v")


@pytest.fixture(scope="module")
def both_server(tiny_dir, tmp_path_factory):
    srv = ServerProcess(tiny_dir, str(tmp_path_factory.mktemp("logs")), "load", "--port", 0).start()
    yield srv
    srv.stop()


def test_concurrent_clients_all_answered_correctly(both_server):
    url = both_server.url
    with RemoteClient(url) as probe:
        vae = probe.health()["loaded"]["vae"]
        z, fl = vae["z_channels"], vae["latent_frames_per_chunk"]
        prompts = [[f"client {i}: 一只熊猫在竹林里吃竹子，镜头缓缓推进。"] for i in range(CLIENTS)]
        expected_caption = [probe.caption(p) for p in prompts]
        latents = [np.random.default_rng(i).standard_normal((1, fl, z, 1, 1)).astype(np.float32)
                   for i in range(CLIENTS)]
        expected_frames = [probe.vae_decode(x) for x in latents]

    latencies, failures, answered = [], [], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def worker(i):
        with RemoteClient(url, read_timeout=120, retries=5, backoff=0.2) as c:
            for n in range(REQUESTS_PER_CLIENT):
                if time.monotonic() > deadline:
                    with lock:
                        failures.append(f"client {i} request {n}: load deadline passed")
                    return
                start = time.monotonic()
                try:
                    if n == VAE_AT and i % 2 == 0:
                        ok = np.array_equal(c.vae_decode(latents[i]), expected_frames[i])
                    else:
                        out = c.caption(prompts[i])
                        ok = all(np.array_equal(out[k], expected_caption[i][k]) for k in expected_caption[i])
                    error = None if ok else "wrong answer"
                except Exception as exc:  # recorded, counted as a failure
                    error = repr(exc)
                with lock:
                    latencies.append(time.monotonic() - start)
                    answered[0] += 1
                    if error:
                        failures.append(f"client {i} request {n}: {error}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    wall = time.monotonic() - t0
    total = CLIENTS * REQUESTS_PER_CLIENT
    ms = [x * 1000 for x in latencies]
    print(f"\nload: {CLIENTS} clients x {REQUESTS_PER_CLIENT} requests = {total}; answered {answered[0]}, "
          f"failures {len(failures)}; latency p50 {percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms, "
          f"max {max(ms) if ms else float('nan'):.0f} ms; wall {wall:.1f} s, {answered[0] / wall:.1f} req/s")
    assert not any(t.is_alive() for t in threads), "a client thread did not finish"
    assert answered[0] == total, f"lost requests: {total - answered[0]}"
    assert not failures, "\n".join(failures[:20])
    with RemoteClient(url) as probe:
        health = probe.health()
    assert health["queue"]["depth"] == 0 and health["answered"].get("500") is None
    print(f"server counters: {health['answered']}, queue {health['queue']}")


# ---- the bounded queue -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caption_server(tiny_dir, tmp_path_factory):
    srv = ServerProcess(tiny_dir, str(tmp_path_factory.mktemp("logs")), "caption", "--port", 0,
                        "--enable_llm", "True", "--enable_vae", "false", "--queue_size", 1,
                        "--max_connections", MAX_CONNECTIONS).start()
    yield srv
    srv.stop()


def test_caption_only_server(caption_server):
    assert set(caption_server.urls) == {"caption"}
    with RemoteClient(caption_server.url) as c:
        assert c.health()["endpoints"] == [protocol.CAPTION_PATH]
        with pytest.raises(RemoteServerError, match="404"):
            c.vae_decode(np.zeros((1, 3, 8, 1, 1), np.float32))


def test_full_queue_answers_503_with_retry_after_and_the_client_retries(caption_server):
    """Queue of 1: of 6 simultaneous heavy requests, some find it full; with retries all succeed."""
    body = protocol.encode({"prompts": HEAVY})
    statuses, retry_after = [], []
    lock = threading.Lock()

    def raw():
        with requests.Session() as s:
            s.trust_env = False
            r = s.post(caption_server.url + protocol.CAPTION_PATH, data=body, timeout=(5, 120),
                       headers={"Content-Type": protocol.CONTENT_TYPE})
        with lock:
            statuses.append(r.status_code)
            if r.status_code == 503:
                retry_after.append(r.headers.get("Retry-After"))

    threads = [threading.Thread(target=raw, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(set(statuses)) == [200, 503], statuses
    assert all(v and int(v) >= 1 for v in retry_after)

    results = []

    def patient():
        with RemoteClient(caption_server.url, retries=20, backoff=0.2) as c:
            results.append(c.caption(HEAVY)["y"].shape[0])

    threads = [threading.Thread(target=patient, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == [len(HEAVY)] * 3


def _get(url):
    with requests.Session() as s:
        s.trust_env = False  # straight to loopback, whatever proxy the environment names
        return s.get(url, timeout=(5, 10))


def test_connections_beyond_the_bound_get_503_and_slots_come_back(caption_server):
    """Idle connections hold every handler thread: the next one is refused at once, not queued."""
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", caption_server.port), timeout=5))
        time.sleep(0.3)  # let the server hand each to a handler thread
        r = _get(caption_server.url + protocol.HEALTH_PATH)
        assert r.status_code == 503 and "too many connections" in r.json()["error"]
        assert r.headers.get("Retry-After") == "1"
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while True:
        r = _get(caption_server.url + protocol.HEALTH_PATH)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200


# ---- faults ----------------------------------------------------------------------------------------------
def test_stopped_server_fails_fast_naming_the_url_then_restart_succeeds(tiny_dir, tmp_path):
    srv = ServerProcess(tiny_dir, str(tmp_path), "restart", "--port", 0, "--enable_llm", "True",
                        "--enable_vae", "False").start()
    port = srv.port
    client = RemoteClient(srv.url, connect_timeout=2, read_timeout=60, retries=2, backoff=0.2)
    try:
        assert client.caption(["before"])["y"].shape[0] == 1
        srv.stop()
        start = time.monotonic()
        with pytest.raises(RemoteServerError) as info:
            client.caption(["while stopped"])
        elapsed = time.monotonic() - start
        budget = 3 * 2 + 0.2 + 0.4 + 1.0  # attempts x connect time-out + back-offs + slack
        assert elapsed < budget, elapsed
        assert f"http://127.0.0.1:{port}/caption-api" in str(info.value) and "3 attempt" in str(info.value)
        srv = ServerProcess(tiny_dir, str(tmp_path), "restart2", "--port", port, "--enable_llm", "True",
                            "--enable_vae", "False").start()
        assert client.caption(["after restart"])["y"].shape[0] == 1
    finally:
        client.close()
        srv.stop()


def test_hung_server_times_out_naming_the_url():
    """A socket that accepts and never answers: the read time-out ends the call."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        client = RemoteClient(f"127.0.0.1:{port}", connect_timeout=1, read_timeout=1, retries=3)
        start = time.monotonic()
        with pytest.raises(RemoteServerError) as info:
            client.health()
        assert time.monotonic() - start < 5
        assert f"http://127.0.0.1:{port}/health" in str(info.value) and "time-out" in str(info.value)
    finally:
        listener.close()
