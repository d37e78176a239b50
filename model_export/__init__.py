"""HistoHelper export step: freeze a ResNet18 patch classifier and a gated-attention
MIL head into one TorchScript artifact (and ONNX) with an embedded manifest.

The artifact (``histohelper export OUT``; Python: :func:`.export.export_model`):

* ``torch.jit.script`` of :class:`.modules.HistoHelperModel` (scripted, not traced: no
  batch, bag or image size is baked in), patch weights saved channels-last.
* Exported methods: ``predict_patches_uint8(images u8 [B,H,W,3] RGB, want_cams)`` ->
  ``(logits f32 [B,C], embeddings f32 [B,512], cams f32 [B,C,H/32,W/32] | None)``;
  ``predict_patches_nchw(x f32 [B,3,H,W] normalised, want_cams)`` (same outputs);
  ``aggregate(embeddings f32 [N,512])`` -> ``(slide logits f32 [K], attention f32 [N])``;
  ``forward(images u8)`` -> logits.
* Preprocessing is inside the artifact (decision): uint8 NHWC -> permute (a view
  with channels-last strides, free) -> float32 -> ``(x/255 - mean)/std`` -> the patch
  network's dtype. The manifest records mean/std, layout and dtype, so a runtime that
  normalises itself (``predict_patches_nchw``, ONNX users) knows exactly what to do.
* Extra files: ``manifest.json`` (schema :class:`histohelper.server.runtime.Manifest`,
  printed by ``histohelper export --inspect MODEL``) and ``mil_head.npz`` (MIL weights
  for the torch-free ONNX Runtime backend).
* One set of fp32 weights; bf16/fp16 variants are casts the runtime makes at load time,
  offered only when their check against fp32 on calibration patches passed.

This package may import torch, torchvision, onnx and the runtime's manifest schema;
never the server, the client or grpc.
"""
