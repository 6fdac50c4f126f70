"""Which API holds a TPU: the Cloud TPU API (cloud.TpuApi) or Compute Engine (gce.ComputeTpus), chosen by the
`backend` setting. Both answer in the same Node, so everything after this choice is one code path.

auto: a name is looked up in the Cloud TPU API first (what most pods are today, and no Compute Engine client to
import), then on Compute Engine; a name both have is the Cloud TPU node (`list` shows both; --backend compute
picks the other). `create` makes TPU7x on Compute Engine (the Cloud TPU API does not serve it), the rest through the
Cloud TPU API, unless the setting says which.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from tpuctl.errors import CloudError

if TYPE_CHECKING:
    from tpuctl.cloud import Node
    from tpuctl.config import Settings

COMPUTE_ONLY = ("tpu7x",)  # accelerator types only Compute Engine (or GKE) serves


def tpu_api(settings: Settings) -> Any:
    from tpuctl.cloud import TpuApi

    return TpuApi(settings)


def compute_api(settings: Settings) -> Any:
    from tpuctl.gce import ComputeTpus

    return ComputeTpus(settings)


def api_of(settings: Settings, node: Node) -> Any:
    """The API that holds `node`."""
    return compute_api(settings) if node.source == "compute" else tpu_api(settings)


def for_create(settings: Settings) -> Any:
    """The API a new TPU is made through; babysit's too, which may make one (so a Compute Engine slice other than
    TPU7x is babysat with --backend compute)."""
    if settings.backend == "compute" or (
        settings.backend == "auto" and (settings.accelerator_type or "").startswith(COMPUTE_ONLY)
    ):
        return compute_api(settings)
    return tpu_api(settings)


def find(settings: Settings, name: str) -> tuple[Any, Node | None]:
    """(the API that holds TPU `name`, its Node), or (the API asked first, None) when none has it."""
    if settings.backend == "compute":
        api = compute_api(settings)
        return api, api.find_node(name)
    api = tpu_api(settings)
    if settings.backend == "tpu":
        return api, api.find_node(name)
    try:
        node = api.find_node(name)
    except CloudError as first:  # a project without the Cloud TPU API (or without the right to read it)
        try:
            other = compute_api(settings)
            found = other.find_node(name)
        except CloudError:
            raise first from None
        if found is None:
            raise first from None
        return other, found
    if node is not None:
        return api, node
    try:
        other = compute_api(settings)
        found = other.find_node(name)
    except CloudError:
        return api, None  # the Cloud TPU API's "not found" says more than Compute Engine's failure here
    return (other, found) if found is not None else (api, None)


def get(settings: Settings, name: str) -> tuple[Any, Node]:
    """(its API, TPU `name`); its absence is one line naming the TPUs there are (both sources under auto)."""
    api, node = find(settings, name)
    if node is not None:
        return api, node
    if settings.backend != "auto":
        return api, api.get_node(name)  # the API's own line, naming its TPUs
    names = [n.name for n in tpu_api(settings).list_nodes()]  # its failure (a zone with no TPUs) is the answer
    with contextlib.suppress(CloudError):  # Compute Engine's names where it can be read
        names += [n.name for n in compute_api(settings).list_nodes()]
    raise CloudError(
        f"TPU {name!r} not found in project {settings.project}, zone {api.zone}",
        f"TPUs there: {', '.join(sorted(set(names))) or 'none'}",
    )


def list_all(settings: Settings) -> tuple[list[Node], list[Any], list[str]]:
    """(the zone's TPUs of the backend(s), the queued requests with no node, a line per source that could not be
    read while another could)."""
    nodes: list[Node] = []
    waiting: list[Any] = []
    notes: list[str] = []
    first: CloudError | None = None  # the Cloud TPU API's failure, where auto goes on without it
    if settings.backend in ("auto", "tpu"):
        api = tpu_api(settings)
        try:
            found = api.list_nodes()
        except CloudError as e:
            if settings.backend == "tpu":
                raise
            first = e
        else:
            nodes += found
            try:  # requests still in line have no node: shown too, or a user cannot see (or cancel) their own
                waiting = api.waiting_requests(found)
            except CloudError as e:
                notes.append(f"queued resources not listed: {e.message}")
    if settings.backend in ("auto", "compute"):
        try:
            nodes += compute_api(settings).list_nodes()
        except CloudError as e:
            if settings.backend == "compute" or first is not None:
                if first is not None:
                    raise first from None
                raise
            notes.append(f"Compute Engine's TPUs not listed: {e.message}")
        else:
            if settings.backend == "auto" and first is not None:
                notes.append(f"Cloud TPU API's TPUs not listed: {first.message}")
    return nodes, waiting, notes


def compute_nodes(settings: Settings, zones: list[str]) -> list[Node]:
    """Compute Engine's TPU slices in `zones` (the menu's list); none where the backend is tpu, or, under auto,
    where Compute Engine cannot be read (the Cloud TPU API's list stands on its own)."""
    import dataclasses

    if settings.backend == "tpu":
        return []
    try:
        api = compute_api(dataclasses.replace(settings, zone=zones[0]))
        return [node for zone in zones for node in api.in_zone(zone).list_nodes()]
    except CloudError:
        if settings.backend == "compute":
            raise
        return []
