"""The cost of the group-level objective against its pairwise decomposition and against the 2K-pass floor.

One group of K candidates (|P| positives, |N| = K - |P| negatives) of one user and one prompt, on a base UNet of
the given shape with the personalized adaptive network as the policy and the frozen base UNet as the reference.
Per group, the median wall time of:

- ``group``: the group preference loss, forward and backward: every candidate once through the policy (with
  gradients) and once through the reference (without): 2K UNet passes.
- ``pairwise``: Diffusion-DPO on every (p, n) pair run separately, each pair through policy and reference, then
  backward: 4 |P| |N| UNet passes.
- ``floor``: the 2K forward passes alone (policy and reference, no gradients, no loss).

The report gives the three times, the UNet passes each makes, and the ratios group / pairwise and group / floor.
Torch and diffusers are imported inside :func:`run_objective_benchmark` (this module is imported to build the
CLI parser).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from pydantic import Field, model_validator

from perfusion.settings import Settings

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from torch import Tensor

    from perfusion.models.adaptive import AdaptiveNetwork

HELP = "time the group preference loss against pairwise Diffusion-DPO and the 2K forward-pass floor"


class ObjectiveBenchConfig(Settings):
    """What to measure; the UNet defaults are the base model's real shape (perfusion.models.base)."""

    block_out_channels: tuple[int, ...] = Field(default=(32, 64, 128), description="UNet channels per level")
    sample_size: int = Field(default=32, description="image side in pixels")
    layers_per_block: int = Field(default=2, description="ResNet layers per UNet block")
    attention_heads: int = Field(default=4, description="attention heads per transformer block")
    norm_num_groups: int = Field(default=16, description="GroupNorm groups of the UNet")
    text_length: int = Field(default=16, description="text tokens cross-attended to")
    group_size: int = Field(default=4, ge=2, description="K, candidates in the group")
    num_positives: int = Field(default=1, ge=1, description="|P|, positives among the K candidates")
    repeats: int = Field(default=5, ge=1, description="timed repetitions per measurement (the median is reported)")
    warmup: int = Field(default=1, ge=0, description="untimed repetitions before timing")
    beta: float = Field(default=1000.0, description="beta of the objectives (does not change the cost)")
    seed: int = Field(default=0, description="seed of weights, images, noise and timesteps")
    device: str = Field(default="cpu", description="torch device to run on (cpu, cuda)")

    @model_validator(mode="after")
    def _a_negative_in_every_group(self) -> ObjectiveBenchConfig:
        if self.num_positives >= self.group_size:
            raise ValueError(
                f"num_positives must be between 1 and group_size - 1 = {self.group_size - 1}, got {self.num_positives}"
            )
        return self

    @property
    def num_negatives(self) -> int:
        return self.group_size - self.num_positives


@dataclass
class _Workload:
    """One group's tensors and the two models (shapes: K candidates of C x H x H; L text tokens of width D)."""

    unet: UNet2DConditionModel
    adaptive: AdaptiveNetwork
    noised: Tensor  # [K, C, H, H]
    noise: Tensor  # [K, C, H, H], the eps the models predict
    timesteps: Tensor  # [K]
    text_states: Tensor  # [K, L, D], one prompt repeated
    user_vectors: Tensor  # [K, USER_DIM], one user repeated
    labels: Tensor  # [K], positives first
    group_ids: Tensor  # [K], all zero
    beta: float


def _denoising_errors(workload: _Workload, indices: list[int], with_policy_grad: bool) -> tuple[Tensor, Tensor]:
    """Per-candidate mean squared eps error [len(indices)] of policy and reference on the chosen candidates."""
    import torch

    from perfusion.models.adaptive import personalized_noise_prediction

    index = torch.tensor(indices, device=workload.noised.device)
    x_t, t, noise = workload.noised[index], workload.timesteps[index], workload.noise[index]
    text, users = workload.text_states[index], workload.user_vectors[index]
    with torch.set_grad_enabled(with_policy_grad):
        policy = personalized_noise_prediction(workload.unet, workload.adaptive, x_t, t, text, users)
    with torch.no_grad():
        reference = personalized_noise_prediction(workload.unet, None, x_t, t, text, None)
    return (policy - noise).pow(2).mean(dim=(1, 2, 3)), (reference - noise).pow(2).mean(dim=(1, 2, 3))


def _group_step(workload: _Workload) -> None:
    from perfusion.objectives import group_preference_loss

    workload.adaptive.zero_grad(set_to_none=True)
    policy_err, ref_err = _denoising_errors(workload, list(range(len(workload.labels))), with_policy_grad=True)
    loss, _ = group_preference_loss(policy_err, ref_err, workload.labels, workload.group_ids, workload.beta)
    loss.backward()


def _pairwise_step(workload: _Workload) -> None:
    import torch

    from perfusion.objectives import pairwise_dpo_loss

    workload.adaptive.zero_grad(set_to_none=True)
    positives = [i for i, label in enumerate(workload.labels.tolist()) if label > 0]
    negatives = [i for i, label in enumerate(workload.labels.tolist()) if label == 0]
    pair_labels = torch.tensor([1, 0], device=workload.labels.device)
    pair_group = torch.zeros(2, dtype=torch.long, device=workload.labels.device)
    for positive in positives:
        for negative in negatives:
            policy_err, ref_err = _denoising_errors(workload, [positive, negative], with_policy_grad=True)
            loss, _ = pairwise_dpo_loss(policy_err, ref_err, pair_labels, pair_group, workload.beta)
            (loss / (len(positives) * len(negatives))).backward()


