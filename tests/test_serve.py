"""serve.py, the live prompt page: its API against an untrained tiny model in a real uvicorn server
(in this process, on a thread), its command line, and the page itself end to end in a real headless
Chromium against the shipped model (slow: real processes)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from bench.serve import running_server
from ddpm import DEFAULT_SAMPLING, SAMPLERS
from evaluation.judge import judge_images, load_judge
from models.checkpoint import PRETRAINED_DIR
from serve import (
    MAX_PENDING,
    MAX_WORK,
    WEB,
    GenerateBody,
    api_name,
    create_app,
    decode_images,
    iter_events,
    listening_socket,
    url_of,
)
from tests.helpers import PROCESS_ENV, ROOT, run_in_process
from text2digit import InvalidRequest, Text2Digit

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; never playwright's own download
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# the shipped student's sevens keep this share of their ink at most with the negative prompt "thick" (measured:
# 0.75-0.80 for 8 sevens in 2 steps, seeds 0-2)
INK_LEFT_BY_NEGATIVE_THICK = 0.9
TOO_LONG = "a thick wide handwritten 7 slanted left"  # 10 tokens with start and end, every word trained; 8 are read


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return Text2Digit.from_checkpoint(checkpoint, device="cpu")


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """``app`` in a real uvicorn server on a free port, on a thread of this process; yields its URL."""
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield url_of(sock)
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def url(pipe):
    with serving(create_app(pipe)) as address:
        yield address


def events(url: str, **body) -> list[tuple[str, dict]]:
    """Every (event, data) of one generation, read to its end."""
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return list(iter_events(response.iter_lines()))


def frames_and_result(stream: list[tuple[str, dict]]) -> tuple[list[dict], np.ndarray]:
    names = [name for name, _ in stream]
    assert names[:2] == ["queued", "start"] and names[-1] == "done", names
    frames = [data for name, data in stream if name == "frame"]
    assert len(frames) == len(names) - 3, names
    return frames, decode_images(stream[-1][1]["images"])


def status(url: str) -> dict:
    return httpx.get(f"{url}/api/status").json()


def test_the_page_and_its_settings_are_served(url, pipe):
    page = httpx.get(url)
    assert page.status_code == 200 and "app.js" in page.text and "style.css" in page.text
    config = httpx.get(f"{url}/api/config").json()
    assert config["samplers"] == list(SAMPLERS)
    assert config["defaults"]["steps"] == pipe.default_steps  # the declaration leaves them to the served model
    assert config["defaults"]["sampler"] == DEFAULT_SAMPLING.sampler
    assert config["defaults"]["guidance_scale"] == DEFAULT_SAMPLING.guidance_scale
    assert config["defaults"]["num_samples"] == 8
    limits = {"max_steps": 1000, "max_digits": 64, "max_work": MAX_WORK, "max_pending": MAX_PENDING}
    assert {name: config["limits"][name] for name in limits} == limits
    assert config["limits"]["ranges"]["seed"] == [0, 2**53 - 1]
    assert config["limits"]["ranges"]["guidance_scale"] == [0, 30]
    assert config["examples"] == pipe.model.vocabulary.examples()  # hints from the model's own vocabulary


@pytest.fixture(scope="module")
def sketch_url(pipe):
    """The tiny model's page with the shipped fast model sketching as the prompt is typed."""
    fast = Text2Digit.from_checkpoint(PRETRAINED_DIR / "fast.pt", device="cpu")
    with serving(create_app(pipe, sketch=fast)) as address:
        yield address


