"""Serve protocol without a server: body parsing, limits, seeds, auth, deployment options."""

from __future__ import annotations

import json
import os

import pytest

from sdray.config import SdrayConfig, config_from_dict
from sdray.errors import ConfigError
from sdray.requests import SEED_LIMIT
from sdray.serve import build_app
from sdray.serve.auth import api_key_digests, check_authorization, key_digest
from sdray.serve.protocol import (
    RANDOM_SEED_LIMIT,
    ApiError,
    GenerateRequest,
    ImagesGenerationRequest,
    check_model,
    generate_request,
    image_seeds,
    images_requests,
    parse_body,
    parse_size,
)
from sdray.serve.server import (
    GRACEFUL_SHUTDOWN_MARGIN_S,
    HAPROXY_ENV,
    ServeAppArgs,
    deployment_options,
    http_options,
    prepare_ingress,
    resolve_device,
)

CONFIG = config_from_dict(
    {
        "generation": {"width": 64, "height": 64, "steps": 2, "max_steps": 50, "max_width": 256},
        "serve": {"max_n": 3, "max_prompt_chars": 20},
    }
)


def images(body: dict) -> list:
    parsed = parse_body(json.dumps(body).encode(), ImagesGenerationRequest)
    return images_requests(parsed, CONFIG.generation, CONFIG.serve)


def error_of(call, *args) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args)
    return caught.value


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"", None, "invalid_json"),
        (b"\xff\xfe", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (b"{}", "prompt", "missing_parameter"),
        (b'{"prompt": null}', "prompt", "invalid_type"),
        (b'{"prompt": 3}', "prompt", "invalid_type"),
        (b'{"prompt": "a", "n": "2"}', "n", "invalid_type"),
        (b'{"prompt": "a", "n": 2.0}', "n", "invalid_type"),
        (b'{"prompt": "a", "n": true}', "n", "invalid_type"),
        (b'{"prompt": "a", "seed": "1"}', "seed", "invalid_type"),
        (b'{"prompt": "a", "guidance_scale": "7"}', "guidance_scale", "invalid_type"),
        (b'{"prompt": "a", "response_format": "png"}', "response_format", "invalid_value"),
        (b'{"prompt": "a", "qualty": "hd"}', "qualty", "unknown_parameter"),
        (b'{"prompt": "a", "seed": ' + b"1" * 5000 + b"}", None, "invalid_json"),  # past int()
    ],
)
def test_bad_bodies_are_400s_naming_the_parameter(raw, param, code):
    error = error_of(parse_body, raw, ImagesGenerationRequest)
    assert (error.status, error.param, error.code) == (400, param, code)
    body = error.body()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    if param:
        assert param in body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "   "}, 400, "prompt"),
        ({"prompt": "x" * 21}, 400, "prompt"),
        ({"prompt": "a", "negative_prompt": "x" * 21}, 400, "negative_prompt"),
        ({"prompt": "a", "n": 0}, 400, "n"),
        ({"prompt": "a", "n": 4}, 400, "n"),
        ({"prompt": "a", "size": "65x64"}, 400, "size"),
        ({"prompt": "a", "size": "64x0"}, 400, "size"),
        ({"prompt": "a", "size": "512x64"}, 400, "size"),
        ({"prompt": "a", "size": "64"}, 400, "size"),
        ({"prompt": "a", "size": "64x64x3"}, 400, "size"),
        ({"prompt": "a", "steps": 0}, 400, "steps"),
        ({"prompt": "a", "steps": 51}, 400, "steps"),
        ({"prompt": "a", "seed": -1}, 400, "seed"),
        ({"prompt": "a", "seed": SEED_LIMIT}, 400, "seed"),
        ({"prompt": "a", "guidance_scale": -1}, 400, "guidance_scale"),
        ({"prompt": "a", "scheduler": "nope"}, 400, "scheduler"),
        ({"prompt": "a", "response_format": "url"}, 400, "response_format"),
    ],
)
def test_limits_from_the_config(body, status, param):
    error = error_of(images, body)
    assert (error.status, error.param) == (status, param)
    assert error.body()["error"]["param"] == param


