"""What registration checks every delta against, read from the served base once at start-up.

Registering a delta verifies its fingerprint (:mod:`bitdelta.fingerprint`) and bounds its values
(:mod:`bitdelta.validate`) against the base. Both need only a few numbers per base tensor: the
fingerprint's fixed-position samples and the tensor's shape and ``max |value|``. Read from the live
weights at each registration, they cost a device -> host copy per module, and on a quantized base a
dequantization of every matrix; read here once, registration reads no base weight at all.

The served base is frozen: nothing writes its weights after loading (each tenant's delta lives in
its own slots), so what is read here stays true for the server's lifetime. Code that changed base
weights in place would have to read a new :class:`BaseReference`.

    ref = BaseReference.read(model)
    delta.fingerprint.verify(ref.samples, delta_name=..., base_name=..., model_name=...)
    check_delta_values(delta, ref.values_for(delta))
"""

from __future__ import annotations

from ..fingerprint import BaseSamples
from ..validate import magnitude


class BaseReference:
    """Fingerprint samples and ``(max |value|, shape)`` of each base matrix and 1-D parameter."""

    def __init__(self, samples: BaseSamples, magnitudes: dict[str, tuple[float, tuple]]) -> None:
        self.samples = samples
        self.magnitudes = magnitudes

    @classmethod
    def read(cls, model) -> "BaseReference":
        """Reads ``model``'s (a :class:`~bitdelta.serving.models.DeltaModel`) base, one tensor at a time:
        a quantized matrix is dequantized once, in the model's dtype, as a delta sees it."""
        weights = model.readable()
        samples = BaseSamples()
        magnitudes = {}
        for name in weights:
            t = weights[name]
            samples.add(name, t)
            magnitudes[name] = (magnitude(t), tuple(t.shape))
            del t  # a dequantized matrix goes before the next one is made
        if model.head_name == model.embed_name:  # a tied head: deltas name it lm_head
            samples.alias("lm_head", model.embed_name)
            magnitudes["lm_head"] = magnitudes[model.embed_name]
        return cls(samples, magnitudes)

    def values_for(self, delta) -> dict:
        """The base's ``(max |value|, shape)`` under the names ``delta`` uses, for
        :func:`~bitdelta.validate.check_delta_values` (a tied dense parameter under its own name)."""
        base = {n: self.magnitudes[n] for n in delta.modules if n in self.magnitudes}
        for pname in delta.dense:
            key = delta.ties.get(pname, pname)
            if key in self.magnitudes:
                base[pname] = self.magnitudes[key]
        return base
