"""A live prompt page: type a prompt, watch the digits denoise step by step, download the grid.

    python serve.py                                   # http://127.0.0.1:8000; the model: models.checkpoint.find_model
    python serve.py --port 8080 --checkpoint outputs/cpu/checkpoints/checkpoint_epoch_0004.pt
    python serve.py --port 0                          # any free port (the printed line names it)
    python serve.py --steps 10 --sampler ddim         # the page's defaults: every sampling option is a flag

The models are loaded once; requests for either queue for one worker thread that samples them one at a time, in
order of arrival. The API (the page in web/ is its only client, but any HTTP client will do):

- ``GET /api/config``: the samplers, the defaults of every body field (serve.py's flags set them), the
  limits and the model, as JSON.
- ``POST /api/sketch``: the same body and events, drawn by the fast model (``--sketch_checkpoint``, a
  distilled one; the page sends its step count, ``sketch.steps`` of ``/api/config``): the page's grid while
  the prompt is typed. 404 without a fast model (``--no_sketch``).
- ``GET /api/status``: the worker's counts: ``pending`` (queued or running), ``served``, ``cancelled``, ``failed``.
- ``POST /api/generate`` with a JSON object (:class:`Body`: ``prompt`` is required; the other fields are
  the pipeline's request and sampling options, under the names sample.py's flags have) answers with
  server-sent events, each ``data`` one JSON object:
  ``queued`` {job, ahead} at once; ``start`` {steps, num_samples} when the worker takes it;
  ``frame`` {step, t, x_t, x0} after every network call; then ``done`` {seconds, images} or
  ``error`` {error}. Images are base64 of raw uint8 [num_samples, 28, 28], 0 black, 255 white.
  A bad request is refused before any event, with status 400 (the pipeline's own checks, the ranges
  of ``/api/config``, and more than ``MAX_WORK`` digits x steps) or 422 (not JSON, wrong types, missing
  or unknown fields), and a full queue (``MAX_PENDING`` requests queued or running) with 503 and a
  ``Retry-After`` header; each with a JSON body {"error": one line, "field": name or null}.

A client that disconnects has its generation stopped at the next step (the step callback raises),
and the worker moves on to the next request.
"""

import asyncio
import base64
import itertools
import json
import logging
import math
import queue
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, get_origin

import numpy as np
import torch
import uvicorn
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, create_model

from ddpm import SAMPLERS, SamplingOptions
from ddpm.options import OutOfRange, add_flags, declared, field_type, flag_values, from_json, refused_as, to_json
from models.checkpoint import PRETRAINED_DIR, add_model_flags, find_model
from runtime.devices import PRECISION_HELP, PRECISIONS
from runtime.errors import UserError, run_cli
from runtime.flags import CliParser
from text2digit import InvalidRequest, Request, Text2Digit, flag, make_request, spelled

ROOT = Path(__file__).resolve().parent
WEB = ROOT / "web"
MAX_DIGITS = 64  # per request
# digits x steps of one request: 8 digits at the most steps of a 1000-step model, or 64 at 125; on the
# 2-core AVX2 machine about 12 s with the quick-start model (1.5 ms a digit-step) and a minute or two with
# the seed's, so that one request cannot hold the page for long
MAX_WORK = 8000
MAX_PENDING = 8  # requests queued or running; one more is answered 503 with Retry-After
# The page's sketch as you type: its request leaves this long after a keystroke, so that a paste or a key held
# down makes one (people type 50 ms or more apart, so every keystroke of theirs gets its own grid), and any
# keystroke cancels the sketch in flight. It is drawn in SKETCH_STEPS passes where the fast model has them: at 2
# the shipped student scores as at 4 (docs/distillation.md) in half the time; otherwise in its most.
SKETCH_DELAY_MS = 10
SKETCH_STEPS = 2
FINAL_EVENTS = ("done", "error")
log = logging.getLogger("text2digit.serve")


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Body(BaseModel):
    """The JSON body of ``POST /api/generate`` (the page's form): a prompt, and the other fields of the
    pipeline's Request and SamplingOptions under their own names (:func:`body_model` makes it from them).
    Strict: "20" is not a number, and unknown fields are refused, so a typo never silently falls back to a
    default. An interval's open end is null in JSON (which has no infinity): ``"guidance_interval": [2, null]``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def to_request(self, pipe: Text2Digit) -> Request:
        """The pipeline's request, checked by its rules, the model's and the page's limits (InvalidRequest
        otherwise)."""
        values = {FIELDS[name]: from_json(value) for name, value in self.model_dump().items()}
        request = pipe.resolved(make_request(**values))
        pipe.check(request, max_images=MAX_DIGITS)
        check_work(request)
        return request


def api_type(cls: type, name: str) -> Any:
    """The strict JSON type of field ``name`` of ``cls``: numbers finite, a pair's second item null for inf."""
    kind, optional = field_type(cls, name)
    if kind is float:
        kind = FiniteFloat
    elif get_origin(kind) is tuple:  # a JSON array (strict would take only Python tuples); its items stay strict
        kind = Annotated[tuple[FiniteFloat, FiniteFloat | None], Field(strict=False)]
    return kind | None if optional else kind


