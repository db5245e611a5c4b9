"""The strategies, one module each, in the fixed order their passes run (printed by `planc compile`).

This tuple is the one place that lists them; the plan schema, bind and the pass manager read it.
"""
from planc.passes import attention_tp, dense_tp, ep, mla_tp, replicated, t3, tpla

STRATEGIES = (*replicated.STRATEGIES, mla_tp.STRATEGY, tpla.STRATEGY, attention_tp.STRATEGY, dense_tp.STRATEGY,
              ep.STRATEGY, t3.STRATEGY)
