"""The attribute encoder: a multi-hot condition -> the class embedding of a `UNet2DModel(class_embed_type="identity")`.

With `class_embed_type="identity"` the UNet adds `class_labels` (a float tensor `[B, time_embed_dim]`, where
`time_embed_dim = 4 * block_out_channels[0]`) to its time embedding. This encoder produces that tensor from the
multi-hot vector of `punkdiff.conditions` (type one-hot, accessories multi-hot, a block per group).

Both layers are bias-free and SiLU(0) = 0, so the all-zero vector ("unspecified") maps to exactly zero whatever the
weights: the null condition is the unconditional model, with no learned offset to drift, and a group left out
adds nothing. It imports only torch and diffusers, so it can travel with a pipeline and load as its component.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class AttributeEncoder(ModelMixin, ConfigMixin):
    r"""Multi-hot attributes `[B, num_attributes]` -> class embedding `[B, embedding_dim]`: a bias-free two-layer MLP.

    Args:
        num_attributes (`int`): Width of the multi-hot condition vector.
        embedding_dim (`int`): The UNet's time-embedding width, `4 * unet.config.block_out_channels[0]`.
        hidden_dim (`int`, *optional*): Hidden width; defaults to `embedding_dim`.

    Examples:
        ```py
        >>> encoder = AttributeEncoder(num_attributes=93, embedding_dim=128)
        >>> encoder(torch.zeros(2, 93)).abs().max().item()  # the null condition adds nothing
        0.0
        >>> encoder.save_pretrained("attribute_encoder")  # config.json + diffusion_pytorch_model.safetensors
        >>> AttributeEncoder.from_pretrained("attribute_encoder").config.num_attributes
        93
        ```
    """

    @register_to_config
    def __init__(self, num_attributes: int, embedding_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        if num_attributes < 1 or embedding_dim < 1 or (hidden_dim is not None and hidden_dim < 1):
            raise ValueError(f"AttributeEncoder needs positive widths, got num_attributes={num_attributes}, "
                             f"embedding_dim={embedding_dim}, hidden_dim={hidden_dim}")
        hidden_dim = hidden_dim or embedding_dim
        self.linear_1 = nn.Linear(num_attributes, hidden_dim, bias=False)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_dim, embedding_dim, bias=False)

    def forward(self, attributes: torch.Tensor) -> torch.Tensor:
        """`[B, num_attributes]` multi-hot (0/1, or fractions) -> `[B, embedding_dim]`, zero rows to zero rows."""
        if attributes.ndim != 2 or attributes.shape[1] != self.config.num_attributes:
            raise ValueError(f"AttributeEncoder expects attributes of shape [batch, {self.config.num_attributes}], "
                             f"got {list(attributes.shape)}; encode the request with the model's condition vocabulary")
        return self.linear_2(self.act(self.linear_1(attributes.to(self.linear_1.weight.dtype))))
