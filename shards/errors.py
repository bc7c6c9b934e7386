"""The error the shards library raises for a problem the user has to fix (a wrong folder, a stale build)."""
from __future__ import annotations


class ShardsError(ValueError):
    """One line naming the path and the fix; ``ifas-shards`` prints it as ``ifas-shards: error: ...`` and exits 2."""
