"""Why Fabric refuses a delete: what a resource still holds or serves (REFERENCE.md §6–§10).

Shared by the delete routes and by page churn, whose bystander deletes only what the API
would let it delete.
"""

from __future__ import annotations

from .resources import Resource, Store


def refusal(store: Store, res: Resource) -> str | None:
    """The error message of a delete of ``res`` that Fabric refuses now, or None."""
    if res.kind == "workspace":
        # DELETING children are already on their way out, so they do not block the delete.
        held = {kind: sum(1 for child in store.items(kind, res.id) if store.is_active(child))
                for kind in ("endpoint", "model", "service_instance")}
        if any(held.values()):
            listing = ", ".join(f"{count} {kind}(s)" for kind, count in held.items() if count)
            return f"The workspace {res.id} still holds {listing}; delete them first"
    elif res.kind == "endpoint":
        busy = [i.id for i in store.items("service_instance", res.workspace_id)
                if i.fields["endpoint_id"] == res.id and store.is_active(i)]
        if busy:
            return (f"The endpoint {res.id} still serves service instance(s) "
                    f"{', '.join(busy)}; delete them first")
    elif res.kind == "model":
        users = [i.id for i in store.items("service_instance", res.workspace_id)
                 if i.fields["source"]["id"] == res.id and store.is_active(i)]
        if users:
            return (f"The model {res.id} is used by service instance(s) "
                    f"{', '.join(users)}; delete them first")
    return None
