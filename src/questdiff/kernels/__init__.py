"""Low-bit kernels: Triton int8 GEMM / implicit-GEMM conv / 8-bit attention registered as torch custom ops
(``ops.py``), each with a pure-torch twin in ``reference.py`` (the oracle of their tests and the CPU backend).
Triton is imported only when a kernel runs. No nn.Modules here."""
