"""The drawing page (tools/serve.py): a real server on a free port, driven by headless Chromium."""

import io
import json
import re
import socket
import subprocess
import time
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT
from tests.conftest import CHROMIUM, needs_chromium

pytestmark = pytest.mark.e2e  # a real server driven by headless Chromium


LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \S+ (\d{3}|server): \S")  # serve's one line per failure


def start_server(trained, tmp_path, **limits):
    """`python -m tools.serve --port 0` in an empty folder, its limits (BODY_TIMEOUT_S, ...) changed as given;
    (process, URL, folder)."""
    folder, home = tmp_path / "cwd", tmp_path / "home"
    folder.mkdir()
    home.mkdir()
    code = ("import sys, tools.serve as s\n" + "".join(f"s.{k} = {v!r}\n" for k, v in limits.items())
            + "from mnist_cnn.stage import run\nrun(lambda: s.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", str(trained[0]), "--port", "0"],
                            cwd=folder, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving on http://127.0.0.1:"):
        proc.kill()
        raise AssertionError(line + proc.stderr.read())
    return proc, line.split()[2], folder


def stop_server(proc):
    """Stop it as Ctrl-C would; it says "stopped", and its stderr is one line per failure, no traceback."""
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0 and out.strip() == "stopped", (proc.returncode, out, err)
    assert all(LOG_LINE.match(line) for line in err.splitlines()), err
    return err.splitlines()


@pytest.fixture
def server(trained, tmp_path):
    """The page, as the README starts it; (its URL, the folder); stopped whatever happens."""
    proc, url, folder = start_server(trained, tmp_path)
    try:
        yield url, folder
    finally:
        stop_server(proc)


def post(url, data, headers=None):
    request = urllib.request.Request(url + "predict", data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_server_answers_images_and_refuses_bad_uploads_in_one_line(server, trained, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    url, folder = server
    _, images, _, oracle = trained
    png = io.BytesIO()
    Image.fromarray(images[0]).save(png, format="PNG")
    status, result = post(url, png.getvalue())
    assert status == 200 and result["digit"] == oracle[0] and len(result["probabilities"]) == 10
    view = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(result["view"].split(",")[1]))))
    assert np.array_equal(view, images[0])  # a 28x28 MNIST image is seen as it is
    for data, message in [(b"", "the upload is empty"), (b"not a picture", "not a picture this tool reads"),
                          (b"\0" * (50 * 10**6 + 1), "over the limit of 50 MB")]:
        status, result = post(url, data)
        assert status in (400, 413) and message in result["error"] and "\n" not in result["error"]
    white = io.BytesIO()
    Image.new("L", (200, 200), 255).save(white, format="PNG")
    assert post(url, white.getvalue()) == (400, {"error": "no digit found (the image is blank)"})
    assert list(folder.iterdir()) == []  # uploads are never written
    assert list((folder.parent / "home").rglob("*")) == []  # nor anything else: ONNX Runtime's telemetry is off


def draw(page, strokes):
    """Drag the mouse along each stroke (points as shares of the pad's width and height)."""
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=8)
        page.mouse.up()


