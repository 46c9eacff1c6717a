"""Estimators: the catalog of installed estimators (below) and the estimator base class (above it)."""
