"""A stand-in for a module that a reference library imports at module level but never uses on the path a test
checks (audiocraft's xformers, spacy, av, ...; fadtk's heavy model packages): anything taken from it fails when
used, so a stub cannot change what the test computes."""

import types


class Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unusable(*args, **kwargs):
            raise RuntimeError(f"the test's stub of {self.__name__}.{name} was used")
        return unusable