def _floor_step(workload: _Workload) -> None:
    _denoising_errors(workload, list(range(len(workload.labels))), with_policy_grad=False)


def _build_workload(config: ObjectiveBenchConfig) -> _Workload:
    import torch

    from perfusion.models.adaptive import AdaptiveNetwork, freeze_unet
    from perfusion.models.base import BaseModelConfig, build_train_scheduler, build_unet
    from perfusion.user_features import USER_DIM

    base_config = BaseModelConfig(
        sample_size=config.sample_size,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        attention_heads=config.attention_heads,
        norm_num_groups=config.norm_num_groups,
        text_max_length=config.text_length,
    )
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    unet = build_unet(base_config)
    cast(Any, unet).to(device)  # diffusers' ModelMixin.to is wrapped in a decorator that mypy cannot see through
    freeze_unet(unet)
    adaptive = AdaptiveNetwork(unet).to(device)

    k = config.group_size
    generator = torch.Generator().manual_seed(config.seed + 1)
    shape = (k, base_config.channels, config.sample_size, config.sample_size)
    images = torch.rand(shape, generator=generator) * 2 - 1
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, base_config.num_train_timesteps, (k,), generator=generator)
    noised = build_train_scheduler(base_config).add_noise(images, noise, cast(torch.IntTensor, timesteps))
    text_states = torch.randn(1, config.text_length, base_config.cross_attention_dim, generator=generator)
    user_vectors = torch.randn(1, USER_DIM, generator=generator)
    labels = torch.tensor([1] * config.num_positives + [0] * config.num_negatives)
    return _Workload(
        unet=unet,
        adaptive=adaptive,
        noised=noised.to(device),
        noise=noise.to(device),
        timesteps=timesteps.to(device),
        text_states=text_states.expand(k, -1, -1).to(device),
        user_vectors=user_vectors.expand(k, -1).to(device),
        labels=labels.to(device),
        group_ids=torch.zeros(k, dtype=torch.long, device=device),
        beta=config.beta,
    )


def run_objective_benchmark(config: ObjectiveBenchConfig) -> dict[str, Any]:
    """Measure the three costs per group and return the JSON report (see the module docstring)."""
    import torch

    from ops.bench import median_seconds
    from perfusion.models.base import count_parameters

    workload = _build_workload(config)

    def synchronize() -> None:
        if workload.noised.is_cuda:
            torch.cuda.synchronize()

    seconds = {
        name: median_seconds(partial(step, workload), config.repeats, config.warmup, synchronize)
        for name, step in (("group", _group_step), ("pairwise", _pairwise_step), ("floor", _floor_step))
    }
    k, pairs = config.group_size, config.num_positives * config.num_negatives
    return {
        "benchmark": "objective",
        "config": config.model_dump(mode="json"),
        "device": str(workload.noised.device),
        "torch_threads": torch.get_num_threads(),
        "unet_parameters": count_parameters(workload.unet),
        "adaptive_parameters": count_parameters(workload.adaptive),
        "unet_passes_per_group": {"group": 2 * k, "pairwise": 4 * pairs, "floor": 2 * k},
        "seconds_per_group": seconds,
        "ratios": {
            "group_over_pairwise": seconds["group"] / seconds["pairwise"],
            "group_over_floor": seconds["group"] / seconds["floor"],
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ObjectiveBenchConfig()
    parser.add_argument("--block-out-channels", type=int, nargs="+", default=list(defaults.block_out_channels))
    for name in (
        "sample_size",
        "layers_per_block",
        "attention_heads",
        "norm_num_groups",
        "text_length",
        "group_size",
        "num_positives",
        "repeats",
        "warmup",
        "seed",
    ):
        help_text = ObjectiveBenchConfig.model_fields[name].description
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name), help=help_text)
    parser.add_argument("--device", default=defaults.device, help="torch device to run on (cpu, cuda)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = ObjectiveBenchConfig(
        block_out_channels=tuple(args.block_out_channels),
        sample_size=args.sample_size,
        layers_per_block=args.layers_per_block,
        attention_heads=args.attention_heads,
        norm_num_groups=args.norm_num_groups,
        text_length=args.text_length,
        group_size=args.group_size,
        num_positives=args.num_positives,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
    )
    return run_objective_benchmark(config)


def summary(report: dict[str, Any]) -> str:
    seconds, ratios, passes = report["seconds_per_group"], report["ratios"], report["unet_passes_per_group"]
    config = report["config"]
    return "\n".join(
        [
            f"objective benchmark: K={config['group_size']} (|P|={config['num_positives']}), UNet "
            f"{tuple(config['block_out_channels'])} at {config['sample_size']}px on {report['device']}",
            *(
                f"  {name:<9} {seconds[name] * 1000:9.1f} ms/group  ({passes[name]} UNet passes)"
                for name in ("group", "pairwise", "floor")
            ),
            f"  group / pairwise = {ratios['group_over_pairwise']:.2f}, "
            f"group / floor = {ratios['group_over_floor']:.2f}",
        ]
    )
