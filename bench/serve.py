"""Serving benchmark: how soon a client sees its first frame and its finished grid, alone and with
concurrent clients, against a real ``python serve.py`` process on a free port. A benchmark, not a test.

    python -m bench.serve                                   # the shipped model at its steps, 8 digits
    python -m bench.serve --clients 4 --requests 5 --checkpoint outputs/cpu/checkpoints/checkpoint_epoch_0002.pt

Each request is timed from just before it is sent: to its first ``frame`` event (the first step's
image, what the page draws first) and to its ``done`` event (the finished grid). One untimed request
first warms the server up. Alone: --requests requests one after another. Concurrent: --clients
clients at once, each sending --requests requests back to back; the server samples one at a time,
so their latencies include the wait in its queue.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from ddpm import DEFAULT_SAMPLING, SAMPLERS
from runtime.devices import PRECISION_HELP, PRECISIONS
from runtime.errors import UserError, run_cli
from runtime.flags import CliParser, require_positive
from serve import iter_events

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"first frame": 0.3, "grid done": 1.5}  # seconds after submit, one client, 20 steps of 8 digits
TYPED = ("7 thin and slanted left", "3, bold please")  # every prefix names its digit: the page sketches each


@contextlib.contextmanager
def running_server(*flags: str) -> Iterator[str]:
    """``python serve.py --port 0 FLAGS`` for the duration of the block; yields the address it prints."""
    proc = subprocess.Popen(
        [sys.executable, "serve.py", "--port", "0", *flags], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and the port listens
        if not line.startswith("serving text2digit on "):
            raise UserError(f"serve.py exited with status {proc.wait()} before serving; see its error above")
        yield line.split()[3]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@dataclass(frozen=True)
class Timing:
    first_frame: float  # seconds from sending the request
    done: float
    frames: int


def timed_request(client: httpx.Client, url: str, body: dict, endpoint: str = "generate") -> Timing:
    """Send one request to ``/api/ENDPOINT`` and time its stream; raise if it does not end with its grid."""
    start = time.perf_counter()
    first, frames = None, 0
    with client.stream("POST", f"{url}/api/{endpoint}", json=body) as response:
        if response.status_code != 200:
            raise UserError(f"the server refused the request: {response.read().decode()}")
        for event, data in iter_events(response.iter_lines()):
            if event == "frame":
                frames += 1
                if first is None:
                    first = time.perf_counter() - start
            elif event == "error":
                raise UserError(f"the server failed the request: {data['error']}")
            elif event == "done":
                return Timing(first, time.perf_counter() - start, frames)
    raise UserError("the stream ended before its done event")


def client_run(url: str, body: dict, requests: int, endpoint: str = "generate") -> list[Timing]:
    """One client sending ``requests`` requests back to back."""
    with httpx.Client(timeout=600) as client:
        return [timed_request(client, url, body, endpoint) for _ in range(requests)]


def sketch_row(url: str, num_samples: int) -> str | None:
    """The fast model's row (None when the server has none): the page's sketches while TYPED is typed, one
    request per keystroke (each prefix from its digit on), timed from the request, and the keystroke-to-grid
    median (the page's pause after a keystroke, ``sketch.delay_ms`` of /api/config, then the request). Each
    prompt is new to the server's text-token cache once, as when one types; a prefix ending in a half-typed
    word reads as the prefix before it (the random text tower's reader drops unknown words), as on the page."""
    sketch = httpx.get(f"{url}/api/config").json()["sketch"]
    if sketch is None:
        return None
    body = {"prompt": "0", "steps": sketch["steps"], "num_samples": num_samples}
    client_run(url, body, 1, "sketch")  # its own warm-up
    timings, start = [], time.perf_counter()
    with httpx.Client(timeout=600) as client:
        for phrase in TYPED:
            for end in range(1, len(phrase) + 1):
                timings.append(timed_request(client, url, {**body, "prompt": phrase[:end]}, "sketch"))
    row = table_row(f"as you type: the fast model, {sketch['steps']} steps", timings, time.perf_counter() - start)
    keystroke = sketch["delay_ms"] / 1000 + np.median([t.done for t in timings])
    pause = f"{sketch['delay_ms']} ms pause, then the request; {len(timings)} keystrokes typing {' / '.join(TYPED)}"
    return f"{row}\n\nkeystroke to a sketched grid, p50: {keystroke:.3f} s ({pause})"


def concurrent_runs(url: str, body: dict, clients: int, requests: int) -> list[Timing]:
    with ThreadPoolExecutor(clients) as pool:
        runs = pool.map(lambda _: client_run(url, body, requests), range(clients))
        return [timing for run in runs for timing in run]


def table_row(scenario: str, timings: list[Timing], seconds: float) -> str:
    """A Markdown row: p50 / p95 / max of the first frame and the finished grid, and grids per second."""

    def spread(values: list[float]) -> str:
        p50, p95 = np.percentile(values, [50, 95])
        return f"{p50:.3f} / {p95:.3f} / {max(values):.3f}"

    first = spread([t.first_frame for t in timings])
    done = spread([t.done for t in timings])
    return f"| {scenario} | {len(timings)} | {first} | {done} | {len(timings) / seconds:.2f} |"


def parse_args(argv: list[str]):
    p = CliParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: the shipped model)")
    p.add_argument("--steps", type=int, help="steps per request (default: the served model's own)")
    p.add_argument("--num_samples", type=int, default=8, help="digits per request")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLING.sampler)
    p.add_argument("--requests", type=int, default=10, help="timed requests per client")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients of the second run")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    p.add_argument("--threads", type=int, default=1, help="serve.py --threads (0: torch's default)")
    args = p.parse_args(argv)
    require_positive(args, ("num_samples", "requests", "clients"))
    if args.steps is not None:
        require_positive(args, ("steps",))
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    flags = ["--precision", args.precision, "--threads", str(args.threads)]
    flags += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    with running_server(*flags) as url:
        args.steps = args.steps or httpx.get(f"{url}/api/config").json()["defaults"]["steps"]
        body = {"prompt": "7", "steps": args.steps, "num_samples": args.num_samples, "sampler": args.sampler}
        client_run(url, body, 1)  # warm-up: first-call allocations, the tokenizer's caches
        start = time.perf_counter()
        alone = client_run(url, body, args.requests)
        rows = [table_row("1 client", alone, time.perf_counter() - start)]
        start = time.perf_counter()
        together = concurrent_runs(url, body, args.clients, args.requests)
        rows.append(table_row(f"{args.clients} clients at once", together, time.perf_counter() - start))
        rows += [row] if (row := sketch_row(url, args.num_samples)) else []
    wrong = [t.frames for t in alone + together if t.frames != args.steps]
    if wrong:
        raise UserError(f"a request streamed {wrong[0]} frames, not one per step ({args.steps})")
    print(
        f"serve.py ({args.precision}, --threads {args.threads}): {args.num_samples} digits, {args.steps} steps of "
        f"{args.sampler} per request; seconds from submit, p50 / p95 / max"
    )
    print("\n| clients | requests | first frame | grid done | grids/s |\n|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    targets = ", ".join(f"{name} <= {seconds} s" for name, seconds in TARGETS.items())
    print(f"\ntargets (1 client, 20 steps of 8 digits): {targets}")


if __name__ == "__main__":
    run_cli(main)
