"""Reward-model plugins for flowrl, installed as the ``flowrl_rewards`` package (the folder is ``rewards/``).

Each module is self-contained and registered by name through the ``flowrl.rewards`` entry-point group, so third-party
packages add rewards the same way. See :mod:`flowrl.rewards` for the protocol and the loader.
"""
