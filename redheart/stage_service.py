"""Moved: the gRPC side of a pipeline stage now lives in the ``redheart.stage`` package.

* ``redheart/stage/wire.py`` – message decode / encode, StageError kind -> gRPC status, STAGE_METHODS
* ``redheart/stage/peer_link.py`` – :class:`GrpcPeerLink` (the sender thread)
* ``redheart/stage/servicer.py`` – :class:`StageServicer`
* ``redheart/stage/server.py`` – :class:`StageServer`, :func:`create_stage_server`
* ``redheart/stage/main.py`` – :func:`run_stage_cli`, on redheart/service_main.py

This module only re-exports those names, so older imports keep working.
"""

from redheart.stage.main import run_stage_cli  # noqa: F401
from redheart.stage.peer_link import GrpcPeerLink  # noqa: F401
from redheart.stage.server import (  # noqa: F401
    RESERVED_THREADS,
    SERVER_THREADS,
    StageServer,
    create_stage_server,
)
from redheart.stage.servicer import MAX_RUN_ID, VERSION, StageServicer  # noqa: F401
from redheart.stage.wire import STAGE_METHODS  # noqa: F401
