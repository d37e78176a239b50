"""The eager PyTorch model that ``histohelper export`` freezes.

:class:`HistoHelperModel` holds a torchvision ResNet18 (He et al., CVPR 2016) as the
patch network, its own ``fc`` being the C-class patch head, so a plain torchvision
``resnet18`` state_dict with a C-output ``fc`` loads into ``model.patch`` as is, and a
:class:`GatedAttentionMIL` slide head (Ilse, Tomczak & Welling, "Attention-based Deep
Multiple Instance Learning", ICML 2018, gated variant).

Every method here is TorchScript-compatible and shape-generic: the artifact is made
with ``torch.jit.script`` (not ``trace``), so no batch size, bag size or image size
is baked in.
"""

from __future__ import annotations

from typing import Optional

import torch
import torchvision
from torch import Tensor, nn

#: ImageNet channel statistics (torchvision's ``ResNet18_Weights`` transforms), RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Exported TorchScript methods and what they take and return (goes into the manifest).
METHODS = {
    "predict_patches_uint8": (
        "(images: uint8 [B,H,W,3] RGB, want_cams: bool) -> "
        "(logits f32 [B,C], embeddings f32 [B,D], cams f32 [B,C,h,w] | None)"
    ),
    "predict_patches_nchw": (
        "(x: float32 [B,3,H,W] normalised, want_cams: bool) -> "
        "(logits f32 [B,C], embeddings f32 [B,D], cams f32 [B,C,h,w] | None)"
    ),
    "aggregate": "(embeddings: f32 [N,D], N >= 1) -> (slide logits f32 [K], attention f32 [N])",
    "aggregate_mc": (
        "(embeddings: f32 [N,D], N >= 1, passes: int >= 1, seed: int) -> "
        "slide probabilities f32 [passes,K] with dropout active (Monte-Carlo dropout)"
    ),
    "forward": "(images: uint8 [B,H,W,3]) -> logits f32 [B,C]",
}


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL pooling and a linear slide classifier.

    After Ilse, Tomczak & Welling (ICML 2018), eq. 9 (gated attention):
    ``a_n = softmax_n( w^T (tanh(V h_n) * sigmoid(U h_n)) )``, ``z = sum_n a_n h_n``,
    ``logits = W_c z + b_c``. Module names follow the authors' reference code
    (github.com/AMLab-Amsterdam/AttentionDeepMIL, ``GatedAttention``) so its
    ``attention_V.0.*``, ``attention_U.0.*`` and ``attention_weights.*`` keys load; the
    linear layers carry biases as there. The classifier is one ``nn.Linear`` with K
    outputs (softmax over K) instead of the paper's single sigmoid output.

    Args:
        embedding_dim: D, instance embedding size (512 for ResNet18).
        attention_dim: L, hidden size of the two attention branches (128).
        num_classes: K slide classes.
        dropout: probability of the two dropout layers (on the input embeddings and on
            the gated attention hidden layer, as in CLAM), active only in train mode;
            parameter-free, so the state_dict keys do not change and eval/export is
            the same function for any value (default 0: no dropout).
    """

    def __init__(
        self,
        embedding_dim: int = 512,
        attention_dim: int = 128,
        num_classes: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.attention_V = nn.Sequential(nn.Linear(embedding_dim, attention_dim), nn.Tanh())
        self.attention_U = nn.Sequential(nn.Linear(embedding_dim, attention_dim), nn.Sigmoid())
        self.attention_weights = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.input_dropout = nn.Dropout(dropout)
        self.attention_dropout = nn.Dropout(dropout)
        #: The dropout probability as a plain attribute (not in the state_dict), so the
        #: scripted artifact carries it for :meth:`forward_mc`.
        self.dropout_p: float = float(dropout)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Aggregate one bag.

        Args:
            h: float ``[N, D]`` instance embeddings, N >= 1.

        Returns:
            ``(logits [K], attention [N])``, attention non-negative and summing to 1.

        Raises:
            RuntimeError: ``"EmptyBag: ..."`` when N == 0 (softmax over nothing would
                give NaN); runtimes turn it into ``EmptyBagError`` before calling.
        """
        if h.dim() != 2:
            raise RuntimeError("BadBag: embeddings must be [N, D]")
        if h.size(0) == 0:
            raise RuntimeError("EmptyBag: cannot aggregate a bag of zero instances")
        h = self.input_dropout(h)  # identity in eval mode
        gate = self.attention_V(h) * self.attention_U(h)  # [N, L]
        gate = self.attention_dropout(gate)
        a_logit = self.attention_weights(gate).squeeze(1)  # [N]
        attention = torch.softmax(a_logit, dim=0)  # [N]
        z = attention.unsqueeze(0) @ h  # [1, D]: attention-weighted mean
        logits = self.classifier(z).squeeze(0)  # [K]
        return logits, attention

    def forward_mc(self, h: Tensor, passes: int, seed: int) -> Tensor:
        """Monte-Carlo dropout (Gal & Ghahramani, ICML 2016): ``passes`` stochastic
        forward passes with both dropout layers active, whatever the module's mode.

        Each pass draws inverted-dropout masks (keep with probability ``1 - p``, kept
        values scaled by ``1 / (1 - p)``, as ``nn.Dropout`` in train mode) on the
        input embeddings ``[N, D]`` and on the gated hidden layer ``[N, L]`` from one
        ``torch.Generator`` seeded with ``seed`` on ``h``'s device, so the same
        ``(h, passes, seed)`` on the same device and torch build gives the same result.

        Args:
            h: float ``[N, D]`` instance embeddings, N >= 1.
            passes: number of passes P >= 1.
            seed: generator seed.

        Returns:
            float ``[P, K]`` slide probabilities (softmax of each pass's logits).

        Raises:
            RuntimeError: ``"NoDropout: ..."`` when the dropout probability is 0,
                ``"BadBag"``/``"EmptyBag"`` as :meth:`forward`, ``"BadPasses"`` for P < 1.
        """
        p = self.dropout_p
        if p <= 0.0:
            raise RuntimeError("NoDropout: the MIL head has no dropout")
        if passes < 1:
            raise RuntimeError("BadPasses: passes must be >= 1")
        if h.dim() != 2:
            raise RuntimeError("BadBag: embeddings must be [N, D]")
        if h.size(0) == 0:
            raise RuntimeError("EmptyBag: cannot aggregate a bag of zero instances")
        g = torch.Generator(device=h.device)
        g.manual_seed(seed)
        keep = 1.0 - p
        out: list[Tensor] = []
        for _ in range(passes):
            mask_h = torch.empty_like(h).bernoulli_(keep, generator=g)
            hd = h * mask_h / keep
            gate = self.attention_V(hd) * self.attention_U(hd)  # [N, L]
            mask_g = torch.empty_like(gate).bernoulli_(keep, generator=g)
            gate = gate * mask_g / keep
            attention = torch.softmax(self.attention_weights(gate).squeeze(1), dim=0)
            logits = self.classifier(attention.unsqueeze(0) @ hd).squeeze(0)  # [K]
            out.append(torch.softmax(logits, dim=0))
        return torch.stack(out)  # [P, K]


