"""Training: next-item models with the generative-recommenders recipe (`next_item`), CTR models (`ctr`)."""
