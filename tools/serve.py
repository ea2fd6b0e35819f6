"""serve: a local page to draw a digit on, or upload a picture of one, and see what the classifier reads.

    python -m tools.serve [--model models/cpu] [--host 127.0.0.1] [--port 8000]

Draw with the mouse or a finger: the answer and the ten probabilities update
as you draw. Upload a photo or scan: it is prepared exactly as `predict`
prepares it, and the 28x28 image the network saw is shown beside the answer.
Binds to this machine only (127.0.0.1) unless --host says otherwise; the
page needs nothing from the network. Uploads are read in memory, never
written to disk, within predict's limits (MAX_FILE_MB, MAX_PIXELS) and
formats (vision.FORMATS: no PostScript, EPS or PDF); a bad one gets a
one-line error, with no path or command in it. Safe to leave running on a
shared machine: another site's page cannot use it (Host, Origin and
Sec-Fetch-Site are checked, so a browser's cross-site request is refused
while `curl --data-binary @photo.jpg` works), and what clients can cost is
bounded (the limits below, BODY_TIMEOUT_S to MAX_CONNECTIONS): each failure is one
line on stderr. Ctrl-C stops it.
A tool beside the pipeline, using what it made (aiohttp, a
dependency of DVC's, serves it).
"""

import argparse
import asyncio
import base64
import io
import os
import resource
import signal
import sys
import time
from pathlib import Path


from mnist_cnn import vision
from mnist_cnn.errors import UserError, printable
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
        return {"error": vision.not_an_image(err)}
    except Exception as err:  # noqa: BLE001  (one bad upload must not stop the page)
        return {"error": vision.reading_failure(err, detail=False)}
    try:
        image, no_digit = vision.to_mnist_or_none(gray)
        if image is None:
            return {"error": no_digit}
        pixels = vision.to_pixels(image[None])
        probabilities = classifier.predict(pixels)[0]
    except Exception as err:  # noqa: BLE001  (one bad picture must not stop the page)
        return {"error": vision.reading_failure(err, detail=False)}
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, format="PNG")
    return {"digit": int(probabilities.argmax()), "probabilities": [round(float(p), 6) for p in probabilities],
            "view": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}


# What clients may cost the page, whatever they send (tests/test_serve.py holds it to these)
BODY_TIMEOUT_S = 30       # to send a whole upload; a client that stalls mid-body is answered 408
HEADER_TIMEOUT_S = 10     # to send a request's headers (aiohttp's keep-alive timer: an idle connection too)
IN_FLIGHT_MB = 4 * vision.MAX_FILE_MB  # upload bytes held at once; past it, 503 "busy" before reading
DECODERS = 2              # large pictures decoded at once (each up to a few hundred MB for a 50-megapixel PNG)
SMALL_PIXELS = 1_000_000  # a picture up to this many pixels (a drawing, a 28x28) is decoded in a lane of its
SMALL_DECODERS = 4        # own, so that it never waits behind large ones (a few MB each)
MAX_CONNECTIONS = 1024    # open at once; past it a connection is closed as it opens (file descriptors)


def allowed_hosts(host, port, extra=()):
    """The Host headers the page answers: its own names only, so that a DNS-rebinding page cannot reach it."""
    names = {"127.0.0.1", "localhost", "[::1]", host if ":" not in host else f"[{host}]", *extra}
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())


def refusal(request, hosts):
    """Why a request comes from where it may not (another site, a rebinding name), or None.

    A browser sends Sec-Fetch-Site and Origin with a cross-site POST, whatever its content type (a text/plain
    form needs no preflight): either refuses it. curl sends neither, and is let through.
    """
    if request.host not in hosts:
        return f"Host {printable(request.host)[:100]!s} is not this page's"
    if request.method != "POST":
        return None
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return "a request from another site"
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return f"a request from another origin ({printable(origin)[:100]})"
    return None


class Budget:
    """Bytes of uploads held at once: taken before a body is read, given back once it is decoded."""

    def __init__(self, limit):
        self.limit, self.held = limit, 0

    def take(self, n):
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n):
        self.held -= n


def log(request, status, why):
    """One line per failed request on stderr (never a traceback)."""
    remote = request.remote if request is not None else "-"
    print(f"{time.strftime('%H:%M:%S')} {remote} {status}: {printable(why)[:300]}", file=sys.stderr, flush=True)


