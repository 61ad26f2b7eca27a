"""Train the embedded tiny model on the synthetic world: the VAE first, then the UNet together
with the text encoder on the VAE's latents. `pipelines/train_tiny.py` runs `train`.

Plain PyTorch on diffusers/transformers classes, so the result is an ordinary diffusers
directory (`StableDiffusionPipeline.from_pretrained` loads it). Seeded; CPU is enough.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdray.quality import world


@dataclass
class TrainSettings:
    """Every knob of a training run (recorded beside the weights)."""

    seed: int = 0
    threads: int = 1  # more threads on a shared machine spin against other work (10x slower)
    scenes: int = 30_000  # pictures drawn once (training triples only); captions vary per use
    vae_steps: int = 3_000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_crop: int = 32  # most VAE steps train on crops (4x cheaper than full size)
    vae_crop_fraction: float = 0.9  # ... this fraction of them; the rest at full size
    vae_object_weight: float = 5.0  # the shape's pixels count this much more than background
    kl_weight: float = 1e-4  # per pixel, against a mean absolute (L1) reconstruction loss
    unet_steps: int = 10_000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # empty caption: what classifier-free guidance contrasts with
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023)
    ema_decay: float = 0.999
    eval_prompts: int = 72
    log_every: int = 100
    checkpoint_every: int = 1000  # UNet steps between snapshots of the model (0: none)


def _cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def draw_scenes(count: int, seed: int) -> tuple[list[world.Scene], np.ndarray]:
    """`count` training scenes and their pictures (N x 64 x 64 x 3 uint8)."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, held_out=False) for _ in range(count)]
    return scenes, np.stack([world.render(s) for s in scenes])


def _to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _object_crops(
    images: np.ndarray, scenes: list[world.Scene], size: int, generator
) -> np.ndarray:
    """A `size`-pixel crop of each picture that holds its shape (on the 8-pixel latent grid),
    so no step is spent on plain background."""
    crops = []
    limit = world.IMAGE_SIZE - size
    for image, scene in zip(images, scenes, strict=True):
        top, left = (
            int(np.clip(round((c - size / 2 + generator.uniform(-6, 6)) / 8) * 8, 0, limit))
            for c in (scene.y, scene.x)
        )
        crops.append(image[top : top + size, left : left + size])
    return np.stack(crops)


def train_vae(
    images: np.ndarray, scenes: list[world.Scene], s: TrainSettings, log: Callable[[str], None]
):
    """An AutoencoderKL (8x down, 4 channels) trained to reconstruct the pictures.

    The loss weighs the shape's pixels `vae_object_weight` times more than the background's:
    the shape is a few percent of the picture, yet its colour and outline are what matter.
    """
    import torch
    from diffusers import AutoencoderKL

    from sdray.models.tiny import VAE_CONFIG

    torch.manual_seed(s.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    generator = np.random.default_rng(s.seed)
    history, running, started = [], [], time.perf_counter()
    for step in range(s.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, s.vae_steps, s.warmup_steps, s.vae_lr)
        index = generator.integers(0, len(images), s.vae_batch)
        batch, batch_scenes = images[index], [scenes[i] for i in index]
        backgrounds = np.array([world.BACKGROUNDS[sc.background] for sc in batch_scenes])
        if step < s.vae_steps * s.vae_crop_fraction and s.vae_crop < world.IMAGE_SIZE:
            batch = _object_crops(batch, batch_scenes, s.vae_crop, generator)
        x = _to_tensor(batch)
        shape_pixels = np.abs(batch - backgrounds[:, None, None, :]).sum(-1) > 30
        weight = torch.from_numpy(1 + (s.vae_object_weight - 1) * shape_pixels)[:, None].float()
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = ((reconstruction - x).abs() * weight).mean() / weight.mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + s.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        running.append((l1.item(), kl.item()))
        if (step + 1) % s.log_every == 0 or step + 1 == s.vae_steps:
            l1_mean, kl_mean = np.mean(running, axis=0)
            history.append({"step": step + 1, "l1": float(l1_mean), "kl": float(kl_mean)})
            log(
                f"vae  {step + 1:>6}/{s.vae_steps}  weighted l1 {l1_mean:.4f}  "
                f"kl/pixel {kl_mean:.3f}  {time.perf_counter() - started:.0f}s"
            )
            running = []
    return vae.eval().requires_grad_(False), history


def encode_latents(vae, images: np.ndarray, chunk: int = 256):
    """The VAE posterior (mean, std) of every picture, and its reconstruction PSNR (dB)."""
    import torch

    means, stds, errors = [], [], []
    with torch.inference_mode():
        for start in range(0, len(images), chunk):
            x = _to_tensor(images[start : start + chunk])
            posterior = vae.encode(x).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            if start == 0:
                decoded = vae.decode(posterior.mean).sample.clamp(-1, 1)
                errors.append(((decoded - x) ** 2).mean().item())
    psnr = 10 * math.log10(4 / float(np.mean(errors)))  # pixel range 2 ([-1, 1])
    return torch.cat(means), torch.cat(stds), psnr


def reconstruction_accuracy(vae, count: int = 200, seed: int = 1) -> dict[str, float]:
    """The scorer's accuracy on the VAE's reconstructions of fresh renders: the ceiling of what
    the whole model can reach."""
    import torch

    from sdray.quality.scorer import Spec, accuracy, score

    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, held_out=None) for _ in range(count)]
    x = _to_tensor(np.stack([world.render(sc) for sc in scenes]))
    with torch.inference_mode():
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    pixels = ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return accuracy(
        score(image, Spec(sc.colour, sc.shape, sc.position, sc.size, sc.background))
        for image, sc in zip(pixels, scenes, strict=True)
    )


