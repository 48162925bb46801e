"""The architectures of Burda, Grosse & Salakhutdinov (2016), section 5.

1 stochastic layer:  q(z|x): x -200-200- z(50);       p(x|z): z -200-200- x (Bernoulli logits).
2 stochastic layers: q(z1|x): x -200-200- z1(100);    q(z2|z1): z1 -100-100- z2(50);
                     p(z1|z2): z2 -100-100- z1(100);  p(x|z1): z1 -200-200- x.
tanh hidden units, Gaussian latent layers, N(0, I) prior on the top layer, Glorot-uniform weights and
zero biases.
"""

from __future__ import annotations

import numbers

from torch import Tensor

from iwae.models.latent import DeepLatentModel
from iwae.models.layers import BernoulliLayer, GaussianLayer, StandardNormal, glorot_init_
from iwae.settings import check_integer

# (hidden widths, latent width) of each stochastic layer of q, bottom-up; p mirrors them.
_ENCODERS = {1: [((200, 200), 50)], 2: [((200, 200), 100), ((100, 100), 50)]}


def burda(layers: int, x_dim: int = 784, train_mean: Tensor | None = None) -> DeepLatentModel:
    """The paper's 1- or 2-stochastic-layer model for binary data of dimension ``x_dim``.

    Args:
      layers: number of stochastic layers, 1 or 2.
      x_dim: data dimension (784 for 28x28 images).
      train_mean: optional training-set pixel means, shape (x_dim,); if given, the output bias is set
        to their logit (clipped to [0.001, 0.999]) as in the paper.
    """
    if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or layers not in _ENCODERS:
        raise ValueError(f"layers must be 1 or 2 (the paper's architectures); got {layers!r}")
    layers = int(layers)
    x_dim = check_integer(x_dim, "x_dim", 1)
    encoder, decoder, in_dim = [], [], x_dim
    for level, (hidden, z_dim) in enumerate(_ENCODERS[layers]):
        encoder.append(GaussianLayer(in_dim, hidden, z_dim))
        observation = BernoulliLayer if level == 0 else GaussianLayer
        decoder.append(observation(z_dim, hidden[::-1], in_dim))
        in_dim = z_dim
    model = DeepLatentModel(encoder, decoder, StandardNormal(in_dim), x_dim=x_dim)
    glorot_init_(model)
    if train_mean is not None:
        model.decoder[0].set_output_bias(train_mean)
    return model
