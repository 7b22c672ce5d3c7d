"""The personalized generator the service samples from, and its in-place hot reload.

It holds the frozen base UNet, the text encoder, the attribute classifier (for each candidate's descriptor) and
*two* allocated adaptive networks: the active one serves requests, the standby one receives the next version.

- ``generate`` draws the K candidates of one group in one batch: the prompt's token states repeated K times, the
  user vector u repeated K times (or no adaptive input at all when the user is unknown), K noises from one seed
  (candidate i from seed + i); with guidance, the K conditional and K unconditional rows go through one forward
  pass a step (2K rows). The sampler is the service's :class:`SamplerConfig` (default :data:`SERVING_SAMPLER`).
  Same prompt, u, K, seed and version give the same pixels.
- Best-of-N (:class:`~service.settings.BestOfSettings`, off by default): for a viewer with a user vector, on a
  version whose reward model (PerFusionRM) has a held-out GAUC interval in its manifest starting at the floor or
  above, and for K up to ``max_k``, the same one batch draws N candidates instead of K (candidate i from seed + i,
  so the first K are the ones an unranked draw would make), the version's reward model scores the N for this u,
  and the K best are shown, best first. The group says how it was drawn (``drawn``, ``ranked_by``). Anything
  else draws K exactly as without best-of-N.
- ``load_version`` loads a published version's adaptive weights into the standby network with ``load_state_dict``
  (no allocation when the version's adaptive config is the network's; a network of the version's config is built
  when it differs), loads its reward model (with best-of-N on), checks both, and only then swaps standby and
  active under a lock. A
  request that started before the swap finishes on the network and reward model it started with (so its images
  and its ``model_version`` agree); the swap never waits for generation, and a load waits only for requests still
  running on the *standby* slot, i.e. those that started before the previous swap. A version that does not load
  or check is refused with :class:`VersionRefused` and the active slot is untouched.

Inference only: this module imports models, checkpoints and sampling, never the trainer.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from numpy.typing import NDArray
from torch import Tensor

from perfusion.contracts.records import MAX_K
from perfusion.errors import PerfusionError
from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork, personalized_noise_prediction
from perfusion.models.attribute_classifier import AttributeClassifier
from perfusion.models.base import BaseModelConfig
from perfusion.models.reward import PerFusionRM, RewardModelConfig
from perfusion.sampler_config import SERVING_SAMPLER, SamplerConfig
from perfusion.user_features import USER_DIM
from service.settings import BestOfSettings

logger = logging.getLogger(__name__)

# Component names inside a published version folder (as the trainer publishes them).
ADAPTIVE_COMPONENT = "adaptive_network"
FINETUNED_UNET_COMPONENT = "unet"
CLASSIFIER_COMPONENT = "attribute_classifier"
REWARD_COMPONENT = "reward_model"
BASE_VERSION = "base"
# Where the trainer's gate records the reward model's held-out GAUC bootstrap interval: manifest["metrics"][...].
MANIFEST_METRICS = "metrics"
GAUC_LOW_METRIC = "rm_gauc_low"
GAUC_HIGH_METRIC = "rm_gauc_high"


class VersionRefused(PerfusionError):
    """A model version could not be loaded or failed its checks; the serving version is unchanged."""


@dataclass(frozen=True)
class GeneratedGroup:
    images: NDArray[np.uint8]  # [K, H, W, 3]
    descriptors: list[list[float]]  # K descriptors over perfusion.attributes
    model_version: str
    drawn: int | None = None  # candidates sampled to show these K: N when ranked, K when not (None: not said)
    ranked_by: str | None = None  # the version whose reward model chose and ordered the K; None: shown as drawn


class CandidateGenerator(Protocol):
    """What the app needs from a generator."""

    @property
    def model_version(self) -> str: ...

    def generate(self, prompt: str, user_vector: NDArray[np.float32] | None, k: int, seed: int) -> GeneratedGroup: ...


class TextStates(Protocol):
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class RewardRanking:
    """A version's reward model and the held-out GAUC interval its manifest records for it."""

    reward_model: PerFusionRM
    gauc_low: float
    gauc_high: float


