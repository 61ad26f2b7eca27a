"""Scheduler names that rows may ask for, and how each is built from a model's config."""

from __future__ import annotations

from typing import Any, NamedTuple


class SchedulerSpec(NamedTuple):
    class_name: str
    options: dict[str, Any]
    label: str  # the sampler name in A1111 infotext


SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler", {}, "DDIM"),
    "ddpm": SchedulerSpec("DDPMScheduler", {}, "DDPM"),
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "lms": SchedulerSpec("LMSDiscreteScheduler", {}, "LMS"),
    "euler": SchedulerSpec("EulerDiscreteScheduler", {}, "Euler"),
    "euler_ancestral": SchedulerSpec("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": SchedulerSpec("HeunDiscreteScheduler", {}, "Heun"),
    "dpmpp_2m": SchedulerSpec("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpmpp_2m_karras": SchedulerSpec(
        "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"
    ),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", {}, "UniPC"),
}


def build_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler instance of the named kind, from the model's own scheduler config."""
    import diffusers

    spec = SCHEDULERS[name]
    cls = getattr(diffusers, spec.class_name)
    return cls.from_config({**base_config, **spec.options})