def train_unet(
    scenes: list[world.Scene],
    means,
    stds,
    scaling_factor: float,
    tokenizer,
    s: TrainSettings,
    log: Callable[[str], None],
    checkpoint: Callable[[int, object, object, list], None] | None = None,
    init: Path | None = None,
):
    """UNet and text encoder trained together to predict the noise (epsilon), with caption
    dropout; returns their exponential moving averages (also passed to `checkpoint` now and
    then, with the step and the loss history). `init`: a model directory whose UNet and text
    encoder to continue from, instead of fresh weights."""
    import copy

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdray.models.tiny import SCHEDULER_CONFIG, UNET_CONFIG, text_encoder_config

    torch.manual_seed(s.seed)
    if init is None:
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(len(tokenizer))))
    else:
        unet = UNet2DConditionModel.from_pretrained(init / "unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder").float()
    unet.train(), text_encoder.train()
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    for module in (ema_unet, ema_text):
        module.requires_grad_(False)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    ema_parameters = [*ema_unet.parameters(), *ema_text.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=s.unet_lr, weight_decay=0.01)
    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=s.min_snr_gamma) / snr  # epsilon prediction
    rng = random.Random(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    history, running, started = [], [], time.perf_counter()
    for step in range(s.unet_steps):
        for group in optimizer.param_groups:
            # constant after warm-up (the moving average smooths): a run stopped after N steps
            # has exactly the weights of a run of N steps
            group["lr"] = s.unet_lr * min(1.0, (step + 1) / s.warmup_steps)
        index = torch.randint(0, len(scenes), (s.unet_batch,), generator=generator)
        captions = [
            "" if rng.random() < s.caption_dropout else world.training_caption(scenes[i], rng)
            for i in index.tolist()
        ]
        tokens = tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        noise_in_latent = torch.randn(means[index].shape, generator=generator)
        latents = (means[index] + stds[index] * noise_in_latent) * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, len(alphas), (s.unet_batch,), generator=generator)
        noisy = noise_schedule.add_noise(latents, noise, t)
        states = text_encoder(tokens)[0]
        prediction = unet(noisy, t, encoder_hidden_states=states).sample
        per_sample = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (weights[t] * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_parameters, parameters, 1 - decay)
        running.append(per_sample.mean().item())
        if (step + 1) % s.log_every == 0 or step + 1 == s.unet_steps:
            history.append({"step": step + 1, "mse": float(np.mean(running))})
            log(
                f"unet {step + 1:>6}/{s.unet_steps}  mse {np.mean(running):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.perf_counter() - started:.0f}s"
            )
            running = []
        if checkpoint and s.checkpoint_every and (step + 1) % s.checkpoint_every == 0:
            checkpoint(step + 1, ema_unet, ema_text, history)
    return ema_unet.eval(), ema_text.eval(), history


def save_model(directory: Path, tokenizer_dir: Path, text_encoder, unet, vae) -> None:
    """Write a diffusers directory: UNet and VAE in half precision (diffusers loads them as
    float32 unless asked otherwise), the small text encoder in float32 (transformers loads
    weights in their stored dtype, which would mix dtypes in a plain `from_pretrained`)."""
    import copy
    import shutil

    import torch
    from diffusers import DDIMScheduler

    from sdray.models.tiny import MODEL_INDEX, SCHEDULER_CONFIG

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tokenizer_dir, directory / "tokenizer", dirs_exist_ok=True)
    for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        dtype = torch.float32 if name == "text_encoder" else torch.float16
        copy.deepcopy(module).to(dtype=dtype).save_pretrained(directory / name)
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")


