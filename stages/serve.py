"""serve: a local page to draw a digit on, or upload a picture of one, and see what the classifier reads.

    python -m stages.serve [--model models/cpu] [--host 127.0.0.1] [--port 8000]

Draw with the mouse or a finger: the answer and the ten probabilities update
as you draw. Upload a photo or scan: it is prepared exactly as `predict`
prepares it, and the 28x28 image the network saw is shown beside the answer.
Binds to this machine only (127.0.0.1) unless --host says otherwise; the
page needs nothing from the network. Uploads are read in memory, never
written to disk, within predict's limits (MAX_FILE_MB, MAX_PIXELS); a bad one
gets a one-line error on the page. Ctrl-C stops it.
Not a pipeline stage: a tool that uses what the pipeline made (aiohttp, a
dependency of DVC's, serves it).
"""

import argparse
import asyncio
import base64
import io
import os
from pathlib import Path


from stages import predict
from stages.common import Interrupted, UserError, run


def answer(runtime, data):
    """Image bytes -> {"digit", "probabilities", "view": the 28x28 PNG as a data URL}, or {"error": one line}."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return {"error": "the upload is empty"}
    if len(data) > predict.MAX_FILE_MB * 10**6:
        return {"error": f"{len(data) / 10**6:.0f} MB is over the limit of {predict.MAX_FILE_MB} MB"}
    try:
        gray = predict.read_image(io.BytesIO(data), name="the upload")
    except UserError as err:
        return {"error": str(err)}
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # SyntaxError: PIL's word for a broken PNG
        return {"error": f"not an image PIL can read ({type(err).__name__}); upload a PNG or JPEG"}
    except Exception as err:  # noqa: BLE001  (one bad upload must not stop the page)
        return {"error": predict.unreadable(err)}
    try:
        image, no_digit = predict.to_mnist_or_none(gray)
        if image is None:
            return {"error": no_digit}
        pixels = predict.to_pixels(image[None])
        probabilities = runtime.predict(pixels)[0]
    except Exception as err:  # noqa: BLE001  (one bad picture must not stop the page)
        return {"error": predict.unreadable(err)}
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, format="PNG")
    return {"digit": int(probabilities.argmax()), "probabilities": [round(float(p), 6) for p in probabilities],
            "view": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}


def make_app(runtime):
    from aiohttp import web

    async def page(request):
        return web.Response(text=PAGE.replace("{{RUNTIME}}", runtime.name), content_type="text/html")

    async def classify(request):
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": f"over the limit of {predict.MAX_FILE_MB} MB"}, status=413)
        result = await asyncio.get_running_loop().run_in_executor(None, answer, runtime, data)
        return web.json_response(result, status=400 if "error" in result else 200)

    app = web.Application(client_max_size=predict.MAX_FILE_MB * 10**6)
    app.add_routes([web.get("/", page), web.post("/predict", classify)])
    return app


async def serve(app, host, port):
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as err:
            reason = os.strerror(err.errno).lower() if err.errno else str(err)
            raise UserError(f"cannot listen on {host}:{port} ({reason}); "
                            f"try another --port (0: any free one)") from None
        bound_host, bound_port = runner.addresses[0][:2]
        print(f"serving on http://{bound_host}:{bound_port}/ (Ctrl-C to stop)", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/cpu"),
                        help="a train output folder (classifier.onnx, else classifier.keras)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 opens it to your network")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    args = parser.parse_args(argv)
    runtime = predict.Runtime(args.model)
    try:
        asyncio.run(serve(make_app(runtime), args.host, args.port))
    except Interrupted:  # Ctrl-C is how a server is stopped: not an error
        print("stopped", flush=True)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>MNIST CNN: draw a digit</title>
<link rel="icon" href="data:,">
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
  main { display: flex; flex-wrap: wrap; gap: 2rem; align-items: flex-start; }
  canvas { border: 2px solid #444; border-radius: 6px; touch-action: none; cursor: crosshair; background: #fff; }
  button, label.upload { font-size: 1rem; padding: .4rem .9rem; margin: .5rem .5rem 0 0; cursor: pointer; }
  label.upload { border: 1px solid #767676; border-radius: 3px; background: #efefef; display: inline-block; }
  #digit { font-size: 4.5rem; font-weight: 700; min-height: 5.5rem; margin: 0; }
  #view { width: 112px; height: 112px; image-rendering: pixelated; border: 1px solid #999; background: #000; }
  .bar { display: flex; align-items: center; gap: .5rem; margin: 2px 0; font-variant-numeric: tabular-nums; }
  .bar span { width: 1rem; text-align: right; }
  .bar div { height: 1rem; background: #3b6fb6; }
  .bar.top div { background: #d9822b; }
  .bar em { font-style: normal; font-size: .85rem; color: #555; }
  #error { color: #b00020; min-height: 1.5rem; }
  small { color: #666; }
</style>
</head>
<body>
<h1>Draw a digit</h1>
<main>
  <section>
    <canvas id="pad" width="280" height="280" aria-label="drawing pad"></canvas><br>
    <button id="clear" type="button">Clear</button>
    <label class="upload">Upload an image<input id="file" type="file" accept="image/*" hidden></label>
    <p id="error" role="alert"></p>
  </section>
  <section>
    <p id="digit" aria-live="polite"></p>
    <div>the network saw:<br><img id="view" alt="the 28x28 image the network saw"></div>
  </section>
  <section id="bars" aria-label="probabilities"></section>
</main>
<p><small>The classifier answers with {{RUNTIME}}. A picture is prepared as <code>predict</code> does:
background removed, the digit cropped, fitted into 20x20 and centred by mass in 28x28.</small></p>
<script>
"use strict";
const pad = document.getElementById("pad"), ctx = pad.getContext("2d");
const digit = document.getElementById("digit"), view = document.getElementById("view");
const error = document.getElementById("error"), bars = document.getElementById("bars");
let drawing = false, dirty = false, busy = false, last = null, latest = 0;

for (let d = 0; d < 10; d++) {
  bars.insertAdjacentHTML("beforeend",
    `<div class="bar" id="bar${d}"><span>${d}</span><div style="width:0"></div><em></em></div>`);
}

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  digit.textContent = ""; error.textContent = ""; view.removeAttribute("src");
  show(null);
  latest++;  // an answer still on its way (or a drawing still being encoded) is for the pad just cleared: drop it
  dirty = false;  // and do not send that drawing again when it comes
}

function show(probabilities) {
  const top = probabilities ? probabilities.indexOf(Math.max(...probabilities)) : -1;
  for (let d = 0; d < 10; d++) {
    const p = probabilities ? probabilities[d] : 0, bar = document.getElementById("bar" + d);
    bar.className = d === top ? "bar top" : "bar";
    bar.children[1].style.width = (200 * p).toFixed(1) + "px";
    bar.children[2].textContent = probabilities ? (100 * p).toFixed(1) + " %" : "";
  }
}

async function classify(body, mine) {  // mine: the ticket taken when the request was made
  let result;
  try {
    result = await (await fetch("predict", {method: "POST", body: body})).json();
  } catch (e) {
    result = {error: "the server did not answer: " + e.message};
  }
  if (mine !== latest) return;
  if (result.error) {
    error.textContent = result.error; digit.textContent = ""; view.removeAttribute("src"); show(null);
  } else {
    error.textContent = ""; digit.textContent = result.digit; view.src = result.view; show(result.probabilities);
  }
}

function send() {  // one request at a time; the latest drawing goes when the last answer is in
  if (busy) { dirty = true; return; }
  busy = true; dirty = false;
  // The ticket is taken now, not when toBlob calls back: a clear or an upload in between must win over this drawing.
  const mine = ++latest;
  pad.toBlob(async blob => {
    await classify(blob, mine);
    busy = false;
    if (dirty) send();
  }, "image/png");
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

pad.addEventListener("pointerdown", event => {
  drawing = true; last = point(event); pad.setPointerCapture(event.pointerId);
  ctx.beginPath(); ctx.arc(last[0], last[1], 9, 0, 2 * Math.PI); ctx.fillStyle = "#000"; ctx.fill();
});
pad.addEventListener("pointermove", event => {
  if (!drawing) return;
  const here = point(event);
  ctx.strokeStyle = "#000"; ctx.lineWidth = 18; ctx.lineCap = "round"; ctx.lineJoin = "round";
  ctx.beginPath(); ctx.moveTo(last[0], last[1]); ctx.lineTo(here[0], here[1]); ctx.stroke();
  last = here;
  send();
});
for (const name of ["pointerup", "pointercancel"]) {
  pad.addEventListener(name, () => { if (drawing) { drawing = false; send(); } });
}
document.getElementById("clear").addEventListener("click", clearPad);
document.getElementById("file").addEventListener("change", async event => {
  const file = event.target.files[0];
  event.target.value = "";
  if (file) {
    clearPad();
    await classify(file, ++latest);
  }
});
clearPad();
</script>
</body>
</html>
"""


if __name__ == "__main__":
    run(main)
