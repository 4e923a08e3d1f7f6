"""One loss call's request: the validated options, the per-rollout tensors, the parallel groups and the flags, built
once by a public entry point and handed down unchanged.

The custom ops take no Python objects, so a request crosses them as a flat list of schema arguments. That list is
generated from :class:`LossRequest`'s fields (each field's ``metadata["schema"]`` is its type in the op's schema;
the ``config`` field expands to ``LossConfig``'s fields, and a process group travels as its name): the schema, the
packing, the unpacking and the number of ``None`` gradients of the ops' backward all come from
:data:`REQUEST_FIELDS`, so a field added here reaches every op.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import distributed
from ..config import LossConfig
from .backends import backend_passes
from .vocab_parallel import VocabParallelPasses, VocabShard


def _field(schema: str, default=None):
    return dataclasses.field(default=default, metadata={"schema": schema})


@dataclass(frozen=True)
class LossRequest:
    """What a loss call carries below its public function.

    ``backend``: the resolved backend (``"triton"``, ``"torch"``, ``"native"``); per-rollout tensors as the public
    functions take them (``normalizer`` a 0-dim float64 tensor or ``None``); groups: ``process_group`` (data
    parallel), ``sp_group`` (sequence parallel), ``tp_group`` with this rank's vocabulary shard ``[vocab_start,
    vocab_start + V_local)`` of ``vocab_total`` ids (tensor parallel); flags: what to return (metrics, the token
    scores of pass A) and which inputs want a gradient (set by ``ops.entry`` from the tensors it is given).
    """

    old_logps: torch.Tensor | None = _field("Tensor?")
    ref_logps: torch.Tensor | None = _field("Tensor?")
    config: LossConfig = _field("config")
    backend: str = _field("str", "torch")
    with_metrics: bool = _field("bool", False)
    with_token_scores: bool = _field("bool", False)
    with_entropy: bool = _field("bool", False)     # the log-prob ops: also each token's entropy
    sampling_logps: torch.Tensor | None = _field("Tensor?")
    is_weights: torch.Tensor | None = _field("Tensor?")
    normalizer: torch.Tensor | None = _field("Tensor?")
    cu_seqlens: torch.Tensor | None = _field("Tensor?")
    process_group: object = _field("group")
    sp_group: object = _field("group")
    tp_group: object = _field("group")
    vocab_start: int = _field("int", 0)
    vocab_total: int = _field("int", 0)
    tp_reduce_hidden_grad: bool = _field("bool", True)
    chunk_size: int = _field("int", 0)
    grad_input: bool = _field("bool", False)      # logits, or hidden on the fused linear path
    grad_weight: bool = _field("bool", False)
    grad_bias: bool = _field("bool", False)

    def shard(self, local_vocab: int) -> VocabShard | None:
        """This rank's vocabulary shard of ``local_vocab`` ids (``None`` without ``tp_group``)."""
        if self.tp_group is None:
            return None
        return VocabShard(self.tp_group, self.vocab_start, local_vocab, self.vocab_total, self.tp_reduce_hidden_grad)

    def passes(self, local_vocab: int):
        """The backend's passes; on a vocabulary shard of ``local_vocab`` ids, combined over ``tp_group``."""
        passes = backend_passes(self.backend)
        shard = self.shard(local_vocab)
        return passes if shard is None else VocabParallelPasses(passes, shard)

    def vocab_size(self, local_vocab: int) -> int:
        """The whole vocabulary: ``local_vocab`` unless the logits are a shard of it."""
        return local_vocab if self.tp_group is None else self.vocab_total


def _flat_fields() -> list[tuple[str, str, str | None]]:
    """``(schema name, schema type, request field or None for a config field)`` of every op argument, in order."""
    flat = []
    for field in dataclasses.fields(LossRequest):
        schema = field.metadata["schema"]
        if schema == "config":
            flat += [(option.name, _OPTION_TYPES[option.type], None) for option in dataclasses.fields(LossConfig)]
        else:
            flat.append((field.name, "str?" if schema == "group" else schema, field.name))
    return flat


_OPTION_TYPES = {"float": "float", "float | None": "float?", "str": "str", "str | None": "str?", "int": "int",
                 "bool": "bool"}
_GROUP_FIELDS = frozenset(field.name for field in dataclasses.fields(LossRequest)
                          if field.metadata["schema"] == "group")
REQUEST_FIELDS = tuple(_flat_fields())
REQUEST_SCHEMA = ", ".join(f"{schema} {name}" for name, schema, _ in REQUEST_FIELDS)
NUM_REQUEST_ARGUMENTS = len(REQUEST_FIELDS)


def pack(request: LossRequest) -> tuple:
    """The op arguments of ``request`` in :data:`REQUEST_FIELDS` order."""
    values = []
    for name, _, field in REQUEST_FIELDS:
        if field is None:
            values.append(getattr(request.config, name))
        elif field in _GROUP_FIELDS:
            values.append(distributed.group_name(getattr(request, field)))
        else:
            values.append(getattr(request, field))
    return tuple(values)


def unpack(arguments) -> LossRequest:
    """The request that :func:`pack` made ``arguments`` from (its options were validated when it was built: the
    config is rebuilt without checking them again)."""
    options, fields = {}, {}
    for (name, _, field), value in zip(REQUEST_FIELDS, arguments, strict=True):
        if field is None:
            options[name] = value
        else:
            fields[field] = distributed.group_from_name(value) if field in _GROUP_FIELDS else value
    return LossRequest(config=LossConfig.unchecked(**options), **fields)
