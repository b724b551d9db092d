"""cyclediffusion: text-to-image latent diffusion from scratch, and CycleDiffusion image editing.

The public API::

    from cyclediffusion import Text2ImagePipeline
    pipe = Text2ImagePipeline.from_pretrained("runs/t2i")
    image = pipe("a red circle", num_inference_steps=50, guidance_scale=4).images[0]
"""

from __future__ import annotations

__version__ = "0.1.0"

from .diffusion import (  # noqa: E402
    FlowConfig,
    FlowMatching,
    GaussianConfig,
    GaussianDiffusion,
    create_noise_process,
)
from .models import (  # noqa: E402
    DIT_SIZES,
    AutoencoderKL,
    Captioner,
    CaptionerConfig,
    DiT,
    DiTConfig,
    TextEncoder,
    TextEncoderConfig,
    UNet,
    UNetConfig,
    VAEConfig,
)
from .pipelines import (  # noqa: E402
    CaptionPipeline,
    CycleDiffusionPipeline,
    ImagePipelineOutput,
    NotAPipelineError,
    Text2ImagePipeline,
    translate,
)
from .text import Tokenizer  # noqa: E402

__all__ = [
    "DIT_SIZES",
    "AutoencoderKL",
    "CaptionPipeline",
    "Captioner",
    "CaptionerConfig",
    "CycleDiffusionPipeline",
    "DiT",
    "DiTConfig",
    "FlowConfig",
    "FlowMatching",
    "GaussianConfig",
    "GaussianDiffusion",
    "ImagePipelineOutput",
    "NotAPipelineError",
    "Text2ImagePipeline",
    "TextEncoder",
    "TextEncoderConfig",
    "Tokenizer",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "__version__",
    "create_noise_process",
    "translate",
]