def test_the_fast_model_sketches_a_grid_in_its_own_steps(sketch_url):
    config = httpx.get(f"{sketch_url}/api/config").json()
    assert (
        config["sketch"]["steps"] == 2
        and "fast.pt, distilled from models/pretrained/mnist.pt" in config["sketch"]["model"]
        and config["sketch"]["negative_prompt"] is True  # the page sends it with each sketch
    )
    with httpx.stream("POST", f"{sketch_url}/api/sketch", json={"prompt": "7", "steps": 4}, timeout=60) as response:
        stream = list(iter_events(response.iter_lines()))
    frames, digits = frames_and_result(stream)
    assert [f["t"] for f in frames] == [999, 749, 499, 249]
    logits, _ = judge_images(load_judge(), digits.copy())
    assert (logits.argmax(1) == 7).sum() >= 6, logits.argmax(1)
    refused = httpx.post(f"{sketch_url}/api/sketch", json={"prompt": "7", "steps": 20})
    assert refused.status_code == 400 and "must be one of 1, 2, 4" in refused.json()["error"]


def test_without_a_fast_model_a_sketch_is_refused_in_one_line(url):
    assert httpx.get(f"{url}/api/config").json()["sketch"] is None
    refused = httpx.post(f"{url}/api/sketch", json={"prompt": "7", "steps": 4})
    assert refused.status_code == 404 and "--sketch_checkpoint" in refused.json()["error"]


def test_the_page_posts_only_fields_the_api_takes():
    script = (WEB / "app.js").read_text()
    numbers = re.search(r"NUMBER_FIELDS = \[(.*?)\]", script).group(1)
    body = re.search(r"function formBody\(\) \{\n  const body = \{(.*?)\};", script, re.S).group(1)
    posted = re.findall(r'"(\w+)"', numbers) + re.findall(r"^\s*(\w+):", body, re.M)
    assert len(posted) == 8 and set(posted) <= set(GenerateBody.model_fields), posted


def test_the_page_loads_nothing_from_elsewhere():
    for path in WEB.iterdir():
        text = path.read_text()
        assert not re.search(r"https?:|@import|url\(", text), f"{path.name} refers outside the server"


