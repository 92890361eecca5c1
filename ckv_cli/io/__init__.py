"""Files: safetensors headers read and checked by ckv itself, memory maps, and the guarded writer every output
goes through."""
