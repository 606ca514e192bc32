"""One request object: the CLI, the Python API and the jobs a worker receives agree on every field's default and
range, because each is defined once (tasks/schemas.py types, tasks/families.py defaults, tasks/request.py)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from darkroom.cli import build_parser, request_from_args
from darkroom.prompts import load_prompts
from darkroom.submit import BatchPlan, expand_jobs
from tasks.errors import InvalidRequest
from tasks.families import COMMON_DEFAULTS, FAMILY_RULES, family_rules
from tasks.models import ModelRef
from tasks.request import GenerationRequest
from tasks.schemas import GenerateJob, ItemRequest, Limits

REF = ModelRef(name="m", precision="fp16", fingerprint="f" * 16, family="sd", width=64, height=96, scheduler="ddim")


def _cli(*flags: str, prompts: str = "prompts.txt") -> GenerationRequest:
    return request_from_args(build_parser().parse_args(["submit", prompts, "--model", "m", *flags]))


def _jobs(request: GenerationRequest, ref: ModelRef = REF) -> list[GenerateJob]:
    parsed = load_prompts(list(request.prompts) if not isinstance(request.prompts, (str, Path)) else [])
    plan = BatchPlan(request, ref, family_rules(ref.family), "b1", 7)
    return expand_jobs(plan, parsed.items, {}, Limits())


def test_the_cli_and_the_python_api_build_the_same_request() -> None:
    assert _cli() == GenerationRequest.build("prompts.txt", model="m")
    flags = ["--steps", "9", "--guidance", "3.5", "--width", "128", "--height", "64", "--seed", "5",
             "--negative-prompt", "blur", "--images-per-prompt", "2", "--scheduler", "Euler-A", "--device", "GPU.0",
             "--precision", "int8", "--batch-id", "night-1", "--queue", "q", "--skip-invalid",
             "--long-prompts", "truncate", "--watermark", "dr", "--strength", "0.5", "--init-image", "x.png"]
    python = GenerationRequest.build(
        "prompts.txt", model="m", steps=9, guidance=3.5, width=128, height=64, seed=5, negative_prompt="blur",
        images_per_prompt=2, scheduler="euler-a", device="GPU.0", precision="int8", batch_id="night-1", queue="q",
        skip_invalid=True, long_prompts="truncate", watermark="dr", strength=0.5, init_image="x.png")
    assert _cli(*flags) == python
    # A request rebuilt with overrides is the request built with those values at once.
    assert GenerationRequest.build(python, steps=12) == python.model_copy(update={"steps": 12})


def test_a_flag_left_out_takes_the_same_default_everywhere() -> None:
    cli, api = _cli(), GenerationRequest.build("prompts.txt", model="m")
    for name, field in GenerationRequest.model_fields.items():
        assert getattr(cli, name) == getattr(api, name) == (field.default if name not in ("model", "prompts")
                                                            else getattr(api, name)), name
    job = _jobs(GenerationRequest.build(["a cat"], model="m"))[0]
    # Common defaults, then the model's manifest (size, scheduler): nothing else decides a default.
    assert (job.steps, job.guidance, job.negative_prompt) == (COMMON_DEFAULTS["steps"], COMMON_DEFAULTS["guidance"],
                                                             COMMON_DEFAULTS["negative_prompt"])
    assert (job.width, job.height, job.scheduler) == (REF.width, REF.height, REF.scheduler)
    assert job.controlnet_scale == COMMON_DEFAULTS["controlnet_scale"] == GenerateJob.model_fields[
        "controlnet_scale"].default
    assert job.strength == COMMON_DEFAULTS["strength"] == GenerateJob.model_fields["strength"].default
    assert (job.device, job.long_prompts) == (GenerationRequest.model_fields["device"].default,
                                              GenerationRequest.model_fields["long_prompts"].default)
    assert job.prior_steps is None and job.prior_guidance is None


def test_the_item_beats_the_request_which_beats_the_manifest_and_the_family() -> None:
    request = GenerationRequest.build(["a cat", {"prompt": "a dog", "steps": 3, "width": 32}], model="m", steps=9,
                                      scheduler="unipc", images_per_prompt=2)
    cat, cat2, dog, dog2 = _jobs(request)
    assert (cat.steps, cat.width, cat.height, cat.scheduler) == (9, REF.width, REF.height, "unipc")
    assert (dog.steps, dog.width, dog.scheduler) == (3, 32, "unipc")
    assert [j.index for j in (cat, cat2, dog, dog2)] == [0, 1, 2, 3] and len({cat.seed, cat2.seed}) == 2
    wuerstchen = ModelRef("w", "fp16", "e" * 16, "wuerstchen", 1024, 1024, "ddpm-wuerstchen")
    job = _jobs(GenerationRequest.build(["a cat"], model="w", prior_steps=5), wuerstchen)[0]
    defaults = FAMILY_RULES["wuerstchen"].defaults
    assert (job.steps, job.guidance, job.prior_steps, job.prior_guidance) == (
        defaults["steps"], defaults["guidance"], 5, defaults["prior_guidance"])


def test_ranges_are_those_of_the_shared_field_types() -> None:
    # The same value is refused, naming the same field, by the request, by an item of a prompt file and by a job.
    for name, bad in (("steps", 0), ("guidance", float("nan")), ("seed", 2**63), ("width", 4), ("strength", 1.5),
                      ("controlnet_scale", 6.0), ("images_per_prompt", 0)):
        with pytest.raises(InvalidRequest) as request_error:
            GenerationRequest.build(["a"], model="m", **{name: bad})
        assert request_error.value.field == name
        parsed = load_prompts([{"prompt": "a", name: bad}])
        assert [p.field for p in parsed.problems] == [name]
        if name in GenerateJob.model_fields:
            good = _jobs(GenerationRequest.build(["a"], model="m"))[0].model_dump()
            with pytest.raises(ValueError, match=name):
                GenerateJob.model_validate({**good, name: bad})
    assert set(ItemRequest.model_fields) - {"prompt"} <= set(GenerationRequest.model_fields)


def test_no_function_of_the_producer_path_takes_more_than_eight_parameters() -> None:
    # darkroom.submit is both a module and, in the package, the function it defines: import the modules by name.
    modules = [importlib.import_module(f"darkroom.{name}") for name in (
        "submit", "batches", "control", "init_images", "prompts", "tokens", "convert", "cli", "calibration")]
    wide = []
    for module in modules:
        for name, func in inspect.getmembers(module, inspect.isfunction):
            if func.__module__ == module.__name__ and len(inspect.signature(func).parameters) > 8:
                wide.append(f"{module.__name__}.{name}")
    assert wide == []
    submit_params = inspect.signature(modules[0].submit).parameters
    assert list(submit_params)[:1] == ["request"] and "overrides" in submit_params