@dataclass
class _Slot:
    """One allocated adaptive network, the reward model beside it, and the version both hold (None: being loaded
    or failed)."""

    network: AdaptiveNetwork
    version: str | None
    uses_adaptive: bool  # False for a version without an adaptive network: the base model serves everyone
    ranking: RewardRanking | None = None  # None: the version has no reward model or no GAUC record
    in_flight: int = 0


class PersonalizedGenerator:
    """Base UNet + adaptive network + text encoder (+ the version's reward model for best-of-N); thread-safe
    ``generate`` and in-place ``load_version``."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        adaptive: AdaptiveNetwork,
        text_encoder: TextStates,
        classifier: AttributeClassifier,
        config: BaseModelConfig,
        version: str = BASE_VERSION,
        uses_adaptive: bool = True,
        sampler: SamplerConfig = SERVING_SAMPLER,
        best_of: BestOfSettings | None = None,
    ) -> None:
        unet.eval().requires_grad_(False)
        self.unet = unet
        self.text_encoder = text_encoder
        self.classifier = classifier.eval()
        self.config = config
        self.sampler = sampler
        # Read once per request, so whoever owns the generator may replace it between requests (the serve bench
        # switches it between its arms); a version's reward model is loaded only while it is enabled.
        self.best_of = best_of if best_of is not None else BestOfSettings()
        self._uncond_states: Tensor | None = None  # the empty prompt's states [1, L, 384], encoded once
        adaptive.eval().requires_grad_(False)
        standby = copy.deepcopy(adaptive)
        self._active = _Slot(adaptive, version, uses_adaptive)
        self._standby = _Slot(standby, version, uses_adaptive)
        self._lock = threading.Lock()
        self._standby_idle = threading.Condition(self._lock)
        self._reload_lock = threading.Lock()

    @property
    def model_version(self) -> str:
        with self._lock:
            return self._active.version or BASE_VERSION

    # ------------------------------------------------------------------------------------------------ generation

    def generate(self, prompt: str, user_vector: NDArray[np.float32] | None, k: int, seed: int) -> GeneratedGroup:
        """K candidates for ``prompt`` conditioned on u (None: the base model without adaptive input); best-of-N
        ranked by the version's reward model when it applies (module docstring)."""
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        best_of = self.best_of
        with self._lock:
            slot = self._active
            slot.in_flight += 1
            version = slot.version or BASE_VERSION
        try:
            ranking = self._ranking_for(slot, best_of, user_vector, k)
            drawn = best_of.n if ranking is not None else k
            states, mask = self.text_encoder.encode([prompt])  # [1, L, 384] each (mask [1, L])
            images = self._sample(slot, states, user_vector, drawn, seed)  # [drawn, H, W, 3]
            if ranking is not None and user_vector is not None:
                scores = self.reward_scores(ranking, states, mask, images, user_vector)  # [N]
                # Stable: equal scores keep the order drawn, so the same request shows the same K in the same order.
                shown = torch.argsort(scores, descending=True, stable=True)[:k].numpy()
                images = images[shown]
                logger.debug(
                    "best-of-%d for version %s: candidates %s shown (scores %s)",
                    drawn,
                    version,
                    shown.tolist(),
                    [round(float(score), 4) for score in scores[shown]],
                )
        finally:
            with self._lock:
                slot.in_flight -= 1
                self._standby_idle.notify_all()
        descriptors = self.classifier.descriptors(images).tolist()  # [K, DESCRIPTOR_DIM]
        return GeneratedGroup(
            images=images,
            descriptors=descriptors,
            model_version=version,
            drawn=drawn,
            ranked_by=version if ranking is not None else None,
        )

    @staticmethod
    def _ranking_for(
        slot: _Slot, best_of: BestOfSettings, user_vector: NDArray[np.float32] | None, k: int
    ) -> RewardRanking | None:
        """The reward model that ranks this group, or None when the group is drawn unranked."""
        if user_vector is None or slot.ranking is None or not best_of.ranks(k):
            return None
        return slot.ranking if slot.ranking.gauc_low >= best_of.gauc_floor else None

    @torch.no_grad()
    def reward_scores(
        self,
        ranking: RewardRanking,
        prompt_states: Tensor,
        prompt_mask: Tensor,
        images: NDArray[np.uint8],
        user_vector: NDArray[np.float32],
    ) -> Tensor:
        """The reward model's score [N] of each of ``images`` [N, H, W, 3] for the prompt (token states [1, L, D]
        and mask [1, L]) and the viewer's u [U]."""
        from perfusion.text_encoder import mean_pool

        rows = images.shape[0]
        pooled = mean_pool(prompt_states.float(), prompt_mask).expand(rows, -1)  # [N, 384]
        # [N, 3, H, W] in [-1, 1], as the trainer reads a served candidate's stored pixels.
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        users = torch.from_numpy(np.asarray(user_vector, dtype=np.float32)).unsqueeze(0).expand(rows, -1)  # [N, U]
        scores: Tensor = ranking.reward_model(pooled, pixels, users).reshape(-1)
        return scores

    @torch.no_grad()
    def _sample(
        self, slot: _Slot, prompt_states: Tensor, user_vector: NDArray[np.float32] | None, rows: int, seed: int
    ) -> NDArray[np.uint8]:
        """``rows`` candidates [rows, H, W, 3] of the prompt (token states [1, L, 384]), candidate i from seed + i."""
        from perfusion.sampling import sample_images

        text_states = prompt_states.expand(rows, -1, -1)  # [rows, L, 384]: the candidates share the prompt
        adaptive = slot.network if slot.uses_adaptive and user_vector is not None else None
        user = None
        if adaptive is not None and user_vector is not None:
            user = torch.from_numpy(np.asarray(user_vector, dtype=np.float32)).unsqueeze(0)  # [1, U]

        def noise_fn(x_t: Tensor, t: Tensor, conditioning: Tensor) -> Tensor:
            # x_t holds 2 * rows with guidance (the conditional, then the unconditional ones), rows without; one
            # user for all.
            users = None if user is None else user.expand(x_t.shape[0], -1)
            return personalized_noise_prediction(self.unet, adaptive, x_t, t, conditioning, users)

        return sample_images(
            noise_fn, text_states, self.sampler, seed, config=self.config, uncond_states=self.uncond_states()
        )

    def uncond_states(self) -> Tensor:
        """The empty prompt's token states [1, L, 384] for classifier-free guidance (encoded on first use)."""
        if self._uncond_states is None:
            states, _ = self.text_encoder.encode([""])
            self._uncond_states = states
        return self._uncond_states

    # ----------------------------------------------------------------------------------------------- hot reload

    def load_version(self, version: str, folder: Path) -> None:
        """Load ``folder``'s weights into the standby slot, check them, then make it the active one."""
        from perfusion.checkpoints import load_state_into

        with self._reload_lock:
            components = {path.name for path in folder.iterdir() if path.is_dir()}
            if FINETUNED_UNET_COMPONENT in components:
                raise VersionRefused(
                    f"version {version} holds a fine-tuned U-Net ('{FINETUNED_UNET_COMPONENT}'); the service serves "
                    f"base + '{ADAPTIVE_COMPONENT}' versions only; publish with the adaptive-network objective"
                )
            uses_adaptive = ADAPTIVE_COMPONENT in components
            adaptive_config = self._adaptive_config_of(version, folder) if uses_adaptive else None
            # With best-of-N off the reward model is not needed, and a version loads as it did without ranking. It
            # is a module of its own: loaded and checked before the standby slot is waited for.
            ranking = (
                self._ranking_of(version, folder) if self.best_of.enabled and REWARD_COMPONENT in components else None
            )
            with self._lock:
                standby = self._standby
                while standby.in_flight:
                    self._standby_idle.wait()
                standby.version = None
            if adaptive_config is not None:
                network = standby.network
                if network.config != adaptive_config:
                    # Another shape (the trainer's config changed): a network of the version's config, allocated
                    # once; its weights come from the version, so nothing is copied from the U-Net. A base_tokens
                    # network installs its attention processors on the shared U-Net; without user tokens they
                    # compute what the ones they replace do, so requests running on the active slot are unchanged.
                    network = AdaptiveNetwork(self.unet, adaptive_config, copy_unet_weights=False)
                    network.eval().requires_grad_(False)
                try:
                    load_state_into(folder, ADAPTIVE_COMPONENT, network)
                except (PerfusionError, OSError, RuntimeError, ValueError, KeyError) as exc:
                    raise VersionRefused(
                        f"version {version}: its {ADAPTIVE_COMPONENT} does not load into a network of its "
                        f"config.json ({type(exc).__name__}: {exc}); republish it from the current base model"
                    ) from exc
                _refuse_non_finite(version, ADAPTIVE_COMPONENT, network)
                standby.network = network
            with self._lock:
                standby.version = version
                standby.uses_adaptive = uses_adaptive
                standby.ranking = ranking
                self._active, self._standby = standby, self._active
            logger.info(
                "model version %s swapped in (adaptive network: %s; %s)",
                version,
                uses_adaptive,
                self._describe_ranking(ranking),
            )

    def _adaptive_config_of(self, version: str, folder: Path) -> AdaptiveConfig:
        """The version's adaptive network config (its config.json), or VersionRefused naming what is wrong."""
        from perfusion.checkpoints import read_component_config

        try:
            config = AdaptiveConfig.from_dict(read_component_config(folder, ADAPTIVE_COMPONENT))
        except (PerfusionError, TypeError) as exc:
            raise VersionRefused(
                f"version {version}: its {ADAPTIVE_COMPONENT}/config.json is not an adaptive network config "
                f"({type(exc).__name__}: {exc}); republish it with the trainer's AdaptiveConfig"
            ) from exc
        if config.user_dim != USER_DIM:
            raise VersionRefused(
                f"version {version}: its {ADAPTIVE_COMPONENT} takes user vectors of length {config.user_dim}, the "
                f"service's are {USER_DIM} (perfusion.user_features); republish it with user_dim={USER_DIM}"
            )
        return config

    def _ranking_of(self, version: str, folder: Path) -> RewardRanking | None:
        """The version's reward model with its held-out GAUC interval; None when the manifest records none (the
        version then serves unranked). A reward model that does not load, fit or check refuses the version."""
        from perfusion.checkpoints import load_component

        interval = heldout_gauc_interval(folder)
        if interval is None:
            return None
        try:
            reward_model = load_component(
                folder, REWARD_COMPONENT, lambda values: PerFusionRM(RewardModelConfig.from_dict(values))
            )
        except (PerfusionError, OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise VersionRefused(
                f"version {version}: its {REWARD_COMPONENT} does not load ({type(exc).__name__}: {exc}); "
                "republish it from the trainer"
            ) from exc
        assert isinstance(reward_model, PerFusionRM)
        reward_config = reward_model.config
        expected = {
            "user_dim": USER_DIM,
            "image_size": self.config.sample_size,
            "image_channels": self.config.channels,
            "text_dim": self.config.cross_attention_dim,
        }
        misfits = [
            f"{name} {getattr(reward_config, name)} (the service's {value})"
            for name, value in expected.items()
            if getattr(reward_config, name) != value
        ]
        if misfits:
            raise VersionRefused(
                f"version {version}: its {REWARD_COMPONENT} does not fit what the service draws: {', '.join(misfits)}; "
                "republish it from a trainer on the serving base model"
            )
        _refuse_non_finite(version, REWARD_COMPONENT, reward_model)
        reward_model.eval().requires_grad_(False)
        return RewardRanking(reward_model, gauc_low=interval[0], gauc_high=interval[1])

    def _describe_ranking(self, ranking: RewardRanking | None) -> str:
        if not self.best_of.enabled:
            return "best-of-N off"
        if ranking is None:
            return "no reward model with a held-out GAUC record: drawn unranked"
        interval = f"[{ranking.gauc_low:.3f}, {ranking.gauc_high:.3f}]"
        if ranking.gauc_low < self.best_of.gauc_floor:
            return f"reward model's held-out GAUC {interval} below the floor {self.best_of.gauc_floor}: drawn unranked"
        return f"best-of-{self.best_of.n} ranked by its reward model, held-out GAUC {interval}"


def _refuse_non_finite(version: str, component: str, module: torch.nn.Module) -> None:
    bad = [name for name, tensor in module.state_dict().items() if not torch.isfinite(tensor).all()]
    if bad:
        raise VersionRefused(
            f"version {version}: {component} holds non-finite weights in {bad[:3]}; "
            "the training step diverged, roll back with `perfusion models rollback VERSION`"
        )


def heldout_gauc_interval(folder: Path) -> tuple[float, float] | None:
    """(low, high) of the reward model's held-out GAUC bootstrap interval in a version folder's manifest, as the
    trainer's gate records it (``metrics.rm_gauc_low`` / ``rm_gauc_high``); None when absent or not finite (the
    gate had no held-out group with both a positive and a negative)."""
    from perfusion.checkpoints import MANIFEST_FILE

    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    metrics = manifest.get(MANIFEST_METRICS) if isinstance(manifest, dict) else None
    if not isinstance(metrics, dict):
        return None
    low, high = metrics.get(GAUC_LOW_METRIC), metrics.get(GAUC_HIGH_METRIC)
    if not all(isinstance(value, int | float) and not isinstance(value, bool) for value in (low, high)):
        return None
    assert isinstance(low, int | float) and isinstance(high, int | float)
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return float(low), float(high)


def load_serving_generator(
    base_folder: Path,
    store_root: Path,
    text_encoder: TextStates,
    sampler: SamplerConfig = SERVING_SAMPLER,
    best_of: BestOfSettings | None = None,
) -> PersonalizedGenerator:
    """The generator ``perfusion serve`` runs: the base checkpoint, then LATEST of the model store when it verifies.

    ``base_folder`` holds the frozen base UNet (``unet``) and the attribute classifier (``attribute_classifier``);
    the adaptive network's shape comes from LATEST's config.json (or the default config before any publish), so
    that the first load fills the allocated networks instead of building new ones. ``best_of`` defaults to
    best-of-N off.
    """
    from perfusion.checkpoints import CheckpointError, ModelStore, load_component, read_component_config
    from perfusion.models.attribute_classifier import build_attribute_classifier
    from perfusion.sampling import base_model_config, load_base_unet

    config = base_model_config(base_folder)
    # Any: mypy sees diffusers' top-level UNet2DConditionModel (which the models use) as a dummy class.
    unet: Any = load_base_unet(base_folder)
    classifier = load_component(base_folder, CLASSIFIER_COMPONENT, build_attribute_classifier)
    assert isinstance(classifier, AttributeClassifier)
    store = ModelStore(store_root)
    latest = store.latest()
    adaptive_config = AdaptiveConfig()
    if latest is not None and (store.path(latest) / ADAPTIVE_COMPONENT).is_dir():
        try:
            adaptive_config = AdaptiveConfig.from_dict(read_component_config(store.path(latest), ADAPTIVE_COMPONENT))
        except (CheckpointError, PerfusionError) as exc:
            logger.error("LATEST %s has an unreadable adaptive config (%s); starting from the base model", latest, exc)
    adaptive = AdaptiveNetwork(unet, adaptive_config)
    # Until a version loads, the network is zero-initialised and adds exactly 0: leave it out of the forward passes
    # (it costs about a quarter of each one). load_version switches it on for versions that hold one.
    generator = PersonalizedGenerator(
        unet,
        adaptive,
        text_encoder,
        classifier,
        config,
        uses_adaptive=False,
        sampler=sampler,
        best_of=best_of,
    )
    if latest is not None:
        try:
            store.verify(latest)
            generator.load_version(latest, store.path(latest))
        except PerfusionError as exc:
            logger.error("LATEST %s refused at start (%s); serving the base model until a good version", latest, exc)
    return generator
