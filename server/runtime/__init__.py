"""Model runtime: loads a frozen artifact by its manifest alone (no OpenSlide, cv2, gRPC or torchvision)."""
