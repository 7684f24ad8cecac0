"""``raybranch bench codec``: every step of real training runs checkpointed, codecs compared.

:mod:`.trajectory` trains the benchmark models and keeps every state; :mod:`.measure` pushes
them through a Checkpointer and measures what a user gets; :mod:`.report` runs the grid and
prints it; :mod:`.large` restores ResNet-50-sized state.
"""
