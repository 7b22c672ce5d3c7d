"""The simulator's hidden preferences: computed from pixels, and never visible to the system's code."""

import ast
from pathlib import Path

import numpy as np
import pytest

from perfusion.attributes import COLOURS
from simulator.ground_truth import PIXEL_FEATURE_NAMES, PixelPreferencePanel, pixel_features

REPO = Path(__file__).resolve().parents[2]
BACKGROUND = (240, 240, 240)


def garment(colour, size=32, box=(8, 24, 10, 22), stripes=False):
    """A plain rectangle 'garment' on a light background; optional horizontal stripes."""
    image = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    top, bottom, left, right = box
    image[top:bottom, left:right] = colour
    if stripes:
        image[top:bottom:2, left:right] = (20, 20, 20)
    return image


def feature(images, name):
    return pixel_features(np.stack(images))[:, PIXEL_FEATURE_NAMES.index(name)]


def test_colour_histogram_finds_the_garment_colour():
    red, blue = garment(COLOURS["red"]), garment(COLOURS["blue"])
    assert feature([red], "colour:red")[0] > 0.9
    assert feature([blue], "colour:blue")[0] > 0.9
    assert feature([red], "colour:blue")[0] < 0.05


def test_texture_is_higher_for_stripes_than_plain():
    plain, striped = garment(COLOURS["red"]), garment(COLOURS["red"], stripes=True)
    low, high = feature([plain, striped], "texture")
    assert low == pytest.approx(0.0, abs=1e-9)
    assert high > 0.3


def test_shape_features():
    tall = garment(COLOURS["navy"], box=(2, 30, 12, 20))
    wide = garment(COLOURS["navy"], box=(12, 20, 2, 30))
    elongation = feature([tall, wide], "elongation")
    assert elongation[0] > 0 > elongation[1]
    coverage = feature([tall], "coverage")[0]
    assert coverage == pytest.approx(28 * 8 / 32 / 32)


def test_brightness_orders_black_below_white_garments():
    black, yellow = garment(COLOURS["black"]), garment(COLOURS["yellow"])
    dark, light = feature([black, yellow], "brightness")
    assert dark < light


def test_panel_is_seeded_and_segments_disagree():
    images = np.stack([garment(COLOURS[name]) for name in COLOURS] + [garment(COLOURS["red"], stripes=True)])
    panel = PixelPreferencePanel(n_users=8, seed=3).fit_scale(images)
    again = PixelPreferencePanel(n_users=8, seed=3).fit_scale(images)
    users = panel.user_ids()
    assert users == again.user_ids()
    np.testing.assert_allclose(panel.utilities(users[0], images), again.utilities(users[0], images))
    bold = next(u for u in users if panel.segment(u) == "bold-and-bright")
    dark = next(u for u in users if panel.segment(u) == "dark-minimal")
    red, black = images[list(COLOURS).index("red")], images[list(COLOURS).index("black")]
    bold_u = panel.utilities(bold, np.stack([red, black]))
    dark_u = panel.utilities(dark, np.stack([red, black]))
    assert bold_u[0] > bold_u[1]
    assert dark_u[1] > dark_u[0]
    assert set(panel.profile(bold)) == {"age_group", "region"}


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="images"):
        pixel_features(np.zeros((32, 32, 3), dtype=np.uint8))


SYSTEM_PACKAGES = ("perfusion", "streams", "features", "trainer", "service")


@pytest.mark.parametrize("package", SYSTEM_PACKAGES)
def test_system_code_never_imports_the_simulator(package):
    offenders = []
    for path in (REPO / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {name}" for name in names if name.split(".")[0] == "simulator"]
    assert not offenders, "system code must not see the simulator's ground truth:\n" + "\n".join(offenders)
