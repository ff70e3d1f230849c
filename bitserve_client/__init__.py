"""A Python client for the bitserve REST API v1 (httpx and httpx-sse only; no bitcore or
service imports)."""

from bitserve_client.client import BitserveClient
from bitserve_client.errors import ApiError, BitserveError, JobFailed, JobTimeout
from bitserve_client.files import zip_folder
from bitserve_client.schema import (
    BaseModel,
    Dataset,
    Job,
    JobEvent,
    Label,
    Metrics,
    Model,
    Plan,
    PlanEstimate,
    Predictions,
    Progress,
    ProgressEvent,
)

__all__ = [
    "ApiError",
    "BaseModel",
    "BitserveClient",
    "BitserveError",
    "Dataset",
    "Job",
    "JobEvent",
    "JobFailed",
    "JobTimeout",
    "Label",
    "Metrics",
    "Model",
    "Plan",
    "PlanEstimate",
    "Predictions",
    "Progress",
    "ProgressEvent",
    "zip_folder",
]
