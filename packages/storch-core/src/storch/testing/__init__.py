"""Checks for estimator authors: statistical comparison of estimates against exact values.

The workhorse is :func:`replicate`: a parameter copied R times along an independent plate, so
that ONE surrogate loss holds R independent estimates (the plate is reduced by the mean, so the
gradient w.r.t. copy r is ĝ_r / R). :func:`assert_unbiased` then z-tests their mean.
"""

from ._stats import UnbiasednessReport, assert_unbiased, replicate, per_replicate_derivatives

__all__ = ["replicate", "per_replicate_derivatives", "assert_unbiased", "UnbiasednessReport"]
