"""Train the demo model: the scorer's shape classifier, an AutoencoderKL, then a text-conditioned UNet.

`train_demo_model(out, minutes=..., seed=...)` writes a standard diffusers StableDiffusionPipeline folder
(fp16 safetensors) with the scorer in `scorer/`. Checkpoints go to `out/checkpoints/` about once a minute
and at the end of each stage; a run started again on the same folder resumes from them, and they are
deleted when the model is saved.

Deterministic means: every random choice (weights, the image pool, each step's batch, noise and
timesteps) is a function of the seed and the step number, and torch runs deterministic kernels. So the
same seed and the same step counts give the same weights on the same torch build and CPU. `--minutes`
chooses the step counts by wall time (a machine's speed then decides them); they are recorded in
`training.json`, and passing them back as `vae_steps`/`unet_steps` reproduces the model exactly.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.demo_model import shapes
from workers.demo_model.architecture import TEXT_LENGTH, build_text_side, build_unet, build_vae, save_pipeline

if TYPE_CHECKING:
    import torch

# The share of the time budget each stage gets (the scorer's classifier trains a fixed number of steps).
VAE_SHARE = 0.27
CHECKPOINT_SECONDS = 60.0
FOREGROUND_WEIGHT = 5.0  # the VAE's loss weight on the shape's pixels (see _foreground_weight)
Progress = Callable[[str, int, int | None, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    minutes: float = 30.0
    vae_steps: int | None = None  # None: as many as the time budget allows
    unet_steps: int | None = None
    scorer_steps: int = 300
    pool_size: int = 12000
    vae_batch: int = 8  # small batches: more updates in the same time, what a short run needs
    unet_batch: int = 32
    threads: int = 1  # one thread beat two on the shared 2-core machines (no OpenMP spinning)
    vae_lr: float = 1e-3
    unet_lr: float = 8e-4
    unet_cooldown_steps: int = 0  # the last N of `unet_steps` take the learning rate linearly down to zero
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    keep_checkpoints: bool = False  # leave out/checkpoints/ after saving (a later run may go on from them)
    vae_from: str | None = None  # a pipeline folder or repo id whose VAE to use as it is (no VAE training)


class VaeSourceError(ValueError):
    """`vae_from` names no VAE the demo UNet can train on (a user error: the message names the source)."""


def _stage_seed(seed: int, stage: str, step: int = 0) -> int:
    return int(np.random.default_rng([seed, sum(map(ord, stage)), step]).integers(0, 2**62))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _Checkpoints:
    def __init__(self, out: Path) -> None:
        self.dir = out / "checkpoints"

    def load(self, stage: str) -> dict[str, Any] | None:
        import torch

        path = self.dir / f"{stage}.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None

    def save(self, stage: str, state: dict[str, Any]) -> None:
        import torch

        self.dir.mkdir(parents=True, exist_ok=True)
        partial = self.dir / f"{stage}.pt.partial"
        torch.save(state, partial)
        partial.replace(self.dir / f"{stage}.pt")


def _loop(stage: str, *, step: int, steps: int | None, budget: float, elapsed: float,
          train_step: Callable[[int], dict[str, float]], save: Callable[[int, float], None],
          progress: Progress | None) -> tuple[int, float]:
    """Run `train_step` until `steps` (or the time `budget`) is reached; checkpoint now and then."""
    started, last_save = time.monotonic() - elapsed, time.monotonic()
    while (step < steps) if steps is not None else (time.monotonic() - started < budget):
        metrics = train_step(step)
        step += 1
        if progress is not None:
            progress(stage, step, steps, metrics)
        if time.monotonic() - last_save > CHECKPOINT_SECONDS:
            save(step, time.monotonic() - started)
            last_save = time.monotonic()
    elapsed = time.monotonic() - started
    save(step, elapsed)
    return step, elapsed


def _foreground_weight(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight: FOREGROUND_WEIGHT on the shape, 1 on the plain background.

    The shape covers 5-35 % of a picture, so an unweighted loss spends the VAE's capacity on the background;
    green and blue shapes on gray then came back as one teal (the scorer's colour misses)."""
    import torch

    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)  # (N, 3, 4*64)
    background = border.median(dim=-1).values[:, :, None, None]
    shape = ((x - background).abs().amax(dim=1, keepdim=True) > 0.15).to(x.dtype)
    return 1.0 + (FOREGROUND_WEIGHT - 1.0) * shape


def _unfinished(state: dict[str, Any], steps: int | None) -> bool:
    """A stage goes on unless it finished its time budget, or it has done the steps asked for."""
    return state["step"] < steps if steps is not None else not state.get("done")


