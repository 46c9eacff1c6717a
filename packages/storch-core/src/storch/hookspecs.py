"""The hook specification of estimator plugins (pluggy): what a ``storch.estimators`` entry point implements."""

from __future__ import annotations

import pluggy

__all__ = ["HookSpecs", "hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("storch")
hookimpl = pluggy.HookimplMarker("storch")


class HookSpecs:
    @hookspec
    def storch_estimators(self) -> list:
        """Return the estimator classes (subclasses of ``storch.Estimator``) this plugin provides."""

