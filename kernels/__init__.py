"""headrace Triton kernels (each in its own module, with a pure-torch `_ref` twin).

Kept import-free on purpose: transformers probes a package named `kernels`, so importing
this package must stay cheap and must not pull in triton or torch.
"""