@needs_chromium
def test_drawing_a_digit_with_the_mouse_shows_its_prediction_and_a_bad_upload_an_error(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    problems = []
    bad = tmp_path.parent / f"{tmp_path.name}-notes.png"
    bad.write_text("not a picture")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.on("console", lambda msg: msg.type in ("error", "warning") and problems.append(msg.text))
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.goto(url)
            draw(page, [[(0.5, 0.15), (0.5, 0.5), (0.5, 0.85)]])  # a 1: one stroke down
            expect(page.locator("#digit")).to_have_text("1", timeout=15_000)
            widths = page.eval_on_selector_all(".bar div", "bars => bars.map(b => parseFloat(b.style.width))")
            assert len(widths) == 10 and max(widths) == widths[1] > 100
            assert page.eval_on_selector("#view", "img => img.naturalWidth") == 28
            page.screenshot(path=str(tmp_path.parent / "serve_one.png"))

            page.click("#clear")
            expect(page.locator("#digit")).to_have_text("")
            draw(page, [[(0.25, 0.18), (0.75, 0.18), (0.45, 0.85)]])  # a 7: across, then down to the left
            expect(page.locator("#digit")).to_have_text("7", timeout=15_000)

            page.set_input_files("#file", str(bad))
            expect(page.locator("#error")).to_contain_text("not a picture this tool reads", timeout=15_000)
            expect(page.locator("#digit")).to_have_text("")

            # An upload made while drawings are still being encoded and sent wins over every one of them.
            for _ in range(3):
                draw(page, [[(0.5, 0.15), (0.5, 0.5), (0.5, 0.85)]])
                page.set_input_files("#file", str(bad))
                page.wait_for_timeout(1_500)  # time for any answer to the drawing to come in, and be dropped
                expect(page.locator("#error")).to_contain_text("not a picture this tool reads", timeout=15_000)
                expect(page.locator("#digit")).to_have_text("")
        finally:
            browser.close()
    assert [p for p in problems if "400" not in p] == []  # the refused upload's 400 is the only console line


def test_a_port_in_use_is_one_line(trained, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "tools.serve", "--model", str(trained[0]), "--port", str(port)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port} (address already in use); "
                                               f"try another --port (0: any free one)"]


def digit_png(trained):
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(trained[1][0]).save(png, format="PNG")
    return png.getvalue()


def test_another_site_cannot_use_the_page_and_curl_still_can(server, trained):
    url, folder = server
    port = url.rstrip("/").rsplit(":", 1)[1]
    png = digit_png(trained)
    own = url.rstrip("/")
    assert post(url, png)[0] == 200  # curl --data-binary: no Origin, no Sec-Fetch-Site
    assert post(url, png, {"Origin": own, "Sec-Fetch-Site": "same-origin", "Content-Type": "image/png"})[0] == 200
    assert post(url, png, {"Host": f"localhost:{port}"})[0] == 200
    for headers, why in [({"Origin": "http://evil.example", "Content-Type": "text/plain"}, "another origin"),
                         ({"Sec-Fetch-Site": "cross-site"}, "from another site"),
                         ({"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"}, "from another site"),
                         ({"Origin": "null"}, "another origin"),
                         ({"Host": f"rebound.example:{port}"}, "Host rebound.example")]:
        status, answer = post(url, png, headers)
        assert status == 403 and why in answer["error"] and "\n" not in answer["error"], (headers, answer)
    page = urllib.request.Request(url, headers={"Sec-Fetch-Site": "cross-site"})  # a link from elsewhere: the page
    with urllib.request.urlopen(page, timeout=30) as r:
        assert r.status == 200
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 0 0 moveto 28 28 lineto stroke\nshowpage\n"
    status, answer = post(url, eps)
    assert status == 400 and answer["error"].startswith("not a picture this tool reads (UnidentifiedImageError)")
    assert "/" not in answer["error"].split(";")[0] and "gs" not in answer["error"].split()
    assert list(folder.iterdir()) == []


@needs_chromium
def test_a_page_from_another_origin_cannot_post_to_it_from_a_real_browser(trained, tmp_path):
    """The attack as a browser makes it: a text/plain POST, which needs no preflight, from another origin's page."""
    from playwright.sync_api import sync_playwright

    proc, url, _ = start_server(trained, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.html").write_text("<p>another site</p>")
    # -u: http.server's "Serving HTTP on ... port N" is otherwise held in its buffer (Python 3.12 and later)
    site = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"], cwd=other,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        other_port = re.search(r"port (\d+)", site.stdout.readline()).group(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{other_port}/")
                sent = page.evaluate("""(target) => fetch(target, {method: "POST", mode: "no-cors", body: "x",
                                                                  headers: {"Content-Type": "text/plain"}})
                                        .then(() => "sent", () => "failed")""", url + "predict")
            finally:
                browser.close()
    finally:
        site.terminate()
        site.wait(timeout=20)
        lines = stop_server(proc)
    assert sent == "sent"  # the browser did send it (no-cors hides the answer from the page, not the request)
    refused = [line for line in lines if " 403: refused: " in line]
    assert len(refused) == 1 and ("from another site" in refused[0] or "another origin" in refused[0]), lines


