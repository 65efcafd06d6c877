"""Every sampling option is declared once (ddpm.SamplingOptions, text2digit.Request) and reaches every front
end from there: a flag of sample.py, evaluate.py and serve.py, a field of the page's API body and a default
of /api/config, with the same name, default and error message (modulo spelling: --steps or steps).

Adding a field to the declaration without a row in BAD_VALUES fails here: a new option is one field plus
its bad value."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from fastapi.testclient import TestClient

import evaluate
import sample
import serve
from ddpm import DEFAULT_SAMPLING, GUIDED_STEPS, SamplingOptions
from ddpm.options import declared, to_json
from runtime.errors import UserError
from text2digit import InvalidRequest, Request, Text2Digit, flag, make_request, spelled
from training.config import TrainConfig

OPTIONS = [f.name for f, _ in declared(SamplingOptions)]
# A bad value of every declared field that has a rule: (field, its flag's words, its value, the message).
BAD_VALUES = [
    ("sampler", ["euler"], "euler", "sampler must be one of ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, got 'euler'"),
    ("steps", ["0"], 0, "steps must be at least 1, got 0"),
    ("guidance_scale", ["-1"], -1.0, "guidance_scale must be in [0, 30], got -1.0"),
    ("guidance_scale", ["31"], 31.0, "guidance_scale must be in [0, 30], got 31.0"),
    ("guidance_scale", ["nan"], math.nan, "guidance_scale must be in [0, 30], got nan"),  # not JSON: 422 from the API
    ("spacing", ["uniform"], "uniform", "spacing must be one of trailing, leading, linspace, got 'uniform'"),
    ("threshold", ["static"], "static", "threshold must be one of none, clip, dynamic, got 'static'"),
    ("eta", ["-1"], -1.0, "eta must be >= 0, got -1.0"),
    ("eta", ["0.5"], 0.5, "eta only applies to sampler ddim, not dpmpp_2m_sde; drop eta or use sampler ddim"),
    (
        "guidance_interval",
        ["3", "1"],
        (3.0, 1.0),
        "guidance_interval must be two noise levels 0 <= low < high, got 3 1",
    ),
    ("guidance_rescale", ["1.5"], 1.5, "guidance_rescale must be in [0, 1], got 1.5"),
    ("guidance_parallel", ["-0.5"], -0.5, "guidance_parallel must be in [0, 1], got -0.5"),
    ("num_samples", ["0"], 0, "num_samples must be at least 1, got 0"),
    ("seed", ["-1"], -1, "seed must be in [0, 9007199254740991], got -1"),
    ("seed", [str(2**53)], 2**53, "seed must be in [0, 9007199254740991], got 9007199254740992"),
    ("unknown_words", ["sometimes"], "sometimes", "unknown_words must be one of auto, drop, keep, got 'sometimes'"),
]
RULED = {f.name for cls in (Request, SamplingOptions) for f, rule in declared(cls) if rule.has_rule}
# Which front ends take which field: evaluate.py has its own num_samples (per digit and prompt set).
TAKES = {"sample.py": RULED, "serve.py": RULED, "evaluate.py": RULED - {"num_samples"}}
PARSE = {"sample.py": sample.parse_args, "evaluate.py": evaluate.parse_args, "serve.py": serve.parse_args}


class ModelOf1000Steps:
    """What serve's body asks of a pipeline: its check of a request, here for a guided model of 1000 timesteps,
    and its default steps."""

    def check(self, request: Request, max_images: int) -> list[str]:
        return request.validate(1000, max_images)

    def resolved(self, request: Request) -> Request:
        return dataclasses.replace(request, options=request.options.with_steps(GUIDED_STEPS))


PIPE = ModelOf1000Steps()


def flags_of(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def cli_error(script: str, argv: list[str]) -> str:
    prefix = ["--prompt", "3"] if script == "sample.py" else []
    with pytest.raises(UserError) as refused:
        PARSE[script]([*prefix, *argv])
    return str(refused.value)


def test_every_declared_field_with_a_rule_has_a_bad_value_here():
    assert {row[0] for row in BAD_VALUES} == RULED
    assert set(OPTIONS) <= RULED  # every sampling option has a rule


def test_every_option_is_a_flag_of_every_command_and_a_field_of_the_api():
    parsers = {
        "sample.py": sample.build_parser(),
        "serve.py": serve.build_parser(),
        "evaluate.py": evaluate.build_parser(),
    }
    for name in OPTIONS:
        for script, parser in parsers.items():
            assert f"--{name}" in flags_of(parser), (script, name)
        assert name in serve.GenerateBody.model_fields, name
    for name in ("num_samples", "seed", "negative_prompt", "allow_truncation"):
        assert f"--{name}" in flags_of(parsers["sample.py"]) and f"--{name}" in flags_of(parsers["serve.py"])
        assert name in serve.GenerateBody.model_fields, name


def test_every_front_end_starts_from_the_declared_defaults():
    assert sample.parse_args(["--prompt", "3"]).request == Request(("3",))
    assert evaluate.parse_args([]).options == [DEFAULT_SAMPLING]
    assert serve.parse_args([]).example == Request(("0",))
    assert serve.GenerateBody(prompt="3").to_request(PIPE) == Request(
        ("3",), options=SamplingOptions(steps=GUIDED_STEPS)
    )
    for f in dataclasses.fields(SamplingOptions):
        assert serve.GenerateBody.model_fields[f.name].default == to_json(f.default)


def test_every_option_set_by_every_front_end_is_the_same_options():
    options = SamplingOptions("ddim", 7, 2.5, "leading", "dynamic", 0.25, (0.5, math.inf), 0.7)
    words = ["--sampler", "ddim", "--steps", "7", "--spacing", "leading", "--threshold", "dynamic", "--eta", "0.25"]
    words += ["--guidance_interval", "0.5", "inf", "--guidance_rescale", "0.7"]
    assert sample.parse_args(["--prompt", "3", *words, "--guidance_scale", "2.5"]).request.options == options
    assert evaluate.parse_args([*words, "--guidance_scale", "2.5,3"]).options == [
        options,
        options.replace(guidance_scale=3.0),
    ]
    assert serve.parse_args([*words, "--guidance_scale", "2.5"]).example.options == options
    body = {f.name: to_json(getattr(options, f.name)) for f in dataclasses.fields(options)}
    assert serve.GenerateBody(prompt="3", **body).to_request(PIPE).options == options


@pytest.mark.parametrize("name,words,value,message", BAD_VALUES, ids=[f"{r[0]}-{r[1][0]}" for r in BAD_VALUES])
def test_a_bad_value_gets_the_same_message_everywhere(name, words, value, message):
    """The pipeline's error, spelled as each front end spells the field: --flags, or the API's names."""
    with pytest.raises(InvalidRequest) as refused:
        make_request("3", **{name: value})  # the Python pipeline: Text2Digit(...)("3", name=value)
    assert str(refused.value) == message and refused.value.field == name
    for script, takes in TAKES.items():
        if name in takes:
            assert cli_error(script, [f"--{name}", *words]) == refused.value.render(flag), script
    if not (isinstance(value, float) and math.isnan(value)):
        with pytest.raises(InvalidRequest) as from_api:
            serve.GenerateBody(prompt="3", **{name: to_json(value)}).to_request(PIPE)
        assert from_api.value.render(serve.api_name) == message and from_api.value.field == name


def test_the_model_bound_on_steps_is_the_same_everywhere():
    message = "steps 1001 exceeds the model's 1000 training timesteps; use at most 1000"
    with pytest.raises(InvalidRequest) as refused:
        serve.GenerateBody(prompt="3", steps=1001).to_request(PIPE)
    assert refused.value.render(serve.api_name) == message
    with pytest.raises(UserError, match=f"^--sample_{message}$"):  # train.py's flag for the same field
        TrainConfig(sample_steps=1001).validate()


def test_the_pages_config_holds_every_field_and_the_servers_flags_set_it(checkpoint):
    pipe = Text2Digit.from_checkpoint(checkpoint, device="cpu")
    declared_defaults = TestClient(serve.create_app(pipe)).get("/api/config").json()["defaults"]
    expected = {spelled(f.name): to_json(f.default) for cls in (Request, SamplingOptions) for f, _ in declared(cls)}
    expected["steps"] = GUIDED_STEPS  # left to the model by the declaration: a guided model's own
    assert declared_defaults == json.loads(json.dumps({k: v for k, v in expected.items() if k != "prompt"}))
    assert declared_defaults["guidance_interval"] == [2.0, None]  # JSON has no infinity: the open end is null
    args = serve.parse_args(["--steps", "5", "--sampler", "ddim", "--num_samples", "4"])
    client = TestClient(serve.create_app(pipe, defaults=args.defaults))
    defaults = client.get("/api/config").json()["defaults"]
    assert (defaults["steps"], defaults["sampler"], defaults["num_samples"]) == (5, "ddim", 4)
    with client, client.stream("POST", "/api/generate", json={"prompt": "1"}) as response:  # defaults served too
        events = list(serve.iter_events(response.iter_lines()))
    assert events[1] == ("start", {"steps": 5, "num_samples": 4}) and events[-1][0] == "done"
