"""Drop-in nn.Modules built on mmkernels.ops."""
