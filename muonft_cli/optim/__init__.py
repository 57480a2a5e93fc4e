"""muonft's optimizer library: pure torch, no I/O; of muonft it imports only the torch-free `_common`.

* :func:`orthogonalize`, :func:`polar_express_coefficients` — NS5 / Polar Express (direct and
  Gram-space), :mod:`.orthogonalize`.
* :class:`Muon`, :class:`AdaMuon`, :class:`NorMuon` — one optimizer object with ``kind="muon"`` and
  ``kind="adamw"`` groups that owns the state, :mod:`.muon`; the pure update rules (:func:`update_scale`,
  ``muon_update`` and friends), :mod:`.update`; batched and optionally distributed NS, :mod:`.plan`.
* :func:`split_params` — route every trainable parameter once, with reasons, :mod:`.routing`.
* the mismatch mitigations (``optimizer.anchor_decay``, ``trust_radius``/``trust_norm``, Muon's ``update_rank``):
  their math, state and drift metrics, :mod:`.constraints`.
* :func:`build_optimizer`, :func:`optimizer_state_bytes` — from an optimizer config, or from a name and
  keywords (:data:`OPTION_DEFAULTS`: ``build_optimizer(model, "muon", lr=2e-4)``), :mod:`.factory`.
"""

from muonft_cli._common import OPTIMIZER_NAMES, SCALINGS

from .factory import OPTION_DEFAULTS, build_optimizer, optimizer_state_bytes
from .muon import AdaMuon, Muon, MuonFamily, NorMuon
from .orthogonalize import (
    JORDAN_COEFFICIENTS,
    default_ns_dtype,
    ns_coefficients,
    orthogonalize,
    polar_express_coefficients,
)
from .routing import ParamSplit, Route, split_params
from .update import update_scale

__all__ = [
    "AdaMuon",
    "JORDAN_COEFFICIENTS",
    "Muon",
    "MuonFamily",
    "NorMuon",
    "OPTIMIZER_NAMES",
    "OPTION_DEFAULTS",
    "ParamSplit",
    "Route",
    "SCALINGS",
    "build_optimizer",
    "default_ns_dtype",
    "ns_coefficients",
    "optimizer_state_bytes",
    "orthogonalize",
    "polar_express_coefficients",
    "split_params",
    "update_scale",
]
