"""The paper's conditions for an unbiased estimate, checked where storch builds one.

``score``: when log p is a valid score function (a support that moves with the parameters, a kink of log p);
``smoothness``: a pathwise term's path from sample to cost free of jumps (order 1) and kinks (order >= 2);
``order_guard``: the order-1 surrogate differentiated again where that is biased (hooks that refuse).

Empty on purpose: ``score`` imports ``storch.distributions``, whose ``rsample_kinks`` imports ``smoothness``,
so the package must not import its modules (each is a layer of its own in ``.importlinter``: ``score`` above
``distributions``, ``smoothness`` and ``order_guard`` at the bottom, which plates/ and distributions/ import).
"""
