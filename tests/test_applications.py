"""keras.applications models swapped to bnlayers agree with the built-in: a CI subset of
examples/applications.py (which runs all four architectures at 64x64), through its functions.

Per model: every BN layer swapped; inference logits equal to float32
rounding; the first training-mode loss equal (models without dropout); and,
with both models in float64, the gradient of every weight equal to the
built-in's. The bounds are the script's (`applications.BOUNDS`), about ten
times the largest figure measured.
"""

import pytest

from example_scripts import example_module

applications = example_module("applications")

# MobileNetV3Small: depthwise convolutions, squeeze-and-excitation, hard
# swish; built without its dropout layer so that its first training-mode
# loss is compared too. ResNet50: residual stages, biases before BN. Both at
# 32x32 (the smallest input keras.applications accepts), batch 8.
CI_MODELS = {"MobileNetV3Small": {"dropout_rate": 0.0}, "ResNet50": {}}
SIZE, BATCH = 32, 8

pytestmark = [pytest.mark.needs_x64, pytest.mark.slow]


@pytest.fixture(scope="module", params=list(CI_MODELS))
def result(request):
    options = CI_MODELS[request.param]
    return applications.check(request.param, size=SIZE, batch=BATCH, **options)


def test_every_batchnorm_layer_is_swapped(result):
    before, after = result["bn_before"], result["bn_after"]
    assert before["keras"] > 30 and before["bnlayers"] == 0, before
    assert after == {"keras": 0, "bnlayers": before["keras"]}, after
    assert not applications.failures(result)


def test_inference_logits_agree(result):
    assert result["prediction_rel"] <= applications.BOUNDS["prediction_rel"], (
        result
    )


def test_first_training_loss_agrees(result):
    if result["loss32"] is None:
        pytest.skip(f"{result['model']}: {result['loss32_skipped']}")
    assert result["loss32"] <= applications.BOUNDS["loss32"], result


def test_float64_gradients_agree(result):
    assert result["weights"] > 100, result
    assert result["grad64_rel"] <= applications.BOUNDS["grad64_rel"], result
    # The loss itself, in float64, to a few units of its last place.
    assert result["loss64"] <= 1e-12, result