def raw_socket(url):
    host, port = url.split("//")[1].rstrip("/").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    return sock, f"{host}:{port}"


def test_slow_and_stalled_clients_are_cut_off_and_uploads_in_flight_are_bounded(trained, tmp_path):
    proc, url, _ = start_server(trained, tmp_path, BODY_TIMEOUT_S=2, HEADER_TIMEOUT_S=2, IN_FLIGHT_MB=1)
    try:
        headers_only, host = raw_socket(url)
        headers_only.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\n".encode())  # and no more
        half_body, _ = raw_socket(url)
        half_body.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: 900000\r\n\r\n".encode()
                          + b"\0" * 10)
        time.sleep(0.5)
        # 900,000 bytes held for the stalled upload: another of 200,000 is over the 1 MB in flight, refused
        status, answer = post(url, b"\0" * 200_000)
        assert status == 503 and answer["error"].startswith("busy: too many uploads at once")
        start = time.perf_counter()
        assert headers_only.recv(1024) == b""  # closed by the server
        reply = half_body.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 2 s" in reply
        assert time.perf_counter() - start < 6
        assert post(url, digit_png(trained))[0] == 200  # and the budget is given back
        headers_only.close()
        half_body.close()
    finally:
        lines = stop_server(proc)
    assert any(" 503: busy" in line for line in lines) and any(" 408: the upload" in line for line in lines)


@pytest.mark.long  # once, on 3.11 (CI): 500 connections
def test_two_hundred_requests_are_answered_beside_three_hundred_stalled_clients(server, trained):
    from concurrent.futures import ThreadPoolExecutor

    url, _ = server
    stalled = []
    try:
        for _ in range(300):
            sock, host = raw_socket(url)
            sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Le".encode())
            stalled.append(sock)
        png = digit_png(trained)
        with ThreadPoolExecutor(200) as pool:
            answers = list(pool.map(lambda _: post(url, png), range(200)))
        assert {status for status, _ in answers} == {200}
        assert {answer["digit"] for _, answer in answers} == {int(trained[3][0])}
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.long  # once, on 3.11 (CI): six large decodes
def test_a_drawing_is_not_held_behind_large_pictures_being_decoded(trained, tmp_path):
    """Pictures over SMALL_PIXELS (say PNG bombs: 49 megapixels in 47 KB) are decoded DECODERS at a time; a
    small one has a lane of its own. With one large decoder, eight bombs take turns; the drawing sent while
    most of them still wait is answered before them (by order, not by a time limit): at most the bomb being
    decoded as it arrives ends first."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    bomb = io.BytesIO()
    Image.new("L", (7000, 7000), 0).save(bomb, format="PNG", optimize=True)
    proc, url, _ = start_server(trained, tmp_path, DECODERS=1)
    done = []
    try:
        def send(name, data):
            status, _ = post(url, data)
            done.append(name)
            return status
        with ThreadPoolExecutor(9) as pool:
            bombs = [pool.submit(send, f"bomb{i}", bomb.getvalue()) for i in range(8)]
            time.sleep(0.3)
            answered_before = len(done)
            drawing = pool.submit(send, "drawing", digit_png(trained))
            assert drawing.result() == 200 and {b.result() for b in bombs} == {400}  # a black page: no digit
    finally:
        stop_server(proc)
    assert answered_before <= 4, f"the bombs were decoded too fast to test the lane: {done}"
    assert done.index("drawing") <= answered_before + 1, done
