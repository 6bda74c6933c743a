"""Pure-torch training core and per-technique trainers (RealCustom, PVA, DisenDiff, DETEX).

Empty until the first trainer lands: StyleAligned, the only technique so far, is training-free.
"""
