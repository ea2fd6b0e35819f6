"""The drawing page (tools/serve.py): a real server on a free port, driven by headless Chromium."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT
from tests.conftest import CHROMIUM, needs_chromium

pytestmark = pytest.mark.e2e  # a real server driven by headless Chromium


@pytest.fixture
def server(trained, tmp_path):
    """`python -m tools.serve --port 0` in an empty folder; (its URL, the folder); stopped whatever happens."""
    folder, home = tmp_path / "cwd", tmp_path / "home"
    folder.mkdir()
    home.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve", "--model", str(trained[0]), "--port", "0"],
                            cwd=folder, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line + proc.stderr.read()
        yield line.split()[2], folder
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0 and out.strip() == "stopped" and err == "", (proc.returncode, out, err)


def post(url, data):
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "predict", data=data, method="POST")) as r:
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
    for data, message in [(b"", "the upload is empty"), (b"not a picture", "not an image PIL can read"),
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
            expect(page.locator("#error")).to_contain_text("not an image PIL can read", timeout=15_000)
            expect(page.locator("#digit")).to_have_text("")

            # An upload made while drawings are still being encoded and sent wins over every one of them.
            for _ in range(3):
                draw(page, [[(0.5, 0.15), (0.5, 0.5), (0.5, 0.85)]])
                page.set_input_files("#file", str(bad))
                page.wait_for_timeout(1_500)  # time for any answer to the drawing to come in, and be dropped
                expect(page.locator("#error")).to_contain_text("not an image PIL can read", timeout=15_000)
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
