"""serve: a local page to draw a digit on, or upload a picture of one, and see what the classifier reads.

    python -m tools.serve [--model models/cpu] [--host 127.0.0.1] [--port 8000]

Draw with the mouse or a finger: the answer and the ten probabilities update
as you draw. Upload a photo or scan: it is prepared exactly as `predict`
prepares it, and the 28x28 image the network saw is shown beside the answer.
Binds to this machine only (127.0.0.1) unless --host says otherwise; the
page needs nothing from the network. Uploads are read in memory, never
written to disk, within predict's limits (MAX_FILE_MB, MAX_PIXELS); a bad one
gets a one-line error on the page. Ctrl-C stops it.
A tool beside the pipeline, using what it made (aiohttp, a
dependency of DVC's, serves it).
"""

import argparse
import asyncio
import base64
import io
import os
from pathlib import Path


from mnist_cnn import vision
from mnist_cnn.errors import UserError
from mnist_cnn.inference import TrainedClassifier
from mnist_cnn.stage import Interrupted, run


def read_upload(classifier, data):
    """Image bytes -> {"digit", "probabilities", "view": the 28x28 PNG as a data URL}, or {"error": one line}."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return {"error": "the upload is empty"}
    if len(data) > vision.MAX_FILE_MB * 10**6:
        return {"error": f"{len(data) / 10**6:.0f} MB is over the limit of {vision.MAX_FILE_MB} MB"}
    try:
        gray = vision.read_image(io.BytesIO(data), name="the upload")
    except UserError as err:
        return {"error": str(err)}
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # SyntaxError: PIL's word for a broken PNG
        return {"error": f"not an image PIL can read ({type(err).__name__}); upload a PNG or JPEG"}
    except Exception as err:  # noqa: BLE001  (one bad upload must not stop the page)
        return {"error": vision.reading_failure(err)}
    try:
        image, no_digit = vision.to_mnist_or_none(gray)
        if image is None:
            return {"error": no_digit}
        pixels = vision.to_pixels(image[None])
        probabilities = classifier.predict(pixels)[0]
    except Exception as err:  # noqa: BLE001  (one bad picture must not stop the page)
        return {"error": vision.reading_failure(err)}
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, format="PNG")
    return {"digit": int(probabilities.argmax()), "probabilities": [round(float(p), 6) for p in probabilities],
            "view": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}


def make_app(classifier):
    from aiohttp import web

    async def page(request):
        return web.Response(text=PAGE.replace("{{RUNTIME}}", classifier.name), content_type="text/html")

    async def classify(request):
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": f"over the limit of {vision.MAX_FILE_MB} MB"}, status=413)
        result = await asyncio.get_running_loop().run_in_executor(None, read_upload, classifier, data)
        return web.json_response(result, status=400 if "error" in result else 200)

    app = web.Application(client_max_size=vision.MAX_FILE_MB * 10**6)
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
    classifier = TrainedClassifier(args.model)
    try:
        asyncio.run(serve(make_app(classifier), args.host, args.port))
    except Interrupted:  # Ctrl-C is how a server is stopped: not an error
        print("stopped", flush=True)


PAGE = (Path(__file__).parent / "serve.html").read_text()  # the page; {{RUNTIME}} names what answers


if __name__ == "__main__":
    run(main)
