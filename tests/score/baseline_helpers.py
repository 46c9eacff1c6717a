"""Helpers that read score's baseline option from another module (tests/score/test_baseline_option_reads.py)."""

import storch_score


def half_of_the_option(est, node, cost):
    b = storch_score.Score.baseline(est, node, cost)
    return None if b is None else 0.5 * b


class OptionMixin:
    """A mixin listed after Score in a subclass's bases: its helper sits after Score in the MRO."""

    def option_baseline(self, node, cost):
        return storch_score.Score.baseline(self, node, cost)
