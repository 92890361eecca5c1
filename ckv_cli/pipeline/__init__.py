"""The compress pipeline: the one encode/decode/score loop (`compress`), distillation, sharded output and Ray."""
