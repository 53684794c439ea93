"""One consistent LIST of the cluster for the offline tools (`desired`/`diff` without --objects).

The same client, resources and parsers as the running exporter's reflectors,
without the watch: page through Services, EndpointSlices and this node's Node
once. Malformed objects are skipped and reported in ``ObjectSet.errors``, as
when reading ``--objects``.
"""

from __future__ import annotations

from exporter.kube import objects
from exporter.kube.client import (ApiClient, Gone, Resource, endpointslices_resource, node_resource,
                                  services_resource)


def _list(api: ApiClient, resource: Resource, errors: list[str], page_size: int) -> list:
    for _attempt in range(3):  # a continue token can expire (410) on a busy cluster: start over
        out, token = [], None
        try:
            while True:
                params = {"limit": page_size}
                if resource.field_selector:
                    params["fieldSelector"] = resource.field_selector
                if token:
                    params["continue"] = token
                page = api.list_page(resource.path, params)
                for raw in page.get("items") or []:
                    try:
                        out.append(resource.parse(raw))
                    except objects.MalformedObject as err:
                        errors.append(str(err))
                    except Exception as err:  # noqa: BLE001 - input the parser did not foresee is bad input
                        errors.append(f"{resource.name}: {type(err).__name__}: {err}")
                meta = page.get("metadata") if isinstance(page.get("metadata"), dict) else {}
                token = meta.get("continue") or None
                if not token:
                    return out
        except Gone:
            continue
    raise Gone(f"LIST {resource.path}: continue token expired three times")


def list_objects(kubeconfig: str | None, node_name: str, page_size: int = 500) -> objects.ObjectSet:
    """Services, EndpointSlices and the Node ``node_name`` from the API. Raises on no access."""
    api = ApiClient.from_settings(kubeconfig)
    try:
        result = objects.ObjectSet({}, {}, {}, [])
        for service in _list(api, services_resource(), result.errors, page_size):
            result.services[service.key] = service
        for slice_ in _list(api, endpointslices_resource(), result.errors, page_size):
            result.slices[slice_.key] = slice_
        for node in _list(api, node_resource(node_name), result.errors, page_size):
            result.nodes[node.name] = node
        return result
    finally:
        api.close()
