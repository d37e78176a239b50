"""``histohelper.v1.ModelAdminService``: load, unload, set the default, rescan.

Thin handlers over :class:`~histohelper.server.repository.ModelRepository`, on the one
call path (:mod:`.callpath`) like every RPC: each needs the ``admin`` role (a token
with it, or a mutual-TLS identity; anonymous callers only with
``--allow-anonymous-admin``) and is audited. Repository work (a load warms a model)
runs on a worker thread. Every answer lists the repository after the change.
"""

from __future__ import annotations

import logging

from histohelper.errors import InvalidOptionsError
from histohelper.server.auth import ROLE_ADMIN
from histohelper.server.callpath import Call, Rpc
from histohelper.server.models import ServedModel
from histohelper.server.repository import ModelRepository
from histohelper.server.servicer import repository_listing
from histohelper.v1 import model_admin_pb2 as admin_pb

log = logging.getLogger(__name__)


class ModelAdminServicer:
    """The admin service's handlers (see :meth:`rpcs`).

    Args:
        models: the server's model repository.
    """

    def __init__(self, models: ModelRepository[ServedModel]) -> None:
        self.models = models

    def rpcs(self) -> dict[str, Rpc]:
        """Every RPC of the service, each needing the ``admin`` role."""
        return {
            "LoadModel": Rpc(self._load, role=ROLE_ADMIN, default_deadline=False),
            "UnloadModel": Rpc(self._unload, role=ROLE_ADMIN, default_deadline=False),
            "SetDefaultModel": Rpc(self._set_default, role=ROLE_ADMIN, default_deadline=False),
            "RescanRepository": Rpc(self._rescan, role=ROLE_ADMIN, default_deadline=False),
        }

    def _answer(self) -> admin_pb.ModelAdminResponse:
        return admin_pb.ModelAdminResponse(models=repository_listing(self.models))

    async def _load(self, request: admin_pb.LoadModelRequest, call: Call):
        ref = request.model
        await call.run(self.models.load, ref.name, ref.version)
        log.info("admin: model loaded", extra={**call.log_extra, "model": ref.name})
        return self._answer()

    async def _unload(self, request: admin_pb.UnloadModelRequest, call: Call):
        ref = request.model
        if not ref.version:
            raise InvalidOptionsError("UnloadModel needs a version")
        await call.run(self.models.unload, ref.name, ref.version)
        log.info("admin: model unloaded", extra={**call.log_extra, "model": ref.name})
        return self._answer()

    async def _set_default(self, request: admin_pb.SetDefaultModelRequest, call: Call):
        ref = request.model
        if not ref.name or not ref.version:
            raise InvalidOptionsError("SetDefaultModel needs a model name and a version")
        await call.run(self.models.set_default, ref.name, ref.version, request.server_default)
        log.info("admin: default set", extra={**call.log_extra, "model": ref.name})
        return self._answer()

    async def _rescan(self, request: admin_pb.RescanRepositoryRequest, call: Call):
        changes = await call.run(self.models.rescan)
        log.info("admin: repository rescanned", extra={**call.log_extra, "changes": changes})
        return self._answer()
