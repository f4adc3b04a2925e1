"""The cloud boundary. Import implementations from their modules (`shared.cloud.aws`,
`shared.cloud.fake`, `shared.cloud.moto_server`) so that importing the interface stays cheap and
pulls in neither aioboto3 nor moto."""

from shared.cloud.base import (
    AccessDenied,
    Cloud,
    CloudError,
    Image,
    ImageState,
    Instance,
    InstanceState,
    InsufficientCapacity,
    InvalidState,
    LaunchSpec,
    LaunchTemplateRef,
    NotFound,
    Throttled,
    check_client_token,
    error_for_code,
)

__all__ = [
    "AccessDenied",
    "Cloud",
    "CloudError",
    "Image",
    "ImageState",
    "Instance",
    "InstanceState",
    "InsufficientCapacity",
    "InvalidState",
    "LaunchSpec",
    "LaunchTemplateRef",
    "NotFound",
    "Throttled",
    "check_client_token",
    "error_for_code",
]
