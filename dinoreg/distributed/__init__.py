"""Running dinoreg across machines: shard files shared by `--ray` and `dinoreg merge`."""
