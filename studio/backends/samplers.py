"""Samplers under the names AUTOMATIC1111 users know, built as diffusers schedulers from a model's own.

A sampler is a scheduler class plus a few settings (the Karras noise schedule, the SDE variant), built with
`from_config` from the scheduler the model shipped with, so the model's training schedule (betas, prediction
type, timestep spacing) is kept and only the sampling method changes. Building one takes milliseconds and loads
nothing; a model keeps the ones it used (`SamplerSet`), so switching back and forth costs nothing.

Models trained with flow matching (SD3, FLUX) have their own, shorter list: the DDPM samplers do not apply to them.
The table follows the diffusers documentation's "A1111/k-diffusion ↔ diffusers" list; samplers that need
packages the studio does not install (LMS: scipy, DPM++ SDE: torchsde) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Sampler:
    scheduler: str  # the diffusers scheduler class
    settings: Mapping[str, Any] = field(default_factory=dict)


KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}

# For models trained to predict noise (SD 1.x, 2.x, SDXL, PixArt): A1111's names.
DDPM_SAMPLERS = {
    "Euler": Sampler("EulerDiscreteScheduler"),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler"),
    "Heun": Sampler("HeunDiscreteScheduler"),
    "DPM2": Sampler("KDPM2DiscreteScheduler"),
    "DPM2 a": Sampler("KDPM2AncestralDiscreteScheduler"),
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": Sampler("DPMSolverMultistepScheduler", KARRAS),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler", SDE),
    "DPM++ 2M SDE Karras": Sampler("DPMSolverMultistepScheduler", {**SDE, **KARRAS}),
    "DDIM": Sampler("DDIMScheduler"),
    "PLMS": Sampler("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS is PNDM without its Runge-Kutta warm-up
    "UniPC": Sampler("UniPCMultistepScheduler"),
    "LCM": Sampler("LCMScheduler"),
}
# For flow-matching models (SD3, FLUX): what ComfyUI and Forge offer them under the same names.
FLOW_SAMPLERS = {
    "Euler": Sampler("FlowMatchEulerDiscreteScheduler"),
    "Heun": Sampler("FlowMatchHeunDiscreteScheduler"),
}


def is_flow(scheduler_class: str) -> bool:
    return scheduler_class.startswith("FlowMatch")


def table(scheduler_class: str) -> dict[str, Sampler]:
    """The samplers a model whose own scheduler is `scheduler_class` can use."""
    return FLOW_SAMPLERS if is_flow(scheduler_class) else DDPM_SAMPLERS


def build(name: str, own: Any) -> Any:
    """The scheduler of sampler `name` for a model whose shipped scheduler is `own` (KeyError: not for it)."""
    import diffusers

    sampler = table(type(own).__name__)[name]
    return getattr(diffusers, sampler.scheduler).from_config(own.config, **sampler.settings)


@dataclass
class SamplerSet:
    """A loaded model's shipped scheduler and the samplers built from it so far (each once)."""

    own: Any
    built: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str | None) -> Any:
        """The scheduler for `name`; None: the model's own."""
        if name is None:
            return self.own
        if name not in self.built:
            self.built[name] = build(name, self.own)
        return self.built[name]
