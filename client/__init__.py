"""HistoHelper client SDK: thin (grpcio, protobuf, numpy; OpenCV only for rendering).

Never imports torch, torchvision or OpenSlide.
"""