def train_scorer(out: Path, config: TrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """The shape classifier (fixed step count, so always deterministic), saved to `out/scorer/`."""
    import torch

    from workers.demo_model.scorer import CLASSIFIER_CONFIG, build_classifier, prepare

    started = time.monotonic()
    torch.manual_seed(_stage_seed(config.seed, "scorer"))
    model = build_classifier()
    images, scenes = shapes.make_dataset(4000, _stage_seed(config.seed, "scorer-data"))
    x = prepare(images)
    y = torch.tensor([shapes.SHAPES.index(s.shape) for s in scenes])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(config.scorer_steps):
        rng = np.random.default_rng([config.seed, 7, step])
        idx = torch.from_numpy(rng.choice(len(x), 64, replace=False))
        batch = x[idx]
        gen = torch.Generator().manual_seed(_stage_seed(config.seed, "scorer-noise", step))
        # Noise and blur make it judge shapes, not the generator's crisp edges: a diffusion model draws softer.
        batch = batch + torch.randn(batch.shape, generator=gen) * float(rng.uniform(0.0, 0.15))
        if rng.random() < 0.5:
            batch = torch.nn.functional.avg_pool2d(batch, 3, stride=1, padding=1, count_include_pad=False)
        loss = torch.nn.functional.cross_entropy(model(batch), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress("scorer", step + 1, config.scorer_steps, {"loss": float(loss.detach())})
    model.eval()
    from safetensors.torch import save_file

    target = out / "scorer"
    target.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, target / "model.safetensors")
    (target / "config.json").write_text(json.dumps(CLASSIFIER_CONFIG, indent=2) + "\n", encoding="utf-8")
    return {"steps": config.scorer_steps, "seconds": round(time.monotonic() - started, 1)}


def train_vae(out: Path, config: TrainConfig, pool: np.ndarray, progress: Progress | None = None
              ) -> tuple[Any, dict[str, Any]]:
    import torch

    ckpt = _Checkpoints(out)
    torch.manual_seed(_stage_seed(config.seed, "vae"))
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    state = ckpt.load("vae") or {"step": 0, "elapsed": 0.0}
    if "model" in state:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    vae.train()

    def train_step(step: int) -> dict[str, float]:
        rng = np.random.default_rng([config.seed, 1, step])
        x = _to_tensor(pool[rng.choice(len(pool), config.vae_batch, replace=False)])
        gen = torch.Generator().manual_seed(_stage_seed(config.seed, "vae-noise", step))
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        weight = _foreground_weight(x)
        error = recon - x
        loss = (weight * error**2).mean() + (weight * error.abs()).mean() * 0.5 + 1e-6 * dist.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"psnr": float(10 * torch.log10(4.0 / mse.detach()))}

    def save(step: int, elapsed: float) -> None:
        ckpt.save("vae", {"step": step, "elapsed": elapsed, "model": vae.state_dict(),
                          "optimizer": optimizer.state_dict(), "done": False})

    if _unfinished(state, config.vae_steps):
        step, elapsed = _loop("vae", step=state["step"], steps=config.vae_steps, budget=config.minutes * 60 * VAE_SHARE,
                              elapsed=state["elapsed"], train_step=train_step, save=save, progress=progress)
        state = {"step": step, "elapsed": elapsed, "model": vae.state_dict(), "optimizer": optimizer.state_dict(),
                 "done": True}
        ckpt.save("vae", state)
    return vae, vae_record(vae, pool, steps=state["step"], seconds=state["elapsed"])


def load_vae(source: str) -> Any:
    """A trained demo VAE from a pipeline folder or repo id (its `vae/`), in fp32 for training the UNet on it."""
    import torch
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise VaeSourceError(f"vae_from {source!r}: no loadable vae/ there ({exc})") from exc
    if vae.config.latent_channels != 4 or len(vae.config.block_out_channels) != 4:
        raise VaeSourceError(f"vae_from {source!r}: the demo UNet needs 4 latent channels and 8x downsampling")
    return vae


def vae_record(vae: Any, pool: np.ndarray, *, steps: int, seconds: float, set_scale: bool = True) -> dict[str, Any]:
    """Freeze a trained VAE, set its latent scale from the pool (unless a given VAE keeps its own) and measure its
    PSNR; returns its record."""
    import torch

    vae.eval().requires_grad_(False)
    if set_scale:  # so that SD's pipeline sees unit-variance latents (SD 1.x's 0.18215 in miniature)
        with torch.no_grad():
            probe = vae.encode(_to_tensor(pool[:512])).latent_dist.mean
        vae.register_to_config(scaling_factor=round(float(1.0 / probe.std()), 5))
    with torch.no_grad():
        x = _to_tensor(pool[-256:])
        psnr = float(10 * torch.log10(4.0 / torch.nn.functional.mse_loss(vae(x).sample.clamp(-1, 1), x)))
    return {"steps": steps, "seconds": round(seconds, 1), "psnr_db": round(psnr, 2),
            "scaling_factor": vae.config.scaling_factor}