def test_defaults_come_from_the_config():
    (request,) = images({"prompt": "a cat"})
    generation = CONFIG.generation
    assert (request.width, request.height) == (generation.width, generation.height)
    assert (request.steps, request.scheduler) == (generation.steps, generation.scheduler)
    assert request.guidance_scale == generation.guidance_scale
    assert request.negative_prompt == ""
    (request,) = images({"prompt": "a cat", "size": "auto"})
    assert (request.width, request.height) == (64, 64)


def test_openai_fields_sdray_cannot_honour_are_accepted_and_ignored():
    body = {"prompt": "a", "seed": 5, "quality": "hd", "style": "vivid", "user": "u1"}
    strip = [(r.seed, r.steps, r.width, r.prompt) for r in images(body)]
    assert strip == [
        (r.seed, r.steps, r.width, r.prompt) for r in images({"prompt": "a", "seed": 5})
    ]


def test_images_request_expands_n_with_consecutive_seeds():
    requests = images(
        {"prompt": "a", "n": 3, "seed": 10, "size": "128x64", "steps": 3, "scheduler": "euler"}
    )
    assert [r.seed for r in requests] == [10, 11, 12]
    assert {(r.width, r.height, r.steps, r.scheduler) for r in requests} == {(128, 64, 3, "euler")}
    assert len({r.id for r in requests}) == 3


def test_seed_derivation_wraps_and_random_seeds_are_reported_in_range():
    assert image_seeds(SEED_LIMIT - 1, 3) == [SEED_LIMIT - 1, 0, 1]
    seeds = image_seeds(None, 3)
    assert 0 <= seeds[0] < RANDOM_SEED_LIMIT
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]


def test_size_parsing():
    assert parse_size("640x480", CONFIG.generation) == (640, 480)
    assert parse_size(None, CONFIG.generation) == (64, 64)
    assert error_of(parse_size, "big", CONFIG.generation).param == "size"


def test_generate_request_names_width_and_height():
    def one(body):
        return generate_request(
            parse_body(json.dumps(body).encode(), GenerateRequest), CONFIG.generation, CONFIG.serve
        )

    assert one({"prompt": "a", "seed": 5, "width": 72}).width == 72
    assert error_of(one, {"prompt": "a", "width": 65}).param == "width"
    assert error_of(one, {"prompt": "a", "height": 4096}).param == "height"
    assert error_of(one, {"prompt": "a", "n": 2}).param == "n"  # one image only


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (rb'{"prompt": "\ud800"}', "prompt"),
        (rb'{"prompt": "a", "negative_prompt": "b\udc00"}', "negative_prompt"),
        (rb'{"prompt": "a", "scheduler": "\ud800"}', "scheduler"),
        (rb'{"prompt": "a", "extra": {"nested": ["\udfff"]}}', "extra"),
    ],
)
def test_text_that_utf8_cannot_encode_is_a_400_naming_the_parameter(raw, param):
    error = error_of(parse_body, raw, ImagesGenerationRequest)
    assert (error.status, error.param, error.code) == (400, param, "invalid_value")
    json.dumps(error.body(), ensure_ascii=False).encode("utf-8")  # the error body is sendable


def test_prompts_are_checked_for_unicode_also_without_parse_body():
    body = ImagesGenerationRequest(prompt="a", negative_prompt="\ud800")
    error = error_of(images_requests, body, CONFIG.generation, CONFIG.serve)
    assert (error.status, error.param) == (400, "negative_prompt")
    (request,) = images({"prompt": "caf\u00e9 \U0001f600"})
    assert request.prompt == "caf\u00e9 \U0001f600"


def test_unknown_model_is_404():
    check_model(None, "tiny")
    check_model("tiny", "tiny")
    error = error_of(check_model, "gpt-image-1", "tiny")
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")


def test_api_keys_parse_into_digests_only():
    digests = api_key_digests(" sk-one, ,sk-two,sk-one ")
    assert digests == tuple(sorted({key_digest("sk-one"), key_digest("sk-two")}))
    assert "sk-one" not in "".join(digests)


@pytest.mark.parametrize("value", ["", " ", ",", " , ,", "\t,\n"])
def test_api_keys_set_but_empty_are_refused(value, monkeypatch):
    with pytest.raises(ConfigError, match="SDRAY_API_KEYS is set but holds no API key"):
        api_key_digests(value)
    monkeypatch.setenv("SDRAY_API_KEYS", value)
    with pytest.raises(ConfigError, match="unset it to serve without auth"):
        api_key_digests()
    with pytest.raises(ConfigError):
        build_app({"config": {"serve": {"max_n": 2}}})