def test_a_frame_arrives_for_every_step(url):
    frames, images = frames_and_result(events(url, prompt="7", steps=5, num_samples=3, seed=4))
    assert [f["step"] for f in frames] == list(range(5))
    timesteps = [f["t"] for f in frames]
    assert timesteps == sorted(timesteps, reverse=True) and timesteps[0] == 999
    for frame in frames:
        assert decode_images(frame["x_t"]).shape == decode_images(frame["x0"]).shape == (3, 28, 28)
    assert images.shape == (3, 28, 28)
    assert np.array_equal(images, decode_images(frames[-1]["x0"]))  # the last step returns its x0 prediction


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"prompt": ""}, "prompt", "prompt is empty"),
        ({"prompt": "   "}, "prompt", "prompt is empty"),
        ({"prompt": TOO_LONG}, "prompt", "longer than the text encoder's 8 tokens"),
        ({"prompt": "7", "negative_prompt": TOO_LONG}, "negative_prompt", "longer than the text encoder's 8 tokens"),
        ({"prompt": "3 or 8"}, "prompt", "names 2 different digits (3, 8), and an image is one digit"),
        ({"prompt": "a cat"}, "prompt", "names no digit"),
        ({"prompt": "7", "steps": 0}, "steps", "steps must be at least 1"),
        ({"prompt": "7", "steps": 1001}, "steps", "exceeds the model's 1000 training timesteps"),
        ({"prompt": "7", "num_samples": 0}, "num_samples", "num_samples must be at least 1"),
        ({"prompt": "7", "num_samples": 65}, "num_samples", "num_samples must be at most 64"),
        ({"prompt": "7", "guidance_scale": -1}, "guidance_scale", "guidance_scale must be in [0, 30]"),
        ({"prompt": "7", "sampler": "euler"}, "sampler", "sampler must be one of ddpm, ddim, dpmpp_2m, dpmpp_2m_sde"),
        ({"prompt": "7", "seed": -1}, "seed", "seed must be in [0, 9007199254740991]"),
        ({"prompt": "7", "seed": 2**70}, "seed", "seed must be in [0, 9007199254740991], got 1180591620717411303424"),
        ({"prompt": "7", "guidance_scale": 1e308}, "guidance_scale", "guidance_scale must be in [0, 30], got 1e+308"),
        ({"prompt": "7", "steps": 1000, "num_samples": 9}, "steps", "num_samples x steps is 9000 digit-steps, more"),
        ({"prompt": "7", "guidance_interval": [3, 1]}, "guidance_interval", "two noise levels 0 <= low < high"),
        ({"prompt": "7", "eta": 0.5}, "eta", "eta only applies to sampler ddim, not dpmpp_2m_sde"),
    ],
)
def test_a_bad_request_gets_the_pipelines_message(url, pipe, body, field, fragment):
    response = httpx.post(f"{url}/api/generate", json=body)
    assert response.status_code == 400
    with pytest.raises(InvalidRequest) as refused:
        GenerateBody(**body).to_request(pipe)
    assert response.json() == {"error": refused.value.render(api_name), "field": field}
    assert fragment in response.json()["error"]


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"{not json", None),
        (b'{"prompt": "7", "steps": "20"}', "steps"),
        (b'{"prompt": 7}', "prompt"),
        (b'{"prompt": "7", "seed": 1.5}', "seed"),
        (b'{"prompt": "7", "guidance_scale": "8"}', "guidance_scale"),
        (b'{"prompt": "7", "guidance_scale": NaN}', "guidance_scale"),
        (b'{"steps": 20}', "prompt"),
        (b'{"prompt": "7", "step": 20}', "step"),
        (b'["7"]', None),
        (b"", None),
    ],
)
def test_a_malformed_request_gets_one_line_of_json_and_the_server_goes_on(url, content, field):
    response = httpx.post(f"{url}/api/generate", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    refusal = response.json()
    assert refusal["field"] == field and isinstance(refusal["error"], str)
    assert "\n" not in refusal["error"] and (field is None or refusal["error"].startswith(f"{field}: "))
    frames, _ = frames_and_result(events(url, prompt="1", steps=1, num_samples=1))
    assert len(frames) == 1


def test_concurrent_requests_get_only_their_own_frames(url, pipe):
    """A long request is running when a second one comes: the second queues behind it, and each stream
    holds its own steps of its own images, the very images the pipeline makes for it alone."""
    bodies = [
        {"prompt": "3", "steps": 80, "num_samples": 2, "seed": 1},
        {"prompt": "8", "steps": 3, "num_samples": 5, "seed": 2, "sampler": "ddim"},
    ]
    first_frame = threading.Event()

    def read_all(body):
        with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=60) as response:
            stream = []
            for name, data in iter_events(response.iter_lines()):
                stream.append((name, data))
                if name == "frame":
                    first_frame.set()
            return stream

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(read_all, bodies[0])
        assert first_frame.wait(30)
        second = events(url, **bodies[1])
        streams = [running.result(), second]
    assert second[0][1]["ahead"] == 1
    for body, stream in zip(bodies, streams):
        frames, images = frames_and_result(stream)
        assert [f["step"] for f in frames] == list(range(body["steps"]))
        assert all(decode_images(f["x_t"]).shape == (body["num_samples"], 28, 28) for f in frames)
        expected = pipe.generate(GenerateBody(**body).to_request(pipe))[0]
        assert np.abs(images.astype(int) - expected).max() <= 1


