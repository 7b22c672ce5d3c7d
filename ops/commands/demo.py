"""``perfusion demo``: the whole loop on this machine, end to end, with visible output.

Starts the project's Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS points elsewhere), then runs
:func:`ops.demo.loop.run_loop` in ``<state>/demo``: the Feast repo applied and the shoppers' profiles pushed,
the stream worker (every agent), the trainer and the generator service as subprocesses with their logs in
``<state>/demo/logs``, API keys for the merchants, the shoppers, the shop's order system and an operator in
``<state>/demo/service/keys.json``, merchants and simulated shoppers acting through the service's HTTP API with their
keys for a few rounds (the order system reporting the shoppers' orders and returns), and
after each round the features, samples, training requests, model versions and demand the loop produced. Everything
started here is stopped at the end, also on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from typing import Any

log = logging.getLogger(__name__)

REFERENCE_IMAGES = 96


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole loop on this machine (worker, trainer, service, simulated shoppers) and show it",
        description="Broker, Feast repo, stream worker, trainer and generator service; API keys for every merchant, "
        "shopper, the shop's order system and an operator; merchants create designs and simulated shoppers with "
        "hidden tastes judge the generated images for a few rounds through the HTTP API, each with their own key, "
        "and the order system reports their orders and returns; each round prints what changed. Everything started "
        "here is stopped at the end.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds always played")
    parser.add_argument(
        "--max-rounds", type=int, default=12, help="most rounds, played until a new version and a production order"
    )
    parser.add_argument("--shoppers", type=int, default=6, help="simulated shoppers")
    parser.add_argument("--threshold", type=int, default=3, help="net orders at which a design goes to production")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per candidate group")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shoppers and their choices")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ops.demo.loop import LoopSettings, run_loop
    from ops.demo.shoppers import reference_images
    from perfusion.errors import ConfigError
    from perfusion.paths import state_dir
    from perfusion.sampling import BASE_CHECKPOINT_DIR, base_model_config
    from simulator.ground_truth import PixelPreferencePanel

    for noisy in ("kafka", "feast", "httpx"):  # their INFO lines would bury the loop's story
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.shoppers < 1:
        raise ConfigError(f"--shoppers must be at least 1, got {args.shoppers}")
    settings = LoopSettings(
        rounds=args.rounds,
        max_rounds=args.max_rounds,
        order_threshold=args.threshold,
        sampling_steps=args.steps,
        seed=args.seed,
    )
    size = base_model_config(BASE_CHECKPOINT_DIR).sample_size
    panel = PixelPreferencePanel(n_users=args.shoppers, seed=args.seed).fit_scale(
        reference_images(REFERENCE_IMAGES, args.seed, size)
    )
    run_dir = state_dir() / "demo"
    shutil.rmtree(run_dir, ignore_errors=True)  # each demo starts from the base model and empty stores
    run_dir.mkdir(parents=True)
    try:
        from harness.loop import running_broker

        with running_broker(announce=_step) as bootstrap:
            _step(f"Kafka at {bootstrap}")
            run_loop(settings, panel, bootstrap, run_dir)
    except KeyboardInterrupt:
        _step("interrupted: everything the demo started has been stopped")
        return 130
    return 0


def _step(message: str) -> None:
    print(f"==> {message}", flush=True)