def test_api_keys_unset_means_open_and_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("SDRAY_API_KEYS", raising=False)
    assert api_key_digests() == ()
    monkeypatch.setenv("SDRAY_API_KEYS", "sk-env")
    assert api_key_digests() == (key_digest("sk-env"),)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("Bearer", "missing_api_key"),
        ("Basic c2stb25lOg==", "missing_api_key"),
        ("Bearer sk-wrong", "invalid_api_key"),
        ("Bearer sk-one-but-longer", "invalid_api_key"),
    ],
)
def test_bad_authorization_is_401(header, code):
    digests = api_key_digests("sk-one,sk-two")
    error = error_of(check_authorization, header, digests)
    assert (error.status, error.code) == (401, code)
    assert "WWW-Authenticate" in error.headers


def test_good_authorization_and_open_mode():
    digests = api_key_digests("sk-one,sk-two")
    check_authorization("Bearer sk-one", digests)
    check_authorization("bearer sk-two", digests)
    check_authorization(None, ())


def test_deployment_options_map_the_serve_config():
    config = config_from_dict(
        {
            "serve": {
                "min_replicas": 0,
                "max_replicas": 3,
                "target_ongoing_requests": 1.5,
                "upscale_delay_s": 2,
                "downscale_delay_s": 30,
                "look_back_period_s": 5,
                "max_ongoing_requests": 6,
                "max_queued_requests": 12,
                "overload_status_code": 429,
                "retry_after_s": 3,
                "num_cpus_per_replica": 0.25,
            }
        }
    )
    options = deployment_options(config, "cpu")
    assert options["ray_actor_options"] == {"num_cpus": 0.25}
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 3,
        "target_ongoing_requests": 1.5,
        "upscale_delay_s": 2,
        "downscale_delay_s": 30,
        "look_back_period_s": 5,
    }
    assert options["max_ongoing_requests"] == 6
    assert options["max_queued_requests"] == 12
    # Stopping replicas wait for requests that may run up to request_timeout_s, plus a margin.
    assert options["graceful_shutdown_timeout_s"] == 120.0 + GRACEFUL_SHUTDOWN_MARGIN_S
    assert GRACEFUL_SHUTDOWN_MARGIN_S > 0
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": 3}
    assert deployment_options(config, "cuda")["ray_actor_options"] == {
        "num_cpus": 0.25,
        "num_gpus": 1.0,
    }
    # The testing switch: replicas reserve a GPU each while the engine runs on CPU.
    config.model.reserve_gpus_on_cpu = True
    assert deployment_options(config, "cpu")["ray_actor_options"] == {
        "num_cpus": 0.25,
        "num_gpus": 1.0,
    }
    assert http_options(config, "0.0.0.0", 9000) == {
        "host": "0.0.0.0",
        "port": 9000,
        "request_timeout_s": 120.0,
    }


def test_serve_options_are_valid_for_ray_serve():
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    from sdray.serve.app import ImageService

    config = config_from_dict({"serve": {"request_timeout_s": 300}})
    options = deployment_options(config, "cpu")
    AutoscalingConfig(**options["autoscaling_config"])
    BackpressureConfig(**options["backpressure_config"])
    deployed = ImageService.options(**options)._deployment_config
    assert deployed.graceful_shutdown_timeout_s == 300 + GRACEFUL_SHUTDOWN_MARGIN_S
    assert deployed.max_ongoing_requests == config.serve.max_ongoing_requests


def test_device_auto_without_a_cluster_is_cpu_and_explicit_device_wins():
    import ray

    assert resolve_device(config_from_dict({"model": {"device": "cuda"}})) == "cuda"
    assert resolve_device(config_from_dict({"model": {"device": "cpu"}})) == "cpu"
    if not ray.is_initialized():
        assert resolve_device(config_from_dict({"model": {"device": "auto"}})) == "cpu"


