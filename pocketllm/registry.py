"""Name -> class tables filled by a decorator: training methods, ZO optimizers."""

from __future__ import annotations


class Registry(dict):
    """`@REGISTRY.register("name")` on a class adds it (and sets `cls.name`); `lookup(name)`
    returns it or raises a ValueError that lists what is available."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str):
        def deco(cls):
            if name in self:
                raise ValueError(f"{self.what} {name!r} registered twice")
            cls.name = name
            self[name] = cls
            return cls
        return deco

    def lookup(self, name: str):
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r}; available: {', '.join(sorted(self))}")
        return self[name]