def body_model(defaults: Mapping[str, Any] | None = None) -> type[Body]:
    """The API body, made from the declaration (text2digit.Request and ddpm.SamplingOptions); ``defaults``
    (by field name) replace declared defaults: serve.py's flags set the page's."""
    fields: dict[str, Any] = {}
    for cls in (Request, SamplingOptions):
        for f, rule in declared(cls):
            if f.name == "prompts":  # required, and one at a time: the page draws one prompt's grid
                fields[spelled(f.name)] = (str, Field(description=rule.help))
            else:
                default = to_json((defaults or {}).get(f.name, f.default))
                fields[spelled(f.name)] = (api_type(cls, f.name), Field(default, description=rule.help))
    return create_model("GenerateBody", __base__=Body, **fields)


FIELDS = {spelled(f.name): f.name for cls in (Request, SamplingOptions) for f, _ in declared(cls)}
GenerateBody = body_model()  # with the declared defaults
api_name = spelled  # a pipeline parameter as the API spells it (messages name the field to fix)


def encode_images(images: np.ndarray) -> str:
    """uint8 images as base64 of their raw bytes: the page decodes them straight into canvas pixels."""
    return base64.b64encode(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).decode("ascii")


def decode_images(text: str, size: int = 28) -> np.ndarray:
    """The inverse of :func:`encode_images`: uint8 [N, size, size]."""
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(-1, size, size)


def iter_events(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) of a server-sent event stream given line by line (for clients in Python:
    the benchmark and the tests); comments (keep-alive pings) are skipped."""
    event, data = "message", []
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


class Cancelled(Exception):
    """Raised by the step callback to stop a generation nobody waits for any more."""


class Busy(Exception):
    """The queue holds as many requests as it may: come back in ``retry_after`` seconds."""

    def __init__(self, pending: int, retry_after: int):
        self.retry_after = retry_after
        super().__init__(
            f"the server is busy: {pending} requests are queued or running, the most it takes; retry in {retry_after} s"
        )


def work_of(request: Request) -> int:
    """What a request costs, in digit-steps: every image it draws times the steps of each."""
    return request.num_samples * len(request.prompts) * request.options.steps


def check_work(request: Request) -> None:
    """Raise OutOfRange if the request asks more than MAX_WORK digit-steps of the server."""
    if work_of(request) > MAX_WORK:
        raise OutOfRange(
            "steps",
            "{num_samples} x {steps} is {work} digit-steps, more than the {most} one request may ask of "
            "this server; ask for fewer digits or fewer steps",
            work=work_of(request),
            most=MAX_WORK,
        )


@dataclass
class Job:
    """One request on its way through the queue, and the events its stream is to send."""

    id: int
    request: Request
    loop: asyncio.AbstractEventLoop
    pipe: Text2Digit  # the model that draws it: the page's, or the fast one that sketches as you type
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ahead: int = 0  # jobs queued or running when it was queued

    def emit(self, event: str, **data: object) -> None:
        """Hand an event to the stream; called from the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, ServerSentEvent(event=event, data=data))


