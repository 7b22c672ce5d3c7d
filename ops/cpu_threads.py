"""How the commands that run the models on the CPU ask OpenMP to wait: passively.

torch's CPU kernels run on an OpenMP thread pool whose idle threads spin at every barrier by default. When another
process holds one of the machine's cores (the stream worker, Kafka, a trainer, tests: on a 2-core machine, the
usual case), the spinning threads and the ones they wait for take turns on the cores left, and a forward pass of the
base U-Net on 8 rows went from 0.16 s to 3.5-7.5 s with 2 torch threads (1 and 2 other busy processes).
``OMP_WAIT_POLICY=PASSIVE`` lets waiting threads sleep: the same pass took 0.19 s under the same load.

OpenMP reads the variable when the runtime starts, so :func:`prefer_passive_openmp` must run before torch is
imported; every command here imports torch inside its handler, after calling it. A value already in the
environment is kept.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_openmp() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment names a policy; say so when torch came first."""
    if WAIT_POLICY in os.environ:
        return
    os.environ[WAIT_POLICY] = "PASSIVE"
    if "torch" in sys.modules:
        log.warning("torch was imported before %s was set: its OpenMP threads keep spinning", WAIT_POLICY)
