"""What abuse costs: predict's peak memory by the number of images, and the page's latency under load.

    python -m bench.abuse [--model models/cpu] [--counts 1000 100000] [--out bench/results/abuse.json]

1. Peak RSS and wall time of `python -m tools.predict N.npz --model MODEL --json`, each a new process, for an
   .npz of N of MNIST's test digits (MNIST_NPZ, Keras's cache, else the committed sample, repeated to N).
   predict works BATCH images at a time, so the peak should not grow with N: the figure to hold is the RSS
   at 100,000 against the RSS at 1,000 (the issue's margin: MARGIN_MB).
2. `python -m tools.serve` on a free port: the latency of one normal request (a 28x28 PNG) alone, then while
   300 clients hold connections open mid-headers and 200 others post at once; the 200's latencies too.
3. The same server sent 24 PNG bombs at once (7,000 x 7,000 pixels, ~200 KB each: 49 megapixels to decode
   each): the latency of a normal request sent beside them, and the server's peak RSS (VmHWM).
Prints a table and writes --out, naming the CPU. Not a test: it asserts nothing, it measures.
"""

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.real_digits import mnist_test
from mnist_cnn.backend import cpu_features, cpu_model

ROOT = Path(__file__).resolve().parent.parent
MARGIN_MB = 50  # predict's peak at 100,000 images may pass its peak at 1,000 by this much (the result list aside)


def run_predict(model, count, folder):
    """Peak RSS (MB) from the child's own accounting: a process of its own, waited for with wait4."""
    images, _, _ = mnist_test()
    path = folder / f"digits_{count}.npz"
    np.savez_compressed(path, x=np.resize(images, (count, 28, 28)))
    start = time.perf_counter()
    out_path = folder / f"answers_{count}.json"
    with open(out_path, "wb") as out:
        pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "tools.predict", str(path), "--model",
                                              str(model), "--json"], os.environ | {"PYTHONPATH": str(ROOT)},
                             file_actions=[(os.POSIX_SPAWN_DUP2, out.fileno(), 1)])
        _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"predict on {count} images failed (exit {os.waitstatus_to_exitcode(status)})")
    answers = len(json.loads(out_path.read_text()))
    return {"images": count, "answers": answers, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "seconds": round(seconds, 2)}


def png_digit():
    from PIL import Image

    images, _, _ = mnist_test()
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def timed_post(url, data):
    start = time.perf_counter()
    request = urllib.request.Request(url + "predict", data=data, method="POST")
    with urllib.request.urlopen(request, timeout=300) as answer:
        answer.read()
        status = answer.status
    return time.perf_counter() - start, status


def page_latency(model, concurrent=200, stalled=300):
    server = subprocess.Popen([sys.executable, "-m", "tools.serve", "--model", str(model), "--port", "0"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = []
    try:
        url = server.stdout.readline().split()[2]
        host, port = url.split("//")[1].rstrip("/").split(":")
        png = png_digit()
        alone = [timed_post(url, png)[0] for _ in range(21)][1:]
        for _ in range(stalled):
            sock = socket.create_connection((host, int(port)), timeout=60)
            sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Le".encode())
            held.append(sock)
        with ThreadPoolExecutor(concurrent + 1) as pool:
            crowd = [pool.submit(timed_post, url, png) for _ in range(concurrent)]
            probe_s, probe_status = pool.submit(timed_post, url, png).result()
            results = [future.result() for future in crowd]
        latencies = sorted(seconds for seconds, _ in results)
        return {"alone_median_ms": round(1000 * statistics.median(alone), 1),
                "under_load_probe_ms": round(1000 * probe_s, 1), "probe_status": probe_status,
                "concurrent": concurrent, "stalled": stalled,
                "concurrent_ok": sum(status == 200 for _, status in results),
                "concurrent_median_ms": round(1000 * statistics.median(latencies), 1),
                "concurrent_p95_ms": round(1000 * latencies[int(0.95 * len(latencies)) - 1], 1),
                "concurrent_max_ms": round(1000 * latencies[-1], 1)}
    finally:
        for sock in held:
            sock.close()
        server.terminate()
        server.communicate(timeout=30)


def png_bomb(side=7000):
    """A PNG of side x side black pixels: about 200 KB on disk, side^2 bytes once decoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def peak_rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def bomb_latency(model, bombs=24):
    server = subprocess.Popen([sys.executable, "-m", "tools.serve", "--model", str(model), "--port", "0"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split()[2]
        bomb, png = png_bomb(), png_digit()
        timed_post(url, png)
        before = peak_rss_mb(server.pid)
        with ThreadPoolExecutor(bombs + 1) as pool:
            sent = [pool.submit(post_any, url, bomb) for _ in range(bombs)]
            time.sleep(0.2)
            probe_s, probe_status = pool.submit(timed_post, url, png).result()
            statuses = [future.result() for future in sent]
        return {"bombs": bombs, "bomb_kb": round(len(bomb) / 1024), "bomb_statuses": sorted(set(statuses)),
                "probe_ms": round(1000 * probe_s, 1), "probe_status": probe_status,
                "server_peak_rss_mb_before": before, "server_peak_rss_mb": peak_rss_mb(server.pid)}
    finally:
        server.terminate()
        server.communicate(timeout=30)


def post_any(url, data):
    """The status of a POST, whatever it is (a bomb's answer is 400: no digit in a black page)."""
    import urllib.error

    try:
        return timed_post(url, data)[1]
    except urllib.error.HTTPError as err:
        return err.code


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/cpu")
    parser.add_argument("--counts", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/abuse.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_predict(args.model, count, Path(tmp)) for count in args.counts]
    for run in runs:
        print(f"predict, {run['images']:>7,} images: peak RSS {run['peak_rss_mb']:7.1f} MB, {run['seconds']:6.1f} s")
    growth = runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"]
    print(f"  growth from {runs[0]['images']:,} to {runs[-1]['images']:,}: {growth:+.1f} MB (margin {MARGIN_MB} MB)")
    page = page_latency(args.model)
    print(f"page: a request alone {page['alone_median_ms']} ms (median of 20); beside {page['stalled']} stalled "
          f"clients and {page['concurrent']} concurrent ones: {page['under_load_probe_ms']} ms "
          f"(the {page['concurrent']}: median {page['concurrent_median_ms']} ms, p95 {page['concurrent_p95_ms']} "
          f"ms, max {page['concurrent_max_ms']} ms, {page['concurrent_ok']} answered 200)")
    bombs = bomb_latency(args.model)
    print(f"page: {bombs['bombs']} PNG bombs of {bombs['bomb_kb']} KB at once (answered {bombs['bomb_statuses']}): "
          f"a request beside them {bombs['probe_ms']} ms; the server's peak RSS {bombs['server_peak_rss_mb']} MB "
          f"({bombs['server_peak_rss_mb_before']} MB before)")
    result = {"cpu": cpu_model(), "cpu_features": cpu_features(), "machine": platform.machine(),
              "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "predict": runs, "predict_growth_mb": round(growth, 1), "margin_mb": MARGIN_MB, "page": page,
              "bombs": bombs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['cpu']}: {', '.join(result['cpu_features']) or 'no flags read'})")


if __name__ == "__main__":
    main()