def test_serve_config_checks():
    with pytest.raises(ConfigError, match="min_replicas"):
        config_from_dict({"serve": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="max_queued_requests"):
        config_from_dict({"serve": {"max_queued_requests": 0}})
    with pytest.raises(ConfigError, match="overload_status_code"):
        config_from_dict({"serve": {"overload_status_code": 500}})


def test_app_builder_args_are_checked():
    assert ServeAppArgs.model_validate({}).config is None
    args = ServeAppArgs.model_validate({"config": {"serve": {"max_n": 2}}, "overrides": ["a=b"]})
    assert args.config == {"serve": {"max_n": 2}}
    with pytest.raises(ValueError, match="extra"):
        ServeAppArgs.model_validate({"confg": "x.yaml"})


def reachable_model(args: dict) -> dict:
    """The app's args with the embedded model: building the app checks the model's files,
    and the GPU config's model lives in a bucket this test cannot reach."""
    return {**args, "overrides": [*args.get("overrides", []), "model.source=tiny"]}


@pytest.mark.parametrize("name", ["serve.yaml", "serve-gpu.yaml"])
def test_serve_config_files_build_the_app(name):
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[2] / "configs" / name
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "sdray.serve:build_app"
    built = build_app(reachable_model(app.args))
    config = SdrayConfig.model_validate(built._bound_deployment.init_args[0])
    options = built._bound_deployment.ray_actor_options
    assert schema.http_options.request_timeout_s == config.serve.request_timeout_s
    assert ("num_gpus" in options) == (config.model.device == "cuda")


def test_the_kuberay_service_serves_the_gpu_config_and_fits_its_worker_group():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[2]
    service = yaml.safe_load((root / "infra" / "kuberay" / "rayservice.yaml").read_text())
    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = schema.applications
    gpu_file = yaml.safe_load((root / "configs" / "serve-gpu.yaml").read_text())
    assert app.args == gpu_file["applications"][0]["args"]  # one config, kept in two places
    built = build_app(reachable_model(app.args))
    config = SdrayConfig.model_validate(built._bound_deployment.init_args[0])
    assert config.serve.max_replicas > 1
    assert schema.http_options.request_timeout_s == config.serve.request_timeout_s

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    per_worker = int(limits["nvidia.com/gpu"]) // config.serve.num_gpus_per_replica
    assert config.serve.num_cpus_per_replica <= float(limits["cpu"])
    assert group["minReplicas"] * per_worker >= config.serve.min_replicas
    assert group["maxReplicas"] * per_worker == config.serve.max_replicas
    grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= config.serve.request_timeout_s + GRACEFUL_SHUTDOWN_MARGIN_S


def test_serve_and_batch_never_import_each_other_and_serve_loads_torch_lazily():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "sdray"

    def imported(package: str) -> set[str]:
        names = set()
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names.add(node.module)
                elif isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
        return names

    assert not any(name.startswith("sdray.batch") for name in imported("serve"))
    assert not any(name.startswith("sdray.serve") for name in imported("batch"))
    code = "import sys, sdray.serve, sdray.serve.app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_haproxy_ingress_is_set_up_before_a_local_ray_and_refused_on_an_unprepared_cluster(
    monkeypatch,
):
    import ray

    from sdray.errors import SdrayError

    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    prepare_ingress(config_from_dict({}))  # the Python proxy: nothing to set
    assert HAPROXY_ENV not in os.environ
    haproxy = config_from_dict({"serve": {"ingress": "haproxy"}})
    prepare_ingress(haproxy)  # a local Ray started next inherits it
    assert os.environ[HAPROXY_ENV] == "1"
    # A running cluster keeps the environment it was started with: say how to prepare it.
    monkeypatch.delenv(HAPROXY_ENV)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(SdrayError, match=f"start Ray on every node with {HAPROXY_ENV}=1"):
        prepare_ingress(haproxy)
    monkeypatch.setenv(HAPROXY_ENV, "1")
    prepare_ingress(haproxy)


def test_an_app_built_for_haproxy_without_it_is_refused_not_served_by_the_proxy(monkeypatch):
    """`serve run` / `serve deploy` build the app directly: the ingress setting is not ignored."""
    from sdray.errors import SdrayError

    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    with pytest.raises(SdrayError, match=f"{HAPROXY_ENV}=1 is not set where the app is built"):
        build_app({"config": {"serve": {"ingress": "haproxy"}}})