class Worker:
    """Samples the queued jobs one at a time, in order, on one thread, so that two requests never
    share the model at once and each stream gets only its own frames."""

    def __init__(self, threads: int = 0, max_pending: int = MAX_PENDING):
        self.threads, self.max_pending = threads, max_pending
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.closing = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter(pending=0, served=0, cancelled=0, failed=0)
        self.pending_work = 0  # digit-steps of the jobs queued or running
        self.seconds_per_work = 0.01  # of the last job served (a guess until then), for Retry-After
        self.thread = threading.Thread(target=self._run, name="text2digit-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop at the next step of the running job; queued ones are dropped."""
        self.closing.set()
        self.jobs.put(None)
        self.thread.join()

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many jobs are ahead of it (queued or running). Raises Busy when
        ``max_pending`` are, with the time the queue takes to finish one of them, on average, at the
        speed of the last job served."""
        with self.lock:
            ahead = self.counts["pending"]
            if ahead >= self.max_pending:
                raise Busy(ahead, math.ceil(self.pending_work * self.seconds_per_work / ahead))
            self.counts["pending"] += 1
            self.pending_work += work_of(job.request)
        self.jobs.put(job)
        return ahead

    def status(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def _run(self) -> None:
        if self.threads:  # set on this thread, the one whose torch calls use them
            torch.set_num_threads(self.threads)
        while (job := self.jobs.get()) is not None:
            start = time.perf_counter()
            outcome = self._generate(job)
            with self.lock:
                self.counts["pending"] -= 1
                self.counts[outcome] += 1
                self.pending_work -= work_of(job.request)
                if outcome == "served":
                    self.seconds_per_work = (time.perf_counter() - start) / work_of(job.request)

    def _generate(self, job: Job) -> str:
        """Sample one job, streaming its steps; returns its outcome (a key of ``counts``)."""
        if job.cancelled.is_set() or self.closing.is_set():
            return "cancelled"
        job.emit("start", steps=job.request.options.steps, num_samples=job.request.num_samples)
        start = time.perf_counter()
        try:
            images = job.pipe.generate(job.request, callback=lambda *step: self._step(job, *step))
        except Cancelled:
            return "cancelled"
        except Exception as err:  # this request fails (a bug, memory); the server goes on with the next
            log.exception("generation %d failed", job.id)
            job.emit("error", error=f"generation failed: {type(err).__name__}: {err}")
            return "failed"
        job.emit("done", seconds=round(time.perf_counter() - start, 3), images=encode_images(images[0]))
        return "served"

    def _step(self, job: Job, i: int, t: int, x_t: np.ndarray, x0: np.ndarray) -> None:
        if job.cancelled.is_set() or self.closing.is_set():
            raise Cancelled
        job.emit("frame", step=i, t=int(t), x_t=encode_images(x_t), x0=encode_images(x0))


def describe(pipe: Text2Digit) -> str:
    """The model in a few words: its file (relative to the repository when inside it), epoch, its guide
    (autoguidance), precision, device."""
    guide = "" if pipe.guide is None else f", guided by {shown_path(pipe.guide.path)}"
    precision = "bf16" if pipe.bf16 else "fp32"
    made = (
        f"distilled from {pipe.model.distillation['teacher']}"
        if pipe.model.distillation
        else f"epoch {pipe.model.epoch}"
    )
    return f"{shown_path(pipe.model.path)}, {made}{guide}, {precision} on {pipe.device}"


def sketch_steps(sketch: Text2Digit) -> int:
    """The steps the page's sketches take: SKETCH_STEPS when the distilled model samples in that many, else
    its most."""
    counts = sketch.model.distillation["student_steps"]
    return SKETCH_STEPS if SKETCH_STEPS in counts else max(counts)


def shown_path(path: Path) -> Path:
    """``path`` relative to the repository when inside it."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def page_config(pipe: Text2Digit, body: type[Body], max_pending: int, sketch: Text2Digit | None) -> dict:
    """What the page builds its form from: choices, defaults (every field of the API body but the prompt),
    limits, and the fast model that sketches as you type (null: none)."""
    defaults = {name: f.default for name, f in body.model_fields.items() if not f.is_required()}
    return {
        "model": describe(pipe),
        "sketch": None
        if sketch is None
        else {
            "model": describe(sketch),
            "steps": sketch_steps(sketch),
            "delay_ms": SKETCH_DELAY_MS,
            "negative_prompt": sketch.reads_negative_prompt,  # older students take none: the page leaves it out
        },
        "examples": pipe.model.vocabulary.examples(),  # the page's hint: wordings the model was trained on
        "samplers": list(SAMPLERS),
        "defaults": defaults,
        "limits": {
            "max_steps": pipe.model.diffusion.num_train_timesteps,
            "max_digits": MAX_DIGITS,
            "max_work": MAX_WORK,  # digits x steps
            "max_pending": max_pending,  # requests queued or running; beyond, 503 with Retry-After
            "ranges": declared_ranges(),
        },
    }


def declared_ranges() -> dict[str, list[float | None]]:
    """[low, high] (null: open) of every bounded numeric field of the API body, from its declaration."""
    return {
        spelled(f.name): [rule.low, rule.high]
        for cls in (Request, SamplingOptions)
        for f, rule in declared(cls)
        if rule.low is not None or rule.high is not None
    }


def refusal(message: str, field_name: str | None, status: int) -> JSONResponse:
    return JSONResponse({"error": message, "field": field_name}, status_code=status)


async def invalid_request(_, err: InvalidRequest) -> JSONResponse:
    return refusal(err.render(api_name), api_name(err.field), 400)


async def busy(_, err: Busy) -> JSONResponse:
    response = refusal(str(err), None, 503)
    response.headers["Retry-After"] = str(err.retry_after)
    return response


async def malformed_request(_, err: RequestValidationError) -> JSONResponse:
    """FastAPI's list of validation errors as one line, naming the first."""
    errors = err.errors()
    first = errors[0]
    name = ".".join(str(part) for part in first["loc"][1:]) or None  # loc starts with "body"
    if first["type"] == "json_invalid":
        message, name = "the request body is not valid JSON", None  # loc: the character position
    elif name is None:  # no body, or not an object
        message = 'the request body must be a JSON object, e.g. {"prompt": "7"}'
    else:
        message = f"{name}: {first['msg']}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return refusal(message + more, name, 422)


async def stream(job: Job) -> AsyncIterator[ServerSentEvent]:
    """A queued job's events, to its last; the job is cancelled however the stream ends (finished, or the
    client went away)."""
    try:
        yield ServerSentEvent(event="queued", data={"job": job.id, "ahead": job.ahead})
        while (event := await job.events.get()).event not in FINAL_EVENTS:
            yield event
        yield event
    finally:
        job.cancelled.set()


class NoSketch(Exception):
    """``POST /api/sketch`` to a server started without a fast model."""


async def no_sketch(_, err: NoSketch) -> JSONResponse:
    return refusal("this server has no fast model to sketch with; start it with --sketch_checkpoint", None, 404)


def create_app(
    pipe: Text2Digit,
    threads: int = 0,
    defaults: Mapping[str, Any] | None = None,
    max_pending: int = MAX_PENDING,
    sketch: Text2Digit | None = None,
) -> FastAPI:
    """The page and its API around a loaded pipeline; ``threads`` (0: leave torch's setting) for sampling;
    ``defaults`` (by field name) those of the API body and the page's form, where not the declared ones;
    ``max_pending`` requests queued or running at most; ``sketch``, a distilled model that draws the grid
    while the prompt is typed (``POST /api/sketch``)."""
    worker = Worker(threads, max_pending)
    defaults = dict(defaults or {})
    if defaults.get("steps") is None:  # the served model's own: its form shows the steps it samples in
        defaults["steps"] = pipe.default_steps
    body = body_model(defaults)
    config = page_config(pipe, body, max_pending, sketch)
    job_ids = itertools.count(1)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="text2digit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_exception_handler(InvalidRequest, invalid_request)
    app.add_exception_handler(RequestValidationError, malformed_request)
    app.add_exception_handler(Busy, busy)
    app.add_exception_handler(NoSketch, no_sketch)

    def enqueue(body: Body, model: Text2Digit) -> Job:
        job = Job(next(job_ids), body.to_request(model), asyncio.get_running_loop(), model)
        job.ahead = worker.submit(job)
        return job

    async def queued(body: body) -> Job:  # this app's body: annotations evaluate here
        """The request, checked and queued, as a dependency: it runs, and may refuse (400, 503), before
        the event stream opens."""
        return enqueue(body, pipe)

    async def sketched(body: body) -> Job:
        """The same for the fast model; 404 (one line of JSON) when the server has none."""
        if sketch is None:
            raise NoSketch()
        return enqueue(body, sketch)

    @app.get("/api/config")
    def get_config() -> dict:
        return config

    @app.get("/api/status")
    def get_status() -> dict[str, int]:
        return worker.status()

    @app.post("/api/generate", response_class=EventSourceResponse)
    async def generate(job: Annotated[Job, Depends(queued)]) -> AsyncIterator[ServerSentEvent]:
        async for event in stream(job):
            yield event

    @app.post("/api/sketch", response_class=EventSourceResponse)
    async def sketch_grid(job: Annotated[Job, Depends(sketched)]) -> AsyncIterator[ServerSentEvent]:
        async for event in stream(job):
            yield event

    app.mount("/", StaticFiles(directory=WEB, html=True), name="page")
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, made before the model loads: a busy port is refused
    at once, and nothing can take the port in the seconds the loading takes."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535 (0: any free port), got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host!r} is not an address this machine knows ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port}: {err.strerror.lower() if err.strerror else err}; "
            "stop what holds it or choose another port with --port (0: any free one)"
        ) from None
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def build_parser() -> CliParser:
    p = CliParser(prog="serve.py", description=__doc__.split("\n\n")[0])
    add_flags(p, Request, skip=("prompts",))  # the page's defaults: --num_samples, --seed, ...
    add_flags(p, SamplingOptions)  # --sampler, --steps, --guidance_scale, ...
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    add_model_flags(p)
    p.add_argument(
        "--sketch_checkpoint",
        type=Path,
        default=PRETRAINED_DIR / "fast.pt",
        help="a distilled model (distill.py) that draws the grid while the prompt is typed (default: the shipped "
        "one); --no_sketch for none",
    )
    p.add_argument("--no_sketch", action="store_true", help="no drawing as you type: only the model's live denoising")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for sampling (0: torch's default, one per core). 1 leaves a core to the server "
        "and the browser, and keeps a step fast when other work shares the CPU",
    )
    return p


