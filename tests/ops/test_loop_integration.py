"""The whole loop against the real broker: the stream worker, the trainer and the generator service as
subprocesses; simulated shoppers (hidden tastes over pixels) act on the groups they are served, through the HTTP API
only, until the trainer has published a version that the service serves and a design reached its threshold.

Checked: the served version moves from the base to a published one without a restart and without a failed request,
and each design that went to production has exactly one ProductionOrder on Kafka, which the service reports too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.demo.loop import LoopSettings, run_loop
from ops.demo.shoppers import reference_images
from simulator.ground_truth import PixelPreferencePanel

# Small and quick: one design, few shoppers, few denoising and training steps; the loop stops once both goals are met.
SETTINGS = LoopSettings(
    rounds=2,
    max_rounds=10,
    prompts=("a red striped short-sleeve slim t-shirt",),
    order_threshold=2,
    sampling_steps=2,
    reward_steps=3,
    diffusion_steps=1,
    groups_per_batch=2,
    samples_per_request=3,
    max_wait_s=5.0,
    shown_users=2,
)


@pytest.mark.timeout(600)
def test_versions_are_published_and_served_and_production_fires_once(kafka_bootstrap: str, tmp_path: Path) -> None:
    panel = PixelPreferencePanel(n_users=4, seed=1).fit_scale(reference_images(48, seed=1, size=32))
    lines: list[str] = []
    outcome = run_loop(SETTINGS, panel, kafka_bootstrap, tmp_path / "run", emit=lines.append)
    transcript = "\n".join(lines)

    assert outcome.failed_requests == [], transcript
    published = [update.version for update in outcome.observed.model_updates]
    assert published, f"no version was published:\n{transcript}"
    assert outcome.initial_version == "base"
    assert outcome.final_version in published, transcript
    served = {version for report in outcome.rounds for version in report.versions_served}
    assert served & set(published), f"no response came from a published version:\n{transcript}"

    by_design = outcome.observed.production_orders_by_design()
    assert by_design, f"no design reached its threshold:\n{transcript}"
    for design_id, orders in by_design.items():
        assert len(orders) == 1, f"{design_id} has {len(orders)} production orders"
        assert orders[0].net_orders >= orders[0].threshold == SETTINGS.order_threshold
    final_designs = {design.design_id: design for design in outcome.rounds[-1].designs}
    assert all(final_designs[design_id].production_triggered for design_id in by_design)
    assert outcome.observed.group_samples > 0 and outcome.observed.train_requests
    assert "every shopper's features" in transcript and "ProductionOrder for" in transcript
