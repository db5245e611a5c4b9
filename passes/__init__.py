"""The strategies, one module each, in the fixed order their passes run (printed by `planc compile`),
and the ways of drafting (program passes over a speculative draft).

These tuples are the one place that lists them; the plan schema, bind, the pass manager and the
driver read them.
"""
from planc.passes import attention_tp, dense_tp, easyspec, ep, mla_tp, moe_tp, replicated, t3, tpla

STRATEGIES = (*replicated.STRATEGIES, mla_tp.STRATEGY, tpla.STRATEGY, attention_tp.STRATEGY, dense_tp.STRATEGY,
              ep.STRATEGY, moe_tp.STRATEGY, t3.STRATEGY)

# Ways of drafting for speculative decoding, each a key of the plan's `draft:` section.
DRAFTINGS = (easyspec.DRAFTING,)