def parse_args(argv: list[str]):
    """The flags; the page's defaults they set are checked as a request would be, before any work."""
    args = build_parser().parse_args(argv)
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    args.defaults = {**flag_values(args, Request, skip=("prompts",)), **flag_values(args, SamplingOptions)}
    with refused_as(flag):
        args.example = make_request("0", **args.defaults)  # the page's defaults with a prompt
        args.example.validate(max_images=MAX_DIGITS)
        if args.example.options.steps is not None:  # steps left to the model are checked once it is loaded
            check_work(args.example)
    return args


def load_sketch(args) -> Text2Digit:
    """The fast model of ``--sketch_checkpoint``; UserError unless it is a distilled one."""
    sketch = Text2Digit.from_checkpoint(args.sketch_checkpoint, args.device, args.precision)
    if not sketch.model.distillation:
        raise UserError(
            f"--sketch_checkpoint {args.sketch_checkpoint} is not a distilled model; make one with distill.py, "
            "or pass --no_sketch"
        )
    return sketch


def main() -> None:
    args = parse_args(sys.argv[1:])
    sock = listening_socket(args.host, args.port)
    sketch = None if args.no_sketch else load_sketch(args)  # the small model first: refused before the big one
    path = find_model(args.checkpoint, args.output_dir)
    pipe = Text2Digit.from_checkpoint(path, args.device, args.precision, guide=args.guide_checkpoint)
    with refused_as(flag):
        pipe.check(args.example, MAX_DIGITS)
        check_work(pipe.resolved(args.example))
    app = create_app(pipe, args.threads, args.defaults, sketch=sketch)
    sketching = "" if sketch is None else f"; sketches as you type: {describe(sketch)}"
    print(f"serving text2digit on {url_of(sock)} (model: {describe(pipe)}{sketching})", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    run_cli(main)
