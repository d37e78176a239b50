"""The served Grad-CAM equals autograd Grad-CAM on the eager torchvision model.

The prototype's HistoGradCAM hooked ResNet18's last convolutional block (layer4),
back-propagated the class score, weighted each feature map by its spatially averaged
gradient, summed, applied ReLU and normalised by the maximum. Here a torchvision
resnet18 checkpoint (seeded, with non-trivial batch-norm statistics as after
fine-tuning) is exported, served by a real server, and ExplainPatches' maps are
compared with that computation on the same pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from server_fixtures import spawn_server, stop_server

from histohelper.client import SlideClient

CMU = "real/CMU-1-Small-Region.svs"


class HistoGradCAM:
    """Grad-CAM by hooks on a module (Selvaraju et al., ICCV 2017), prototype style."""

    def __init__(self, model: torch.nn.Module, layer: torch.nn.Module) -> None:
        self.model = model
        self.activations: torch.Tensor | None = None
        self.gradients: torch.Tensor | None = None
        layer.register_forward_hook(self._save_activation)
        layer.register_full_backward_hook(self._save_gradient)

    def _save_activation(self, module, inputs, output) -> None:
        self.activations = output

    def _save_gradient(self, module, grad_input, grad_output) -> None:
        self.gradients = grad_output[0]

    def __call__(self, x: torch.Tensor, class_index: int) -> np.ndarray:
        self.model.zero_grad()
        logits = self.model(x)
        logits[:, class_index].sum().backward()
        assert self.activations is not None and self.gradients is not None
        weights = self.gradients.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * self.activations).sum(dim=1))
        return cam.detach().numpy()


@pytest.fixture(scope="module")
def checkpoint_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.manual_seed(7)
    model = torchvision.models.resnet18(num_classes=2)
    with torch.no_grad():  # batch-norm statistics as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("gradcam")
    weights = root / "resnet18-finetuned.pth"
    torch.save({"state_dict": model.state_dict()}, weights)
    from histohelper.model_export.export import export_model

    artifact = root / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(artifact, weights=weights, variants=())
    return weights, artifact


def test_served_grad_cam_equals_autograd_grad_cam(
    checkpoint_artifact: tuple[Path, Path], slides_dir: Path, tmp_path: Path
) -> None:
    weights, artifact = checkpoint_artifact
    server = spawn_server(artifact, slides_dir, tmp_path)
    try:
        with SlideClient(server.target, timeout=300) as client:
            explanations = client.explain(
                CMU, top_k=6, rank_by="probability", class_name="malignant", jpeg_quality=100
            )
            benign = client.explain(
                CMU, patch_indices=[e.patch_index for e in explanations], class_name="benign",
                jpeg_quality=100,
            )  # fmt: skip
    finally:
        stop_server(server)
    assert len(explanations) == 6
    scores = [e.score for e in explanations]
    assert scores == sorted(scores, reverse=True)

    model = torchvision.models.resnet18(num_classes=2)
    model.load_state_dict(torch.load(weights)["state_dict"])
    model.eval()
    gradcam = HistoGradCAM(model, model.layer4)
    # The pixels the server saw: re-read them in-process (JPEG is lossy; use the tiler).
    from histohelper.server.tiling import PatchReader, TilingOptions, open_slide, plan_tiling

    with open_slide(slides_dir / CMU) as slide:
        plan = plan_tiling(slide, TilingOptions())
    indices = [e.patch_index for e in explanations]
    images = {}
    for batch in PatchReader(slides_dir / CMU, plan.grid).iter_batches(indices=indices):
        for i, image in zip(batch.indices.tolist(), batch.images, strict=True):
            images[i] = image
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    worst = 0.0
    for cls_index, group in ((1, explanations), (0, benign)):
        for ex in group:
            x = torch.from_numpy(images[ex.patch_index]).permute(2, 0, 1)[None].float() / 255
            expected = gradcam((x - mean) / std, cls_index)[0]
            served = ex.grad_cam
            # Same scale, not only up to a factor: relu(CAM) / (h * w).
            np.testing.assert_allclose(served, expected, rtol=1e-3, atol=1e-5)
            peak = max(float(expected.max()), 1e-12)
            norm_diff = float(
                np.abs(served / max(float(served.max()), 1e-12) - expected / peak).max()
            )
            worst = max(worst, norm_diff)
    print(f"max normalised |served Grad-CAM - autograd Grad-CAM| over 12 maps: {worst:.2e}")
    assert worst <= 1e-4
