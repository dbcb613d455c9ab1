"""Rewards: the combined reward of a batch, and learned reward models.

* :mod:`alignkit.rewards.combine` - ``sum_k weight_k * component_k`` over the components;
* :mod:`alignkit.rewards.learned` - reward models: encoding, training batches, losses'
  interface, scoring rollouts, ensembles, and the hooks learned-reward plugins share.
"""