HEAVY = {"prompt": "5", "steps": 1000, "num_samples": MAX_WORK // 1000}  # the most work one request may ask


def test_a_client_that_leaves_frees_the_worker(url):
    before = status(url)
    with httpx.stream("POST", f"{url}/api/generate", json=HEAVY, timeout=60) as response:
        for name, _ in iter_events(response.iter_lines()):
            if name == "frame":
                break  # leave mid-generation: closing the response closes the connection
    left = time.monotonic()
    while (now := status(url))["cancelled"] == before["cancelled"]:
        assert time.monotonic() - left < 10, f"the generation went on after its client left: {now}"
        time.sleep(0.05)
    assert now["pending"] == 0 and now["served"] == before["served"]
    start = time.monotonic()
    frames, _ = frames_and_result(events(url, prompt="1", steps=2, num_samples=1))
    assert len(frames) == 2 and time.monotonic() - start < 10


def test_a_flood_is_turned_away_in_one_line_and_the_server_recovers(pipe):
    """Clients hold the queue full with the most work a request may ask; 20 more are each answered 503
    with Retry-After at once, more work than that, seeds and guidance out of range 400; once the holders
    leave, the queue drains and a request is served."""
    with serving(create_app(pipe, max_pending=2)) as url, contextlib.ExitStack() as holders:
        for _ in range(2):
            held = holders.enter_context(httpx.stream("POST", f"{url}/api/generate", json=HEAVY, timeout=60))
            assert held.status_code == 200
        assert status(url)["pending"] == 2
        turned_away = [httpx.post(f"{url}/api/generate", json=HEAVY) for _ in range(20)]
        # what no queue may take is refused as such, full queue or not: too much work, seeds and guidance out of range
        for body, field in [
            ({**HEAVY, "num_samples": HEAVY["num_samples"] + 1}, "steps"),
            ({"prompt": "5", "seed": 2**70}, "seed"),
            ({"prompt": "5", "guidance_scale": 1e308}, "guidance_scale"),
        ]:
            refused = httpx.post(f"{url}/api/generate", json=body)
            assert refused.status_code == 400 and refused.json()["field"] == field
        assert status(url)["pending"] == 2, "a holder finished during the flood: the test needs more work"
        for response in turned_away:
            refusal = response.json()
            assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
            assert refusal["field"] is None and "\n" not in refusal["error"]
            assert refusal["error"].startswith("the server is busy: 2 requests are queued or running")
            assert refusal["error"].endswith(f"retry in {response.headers['Retry-After']} s")
        holders.close()  # the clients leave
        left = time.monotonic()
        while (now := status(url))["pending"]:
            assert time.monotonic() - left < 10, f"the queue did not drain after its clients left: {now}"
            time.sleep(0.05)
        frames, _ = frames_and_result(events(url, prompt="1", steps=2, num_samples=1))
        assert len(frames) == 2


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--precision", "fp64"], "invalid choice: 'fp64'"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--port", "0", "--checkpoint", "no/such.pt"], "no/such.pt"),
        (["--port", "0", "--sketch_checkpoint", str(PRETRAINED_DIR / "cpu.pt")], "is not a distilled model"),
    ],
)
def test_bad_flags_are_one_error_line(tmp_path, flags, fragment):
    status_, stderr = run_in_process("serve.py", flags, {}, tmp_path)
    assert status_ == 2 and stderr.count("\n") == 1 and stderr.startswith("error: ") and fragment in stderr, stderr


@pytest.mark.slow
def test_a_busy_port_is_refused_in_one_line_before_the_model_loads():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "serve.py", "--port", str(port)],
            cwd=ROOT,
            env=PROCESS_ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2 and result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}: "), lines
    assert "address already in use" in lines[0] and "--port" in lines[0]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shipped_url():
    """python serve.py as a real process, with its default: the model that ships with the repository."""
    with running_server() as address:
        yield address


def served_steps(url: str) -> int:
    """The steps a request that names none is drawn in by the server at ``url`` (its model's own)."""
    return httpx.get(f"{url}/api/config").json()["defaults"]["steps"]


@pytest.fixture
def page(browser, shipped_url):
    """The page loaded, its settings in place, every request it makes recorded."""
    tab = browser.new_page()
    tab.requests = []
    tab.on("request", lambda request: tab.requests.append(request.url))
    tab.goto(shipped_url)
    tab.wait_for_function("document.getElementById('sampler').options.length > 0")
    yield tab
    tab.close()


