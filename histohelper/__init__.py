"""HistoHelper: gRPC model serving for whole-slide-image deep learning in pathology.

The ``histohelper`` namespace gathers the small core (``errors``, ``geometry``, the
generated ``v1`` protobuf code) and the parts kept in their own top-level folders:
``histohelper.server`` (server/), ``histohelper.client`` (client/) and
``histohelper.model_export`` (model_export/).
"""

__version__ = "0.1.0"
