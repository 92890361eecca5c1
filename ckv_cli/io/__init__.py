"""Files and stopping safely: safetensors headers read and checked by ckv itself (`safetensors`), memory maps,
the one guarded writer every output goes through (`guarded`, under the names `files.check_output`,
`files.atomic_write`, `files.write_safetensors`), sharded file sets replaced as a unit (`fileset`), and
SIGTERM/SIGHUP handled as Ctrl-C (`signals`)."""
