"""Registers :class:`BandAttentionConfig` with OLMo-core as soon as OLMo-core's attention loads.

``import olmoe_spattn`` must stay fast and must work without OLMo-core, so it does not import
OLMo-core. Instead :func:`install` adds a finder to ``sys.meta_path`` that, after the module
``olmo_core.nn.attention`` executes, imports :mod:`olmoe_spattn.olmo.config` (whose decorator
registers ``"band_attention"`` in ``SequenceMixerConfig``). If OLMo-core is already imported the
registration happens at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

TARGET = "olmo_core.nn.attention"
log = logging.getLogger(__name__)


def register_now() -> None:
    """Imports the config module (registering it); logs instead of raising on failure."""
    try:
        importlib.import_module("olmoe_spattn.olmo.config")
    except Exception as err:  # a broken OLMo-core install must not break olmoe_spattn itself
        log.warning("olmoe_spattn: could not register band attention with OLMo-core: %s", err)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)  # type: ignore[attr-defined]
        register_now()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also avoids recursion in find_spec below
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Registers now if OLMo-core's attention is loaded, else when it first is."""
    if TARGET in sys.modules:
        register_now()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
