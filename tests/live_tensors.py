"""How many tensors read from checkpoints are alive at once: a streaming operation drops each tensor it
read before the next few, a whole-model one keeps them all. ``Checkpoint.get`` is wrapped (the read
itself is unchanged) to keep a weak reference to every tensor it returns."""

from __future__ import annotations

import weakref

from modelsurgery.checkpoint import Checkpoint


class LiveTensors:
    def __init__(self, monkeypatch):
        self.refs: list[weakref.ref] = []
        self.peak = 0
        self.reads = 0
        get = Checkpoint.get

        def counted(ckpt, name):
            tensor = get(ckpt, name)
            self.refs = [r for r in self.refs if r() is not None]
            if not any(r() is tensor for r in self.refs):
                self.refs.append(weakref.ref(tensor))
            self.reads += 1
            self.peak = max(self.peak, len(self.refs))
            return tensor

        monkeypatch.setattr(Checkpoint, "get", counted)