def _caption_table(encoder: Any, tokenizer: Any) -> tuple[list[str], torch.Tensor]:
    import torch

    captions = ["", *shapes.all_captions()]
    ids = tokenizer(captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return captions, encoder(input_ids=ids)[0]


def unet_learning_rate(config: TrainConfig, step: int) -> float:
    """A short warm-up, constant, then a linear cool-down over the last `unet_cooldown_steps` steps.

    Why the cool-down: at a constant rate the grid score wandered (12000 steps scored below 10000) instead of settling.
    """
    rate = config.unet_lr * min(1.0, (step + 1) / 200)
    if config.unet_steps is not None and config.unet_cooldown_steps > 0:
        rate *= min(1.0, (config.unet_steps - step) / config.unet_cooldown_steps)
    return rate


def train_unet(out: Path, config: TrainConfig, pool: np.ndarray, scenes: list[shapes.Scene], vae: Any,
               encoder: Any, tokenizer: Any, progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    import torch
    from diffusers import DDPMScheduler

    ckpt = _Checkpoints(out)
    captions, table = _caption_table(encoder, tokenizer)
    index = {c: i for i, c in enumerate(captions)}
    with torch.no_grad():
        latents = torch.cat([vae.encode(_to_tensor(pool[i:i + 256])).latent_dist.mean
                             for i in range(0, len(pool), 256)]) * vae.config.scaling_factor
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")
    torch.manual_seed(_stage_seed(config.seed, "unet"))
    unet = build_unet()
    ema = build_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=1e-2)
    state = ckpt.load("unet") or {"step": 0, "elapsed": 0.0}
    if "model" in state:
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
    unet.train()

    def train_step(step: int) -> dict[str, float]:
        rng = np.random.default_rng([config.seed, 2, step])
        idx = rng.choice(len(pool), config.unet_batch, replace=False)
        keys = []
        for i in idx:
            if rng.random() < config.caption_dropout:
                keys.append(0)
            else:
                caption = scenes[i].caption(with_size=bool(rng.random() < 0.3),
                                            with_background=bool(rng.random() < 0.3))
                keys.append(index[caption])
        gen = torch.Generator().manual_seed(_stage_seed(config.seed, "unet-noise", step))
        x0 = latents[torch.from_numpy(idx)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        pred = unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=table[keys]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        for group in optimizer.param_groups:
            group["lr"] = unet_learning_rate(config, step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        return {"loss": float(loss.detach())}

    def save(step: int, elapsed: float, done: bool = False) -> None:
        ckpt.save("unet", {"step": step, "elapsed": elapsed, "model": unet.state_dict(), "ema": ema.state_dict(),
                           "optimizer": optimizer.state_dict(), "done": done})

    share = 1.0 if config.vae_from else 1 - VAE_SHARE  # a given VAE leaves the UNet the whole time budget
    if _unfinished(state, config.unet_steps):
        step, elapsed = _loop("unet", step=state["step"], steps=config.unet_steps,
                              budget=config.minutes * 60 * share, elapsed=state["elapsed"],
                              train_step=train_step, save=save, progress=progress)
        save(step, elapsed, done=True)
        state = {"step": step, "elapsed": elapsed}
    return ema.eval(), {"steps": state["step"], "seconds": round(state["elapsed"], 1)}


def train_demo_model(out: Path, config: TrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train everything into `out` (resuming from its checkpoints) and save the pipeline; returns the record."""
    import torch

    given_vae = load_vae(config.vae_from) if config.vae_from is not None else None  # a bad source fails before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(config.threads)
    record: dict[str, Any] = {"config": asdict(config), "torch": torch.__version__}
    record["scorer"] = train_scorer(out, config, progress)
    pool, scenes = shapes.make_dataset(config.pool_size, _stage_seed(config.seed, "pool"))
    if given_vae is None:
        vae, record["vae"] = train_vae(out, config, pool, progress)
    else:
        vae = given_vae
        record["vae"] = {"from": config.vae_from, **vae_record(vae, pool, steps=0, seconds=0.0, set_scale=False)}
    encoder, tokenizer = build_text_side(_stage_seed(config.seed, "text"))
    unet, record["unet"] = train_unet(out, config, pool, scenes, vae, encoder, tokenizer, progress)
    record["parameters"] = save_pipeline(out, vae, encoder, tokenizer, unet)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if not config.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return record
