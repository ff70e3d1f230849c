"""Override bounds (bitcore.hyperrule) and the cost estimate (bitcore.costs, service.job_costs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitcore import costs, hyperrule
from bitcore.models import MODEL_SPECS, count_parameters
from service.domain_errors import InvalidRequest
from service.job_costs import check_cost
from service.settings import Settings


@pytest.mark.parametrize(("name", "bound"), sorted(hyperrule.MAX_OVERRIDE.items()))
def test_the_library_refuses_overrides_past_their_bound(name: str, bound: float) -> None:
    # The planner itself (the CLI and any caller, not only the API) holds the bounds.
    over = bound + 1 if isinstance(bound, int) else bound * 1.5
    with pytest.raises(hyperrule.PlanError, match=f"{name} must be <= ") as caught:
        hyperrule.plan(1000, (500, 500), **{name: over})
    assert caught.value.field == name


def test_the_library_accepts_overrides_at_their_bound() -> None:
    limits = hyperrule.MAX_OVERRIDE
    plan = hyperrule.plan(
        1000,
        (500, 500),
        steps=limits["steps"],
        batch_size=limits["batch_size"],
        micro_batch_size=limits["micro_batch_size"],
        crop=limits["crop"],
        precrop=limits["precrop"],
        base_lr=limits["base_lr"],
        mixup_alpha=limits["mixup_alpha"],
    )
    assert (plan.total_steps, plan.batch_size, plan.crop) == (100_000, 4096, 1024)


# (training images, median image size) of the test suites' datasets, and a large one.
DATASETS = [(9, (40, 48)), (12, (40, 50)), (8, (32, 32)), (1000, (500, 500)), (100_000, (512, 512))]


@pytest.mark.parametrize("model", sorted(MODEL_SPECS))
@pytest.mark.parametrize(("images", "size"), DATASETS)
def test_the_rules_own_plans_pass_the_default_limits(
    model: str, images: int, size: tuple[int, int], tmp_path: Path
) -> None:
    plan = hyperrule.plan(images, size)
    cost = check_cost(plan.to_dict(), model, images, Settings(home=tmp_path))
    assert cost.images_processed == plan.total_steps * plan.batch_size
    assert cost.cache_bytes == images * plan.precrop**2 * 3


def test_memory_grows_with_the_micro_batch_and_the_crop() -> None:
    base = hyperrule.plan(1000, (500, 500), crop=128, precrop=160)
    one = costs.estimate("BiT-M-R50x1", base, 1000)
    state = count_parameters("BiT-M-R50x1") * 4 * 3
    per_image = one.memory_bytes - state
    # A ResNet-50 saves on the order of a few KB per input pixel for its backward pass.
    assert 1_000 < per_image / 128**2 < 5_000
    eight = costs.estimate(
        "BiT-M-R50x1", hyperrule.apply_overrides(base, {"micro_batch_size": 8}), 1000
    )
    assert eight.memory_bytes - state == pytest.approx(8 * per_image, rel=1e-6)
    wider = costs.estimate("BiT-M-R50x1", hyperrule.apply_overrides(base, {"crop": 160}), 1000)
    assert wider.memory_bytes - state == pytest.approx(per_image * (160 / 128) ** 2, rel=1e-6)
    # Wider and deeper models save more per pixel.
    assert costs.activation_bytes_per_pixel("BiT-M-R152x4") > 5 * costs.activation_bytes_per_pixel(
        "BiT-M-R50x1"
    )


def test_a_plan_past_a_limit_names_it(tmp_path: Path) -> None:
    plan = hyperrule.plan(12, (40, 48), steps=1000, batch_size=100).to_dict()
    settings = Settings(home=tmp_path, job_max_images=99_999)
    with pytest.raises(InvalidRequest) as caught:
        check_cost(plan, "tiny-R10x0.25", 12, settings)
    assert caught.value.code == "job_too_expensive"
    assert caught.value.details == {
        "resource": "images_processed",
        "estimate": 100_000,
        "limit": 99_999,
        "setting": "BITSERVE_JOB_MAX_IMAGES",
    }


def test_the_cache_estimate_is_bounded_by_the_dataset_bytes(tmp_path: Path) -> None:
    """Issue 12: 30,000 96 px JPEGs (a 70 MB archive) at precrop 512 are not 23.6 GB of pixels:
    each image is cached in at most its own file's bytes."""
    plan = hyperrule.plan(30_000, (96, 96))
    assert plan.precrop == 512
    pixels = 30_000 * 512 * 512 * 3
    assert costs.estimate("tiny-R10x0.25", plan, 30_000).cache_bytes == pixels  # size unknown
    bounded = costs.estimate("tiny-R10x0.25", plan, 30_000, dataset_bytes=70_000_000)
    assert bounded.cache_bytes == 140_000_000  # CACHE_DATASET_FACTOR x the archive
    # Big images on a small precrop: their pixels are the smaller figure.
    assert costs.cache_estimate(1000, 128, 10**10) == 1000 * 128 * 128 * 3
    assert costs.cache_estimate(1000, 128, 24_000_000) == 48_000_000

    # Past the limit because of the dataset's bytes: a smaller precrop is not the remedy.
    settings = Settings(home=tmp_path, job_max_cache_bytes=100_000_000)
    with pytest.raises(InvalidRequest) as caught:
        check_cost(plan.to_dict(), "tiny-R10x0.25", 30_000, settings, dataset_bytes=70_000_000)
    assert caught.value.details == {
        "resource": "cache_bytes",
        "estimate": 140_000_000,
        "limit": 100_000_000,
        "setting": "BITSERVE_JOB_MAX_CACHE_BYTES",
    }
    assert str(caught.value).endswith(
        "ask for a smaller dataset (its images are cached in about their bytes)"
    )
    # Past it because of the pixels: a smaller precrop is.
    small = hyperrule.plan(100, (96, 96))
    with pytest.raises(InvalidRequest, match=r"ask for a smaller precrop$") as caught:
        check_cost(
            small.to_dict(), "tiny-R10x0.25", 100, Settings(home=tmp_path, job_max_cache_bytes=10)
        )
    assert caught.value.details["estimate"] == 100 * small.precrop**2 * 3
