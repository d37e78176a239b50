"""HistoHelper export step: freeze a ResNet18 patch classifier and a gated-attention
MIL head into one TorchScript artifact (and ONNX) with an embedded manifest."""
