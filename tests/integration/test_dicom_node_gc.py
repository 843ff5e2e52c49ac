"""The started DICOM node has its start-up heap frozen out of the garbage collector's view (pynetdicom's server runs
a full collection every 60 turns of its loop): the node's own objects from start-up are not among those a
collection walks, and the FHIR models validation loads on demand are loaded already."""

from __future__ import annotations

import gc
import sys

from tests.support.dicom_node import Stack


def test_the_started_nodes_start_up_objects_are_frozen_out_of_the_collectors_view(stack: Stack):
    node = stack.node
    walked = {id(o) for o in gc.get_objects()}
    started = [node.scp, node.worker, node.intake, node.queue]
    assert all(gc.is_tracked(o) for o in started)
    assert not any(id(o) in walked for o in started)
    assert {"fhir.resources.R4B.observation", "fhir.resources.R4B.auditevent"} <= set(sys.modules)
