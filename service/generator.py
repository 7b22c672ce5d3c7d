"""The personalized generator the service samples from, and its in-place hot reload.

It holds the frozen base UNet, the text encoder, the attribute classifier (for each candidate's descriptor) and
*two* allocated adaptive networks: the active one serves requests, the standby one receives the next version.

- ``generate`` draws the K candidates of one group in one batch: the prompt's token states repeated K times, the
  user vector u repeated K times (or no adaptive input at all when the user is unknown), K noises from one seed;
  with guidance, the K conditional and K unconditional rows go through one forward pass a step (2K rows). The
  sampler is the service's :class:`SamplerConfig` (default :data:`SERVING_SAMPLER`). Same prompt, u, K, seed and
  version give the same pixels.
- ``load_version`` loads a published version's adaptive weights into the standby network with ``load_state_dict``
  (no allocation), checks them, and only then swaps standby and active under a lock. A request that started
  before the swap finishes on the network it started with (so its images and its ``model_version`` agree); the
  swap never waits for generation, and a load waits only for requests still running on the *standby* network,
  i.e. those that started before the previous swap. A version that does not load or check is refused with
  :class:`VersionRefused` and the active network is untouched.

Inference only: this module imports models, checkpoints and sampling, never the trainer.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from numpy.typing import NDArray
from torch import Tensor

from perfusion.errors import PerfusionError
from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork, personalized_noise_prediction
from perfusion.models.attribute_classifier import AttributeClassifier
from perfusion.models.base import BaseModelConfig
from perfusion.sampler_config import SERVING_SAMPLER, SamplerConfig

logger = logging.getLogger(__name__)

# Component names inside a published version folder (as the trainer publishes them).
ADAPTIVE_COMPONENT = "adaptive_network"
FINETUNED_UNET_COMPONENT = "unet"
CLASSIFIER_COMPONENT = "attribute_classifier"
BASE_VERSION = "base"


class VersionRefused(PerfusionError):
    """A model version could not be loaded or failed its checks; the serving version is unchanged."""


@dataclass(frozen=True)
class GeneratedGroup:
    images: NDArray[np.uint8]  # [K, H, W, 3]
    descriptors: list[list[float]]  # K descriptors over perfusion.attributes
    model_version: str


class CandidateGenerator(Protocol):
    """What the app needs from a generator."""

    @property
    def model_version(self) -> str: ...

    def generate(self, prompt: str, user_vector: NDArray[np.float32] | None, k: int, seed: int) -> GeneratedGroup: ...


class TextStates(Protocol):
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]: ...


@dataclass
class _Slot:
    """One allocated adaptive network and the version its weights hold (None: being loaded or failed)."""

    network: AdaptiveNetwork
    version: str | None
    uses_adaptive: bool  # False for a version without an adaptive network: the base model serves everyone
    in_flight: int = 0


class PersonalizedGenerator:
    """Base UNet + adaptive network + text encoder; thread-safe ``generate`` and in-place ``load_version``."""

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
    ) -> None:
        unet.eval().requires_grad_(False)
        self.unet = unet
        self.text_encoder = text_encoder
        self.classifier = classifier.eval()
        self.config = config
        self.sampler = sampler
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
        """K candidates for ``prompt`` conditioned on u (None: the base model without adaptive input)."""
        if not 1 <= k <= 16:
            raise ValueError(f"k must be between 1 and 16, got {k}")
        with self._lock:
            slot = self._active
            slot.in_flight += 1
            version = slot.version or BASE_VERSION
        try:
            images = self._sample(slot, prompt, user_vector, k, seed)
        finally:
            with self._lock:
                slot.in_flight -= 1
                self._standby_idle.notify_all()
        descriptors = self.classifier.descriptors(images).tolist()  # [K, DESCRIPTOR_DIM]
        return GeneratedGroup(images=images, descriptors=descriptors, model_version=version)

    @torch.no_grad()
    def _sample(
        self, slot: _Slot, prompt: str, user_vector: NDArray[np.float32] | None, k: int, seed: int
    ) -> NDArray[np.uint8]:
        from perfusion.sampling import sample_images

        states, _ = self.text_encoder.encode([prompt])
        text_states = states.expand(k, -1, -1)  # [K, L, 384]: the K candidates share the prompt
        adaptive = slot.network if slot.uses_adaptive and user_vector is not None else None
        user = None
        if adaptive is not None and user_vector is not None:
            user = torch.from_numpy(np.asarray(user_vector, dtype=np.float32)).unsqueeze(0)  # [1, U]

        def noise_fn(x_t: Tensor, t: Tensor, conditioning: Tensor) -> Tensor:
            # x_t holds 2K rows with guidance (K conditional, then K unconditional), K without; one user for all.
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
        """Load ``folder``'s weights into the standby network, check them, then make it the active one."""
        from perfusion.checkpoints import load_state_into

        with self._reload_lock:
            components = {path.name for path in folder.iterdir() if path.is_dir()}
            if FINETUNED_UNET_COMPONENT in components:
                raise VersionRefused(
                    f"version {version} holds a fine-tuned U-Net ('{FINETUNED_UNET_COMPONENT}'); the service serves "
                    f"base + '{ADAPTIVE_COMPONENT}' versions only; publish with the adaptive-network objective"
                )
            uses_adaptive = ADAPTIVE_COMPONENT in components
            with self._lock:
                standby = self._standby
                while standby.in_flight:
                    self._standby_idle.wait()
                standby.version = None
            if uses_adaptive:
                try:
                    load_state_into(folder, ADAPTIVE_COMPONENT, standby.network)
                except (PerfusionError, OSError, RuntimeError, ValueError, KeyError) as exc:
                    raise VersionRefused(
                        f"version {version}: its {ADAPTIVE_COMPONENT} does not load into the serving network "
                        f"({type(exc).__name__}: {exc}); republish it from the current base model"
                    ) from exc
                bad = [
                    name for name, tensor in standby.network.state_dict().items() if not torch.isfinite(tensor).all()
                ]
                if bad:
                    raise VersionRefused(
                        f"version {version}: {ADAPTIVE_COMPONENT} holds non-finite weights in {bad[:3]}; "
                        "the training step diverged, roll back with `perfusion models rollback VERSION`"
                    )
            with self._lock:
                standby.version = version
                standby.uses_adaptive = uses_adaptive
                self._active, self._standby = standby, self._active
            logger.info("model version %s swapped in (adaptive network: %s)", version, uses_adaptive)


def load_serving_generator(
    base_folder: Path,
    store_root: Path,
    text_encoder: TextStates,
    sampler: SamplerConfig = SERVING_SAMPLER,
) -> PersonalizedGenerator:
    """The generator ``perfusion serve`` runs: the base checkpoint, then LATEST of the model store when it verifies.

    ``base_folder`` holds the frozen base UNet (``unet``) and the attribute classifier (``attribute_classifier``);
    the adaptive network's shape comes from LATEST's config.json (or the default config before any publish).
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
    )
    if latest is not None:
        try:
            store.verify(latest)
            generator.load_version(latest, store.path(latest))
        except PerfusionError as exc:
            logger.error("LATEST %s refused at start (%s); serving the base model until a good version", latest, exc)
    return generator
