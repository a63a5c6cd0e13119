"""Whose learned state drafts a request: one shared drafter, or one per API key or per cache salt.

A learning drafter keeps what it verified, and that shows: a repeated answer is drafted faster
(`aded.mean_accepted_tokens` says by how much) and the state file holds earlier outputs. With
`state_per="key"` (each API key) or `"salt"` (each request's `cache_salt`, vLLM's field) every
tenant gets its own drafter of the same kind, fresh or loaded from its own file beside `--state`
(`<stem>.tenant-<hash><suffix>`: named by a hash, never by the key), so no tenant drafts from
another's outputs. Requests without a salt share the default drafter. At most `max_tenants` are
kept in memory; the least recently used is dropped, its state first written by `on_drop`.

Everything but `tenant_of` runs on the engine's worker thread, between requests.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable

from aded.drafters.base import Drafter, LearningDrafter
from aded.server.state import StateFile, load_learned

__all__ = ["STATE_PER", "tenant_of", "Tenants"]

log = logging.getLogger("aded.server")

STATE_PER = ("shared", "key", "salt")


def tenant_of(state_per: str, api_key: str | None, salt: str | None) -> str | None:
    """The tenant of a request (None: the shared state), a hash that names it in files and logs.
    With API keys, a salt is the key's own: two keys that send the same salt do not share state."""
    secret = api_key if state_per == "key" else salt if state_per == "salt" else None
    if not secret:
        return None
    if state_per == "salt" and api_key:
        secret = f"{api_key}\x00{salt}"
    return hashlib.sha256(f"{state_per}:{secret}".encode()).hexdigest()[:16]


class Tenants:
    """The drafters of all tenants; `activate` puts one into the model before its request runs."""

    def __init__(self, lm, state_file: StateFile | None, max_tenants: int = 64) -> None:
        if max_tenants < 1:
            raise ValueError(f"max_tenants must be at least 1, got {max_tenants}")
        self.lm = lm
        self.shared: Drafter = lm.drafter
        self.state_file = state_file
        self.max_tenants = max_tenants
        self._drafters: OrderedDict[str, Drafter] = OrderedDict()  # least recently used first
        self._dirty: set[str | None] = set()  # learned since the last export
        self._taught: set[str] = set()  # tenants in memory that learned since they were loaded
        #: writes a dropped tenant's (file, arrays) at once, so its next request loads them
        self.on_drop: Callable[[list[tuple[StateFile, dict]]], None] | None = None

    @property
    def count(self) -> int:
        return len(self._drafters)

    def fresh(self) -> Drafter:
        """A new drafter of the shared one's kind, knowing nothing."""
        return self.lm.fresh_drafter()

    def set_shared(self, drafter: Drafter) -> None:
        self.shared = drafter
        self._use(drafter)

    def activate(self, tenant: str | None) -> None:
        learns = isinstance(self.shared, LearningDrafter)
        self._use(self.shared if tenant is None or not learns else self._drafter(tenant))

    def learned(self, tenant: str | None) -> None:
        """The tenant's request ran: its drafter has something new to save."""
        if isinstance(self.shared, LearningDrafter):
            self._dirty.add(tenant)
            if tenant is not None:
                self._taught.add(tenant)

    def export(self) -> list[tuple[StateFile, dict]]:
        """(file, arrays) of every tenant that learned something since the last export."""
        out: list[tuple[StateFile, dict]] = []
        dirty, self._dirty = self._dirty, set()
        for tenant in dirty:
            drafter = self.shared if tenant is None else self._drafters.get(tenant)
            state_file = self._file(tenant)
            if isinstance(drafter, LearningDrafter) and state_file is not None:
                out.append((state_file, drafter.state_dict()))
        return out

    # ------------------------------------------------------------------ internals
    def _use(self, drafter: Drafter) -> None:
        self.lm.use_drafter(drafter)

    def _drafter(self, tenant: str) -> Drafter:
        if tenant in self._drafters:
            self._drafters.move_to_end(tenant)
            return self._drafters[tenant]
        drafter = self.fresh()
        state_file = self._file(tenant)
        if state_file is not None:
            drafter, note = load_learned(drafter, state_file, self.fresh, mismatch_is_fatal=False)
            log.info("tenant %s: %s", tenant, note)
        self._drafters[tenant] = drafter
        while len(self._drafters) > self.max_tenants:
            self._evict()
        return drafter

    def _evict(self) -> None:
        tenant, drafter = self._drafters.popitem(last=False)
        state_file = self._file(tenant)
        # written even if exported already: that save may still be under way when the tenant returns
        if (tenant in self._taught and isinstance(drafter, LearningDrafter) and state_file is not None
                and self.on_drop is not None):
            self.on_drop([(state_file, drafter.state_dict())])
        self._dirty.discard(tenant)
        self._taught.discard(tenant)
        log.info("tenant %s: dropped from memory (least recently used)", tenant)

    def _file(self, tenant: str | None) -> StateFile | None:
        if self.state_file is None or tenant is None:
            return self.state_file
        shared = self.state_file.path
        path = shared.with_name(f"{shared.stem}.tenant-{tenant}{shared.suffix}")
        if hasattr(self.state_file, "at"):  # a ModelStateFile: the tenant's records the model too
            return self.state_file.at(path)
        return StateFile(path, self.state_file.drafter_name, self.state_file.identity)
