"""Deployment: ``convert`` a fake-quantized denoiser into packed integer layers that run the low-bit kernels of
``questdiff.kernels``, and save / load the result without the FP base model."""
from .checkpoint import is_deployed_checkpoint, load_deployed, read_deployed_metadata, save_deployed
from .convert import Deployment, convert, deployment, is_deployed
from .layers import DeployedConv, DeployedLayer, DeployedLinear

__all__ = [
    "DeployedConv",
    "Deployment",
    "DeployedLayer",
    "DeployedLinear",
    "convert",
    "deployment",
    "is_deployed",
    "is_deployed_checkpoint",
    "load_deployed",
    "read_deployed_metadata",
    "save_deployed",
]
