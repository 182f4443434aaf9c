"""TEST-ONLY: let PyPI's CUDA-built torchvision import beside CPU torch; see README.md."""

import torch

_torchvision = torch.library.Library("torchvision", "DEF")
for _name in ("nms", "qnms"):
    _torchvision.define(f"{_name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
