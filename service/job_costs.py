"""The cost check a job passes before it is accepted (POST /v1/jobs, and the plan preview).

bitcore.costs estimates what a plan will take (one micro-batch's training memory, the bytes
of the dataset's image cache at the plan's precrop: the images' pixels at that size, at most
about twice the uploaded archive's bytes; the images the run processes); each figure
is compared with its setting, and a job past any of them is refused (422 job_too_expensive,
details: which figure, the estimate, the limit and the setting that raises it) before a row is
written or a worker is held. The override bounds (bitcore.hyperrule.MAX_OVERRIDE) cap each
value; this caps their products, which no single bound can.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bitcore import costs
from bitcore.hyperrule import Plan
from service.domain_errors import InvalidRequest
from service.settings import Settings

HINTS = {
    "memory_bytes": "a smaller crop or micro_batch_size",
    "cache_bytes": "a smaller precrop",
    "images_processed": "fewer steps or a smaller batch_size",
}


def check_cost(
    plan: Mapping[str, Any],
    base_model: str,
    num_images: int,
    settings: Settings,
    *,
    dataset_bytes: int | None = None,
) -> costs.TrainingCost:
    """The estimate of `plan` (REST shape) on a dataset of `num_images` images whose archive
    has `dataset_bytes` (the dataset row's `bytes`), or InvalidRequest("job_too_expensive")
    naming the first figure past its limit."""
    parsed = Plan.from_dict(plan)
    cost = costs.estimate(base_model, parsed, num_images, dataset_bytes)
    hints = dict(HINTS)
    if cost.cache_bytes < costs.pixels_bytes(num_images, parsed.precrop):
        # Bound by the dataset's bytes: a smaller precrop only helps once its pixels are less.
        hints["cache_bytes"] = "a smaller dataset (its images are cached in about their bytes)"
    limits = (
        ("memory_bytes", cost.memory_bytes, settings.job_max_memory_bytes),
        ("cache_bytes", cost.cache_bytes, settings.job_max_cache_bytes),
        ("images_processed", cost.images_processed, settings.job_max_images),
    )
    for name, value, limit in limits:
        if value > limit:
            setting = "BITSERVE_JOB_MAX_" + {"images_processed": "IMAGES"}.get(name, name.upper())
            raise InvalidRequest(
                "job_too_expensive",
                f"this job's estimated {name.replace('_', ' ')} ({value:,}) is over this "
                f"server's limit ({limit:,}); ask for {hints[name]}",
                {"resource": name, "estimate": value, "limit": limit, "setting": setting},
            )
    return cost


__all__ = ["check_cost"]
