"""Serving from artifacts: the store base (`store`), next-item and CTR stores, attention over the compressed form."""
