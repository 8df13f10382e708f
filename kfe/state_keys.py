"""Keys of a tracked block's entry in ``optimizer.state`` (kept under its weight).

Values are tensors, ints or dicts of tensors, so a ``state_dict`` loads with
``torch.load(weights_only=True)``.
"""

FACTOR_A = "factor_A"
"""EMA of ``E[x x^T]`` (input side, bias coordinate last), ``(d_in+1, d_in+1)``."""
FACTOR_B = "factor_B"
"""EMA of ``E[g g^T]`` (output side), ``(d_out, d_out)``."""
FACTOR_PRIOR = "factor_prior"
"""``(s_A, s_B)``: what remains of ``factor_init``'s scaled identities in the factor EMAs
(``s * factor_decay^k`` after ``k`` folds); absent without ``factor_init``."""
BASIS = "basis"
"""The current eigenbasis as a dict ``{U_B, b, U_A, a}`` (:class:`kfe.basis.Eigenbasis`)."""
BASIS_PRIOR = "basis_prior"
"""``FACTOR_PRIOR`` as it was when the current basis was computed (the part of each
eigenvalue that is the prior's, :attr:`kfe.RuleContext.prior`); absent without it."""
RULE = "rule"
"""The rule's state as a dict of its ``State`` fields."""
MOMENTUM = "momentum_buffer"
"""Heavy-ball buffer on the parameter-space direction (same name as ``torch.optim.SGD``)."""
EIGH_FAILURES = "eigh_failures"
"""How many refreshes of this block failed and kept the previous basis."""
REFRESHES = "refreshes"
"""How many refreshes of this block succeeded (the first one is always an exact ``eigh``)."""
