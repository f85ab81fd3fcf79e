"""An LRU of online explanations (Serve, the in-process Retriever): its own module so that an
explainer running in vLLM's environment imports it without the matcher's dependencies."""

from __future__ import annotations

import threading
from collections import OrderedDict

from entityclip.explain.engines import ExplainRequest, ExplanationEngine
from entityclip.explain.prompts import explanation_key


class ExplanationCache:
    """LRU of explanations keyed like the explanation stage's cache (hash of the prompt)."""

    def __init__(self, engine: ExplanationEngine, size: int):
        self.engine, self.size = engine, size
        self._items: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def explain(self, texts: list[str]) -> list[str]:
        keys = [explanation_key(t, []) for t in texts]
        with self._lock:
            found = {k: self._items[k] for k in keys if k in self._items}
            for k in found:
                self._items.move_to_end(k)
        missing = {k: t for k, t in zip(keys, texts) if k not in found}
        if missing:
            explained = self.engine.explain([ExplainRequest(t) for t in missing.values()])
            found.update(zip(missing, explained))
            with self._lock:
                self._items.update(zip(missing, explained))
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return [found[k] for k in keys]