def build_resnet18(num_classes: int) -> torchvision.models.ResNet:
    """A torchvision ResNet18 with a ``num_classes``-output ``fc``, randomly initialised.

    Args:
        num_classes: C patch classes.

    Returns:
        ``torchvision.models.resnet18(weights=None, num_classes=C)``; its init follows
        torchvision (Kaiming-normal convs, BN weight 1 / bias 0), seeded by the caller.
    """
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


class HistoHelperModel(nn.Module):
    """Patch classifier + embedder + CAMs, and gated attention MIL, in one module.

    The patch path returns logits from ResNet18's own ``fc``, the 512-d global-average-
    pooled layer4 features as embeddings, and class activation maps
    ``cams[b, c] = sum_k fc.weight[c, k] * layer4[b, k]`` (Zhou et al., "Learning Deep
    Features for Discriminative Localization", CVPR 2016). With GAP + linear head,
    Grad-CAM (Selvaraju et al., ICCV 2017) at layer4 is ``relu(cams) / (h * w)``.

    Preprocessing happens inside: uint8 NHWC RGB -> permute to NCHW (a view with
    channels-last strides, no copy) -> float32 -> ``(x / 255 - mean) / std`` -> the
    patch network's parameter dtype (so a runtime may cast ``patch`` to bf16/fp16).
    Outputs are always float32; the MIL head stays in its own dtype (fp32).

    Args:
        num_patch_classes: C.
        num_slide_classes: K.
        attention_dim: L of the gated attention.
        mean: RGB normalisation mean (of x / 255).
        std: RGB normalisation std.
        mil_dropout: dropout probability of the MIL head, used only by
            :meth:`aggregate_mc` (Monte-Carlo dropout); 0 disables it.
    """

    def __init__(
        self,
        num_patch_classes: int = 2,
        num_slide_classes: int = 2,
        attention_dim: int = 128,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        mil_dropout: float = 0.0,
    ):
        super().__init__()
        self.patch: torchvision.models.ResNet = build_resnet18(num_patch_classes)
        self.mil = GatedAttentionMIL(512, attention_dim, num_slide_classes, mil_dropout)
        # (x/255 - mean)/std == (x - 255 mean) / (255 std): one subtract, one divide.
        self.register_buffer(
            "pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        )
        self.register_buffer(
            "pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        )

    def _features(self, x: Tensor) -> Tensor:
        p = self.patch
        x = p.conv1(x)
        x = p.bn1(x)
        x = p.relu(x)
        x = p.maxpool(x)
        x = p.layer1(x)
        x = p.layer2(x)
        x = p.layer3(x)
        return p.layer4(x)  # [B, 512, h, w]

    def _heads(self, x: Tensor, want_cams: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:  # noqa: UP045
        fmap = self._features(x.to(self.patch.conv1.weight.dtype))
        emb = torch.flatten(self.patch.avgpool(fmap), 1)  # [B, 512]
        logits = self.patch.fc(emb)  # [B, C]
        cams: Optional[Tensor] = None  # noqa: UP045
        if want_cams:
            w = self.patch.fc.weight.to(fmap.dtype)  # [C, 512]
            cams = torch.einsum("ck,bkhw->bchw", w, fmap).float()
        return logits.float(), emb.float(), cams

    def normalise_uint8(self, images: Tensor) -> Tensor:
        """uint8 ``[B, H, W, 3]`` RGB -> normalised float32 ``[B, 3, H, W]`` (channels-last)."""
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        return (x - self.pixel_mean) / self.pixel_std  # type: ignore[operator]

    @torch.jit.export
    def predict_patches_uint8(
        self, images: Tensor, want_cams: bool = False
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:  # noqa: UP045
        """Patch path on raw pixels.

        Args:
            images: uint8 ``[B, H, W, 3]`` RGB (H = W = patch size, any B >= 1).
            want_cams: also compute class activation maps.

        Returns:
            ``(logits f32 [B, C], embeddings f32 [B, 512], cams f32 [B, C, H/32, W/32]
            or None)``.
        """
        if images.dim() != 4 or images.size(3) != 3 or images.dtype != torch.uint8:
            raise RuntimeError("BadImages: expected uint8 [B, H, W, 3]")
        return self._heads(self.normalise_uint8(images), want_cams)

    @torch.jit.export
    def predict_patches_nchw(
        self, x: Tensor, want_cams: bool = False
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:  # noqa: UP045
        """Patch path on float32 ``[B, 3, H, W]`` input already normalised."""
        return self._heads(x, want_cams)

    @torch.jit.export
    def aggregate(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """Slide head: ``[N, 512]`` -> ``(slide logits f32 [K], attention f32 [N])``."""
        w = self.mil.classifier.weight
        logits, attention = self.mil(embeddings.to(device=w.device, dtype=w.dtype))
        return logits.float(), attention.float()

    @torch.jit.export
    def aggregate_mc(self, embeddings: Tensor, passes: int, seed: int) -> Tensor:
        """Monte-Carlo dropout over the slide head (see :meth:`GatedAttentionMIL.forward_mc`).

        Args:
            embeddings: float ``[N, 512]``, N >= 1.
            passes: P >= 1 stochastic passes.
            seed: seed of the dropout masks.

        Returns:
            float32 ``[P, K]`` slide probabilities, one row per pass.

        Raises:
            RuntimeError: ``"NoDropout: ..."`` when the head was exported with dropout 0.
        """
        w = self.mil.classifier.weight
        probs = self.mil.forward_mc(embeddings.to(device=w.device, dtype=w.dtype), passes, seed)
        return probs.float()

    def forward(self, images: Tensor) -> Tensor:
        """uint8 ``[B, H, W, 3]`` -> patch logits f32 ``[B, C]``."""
        return self.predict_patches_uint8(images, False)[0]