def grid_digits(page, count: int) -> np.ndarray:
    """The downloadable PNG read back into uint8 [count, 28, 28], by the canvas's layout."""
    href = page.get_attribute("#download", "href")
    png = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))
    pixels = np.asarray(png.convert("RGB"))[..., 0]
    layout = {k: int(page.get_attribute("#grid", f"data-{k}")) for k in ("columns", "scale", "gap")}
    side, gap, scale = 28 * layout["scale"], layout["gap"], layout["scale"]
    origins = [
        (gap + (k // layout["columns"]) * (side + gap), gap + (k % layout["columns"]) * (side + gap))
        for k in range(count)
    ]
    return np.stack([pixels[y : y + side : scale, x : x + side : scale] for y, x in origins])


@pytest.mark.slow
def test_the_page_denoises_live_and_draws_the_prompted_digit(page, shipped_url):
    assert page.get_attribute("#prompt", "placeholder") == 'e.g. "7", "a thick 3" or "a handwritten eight"'
    page.fill("#prompt", "7")
    page.click("#generate")
    page.wait_for_function("document.getElementById('grid').dataset.state === 'done'", timeout=120_000)
    assert int(page.get_attribute("#grid", "data-frames")) >= served_steps(shipped_url)
    digits = grid_digits(page, 8)
    logits, _ = judge_images(load_judge(), digits)
    assert (logits.argmax(1) == 7).sum() >= 6, logits.argmax(1)
    assert all(u.startswith(shipped_url) or u.startswith("data:") for u in page.requests), page.requests


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [(TOO_LONG, "longer than the text encoder's 8 tokens"), ("", "is empty"), ("3 or 8", "names 2 different digits")],
)
def test_the_page_shows_why_a_prompt_is_refused(page, prompt, fragment):
    page.fill("#prompt", prompt)
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert fragment in page.inner_text("#error")
    assert page.get_attribute("#prompt", "aria-invalid") == "true"
    assert page.get_attribute("#grid", "data-state") == "error"


@pytest.mark.slow
def test_the_fast_model_sketches_again_with_the_negative_prompt_as_it_is_typed(page):
    """A negative prompt typed after the prompt goes with the next sketch, and the fast model reads it: the
    sevens sketched with the negative prompt "thick" carry less ink than the plain ones, from the same noise."""
    page.type("#prompt", "7")
    page.wait_for_function("document.getElementById('grid').dataset.sketches === '1'", timeout=60_000)
    plain = grid_digits(page, 8)
    with page.expect_request(lambda request: request.url.endswith("/api/sketch")) as sent:
        page.fill("#negative_prompt", "thick")
    assert json.loads(sent.value.post_data)["negative_prompt"] == "thick"
    page.wait_for_function("document.getElementById('grid').dataset.sketches === '2'", timeout=60_000)
    thinner = grid_digits(page, 8)
    assert thinner.mean() < INK_LEFT_BY_NEGATIVE_THICK * plain.mean(), (thinner.mean(), plain.mean())


@pytest.mark.slow
def test_the_page_draws_as_you_type_with_the_fast_model_and_only_the_last_keystroke_counts(page, shipped_url):
    """Typing "3", erasing it and typing "8" within the debounce makes one sketch, of eights, without a click;
    Generate then runs the served model's live denoising over it."""
    assert page.is_visible("#as_you_type") and page.is_checked("#as_you_type")
    page.type("#prompt", "3")
    page.press("#prompt", "Backspace")
    page.type("#prompt", "8")
    page.wait_for_function("document.getElementById('grid').dataset.state === 'sketched'", timeout=60_000)
    time.sleep(1.0)  # a stale sketch, had one been sent, would land by now
    assert page.get_attribute("#grid", "data-sketches") == "1" and "sketched in 2 passes" in page.inner_text("#status")
    logits, _ = judge_images(load_judge(), grid_digits(page, 8))
    assert (logits.argmax(1) == 8).sum() >= 6, logits.argmax(1)
    page.click("#generate")
    page.wait_for_function("document.getElementById('grid').dataset.state === 'done'", timeout=120_000)
    assert int(page.get_attribute("#grid", "data-frames")) >= served_steps(shipped_url)
