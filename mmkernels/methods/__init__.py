"""One file per paper: a config and apply(model, cfg). Filled by the method issues."""
