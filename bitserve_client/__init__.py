"""A Python client for the bitserve REST API v1 (httpx and httpx-sse only; no bitcore or
service imports)."""

from bitserve_client.client import BitserveClient
from bitserve_client.errors import (
    ApiError,
    BatchPredictionFailed,
    BatchPredictionTimeout,
    BitserveError,
    DatasetFailed,
    DatasetTimeout,
    JobFailed,
    JobTimeout,
    ServerUnreachable,
)
from bitserve_client.files import zip_folder
from bitserve_client.schema import (
    BaseModel,
    BatchPrediction,
    Dataset,
    IngestProgress,
    IngestProgressEvent,
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
    "BatchPrediction",
    "BatchPredictionFailed",
    "BatchPredictionTimeout",
    "BitserveClient",
    "BitserveError",
    "Dataset",
    "DatasetFailed",
    "DatasetTimeout",
    "IngestProgress",
    "IngestProgressEvent",
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
    "ServerUnreachable",
    "zip_folder",
]