def make_app(classifier, host="127.0.0.1", extra_hosts=()):
    """The page's aiohttp app; serve() notes the port it is bound to (the Host check needs it)."""
    from aiohttp import web

    budget = Budget(IN_FLIGHT_MB * 10**6)
    large, small = asyncio.Semaphore(DECODERS), asyncio.Semaphore(SMALL_DECODERS)
    limit = vision.MAX_FILE_MB * 10**6

    def failed(request, status, why):
        log(request, status, why)
        return web.json_response({"error": why}, status=status)

    @web.middleware
    async def same_site_only(request, handler):
        hosts = allowed_hosts(host, request.app["bound"]["port"], extra_hosts)
        why = refusal(request, hosts)
        if why:
            return failed(request, 403, f"refused: {why}; open the page itself, http://{sorted(hosts)[0]}/")
        return await handler(request)

    async def page(request):
        return web.Response(text=PAGE.replace("{{RUNTIME}}", classifier.name), content_type="text/html")

    async def classify(request):
        size = request.content_length if request.content_length is not None else limit  # chunked: the most
        if size > limit:
            return failed(request, 413, f"{size / 10**6:.0f} MB is over the limit of {vision.MAX_FILE_MB} MB")
        if not budget.take(size):
            return failed(request, 503, "busy: too many uploads at once; try again in a moment")
        try:
            try:
                data = await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
            except web.HTTPRequestEntityTooLarge:
                return failed(request, 413, f"over the limit of {vision.MAX_FILE_MB} MB")
            except TimeoutError:
                return failed(request, 408, f"the upload did not arrive within {BODY_TIMEOUT_S} s")
            pixels = vision.declared_pixels(data)  # from the header alone: which lane to decode it in
            async with (small if pixels is not None and pixels <= SMALL_PIXELS else large):
                result = await asyncio.get_running_loop().run_in_executor(None, read_upload, classifier, data)
            del data
        finally:
            budget.give(size)
        if "error" in result:
            return failed(request, 400, result["error"])
        return web.json_response(result)

    app = web.Application(client_max_size=limit, middlewares=[same_site_only])
    app["bound"] = {}  # the port, once the server is bound (the app is frozen by then: a dict it holds is not)
    app.add_routes([web.get("/", page), web.post("/predict", classify)])
    return app


class Limited:
    """One line for each failure of the server itself (not of a request), at most one a second for each kind:
    a flood of them (accept() out of file descriptors, a parser refusing garbage) must not fill the disk."""

    def __init__(self):
        self.last = {}

    def __call__(self, kind, why):
        now = time.monotonic()
        if now - self.last.get(kind, -1.0) >= 1.0:
            self.last[kind] = now
            log(None, "server", f"{kind}: {' '.join(str(why).split())[:200]}")


def quiet_loop_errors(loop, say):
    """asyncio's own errors, and aiohttp's logged ones (a request its parser refuses: 400 to the client), as
    one line each, never a traceback."""
    import logging

    def handler(loop, context):
        err = context.get("exception")
        say(type(err).__name__ if err else "asyncio", err or context.get("message"))

    class OneLine(logging.Handler):
        def emit(self, record):
            err = record.exc_info[1] if record.exc_info else None
            say(type(err).__name__ if err else record.name, err or record.getMessage())

    loop.set_exception_handler(handler)
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.internal", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [OneLine()], False


def connection_cap():
    """MAX_CONNECTIONS, lowered to what the file-descriptor limit allows once raised as far as it may be."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_CONNECTIONS + 64  # the process's own files, the model's, the executor's
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, min(MAX_CONNECTIONS, soft - 64))


class Refuse(asyncio.Protocol):
    """A connection past the cap: told 503 and closed as it opens."""

    def connection_made(self, transport):
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        transport.close()


async def serve(app, host, port):
    from aiohttp import web

    loop = asyncio.get_running_loop()
    quiet_loop_errors(loop, Limited())
    # Ctrl-C and SIGTERM end the wait below, in the loop's own time: a signal raised inside one of asyncio's
    # callbacks would reach its exception handler instead of stopping the server
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda signum=signum: stop.done() or stop.set_result(signum))
    # shutdown_timeout: Ctrl-C waits this long for requests in progress, not aiohttp's 60 s
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=HEADER_TIMEOUT_S, shutdown_timeout=2.0)
    await runner.setup()
    cap = connection_cap()

    def connection():  # aiohttp's protocol for each connection, up to the cap
        return runner.server() if len(runner.server.connections) < cap else Refuse()

    server = None
    try:
        try:
            server = await loop.create_server(connection, host, port, reuse_address=True, backlog=128)
        except OSError as err:
            reason = os.strerror(err.errno).lower() if err.errno else str(err)
            raise UserError(f"cannot listen on {host}:{port} ({reason}); "
                            f"try another --port (0: any free one)") from None
        bound_host, bound_port = server.sockets[0].getsockname()[:2]
        app["bound"]["port"] = bound_port
        print(f"serving on http://{bound_host}:{bound_port}/ (Ctrl-C to stop)", flush=True)
        raise Interrupted(signal.Signals(await stop))
    finally:
        if server is not None:
            server.close()
        await runner.cleanup()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/cpu"),
                        help="a train output folder (classifier.onnx, else classifier.keras)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 opens it to your network")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="another name the page may be reached by (the machine's, with --host 0.0.0.0)")
    args = parser.parse_args(argv)
    classifier = TrainedClassifier(args.model)
    try:
        asyncio.run(serve(make_app(classifier, args.host, args.allow_host), args.host, args.port))
    except Interrupted:  # Ctrl-C is how a server is stopped: not an error
        print("stopped", flush=True)


PAGE = (Path(__file__).parent / "serve.html").read_text()  # the page; {{RUNTIME}} names what answers


if __name__ == "__main__":
    run(main)