def evaluate_in_process(directory: Path, count: int, held_out: bool = True) -> dict[str, float]:
    """Held-out accuracy per attribute of the model in `directory`, at the default settings,
    through the engine in this process (the Ray pipeline's figures: pipelines/eval_quality.py)."""
    from sdray.config import GenerationConfig
    from sdray.engine import DiffusionEngine
    from sdray.models import ModelFiles, plan_directory
    from sdray.quality.scorer import accuracy, score
    from sdray.requests import GenerationRequest

    defaults = GenerationConfig()
    files = ModelFiles("trained", directory, "trained", plan_directory(directory, str(directory)))
    engine = DiffusionEngine(files, device="cpu")
    requests = [
        GenerationRequest(
            id=row["id"],
            prompt=row["prompt"],
            negative_prompt="",
            seed=row["seed"],
            steps=defaults.steps,
            guidance_scale=defaults.guidance_scale,
            width=world.IMAGE_SIZE,
            height=world.IMAGE_SIZE,
            scheduler=defaults.scheduler,
        )
        for row in world.evaluation_prompts(count, held_out=held_out)
    ]
    results = engine.generate(requests)
    return accuracy(score(r.image, r.request.prompt) for r in results)


def add_quality(directory: Path, count: int, log: Callable[[str], None] = print) -> dict:
    """Measure held-out (and training-triple) accuracy of the model in `directory` and record
    it in its `training.json`."""
    path = directory / "training.json"
    record = json.loads(path.read_text())
    log("evaluating on held-out prompts (default settings, in process)")
    record["quality_held_out"] = evaluate_in_process(directory, count, held_out=True)
    record["quality_training_triples"] = evaluate_in_process(directory, count, held_out=False)
    log(f"held-out accuracy {json.dumps(record['quality_held_out'])}")
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def train(
    output: Path,
    s: TrainSettings,
    log: Callable[[str], None] = print,
    vae_from: Path | None = None,
    unet_from: Path | None = None,
) -> dict:
    """Train every part, save the model into `output`, and record settings, losses, times and
    held-out quality in `output/training.json`.

    Every `checkpoint_every` UNet steps the model and its record so far are saved, so a run
    stopped early leaves a usable model of the steps it made. `vae_from`: a model directory
    whose VAE to reuse instead of training one; `unet_from`: one whose UNet and text encoder to
    continue training (its record's UNet steps are added to this run's).
    """
    import tempfile

    import diffusers
    import torch
    import transformers
    from transformers import CLIPTokenizer

    from sdray.models.tiny import write_tokenizer

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    torch.set_num_threads(s.threads)
    wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    log(f"settings {json.dumps(asdict(s))}")
    scenes, images = draw_scenes(s.scenes, s.seed)
    log(f"drew {len(scenes)} training scenes in {time.perf_counter() - wall:.0f}s")
    if vae_from is None:
        vae, vae_history = train_vae(images, scenes, s, log)
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_from / "vae", torch_dtype=torch.float32).eval()
        vae, vae_history = vae.requires_grad_(False), []
        log(f"reusing the VAE of {vae_from}")
    means, stds, psnr = encode_latents(vae, images)
    scaling_factor = float(1 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.to(torch.float16).save_pretrained(output / "vae")  # usable by --vae-from at once
    vae.float()
    log(f"vae reconstruction PSNR {psnr:.1f} dB; latent scaling factor {scaling_factor:.4f}")
    ceiling = reconstruction_accuracy(vae)
    log(f"scorer on vae reconstructions {json.dumps(ceiling)}")

    def record(unet_steps: int, unet_history: list) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "settings": {**asdict(s), "unet_steps": unet_steps},
            "vae_from": str(vae_from) if vae_from else None,
            "unet_from": str(unet_from) if unet_from else None,
            "unet_steps_before": steps_before,
            "world": {
                "colours": list(world.COLOURS),
                "shapes": list(world.SHAPES),
                "positions": list(world.POSITIONS),
                "sizes": list(world.SIZES),
                "backgrounds": list(world.BACKGROUNDS),
                "held_out_triples": len(world.held_out_triples()),
                "image_size": world.IMAGE_SIZE,
            },
            "vae": {
                "reconstruction_psnr_db": psnr,
                "scaling_factor": scaling_factor,
                "scorer_on_reconstructions": ceiling,
            },
            "losses": {"vae": vae_history, "unet": unet_history},
            "training_wall_seconds": time.perf_counter() - wall,
            "training_cpu_seconds": usage.ru_utime + usage.ru_stime - cpu.ru_utime - cpu.ru_stime,
            "torch": torch.__version__,
        }

    steps_before = 0
    if unet_from is not None and (unet_from / "training.json").is_file():
        earlier = json.loads((unet_from / "training.json").read_text())
        steps_before = earlier.get("unet_steps_before", 0) + earlier["settings"]["unet_steps"]
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = Path(scratch) / "tokenizer"
        write_tokenizer(tokenizer_dir, world.vocabulary())
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)

        def snapshot(step: int, unet, text_encoder, history: list) -> None:
            save_model(output, tokenizer_dir, text_encoder, unet, vae)
            (output / "training.json").write_text(json.dumps(record(step, history), indent=2))
            log(f"snapshot of step {step} saved in {output}")

        unet, text_encoder, unet_history = train_unet(
            scenes, means, stds, scaling_factor, tokenizer, s, log, snapshot, init=unet_from
        )
        snapshot(s.unet_steps, unet, text_encoder, unet_history)
    return add_quality(output, s.eval_prompts, log)
