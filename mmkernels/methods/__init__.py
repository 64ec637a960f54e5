"""One file per paper: a config and apply(model, cfg): llama_adapter, lora, paca, lavin, compacter, hyperllava."""
