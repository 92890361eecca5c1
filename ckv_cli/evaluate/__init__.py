"""Evaluation against artifacts: compare with gates (`compare`), codec sweeps (`sweep`), inspection (`inspect`),
figures (`plots`)."""
