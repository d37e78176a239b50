"""HistoHelper server: tiling (``tiling``), model runtime (``runtime``), the analysis
pipeline and the gRPC servicer. Importing this package imports nothing heavy."""
